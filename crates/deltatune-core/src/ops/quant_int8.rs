//! `y = x·Wᵀ` with 8-bit activations and VNNI integer dot products: the products by a quantized
//! base when generating (prompt and decoding steps), as llama.cpp computes them.
//!
//! [`super::quant_dot`] expands every block of `W` to f32 in registers, several instructions per
//! weight. Here the work per weight is a fraction of one instruction:
//!
//! * `W` is repacked once (on first use) so that 16 output rows sit side by side: for each block
//!   of 32 inputs, the 16 rows' quantized values are interleaved four at a time, so one 512-bit
//!   `vpdpbusd` multiplies 4 consecutive weights of each of 16 rows by the same 4 activations
//!   and adds them into one 32-bit lane per row. No horizontal sums; the rows' scales load as
//!   one vector of 16 f16 values.
//! * Each row of `x` is quantized per block of 32 to signed 8 bits (`q = round(x / d)`, ties
//!   to even, `d = max|x| / 127`), with the block's sum of `q` for the Q4_1 offset and the
//!   Q8_0 sign correction below.
//!
//! The repacked copy is kept beside the blocks (it takes about as many bytes: 92 MiB more for
//! SmolLM2-135M's Q4_1 file); only 8-bit products make it.
//!
//! Q4_1 weights (`q_w·d_w + m_w`, `q_w` in 0..15) go in as unsigned bytes:
//! `Σ w·x ≈ d_w·d_x·Σ q_w q_x + m_w·d_x·Σ q_x`. Q8_0 weights (`q_w·d_w`, signed) are stored
//! with 128 added, so they are unsigned bytes for `vpdpbusd`, and `128·Σ q_x` is taken off.
//!
//! The activations' rounding (relative error up to 1/254 of a block's largest value) is the
//! price; it is what llama.cpp pays on every CPU product. Each row of `x` gets the same numbers
//! alone and in a batch: its quantization and sums do not depend on the other rows.

use std::sync::Arc;

use rayon::prelude::*;

use crate::quant::QuantMatrix;
use candle_core::quantized::GgmlDType;

thread_local! {
    static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, products by a Q4_1 or Q8_0 weight on this thread
/// ([`crate::ops::quant_linear`]) round the activations to 8 bits and use this module's integer
/// kernels where the CPU has AVX-512 VNNI. Models turn it on through
/// [`crate::Ctx::with_int8`]; generation does.
pub fn int8_activations() -> Int8Activations {
    Int8Activations(ON.with(|c| c.replace(true)))
}

/// Guard of [`int8_activations`]: restores the previous setting when dropped.
pub struct Int8Activations(bool);

impl Drop for Int8Activations {
    fn drop(&mut self) {
        ON.with(|c| c.set(self.0));
    }
}

/// Whether [`int8_activations`] is held on this thread.
pub(crate) fn active() -> bool {
    ON.with(|c| c.get())
}

/// Output rows per packed group (one 32-bit lane each in a 512-bit register).
const LANES: usize = 16;
/// Rows of `x` one pass over a group serves.
const ROWS: usize = 8;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;
/// Bytes per (group, block) record: Q4_1 nibbles (16 rows x 16 bytes), then `d` and `m` as
/// 16 f16 each.
const Q4_1_REC: usize = LANES * 16 + 2 * LANES * 2;
/// Q8_0: 16 rows x 32 bytes, then `d` as 16 f16.
const Q8_0_REC: usize = LANES * 32 + LANES * 2;

/// `W` repacked for [`forward`]: groups of [`LANES`] rows, block by block, one record of
/// [`record_bytes`] bytes per (group, block).
pub(crate) struct Packed(Vec<u8>);

/// Bytes per block in the file and per (group, block) record once packed, for the block types
/// this module handles.
fn record_bytes(dtype: GgmlDType) -> Option<(usize, usize)> {
    match dtype {
        GgmlDType::Q4_1 => Some((20, Q4_1_REC)),
        GgmlDType::Q8_0 => Some((34, Q8_0_REC)),
        _ => None,
    }
}

/// Whether this CPU has what the 8-bit kernels use (AVX-512 F/BW, VNNI, F16C); without it,
/// [`int8_activations`] changes nothing.
pub fn int8_products_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`forward`] handles `w` on this CPU (Q4_1 and Q8_0).
pub(crate) fn supports(w: &QuantMatrix) -> bool {
    record_bytes(w.dtype()).is_some() && int8_products_supported()
}

/// Repacks the blocks of `w` (Q4_1 or Q8_0) into groups of 16 rows; rows past the end of the
/// last group are zeros.
pub(crate) fn pack(w: &QuantMatrix) -> Option<Arc<Packed>> {
    let dtype = w.dtype();
    let (src_rec, rec) = record_bytes(dtype)?;
    let (rows, cols) = w.dims2();
    let (_, src) = w.raw();
    let nb = cols / 32;
    let groups = rows.div_ceil(LANES);
    let mut bytes = vec![0u8; groups * nb * rec];
    bytes
        .par_chunks_mut((nb * rec).max(1))
        .enumerate()
        .for_each(|(g, out)| {
            for b in 0..nb {
                let o = &mut out[b * rec..(b + 1) * rec];
                for j in 0..LANES.min(rows - g * LANES) {
                    let row = g * LANES + j;
                    let blk = &src[(row * nb + b) * src_rec..(row * nb + b + 1) * src_rec];
                    if dtype == GgmlDType::Q4_1 {
                        // Value k is the low nibble of byte k (k < 16) or the high nibble of
                        // byte k - 16; packed byte (c, t) holds values 8c + t (low) and
                        // 8c + 4 + t (high).
                        let qs: &[u8; 16] = blk[4..20].try_into().unwrap();
                        for c in 0..2 {
                            for t in 0..4 {
                                let (x, y) = (qs[8 * c + t], qs[8 * c + 4 + t]);
                                o[c * 64 + j * 4 + t] = (x & 0x0F) | (y << 4);
                                o[(c + 2) * 64 + j * 4 + t] = (x >> 4) | (y & 0xF0);
                            }
                        }
                        o[256 + 2 * j..256 + 2 * j + 2].copy_from_slice(&blk[0..2]);
                        o[288 + 2 * j..288 + 2 * j + 2].copy_from_slice(&blk[2..4]);
                    } else {
                        for c in 0..8 {
                            for t in 0..4 {
                                let q = blk[2 + 4 * c + t] as i8;
                                o[c * 64 + j * 4 + t] = (q as i16 + 128) as u8;
                            }
                        }
                        o[512 + 2 * j..512 + 2 * j + 2].copy_from_slice(&blk[0..2]);
                    }
                }
            }
        });
    Some(Arc::new(Packed(bytes)))
}

/// Rows of `x` quantized per block of 32 to signed bytes.
pub(crate) struct QuantRows {
    /// `[m, in]` signed 8-bit values.
    pub(crate) q: Vec<i8>,
    /// `[m, in / 32]` block scales `d`.
    pub(crate) d: Vec<f32>,
    /// `[m, in / 32]` sums of each block's `q`.
    pub(crate) sum: Vec<i32>,
}

/// Quantizes the `m` rows of `x` (`[m, in]`, `in` a multiple of 32): `d = max|x| / 127`,
/// `q = round(x / d)`.
pub(crate) fn quantize_rows(x: &[f32], m: usize, in_f: usize) -> QuantRows {
    debug_assert_eq!(x.len(), m * in_f);
    let nb = in_f / 32;
    let mut q = vec![0i8; m * in_f];
    let mut d = vec![0f32; m * nb];
    let mut sum = vec![0i32; m * nb];
    if m * in_f >= 1 << 16 {
        x.par_chunks_exact(in_f)
            .zip(q.par_chunks_exact_mut(in_f))
            .zip(d.par_chunks_exact_mut(nb))
            .zip(sum.par_chunks_exact_mut(nb))
            .for_each(|(((x, q), d), sum)| quantize_blocks(x, q, d, sum));
    } else {
        x.chunks_exact(in_f)
            .zip(q.chunks_exact_mut(in_f))
            .zip(d.chunks_exact_mut(nb))
            .zip(sum.chunks_exact_mut(nb))
            .for_each(|(((x, q), d), sum)| quantize_blocks(x, q, d, sum));
    }
    QuantRows { q, d, sum }
}

/// [`quantize_rows`] for the blocks of one row.
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [i32]) {
    for ((xb, qb), (db, sb)) in x
        .chunks_exact(32)
        .zip(q.chunks_exact_mut(32))
        .zip(d.iter_mut().zip(sum.iter_mut()))
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        // Adding and taking off 1.5 * 2^23 rounds to the nearest integer (ties to even) for
        // |v| < 2^22, in plain arithmetic the compiler vectorises (`round_ties_even` is a libm
        // call without SSE4.1).
        const MAGIC: f32 = 12_582_912.0;
        let mut s = 0i32;
        for (qv, &v) in qb.iter_mut().zip(xb) {
            let r = ((v * inv).clamp(-127.0, 127.0) + MAGIC - MAGIC) as i8;
            *qv = r;
            s += r as i32;
        }
        // A NaN anywhere in the block makes `amax` NaN (f32::max ignores it, so check).
        *db = if xb.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            scale
        };
        *sb = s;
    }
}

/// `y = x·Wᵀ` (`x` row-major `[m, in]`) as a row-major `[m, out]` vector with 8-bit
/// activations, or `None` when the block type or CPU is not one this kernel knows.
pub(crate) fn forward(x: &[f32], m: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    if !supports(w) {
        return None;
    }
    let packed = &w.int8_packed()?.0;
    let dtype = w.dtype();
    let (_, rec) = record_bytes(dtype)?;
    let (out_f, in_f) = w.dims2();
    debug_assert_eq!(x.len(), m * in_f);
    let mut y = vec![0f32; m * out_f];
    if m == 0 || out_f == 0 || in_f == 0 {
        return Some(y);
    }
    let xq = quantize_rows(x, m, in_f);
    let nb = in_f / 32;
    // [group][m][LANES]
    let mut yt = vec![0f32; out_f.div_ceil(LANES) * m * LANES];
    let run = |(g, chunk): (usize, &mut [f32])| {
        let recs = &packed[g * nb * rec..(g + 1) * nb * rec];
        for r0 in (0..m).step_by(ROWS) {
            let n = (m - r0).min(ROWS);
            let out = &mut chunk[r0 * LANES..(r0 + n) * LANES];
            // SAFETY: `supports` checked the CPU features; `recs` holds `nb` records of this
            // type, `xq` holds `m` rows of `in_f` values and `nb` scales and sums each, and
            // `out` has `n * LANES` values.
            unsafe { group_dots(dtype, recs, &xq, r0, n, in_f, out) };
        }
    };
    if out_f * in_f * m < PAR_MIN_MACS {
        yt.chunks_mut(m * LANES).enumerate().for_each(run);
    } else {
        yt.par_chunks_mut(m * LANES).enumerate().for_each(run);
    }
    for (g, chunk) in yt.chunks_exact(m * LANES).enumerate() {
        let o0 = g * LANES;
        let n = LANES.min(out_f - o0);
        for (r, lanes) in chunk.chunks_exact(LANES).enumerate() {
            y[r * out_f + o0..r * out_f + o0 + n].copy_from_slice(&lanes[..n]);
        }
    }
    Some(y)
}

#[cfg(target_arch = "x86_64")]
unsafe fn group_dots(
    dtype: GgmlDType,
    recs: &[u8],
    xq: &QuantRows,
    r0: usize,
    n: usize,
    in_f: usize,
    out: &mut [f32],
) {
    macro_rules! dispatch {
        ($q41:literal) => {
            match n {
                1 => group_kernel::<1, $q41>(recs, xq, r0, in_f, out),
                2 => group_kernel::<2, $q41>(recs, xq, r0, in_f, out),
                3 => group_kernel::<3, $q41>(recs, xq, r0, in_f, out),
                4 => group_kernel::<4, $q41>(recs, xq, r0, in_f, out),
                5 => group_kernel::<5, $q41>(recs, xq, r0, in_f, out),
                6 => group_kernel::<6, $q41>(recs, xq, r0, in_f, out),
                7 => group_kernel::<7, $q41>(recs, xq, r0, in_f, out),
                _ => group_kernel::<8, $q41>(recs, xq, r0, in_f, out),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        if dtype == GgmlDType::Q4_1 {
            dispatch!(true)
        } else {
            dispatch!(false)
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_dots(
    _: GgmlDType,
    _: &[u8],
    _: &QuantRows,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [f32],
) {
    unreachable!("int8_products_supported() is false off x86-64")
}

/// The four activations `q[at..at + 4]` as one 32-bit value broadcast to every lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn four(q: *const i8) -> std::arch::x86_64::__m512i {
    // SAFETY: the caller keeps `q..q + 4` inside the row.
    unsafe { std::arch::x86_64::_mm512_set1_epi32(q.cast::<i32>().read_unaligned()) }
}

/// 16 output rows against `N` quantized rows of `x` starting at `r0`: Q4_1 records when
/// `Q41`, else Q8_0.
///
/// Both types come down to eight 64-byte vectors of unsigned weights per block: Q8_0's eight
/// stored ones, or Q4_1's four split into low and high nibbles. Vector `2c` meets activations
/// `8c..8c + 4`, vector `2c + 1` activations `8c + 4..8c + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn group_kernel<const N: usize, const Q41: bool>(
    recs: &[u8],
    xq: &QuantRows,
    r0: usize,
    in_f: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (rec, scales) = if Q41 {
        (Q4_1_REC, 256)
    } else {
        (Q8_0_REC, 512)
    };
    let nb = in_f / 32;
    debug_assert!(recs.len() >= nb * rec && out.len() >= N * LANES);
    debug_assert!(xq.q.len() >= (r0 + N) * in_f && xq.d.len() >= (r0 + N) * nb);
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY: record `b` has `rec` bytes; row `r0 + r` of `xq` has 32 values at `b * 32`
        // and a scale and sum at `b`.
        unsafe {
            let p = recs.as_ptr().add(b * rec);
            let mut w = [_mm512_setzero_si512(); 8];
            if Q41 {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(p.add(c * 64).cast());
                    w[2 * c] = _mm512_and_si512(v, low);
                    w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
            } else {
                for (c, v) in w.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(p.add(c * 64).cast());
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(scales).cast()));
            for (r, a) in acc.iter_mut().enumerate() {
                let row = r0 + r;
                let xp = xq.q.as_ptr().add(row * in_f + b * 32);
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for c in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, w[2 * c], four(xp.add(8 * c)));
                    s1 = _mm512_dpbusd_epi32(s1, w[2 * c + 1], four(xp.add(8 * c + 4)));
                }
                let mut si = _mm512_add_epi32(s0, s1);
                let dx = *xq.d.get_unchecked(row * nb + b);
                let sum = *xq.sum.get_unchecked(row * nb + b);
                if Q41 {
                    // The offsets: m_w · d_x · Σ q_x.
                    let mw = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(scales + 32).cast()));
                    *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(dx * sum as f32), *a);
                } else {
                    // The weights went in with 128 added: take 128 · Σ q_x off.
                    si = _mm512_sub_epi32(si, _mm512_set1_epi32(128 * sum));
                }
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), scale, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: `out` has LANES values for each of the N rows.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * LANES), *a) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The int8 product equals the dequantized matrix times the 8-bit-rounded activations (to
    /// f32 rounding), stays within the rounding's bound of the exact product, and gives a row
    /// the same numbers alone and in a batch; for row counts that leave a partial group of 16
    /// and a partial group of 8 rows of `x`.
    #[test]
    fn int8_product_equals_the_product_with_rounded_activations() {
        if crate::ops::lacks_cpu_feature(int8_products_supported(), "AVX-512 VNNI") {
            return;
        }
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (out_f, in_f) = (70, 96);
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize().unwrap().to_vec2().unwrap();
            for m in [1usize, 3, 8, 11, 40] {
                let x: Vec<f32> = (0..m * in_f)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                    .collect();
                let xq = quantize_rows(&x, m, in_f);
                let y = forward(&x, m, &q).unwrap();
                assert_eq!(y.len(), m * out_f);
                for r in 0..m {
                    for o in 0..out_f {
                        let mut want = 0f64;
                        let mut exact = 0f64;
                        let mut bound = 0f64;
                        for k in 0..in_f {
                            let d = xq.d[r * (in_f / 32) + k / 32] as f64;
                            let wk = dense[o][k] as f64;
                            want += wk * xq.q[r * in_f + k] as f64 * d;
                            exact += wk * x[r * in_f + k] as f64;
                            bound += wk.abs() * d / 2.0;
                        }
                        let got = y[r * out_f + o] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{dtype:?} m {m} [{r}, {o}]: {got} vs {want}"
                        );
                        assert!(
                            (got - exact).abs() <= bound + 1e-4,
                            "{dtype:?} m {m} [{r}, {o}]: {got} vs exact {exact}, bound {bound}"
                        );
                    }
                }
                let alone = forward(&x[..in_f], 1, &q).unwrap();
                assert_eq!(
                    &y[..out_f],
                    &alone[..],
                    "{dtype:?}: row 0 alone and in a batch of {m}"
                );
            }
        }
    }

    /// Rounding the activations: values within half a step of the block's scale, the sums of
    /// the rounded values, a zero block, and NaN carried into the scale.
    #[test]
    fn activations_round_to_the_nearest_step_of_their_block() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        let r = quantize_rows(&x, 1, 64);
        assert_eq!(r.d[0], 20.0 * 0.37f32 / 127.0);
        assert_eq!(r.q[63], 0);
        assert_eq!(r.d[1], 0.0);
        assert_eq!(r.sum[0], r.q[..32].iter().map(|&v| v as i32).sum::<i32>());
        assert!(r.q[..32].contains(&-127));
        for k in 0..32 {
            assert!((r.q[k] as f32 * r.d[0] - x[k]).abs() <= r.d[0] / 2.0 + 1e-6);
        }
        x[5] = f32::NAN;
        assert!(quantize_rows(&x, 1, 64).d[0].is_nan());
    }

    /// Time the int8 product against the f32-expanding one on a decoder-sized matrix:
    /// `cargo test --release -p deltatune-core bench_int8_product -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_int8_product() {
        if !int8_products_supported() {
            return;
        }
        for (dtype, out_f, in_f) in [
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q8_0, 49152, 576),
        ] {
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            for m in [1usize, 8] {
                let x: Vec<f32> = (0..m * in_f).map(|i| (i % 13) as f32 - 6.0).collect();
                let reps = (200_000_000 / (out_f * in_f * m)).max(3);
                let time = |f: &dyn Fn() -> Vec<f32>| {
                    f();
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(f());
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                };
                let t8 = time(&|| forward(&x, m, &q).unwrap());
                let t32 = time(&|| super::super::quant_dot::forward(&x, m, &q).unwrap());
                eprintln!(
                    "{dtype:?} [{out_f}, {in_f}] m {m}: int8 {:.1} us, f32 {:.1} us ({:.2}x)",
                    t8 * 1e6,
                    t32 * 1e6,
                    t8 / t32
                );
            }
        }
    }
}
