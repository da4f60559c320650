//! `y = x·Wᵀ` for a few rows of `x` straight from the quantized blocks of `W` (Q4_0..Q8_0,
//! Q2_K..Q6_K): the decoding step's products, where `x` has one row per sequence.
//!
//! For Q4_1 and Q8_0 each block of 32 weights is expanded in registers (`q·d + m` for Q4_1,
//! `q·d` for Q8_0) and multiplied into up to eight rows of `x` at once, so `W` is read once per
//! call at its stored size (0.56 or 1.06 bytes per weight) and never written out as f32, where
//! the dequantize-then-multiply path writes and reads back 4 bytes per weight. The other types
//! go to [`super::quant_int8::forward_f32`], which widens the codes of the 8-bit kernels'
//! packed copy to f32 in registers. Output rows run in parallel. The sum over a row of `W` runs
//! in the same order for any number of rows of `x`, so a sequence gets the same numbers alone
//! and in a batch.

use rayon::prelude::*;

use crate::quant::QuantMatrix;
use candle_core::quantized::GgmlDType;

/// Rows of `x` one pass over `W` serves (one pair of accumulators each).
const ROWS: usize = 8;
/// Output rows per parallel task.
const OUT_CHUNK: usize = 32;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// Whether [`forward`] handles `w`'s block type on this CPU.
pub(crate) fn supports(w: &QuantMatrix) -> bool {
    use GgmlDType::*;
    if in_registers(w.dtype()) {
        return has_f16c_avx512();
    }
    matches!(w.dtype(), Q4_0 | Q5_0 | Q5_1 | Q2K | Q3K | Q4K | Q5K | Q6K)
        && super::quant_int8::f32_products_supported()
}

/// The types expanded in registers here; the others take the packed copy.
fn in_registers(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

fn has_f16c_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::gemm::has_avx512() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y = x·Wᵀ` (`x` row-major `[m, in]`) as a row-major `[m, out]` vector, or `None` when the
/// block type or CPU is not one this kernel knows.
pub(crate) fn forward(x: &[f32], m: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    if !supports(w) {
        return None;
    }
    let (dtype, bytes) = w.raw();
    if !in_registers(dtype) {
        return super::quant_int8::forward_f32(x, m, w);
    }
    let (out_f, in_f) = w.dims2();
    let row_bytes = bytes.len() / out_f.max(1);
    let mut yt = vec![0f32; out_f * m];
    if m == 0 || out_f == 0 {
        return Some(yt);
    }
    let run = |(ci, chunk): (usize, &mut [f32])| {
        let o0 = ci * OUT_CHUNK;
        for (j, ys) in chunk.chunks_exact_mut(m).enumerate() {
            let row = &bytes[(o0 + j) * row_bytes..(o0 + j + 1) * row_bytes];
            for r0 in (0..m).step_by(ROWS) {
                let n = (m - r0).min(ROWS);
                let xs = &x[r0 * in_f..(r0 + n) * in_f];
                // SAFETY: `supports` checked AVX-512F and F16C; the row holds `in_f / 32`
                // blocks of this type and `xs` holds `n` rows of `in_f` values.
                unsafe { row_dots(dtype, row, xs, in_f, n, &mut ys[r0..r0 + n]) };
            }
        }
    };
    // Waking the other threads costs more than a small product takes.
    if out_f * in_f * m < PAR_MIN_MACS {
        yt.chunks_mut(OUT_CHUNK * m).enumerate().for_each(run);
    } else {
        yt.par_chunks_mut(OUT_CHUNK * m).enumerate().for_each(run);
    }
    // [out, m] -> [m, out]; one row is already in order.
    if m == 1 {
        return Some(yt);
    }
    let mut y = vec![0f32; m * out_f];
    for (o, ys) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in ys.iter().enumerate() {
            y[r * out_f + o] = v;
        }
    }
    Some(y)
}

/// Dequantizes the blocks `blocks` of `w` into `out` with AVX-512 (Q4_1, Q8_0); `false` (and
/// `out` untouched) for other block types or CPUs.
pub(crate) fn dequantize(w: &QuantMatrix, blocks: std::ops::Range<usize>, out: &mut [f32]) -> bool {
    if !supports(w) || !in_registers(w.dtype()) {
        return false;
    }
    let (dtype, bytes) = w.raw();
    let size = match dtype {
        GgmlDType::Q4_1 => 20,
        _ => 34,
    };
    let src = &bytes[blocks.start * size..blocks.end * size];
    debug_assert_eq!(out.len(), blocks.len() * 32);
    // SAFETY: `supports` checked AVX-512F; `src` holds `blocks.len()` blocks and `out` 32
    // values for each.
    unsafe { dequantize_blocks(dtype, src, out) };
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn dequantize_blocks(dtype: GgmlDType, src: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (b, o) in out.chunks_exact_mut(32).enumerate() {
        // SAFETY: each block has its bytes in `src` and 32 values in `o`.
        unsafe {
            let (w0, w1) = if dtype == GgmlDType::Q4_1 {
                expand_q4_1(&src[b * 20..(b + 1) * 20])
            } else {
                expand_q8_0(&src[b * 34..(b + 1) * 34])
            };
            _mm512_storeu_ps(o.as_mut_ptr(), w0);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), w1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dequantize_blocks(_: GgmlDType, _: &[u8], _: &mut [f32]) {
    unreachable!("supports() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
unsafe fn row_dots(
    dtype: GgmlDType,
    row: &[u8],
    xs: &[f32],
    in_f: usize,
    n: usize,
    out: &mut [f32],
) {
    macro_rules! dispatch {
        ($f:ident) => {
            match n {
                1 => $f::<1>(row, xs, in_f, out),
                2 => $f::<2>(row, xs, in_f, out),
                3 => $f::<3>(row, xs, in_f, out),
                4 => $f::<4>(row, xs, in_f, out),
                5 => $f::<5>(row, xs, in_f, out),
                6 => $f::<6>(row, xs, in_f, out),
                7 => $f::<7>(row, xs, in_f, out),
                _ => $f::<8>(row, xs, in_f, out),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            GgmlDType::Q4_1 => dispatch!(q4_1_rows),
            _ => dispatch!(q8_0_rows),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_dots(_: GgmlDType, _: &[u8], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("supports() is false off x86-64")
}

/// The f16 at byte `i` of `p`, widened (one F16C instruction, inlined into the kernels).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn f16_at(p: &[u8], i: usize) -> f32 {
    use std::arch::x86_64::*;
    let bits = u16::from_le_bytes([p[i], p[i + 1]]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The 32 weights of a Q4_1 block (`d` f16, `m` f16, 16 bytes of nibbles: value `j` in the low
/// nibble of byte `j`, value `j + 16` in its high nibble; weight = `q·d + m`) as two vectors.
///
/// # Safety
/// AVX-512F and F16C must be available; `blk` must hold the block's 20 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn expand_q4_1(blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    debug_assert!(blk.len() >= 20);
    let d = _mm512_set1_ps(f16_at(blk, 0));
    let m = _mm512_set1_ps(f16_at(blk, 2));
    // SAFETY: `blk` has 16 bytes at offset 4.
    let qs = unsafe { _mm_loadu_si128(blk.as_ptr().add(4).cast()) };
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, low);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
    (
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m),
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m),
    )
}

/// The 32 weights of a Q8_0 block (`d` f16, 32 signed bytes; weight = `q·d`) as two vectors.
///
/// # Safety
/// AVX-512F and F16C must be available; `blk` must hold the block's 34 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn expand_q8_0(blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    debug_assert!(blk.len() >= 34);
    let d = _mm512_set1_ps(f16_at(blk, 0));
    // SAFETY: `blk` has 32 bytes at offset 2.
    let (q0, q1) = unsafe {
        (
            _mm_loadu_si128(blk.as_ptr().add(2).cast()),
            _mm_loadu_si128(blk.as_ptr().add(18).cast()),
        )
    };
    (
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d),
    )
}

/// Dot products of one row of Q4_1 blocks ([`expand_q4_1`]) with `N` rows of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn q4_1_rows<const N: usize>(row: &[u8], xs: &[f32], in_f: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const B: usize = 20;
    let nb = in_f / 32;
    debug_assert!(row.len() >= nb * B && xs.len() >= N * in_f);
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    for b in 0..nb {
        // SAFETY: the row holds block `b`; `xs` rows have 32 values at `b * 32`.
        unsafe {
            let (w0, w1) = expand_q4_1(&row[b * B..(b + 1) * B]);
            for (r, a) in acc.iter_mut().enumerate() {
                let xp = xs.as_ptr().add(r * in_f + b * 32);
                a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0]);
                a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[1]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
    }
}

/// Dot products of one row of Q8_0 blocks ([`expand_q8_0`]) with `N` rows of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn q8_0_rows<const N: usize>(row: &[u8], xs: &[f32], in_f: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const B: usize = 34;
    let nb = in_f / 32;
    debug_assert!(row.len() >= nb * B && xs.len() >= N * in_f);
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    for b in 0..nb {
        // SAFETY: the row holds block `b`; `xs` rows have 32 values at `b * 32`.
        unsafe {
            let (w0, w1) = expand_q8_0(&row[b * B..(b + 1) * B]);
            for (r, a) in acc.iter_mut().enumerate() {
                let xp = xs.as_ptr().add(r * in_f + b * 32);
                a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0]);
                a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[1]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The AVX-512 dequantization gives candle's values exactly.
    #[test]
    fn fast_dequantization_equals_candles() {
        if crate::ops::lacks_cpu_feature(crate::ops::gemm::has_avx512(), "AVX-512") {
            return;
        }
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (9, 64), &Device::Cpu).unwrap();
            let qt = candle_core::quantized::QTensor::quantize(&w, dtype).unwrap();
            let want: Vec<Vec<f32>> = qt.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let q = QuantMatrix::from_qtensor(qt, "w").unwrap();
            let mut out = vec![0f32; 3 * 64];
            assert!(dequantize(&q, 2 * 2..5 * 2, &mut out));
            for r in 0..3 {
                assert_eq!(
                    &out[r * 64..(r + 1) * 64],
                    &want[2 + r][..],
                    "{dtype:?} row {}",
                    2 + r
                );
            }
        }
    }

    /// The fused product equals the dequantized matrix's product (to f32 rounding: relative
    /// 1e-4 over 512-term sums) for every block type, and every row gets the same bits alone
    /// and in any batch of 1 to 40 rows (partial groups of 8 included), with an output size
    /// that is not a multiple of the parallel chunk.
    #[test]
    fn fused_product_equals_the_dequantized_product() {
        if crate::ops::lacks_cpu_feature(crate::ops::gemm::has_avx512(), "AVX-512") {
            return;
        }
        let (out_f, in_f, m) = (70, 512, 40);
        for dtype in crate::ops::quant_int8::tests::TYPES {
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize().unwrap().to_vec2().unwrap();
            let x: Vec<f32> = (0..m * in_f)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            let alone: Vec<Vec<f32>> = (0..m)
                .map(|r| forward(&x[r * in_f..(r + 1) * in_f], 1, &q).unwrap())
                .collect();
            for (r, y) in alone.iter().enumerate() {
                for o in 0..out_f {
                    let want: f64 = (0..in_f)
                        .map(|k| x[r * in_f + k] as f64 * dense[o][k] as f64)
                        .sum();
                    let got = y[o] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} [{r}, {o}]: {got} vs {want}"
                    );
                }
            }
            for n in 1..=m {
                let y = forward(&x[..n * in_f], n, &q).unwrap();
                for (r, want) in alone.iter().enumerate().take(n) {
                    let got = &y[r * out_f..(r + 1) * out_f];
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?}: row {r} alone and in a batch of {n}"
                    );
                }
            }
        }
    }
}
