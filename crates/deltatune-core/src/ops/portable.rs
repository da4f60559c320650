//! The ops composed from candle's own tensor operations: the path taken on a device without our
//! kernels (a CUDA or Metal device), and on the CPU when [`force`] asks for it.
//!
//! Every op of this layer has a CPU kernel with a backward of its own; a tensor on another
//! device has no such kernel, so each public op checks [`active`] first and, when it holds,
//! computes the same function from candle operations that have a backward on every device
//! (`matmul`, `exp`, `sum_keepdim`, `gather`, `silu`, `gelu_erf` and the broadcast arithmetic).
//! The numbers are those of the CPU kernels up to rounding, and [`force`] lets the tests and
//! `deltatune`'s own checks run the composed path on the CPU to prove it.
//!
//! What the composed path gives up:
//!
//! * memory and time: each op keeps its intermediates for backward (a softmax keeps its
//!   exponentials, a norm its centred input);
//! * candle's `matmul` backward also computes the gradient of a frozen weight and throws it
//!   away, one extra product per linear layer in backward;
//! * a quantized weight is dequantized to f32 on the input's device at each product.

use std::cell::Cell;

use candle_core::{Result, Tensor, D};

use crate::quant::QuantMatrix;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Runs the composed path on this thread while the guard lives, on every device, the CPU
/// included. Restores the previous setting when dropped.
#[must_use = "the composed path is on only while the guard lives"]
pub struct Forced {
    before: bool,
}

impl Drop for Forced {
    fn drop(&mut self) {
        FORCED.with(|f| f.set(self.before));
    }
}

/// Makes every op of this layer take the composed path on this thread (see the module docs)
/// until the returned guard is dropped. Forward and backward both run on the calling thread, so
/// hold the guard across the whole step.
pub fn force() -> Forced {
    let before = FORCED.with(|f| f.replace(true));
    Forced { before }
}

/// Whether an op on `t` takes the composed path: `t` is not on the CPU, or [`force`] is on.
pub fn active(t: &Tensor) -> bool {
    !t.device().is_cpu() || FORCED.with(|f| f.get())
}

/// `x Wᵀ + b` with candle's matmul; `x` of any rank, `w` `[out, in]`.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = match x.rank() {
        1 => x.unsqueeze(0)?.matmul(&w.t()?)?.squeeze(0)?,
        2 => x.matmul(&w.t()?)?,
        _ => x.broadcast_matmul(&w.t()?)?,
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// [`linear`] through a quantized weight, dequantized to f32 on `x`'s device.
pub(crate) fn quant_linear(x: &Tensor, w: &QuantMatrix, b: Option<&Tensor>) -> Result<Tensor> {
    let dense = w
        .dequantize()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .to_device(x.device())?;
    linear(x, &dense, b)
}

/// `(x - mean) / sqrt(var + eps) · gamma + beta` over the last dimension (biased variance).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension: `exp(z - max) / sum`. The row maximum is a constant (its
/// gradient cancels); a row that is all `-inf` gives zeros, not NaN, as the CPU kernel does.
pub(crate) fn softmax_last_dim(z: &Tensor) -> Result<Tensor> {
    let m = z.max_keepdim(D::Minus1)?.detach();
    // An all `-inf` row has an `-inf` maximum: shift it by 0 instead (`-inf - -inf` is NaN).
    let m = m.maximum(f64::from(f32::MIN))?;
    let e = z.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?.maximum(1e-30)?;
    e.broadcast_div(&sum)
}

/// `softmax(scores · scale + key_bias)`, `scores` `[B, ..., Tq, Tk]`, `key_bias` `[B, Tk]` (or
/// with ones between), and with `causal = Some(offset)` query `i` sees keys `0..=i + offset`.
pub(crate) fn attention_softmax(
    scores: &Tensor,
    key_bias: &Tensor,
    scale: f64,
    causal: Option<usize>,
) -> Result<Tensor> {
    let dims = scores.dims();
    let rank = dims.len();
    let mut bias_shape = vec![1; rank];
    bias_shape[0] = dims[0];
    bias_shape[rank - 1] = dims[rank - 1];
    let bias = key_bias
        .detach()
        .to_dtype(scores.dtype())?
        .reshape(bias_shape)?;
    let mut z = (scores * scale)?.broadcast_add(&bias)?;
    if let Some(offset) = causal {
        let tk = dims[rank - 1];
        let tq = if rank >= 3 { dims[rank - 2] } else { 1 };
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    if j <= i + offset {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), scores.device())?.to_dtype(scores.dtype())?;
        z = z.broadcast_add(&mask)?;
    }
    softmax_last_dim(&z)
}

/// LoRA's up projection added to the frozen product: `base + scale · z · bᵀ`.
pub(crate) fn lora_up_add(base: &Tensor, z: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let r = b.dim(1)?;
    let rows = z.elem_count() / r.max(1);
    let up = z.reshape((rows, r))?.matmul(&b.t()?)?.affine(scale, 0.0)?;
    base + up.reshape(base.shape())?
}

/// Dropout from keep-bits: `x · mask`.
pub(crate) fn dropout(x: &Tensor, keep: &[u64], scale: f32) -> Result<Tensor> {
    x.mul(&super::dropout::keep_mask(x, keep, scale)?)
}

/// Attention on token-major projections (see [`super::attention`]): `q` `[B, Tq, H·D]`, `k`
/// and `v` `[B, Tk, Hkv·D]`, query head `h` reading key/value head `h / (H / Hkv)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    causal: Option<usize>,
    dropout_bits: Option<(&[u64], f32)>,
) -> Result<Tensor> {
    let (b, tq, qw) = q.dims3()?;
    let tk = k.dim(1)?;
    let dh = qw / heads;
    let head_major = |y: &Tensor, t: usize, n: usize| -> Result<Tensor> {
        y.reshape((b, t, n, dh))?.transpose(1, 2)?.contiguous()
    };
    let rep = heads / kv_heads;
    let shared = |y: &Tensor| -> Result<Tensor> {
        let y = head_major(y, tk, kv_heads)?;
        if rep == 1 {
            return Ok(y);
        }
        y.unsqueeze(2)?
            .broadcast_as((b, kv_heads, rep, tk, dh))?
            .reshape((b, heads, tk, dh))
    };
    let (qh, kh, vh) = (head_major(q, tq, heads)?, shared(k)?, shared(v)?);
    let scores = qh.matmul(&kh.t()?)?;
    let mut probs = attention_softmax(&scores, key_bias, scale, causal)?;
    if let Some((keep, s)) = dropout_bits {
        probs = dropout(&probs, keep, s)?;
    }
    probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .reshape((b, tq, heads * dh))
}

/// GELU with the exact erf, `x/2 · (1 + erf(x/√2))`, composed from `erf` (whose backward is
/// exact) rather than candle's `gelu_erf` (whose backward uses 1/√(2π) ≈ 0.398942, off by 1e-7).
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let e = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
    ((e + 1.0)? * x)? * 0.5
}

/// `silu(gate) · up`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()?.mul(up)
}

/// Rotate-half rotary embedding: `x` `[B, H, T, D]`, `cos`/`sin` `[B, T, D/2]`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(3)? / 2;
    let cos = cos.detach().to_dtype(x.dtype())?.unsqueeze(1)?;
    let sin = sin.detach().to_dtype(x.dtype())?.unsqueeze(1)?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y1, y2], 3)
}

/// The mean over rows of `logsumexp(row) - row[target]`; `logits` `[N, V]`.
pub(crate) fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let m = logits.max_keepdim(1)?.detach();
    let z = logits.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(1)?.log()?;
    let ids = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let picked = z.gather(&ids, 1)?;
    (lse - picked)?.mean_all()
}
