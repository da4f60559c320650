//! LoRA's up projection added to the frozen product as one op: `base + scale · z · bᵀ`.
//!
//! Composed from candle operations this is four full-size graph nodes per LoRA site (the
//! product `z · bᵀ`, its scaling, a reshape and the sum), and candle's backward gives every
//! node a zero-filled gradient buffer and then adds into it: four memsets and four
//! read-add-write passes over `[rows, out]` per site and step, besides the forward's passes.
//! Here it is one node; its backward hands `grad` through to `base` and computes the two
//! small gradients (`dz`: `[rows, r]`, `db`: `[out, r]`) with products.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{contiguous, min_rows, simd_kernel, wants_grad, Real};

struct LoraUpAdd {
    scale: f64,
}

simd_kernel! {
    /// `out += Σ_j zs[j] · bt[j]` over the rows `bt[j]` of `bt` (`[zs.len(), out.len()]`).
    fn add_rows<T>(out: &mut [T], zs: &[T], bt: &[T]) {
        let n = out.len();
        for (j, &zj) in zs.iter().enumerate() {
            let row = &bt[j * n..(j + 1) * n];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += zj * v;
            }
        }
    }
}

impl LoraUpAdd {
    fn run<T: Real>(
        &self,
        base: &[T],
        z: &[T],
        b: &[T],
        rows: usize,
        out_f: usize,
        r: usize,
    ) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        // bᵀ, [r, out], so each row of the output is r contiguous axpys.
        let mut bt = vec![T::ZERO; r * out_f];
        for o in 0..out_f {
            for j in 0..r {
                bt[j * out_f + o] = b[o * r + j];
            }
        }
        let mut y = base.to_vec();
        if out_f == 0 {
            return y;
        }
        y.par_chunks_mut(out_f)
            .with_min_len(min_rows(out_f * r.max(1)))
            .enumerate()
            .for_each_init(
                || vec![T::ZERO; r],
                |zs, (row, yr)| {
                    for (d, &v) in zs.iter_mut().zip(&z[row * r..(row + 1) * r]) {
                        *d = v * scale;
                    }
                    add_rows(yr, zs, &bt);
                },
            );
        debug_assert_eq!(y.len(), rows * out_f);
        y
    }
}

impl CustomOp3 for LoraUpAdd {
    fn name(&self) -> &'static str {
        "deltatune-lora-up-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out_f = *l1.dims().last().unwrap_or(&0);
        let r = *l2.dims().last().unwrap_or(&0);
        let (bo, br) = l3.shape().dims2()?;
        let rows = l1.shape().elem_count() / out_f.max(1);
        if bo != out_f || br != r || l2.shape().elem_count() != rows * r {
            bail!(
                "lora_up_add: base {:?}, z {:?} and b {:?} do not fit (want [.., out], [.., r], \
                 [out, r])",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(z), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.run(
                    &contiguous(a, l1),
                    &contiguous(z, l2),
                    &contiguous(b, l3),
                    rows,
                    out_f,
                    r,
                ))
            }
            (CpuStorage::F64(a), CpuStorage::F64(z), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.run(
                    &contiguous(a, l1),
                    &contiguous(z, l2),
                    &contiguous(b, l3),
                    rows,
                    out_f,
                    r,
                ))
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    s1.dtype(),
                    "lora_up_add (f32 or f64, all three alike)",
                )
                .bt())
            }
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        base: &Tensor,
        z: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, r) = b.dims2()?;
        let rows = grad.elem_count() / out_f.max(1);
        let g = grad.detach().reshape((rows, out_f))?;
        let z2 = z.detach().reshape((rows, r))?;
        let d_base = wants_grad(base).then(|| grad.detach());
        let dz = if wants_grad(z) {
            Some(
                g.matmul(&b.detach())?
                    .affine(self.scale, 0.0)?
                    .reshape(z.shape())?,
            )
        } else {
            None
        };
        let db = if wants_grad(b) {
            Some(g.t()?.matmul(&z2)?.affine(self.scale, 0.0)?)
        } else {
            None
        };
        Ok((d_base, dz, db))
    }
}

/// `base + scale · z · bᵀ`: LoRA's up projection (`b`, `[out, r]`) of the down-projected input
/// `z` added to the frozen product `base`, as one op (see the module notes).
///
/// # Shapes
/// `base`: [..., out], `z`: [..., r] with the same leading dims, `b`: [out, r] -> [..., out]
pub fn lora_up_add(base: &Tensor, z: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if super::portable::active(base)
        || !matches!(base.dtype(), DType::F32 | DType::F64)
        || z.dtype() != base.dtype()
        || b.dtype() != base.dtype()
    {
        return super::portable::lora_up_add(base, z, b, scale);
    }
    base.apply_op3(z, b, LoraUpAdd { scale })
}
