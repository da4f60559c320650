//! Inference kernels whose result for one sequence does not depend on the batch it rides in.
//!
//! A server batches requests for different adapters and of different lengths: rows join a
//! running batch, prompts are left-padded to the longest one, and the key/value cache of a
//! joining request is padded on the left to the batch's length. Products whose kernel or
//! summation order depends on the batch's shape (candle's matmul picks its kernel from the
//! matrix sizes; lane-split sums assign a key to a lane by its index) then give a sequence
//! slightly different numbers in different company, and a greedy answer can change with what
//! else is running. Here every value is computed from its own row only, in an order fixed by
//! that row:
//!
//! * [`lora_down`]: `z = x·Aᵀ` for LoRA's down projection, one fixed-order dot product per row
//!   and rank (the up projection, [`super::lora_up_add`], already works row by row);
//! * [`attention_rows`]: causal scaled dot-product attention that skips the keys a row does
//!   not see (padding: their probability is exactly 0): the softmax's sum and the weighted sum
//!   of values run over the keys in order, so masked keys anywhere (left padding, between
//!   prefix keys and the tokens) change nothing.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{contiguous, dot, simd_kernel, with_slice, Real};

/// Below this many multiply-adds a kernel runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 15;

struct LoraDown;

simd_kernel! {
    /// `z[row, j] = x[row] · a[j]` for the rows of `x` (`in_f` values each) and the `r` rows of
    /// `a`.
    fn down_rows<T>(x: &[T], a: &[T], in_f: usize, r: usize, z: &mut [T]) {
        for (xr, zr) in x.chunks_exact(in_f).zip(z.chunks_exact_mut(r)) {
            for (j, zv) in zr.iter_mut().enumerate() {
                *zv = dot(xr, &a[j * in_f..(j + 1) * in_f]);
            }
        }
    }
}

fn down_kernel<T: Real>(x: &[T], a: &[T], rows: usize, in_f: usize, r: usize) -> Vec<T> {
    let mut z = vec![T::ZERO; rows * r];
    if r == 0 || rows == 0 {
        return z;
    }
    if rows * r * in_f < PAR_MIN_MACS {
        down_rows(x, a, in_f, r, &mut z);
    } else {
        let per = (PAR_MIN_MACS / (r * in_f).max(1)).max(1);
        z.par_chunks_mut(per * r)
            .zip(x.par_chunks(per * in_f))
            .for_each(|(zc, xc)| down_rows(xc, a, in_f, r, zc));
    }
    z
}

impl CustomOp2 for LoraDown {
    fn name(&self) -> &'static str {
        "deltatune-lora-down"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (r, in_f) = l2.shape().dims2()?;
        let dims = l1.dims();
        if dims.last() != Some(&in_f) {
            bail!("lora_down: x {dims:?} does not end in A's input size {in_f}");
        }
        let rows = l1.shape().elem_count() / in_f.max(1);
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank >= 1 checked") = r;
        let z = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(a)) => CpuStorage::F32(down_kernel(
                &contiguous(x, l1),
                &contiguous(a, l2),
                rows,
                in_f,
                r,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(a)) => CpuStorage::F64(down_kernel(
                &contiguous(x, l1),
                &contiguous(a, l2),
                rows,
                in_f,
                r,
            )),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    s1.dtype(),
                    "lora_down (f32 or f64, both alike)",
                )
                .bt())
            }
        };
        Ok((z, Shape::from(out)))
    }
}

/// `z = x·Aᵀ` (LoRA's down projection, `a` `[r, in]`) for inference: each value is one dot
/// product in an order fixed by `in`, so a row gets the same numbers alone and in any batch
/// (candle's matmul chooses its kernel, and so its rounding, by the number of rows). No
/// backward: training passes use [`super::dropout_project`].
///
/// # Shapes
/// `x`: [..., in], `a`: [r, in] -> [..., r]
pub fn lora_down(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    if super::portable::active(x)
        || !matches!(x.dtype(), DType::F32 | DType::F64)
        || a.dtype() != x.dtype()
        || x.rank() == 0
    {
        let (r, cols) = a.dims2()?;
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = r;
        }
        let rows = x.elem_count() / cols.max(1);
        return x.reshape((rows, cols))?.matmul(&a.t()?)?.reshape(out_dims);
    }
    x.apply_op2_no_bwd(a, &LoraDown)
}

/// Geometry of one [`attention_rows`] call.
#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    heads: usize,
    kv_heads: usize,
    tq: usize,
    tk: usize,
    dh: usize,
    scale: f64,
    causal: Option<usize>,
}

struct AttentionRows {
    g: Geo,
    /// `[B, Tk]` f32: 0 for a visible key, a large negative number for a masked one.
    bias: Tensor,
}

simd_kernel! {
    /// One query row: `o = Σ_j p_j v_j` over the keys `j < limit`, `p = softmax(q·k_j·scale +
    /// bias_j)`. Keys whose probability is exactly 0 are skipped, and both sums run in key
    /// order one key at a time, so masked keys anywhere leave the result unchanged.
    fn attend_row<T>(
        q: &[T],
        k: &[T],
        v: &[T],
        bias: &[T],
        scale: T,
        limit: usize,
        e: &mut Vec<T>,
        o: &mut [T],
    ) {
        let dh = q.len();
        e.clear();
        let mut m = T::NEG_INFINITY;
        for j in 0..limit {
            let s = dot(q, &k[j * dh..(j + 1) * dh]) * scale + bias[j];
            m = m.max_of(s);
            e.push(s);
        }
        o.fill(T::ZERO);
        if m == T::NEG_INFINITY {
            return;
        }
        for x in e.iter_mut() {
            *x = (*x - m).fexp();
        }
        let mut z = T::ZERO;
        for &x in e.iter() {
            z += x;
        }
        let inv = T::ONE / z;
        for (j, &x) in e.iter().enumerate() {
            if x == T::ZERO {
                continue;
            }
            let p = x * inv;
            for (ov, &vv) in o.iter_mut().zip(&v[j * dh..(j + 1) * dh]) {
                *ov += p * vv;
            }
        }
    }
}

fn attention_kernel<T: Real>(g: Geo, q: &[T], k: &[T], v: &[T], bias: &[T]) -> Vec<T> {
    let Geo {
        b,
        heads,
        kv_heads,
        tq,
        tk,
        dh,
        ..
    } = g;
    let scale = T::from_f64(g.scale);
    let group = heads / kv_heads;
    // Output [B, Tq, H, D]: one task per (example, query, head) row.
    let mut out = vec![T::ZERO; b * tq * heads * dh];
    if out.is_empty() {
        return out;
    }
    let row = |(r, o): (usize, &mut [T]), e: &mut Vec<T>| {
        let h = r % heads;
        let i = (r / heads) % tq;
        let bi = r / (heads * tq);
        let kh = h / group;
        let qr = &q[((bi * heads + h) * tq + i) * dh..][..dh];
        let kv = (bi * kv_heads + kh) * tk * dh;
        let limit = match g.causal {
            Some(off) => (i + off + 1).min(tk),
            None => tk,
        };
        attend_row(
            qr,
            &k[kv..kv + tk * dh],
            &v[kv..kv + tk * dh],
            &bias[bi * tk..(bi + 1) * tk],
            scale,
            limit,
            e,
            o,
        );
    };
    let per_row = 2 * tk * dh;
    if out.len() / dh * per_row < PAR_MIN_MACS {
        let mut e = Vec::with_capacity(tk);
        out.chunks_mut(dh).enumerate().for_each(|x| row(x, &mut e));
    } else {
        out.par_chunks_mut(dh)
            .enumerate()
            .with_min_len((PAR_MIN_MACS / per_row.max(1)).max(1))
            .for_each_init(|| Vec::with_capacity(tk), |e, x| row(x, e));
    }
    out
}

impl CustomOp3 for AttentionRows {
    fn name(&self) -> &'static str {
        "deltatune-attention-rows"
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
        let g = self.g;
        let shape = Shape::from((g.b, g.tq, g.heads * g.dh));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                with_slice::<f32, _>(&self.bias, |bias| {
                    Ok(CpuStorage::F32(attention_kernel(
                        g,
                        &contiguous(q, l1),
                        &contiguous(k, l2),
                        &contiguous(v, l3),
                        bias,
                    )))
                })?
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                with_slice::<f64, _>(&self.bias, |bias| {
                    Ok(CpuStorage::F64(attention_kernel(
                        g,
                        &contiguous(q, l1),
                        &contiguous(k, l2),
                        &contiguous(v, l3),
                        bias,
                    )))
                })?
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    s1.dtype(),
                    "attention_rows (f32 or f64, all alike)",
                )
                .bt())
            }
        };
        Ok((out, shape))
    }
}

/// Scaled dot-product attention for inference whose result for a row depends only on the keys
/// that row sees: `softmax(q·kᵀ·scale + key_bias)·v` per head, query `i` seeing keys
/// `0..=i + offset` when `causal` is `Some(offset)`, with grouped-query heads (query head `h`
/// reads key/value head `h / (H / KVH)`). Keys whose probability is exactly 0 (a key bias of
/// -1e9) are skipped, and the sums run key by key, so left padding and padding between prefix
/// keys and tokens leave every value unchanged. No backward: training uses the composed
/// attention.
///
/// # Shapes
/// `q`: [B, H, Tq, D], `k`, `v`: [B, KVH, Tk, D], `key_bias`: [B, Tk] -> [B, Tq, H * D]
pub fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    scale: f64,
    causal: Option<usize>,
) -> Result<Tensor> {
    let (b, heads, tq, dh) = q.dims4()?;
    let (kb, kv_heads, tk, kd) = k.dims4()?;
    if kb != b || kd != dh || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        bail!(
            "attention_rows: q {:?}, k {:?} and v {:?} do not fit ([B, H, Tq, D], [B, KVH, Tk, D] \
             with KVH dividing H)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if key_bias.dims() != [b, tk] {
        bail!(
            "attention_rows: key_bias must be [B, Tk] = [{b}, {tk}], got {:?}",
            key_bias.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("attention_rows: q, k and v must have one dtype");
    }
    let bias = key_bias.detach().to_dtype(q.dtype())?;
    q.apply_op3_no_bwd(
        k,
        v,
        &AttentionRows {
            g: Geo {
                b,
                heads,
                kv_heads,
                tq,
                tk,
                dh,
                scale,
                causal,
            },
            bias,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use candle_core::Device;

    fn randn(seed: u64, dims: &[usize]) -> Tensor {
        Rng::new(seed).normal_tensor(dims, 1.0).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// A row's down projection is the same alone and among 1 to 40 rows (candle's matmul
    /// changes kernels with the row count), and close to the plain product.
    #[test]
    fn lora_down_gives_a_row_the_same_bits_in_any_batch() {
        let a = randn(1, &[8, 576]);
        let x = randn(2, &[40, 576]);
        let alone = lora_down(&x.narrow(0, 0, 1).unwrap(), &a).unwrap();
        for m in [2, 7, 8, 17, 33, 40] {
            let z = lora_down(&x.narrow(0, 0, m).unwrap(), &a).unwrap();
            assert_eq!(bits(&z.narrow(0, 0, 1).unwrap()), bits(&alone), "{m} rows");
        }
        let z = lora_down(&x, &a).unwrap();
        let want = x.matmul(&a.t().unwrap()).unwrap();
        let d = (z - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }

    /// The composed attention (scores by matmul, masked softmax, matmul by `v`) for reference.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, off: usize) -> Tensor {
        let (b, h, tq, d) = q.dims4().unwrap();
        let kvh = k.dim(1).unwrap();
        let g = h / kvh;
        let tk = k.dim(2).unwrap();
        let qg = q.reshape((b, kvh, g * tq, d)).unwrap();
        let s = qg
            .matmul(&k.t().unwrap())
            .unwrap()
            .reshape((b, h, tq, tk))
            .unwrap();
        let p =
            crate::ops::causal_attention_softmax(&s, bias, 1.0 / (d as f64).sqrt(), off).unwrap();
        p.reshape((b, kvh, g * tq, tk))
            .unwrap()
            .matmul(v)
            .unwrap()
            .reshape((b, h, tq, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, tq, h * d))
            .unwrap()
    }

    /// Agrees with the composed attention; a row left-padded with masked keys (of any values)
    /// gets bit for bit what it gets with no padding, in a batch with another row.
    #[test]
    fn attention_rows_ignores_masked_keys_bit_for_bit() {
        let (h, kvh, d, tq, tk) = (6, 2, 16, 3, 11);
        let q = randn(3, &[1, h, tq, d]);
        let k = randn(4, &[1, kvh, tk, d]);
        let v = randn(5, &[1, kvh, tk, d]);
        let zero = Tensor::zeros((1, tk), DType::F32, &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let alone = attention_rows(&q, &k, &v, &zero, scale, Some(tk - tq)).unwrap();
        let want = reference(&q, &k, &v, &zero, tk - tq);
        let diff = (&alone - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        for pad in [1usize, 5, 8, 13] {
            // Row 1: `pad` masked keys of random values before the same keys; row 0: another
            // sequence.
            let kp = Tensor::cat(&[&randn(6, &[1, kvh, pad, d]), &k], 2).unwrap();
            let vp = Tensor::cat(&[&randn(7, &[1, kvh, pad, d]), &v], 2).unwrap();
            let k2 = Tensor::cat(&[&randn(8, &[1, kvh, tk + pad, d]), &kp], 0).unwrap();
            let v2 = Tensor::cat(&[&randn(9, &[1, kvh, tk + pad, d]), &vp], 0).unwrap();
            let q2 = Tensor::cat(&[&randn(10, &[1, h, tq, d]), &q], 0).unwrap();
            let mut m = vec![0f32; 2 * (tk + pad)];
            for j in 0..pad {
                m[tk + pad + j] = -1e9;
            }
            let bias = Tensor::from_vec(m, (2, tk + pad), &Device::Cpu).unwrap();
            let y = attention_rows(&q2, &k2, &v2, &bias, scale, Some(tk + pad - tq)).unwrap();
            assert_eq!(
                bits(&y.narrow(0, 1, 1).unwrap()),
                bits(&alone),
                "{pad} padded keys"
            );
        }
    }
}
