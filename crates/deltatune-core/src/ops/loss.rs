//! Cross-entropy over the last dimension in one op: the mean of `logsumexp(x) - x[target]`
//! over rows, with backward `(softmax(x) - onehot(target)) · g / rows`.
//!
//! `candle_nn::loss::cross_entropy` composes log-softmax from max, subtract, exp, sum and log
//! and keeps each intermediate for backward: with a decoder's vocabulary (49,152 columns for
//! SmolLM2) that is several copies of the logits per step. This op keeps nothing but the
//! logits it reads and recomputes the softmax row by row in backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{check_float, contiguous, max, simd_kernel, wants_grad, with_slice, Real};

struct CrossEntropy {
    targets: Vec<u32>,
}

/// Independent sums in [`sum_exp`]: one AVX-512 register of f32.
const EXP_LANES: usize = 16;

simd_kernel! {
    /// `Σ e^(x - m)` over a row: the exponentials in the row's precision (f32's branch-free
    /// polynomial vectorises; f64 calls libm), summed in `EXP_LANES` lanes, then in f64.
    fn sum_exp<T>(row: &[T], m: T) -> f64 {
        let mut acc = [T::ZERO; EXP_LANES];
        let mut it = row.chunks_exact(EXP_LANES);
        for c in &mut it {
            for l in 0..EXP_LANES {
                acc[l] += (c[l] - m).fexp();
            }
        }
        let tail: f64 = it.remainder().iter().map(|&v| (v - m).fexp().to_f64()).sum();
        acc.iter().map(|a| a.to_f64()).sum::<f64>() + tail
    }
}

simd_kernel! {
    /// One row of the backward: `d = e^(x - lse) · g`.
    fn softmax_scaled_row<T>(row: &[T], lse: T, g: T, d: &mut [T]) {
        for (o, &xv) in d.iter_mut().zip(row) {
            *o = (xv - lse).fexp() * g;
        }
    }
}

/// `logsumexp` of a row; the sum of exponentials is taken in the row's precision (see
/// [`sum_exp`]) and the logarithm in f64.
fn lse<T: Real>(row: &[T]) -> f64 {
    let m = max(row);
    m.to_f64() + sum_exp(row, m).ln()
}

fn ce_fwd<T: Real>(x: &[T], l: &Layout, targets: &[u32]) -> T {
    let v = l.dims().last().copied().unwrap_or(1);
    let x = contiguous(x, l);
    let total: f64 = x
        .par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| lse(row) - row[t as usize].to_f64())
        .sum();
    T::from_f64(total / targets.len().max(1) as f64)
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "deltatune-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(vec![ce_fwd(x, l, &self.targets)]),
            CpuStorage::F64(x) => CpuStorage::F64(vec![ce_fwd(x, l, &self.targets)]),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name()).bt())
            }
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !wants_grad(x) {
            return Ok(None);
        }
        let v = x.dims().last().copied().unwrap_or(1);
        let n = self.targets.len().max(1);
        let gs = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / n as f64;
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(x, |xs| {
                    let mut dx = vec![0 as $t; xs.len()];
                    dx.par_chunks_mut(v)
                        .zip(xs.par_chunks(v).zip(self.targets.par_iter()))
                        .for_each(|(d, (row, &t))| {
                            softmax_scaled_row(row, lse(row) as $t, gs as $t, d);
                            d[t as usize] -= gs as $t;
                        });
                    Tensor::from_vec(dx, x.shape(), x.device())
                })
            };
        }
        match x.dtype() {
            candle_core::DType::F32 => run!(f32).map(Some),
            candle_core::DType::F64 => run!(f64).map(Some),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "cross-entropy-bwd").bt()),
        }
    }
}

/// Mean cross-entropy of `logits` against `targets`.
///
/// # Shapes
/// `logits`: [N, V] (f32 or f64), `targets`: N ids < V -> scalar
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    check_float(logits, "cross_entropy")?;
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        bail!(
            "cross_entropy: {} targets for {n} rows of logits",
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross_entropy: target {bad} is outside the {v} classes");
    }
    if super::portable::active(logits) {
        return super::portable::cross_entropy(logits, targets);
    }
    logits.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
    })
}
