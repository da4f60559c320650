//! Softmax over the last dimension, plain and fused for attention.
//!
//! `candle_nn::ops::softmax_last_dim` has no backward pass, so using it in a
//! model silently cuts the autograd graph; composing softmax from `exp`,
//! `sum` and `div` works but costs several full passes and temporaries over
//! the (large) attention scores. These ops do one pass per row in forward
//! and one in backward, parallel over rows with rayon:
//!
//! * [`softmax_last_dim`]: `y = softmax(x)`, `dx = y ⊙ (g - Σ g⊙y)`.
//! * [`attention_softmax`]: `p = softmax(scores·scale + key_bias)` with the
//!   per-example additive key mask broadcast over heads and queries, and the
//!   gradient flowing to `scores` only (`d_scores = scale · p ⊙ (g - Σ g⊙p)`).
//!
//! Rows whose logits are all `-inf` (a fully masked row with an infinite
//! mask) give all-zero probabilities and zero gradient instead of NaN; with
//! a finite mask such as -1e4 or `f32::MIN` such a row is uniform, as in
//! PyTorch/Hugging Face BERT.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{
    check_float, dot, max, min_rows, simd_kernel, sum, wants_grad, with_slice, Real,
};

/// Turn a row of logits into probabilities in place.
#[inline(always)]
pub(super) fn softmax_logits_inplace<T: Real>(y: &mut [T]) {
    let m = max(y);
    if m == T::NEG_INFINITY {
        // Every logit is -inf (or the row is empty): no probability mass.
        y.fill(T::ZERO);
        return;
    }
    for v in y.iter_mut() {
        *v = (*v - m).fexp();
    }
    let inv = T::ONE / sum(y);
    for v in y.iter_mut() {
        *v *= inv;
    }
}

simd_kernel! {
    /// Softmax of one row, in place.
    fn softmax_row<T>(y: &mut [T]) {
        softmax_logits_inplace(y)
    }
}

simd_kernel! {
    /// One attention row: `y = softmax(s·scale + bias)`.
    fn attention_row<T>(s: &[T], bias: &[T], scale: T, y: &mut [T]) {
        for ((o, &sv), &bv) in y.iter_mut().zip(s).zip(bias) {
            *o = sv * scale + bv;
        }
        softmax_logits_inplace(y)
    }
}

simd_kernel! {
    /// One causal attention row: keys from `limit` on are masked out.
    fn causal_attention_row<T>(s: &[T], bias: &[T], scale: T, limit: usize, y: &mut [T]) {
        for (j, ((o, &sv), &bv)) in y.iter_mut().zip(s).zip(bias).enumerate() {
            *o = if j < limit { sv * scale + bv } else { T::NEG_INFINITY };
        }
        softmax_logits_inplace(y)
    }
}

simd_kernel! {
    /// One row of `dx = scale · y ⊙ (g - Σ g⊙y)`.
    fn softmax_bwd_row<T>(y: &[T], g: &[T], scale: T, dx: &mut [T]) {
        let s = dot(g, y);
        for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
            *o = scale * yv * (gv - s);
        }
    }
}

/// `dx = scale · y ⊙ (g - Σ g⊙y)` row by row.
fn softmax_bwd_kernel<T: Real>(y: &[T], g: &[T], d: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    if d == 0 {
        return dx;
    }
    dx.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(g.par_chunks(d)))
        .with_min_len(min_rows(d))
        .for_each(|(dxr, (yr, gr))| softmax_bwd_row(yr, gr, scale, dxr));
    dx
}

/// Softmax backward on tensors: reads `y` (the op's output) and `g`.
fn softmax_bwd(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let d = y.dims().last().copied().unwrap_or(1);
    let dev = y.device();
    match y.dtype() {
        candle_core::DType::F32 => with_slice::<f32, _>(y, |ys| {
            with_slice::<f32, _>(g, |gs| {
                let dx = softmax_bwd_kernel(ys, gs, d, scale as f32);
                Tensor::from_vec(dx, y.shape(), dev)
            })
        }),
        candle_core::DType::F64 => with_slice::<f64, _>(y, |ys| {
            with_slice::<f64, _>(g, |gs| {
                let dx = softmax_bwd_kernel(ys, gs, d, scale);
                Tensor::from_vec(dx, y.shape(), dev)
            })
        }),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "softmax-bwd").bt()),
    }
}

struct SoftmaxLastDim;

fn softmax_fwd_kernel<T: Real>(x: &[T], layout: &Layout) -> Vec<T> {
    let d = layout.dims().last().copied().unwrap_or(1);
    let mut y = super::kernels::contiguous(x, layout).into_owned();
    if d > 0 {
        y.par_chunks_mut(d)
            .with_min_len(min_rows(d))
            .for_each(softmax_row);
    }
    y
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "deltatune-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(softmax_fwd_kernel(x, l)),
            CpuStorage::F64(x) => CpuStorage::F64(softmax_fwd_kernel(x, l)),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name()).bt())
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        softmax_bwd(res, grad, 1.0).map(Some)
    }
}

/// Numerically stable softmax over the last dimension, with backward.
///
/// # Shapes
/// * `x`: `[..., d]` (any rank ≥ 1, any layout), f32 or f64.
/// * returns `[..., d]`, each last-dim row summing to 1 (all zeros for a row
///   of `-inf`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    check_float(x, "softmax_last_dim")?;
    if x.rank() == 0 {
        bail!("softmax_last_dim: expected a tensor of rank >= 1");
    }
    if super::portable::active(x) {
        return super::portable::softmax_last_dim(x);
    }
    x.apply_op1(SoftmaxLastDim)
}

struct AttentionSoftmax {
    scale: f64,
    /// Causal offset (see [`causal_attention_softmax`]); `None`: every key visible.
    causal: Option<usize>,
}

fn attention_fwd_kernel<T: Real>(
    s: &[T],
    sl: &Layout,
    bias: &[T],
    bl: &Layout,
    scale: T,
    causal: Option<usize>,
) -> Vec<T> {
    let tk = sl.dims().last().copied().unwrap_or(1);
    let rank = sl.dims().len();
    let tq = if rank >= 3 { sl.dims()[rank - 2] } else { 1 };
    let batch = sl.dims()[0];
    let s = super::kernels::contiguous(s, sl);
    let bias = super::kernels::contiguous(bias, bl);
    let mut y = vec![T::ZERO; s.len()];
    if tk == 0 || batch == 0 {
        return y;
    }
    let rows_per_batch = s.len() / (batch * tk);
    y.par_chunks_mut(tk)
        .zip(s.par_chunks(tk))
        .enumerate()
        .with_min_len(min_rows(tk))
        .for_each(|(row, (yr, sr))| {
            let b = row / rows_per_batch;
            let bias = &bias[b * tk..(b + 1) * tk];
            match causal {
                None => attention_row(sr, bias, scale, yr),
                Some(off) => causal_attention_row(sr, bias, scale, (row % tq) + off + 1, yr),
            }
        });
    y
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "deltatune-attention-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(s), CpuStorage::F32(b)) => CpuStorage::F32(attention_fwd_kernel(
                s,
                l1,
                b,
                l2,
                self.scale as f32,
                self.causal,
            )),
            (CpuStorage::F64(s), CpuStorage::F64(b)) => {
                CpuStorage::F64(attention_fwd_kernel(s, l1, b, l2, self.scale, self.causal))
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), self.name()).bt())
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        _key_bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !wants_grad(scores) {
            return Ok((None, None));
        }
        Ok((Some(softmax_bwd(res, grad, self.scale)?), None))
    }
}

/// Fused attention probabilities `softmax(scores * scale + key_bias)` over
/// the last (key) dimension, with the additive key mask broadcast over heads
/// and queries. Only `scores` receives a gradient; `key_bias` is treated as
/// a constant mask.
///
/// Masked keys should carry a large negative bias (-1e4, `f32::MIN` or
/// `-inf` all work). A fully masked row never yields NaN: it is uniform for
/// a finite mask and all zeros for `-inf`.
///
/// # Shapes
/// * `scores`: `[B, H, Tq, Tk]` (more generally `[B, ..., Tk]`), f32 or f64.
/// * `key_bias`: `[B, Tk]` or `[B, 1, 1, Tk]`; converted to `scores`' dtype.
/// * returns `[B, H, Tq, Tk]`.
pub fn attention_softmax(scores: &Tensor, key_bias: &Tensor, scale: f64) -> Result<Tensor> {
    attention_softmax_impl(scores, key_bias, scale, None)
}

/// [`attention_softmax`] with a causal mask: query `i` (of `Tq`) sees keys `0..=i + offset`
/// only, where `offset` counts the keys before the first query (prefix keys and cached
/// positions: `offset = Tk - Tq` for a decoder). Masked keys get probability 0 exactly.
///
/// # Shapes
/// * `scores`: `[B, H, Tq, Tk]`; `key_bias`: `[B, Tk]` (padding); returns `[B, H, Tq, Tk]`.
pub fn causal_attention_softmax(
    scores: &Tensor,
    key_bias: &Tensor,
    scale: f64,
    offset: usize,
) -> Result<Tensor> {
    attention_softmax_impl(scores, key_bias, scale, Some(offset))
}

fn attention_softmax_impl(
    scores: &Tensor,
    key_bias: &Tensor,
    scale: f64,
    causal: Option<usize>,
) -> Result<Tensor> {
    check_float(scores, "attention_softmax")?;
    let dims = scores.dims();
    if dims.len() < 2 {
        bail!(
            "attention_softmax: scores must be [B, ..., Tk], got {:?}",
            dims
        );
    }
    let (b, tk) = (dims[0], dims[dims.len() - 1]);
    let bd = key_bias.dims();
    let ok = bd.len() >= 2
        && bd[0] == b
        && bd[bd.len() - 1] == tk
        && bd[1..bd.len() - 1].iter().all(|&d| d == 1);
    if !ok {
        bail!(
            "attention_softmax: key_bias must be [B, Tk] = [{b}, {tk}] (or [B, 1, 1, Tk]), got {:?}",
            bd
        );
    }
    let key_bias = key_bias
        .detach()
        .reshape((b, tk))?
        .to_dtype(scores.dtype())?;
    if super::portable::active(scores) {
        return super::portable::attention_softmax(scores, &key_bias, scale, causal);
    }
    scores.apply_op2(&key_bias, AttentionSoftmax { scale, causal })
}
