//! Linear layer with a frozen block-quantized weight: `y = x·Wᵀ (+ b)` where `W` is a
//! [`QuantMatrix`] that is never expanded to f32 as a whole.
//!
//! `W` (`[out, in]`) is processed in blocks of rows, each dequantized into a per-thread buffer
//! that is reused from block to block:
//!
//! * forward: the row blocks run in parallel; block `[o0, o1)` produces the output columns
//!   `y[:, o0..o1] = x · W[o0..o1]ᵀ` with the AVX-512 GEMM of [`super::gemm`] (a dot-product
//!   loop for fewer than 8 rows of `x`, or when the CPU lacks AVX-512), then the column strips
//!   are copied into `y` and a frozen bias is added;
//! * backward (a `CustomOp1` on `x`, so `W` never gets a gradient): `dx = g·W =
//!   Σ_blocks g[:, o0..o1] · W[o0..o1]`. With many rows of `g` the rows are cut into one chunk
//!   per thread and each chunk walks all row blocks of `W` (each thread dequantizes `W` once);
//!   with few rows the row blocks of `W` are cut into one contiguous group per thread, each
//!   summing into its own partial `dx`, and the partials are added in group order (so the
//!   result does not depend on scheduling).
//!
//! A trainable bias is added with `broadcast_add` outside the op so candle differentiates it.
//! Only f32 on the CPU is supported.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{self, MatRef};
use super::kernels::{add_unfused_bias, contiguous, dot, min_rows, split_bias, with_slice};
use crate::quant::QuantMatrix;

/// Whether the products may take the AVX-512 GEMM (tests can force the fallback with
/// `linear::USE_CANDLE_MATMUL`, as for [`super::frozen_linear`]).
fn fast_path() -> bool {
    #[cfg(test)]
    if super::linear::USE_CANDLE_MATMUL.with(|c| c.get()) {
        return false;
    }
    gemm::has_avx512()
}

/// Rows of `x` below which the forward uses dot products (the GEMM tile has 8 rows).
const GEMM_MIN_ROWS: usize = 8;
/// Rows of `g` below which the backward sums per-thread partials over row blocks of `W`.
const CHUNKED_BWD_MIN_ROWS: usize = 16;
/// Rows of `W` per block in the chunked backward (the depth of each GEMM, ≤ its `KC`).
const BWD_BLOCK_ROWS: usize = 256;

/// Rows of `W` per forward block: a multiple of the GEMM tile width (48), small enough to
/// give every thread a few blocks, at most 240.
fn forward_block_rows(out_f: usize) -> usize {
    let per = out_f.div_ceil(4 * rayon::current_num_threads());
    (per.div_ceil(48) * 48).clamp(48, 240)
}

/// Rows of `x` up to which the forward multiplies straight from the blocks
/// ([`super::quant_dot`]) instead of dequantizing `W` for the GEMM.
const FUSED_MAX_ROWS: usize = 16;

/// `y = x·Wᵀ` for a row-major `x` `[m, in]`, as a row-major `[m, out]` vector. `rows`: the
/// kernel is chosen without looking at `m`, so each row of `y` has the same bits whatever the
/// number of rows (see [`quant_linear_rows`]).
fn forward(x: &[f32], m: usize, w: &QuantMatrix, fast: bool, rows: bool) -> Vec<f32> {
    // 8-bit activations for any number of rows: a group's packed weights (16 rows) stay in
    // L1 while every row of `x` passes over them, and the integer products take half the
    // instructions per multiply-add of the f32 GEMM, with no dequantized copy of `W`.
    if fast && super::quant_int8::active() {
        if let Some(y) = super::quant_int8::forward(x, m, w) {
            return y;
        }
    }
    if fast && (rows || m <= FUSED_MAX_ROWS) {
        if let Some(y) = super::quant_dot::forward(x, m, w) {
            return y;
        }
    }
    blocks_forward(x, m, w, fast, rows)
}

/// [`forward`] by dequantizing blocks of rows of `W` and multiplying them (the path of the
/// block types and CPUs without a fused kernel).
pub(super) fn blocks_forward(
    x: &[f32],
    m: usize,
    w: &QuantMatrix,
    fast: bool,
    rows: bool,
) -> Vec<f32> {
    let (out_f, in_f) = w.dims2();
    let mut y = vec![0f32; m * out_f];
    if m == 0 || out_f == 0 || in_f == 0 {
        return y;
    }
    let nb = forward_block_rows(out_f);
    let strips: Vec<Vec<f32>> = (0..out_f.div_ceil(nb))
        .into_par_iter()
        .map_init(Vec::new, |buf: &mut Vec<f32>, bi| {
            let (o0, o1) = (bi * nb, ((bi + 1) * nb).min(out_f));
            let nr = o1 - o0;
            buf.resize(nr * in_f, 0.0);
            let wb = &mut buf[..nr * in_f];
            w.dequantize_rows_unchecked(o0..o1, wb);
            strip_forward(x, m, in_f, wb, nr, fast, rows)
        })
        .collect();
    for (bi, strip) in strips.iter().enumerate() {
        let o0 = bi * nb;
        let nr = strip.len() / m;
        for (yr, sr) in y.chunks_exact_mut(out_f).zip(strip.chunks_exact(nr)) {
            yr[o0..o0 + nr].copy_from_slice(sr);
        }
    }
    y
}

/// `x · wbᵀ` (`[m, nr]`) for `wb` the `nr` dequantized rows of one block (with `rows`, the
/// GEMM, whose rows do not depend on each other, for any `m`).
fn strip_forward(
    x: &[f32],
    m: usize,
    in_f: usize,
    wb: &[f32],
    nr: usize,
    fast: bool,
    rows: bool,
) -> Vec<f32> {
    if fast && (rows || m >= GEMM_MIN_ROWS) {
        let a = MatRef {
            data: x,
            rs: in_f,
            cs: 1,
        };
        // wbᵀ[k, j] = wb[j * in + k].
        let b = MatRef {
            data: wb,
            rs: 1,
            cs: in_f,
        };
        if let Some(s) = gemm::sgemm(m, nr, in_f, a, b, None) {
            return s;
        }
    }
    let mut s = vec![0f32; m * nr];
    for (xr, sr) in x.chunks_exact(in_f).zip(s.chunks_exact_mut(nr)) {
        for (o, v) in sr.iter_mut().enumerate() {
            *v = dot(xr, &wb[o * in_f..(o + 1) * in_f]);
        }
    }
    s
}

/// `acc[r] += Σ_o g[r, o0 + o] · wb[o]` for the `nr` rows of one block (`acc` is `[m, in]`,
/// `g` is `[m, out]`).
fn accumulate_axpy(
    acc: &mut [f32],
    g: &[f32],
    out_f: usize,
    o0: usize,
    wb: &[f32],
    nr: usize,
    in_f: usize,
) {
    for (ar, gr) in acc.chunks_exact_mut(in_f).zip(g.chunks_exact(out_f)) {
        for (o, &c) in gr[o0..o0 + nr].iter().enumerate() {
            if c != 0.0 {
                for (a, &wv) in ar.iter_mut().zip(&wb[o * in_f..(o + 1) * in_f]) {
                    *a += c * wv;
                }
            }
        }
    }
}

/// `dx = g·W` for a row-major `g` `[m, out]`, as a row-major `[m, in]` vector.
fn backward(g: &[f32], m: usize, w: &QuantMatrix, fast: bool) -> Vec<f32> {
    let (out_f, in_f) = w.dims2();
    if m == 0 || out_f == 0 || in_f == 0 {
        return vec![0f32; m * in_f];
    }
    let threads = rayon::current_num_threads();
    if m < CHUNKED_BWD_MIN_ROWS {
        // Few rows: row blocks of W in parallel, in a fixed number of contiguous groups with one
        // partial dx each, added in group order (a rayon `fold`'s partials follow work stealing,
        // which would make the sum, and so training, differ from run to run).
        let nb = out_f.div_ceil(4 * threads).clamp(16, BWD_BLOCK_ROWS);
        let blocks = out_f.div_ceil(nb);
        let per_group = blocks.div_ceil(threads).max(1);
        let partials: Vec<Vec<f32>> = (0..blocks.div_ceil(per_group))
            .into_par_iter()
            .map(|gi| {
                let mut acc = vec![0f32; m * in_f];
                let mut buf = vec![0f32; nb * in_f];
                for bi in gi * per_group..((gi + 1) * per_group).min(blocks) {
                    let (o0, o1) = (bi * nb, ((bi + 1) * nb).min(out_f));
                    let nr = o1 - o0;
                    w.dequantize_rows_unchecked(o0..o1, &mut buf[..nr * in_f]);
                    accumulate_axpy(&mut acc, g, out_f, o0, &buf[..nr * in_f], nr, in_f);
                }
                acc
            })
            .collect();
        let mut parts = partials.into_iter();
        let mut dx = parts.next().unwrap_or_else(|| vec![0f32; m * in_f]);
        for p in parts {
            for (x, y) in dx.iter_mut().zip(&p) {
                *x += y;
            }
        }
        return dx;
    }
    // Many rows: one chunk of rows of g/dx per thread, each walking all of W.
    let chunks = threads.min(m.div_ceil(CHUNKED_BWD_MIN_ROWS)).max(1);
    let chunk_rows = m.div_ceil(chunks);
    let nb = BWD_BLOCK_ROWS.min(out_f);
    let mut dx = vec![0f32; m * in_f];
    dx.par_chunks_mut(chunk_rows * in_f)
        .enumerate()
        .for_each(|(ci, dxc)| {
            let r0 = ci * chunk_rows;
            let mc = dxc.len() / in_f;
            let gc = &g[r0 * out_f..(r0 + mc) * out_f];
            let mut buf = vec![0f32; nb * in_f];
            for o0 in (0..out_f).step_by(nb) {
                let nr = nb.min(out_f - o0);
                let wb = &mut buf[..nr * in_f];
                w.dequantize_rows_unchecked(o0..o0 + nr, wb);
                let part = if fast {
                    let a = MatRef {
                        data: &gc[o0..],
                        rs: out_f,
                        cs: 1,
                    };
                    let b = MatRef {
                        data: wb,
                        rs: in_f,
                        cs: 1,
                    };
                    gemm::sgemm(mc, in_f, nr, a, b, None)
                } else {
                    None
                };
                match part {
                    Some(p) => {
                        for (d, v) in dxc.iter_mut().zip(&p) {
                            *d += v;
                        }
                    }
                    None => accumulate_axpy(dxc, gc, out_f, o0, wb, nr, in_f),
                }
            }
        });
    dx
}

struct QuantLinear {
    w: QuantMatrix,
    /// `[out]` f32, fused into the forward; `None` when absent or trainable.
    b: Option<Tensor>,
    /// The kernel does not depend on the number of rows ([`quant_linear_rows`]).
    rows: bool,
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "deltatune-quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, _) = self.w.dims2();
        let xd = match s {
            CpuStorage::F32(v) => v,
            other => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    other.dtype(),
                    "quant_linear",
                )
                .bt())
            }
        };
        let dims = l.dims();
        let m = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1 checked") = out_f;
        let x = contiguous(xd, l);
        let mut y = forward(&x, m, &self.w, fast_path(), self.rows);
        if let Some(b) = &self.b {
            with_slice::<f32, _>(b, |bias| {
                if out_f > 0 {
                    y.par_chunks_mut(out_f)
                        .with_min_len(min_rows(out_f))
                        .for_each(|row| {
                            for (o, &bv) in row.iter_mut().zip(bias) {
                                *o += bv;
                            }
                        });
                }
                Ok(())
            })?;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, _) = self.w.dims2();
        let m = arg.dims()[..arg.rank() - 1].iter().product::<usize>();
        let g = grad.detach().to_dtype(DType::F32)?;
        let dx = with_slice::<f32, _>(&g, |gd| {
            if gd.len() != m * out_f {
                bail!(
                    "quant_linear backward: gradient {:?} does not match the output of {:?}",
                    grad.dims(),
                    arg.dims()
                );
            }
            Ok(backward(gd, m, &self.w, fast_path()))
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `y = x·Wᵀ + b` with a frozen quantized `W` (`[out, in]`, see [`QuantMatrix`]).
///
/// Backward yields only `dx = g·W`. A bias that is a variable or tracks an op gets its
/// gradient (it is added with `broadcast_add` after the op); a frozen bias is fused.
///
/// # Shapes
/// * `x`: `[..., in]` f32 on the CPU (any layout);
/// * `b`: `[out]` f32;
/// * returns `[..., out]`.
pub fn quant_linear(x: &Tensor, w: &QuantMatrix, bias: Option<&Tensor>) -> Result<Tensor> {
    quant_linear_impl(x, w, bias, false)
}

/// [`quant_linear`] whose rows do not depend on each other: each row of `y` has the same bits
/// whether `x` has 1 row or 500, for inference passes that batch unrelated sequences
/// (generation, serving). [`quant_linear`] picks its kernel by the number of rows (fused dot
/// products up to 16 rows, dequantize-and-GEMM above), and those kernels round differently;
/// here the kernel depends only on the weight's type and the CPU: the 8-bit products while
/// [`super::int8_activations`] is held, else the fused dot products (Q4_0..Q8_0,
/// Q2_K..Q6_K), else the GEMM on dequantized blocks (or, without AVX-512, dot products). Slower than
/// [`quant_linear`] for many rows with f32 activations (a prompt's prefill); the same speed
/// otherwise.
pub fn quant_linear_rows(x: &Tensor, w: &QuantMatrix, bias: Option<&Tensor>) -> Result<Tensor> {
    quant_linear_impl(x, w, bias, true)
}

fn quant_linear_impl(
    x: &Tensor,
    w: &QuantMatrix,
    bias: Option<&Tensor>,
    rows: bool,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2();
    if x.dtype() != DType::F32 {
        bail!(
            "quant_linear: x has dtype {:?}; quantized weights (`{}`) are multiplied in f32 \
             only (convert x with to_dtype(F32))",
            x.dtype(),
            w.name()
        );
    }
    if x.rank() == 0 || x.dims().last() != Some(&in_f) {
        bail!(
            "quant_linear: x {:?} does not end in the input size {in_f} of `{}` [{out_f}, {in_f}]",
            x.dims(),
            w.name()
        );
    }
    if let Some(b) = bias {
        if b.dtype() != DType::F32 || b.dims() != [out_f] {
            bail!(
                "quant_linear: bias of `{}` must be f32 [{out_f}], got {:?} {:?}",
                w.name(),
                b.dtype(),
                b.dims()
            );
        }
    }
    if super::portable::active(x) {
        return super::portable::quant_linear(x, w, bias);
    }
    let (fused, added) = split_bias(bias);
    let y = x.apply_op1(QuantLinear {
        w: w.clone(),
        b: fused,
        rows,
    })?;
    add_unfused_bias(y, added)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Var};

    use super::super::frozen_linear;
    use super::super::linear::USE_CANDLE_MATMUL;
    use super::*;
    use crate::Rng;

    fn randn(seed: u64, dims: &[usize]) -> Tensor {
        Rng::new(seed).normal_tensor(dims, 1.0).unwrap()
    }

    /// `max |a - b| / max |b|`.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = a.sub(b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-30)
    }

    /// Forward, dx and (trainable) db of `quant_linear` against `frozen_linear` on the
    /// dequantized weight.
    fn check(dtype: GgmlDType, out_f: usize, in_f: usize, x_dims: &[usize], seed: u64) {
        let w = QuantMatrix::quantize(&randn(seed, &[out_f, in_f]), dtype, "w").unwrap();
        let wd = w.dequantize().unwrap();
        let b = randn(seed + 1, &[out_f]);
        let x = Var::from_tensor(&randn(seed + 2, x_dims)).unwrap();
        let mut y_dims = x_dims.to_vec();
        *y_dims.last_mut().unwrap() = out_f;
        let up = randn(seed + 3, &y_dims);

        for frozen_bias in [true, false] {
            let bv = Var::from_tensor(&b).unwrap();
            let bias = if frozen_bias {
                b.clone()
            } else {
                bv.as_tensor().clone()
            };
            let y = quant_linear(x.as_tensor(), &w, Some(&bias)).unwrap();
            let y_ref = frozen_linear(&x.as_tensor().detach(), &wd, Some(&b)).unwrap();
            let e = rel_err(&y, &y_ref);
            assert!(e < 1e-5, "{dtype:?} {x_dims:?} forward rel err {e}");

            let grads = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).expect("x gets a gradient");
            let xr = Var::from_tensor(&x.as_tensor().detach()).unwrap();
            let yr = frozen_linear(xr.as_tensor(), &wd, None).unwrap();
            let gr = (yr * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let dx_ref = gr.get(xr.as_tensor()).unwrap();
            let e = rel_err(dx, dx_ref);
            assert!(e < 1e-5, "{dtype:?} {x_dims:?} dx rel err {e}");
            if frozen_bias {
                assert!(grads.get(&b).is_none());
            } else {
                let db = grads
                    .get(bv.as_tensor())
                    .expect("trainable bias gets a gradient");
                let db_ref = up.reshape(((), out_f)).unwrap().sum(0).unwrap();
                assert!(rel_err(db, &db_ref) < 1e-5);
            }
        }
    }

    fn check_all_paths(dtype: GgmlDType) {
        // (out, in, x dims): rows of x below 8 (dot path), between 8 and 16 (GEMM forward,
        // partial-sum backward), many rows (chunked backward); out not a multiple of the
        // block rows; rank 3 and rank 1 inputs.
        let cases: [(usize, usize, &[usize]); 5] = [
            (100, 64, &[3, 64]),
            (97, 96, &[12, 96]),
            (300, 128, &[2, 37, 128]),
            (53, 256, &[256]),
            (520, 64, &[5, 8, 64]),
        ];
        for (i, (o, k, xd)) in cases.into_iter().enumerate() {
            check(dtype, o, k, xd, 10 * i as u64);
        }
    }

    #[test]
    fn quant_linear_matches_frozen_linear_q4_1() {
        check_all_paths(GgmlDType::Q4_1);
    }

    #[test]
    fn quant_linear_matches_frozen_linear_q8_0() {
        check_all_paths(GgmlDType::Q8_0);
    }

    /// `quant_linear_rows` gives a row the same bits alone and among up to 40 rows, across the
    /// row counts where `quant_linear` changes kernels (8 and 16), with f32 and 8-bit
    /// activations, for every block type with fused kernels (Q4_0..Q8_0, Q2_K..Q6_K) and one
    /// without (Q8_1); and stays within f32 rounding of `quant_linear`.
    #[test]
    fn quant_linear_rows_gives_a_row_the_same_bits_in_any_batch() {
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let mut types = crate::ops::quant_int8::tests::TYPES.to_vec();
        types.push(GgmlDType::Q8_1);
        for dtype in types {
            let w = QuantMatrix::quantize(&randn(3, &[100, 256]), dtype, "w").unwrap();
            let x = randn(4, &[40, 256]);
            for int8 in [false, true] {
                let _g = int8.then(crate::ops::int8_activations);
                let alone = quant_linear_rows(&x.narrow(0, 0, 1).unwrap(), &w, None).unwrap();
                for m in [2, 7, 8, 9, 16, 17, 40] {
                    let y = quant_linear_rows(&x.narrow(0, 0, m).unwrap(), &w, None).unwrap();
                    assert_eq!(
                        bits(&y.narrow(0, 0, 1).unwrap()),
                        bits(&alone),
                        "{dtype:?} int8 {int8}: row 0 among {m} rows"
                    );
                }
                if !int8 {
                    let e = rel_err(
                        &quant_linear_rows(&x, &w, None).unwrap(),
                        &quant_linear(&x, &w, None).unwrap(),
                    );
                    assert!(e < 1e-5, "{dtype:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn quant_linear_matches_without_avx512() {
        USE_CANDLE_MATMUL.with(|c| c.set(true));
        check_all_paths(GgmlDType::Q4_1);
        check(GgmlDType::Q4K, 70, 256, &[20, 256], 99);
        USE_CANDLE_MATMUL.with(|c| c.set(false));
    }

    #[test]
    fn quant_linear_k_quants_and_strided_input() {
        check(GgmlDType::Q6K, 130, 512, &[4, 9, 512], 7);
        // A transposed (non-contiguous) x.
        let w = QuantMatrix::quantize(&randn(1, &[40, 64]), GgmlDType::Q5_0, "w").unwrap();
        let xt = randn(2, &[64, 18]).t().unwrap();
        let y = quant_linear(&xt, &w, None).unwrap();
        let y_ref =
            frozen_linear(&xt.contiguous().unwrap(), &w.dequantize().unwrap(), None).unwrap();
        assert!(rel_err(&y, &y_ref) < 1e-5);
    }

    #[test]
    fn quant_linear_rejects_bad_inputs() {
        let w =
            QuantMatrix::quantize(&randn(1, &[8, 32]), GgmlDType::Q8_0, "blk.0.attn_q").unwrap();
        let err = quant_linear(&randn(2, &[3, 31]), &w, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("blk.0.attn_q") && err.contains("32"), "{err}");
        let x64 = randn(2, &[3, 32]).to_dtype(DType::F64).unwrap();
        assert!(quant_linear(&x64, &w, None).is_err());
        let bad_b = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
        assert!(quant_linear(&randn(2, &[3, 32]), &w, Some(&bad_b)).is_err());
    }

    #[test]
    #[ignore]
    fn bench_quant_linear() {
        // cargo test --release -p deltatune-core --lib bench_quant_linear -- --ignored --nocapture
        let (out_f, in_f, m) = (1536, 576, 512);
        let w = QuantMatrix::quantize(&randn(1, &[out_f, in_f]), GgmlDType::Q4_1, "w").unwrap();
        let wd = w.dequantize().unwrap();
        let x = Var::from_tensor(&randn(2, &[m, in_f])).unwrap();
        for name in ["quant", "dense"] {
            let t0 = std::time::Instant::now();
            for _ in 0..5 {
                let y = if name == "quant" {
                    quant_linear(x.as_tensor(), &w, None).unwrap()
                } else {
                    frozen_linear(x.as_tensor(), &wd, None).unwrap()
                };
                y.sum_all().unwrap().backward().unwrap();
            }
            println!("{name}: {:?} per fwd+bwd", t0.elapsed() / 5);
        }
    }
}
