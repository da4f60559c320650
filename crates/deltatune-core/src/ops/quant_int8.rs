//! `y = x·Wᵀ` with 8-bit activations and VNNI integer dot products: the products by a quantized
//! base when generating (prompt and decoding steps), as llama.cpp computes them.
//!
//! [`super::quant_dot`] expands every block of `W` to f32, several instructions per weight.
//! Here the work per weight is a fraction of one instruction:
//!
//! * `W` is repacked once (on first use) so that 16 output rows sit side by side: for each block
//!   of 32 inputs, the 16 rows' unsigned integer codes are interleaved four at a time, so one
//!   512-bit `vpdpbusd` multiplies 4 consecutive weights of each of 16 rows by the same 4
//!   activations and adds them into one 32-bit lane per row. No horizontal sums; the rows'
//!   scales load as one vector of 16 values.
//! * Each row of `x` is quantized to signed 8 bits (`q = round(x / d)`, ties to even,
//!   `d = max|x| / 127`) per block of 32 values, or of 256 for the k-quants (llama.cpp's Q8_0 /
//!   Q8_1 and Q8_K), with the sums of `q` over each block of 32 and over its first 16 values,
//!   for the weights' offsets and mins below.
//!
//! Every GGUF block type from Q4_0 to Q6_K comes down to unsigned codes `u` with an integer
//! offset `o` and scales: `w = d·(u − o) (+ m)` for the 32-weight types, `w = d·s·(u − o) −
//! dmin·n` for the k-quants' 256-weight super-blocks, whose 6-bit (Q4_K, Q5_K), 8-bit (Q6_K),
//! 6-bit signed (Q3_K) or 4-bit (Q2_K) sub-block scales `s` and mins `n` cover 32 or 16
//! weights. So `Σ w·x ≈ d_x·(d·s·(Σ u·q_x − o·Σ q_x) − dmin·n·Σ q_x)` per sub-block: the
//! offset comes off in integers, the rest is one or two fused multiply-adds per block of 32
//! and row of `x`. The codes are stored as nibbles (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K), nibbles
//! plus one (Q5_0, Q5_1, Q5_K) or two (Q6_K) bit planes that a masked byte add puts back, or
//! bytes (Q8_0, stored with 128 added); the k-quants keep `d`, `dmin` and the small integer
//! sub-block scales, widened in registers once per block of 32 for all rows of `x`. The
//! repacked copy takes about as many bytes as the file's blocks (92 MiB more for SmolLM2-135M's
//! Q4_1 file); the 8-bit products make it, and [`forward_f32`] reads it too (f32 activations,
//! the codes widened to f32 in registers) for the types [`super::quant_dot`] does not expand
//! itself.
//!
//! The activations' rounding (relative error up to 1/254 of a block's largest value) is the
//! price (1/254 of a block of 256's largest value for the k-quants); it is what llama.cpp pays
//! on every CPU product. Each row of `x` gets the same numbers alone and in a batch: its
//! quantization and sums do not depend on the other rows.

use std::sync::Arc;

use rayon::prelude::*;

use crate::quant::QuantMatrix;
use candle_core::quantized::GgmlDType;

thread_local! {
    static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, products by a quantized weight of a block type from Q4_0 to
/// Q6_K on this thread ([`crate::ops::quant_linear`]) round the activations to 8 bits and use
/// this module's integer kernels where the CPU has AVX-512 VNNI. Models turn it on through
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

/// The block types, as the const parameter of the kernel.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;
const Q2_K: u8 = 5;
const Q3_K: u8 = 6;
const Q4_K: u8 = 7;
const Q5_K: u8 = 8;
const Q6_K: u8 = 9;

fn type_code(dtype: GgmlDType) -> Option<u8> {
    Some(match dtype {
        GgmlDType::Q4_0 => Q4_0,
        GgmlDType::Q4_1 => Q4_1,
        GgmlDType::Q5_0 => Q5_0,
        GgmlDType::Q5_1 => Q5_1,
        GgmlDType::Q8_0 => Q8_0,
        GgmlDType::Q2K => Q2_K,
        GgmlDType::Q3K => Q3_K,
        GgmlDType::Q4K => Q4_K,
        GgmlDType::Q5K => Q5_K,
        GgmlDType::Q6K => Q6_K,
        _ => return None,
    })
}

/// How a block type's codes and scales are laid out in the packed records.
///
/// A record covers one group of [`LANES`] rows and one file block: 32 weights per row, or for
/// the k-quants a super-block of 256 (eight sub-records of 32). A sub-record's codes come
/// first: as bytes (`[8][16 rows][4]`, vector `k` holding values `4k..4k + 4` of each row), or
/// as nibbles (`[4][16 rows][4]`, the low nibbles of vector `c` values `8c..8c + 4`, the high
/// ones `8c + 4..8c + 8`) followed by `planes` bit planes (`[8]` 64-bit masks, bit `4j + t` of
/// mask `k` the next bit of value `4k + t` of row `j`). Then, per row, `d` (and `m` or `dmin`)
/// as 16 f16 each; the k-quants end with their sub-block scales (and mins), `[sub][16 rows]`
/// bytes.
#[derive(Clone, Copy, Debug)]
struct Format {
    /// Codes stored as bytes rather than nibbles.
    bytes: bool,
    /// Bit planes above the nibble.
    planes: usize,
    /// Offset `o` of the codes: the weight is a multiple of `u − o`.
    offset: i32,
    /// 256-weight super-blocks with integer sub-block scales.
    kquant: bool,
    /// Sub-block scales (and mins) per 16 weights rather than per 32.
    split: bool,
    /// A min (`+ m` for the 32-weight types, `− dmin·n` for the k-quants).
    min: bool,
    /// The sub-block scales are signed.
    signed: bool,
    /// Bytes of one block in the file.
    src: usize,
}

const fn format(t: u8) -> Format {
    let f = Format {
        bytes: false,
        planes: 0,
        offset: 0,
        kquant: false,
        split: false,
        min: false,
        signed: false,
        src: 0,
    };
    match t {
        Q4_0 => Format {
            offset: 8,
            src: 18,
            ..f
        },
        Q4_1 => Format {
            min: true,
            src: 20,
            ..f
        },
        Q5_0 => Format {
            planes: 1,
            offset: 16,
            src: 22,
            ..f
        },
        Q5_1 => Format {
            planes: 1,
            min: true,
            src: 24,
            ..f
        },
        Q8_0 => Format {
            bytes: true,
            offset: 128,
            src: 34,
            ..f
        },
        Q2_K => Format {
            kquant: true,
            split: true,
            min: true,
            src: 84,
            ..f
        },
        Q3_K => Format {
            offset: 4,
            kquant: true,
            split: true,
            signed: true,
            src: 110,
            ..f
        },
        Q4_K => Format {
            kquant: true,
            min: true,
            src: 144,
            ..f
        },
        Q5_K => Format {
            planes: 1,
            kquant: true,
            min: true,
            src: 176,
            ..f
        },
        _ => Format {
            planes: 2,
            offset: 32,
            kquant: true,
            split: true,
            signed: true,
            src: 210,
            ..f
        },
    }
}

impl Format {
    /// Bytes of one sub-record's codes (32 weights of 16 rows).
    const fn code_bytes(self) -> usize {
        if self.bytes {
            512
        } else {
            256 + 64 * self.planes
        }
    }

    /// Weights per row in a record.
    const fn per_record(self) -> usize {
        if self.kquant {
            256
        } else {
            32
        }
    }

    /// Sub-block scales per super-block.
    const fn subs(self) -> usize {
        if self.split {
            16
        } else {
            8
        }
    }

    /// Offset of the per-row `d` values (f16) in a record; `m` / `dmin` follow.
    const fn d_at(self) -> usize {
        self.code_bytes() * self.per_record() / 32
    }

    /// Offset of the k-quants' sub-block scales; their mins follow.
    const fn scales_at(self) -> usize {
        self.d_at() + 32 + if self.min { 32 } else { 0 }
    }

    /// Bytes per (group, file block) record.
    const fn record(self) -> usize {
        if self.kquant {
            self.scales_at() + self.subs() * LANES * if self.min { 2 } else { 1 }
        } else {
            self.scales_at()
        }
    }
}

/// `W` repacked for [`forward`]: groups of [`LANES`] rows, file block by file block, one record
/// of [`Format::record`] bytes per (group, block).
pub(crate) struct Packed(Vec<u8>);

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

/// Whether [`forward`] handles `w` on this CPU (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K).
pub(crate) fn supports(w: &QuantMatrix) -> bool {
    type_code(w.dtype()).is_some() && int8_products_supported()
}

/// One file block taken apart: codes, `d` and `m` / `dmin` as f16 bits, sub-block scales and
/// mins (the k-quants; signed ones as their bytes).
struct Decoded {
    u: [u8; 256],
    d: [u8; 2],
    m: [u8; 2],
    sc: [u8; 16],
    mn: [u8; 16],
}

/// Takes a file block of type `t` apart ([`Decoded`]); its weights are `d·(u − o) + m` or
/// `d·s·(u − o) − dmin·n` as in [`format()`] (ggml's layouts, as candle's `to_float` reads them).
fn decode(t: u8, b: &[u8], out: &mut Decoded) {
    let u = &mut out.u;
    out.d = [b[0], b[1]];
    match t {
        Q4_0 | Q4_1 => {
            let qs = if t == Q4_0 { &b[2..18] } else { &b[4..20] };
            if t == Q4_1 {
                out.m = [b[2], b[3]];
            }
            for (j, &q) in qs.iter().enumerate() {
                u[j] = q & 0x0F;
                u[j + 16] = q >> 4;
            }
        }
        Q5_0 | Q5_1 => {
            let at = if t == Q5_0 { 2 } else { 4 };
            if t == Q5_1 {
                out.m = [b[2], b[3]];
            }
            let qh = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
                u[j] = (q & 0x0F) | (((qh >> j) & 1) << 4) as u8;
                u[j + 16] = (q >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
            }
        }
        Q8_0 => {
            for (j, &q) in b[2..34].iter().enumerate() {
                u[j] = q ^ 0x80;
            }
        }
        Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            out.d = [b[80], b[81]];
            out.m = [b[82], b[83]];
            for (i, &s) in scales.iter().enumerate() {
                out.sc[i] = s & 0x0F;
                out.mn[i] = s >> 4;
            }
            for p in 0..256 {
                let (half, shift, i) = (p / 128, (p % 128) / 32, p % 32);
                u[p] = (qs[half * 32 + i] >> (2 * shift)) & 3;
            }
        }
        Q3_K => {
            let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
            out.d = [b[108], b[109]];
            for j in 0..16 {
                let low = if j < 8 {
                    scales[j] & 0x0F
                } else {
                    scales[j - 8] >> 4
                };
                let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
                out.sc[j] = ((low | (high << 4)) as i8 - 32) as u8;
            }
            for p in 0..256 {
                let (half, shift, i) = (p / 128, (p % 128) / 32, p % 32);
                let low = (qs[half * 32 + i] >> (2 * shift)) & 3;
                let high = (hmask[i] >> (4 * half + shift)) & 1;
                u[p] = low | (high << 2);
            }
        }
        Q4_K | Q5_K => {
            out.m = [b[2], b[3]];
            let scales = &b[4..16];
            for j in 0..8 {
                let (s, n) = if j < 4 {
                    (scales[j] & 63, scales[j + 4] & 63)
                } else {
                    (
                        (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
                        (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                    )
                };
                out.sc[j] = s;
                out.mn[j] = n;
            }
            let (qh, qs) = if t == Q4_K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let q = qs[j * 32 + l];
                    let (mut lo, mut hi) = (q & 0x0F, q >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    u[j * 64 + l] = lo;
                    u[j * 64 + 32 + l] = hi;
                }
            }
        }
        _ => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = [b[208], b[209]];
            out.sc.copy_from_slice(scales);
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let y = &mut u[128 * half..];
                for l in 0..32 {
                    y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
}

/// Writes row `j`'s 32 codes `u` into a sub-record `o` (zeroed before) of format `f`.
fn put_codes(f: Format, o: &mut [u8], j: usize, u: &[u8]) {
    if f.bytes {
        for k in 0..8 {
            for t in 0..4 {
                o[k * 64 + j * 4 + t] = u[4 * k + t];
            }
        }
        return;
    }
    for c in 0..4 {
        for t in 0..4 {
            o[c * 64 + j * 4 + t] = (u[8 * c + t] & 0x0F) | ((u[8 * c + 4 + t] & 0x0F) << 4);
        }
    }
    for p in 0..f.planes {
        for k in 0..8 {
            for t in 0..4 {
                if (u[4 * k + t] >> (4 + p)) & 1 != 0 {
                    let bit = j * 4 + t;
                    o[256 + 64 * p + 8 * k + bit / 8] |= 1 << (bit % 8);
                }
            }
        }
    }
}

/// Repacks the blocks of `w` into groups of 16 rows ([`Format`]); rows past the end of the
/// last group are zeros. `None` for block types [`forward`] does not handle.
pub(crate) fn pack(w: &QuantMatrix) -> Option<Arc<Packed>> {
    let t = type_code(w.dtype())?;
    let f = format(t);
    let rec = f.record();
    let (rows, cols) = w.dims2();
    let (_, src) = w.raw();
    let per = f.per_record();
    let nb = cols / per;
    let groups = rows.div_ceil(LANES);
    let mut bytes = vec![0u8; groups * nb * rec];
    bytes
        .par_chunks_mut((nb * rec).max(1))
        .enumerate()
        .for_each(|(g, out)| {
            let mut dec = Decoded {
                u: [0; 256],
                d: [0; 2],
                m: [0; 2],
                sc: [0; 16],
                mn: [0; 16],
            };
            for b in 0..nb {
                let o = &mut out[b * rec..(b + 1) * rec];
                for j in 0..LANES.min(rows - g * LANES) {
                    let at = ((g * LANES + j) * nb + b) * f.src;
                    decode(t, &src[at..at + f.src], &mut dec);
                    let cb = f.code_bytes();
                    for s in 0..per / 32 {
                        put_codes(f, &mut o[s * cb..(s + 1) * cb], j, &dec.u[s * 32..]);
                    }
                    let d = f.d_at();
                    o[d + 2 * j..d + 2 * j + 2].copy_from_slice(&dec.d);
                    if f.min {
                        o[d + 32 + 2 * j..d + 32 + 2 * j + 2].copy_from_slice(&dec.m);
                    }
                    if f.kquant {
                        let (sa, subs) = (f.scales_at(), f.subs());
                        for i in 0..subs {
                            o[sa + i * LANES + j] = dec.sc[i];
                            if f.min {
                                o[sa + (subs + i) * LANES + j] = dec.mn[i];
                            }
                        }
                    }
                }
            }
        });
    Some(Arc::new(Packed(bytes)))
}

/// Rows of `x` quantized per block of 32 (or 256) to signed bytes.
pub(crate) struct QuantRows {
    /// `[m, in]` signed 8-bit values.
    pub(crate) q: Vec<i8>,
    /// `[m, in / 32]` block scales `d` (the same for the 8 blocks of 32 of a block of 256).
    pub(crate) d: Vec<f32>,
    /// `[m, in / 32]` sums of each block's `q`.
    pub(crate) sum: Vec<i32>,
    /// `[m, in / 32]` sums of the first 16 `q` of each block (for 16-weight sub-blocks).
    pub(crate) lo: Vec<i32>,
    /// `[m, in / 32]` for blocks of 32: `d·Σq` rounded to f16 from the unrounded `d`, as
    /// llama.cpp's Q8_1 keeps it for the products with Q4_1 / Q5_1 (their min term).
    pub(crate) s: Vec<f32>,
}

/// Quantizes the `m` rows of `x` (`[m, in]`, `in` a multiple of `per`) per block of `per`
/// values: 32 (llama.cpp's Q8_0 and Q8_1, with `d = max|x| / 127`, `q = round(x / d)`, `d` then
/// kept as f16 and Q8_1's `s = d·Σq` too), or
/// 256 for the k-quants (llama.cpp's Q8_K: `q = round(x · 127 / max|x|)`, `d` the inverse of
/// that factor).
pub(crate) fn quantize_rows(x: &[f32], m: usize, in_f: usize, per: usize) -> QuantRows {
    debug_assert!(per == 32 || per == 256);
    debug_assert_eq!(x.len(), m * in_f);
    let nb = in_f / 32;
    let mut q = vec![0i8; m * in_f];
    let mut d = vec![0f32; m * nb];
    let mut sum = vec![0i32; m * nb];
    let mut lo = vec![0i32; m * nb];
    let mut s = vec![0f32; m * nb];
    if m * in_f >= 1 << 16 {
        x.par_chunks_exact(in_f)
            .zip(q.par_chunks_exact_mut(in_f))
            .zip(d.par_chunks_exact_mut(nb).zip(s.par_chunks_exact_mut(nb)))
            .zip(
                sum.par_chunks_exact_mut(nb)
                    .zip(lo.par_chunks_exact_mut(nb)),
            )
            .for_each(|(((x, q), (d, s)), (sum, lo))| quantize_blocks(x, q, d, s, sum, lo, per));
    } else {
        x.chunks_exact(in_f)
            .zip(q.chunks_exact_mut(in_f))
            .zip(d.chunks_exact_mut(nb).zip(s.chunks_exact_mut(nb)))
            .zip(sum.chunks_exact_mut(nb).zip(lo.chunks_exact_mut(nb)))
            .for_each(|(((x, q), (d, s)), (sum, lo))| quantize_blocks(x, q, d, s, sum, lo, per));
    }
    QuantRows { q, d, sum, lo, s }
}

/// [`quantize_rows`] for the blocks of one row.
fn quantize_blocks(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    sum: &mut [i32],
    lo: &mut [i32],
    per: usize,
) {
    let subs = per / 32;
    for ((xb, qb), (((db, ssb), sb), lb)) in x.chunks_exact(per).zip(q.chunks_exact_mut(per)).zip(
        d.chunks_exact_mut(subs)
            .zip(s.chunks_exact_mut(subs))
            .zip(sum.chunks_exact_mut(subs))
            .zip(lo.chunks_exact_mut(subs)),
    ) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (scale, inv) = if per == 32 {
            let scale = amax / 127.0;
            (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
        } else if amax > 0.0 {
            let inv = 127.0 / amax;
            (1.0 / inv, inv)
        } else {
            (0.0, 0.0)
        };
        // Adding and taking off 1.5 * 2^23 rounds to the nearest integer (ties to even) for
        // |v| < 2^22, in plain arithmetic the compiler vectorises (`round_ties_even` is a libm
        // call without SSE4.1).
        const MAGIC: f32 = 12_582_912.0;
        for (qv, &v) in qb.iter_mut().zip(xb) {
            *qv = ((v * inv).clamp(-127.0, 127.0) + MAGIC - MAGIC) as i8;
        }
        // A NaN anywhere in the block makes `amax` NaN (f32::max ignores it, so check).
        let scale = if xb.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            scale
        };
        let half = |h: &[i8]| h.iter().map(|&v| v as i32).sum::<i32>();
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        for (i, qs) in qb.chunks_exact(32).enumerate() {
            lb[i] = half(&qs[..16]);
            sb[i] = lb[i] + half(&qs[16..]);
            if per == 32 {
                // The codes come from the f32 scale, but llama.cpp's Q8_0 / Q8_1 blocks keep
                // the scale (and Q8_1 the scaled sum) as f16, and its products use those.
                db[i] = f16(scale);
                ssb[i] = f16(scale * sb[i] as f32);
            } else {
                db[i] = scale;
                ssb[i] = scale * sb[i] as f32;
            }
        }
    }
}

/// `y = x·Wᵀ` (`x` row-major `[m, in]`) as a row-major `[m, out]` vector with 8-bit
/// activations, or `None` when the block type or CPU is not one this kernel knows.
pub(crate) fn forward(x: &[f32], m: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    if !supports(w) {
        return None;
    }
    let t = type_code(w.dtype())?;
    let packed = &w.int8_packed()?.0;
    let f = format(t);
    let (out_f, in_f) = w.dims2();
    debug_assert_eq!(x.len(), m * in_f);
    let mut y = vec![0f32; m * out_f];
    if m == 0 || out_f == 0 || in_f == 0 {
        return Some(y);
    }
    let xq = quantize_rows(x, m, in_f, f.per_record());
    by_groups(packed, f, &mut y, m, out_f, in_f, |recs, chunk| {
        for r0 in (0..m).step_by(ROWS) {
            let n = (m - r0).min(ROWS);
            let out = &mut chunk[r0 * LANES..(r0 + n) * LANES];
            // SAFETY: `supports` checked the CPU features; `recs` holds the group's records of
            // this type for `in_f` inputs, `xq` holds `m` rows of `in_f` values and `in_f / 32`
            // scales and sums each, and `out` has `n * LANES` values.
            unsafe { group_dots(t, recs, &xq, r0, n, in_f, out) };
        }
    });
    Some(y)
}

/// Whether [`forward_f32`] runs on this CPU (AVX-512 F/BW, F16C).
pub(crate) fn f32_products_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y = x·Wᵀ` (`x` row-major `[m, in]`) as a row-major `[m, out]` vector with f32
/// activations, from the same packed records as [`forward`] (the codes widened to f32 in
/// registers), or `None` when the block type or CPU is not one this kernel knows. Each row of
/// `x` runs on its own, so its result does not depend on the batch.
pub(crate) fn forward_f32(x: &[f32], m: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    if !f32_products_supported() {
        return None;
    }
    let t = type_code(w.dtype())?;
    let packed = &w.int8_packed()?.0;
    let f = format(t);
    let (out_f, in_f) = w.dims2();
    debug_assert_eq!(x.len(), m * in_f);
    let mut y = vec![0f32; m * out_f];
    if m == 0 || out_f == 0 || in_f == 0 {
        return Some(y);
    }
    by_groups(packed, f, &mut y, m, out_f, in_f, |recs, chunk| {
        for (xr, out) in x.chunks_exact(in_f).zip(chunk.chunks_exact_mut(LANES)) {
            // SAFETY: `f32_products_supported` checked the CPU features; `recs` holds the
            // group's records of this type for `in_f` inputs, `xr` `in_f` values and `out`
            // LANES.
            unsafe { group_dots_f32(t, recs, xr, in_f, out) };
        }
    });
    Some(y)
}

/// Runs `kernel(records, out)` for each group of [`LANES`] rows of `W` (`out`: `[m][LANES]`
/// outputs), in parallel above [`PAR_MIN_MACS`], and puts the groups' outputs in `y`
/// (`[m, out]`).
fn by_groups(
    packed: &[u8],
    f: Format,
    y: &mut [f32],
    m: usize,
    out_f: usize,
    in_f: usize,
    kernel: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    let group_bytes = in_f / f.per_record() * f.record();
    // [group][m][LANES]
    let mut yt = vec![0f32; out_f.div_ceil(LANES) * m * LANES];
    let run = |(g, chunk): (usize, &mut [f32])| {
        kernel(&packed[g * group_bytes..(g + 1) * group_bytes], chunk)
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
}

#[cfg(target_arch = "x86_64")]
unsafe fn group_dots_f32(t: u8, recs: &[u8], x: &[f32], in_f: usize, out: &mut [f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match t {
            Q4_0 => group_kernel_f32::<Q4_0>(recs, x, in_f, out),
            Q4_1 => group_kernel_f32::<Q4_1>(recs, x, in_f, out),
            Q5_0 => group_kernel_f32::<Q5_0>(recs, x, in_f, out),
            Q5_1 => group_kernel_f32::<Q5_1>(recs, x, in_f, out),
            Q8_0 => group_kernel_f32::<Q8_0>(recs, x, in_f, out),
            Q2_K => group_kernel_f32::<Q2_K>(recs, x, in_f, out),
            Q3_K => group_kernel_f32::<Q3_K>(recs, x, in_f, out),
            Q4_K => group_kernel_f32::<Q4_K>(recs, x, in_f, out),
            Q5_K => group_kernel_f32::<Q5_K>(recs, x, in_f, out),
            _ => group_kernel_f32::<Q6_K>(recs, x, in_f, out),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_dots_f32(_: u8, _: &[u8], _: &[f32], _: usize, _: &mut [f32]) {
    unreachable!("f32_products_supported() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
unsafe fn group_dots(
    t: u8,
    recs: &[u8],
    xq: &QuantRows,
    r0: usize,
    n: usize,
    in_f: usize,
    out: &mut [f32],
) {
    macro_rules! rows {
        ($t:expr) => {
            match n {
                1 => group_kernel::<1, { $t }>(recs, xq, r0, in_f, out),
                2 => group_kernel::<2, { $t }>(recs, xq, r0, in_f, out),
                3 => group_kernel::<3, { $t }>(recs, xq, r0, in_f, out),
                4 => group_kernel::<4, { $t }>(recs, xq, r0, in_f, out),
                5 => group_kernel::<5, { $t }>(recs, xq, r0, in_f, out),
                6 => group_kernel::<6, { $t }>(recs, xq, r0, in_f, out),
                7 => group_kernel::<7, { $t }>(recs, xq, r0, in_f, out),
                _ => group_kernel::<8, { $t }>(recs, xq, r0, in_f, out),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match t {
            Q4_0 => rows!(Q4_0),
            Q4_1 => rows!(Q4_1),
            Q5_0 => rows!(Q5_0),
            Q5_1 => rows!(Q5_1),
            Q8_0 => rows!(Q8_0),
            Q2_K => rows!(Q2_K),
            Q3_K => rows!(Q3_K),
            Q4_K => rows!(Q4_K),
            Q5_K => rows!(Q5_K),
            _ => rows!(Q6_K),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn group_dots(_: u8, _: &[u8], _: &QuantRows, _: usize, _: usize, _: usize, _: &mut [f32]) {
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

/// 16 sub-block scales or mins (one byte per row at `p`), widened to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn small_ints(p: *const u8, signed: bool) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller keeps `p..p + 16` inside the record.
    unsafe {
        let v = _mm_loadu_si128(p.cast());
        _mm512_cvtepi32_ps(if signed {
            _mm512_cvtepi8_epi32(v)
        } else {
            _mm512_cvtepu8_epi32(v)
        })
    }
}

/// 16 f16 values at `p`, widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn halves(p: *const u8) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller keeps `p..p + 32` inside the record.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
}

/// The eight vectors of unsigned codes of block `b` (of 32 inputs) in a group's records of
/// type `T` (vector `k`: values `4k..4k + 4` of the 16 rows), and the rows' scales of values
/// 0..16 and 16..32 and their mins (`m` for the 32-weight types, `dmin·n` for the k-quants).
///
/// # Safety
/// AVX-512 F/BW and F16C must be available; `recs` must hold the group's records up to block
/// `b`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
#[inline]
unsafe fn block<const T: u8>(
    recs: &[u8],
    b: usize,
) -> (
    [std::arch::x86_64::__m512i; 8],
    [std::arch::x86_64::__m512; 4],
) {
    use std::arch::x86_64::*;
    let f = format(T);
    let (rec, cb) = (f.record(), f.code_bytes());
    debug_assert!(recs.len() >= (b * 32 / f.per_record() + 1) * rec);
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_ps();
    // SAFETY: the record of block `b` lies in `recs` with the layout of `Format`.
    unsafe {
        let (p, s) = if f.kquant {
            (recs.as_ptr().add(b / 8 * rec), b % 8)
        } else {
            (recs.as_ptr().add(b * rec), 0)
        };
        let wp = p.add(s * cb);
        let mut w = [_mm512_setzero_si512(); 8];
        if f.bytes {
            for (k, v) in w.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(k * 64).cast());
            }
        } else {
            for c in 0..4 {
                let v = _mm512_loadu_si512(wp.add(c * 64).cast());
                w[2 * c] = _mm512_and_si512(v, low);
                w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            for plane in 0..f.planes {
                let bit = _mm512_set1_epi8(16 << plane);
                for (k, v) in w.iter_mut().enumerate() {
                    let mask = wp
                        .add(256 + 64 * plane + 8 * k)
                        .cast::<u64>()
                        .read_unaligned();
                    *v = _mm512_mask_add_epi8(*v, mask, *v, bit);
                }
            }
        }
        // Per-row scales of values 0..16 and 16..32, and mins.
        let d = halves(p.add(f.d_at()));
        let (mut d_lo, mut d_hi, mut m_lo, mut m_hi) = (d, d, zero, zero);
        if f.min {
            m_lo = halves(p.add(f.d_at() + 32));
            m_hi = m_lo;
        }
        if f.kquant {
            let sa = p.add(f.scales_at());
            let ma = sa.add(f.subs() * LANES);
            let (i_lo, i_hi) = if f.split { (2 * s, 2 * s + 1) } else { (s, s) };
            d_lo = _mm512_mul_ps(d, small_ints(sa.add(i_lo * LANES), f.signed));
            d_hi = if f.split {
                _mm512_mul_ps(d, small_ints(sa.add(i_hi * LANES), f.signed))
            } else {
                d_lo
            };
            if f.min {
                let dmin = m_lo;
                m_lo = _mm512_mul_ps(dmin, small_ints(ma.add(i_lo * LANES), false));
                m_hi = if f.split {
                    _mm512_mul_ps(dmin, small_ints(ma.add(i_hi * LANES), false))
                } else {
                    m_lo
                };
            }
        }
        (w, [d_lo, d_hi, m_lo, m_hi])
    }
}

/// 16 output rows against `N` quantized rows of `x` starting at `r0`, for records of block
/// type `T` ([`Format`]).
///
/// Every type comes down to eight 64-byte vectors of unsigned codes per block of 32: vector
/// `k` meets activations `4k..4k + 4`. Vectors 0..4 (values 0..16) and 4..8 are summed apart,
/// for the types with a scale per 16 weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn group_kernel<const N: usize, const T: u8>(
    recs: &[u8],
    xq: &QuantRows,
    r0: usize,
    in_f: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let f = format(T);
    let nb = in_f / 32;
    debug_assert!(recs.len() >= in_f / f.per_record() * f.record() && out.len() >= N * LANES);
    debug_assert!(xq.q.len() >= (r0 + N) * in_f && xq.d.len() >= (r0 + N) * nb);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY: the record of block `b` lies in `recs` with the layout of `Format`; row
        // `r0 + r` of `xq` has 32 values at `b * 32` and a scale and sums at `b`.
        unsafe {
            let (w, [d_lo, d_hi, m_lo, m_hi]) = block::<T>(recs, b);
            for (r, a) in acc.iter_mut().enumerate() {
                let row = r0 + r;
                let xp = xq.q.as_ptr().add(row * in_f + b * 32);
                let mut s_lo = _mm512_setzero_si512();
                let mut s_hi = _mm512_setzero_si512();
                for k in 0..4 {
                    s_lo = _mm512_dpbusd_epi32(s_lo, w[k], four(xp.add(4 * k)));
                    s_hi = _mm512_dpbusd_epi32(s_hi, w[k + 4], four(xp.add(16 + 4 * k)));
                }
                let dx = *xq.d.get_unchecked(row * nb + b);
                let sum = *xq.sum.get_unchecked(row * nb + b);
                let dxv = _mm512_set1_ps(dx);
                if f.split {
                    let lo = *xq.lo.get_unchecked(row * nb + b);
                    let hi = sum - lo;
                    if f.offset != 0 {
                        s_lo = _mm512_sub_epi32(s_lo, _mm512_set1_epi32(f.offset * lo));
                        s_hi = _mm512_sub_epi32(s_hi, _mm512_set1_epi32(f.offset * hi));
                    }
                    if f.min {
                        // − dmin·n·d_x·Σ q_x, per half.
                        *a = _mm512_fnmadd_ps(m_lo, _mm512_set1_ps(dx * lo as f32), *a);
                        *a = _mm512_fnmadd_ps(m_hi, _mm512_set1_ps(dx * hi as f32), *a);
                    }
                    let part = _mm512_mul_ps(_mm512_cvtepi32_ps(s_hi), _mm512_mul_ps(d_hi, dxv));
                    let both =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_lo), _mm512_mul_ps(d_lo, dxv), part);
                    *a = _mm512_add_ps(*a, both);
                } else {
                    let mut si = _mm512_add_epi32(s_lo, s_hi);
                    if f.offset != 0 {
                        // The codes carry an offset: take `o·Σ q_x` off.
                        si = _mm512_sub_epi32(si, _mm512_set1_epi32(f.offset * sum));
                    }
                    if f.min {
                        let ms = _mm512_set1_ps(if f.kquant {
                            dx * sum as f32
                        } else {
                            *xq.s.get_unchecked(row * nb + b)
                        });
                        *a = if f.kquant {
                            _mm512_fnmadd_ps(m_lo, ms, *a)
                        } else {
                            _mm512_fmadd_ps(m_lo, ms, *a)
                        };
                    }
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(d_lo, dxv), *a);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: `out` has LANES values for each of the N rows.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * LANES), *a) };
    }
}

/// 16 output rows against one f32 row `x`, for records of block type `T` ([`Format`]).
///
/// The codes, less their offset, are widened to f32 four rows at a time: 128-bit lane `i` of
/// quad `q` holds values `4k..4k + 4` of row `4q + i` and meets the same four values of `x`
/// broadcast to every lane. Each half block (16 values) is summed, scaled by its rows' scales
/// and added; the mins times the half's sum of `x` go to a vector of their own, and the four
/// lanes of each row are added at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn group_kernel_f32<const T: u8>(recs: &[u8], x: &[f32], in_f: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let f = format(T);
    let nb = in_f / 32;
    debug_assert!(recs.len() >= in_f / f.per_record() * f.record());
    debug_assert!(x.len() >= in_f && out.len() >= LANES);
    let zero = _mm512_setzero_ps();
    let mut acc = [zero; 4];
    let mut mins = zero;
    // Lane l of quad q belongs to row 4q + l / 4.
    let rows_of = |q: i32| {
        let b = 4 * q;
        _mm512_set_epi32(
            b + 3,
            b + 3,
            b + 3,
            b + 3,
            b + 2,
            b + 2,
            b + 2,
            b + 2,
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b,
            b,
            b,
            b,
        )
    };
    let idx = [rows_of(0), rows_of(1), rows_of(2), rows_of(3)];
    // Codes less the offset fit in a signed byte (Q8_0's wrap to q − 128 ∈ −128..127).
    let off = _mm512_set1_epi8(f.offset as u8 as i8);
    for b in 0..nb {
        // SAFETY: the group's records hold block `b`; `x` has 32 values at `b * 32`.
        unsafe {
            let (mut w, [d_lo, d_hi, m_lo, m_hi]) = block::<T>(recs, b);
            if f.offset != 0 {
                for v in w.iter_mut() {
                    *v = _mm512_sub_epi8(*v, off);
                }
            }
            for h in 0..2 {
                let xp = x.as_ptr().add(b * 32 + 16 * h);
                let (d, m) = if h == 0 { (d_lo, m_lo) } else { (d_hi, m_hi) };
                if f.min {
                    let xs = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_loadu_ps(xp)));
                    mins = if f.kquant {
                        _mm512_fnmadd_ps(m, xs, mins)
                    } else {
                        _mm512_fmadd_ps(m, xs, mins)
                    };
                }
                let xb = [0, 1, 2, 3].map(|k| _mm512_broadcast_f32x4(_mm_loadu_ps(xp.add(4 * k))));
                let wh = &w[4 * h..4 * h + 4];
                macro_rules! quad {
                    ($q:literal) => {{
                        let mut s = zero;
                        for k in 0..4 {
                            let c = _mm512_extracti32x4_epi32::<$q>(wh[k]);
                            let u = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
                            s = _mm512_fmadd_ps(u, xb[k], s);
                        }
                        acc[$q] = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(idx[$q], d), acc[$q]);
                    }};
                }
                quad!(0);
                quad!(1);
                quad!(2);
                quad!(3);
            }
        }
    }
    let mut lanes = [0f32; 64];
    let mut m = [0f32; LANES];
    // SAFETY: `lanes` has 64 values and `m` 16.
    unsafe {
        for (q, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * q), *a);
        }
        _mm512_storeu_ps(m.as_mut_ptr(), mins);
    }
    for (j, o) in out.iter_mut().take(LANES).enumerate() {
        let l = &lanes[4 * j..4 * j + 4];
        *o = ((l[0] + l[1]) + (l[2] + l[3])) + m[j];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use half::f16;

    /// Every block type the kernels handle.
    pub(crate) const TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// The real Gemma 3 270M Q4_K_M file: `$DELTATUNE_GEMMA3_GGUF`, else where `deltatune fetch`
    /// puts it in deltatune's cache; `None` (with a note) when absent, a panic when
    /// `DELTATUNE_REQUIRE_ASSETS=1`.
    pub(crate) fn gemma_file() -> Option<std::path::PathBuf> {
        let name = "gemma-3-270m-q4_k_m.gguf";
        let mut candidates = vec![];
        if let Some(p) = std::env::var_os("DELTATUNE_GEMMA3_GGUF") {
            candidates.push(std::path::PathBuf::from(p));
        }
        // deltatune's cache: $DELTATUNE_CACHE, else ~/.cache/deltatune (where `deltatune fetch`
        // puts it).
        let cache = std::env::var_os("DELTATUNE_CACHE")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".cache/deltatune"))
            });
        if let Some(c) = cache {
            candidates.push(c.join("models").join("gemma-3-270m").join(name));
        }
        let found = candidates.into_iter().find(|p| p.is_file());
        if found.is_none() {
            if std::env::var("DELTATUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
                panic!("{name} is missing: run `deltatune fetch`");
            }
            eprintln!(
                "NOTE: skipping the real-file check: {name} not found (set DELTATUNE_GEMMA3_GGUF)"
            );
        }
        found
    }

    /// Taking a block apart gives the codes and scales that rebuild candle's dequantized
    /// weights bit for bit, for every type.
    #[test]
    fn decoded_blocks_rebuild_candles_weights() {
        for dtype in TYPES {
            let t = type_code(dtype).unwrap();
            let f = format(t);
            let x = Tensor::randn(0f32, 1.0, (5, 512), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&x, dtype, "w").unwrap();
            let want: Vec<f32> = q
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (_, src) = q.raw();
            let per = f.per_record();
            let mut dec = Decoded {
                u: [0; 256],
                d: [0; 2],
                m: [0; 2],
                sc: [0; 16],
                mn: [0; 16],
            };
            let bits = match t {
                Q2_K => 2,
                Q3_K => 3,
                Q4_0 | Q4_1 | Q4_K => 4,
                Q5_0 | Q5_1 | Q5_K => 5,
                Q6_K => 6,
                _ => 8,
            };
            let mut top = 0u8;
            for (bi, blk) in src.chunks_exact(f.src).enumerate() {
                decode(t, blk, &mut dec);
                let d = f16::from_le_bytes(dec.d).to_f32();
                let m = f16::from_le_bytes(dec.m).to_f32();
                for k in 0..per {
                    assert!((dec.u[k] as u32) < 1 << bits, "{dtype:?}");
                    top = top.max(dec.u[k]);
                    let c = (dec.u[k] as i32 - f.offset) as f32;
                    let got = if f.kquant {
                        let i = if f.split { k / 16 } else { k / 32 };
                        let s = if f.signed {
                            dec.sc[i] as i8 as f32
                        } else {
                            dec.sc[i] as f32
                        };
                        d * s * c - m * dec.mn[i] as f32
                    } else if f.min {
                        c * d + m
                    } else {
                        c * d
                    };
                    let w = want[bi * per + k];
                    assert!(
                        got == w,
                        "{dtype:?} block {bi} value {k}: {got} from the codes, {w} from candle"
                    );
                }
            }
            // The highest bit is used (the codes are not all small).
            assert!(
                top as u32 >= 1 << (bits - 1),
                "{dtype:?}: codes up to {top} only"
            );
        }
    }

    /// The int8 product equals the dequantized matrix times the 8-bit-rounded activations (to
    /// f32 rounding), stays within the rounding's bound of the exact product, and gives every
    /// row the same bits alone and in any batch of 1 to 40 rows; for every block type, with
    /// an output size that leaves a partial group of 16 and batches that leave partial groups
    /// of 8 rows of `x`.
    #[test]
    fn int8_product_equals_the_product_with_rounded_activations() {
        if crate::ops::lacks_cpu_feature(int8_products_supported(), "AVX-512 VNNI") {
            return;
        }
        for dtype in TYPES {
            let (out_f, in_f) = (70, 512);
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize().unwrap().to_vec2().unwrap();
            let m = 40;
            let x: Vec<f32> = (0..m * in_f)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0 * (1.0 + (i / in_f) as f32))
                .collect();
            let (t, f) = (type_code(dtype).unwrap(), format(type_code(dtype).unwrap()));
            let xq = quantize_rows(&x, m, in_f, f.per_record());
            // Q4_1 / Q5_1: the block mins `m`, whose term takes llama.cpp's f16 `d·Σq` (`s`).
            let mins: Vec<f32> = if f.min && !f.kquant {
                let (_, src) = q.raw();
                let mut dec = Decoded {
                    u: [0; 256],
                    d: [0; 2],
                    m: [0; 2],
                    sc: [0; 16],
                    mn: [0; 16],
                };
                src.chunks_exact(f.src)
                    .map(|blk| {
                        decode(t, blk, &mut dec);
                        half::f16::from_le_bytes(dec.m).to_f32()
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let alone: Vec<Vec<f32>> = (0..m)
                .map(|r| forward(&x[r * in_f..(r + 1) * in_f], 1, &q).unwrap())
                .collect();
            for (r, y) in alone.iter().enumerate() {
                for o in 0..out_f {
                    let mut want = 0f64;
                    let mut exact = 0f64;
                    let mut bound = 0f64;
                    // Σ|terms|: the scale of the f32 rounding in a sum that may cancel.
                    let mut mag = 0f64;
                    for k in 0..in_f {
                        let d = xq.d[r * (in_f / 32) + k / 32] as f64;
                        let wk = dense[o][k] as f64;
                        want += wk * xq.q[r * in_f + k] as f64 * d;
                        mag += (wk * xq.q[r * in_f + k] as f64 * d).abs();
                        exact += wk * x[r * in_f + k] as f64;
                        bound += wk.abs() * d / 2.0;
                    }
                    for (b, &mb) in mins.iter().skip(o * in_f / 32).take(in_f / 32).enumerate() {
                        let i = r * (in_f / 32) + b;
                        let dsum = xq.d[i] as f64 * xq.sum[i] as f64;
                        want += mb as f64 * (xq.s[i] as f64 - dsum);
                        bound += (mb as f64 * (xq.s[i] as f64 - dsum)).abs();
                    }
                    let got = y[o] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + mag),
                        "{dtype:?} [{r}, {o}]: {got} vs {want} (sum of |terms| {mag})"
                    );
                    assert!(
                        (got - exact).abs() <= bound + 1e-4,
                        "{dtype:?} [{r}, {o}]: {got} vs exact {exact}, bound {bound}"
                    );
                }
            }
            for n in 1..=m {
                let y = forward(&x[..n * in_f], n, &q).unwrap();
                assert_eq!(y.len(), n * out_f);
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

    /// The f32 product from the packed records equals the dequantized matrix's product (to f32
    /// rounding: relative 1e-4 over 512-term sums) for every block type, Q4_1 and Q8_0 (which
    /// [`super::super::quant_dot`] expands itself) included, and a row's bits do not depend on
    /// its batch.
    #[test]
    fn f32_product_from_the_packed_records_equals_the_dequantized_product() {
        if crate::ops::lacks_cpu_feature(f32_products_supported(), "AVX-512 BW") {
            return;
        }
        let (out_f, in_f, m) = (37, 512, 11);
        for dtype in TYPES {
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize().unwrap().to_vec2().unwrap();
            let x: Vec<f32> = (0..m * in_f)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            let y = forward_f32(&x, m, &q).unwrap();
            for r in 0..m {
                let alone = forward_f32(&x[r * in_f..(r + 1) * in_f], 1, &q).unwrap();
                for o in 0..out_f {
                    let want: f64 = (0..in_f)
                        .map(|k| x[r * in_f + k] as f64 * dense[o][k] as f64)
                        .sum();
                    let got = y[r * out_f + o];
                    assert!(
                        (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dtype:?} [{r}, {o}]: {got} vs {want}"
                    );
                    assert_eq!(got.to_bits(), alone[o].to_bits(), "{dtype:?} [{r}, {o}]");
                }
            }
        }
    }

    /// Rounding the activations: values within half a step of the block's scale, the sums of
    /// the rounded values (whole block and first half), a zero block, and NaN carried into the
    /// scale.
    #[test]
    fn activations_round_to_the_nearest_step_of_their_block() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        let r = quantize_rows(&x, 1, 64, 32);
        // The codes from the f32 step; the scale kept as f16, as llama.cpp's Q8_0 / Q8_1 do,
        // and Q8_1's scaled sum `s` rounded to f16 from the f32 step.
        let step = 20.0 * 0.37f32 / 127.0;
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        assert_eq!(r.d[0], f16(step));
        assert_ne!(r.d[0], step);
        assert_eq!(r.s[0], f16(step * r.sum[0] as f32));
        assert_eq!(r.q[63], 0);
        assert_eq!(r.d[1], 0.0);
        assert_eq!(r.sum[0], r.q[..32].iter().map(|&v| v as i32).sum::<i32>());
        assert_eq!(r.lo[0], r.q[..16].iter().map(|&v| v as i32).sum::<i32>());
        assert_ne!(r.lo[0], r.sum[0]);
        assert!(r.q[..32].contains(&-127));
        for k in 0..32 {
            assert!((r.q[k] as f32 * step - x[k]).abs() <= step / 2.0 + 1e-6);
        }
        x[5] = f32::NAN;
        assert!(quantize_rows(&x, 1, 64, 32).d[0].is_nan());
    }

    /// For the k-quants the activations share a scale per 256 values, as llama.cpp's Q8_K:
    /// `q = round(x · 127 / max|x|)`, `d` the inverse factor, the same in the 8 blocks of 32,
    /// whose sums are kept apart.
    #[test]
    fn k_quant_activations_share_a_scale_per_256_values() {
        let mut x: Vec<f32> = (0..512)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.01)
            .collect();
        x[300] = -5.0;
        let r = quantize_rows(&x, 1, 512, 256);
        let inv0 = 127.0 / 0.48f32;
        assert!(r.d[..8].iter().all(|&d| d == 1.0 / inv0), "{:?}", &r.d[..8]);
        assert!(r.d[8..].iter().all(|&d| d == 1.0 / (127.0 / 5.0f32)));
        assert_eq!(r.q[300], -127);
        for k in 0..512 {
            let inv = if k < 256 { inv0 } else { 127.0 / 5.0 };
            assert_eq!(r.q[k], (x[k] * inv).round_ties_even() as i8, "value {k}");
        }
        for b in 0..16 {
            let qs = &r.q[32 * b..32 * b + 32];
            assert_eq!(r.sum[b], qs.iter().map(|&v| v as i32).sum::<i32>());
            assert_eq!(r.lo[b], qs[..16].iter().map(|&v| v as i32).sum::<i32>());
        }
        // A block of 32 with small values keeps its block of 256's scale.
        assert!(r.q[256..288].iter().all(|v| v.abs() < 20));
    }

    /// On the real Gemma 3 270M file (Q4_K, Q5_0, Q6_K and Q8_0 tensors): the int8 product of
    /// one tensor of each type is within the activations' rounding bound of the exact product
    /// by the dequantized weight, and rows do not depend on their batch.
    #[test]
    fn int8_product_on_the_real_gemma_tensors() {
        if crate::ops::lacks_cpu_feature(int8_products_supported(), "AVX-512 VNNI") {
            return;
        }
        let Some(path) = gemma_file() else { return };
        let file = crate::gguf::GgufFile::open(&path).unwrap();
        let mut types = vec![];
        for name in file.tensor_names() {
            let info = file.tensor_info(name).unwrap();
            if info.shape.rank() == 2
                && !types.contains(&info.ggml_dtype)
                && name != "token_embd.weight"
            {
                types.push(info.ggml_dtype);
                let q = file.quant_matrix(name).unwrap();
                check_real(&q);
            }
        }
        for want in [
            GgmlDType::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
        ] {
            assert!(
                types.contains(&want),
                "{path:?} has no {want:?} matrix: {types:?}"
            );
        }
    }

    fn check_real(q: &QuantMatrix) {
        let (out_f, in_f) = q.dims2();
        let dense: Vec<f32> = q
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let m = 5;
        let x: Vec<f32> = (0..m * in_f)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
            .collect();
        let per = format(type_code(q.dtype()).unwrap()).per_record();
        let xq = quantize_rows(&x, m, in_f, per);
        let y = forward(&x, m, q).unwrap();
        let f32_y = super::super::quant_dot::forward(&x, m, q).unwrap();
        for r in 0..m {
            let alone = forward(&x[r * in_f..(r + 1) * in_f], 1, q).unwrap();
            assert!(
                alone
                    .iter()
                    .zip(&y[r * out_f..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: row {r} alone and in a batch of {m}",
                q.name()
            );
            for o in 0..out_f {
                let wr = &dense[o * in_f..(o + 1) * in_f];
                let (mut exact, mut bound) = (0f64, 0f64);
                for k in 0..in_f {
                    exact += wr[k] as f64 * x[r * in_f + k] as f64;
                    bound += (wr[k] as f64).abs() * xq.d[r * (in_f / 32) + k / 32] as f64 / 2.0;
                }
                let got = y[r * out_f + o] as f64;
                assert!(
                    (got - exact).abs() <= bound + 1e-4 * (1.0 + exact.abs()),
                    "{} {} [{r}, {o}]: {got} vs exact {exact}, bound {bound}",
                    q.name(),
                    q.dtype_name()
                );
                let g32 = f32_y[r * out_f + o] as f64;
                assert!(
                    (g32 - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "{} {} f32 [{r}, {o}]: {g32} vs {exact}",
                    q.name(),
                    q.dtype_name()
                );
            }
        }
    }

    /// The products of one decoding step of the real Gemma 3 270M file and of SmolLM2-135M's
    /// Q4_1 file (every 2-D tensor once, the tied embedding as the head), summed, with 8-bit
    /// and f32 activations and by dequantizing blocks: `cargo test --release -p deltatune-core
    /// bench_token_products -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_token_products() {
        if !int8_products_supported() {
            return;
        }
        let smollm2 = std::env::var_os("DELTATUNE_CACHE").map(|c| {
            std::path::PathBuf::from(c)
                .join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        for path in gemma_file()
            .into_iter()
            .chain(smollm2.filter(|p| p.is_file()))
        {
            eprintln!("{}:", path.display());
            token_products(&path);
        }
    }

    fn token_products(path: &std::path::Path) {
        let file = crate::gguf::GgufFile::open(path).unwrap();
        let time = |f: &dyn Fn() -> Vec<f32>, reps: usize| {
            f();
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(f());
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        // (type, shape) -> (count, int8, f32, blocks) seconds at batch 1, int8 at batch 8.
        let mut rows: Vec<(String, usize, [f64; 4])> = vec![];
        for name in file.tensor_names() {
            let info = file.tensor_info(name).unwrap();
            if info.shape.rank() != 2 {
                continue;
            }
            let q = file.quant_matrix(name).unwrap();
            let key = format!("{} {:?}", q.dtype_name(), q.dims2());
            if let Some(r) = rows.iter_mut().find(|r| r.0 == key) {
                r.1 += 1;
                continue;
            }
            let (out_f, in_f) = q.dims2();
            let x: Vec<f32> = (0..8 * in_f)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let reps = (20_000_000 / (out_f * in_f)).max(1);
            let x1 = &x[..in_f];
            let t8 = time(&|| forward(x1, 1, &q).unwrap(), reps);
            let t32 = time(
                &|| super::super::quant_dot::forward(x1, 1, &q).unwrap(),
                reps,
            );
            let tb = time(
                &|| super::super::quant_linear::blocks_forward(x1, 1, &q, true, true),
                1,
            );
            let t8b = time(&|| forward(&x, 8, &q).unwrap(), reps);
            rows.push((key, 1, [t8, t32, tb, t8b]));
        }
        let mut total = [0f64; 4];
        for (key, n, t) in &rows {
            eprintln!(
                "{key} x{n}: int8 {:.1} us, f32 {:.1} us, dequantize blocks {:.1} us, int8 batch 8 {:.1} us",
                t[0] * 1e6,
                t[1] * 1e6,
                t[2] * 1e6,
                t[3] * 1e6
            );
            for i in 0..4 {
                total[i] += t[i] * *n as f64;
            }
        }
        eprintln!(
            "per token: int8 {:.2} ms, f32 {:.2} ms, dequantize blocks {:.2} ms; batch 8: int8 {:.2} ms",
            total[0] * 1e3,
            total[1] * 1e3,
            total[2] * 1e3,
            total[3] * 1e3
        );
    }

    /// Time the int8 product against the f32-expanding one and the block-dequantizing one on
    /// decoder-sized matrices (SmolLM2's Q4_1, Gemma 3 270M's Q4_K, Q6_K, Q5_0 and Q8_0 head):
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
            (GgmlDType::Q4K, 640, 2048),
            (GgmlDType::Q4K, 640, 1024),
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q5_0, 2048, 640),
            (GgmlDType::Q5_0, 1024, 640),
            (GgmlDType::Q8_0, 262144, 640),
        ] {
            let w = Tensor::randn(0f32, 1.0, (out_f, in_f), &Device::Cpu).unwrap();
            let q = QuantMatrix::quantize(&w, dtype, "w").unwrap();
            for m in [1usize, 8] {
                let x: Vec<f32> = (0..m * in_f).map(|i| (i % 13) as f32 - 6.0).collect();
                // The fastest of 5 runs (the machine may be shared).
                let reps = (80_000_000 / (out_f * in_f * m)).max(2);
                let time = |f: &dyn Fn() -> Vec<f32>| {
                    f();
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            for _ in 0..reps {
                                std::hint::black_box(f());
                            }
                            t.elapsed().as_secs_f64() / reps as f64
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                let t8 = time(&|| forward(&x, m, &q).unwrap());
                let t32 = time(&|| super::super::quant_dot::forward(&x, m, &q).unwrap());
                let tb =
                    time(&|| super::super::quant_linear::blocks_forward(&x, m, &q, true, true));
                eprintln!(
                    "{dtype:?} [{out_f}, {in_f}] m {m}: int8 {:.1} us, f32 {:.1} us, \
                     dequantize blocks {:.1} us (int8 {:.2}x, f32 {:.2}x faster)",
                    t8 * 1e6,
                    t32 * 1e6,
                    tb * 1e6,
                    tb / t8,
                    tb / t32
                );
            }
        }
    }
}
