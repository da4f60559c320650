//! `y = x·Wᵀ` for a few rows of `x` against Q4_1/Q8_0 blocks with 8-bit activations and integer
//! dot products (AVX-512 VNNI): the decoding step's products when a layer is set to
//! ([`crate::Linear::use_int8`]; `generation.int8_activations` in the CLI).
//!
//! Each row of `x` is cut into blocks of 32 and quantized to 8 bits: `q = round(x / d)` with
//! `d = max|x| / 127`, keeping `d` and `s = d·Σq` per block (llama.cpp's Q8_1 layout). A block of
//! `W` then needs one `vpdpbusd` (32 byte products summed in fours into eight 32-bit lanes)
//! instead of expanding 32 weights to f32 and running four f32 FMA vectors:
//!
//! * Q4_1 (`w = q_w·d_w + m_w`, `q_w` 0..15): `Σ w·x ≈ d_w·d·Σ q_w·q + m_w·s`;
//! * Q8_0 (`w = q_w·d_w`, `q_w` signed): `Σ q_w·q` as `Σ |q_w|·(q with q_w's sign)`, since
//!   `vpdpbusd` multiplies unsigned by signed bytes.
//!
//! The block sums are exact integers; what changes against the f32 path is the rounding of `x`
//! to 8 bits (relative error up to `1/254` of the block's largest value per element). A row
//! gives the same numbers alone or in a batch.

use rayon::prelude::*;

use crate::quant::QuantMatrix;
use candle_core::quantized::GgmlDType;

/// Output rows per parallel task.
const OUT_CHUNK: usize = 32;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// Whether [`forward`] handles `w` on this CPU (Q4_1 or Q8_0 with AVX-512 VNNI, BW, VL and F16C).
pub(crate) fn supports(w: &QuantMatrix) -> bool {
    matches!(w.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) && has_vnni()
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One row of `x` in blocks of 32 bytes: the values, and per block the scale `d` and
/// `s = d·Σq`.
pub(crate) struct QuantRow {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

/// `x` (a multiple of 32 values) quantized to 8 bits per block of 32.
pub(crate) fn quantize_row(x: &[f32]) -> QuantRow {
    let nb = x.len() / 32;
    let mut q = vec![0i8; nb * 32];
    let mut d = vec![0f32; nb];
    let mut s = vec![0f32; nb];
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let db = amax / 127.0;
        let inv = if db > 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in q[b * 32..(b + 1) * 32].iter_mut().zip(xb) {
            let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *o = r;
            sum += i32::from(r);
        }
        d[b] = db;
        s[b] = db * sum as f32;
    }
    QuantRow { q, d, s }
}

/// `y = x·Wᵀ` (`x` row-major `[m, in]`) as a row-major `[m, out]` vector, or `None` when `w`'s
/// block type or the CPU is not one this kernel knows.
pub(crate) fn forward(x: &[f32], m: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    if !supports(w) {
        return None;
    }
    let (out_f, in_f) = w.dims2();
    let (dtype, bytes) = w.raw();
    let row_bytes = bytes.len() / out_f.max(1);
    let rows: Vec<QuantRow> = x
        .chunks_exact(in_f.max(1))
        .take(m)
        .map(quantize_row)
        .collect();
    let mut yt = vec![0f32; out_f * m];
    if m == 0 || out_f == 0 {
        return Some(yt);
    }
    let run = |(ci, chunk): (usize, &mut [f32])| {
        let o0 = ci * OUT_CHUNK;
        for (j, ys) in chunk.chunks_exact_mut(m).enumerate() {
            let row = &bytes[(o0 + j) * row_bytes..(o0 + j + 1) * row_bytes];
            for (y, xr) in ys.iter_mut().zip(&rows) {
                // SAFETY: `supports` checked the CPU features; the row holds `in_f / 32` blocks
                // of this type and `xr` as many blocks of 32 bytes.
                *y = unsafe { dot(dtype, row, xr) };
            }
        }
    };
    if out_f * in_f * m < PAR_MIN_MACS {
        yt.chunks_mut(OUT_CHUNK * m).enumerate().for_each(run);
    } else {
        yt.par_chunks_mut(OUT_CHUNK * m).enumerate().for_each(run);
    }
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

#[cfg(target_arch = "x86_64")]
unsafe fn dot(dtype: GgmlDType, row: &[u8], x: &QuantRow) -> f32 {
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            GgmlDType::Q4_1 => dot_q4_1(row, x),
            _ => dot_q8_0(row, x),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot(_: GgmlDType, _: &[u8], _: &QuantRow) -> f32 {
    unreachable!("supports() is false off x86-64")
}

/// The f16 at byte `i` of `p`, widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
fn f16_at(p: &[u8], i: usize) -> f32 {
    use std::arch::x86_64::*;
    let bits = u16::from_le_bytes([p[i], p[i + 1]]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Horizontal sum of eight f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// One row of Q4_1 blocks (`d` f16, `m` f16, 16 bytes of nibbles: value `j` in the low nibble
/// of byte `j`, value `j + 16` in its high nibble) against a quantized row of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn dot_q4_1(row: &[u8], x: &QuantRow) -> f32 {
    use std::arch::x86_64::*;
    const B: usize = 20;
    let nb = x.d.len();
    assert!(row.len() >= nb * B && x.q.len() >= nb * 32);
    let low = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    for b in 0..nb {
        let blk = &row[b * B..(b + 1) * B];
        // SAFETY: `blk` has 16 bytes at offset 4; `x.q` has 32 bytes at `b * 32` (asserted).
        unsafe {
            let qs = _mm_loadu_si128(blk.as_ptr().add(4).cast());
            let lo = _mm_and_si128(qs, low);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
            let wq = _mm256_set_m128i(hi, lo);
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * 32).cast());
            let dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, xq);
            let scale = _mm256_set1_ps(f16_at(blk, 0) * x.d[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), scale, acc);
        }
        acc_m += f16_at(blk, 2) * x.s[b];
    }
    hsum(acc) + acc_m
}

/// One row of Q8_0 blocks (`d` f16, 32 signed bytes) against a quantized row of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn dot_q8_0(row: &[u8], x: &QuantRow) -> f32 {
    use std::arch::x86_64::*;
    const B: usize = 34;
    let nb = x.d.len();
    assert!(row.len() >= nb * B && x.q.len() >= nb * 32);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let blk = &row[b * B..(b + 1) * B];
        // SAFETY: `blk` has 32 bytes at offset 2; `x.q` has 32 bytes at `b * 32` (asserted).
        unsafe {
            let w = _mm256_loadu_si256(blk.as_ptr().add(2).cast());
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(b * 32).cast());
            // |w| (unsigned) times x with w's sign: the signed product, as vpdpbusd needs.
            let dp = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(w, w),
                _mm256_sign_epi8(xq, w),
            );
            let scale = _mm256_set1_ps(f16_at(blk, 0) * x.d[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), scale, acc);
        }
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use candle_core::{Device, Tensor};

    /// Against the exact products of the dequantized weights with the 8-bit-rounded `x` (f64),
    /// and within the rounding's bound of the f32 products; one row alone equals it in a batch.
    #[test]
    fn int8_products_equal_the_rounded_activations_products() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let mut r = Rng::new(3);
            let (out_f, in_f, m) = (70, 96, 5);
            let w = r.normal_tensor((out_f, in_f), 0.5).unwrap();
            let qw = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            if !supports(&qw) {
                eprintln!("skipped: no AVX-512 VNNI");
                return;
            }
            let wd: Vec<f32> = qw
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let x: Vec<f32> = r
                .normal_tensor((m, in_f), 1.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let y = forward(&x, m, &qw).unwrap();
            for i in 0..m {
                let xr = &x[i * in_f..(i + 1) * in_f];
                let q = quantize_row(xr);
                let alone = forward(xr, 1, &qw).unwrap();
                for o in 0..out_f {
                    let wr = &wd[o * in_f..(o + 1) * in_f];
                    let exact: f64 = (0..in_f)
                        .map(|k| f64::from(wr[k]) * f64::from(q.q[k]) * f64::from(q.d[k / 32]))
                        .sum();
                    let f32_dot: f64 = (0..in_f).map(|k| f64::from(wr[k]) * f64::from(xr[k])).sum();
                    let got = f64::from(y[i * out_f + o]);
                    assert!(
                        (got - exact).abs() < 1e-4,
                        "{dtype:?} [{i}, {o}]: {got} vs {exact}"
                    );
                    assert!(
                        (got - f32_dot).abs() < 0.1,
                        "{dtype:?} [{i}, {o}]: {got} vs f32 {f32_dot}"
                    );
                    assert_eq!(alone[o], y[i * out_f + o], "row {i} alone");
                }
            }
        }
        let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
    }

    #[test]
    fn quantized_rows_keep_their_scale_and_sum() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let q = quantize_row(&x);
        for b in 0..2 {
            let amax = x[b * 32..(b + 1) * 32]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.d[b], amax / 127.0);
            let sum: i32 = q.q[b * 32..(b + 1) * 32]
                .iter()
                .map(|&v| i32::from(v))
                .sum();
            assert_eq!(q.s[b], q.d[b] * sum as f32);
            for k in 0..32 {
                let back = f32::from(q.q[b * 32 + k]) * q.d[b];
                assert!((back - x[b * 32 + k]).abs() <= q.d[b] / 2.0 + 1e-6);
            }
        }
        // An all-zero block stays zero (no division by zero).
        let z = quantize_row(&[0.0; 32]);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
        assert!(z.q.iter().all(|&v| v == 0));
    }
}
