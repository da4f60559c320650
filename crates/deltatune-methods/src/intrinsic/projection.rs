//! Fixed random maps from a low-dimensional `z` [d] to a flattened prompt [n]: a dense Gaussian
//! matrix or Fastfood (Le et al. 2013), both built from plain candle ops so that gradients flow
//! back to `z`.

use candle_core::{DType, Tensor};
use deltatune_core::{Result, Rng};

/// A fixed linear map `[d] -> [n]` whose entries behave like N(0, scale^2).
#[derive(Debug, Clone)]
pub enum Projection {
    /// `D` [n, d].
    Dense { d: Tensor },
    /// The structured Fastfood map.
    Fastfood(Fastfood),
}

/// Fastfood `V = (1 / sqrt(L)) S H G Pi H B` (Le et al. 2013), restricted to the first `d`
/// columns (z padded with zeros to L) and the first `n` rows; `H` is the unnormalised
/// Walsh-Hadamard matrix of size L (the next power of two >= max(n, d)), `B` random signs, `Pi` a
/// random permutation, `G` Gaussian and `S_ii = s_i / ||G||_F` with `s_i` chi-distributed with L
/// degrees of freedom, so that rows have the norms of Gaussian rows. Aghajanyan et al. 2021 use
/// the same map without `S`.
#[derive(Debug, Clone)]
pub struct Fastfood {
    n: usize,
    dim: usize,
    l: usize,
    /// B: random signs [L].
    b: Tensor,
    /// Pi: a permutation of 0..L [L] (u32).
    perm: Tensor,
    /// G: Gaussian [L].
    g: Tensor,
    /// The first n diagonal entries of S, times `scale / sqrt(L)` [n].
    s: Tensor,
}

/// The unnormalised Walsh-Hadamard transform along the last dimension (a power of two), in
/// log2(L) butterfly stages of ordinary tensor ops (so it has a backward: H is symmetric).
///
/// # Shapes
/// `x`: [..., L] -> [..., L]
pub fn fwht(x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let l = *dims.last().unwrap_or(&1);
    if !l.is_power_of_two() {
        candle_core::bail!("fwht needs a power-of-two length, got {l}");
    }
    let m = x.elem_count() / l.max(1);
    let mut y = x.reshape((m, l))?;
    let mut h = 1;
    while h < l {
        let v = y.reshape((m, l / (2 * h), 2, h))?;
        let a = v.narrow(2, 0, 1)?;
        let b = v.narrow(2, 1, 1)?;
        y = Tensor::cat(&[(&a + &b)?, (&a - &b)?], 2)?.reshape((m, l))?;
        h *= 2;
    }
    y.reshape(dims)
}

/// A draw from the chi distribution with `k` degrees of freedom (exact for small `k`,
/// Wilson-Hilferty otherwise).
fn chi(k: usize, rng: &mut Rng) -> f64 {
    if k <= 64 {
        return (0..k).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt();
    }
    let k = k as f64;
    let c = 2.0 / (9.0 * k);
    let w = (1.0 - c + rng.normal() * c.sqrt()).max(0.0);
    (k * w.powi(3)).sqrt()
}

impl Projection {
    /// A dense Gaussian `D` [n, d] with entries N(0, scale^2).
    pub fn dense(n: usize, d: usize, scale: f64, rng: &mut Rng) -> Result<Self> {
        Ok(Projection::Dense {
            d: rng.normal_tensor((n, d), scale)?,
        })
    }

    /// Fastfood with entries that behave like N(0, scale^2).
    pub fn fastfood(n: usize, d: usize, scale: f64, rng: &mut Rng) -> Result<Self> {
        let l = n.max(d).max(1).next_power_of_two();
        let signs: Vec<f32> = (0..l)
            .map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 })
            .collect();
        let mut perm: Vec<u32> = (0..l as u32).collect();
        rng.shuffle(&mut perm);
        let g: Vec<f64> = (0..l).map(|_| rng.normal()).collect();
        let g_norm = g.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        let k = scale / (l as f64).sqrt() / g_norm;
        let s: Vec<f32> = (0..n).map(|_| (chi(l, rng) * k) as f32).collect();
        let dev = candle_core::Device::Cpu;
        Ok(Projection::Fastfood(Fastfood {
            n,
            dim: d,
            l,
            b: Tensor::from_vec(signs, l, &dev)?,
            perm: Tensor::from_vec(perm, l, &dev)?,
            g: Tensor::from_vec(g.iter().map(|v| *v as f32).collect::<Vec<_>>(), l, &dev)?,
            s: Tensor::from_vec(s, n, &dev)?,
        }))
    }

    /// Input dimension d.
    pub fn in_dim(&self) -> usize {
        match self {
            Projection::Dense { d } => d.dims()[1],
            Projection::Fastfood(f) => f.dim,
        }
    }

    /// Output dimension n.
    pub fn out_dim(&self) -> usize {
        match self {
            Projection::Dense { d } => d.dims()[0],
            Projection::Fastfood(f) => f.n,
        }
    }

    /// `D z`, differentiable in `z`.
    ///
    /// # Shapes
    /// `z`: [d] -> [n]
    pub fn apply(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projection::Dense { d } => d.matmul(&z.unsqueeze(1)?.to_dtype(d.dtype())?)?.squeeze(1),
            Projection::Fastfood(f) => {
                let z = z.to_dtype(DType::F32)?;
                let zp = if f.l > f.dim {
                    Tensor::cat(
                        &[&z, &Tensor::zeros(f.l - f.dim, DType::F32, z.device())?],
                        0,
                    )?
                } else {
                    z
                };
                let x = fwht(&zp.mul(&f.b)?)?;
                let x = x.index_select(&f.perm, 0)?.mul(&f.g)?;
                fwht(&x)?.narrow(0, 0, f.n)?.mul(&f.s)
            }
        }
    }

    /// The map as an explicit matrix [n, d] (for inspection and tests; O(n d) memory).
    pub fn to_matrix(&self) -> candle_core::Result<Tensor> {
        match self {
            Projection::Dense { d } => Ok(d.clone()),
            Projection::Fastfood(f) => {
                let eye = Tensor::eye(f.dim, DType::F32, &candle_core::Device::Cpu)?;
                let cols = (0..f.dim)
                    .map(|j| self.apply(&eye.get(j)?))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&cols, 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwht_equals_the_hadamard_matrix() {
        let l: usize = 8;
        // Sylvester's H_ij = (-1)^popcount(i & j).
        let h: Vec<f32> = (0..l * l)
            .map(|k| {
                if ((k / l) & (k % l)).count_ones() & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let h = Tensor::from_vec(h, (l, l), &candle_core::Device::Cpu).unwrap();
        let x = Rng::new(3).normal_tensor((2, l), 1.0).unwrap();
        let want = x.matmul(&h).unwrap();
        let got = fwht(&x).unwrap();
        let d: f32 = (want - got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn fastfood_entries_have_the_requested_scale() {
        let (n, d, scale) = (300, 40, 0.5);
        let p = Projection::fastfood(n, d, scale, &mut Rng::new(1)).unwrap();
        let m = p.to_matrix().unwrap();
        assert_eq!(m.dims(), &[n, d]);
        let ms: f32 = m.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
        let rms = f64::from(ms).sqrt();
        assert!((rms / scale - 1.0).abs() < 0.15, "rms {rms} vs {scale}");
    }
}
