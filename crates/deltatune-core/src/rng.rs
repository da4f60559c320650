//! A small seeded random number generator (SplitMix64), so runs with the same seed are identical.
//! candle's CPU random functions cannot be seeded, so every random draw of deltatune goes through
//! this type.

use candle_core::{Result, Shape, Tensor};

/// SplitMix64 (Steele, Lea and Flood 2014): a 64-bit state, one add and a mixing function per draw.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// SplitMix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x5851_f42d_4c95_7f2d,
        }
    }

    /// A generator for a named stream, independent of the order in which streams are created.
    pub fn derive(&self, name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self::new(self.state ^ h.rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// The next `k` draws as a function of their index, without advancing: draw `i` (from 0)
    /// is `at(i)`. SplitMix64's draws depend only on their position, so callers may compute
    /// them in any order or on several threads; [`Rng::advance`] then skips them.
    pub fn ahead(&self) -> impl Fn(u64) -> u64 + Send + Sync + Copy {
        let s = self.state;
        move |i| mix(s.wrapping_add(GAMMA.wrapping_mul(i + 1)))
    }

    /// Skips `k` draws (as `k` calls of [`Rng::next_u64`] would).
    pub fn advance(&mut self, k: u64) {
        self.state = self.state.wrapping_add(GAMMA.wrapping_mul(k));
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// An f32 tensor with entries uniform in [lo, hi), on [`crate::device::current`].
    pub fn uniform_tensor(&mut self, shape: impl Into<Shape>, lo: f64, hi: f64) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (lo + (hi - lo) * self.uniform()) as f32)
            .collect();
        Tensor::from_vec(v, shape, &crate::device::current())
    }

    /// An f32 tensor with entries normal(0, std), on [`crate::device::current`].
    pub fn normal_tensor(&mut self, shape: impl Into<Shape>, std: f64) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (std * self.normal()) as f32)
            .collect();
        Tensor::from_vec(v, shape, &crate::device::current())
    }
}
