//! The check every tensor read passes through: no NaN and no infinity in weights.
//!
//! A NaN in an adapter's `lora_B` makes every logit NaN, and an argmax over NaN answers class 0
//! with a nonsense probability; an infinity in `lora_A` gives plausible but wrong answers. So
//! each reader (safetensors through [`crate::Weights::load`], GGUF through
//! [`crate::GgufFile::tensor`], ONNX through [`crate::OnnxModel::tensor`]) scans what it read
//! and refuses a non-finite value with [`Error::NonFinite`], naming the file and the tensor.
//!
//! The scan is cheap: the largest exponent field of a chunk (a vectorised max over the bits)
//! tells whether any value in it is NaN or infinite; only then are the values counted. A
//! quantized GGUF block is finite when its f16 scales (and mins) are: its integer codes
//! multiply those, so the scales are checked instead of dequantizing the weights.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Storage, Tensor};

use crate::{Error, Result};

/// What a scan found: how many NaN and infinite values, and where the first one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub nan: usize,
    pub inf: usize,
    /// Index of the first non-finite value (in the values scanned, or the block for GGUF).
    pub first: usize,
    /// How many values (or blocks) were scanned.
    pub of: usize,
}

impl NonFinite {
    /// "3 NaN and 1 infinite among its 4096 values (the first at index 17)".
    pub fn describe(&self, unit: &str) -> String {
        let what = match (self.nan, self.inf) {
            (n, 0) => format!("{n} NaN"),
            (0, i) => format!("{i} infinite"),
            (n, i) => format!("{n} NaN and {i} infinite"),
        };
        format!(
            "{what} among its {} {unit} (the first at index {})",
            self.of, self.first
        )
    }
}

const F32_EXP: u32 = 0x7f80_0000;
const F16_EXP: u16 = 0x7c00;
const BF16_EXP: u16 = 0x7f80;
const CHUNK: usize = 4096;

/// Counts the non-finite values among `n` values whose exponent field (under `exp`) is full,
/// starting the count at the chunk that has one.
fn count<T: Copy>(v: &[T], bits: impl Fn(T) -> u32, exp: u32, mantissa: u32) -> Option<NonFinite> {
    // The fast pass: the max of `bits & exp` over a chunk equals `exp` only if some value in
    // it has a full exponent (NaN or infinity). A max over u32 lanes vectorises.
    let start = v
        .chunks(CHUNK)
        .position(|c| c.iter().map(|&x| bits(x) & exp).max() == Some(exp))?;
    let mut found = NonFinite {
        nan: 0,
        inf: 0,
        first: usize::MAX,
        of: v.len(),
    };
    for (i, &x) in v.iter().enumerate().skip(start * CHUNK) {
        let b = bits(x);
        if b & exp == exp {
            if b & mantissa != 0 {
                found.nan += 1;
            } else {
                found.inf += 1;
            }
            found.first = found.first.min(i);
        }
    }
    Some(found)
}

/// Scans f32 values.
pub fn scan_f32(v: &[f32]) -> Option<NonFinite> {
    count(v, f32::to_bits, F32_EXP, 0x007f_ffff)
}

/// Scans f64 values.
pub fn scan_f64(v: &[f64]) -> Option<NonFinite> {
    // Exponent of f64 in the high word.
    count(v, |x| (x.to_bits() >> 32) as u32, 0x7ff0_0000, 0x000f_ffff)
        .map(|mut f| {
            // A high word with a full exponent and zero mantissa bits may still be NaN by its
            // low word: recount exactly (rare path).
            f.nan = v.iter().filter(|x| x.is_nan()).count();
            f.inf = v.iter().filter(|x| x.is_infinite()).count();
            f
        })
        .filter(|f| f.nan + f.inf > 0)
}

/// Scans IEEE half-precision values given as their bits.
pub fn scan_f16_bits(v: &[u16]) -> Option<NonFinite> {
    count(v, u32::from, u32::from(F16_EXP), 0x03ff)
}

/// Scans bfloat16 values given as their bits.
pub fn scan_bf16_bits(v: &[u16]) -> Option<NonFinite> {
    count(v, u32::from, u32::from(BF16_EXP), 0x007f)
}

/// Scans a tensor's values (integer tensors are always finite). A contiguous f32 tensor on the
/// CPU is scanned in place; others are copied to the CPU first.
pub fn scan_tensor(t: &Tensor) -> Result<Option<NonFinite>> {
    if t.dtype().is_int() {
        return Ok(None);
    }
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            let (a, b) = layout
                .contiguous_offsets()
                .expect("a contiguous tensor has offsets");
            return Ok(match t.dtype() {
                DType::F32 => scan_f32(&cpu.as_slice::<f32>()?[a..b]),
                DType::F64 => scan_f64(&cpu.as_slice::<f64>()?[a..b]),
                DType::F16 => {
                    let v = &cpu.as_slice::<half::f16>()?[a..b];
                    let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                    scan_f16_bits(&bits)
                }
                DType::BF16 => {
                    let v = &cpu.as_slice::<half::bf16>()?[a..b];
                    let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                    scan_bf16_bits(&bits)
                }
                _ => {
                    drop(storage);
                    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    scan_f32(&v)
                }
            });
        }
    }
    let v = t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(scan_f32(&v))
}

/// What to do about a non-finite tensor in the file at `path`, by the kind of file it is.
pub fn replace_hint(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name {
        "adapter_model.safetensors" => {
            "the adapter is damaged, or the run that trained it diverged: copy it again from \
             where it came from, or train it again (a run whose loss turns NaN stops with an \
             error, so a finished deltatune run never saves one)"
        }
        "tensors.safetensors" => {
            "the checkpoint is damaged: `deltatune train --resume` falls back to the checkpoint \
             before it"
        }
        "subspace.safetensors" => {
            "the subspace artifact is damaged: compute it again with `deltatune subspace`"
        }
        _ => {
            "the model file is damaged: fetch it again (`deltatune fetch` for the default \
             models) or download it again from its source"
        }
    }
}

/// The error for tensor `key` of the file at `path` holding non-finite values.
pub fn non_finite_error(path: &Path, key: &str, found: &NonFinite, unit: &str) -> Error {
    Error::NonFinite {
        path: path.to_path_buf(),
        key: key.to_string(),
        found: found.describe(unit),
        hint: replace_hint(path).to_string(),
    }
}

/// Refuses tensor `key` of the file at `path` when it holds a NaN or an infinity.
pub fn check_tensor(path: &Path, key: &str, t: &Tensor) -> Result<()> {
    match scan_tensor(t)? {
        Some(found) => Err(non_finite_error(path, key, &found, "values")),
        None => Ok(()),
    }
}

/// Refuses values read for tensor `key` of the file at `path` when one is NaN or infinite.
pub fn check_f32(path: &Path, key: &str, v: &[f32]) -> Result<()> {
    match scan_f32(v) {
        Some(found) => Err(non_finite_error(path, key, &found, "values")),
        None => Ok(()),
    }
}

/// The byte offsets of the f16 scale fields within one block of a quantized ggml type, and the
/// block's size in bytes; `None` for the float types (scanned whole) and unknown types.
fn block_scales(dtype: GgmlDType) -> Option<(usize, &'static [usize])> {
    Some(match dtype {
        // d, then codes.
        GgmlDType::Q4_0 => (18, &[0]),
        GgmlDType::Q5_0 => (22, &[0]),
        GgmlDType::Q8_0 => (34, &[0]),
        // d and m (or s), then codes.
        GgmlDType::Q4_1 => (20, &[0, 2]),
        GgmlDType::Q5_1 => (24, &[0, 2]),
        GgmlDType::Q8_1 => (36, &[0, 2]),
        // scales[16], qs[64], d, dmin.
        GgmlDType::Q2K => (84, &[80, 82]),
        // hmask[32], qs[64], scales[12], d.
        GgmlDType::Q3K => (110, &[108]),
        // d, dmin, scales[12], qs[128].
        GgmlDType::Q4K => (144, &[0, 2]),
        // d, dmin, scales[12], qh[32], qs[128].
        GgmlDType::Q5K => (176, &[0, 2]),
        // ql[128], qh[64], scales[16], d.
        GgmlDType::Q6K => (210, &[208]),
        _ => return None,
    })
}

/// Scans the raw bytes of a GGUF tensor of type `dtype`: every value of an F32, F16 or BF16
/// tensor, the f16 scales of each block of a quantized one (its values are finite exactly when
/// those are: the integer codes only multiply them). `unit` says what the counts are of.
pub fn scan_ggml(dtype: GgmlDType, data: &[u8]) -> Option<(NonFinite, &'static str)> {
    let halves = |d: &[u8]| -> Vec<u16> {
        d.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    match dtype {
        GgmlDType::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            scan_f32(&v).map(|f| (f, "values"))
        }
        GgmlDType::F16 => scan_f16_bits(&halves(data)).map(|f| (f, "values")),
        GgmlDType::BF16 => scan_bf16_bits(&halves(data)).map(|f| (f, "values")),
        GgmlDType::Q8K => {
            // d is an f32 at the start of each 292-byte block.
            let v: Vec<f32> = data
                .chunks_exact(292)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            scan_f32(&v).map(|f| (f, "block scales"))
        }
        q => {
            let (size, offsets) = block_scales(q)?;
            let blocks = data.len() / size;
            let mut scales = Vec::with_capacity(blocks * offsets.len());
            for b in data.chunks_exact(size) {
                for &o in offsets {
                    scales.push(u16::from_le_bytes([b[o], b[o + 1]]));
                }
            }
            scan_f16_bits(&scales).map(|mut f| {
                f.first /= offsets.len();
                f.of = blocks;
                (f, "block scales")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_inf_anywhere_and_counts_them() {
        let mut v = vec![0.5f32; 10_000];
        assert_eq!(scan_f32(&v), None);
        v[9_000] = f32::NAN;
        v[9_001] = f32::NEG_INFINITY;
        v[9_999] = f32::INFINITY;
        let f = scan_f32(&v).unwrap();
        assert_eq!((f.nan, f.inf, f.first, f.of), (1, 2, 9_000, 10_000));
        assert_eq!(
            f.describe("values"),
            "1 NaN and 2 infinite among its 10000 values (the first at index 9000)"
        );
        // The largest finite values and subnormals are finite.
        assert_eq!(scan_f32(&[f32::MAX, f32::MIN, 1e-45, -0.0]), None);
        assert_eq!(scan_f64(&[f64::MAX, 1.0]), None);
        assert_eq!(scan_f64(&[1.0, f64::NAN]).unwrap().nan, 1);
    }

    #[test]
    fn half_types_are_scanned_by_their_bits() {
        let h = |x: f32| half::f16::from_f32(x).to_bits();
        assert_eq!(scan_f16_bits(&[h(1.0), h(65504.0), h(-2.0)]), None);
        let f = scan_f16_bits(&[h(1.0), h(f32::NAN), h(f32::INFINITY)]).unwrap();
        assert_eq!((f.nan, f.inf, f.first), (1, 1, 1));
        let b = |x: f32| half::bf16::from_f32(x).to_bits();
        assert_eq!(scan_bf16_bits(&[b(3e38), b(-1.0)]), None);
        assert_eq!(scan_bf16_bits(&[b(f32::NEG_INFINITY)]).unwrap().inf, 1);
    }

    #[test]
    fn tensors_of_every_float_type_are_checked_in_place_or_copied() {
        let p = Path::new("/m/adapter_model.safetensors");
        let ok = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        check_tensor(p, "w", &ok).unwrap();
        let bad = Tensor::new(&[1f32, f32::NAN, 3.0], &Device::Cpu).unwrap();
        let e = check_tensor(p, "base_model.x.lora_B.weight", &bad)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "tensor `base_model.x.lora_B.weight` in /m/adapter_model.safetensors holds 1 NaN \
             among its 3 values (the first at index 1): the adapter is damaged, or the run that trained \
             it diverged: copy it again from where it came from, or train it again (a run whose \
             loss turns NaN stops with an error, so a finished deltatune run never saves one)"
        );
        // A view with an offset: only its own values count.
        let t = Tensor::new(&[f32::NAN, 1.0, 2.0], &Device::Cpu).unwrap();
        assert!(scan_tensor(&t.narrow(0, 1, 2).unwrap()).unwrap().is_none());
        for dt in [DType::F16, DType::BF16, DType::F64] {
            let t = bad.to_dtype(dt).unwrap();
            assert_eq!(scan_tensor(&t).unwrap().unwrap().nan, 1, "{dt:?}");
            assert!(scan_tensor(&ok.to_dtype(dt).unwrap()).unwrap().is_none());
        }
        // Transposed (not contiguous).
        let m = Tensor::new(&[[1f32, f32::INFINITY], [0.0, 1.0]], &Device::Cpu).unwrap();
        assert_eq!(scan_tensor(&m.t().unwrap()).unwrap().unwrap().inf, 1);
        let ints = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(scan_tensor(&ints).unwrap().is_none());
    }

    #[test]
    fn quantized_blocks_are_checked_by_their_scales() {
        let w: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = Tensor::from_vec(w, (2, 256), &Device::Cpu).unwrap();
        for dt in [
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
            GgmlDType::F16,
            GgmlDType::F32,
            GgmlDType::BF16,
        ] {
            let q = QTensor::quantize(&t, dt).unwrap();
            let mut data = q.data().unwrap().to_vec();
            assert_eq!(scan_ggml(dt, &data), None, "{dt:?}");
            if let Some((size, offsets)) = block_scales(dt) {
                assert_eq!(size, dt.type_size(), "{dt:?}");
                // The last block's first scale becomes NaN (f16 0x7e00).
                let at = data.len() - size + offsets[0];
                data[at..at + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
                let blocks = data.len() / size;
                let (f, unit) = scan_ggml(dt, &data).unwrap();
                assert_eq!(
                    (f.nan, f.first, f.of, unit),
                    (1, blocks - 1, blocks, "block scales")
                );
                // Dequantizing that block does give NaN: the check is not stricter than needed.
                let back = candle_core::quantized::QTensor::new(
                    candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Owned(data.clone()),
                        &Device::Cpu,
                        dt,
                    )
                    .unwrap(),
                    (2, 256),
                )
                .unwrap();
                let v = back.dequantize(&Device::Cpu).unwrap();
                assert!(scan_tensor(&v).unwrap().is_some(), "{dt:?}");
            } else {
                let n = data.len();
                // The last value's top byte(s) set to a NaN or infinity pattern.
                match dt {
                    GgmlDType::F32 => data[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes()),
                    GgmlDType::F16 => data[n - 2..].copy_from_slice(&0x7c00u16.to_le_bytes()),
                    _ => data[n - 2..].copy_from_slice(&0x7f80u16.to_le_bytes()),
                }
                let (f, unit) = scan_ggml(dt, &data).unwrap();
                assert_eq!((f.nan + f.inf, f.first, unit), (1, 511, "values"), "{dt:?}");
            }
        }
    }
}
