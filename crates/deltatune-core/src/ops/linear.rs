//! Linear layer with a frozen weight: `y = x·Wᵀ + b` that never computes a
//! weight gradient.
//!
//! candle's `Matmul` backward always evaluates both operand gradients, so
//! `x.matmul(&w.t())` with a frozen (plain) `w` still pays for `xᵀ·g`, a
//! full extra matmul per layer per step, and then throws the result away.
//! [`frozen_linear`] wraps the product in a `CustomOp1` on `x` that holds `W`
//! (and the bias) by reference:
//!
//! * forward computes `x` viewed as `[rows, in]` times a transposed
//!   *layout* of `W` (no copy) and adds the bias in the same op when the
//!   bias is frozen;
//! * backward returns only `dx = g·W`.
//!
//! A trainable bias is added with an ordinary `broadcast_add` so candle
//! differentiates it. A `W` that is itself trainable (a variable or the
//! result of ops on variables, e.g. `W0 + ΔW`) needs both gradients: in f32
//! with AVX-512 it goes through a `CustomOp2` on `(x, W)` that also returns
//! `dW = gᵀ·x`, otherwise through plain candle ops.
//!
//! In f32 on a CPU with AVX-512F every product uses the AVX-512 GEMM of
//! [`super::gemm`], which fuses the bias; otherwise, and in f64, they use
//! candle's own CPU matmul (the `gemm` crate, AVX2 at best on stable Rust).
//! Either way the forward does not depend on which of `W` and `b` are
//! trainable: the same kernel computes `x·Wᵀ`, and a fused bias is added
//! after the whole sum, exactly as a separate `broadcast_add` would.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::gemm::{self, MatRef};
use super::kernels::{
    add_unfused_bias, check_float, check_same_dtype, contiguous, min_rows, split_bias, wants_grad,
    with_slice, Real,
};

#[cfg(test)]
use std::cell::Cell;

#[cfg(test)]
thread_local! {
    /// Tests set this to force the candle matmul path on this thread.
    pub(crate) static USE_CANDLE_MATMUL: Cell<bool> = const { Cell::new(false) };
}

/// Whether the f32 products may take the AVX-512 GEMM.
fn fast_path() -> bool {
    #[cfg(test)]
    if USE_CANDLE_MATMUL.with(|c| c.get()) {
        return false;
    }
    gemm::has_avx512()
}

/// `W` (`[out, in]`, f32 `data` with layout `l`) as the right-hand operand
/// of a product: `Wᵀ` (`[in, out]`) when `transpose`, `W` otherwise.
fn w_mat<'a>(data: &'a [f32], l: &Layout, transpose: bool) -> MatRef<'a> {
    let (s0, s1) = (l.stride()[0], l.stride()[1]);
    let data = &data[l.start_offset()..];
    // W[o, i] = data[o * s0 + i * s1].
    let (rs, cs) = if transpose { (s1, s0) } else { (s0, s1) };
    MatRef { data, rs, cs }
}

/// `x·Wᵀ (+ b)` for a row-major f32 `x` (`[rows, in_f]`) with the AVX-512
/// GEMM; `None` when that is not available. The bias is added after the
/// whole sum, so the result is bit-identical to adding it separately.
fn forward_f32(
    x: &[f32],
    rows: usize,
    out_f: usize,
    in_f: usize,
    wt: MatRef<'_>,
    b: Option<&Tensor>,
) -> Result<Option<Vec<f32>>> {
    if !fast_path() {
        return Ok(None);
    }
    let xm = MatRef {
        data: x,
        rs: in_f,
        cs: 1,
    };
    match b {
        Some(b) => with_slice::<f32, _>(b, |bias| {
            Ok(gemm::sgemm(rows, out_f, in_f, xm, wt, Some(bias)))
        }),
        None => Ok(gemm::sgemm(rows, out_f, in_f, xm, wt, None)),
    }
}

/// `a·b` for 2-D tensors: the AVX-512 GEMM for f32 on the CPU when
/// available (any layouts; a strided `a` is gathered first), candle's
/// matmul otherwise.
fn matmul_2d(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast_path()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu()
    {
        let (m, k) = a.dims2()?;
        let n = b.dims2()?.1;
        let (bs, bl) = b.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(bd)) = &*bs {
            let bm = w_mat(bd, bl, false);
            let y = with_slice::<f32, _>(a, |ad| {
                let am = MatRef {
                    data: ad,
                    rs: k,
                    cs: 1,
                };
                Ok(gemm::sgemm(m, n, k, am, bm, None))
            })?;
            if let Some(y) = y {
                return Tensor::from_vec(y, (m, n), a.device());
            }
        }
    }
    a.matmul(b)
}

/// `dW = gᵀ·x` (`[out, in]`) for `g` `[rows, out]` and `x` `[..., in]`
/// with `rows` rows: `gᵀ` is transposed into a row-major copy and the
/// product goes through the AVX-512 GEMM (f32), or candle's matmul.
fn weight_grad(g: &Tensor, x: &Tensor, rows: usize, out_f: usize, in_f: usize) -> Result<Tensor> {
    if fast_path() && g.dtype() == DType::F32 && x.dtype() == DType::F32 {
        let dw = with_slice::<f32, _>(g, |gd| {
            let gt = gemm::transpose(gd, rows, out_f);
            with_slice::<f32, _>(x, |xd| {
                let a = MatRef {
                    data: &gt,
                    rs: rows,
                    cs: 1,
                };
                let b = MatRef {
                    data: xd,
                    rs: in_f,
                    cs: 1,
                };
                Ok(gemm::sgemm(out_f, in_f, rows, a, b, None))
            })
        })?;
        if let Some(dw) = dw {
            return Tensor::from_vec(dw, (out_f, in_f), g.device());
        }
    }
    g.t()?.matmul(&x.reshape((rows, in_f))?)
}

/// Rows of `x` viewed as `[rows, in]` and the output dims `[..., out]`.
fn rows_and_out_dims(l: &Layout, out_f: usize) -> (usize, Vec<usize>) {
    let dims = l.dims();
    let rows = dims[..dims.len() - 1].iter().product::<usize>();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked") = out_f;
    (rows, out_dims)
}

/// `y = x·Wᵀ (+ frozen b)` for a trainable `W`, with both gradients: the
/// f32 AVX-512 path for a `W` that is a variable or tracks an op, so that
/// the forward is bit-identical to that of a frozen `W` ([`FrozenLinear`]).
struct TrainableLinear {
    /// `[out]`, fused into the forward; `None` when absent or trainable.
    b: Option<Tensor>,
}

impl CustomOp2 for TrainableLinear {
    fn name(&self) -> &'static str {
        "deltatune-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = wl.shape().dims2()?;
        let (rows, out_dims) = rows_and_out_dims(xl, out_f);
        if let (CpuStorage::F32(xd), CpuStorage::F32(wd)) = (xs, ws) {
            let x = contiguous(xd, xl);
            let wt = w_mat(wd, wl, true);
            if let Some(y) = forward_f32(&x, rows, out_f, in_f, wt, self.b.as_ref())? {
                return Ok((CpuStorage::F32(y), Shape::from(out_dims)));
            }
        }
        bail!("deltatune-linear: only used for f32 on CPUs with AVX-512")
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = w.dims2()?;
        let rows = x.dims()[..x.rank() - 1].iter().product::<usize>();
        let g = grad.detach().reshape((rows, out_f))?;
        let dx = if wants_grad(x) {
            Some(matmul_2d(&g, &w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if wants_grad(w) {
            Some(weight_grad(&g, &x.detach(), rows, out_f, in_f)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

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
        let (rows, out_dims) = rows_and_out_dims(l, out_f);

        let (ws, wl) = self.w.storage_and_layout();
        let ws = match &*ws {
            Storage::Cpu(ws) => ws,
            _ => bail!("frozen_linear: only CPU tensors are supported"),
        };
        if let (CpuStorage::F32(xd), CpuStorage::F32(wd), true) = (s, ws, fast_path()) {
            let x = contiguous(xd, l);
            let wt = w_mat(wd, wl, true);
            if let Some(y) = forward_f32(&x, rows, out_f, in_f, wt, self.b.as_ref())? {
                return Ok((CpuStorage::F32(y), Shape::from(out_dims)));
            }
        }
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
        let rows = arg.dims()[..arg.rank() - 1].iter().product::<usize>();
        let g = grad.reshape((rows, out_f))?;
        Ok(Some(matmul_2d(&g, &self.w)?.reshape(arg.shape())?))
    }
}

/// `y = x·Wᵀ + b` with `W` in PyTorch `[out, in]` layout and frozen.
///
/// Backward yields only `dx = g·W` — never a weight gradient — when `w` is a
/// plain tensor. A bias that is a variable or tracks an op still gets its
/// gradient (it is added with `broadcast_add` outside the custom op); a
/// frozen bias is fused into the forward. If `w` is a variable or tracks an
/// op, both gradients flow: through a custom op with the same forward
/// kernel (f32, AVX-512) or through `x.broadcast_matmul(&w.t())`.
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
    // A frozen bias is fused into the op, a trainable one added after it.
    if super::portable::active(x) {
        return super::portable::linear(x, w, b);
    }
    let (fused, added) = split_bias(b);
    if wants_grad(w) && fast_path() && x.dtype() == DType::F32 && x.device().is_cpu() {
        let y = x.apply_op2(w, TrainableLinear { b: fused })?;
        return add_unfused_bias(y, added);
    }
    if wants_grad(w) {
        return super::portable::linear(x, w, b);
    }
    let y = x.apply_op1(FrozenLinear {
        w: w.clone(),
        b: fused,
    })?;
    add_unfused_bias(y, added)
}
