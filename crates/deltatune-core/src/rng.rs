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

/// SplitMix64's output multipliers (the scalar [`mix`] and the vector copy use the same).
const MIX_MUL: [u64; 2] = [0xbf58_476d_1ce4_e5b9, 0x94d0_49bb_1331_11eb];

/// SplitMix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX_MUL[0]);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_MUL[1]);
    z ^ (z >> 31)
}

/// Word `w` of [`Rng::threshold_bits`] from state `s`: its first `count` (at most 64) bits.
#[inline]
fn threshold_word(s: u64, w: usize, count: usize, threshold: u64) -> u64 {
    let mut acc = 0u64;
    for k in 0..count.div_ceil(2) {
        let r = mix(s.wrapping_add(GAMMA.wrapping_mul((32 * w + k) as u64 + 1)));
        acc |= u64::from((r & 0xffff_ffff) < threshold) << (2 * k);
        if 2 * k + 1 < count {
            acc |= u64::from((r >> 32) < threshold) << (2 * k + 1);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GAMMA, MIX_MUL};
    use std::arch::x86_64::*;

    pub(super) fn usable() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }

    /// Full words `w0 ..` of [`super::Rng::threshold_bits`] (threshold below 2³²): eight
    /// SplitMix64 draws per vector; comparing the vector as sixteen 32-bit lanes puts draw
    /// `k`'s low half at bit `2k` and its high half at bit `2k + 1`, the scalar order.
    ///
    /// # Safety
    /// AVX-512F and AVX-512DQ must be available.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn threshold_words(s: u64, w0: usize, words: &mut [u64], threshold: u32) {
        let lanes = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
        let gamma = _mm512_set1_epi64(GAMMA as i64);
        let step = _mm512_set1_epi64(GAMMA.wrapping_mul(8) as i64);
        let m1 = _mm512_set1_epi64(MIX_MUL[0] as i64);
        let m2 = _mm512_set1_epi64(MIX_MUL[1] as i64);
        let t = _mm512_set1_epi32(threshold as i32);
        // The states of draws 32·w0 + 0..8: s + GAMMA·(index + 1).
        let base = s.wrapping_add(GAMMA.wrapping_mul(32 * w0 as u64));
        let mut st = _mm512_add_epi64(
            _mm512_set1_epi64(base as i64),
            _mm512_mullo_epi64(lanes, gamma),
        );
        for word in words.iter_mut() {
            let mut acc = 0u64;
            for g in 0..4 {
                let mut z = st;
                z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<30>(z)), m1);
                z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<27>(z)), m2);
                z = _mm512_xor_si512(z, _mm512_srli_epi64::<31>(z));
                acc |= u64::from(_mm512_cmplt_epu32_mask(z, t)) << (16 * g);
                st = _mm512_add_epi64(st, step);
            }
            *word = acc;
        }
    }
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

    /// Bernoulli bits from the next draws, without advancing ([`Rng::advance`] skips them):
    /// bit `i % 64` of word `i / 64` is set when 32-bit half `i` of the draws (each draw's low
    /// half first) is below `threshold` (at most 2³²), for `i < n`. The draws depend only on their position, so
    /// the words fill in parallel for large `n`, eight draws per instruction where the CPU has
    /// AVX-512 DQ (64-bit multiplies); every path gives the same bits.
    pub fn threshold_bits(&self, n: usize, threshold: u64) -> Vec<u64> {
        let s = self.state;
        let mut bits = vec![0u64; n.div_ceil(64)];
        let full = n / 64;
        let fill = |w0: usize, words: &mut [u64]| {
            for (j, word) in words.iter_mut().enumerate() {
                let w = w0 + j;
                *word = threshold_word(s, w, (n - 64 * w).min(64), threshold);
            }
        };
        #[cfg(target_arch = "x86_64")]
        let fill = |w0: usize, words: &mut [u64]| {
            let fast = words.len().min(full.saturating_sub(w0));
            if threshold <= u64::from(u32::MAX) && fast > 0 && x86::usable() {
                // SAFETY: `usable` checked AVX-512F and DQ.
                unsafe { x86::threshold_words(s, w0, &mut words[..fast], threshold as u32) };
                fill(w0 + fast, &mut words[fast..]);
            } else {
                fill(w0, words);
            }
        };
        const CHUNK: usize = 256;
        if n >= 1 << 16 {
            use rayon::prelude::*;
            bits.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, words)| fill(c * CHUNK, words));
        } else {
            fill(0, &mut bits);
        }
        bits
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
