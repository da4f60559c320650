//! Dropout as ops that keep the mask as bits: [`dropout_bits_op`] (`x · mask`), and dropout
//! fused into the low-rank projection that follows it (LoRA's `dropout(x) A^T`).
//!
//! Multiplying by an f32 mask tensor (`x.mul(&mask)`) costs a full-size mask per dropout, and
//! candle's backward of that product also computes the gradient of the constant mask (a product,
//! a zero-filled buffer and a sum, each as large as `x`) only to drop it. [`dropout_bits_op`]
//! gives the same numbers (`x · scale` where kept, else 0) from the bits, and its backward is
//! the same masking of the gradient.
//!
//! The unfused form keeps two full-size tensors per LoRA site alive until the backward pass
//! (the f32 mask and the dropped input) only to feed a rank-r product. Here the mask is a bit
//! per element, drawn from the context's stream exactly as [`Ctx::dropout`] draws it, and the
//! product is computed on the fly: the op keeps its input (which the graph holds anyway) and
//! the bits, and its output is `[rows, r]`.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{contiguous, dot, par_new, simd_kernel, wants_grad, Real};
use crate::sites::Ctx;

/// `x · mask` with the mask as bits (`scale` where kept, else 0).
pub(super) struct Dropout {
    /// One bit per element of `x` (row-major): kept.
    pub(super) keep: Arc<Vec<u64>>,
    /// `1 / (1 - p)`.
    pub(super) scale: f32,
}

impl Dropout {
    /// `out[i] = x[i] · scale` where bit `i` is set, else 0, for a row-major `x`.
    pub(super) fn apply<T: Real>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(f64::from(self.scale));
        // Whole 64-element words per task.
        const CHUNK: usize = 64 * 256;
        par_new(x.len(), CHUNK, |c, o| {
            let base = c * CHUNK;
            keep_chunk(&self.keep, base, scale, &x[base..base + o.len()], o)
        })
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "deltatune-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.shape().elem_count();
        if self.keep.len() * 64 < n {
            bail!(
                "dropout: {} mask bits for {n} elements",
                self.keep.len() * 64
            );
        }
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&contiguous(v, l))),
            CpuStorage::F64(v) => CpuStorage::F64(self.apply(&contiguous(v, l))),
            other => {
                return Err(
                    candle_core::Error::UnsupportedDTypeForOp(other.dtype(), "dropout").bt(),
                )
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.detach().apply_op1(Dropout {
            keep: Arc::clone(&self.keep),
            scale: self.scale,
        })?))
    }
}

/// `x · mask` for the keep-bits of [`Ctx::dropout_bits`] (`scale` where kept, else 0), as one
/// op whose backward masks the gradient the same way. f32 or f64 on the CPU; other dtypes and
/// devices multiply by a mask tensor.
pub fn dropout_bits_op(x: &Tensor, keep: Vec<u64>, scale: f32) -> Result<Tensor> {
    if super::portable::active(x) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return super::portable::dropout(x, &keep, scale);
    }
    x.apply_op1(Dropout {
        keep: Arc::new(keep),
        scale,
    })
}

/// The keep mask of a dropout as a tensor in `x`'s shape, dtype and device: `scale` where bit
/// `i % 64` of word `i / 64` is set (element `i` kept), else 0.
pub(crate) fn keep_mask(x: &Tensor, keep: &[u64], scale: f32) -> Result<Tensor> {
    let n = x.elem_count();
    if keep.len() * 64 < n {
        bail!("dropout: {} mask bits for {n} elements", keep.len() * 64);
    }
    let mask = par_new(n, 64 * 256, |t, chunk| {
        expand_bits(&keep[t * 256..], scale, chunk)
    });
    Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// Bits `bit .. bit + 64` of the keep-mask as one word (bit `bit` lowest; past the end 0).
#[inline(always)]
fn keep_word(keep: &[u64], bit: usize) -> u64 {
    let (w, s) = (bit / 64, bit % 64);
    let lo = keep.get(w).map_or(0, |&x| x >> s);
    if s == 0 {
        lo
    } else {
        lo | keep.get(w + 1).map_or(0, |&x| x << (64 - s))
    }
}

/// `x · scale` where bit `b` of `word` is set, else 0: one lane of the masks below.
#[inline(always)]
pub(super) fn kept<T: Real>(word: u64, b: usize, x: T, scale: T) -> T {
    if word >> b & 1 == 1 {
        x * scale
    } else {
        T::ZERO
    }
}

/// `out[j] = x[j]·scale` where bit `base + j` of the keep-mask is set, else 0. The bits are
/// read a word at a time and tested per lane, which vectorises (a per-element word lookup
/// does not).
#[inline(always)]
pub(super) fn keep_times<T: Real>(keep: &[u64], base: usize, scale: T, x: &[T], out: &mut [T]) {
    debug_assert_eq!(x.len(), out.len());
    for (c, (o, xs)) in out.chunks_mut(64).zip(x.chunks(64)).enumerate() {
        let word = keep_word(keep, base + 64 * c);
        for (b, (ov, &xv)) in o.iter_mut().zip(xs).enumerate() {
            *ov = kept(word, b, xv, scale);
        }
    }
}

/// [`keep_times`] in place.
#[inline(always)]
pub(super) fn keep_times_in_place<T: Real>(keep: &[u64], base: usize, scale: T, x: &mut [T]) {
    for (c, xs) in x.chunks_mut(64).enumerate() {
        let word = keep_word(keep, base + 64 * c);
        for (b, v) in xs.iter_mut().enumerate() {
            *v = kept(word, b, *v, scale);
        }
    }
}

simd_kernel! {
    /// [`keep_times`] over a chunk.
    fn keep_chunk<T>(keep: &[u64], base: usize, scale: T, x: &[T], out: &mut [T]) {
        keep_times(keep, base, scale, x, out)
    }
}

simd_kernel! {
    /// `out[i] = scale` where bit `i` of `keep` is set, else 0 (`out` starts at a word).
    fn expand_bits<T>(keep: &[u64], scale: T, out: &mut [T]) {
        for (w, o) in out.chunks_mut(64).enumerate() {
            let word = keep[w];
            for (b, v) in o.iter_mut().enumerate() {
                *v = kept(word, b, T::ONE, scale);
            }
        }
    }
}

simd_kernel! {
    /// One row of [`DropoutProject`]'s forward: the row dropped into `buf`
    /// (`x · scale` where bit `base + k` is set, else 0), then `z[j] = buf · a_j` for
    /// every row `a_j` of `a` (`[z.len(), buf.len()]`). f32 with AVX-512 takes four rows of
    /// `a` per pass over `buf` ([`x86::project4`]); otherwise one [`dot`] per row.
    fn project_row<T>(x: &[T], keep: &[u64], base: usize, scale: T, a: &[T], buf: &mut [T], z: &mut [T]) {
        keep_times(keep, base, scale, x, buf);
        let cols = buf.len();
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && super::gemm::has_avx512()
        {
            assert!(a.len() >= z.len() * cols, "project_row: a too short");
            // SAFETY: `T` is f32 (checked), AVX-512F is available (checked), `a` holds
            // `z.len()` rows of `cols` (asserted).
            unsafe {
                let buf = &*(buf as *const [T] as *const [f32]);
                let a = &*(a as *const [T] as *const [f32]);
                let z = &mut *(z as *mut [T] as *mut [f32]);
                for (g, zg) in z.chunks_mut(4).enumerate() {
                    x86::project4(buf, &a[4 * g * cols..], cols, zg);
                }
            }
            return;
        }
        for (j, zj) in z.iter_mut().enumerate() {
            *zj = dot(buf, &a[j * cols..(j + 1) * cols]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `out[t] = buf · a[t·cols ..][..cols]` for `t < out.len() <= 4`: sixteen columns per
    /// step, one accumulator per row, masked loads for the last columns.
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must hold `out.len()` rows of `cols = buf.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn project4(buf: &[f32], a: &[f32], cols: usize, out: &mut [f32]) {
        let n = out.len();
        debug_assert!((1..=4).contains(&n) && a.len() >= n * cols && buf.len() == cols);
        let rows: [*const f32; 4] = std::array::from_fn(|t| a.as_ptr().add(t.min(n - 1) * cols));
        let bp = buf.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut c = 0;
        while c < cols {
            let k = ((1u32 << (cols - c).min(16)) - 1) as __mmask16;
            let b = _mm512_maskz_loadu_ps(k, bp.add(c));
            for (acc_t, row) in acc.iter_mut().zip(rows) {
                *acc_t = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(k, row.add(c)), *acc_t);
            }
            c += 16;
        }
        for (o, acc_t) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(acc_t);
        }
    }
}

struct DropoutProject {
    /// One bit per element of `x` (row-major): kept.
    keep: Arc<Vec<u64>>,
    /// `1 / (1 - p)`.
    scale: f32,
}

impl CustomOp2 for DropoutProject {
    fn name(&self) -> &'static str {
        "deltatune-dropout-project"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = *xl.dims().last().unwrap_or(&0);
        let rows = xl.shape().elem_count() / cols.max(1);
        let (r, a_cols) = al.shape().dims2()?;
        if a_cols != cols {
            bail!(
                "dropout_project: x is {:?} but a is [{r}, {a_cols}]",
                xl.dims()
            );
        }
        let (CpuStorage::F32(xd), CpuStorage::F32(ad)) = (xs, a_s) else {
            bail!("dropout_project: f32 only");
        };
        let x = contiguous(xd, xl);
        let a = contiguous(ad, al);
        let mut z = vec![0f32; rows * r];
        z.par_chunks_mut(r.max(1)).enumerate().for_each_init(
            || vec![0f32; cols],
            |buf, (row, zr)| {
                let base = row * cols;
                let xr = &x[base..base + cols];
                project_row(xr, &self.keep, base, self.scale, &a, buf, zr);
            },
        );
        let mut out_dims = xl.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 1 checked") = r;
        Ok((CpuStorage::F32(z), Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (r, cols) = a.dims2()?;
        let rows = x.elem_count() / cols.max(1);
        let mask = keep_mask(x, &self.keep, self.scale)?.reshape((rows, cols))?;
        let g = grad.detach().reshape((rows, r))?;
        let dx = if wants_grad(x) {
            Some((g.matmul(&a.detach())? * &mask)?.reshape(x.shape())?)
        } else {
            None
        };
        let da = if wants_grad(a) {
            let xm = (x.detach().reshape((rows, cols))? * &mask)?;
            Some(g.t()?.matmul(&xm)?)
        } else {
            None
        };
        Ok((dx, da))
    }
}

/// `dropout(x, p) a^T` for `x` `[rows, in]` and `a` `[r, in]` (LoRA's down projection), with the
/// dropout mask drawn from `ctx` as [`Ctx::dropout`] would draw it. In training on the CPU in
/// f32 the mask is kept as bits and never materialised in the forward pass; otherwise (no
/// dropout, evaluation, other dtypes or devices) this is `ctx.dropout(x, p)?.matmul(a^T)`.
///
/// # Shapes
/// `x`: [..., in], `a`: [r, in] -> [..., r]
pub fn dropout_project(x: &Tensor, a: &Tensor, p: f64, ctx: &Ctx) -> Result<Tensor> {
    if !ctx.train
        || p <= 0.0
        || x.dtype() != DType::F32
        || a.dtype() != DType::F32
        || super::portable::active(x)
        || x.rank() == 0
    {
        let (r, cols) = a.dims2()?;
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = r;
        }
        let rows = x.elem_count() / cols.max(1);
        return ctx
            .dropout(x, p)?
            .reshape((rows, cols))?
            .matmul(&a.t()?)?
            .reshape(out_dims);
    }
    let (keep, scale) = ctx.dropout_bits(x.elem_count(), p);
    x.apply_op2(
        a,
        DropoutProject {
            keep: Arc::new(keep),
            scale,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::max_abs_diff as max_abs;
    use crate::Rng;
    use candle_core::Var;

    /// The fused op gives what `ctx.dropout` + matmul gives from the same stream: forward
    /// values and both gradients; and the stream advances the same way (the next draw agrees).
    #[test]
    fn fused_dropout_projection_equals_dropout_then_matmul() {
        let mut r = Rng::new(3);
        for (rows, cols, rank, p) in [(37, 19, 4, 0.1), (8, 130, 8, 0.5), (5, 3, 1, 0.9)] {
            let x = Var::from_tensor(&r.normal_tensor((rows, cols), 1.0).unwrap()).unwrap();
            let a = Var::from_tensor(&r.normal_tensor((rank, cols), 1.0).unwrap()).unwrap();
            let w = r.normal_tensor((rows, rank), 1.0).unwrap();
            let run = |fused: bool| {
                let ctx = Ctx::train(Rng::new(11));
                let z = if fused {
                    dropout_project(x.as_tensor(), a.as_tensor(), p, &ctx).unwrap()
                } else {
                    ctx.dropout(x.as_tensor(), p)
                        .unwrap()
                        .matmul(&a.as_tensor().t().unwrap())
                        .unwrap()
                };
                let loss = (&z * &w).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let next = ctx.dropout_bits(64, 0.5).0;
                (
                    z,
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(a.as_tensor()).unwrap().clone(),
                    next,
                )
            };
            let (z1, dx1, da1, n1) = run(true);
            let (z2, dx2, da2, n2) = run(false);
            assert!(max_abs(&z1, &z2) < 1e-4, "forward {rows}x{cols}");
            assert!(max_abs(&dx1, &dx2) < 1e-4, "dx {rows}x{cols}");
            assert!(max_abs(&da1, &da2) < 1e-4, "da {rows}x{cols}");
            assert_eq!(n1, n2, "the stream continues identically");
            // Some elements were dropped and some kept.
            let zeros = dx1
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count();
            assert!(zeros > 0 && zeros < rows * cols, "{zeros}");
        }
    }

    /// The bits op equals multiplying by the f32 mask tensor, bit for bit, forward and
    /// backward, for f32 and f64, sizes that do not fill the last word or task, and a strided
    /// input.
    #[test]
    fn dropout_op_equals_multiplying_by_the_mask() {
        let mut r = Rng::new(5);
        for (dims, p, dtype) in [
            (vec![3usize, 7], 0.1, DType::F32),
            (vec![2, 64, 300], 0.5, DType::F32),
            (vec![70, 33], 0.2, DType::F64),
        ] {
            let x0 = r
                .normal_tensor(dims.as_slice(), 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let n = x0.elem_count();
            let (bits, scale) = Ctx::train(Rng::new(9)).dropout_bits(n, p);
            let mask = keep_mask(&x0, &bits, scale).unwrap();
            let w = r
                .normal_tensor(dims.as_slice(), 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y1 = dropout_bits_op(x.as_tensor(), bits.clone(), scale).unwrap();
            let y2 = x.as_tensor().mul(&mask).unwrap();
            let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(v(&y1), v(&y2), "forward {dims:?}");
            assert_eq!(
                v(g1.get(x.as_tensor()).unwrap()),
                v(g2.get(x.as_tensor()).unwrap()),
                "backward {dims:?}"
            );
            let zeros = v(&y1).iter().filter(|v| **v == 0.0).count();
            assert!(zeros > 0 && zeros < n, "{zeros} of {n} dropped");
        }
        // A transposed (strided) input is read in its logical order.
        let x = r.normal_tensor((5, 9), 1.0).unwrap();
        let (bits, scale) = Ctx::train(Rng::new(2)).dropout_bits(45, 0.3);
        let y1 = dropout_bits_op(&x.t().unwrap(), bits.clone(), scale).unwrap();
        let y2 = dropout_bits_op(&x.t().unwrap().contiguous().unwrap(), bits, scale).unwrap();
        assert_eq!(y1.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
    }
}
