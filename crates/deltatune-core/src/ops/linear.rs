//! Linear layer with a frozen weight: `y = x·Wᵀ + b` that never computes a
//! weight gradient.
//!
//! candle's `Matmul` backward always evaluates both operand gradients, so
//! `x.matmul(&w.t())` with a frozen (plain) `w` still pays for `xᵀ·g`, a
//! full extra matmul per layer per step, and then throws the result away.
//! [`frozen_linear`] wraps the product in a `CustomOp1` on `x` that holds `W`
//! (and the bias) by reference:
//!
//! * forward calls candle's own CPU matmul (gemm) on `x` viewed as
//!   `[rows, in]` and a transposed *layout* of `W` (no copy), then adds the
//!   bias in the same op when the bias is frozen;
//! * backward returns only `dx = g·W`.
//!
//! A trainable bias is added with an ordinary `broadcast_add` so candle
//! differentiates it, and a `W` that is itself trainable (a variable or the
//! result of ops on variables, e.g. `W0 + ΔW`) falls back to plain candle
//! ops so that both gradients flow.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::kernels::{check_float, check_same_dtype, min_rows, wants_grad, with_slice, Real};

struct FrozenLinear {
    /// `[out, in]`, not tracked.
    w: Tensor,
    /// `[out]`, fused into the forward; `None` when absent or trainable.
    b: Option<Tensor>,
}

fn add_bias<T: Real>(y: &mut [T], b: &Tensor) -> Result<()> {
    with_slice::<T, _>(b, |bias| {
        let out = bias.len();
        if out > 0 {
            y.par_chunks_mut(out)
                .with_min_len(min_rows(out))
                .for_each(|row| {
                    for (o, &bv) in row.iter_mut().zip(bias) {
                        *o += bv;
                    }
                });
        }
        Ok(())
    })
}

/// Row-major copy of a strided `x` as a fresh CPU storage.
fn gather_storage(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    use super::kernels::contiguous;
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(contiguous(v, l).into_owned()),
        CpuStorage::F64(v) => CpuStorage::F64(contiguous(v, l).into_owned()),
        _ => {
            return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), "frozen_linear").bt())
        }
    })
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "deltatune-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.w.dims2()?;
        let dims = l.dims();
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1 checked") = out_f;

        let (ws, wl) = self.w.storage_and_layout();
        let ws = match &*ws {
            Storage::Cpu(ws) => ws,
            _ => bail!("frozen_linear: only CPU tensors are supported"),
        };
        // Wᵀ as a [in, out] view of W's storage: just swapped strides.
        let wt_l = wl.transpose(0, 1)?;

        let gathered;
        let (xs, xl) = if l.is_contiguous() {
            (
                s,
                Layout::contiguous_with_offset((rows, in_f), l.start_offset()),
            )
        } else {
            gathered = gather_storage(s, l)?;
            (&gathered, Layout::contiguous((rows, in_f)))
        };
        let mut y = xs.matmul(ws, (1, rows, out_f, in_f), &xl, &wt_l)?;
        if let Some(b) = &self.b {
            match &mut y {
                CpuStorage::F32(v) => add_bias::<f32>(v, b)?,
                CpuStorage::F64(v) => add_bias::<f64>(v, b)?,
                other => {
                    return Err(candle_core::Error::UnsupportedDTypeForOp(
                        other.dtype(),
                        "frozen_linear",
                    )
                    .bt())
                }
            }
        }
        Ok((y, Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, _in_f) = self.w.dims2()?;
        let rows = grad.elem_count() / out_f.max(1);
        let dx = grad
            .reshape((rows, out_f))?
            .matmul(&self.w)?
            .reshape(arg.shape())?;
        Ok(Some(dx))
    }
}

/// `y = x·Wᵀ + b` with `W` in PyTorch `[out, in]` layout and frozen.
///
/// Backward yields only `dx = g·W` — never a weight gradient — when `w` is a
/// plain tensor. A bias that is a variable or tracks an op still gets its
/// gradient (it is added with `broadcast_add` outside the custom op); a
/// frozen bias is fused into the forward. If `w` is a variable or tracks an
/// op, this falls back to `x.broadcast_matmul(&w.t())` so both gradients
/// flow.
///
/// # Shapes
/// * `x`: `[..., in]` (any number of leading dims, any layout), f32 or f64.
/// * `w`: `[out, in]`, same dtype.
/// * `b`: `[out]`, same dtype.
/// * returns `[..., out]`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "frozen_linear";
    check_float(x, OP)?;
    check_same_dtype(x, w, "w", OP)?;
    let (out_f, in_f) = match w.dims() {
        &[o, i] => (o, i),
        d => bail!("frozen_linear: w must be [out, in], got {:?}", d),
    };
    if x.dims().last() != Some(&in_f) {
        bail!(
            "frozen_linear: x {:?} does not end in w's input size {in_f} (w is {:?})",
            x.dims(),
            w.dims()
        );
    }
    if let Some(b) = b {
        check_same_dtype(x, b, "b", OP)?;
        if b.dims() != [out_f] {
            bail!("frozen_linear: b must be [{out_f}], got {:?}", b.dims());
        }
    }
    if wants_grad(w) {
        let y = if x.rank() == 1 {
            x.unsqueeze(0)?.matmul(&w.t()?)?.squeeze(0)?
        } else {
            x.broadcast_matmul(&w.t()?)?
        };
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    match b {
        Some(b) if wants_grad(b) => x
            .apply_op1(FrozenLinear {
                w: w.clone(),
                b: None,
            })?
            .broadcast_add(b),
        b => x.apply_op1(FrozenLinear {
            w: w.clone(),
            b: b.cloned(),
        }),
    }
}
