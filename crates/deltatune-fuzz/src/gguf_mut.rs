//! GGUF seeds built in code (tiny llama models with a byte-level BPE tokenizer in the
//! metadata, which `deltatune generate` can load) and field-aware mutations: a walk over a seed
//! records where each count, string length, array length, value type, dimension, ggml type and
//! data offset sits, and mutations rewrite those fields with values that lie.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use deltatune_core::Rng;

use crate::mutate::{bytes_once, pick, stack_depth, INTERESTING_U32, INTERESTING_U64};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Version,
    Count,
    StrLen,
    ValueType,
    ArrayType,
    ArrayLen,
    Scalar,
    NDims,
    Dim,
    GgmlType,
    Offset,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    pos: usize,
    width: usize,
    kind: Kind,
}

/// Walks a GGUF (v2/v3) file as far as it is well formed, recording its fields.
fn fields(b: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let rd = |pos: usize, w: usize| -> Option<u64> {
        let s = b.get(pos..pos.checked_add(w)?)?;
        Some(if w == 4 {
            u32::from_le_bytes(s.try_into().ok()?) as u64
        } else {
            u64::from_le_bytes(s.try_into().ok()?)
        })
    };
    macro_rules! field {
        ($w:expr, $k:expr) => {{
            let v = match rd(pos, $w) {
                Some(v) => v,
                None => return out,
            };
            out.push(Field {
                pos,
                width: $w,
                kind: $k,
            });
            pos += $w;
            v
        }};
    }
    pos += 4; // magic
    field!(4, Kind::Version);
    let n_tensors = field!(8, Kind::Count);
    let n_kv = field!(8, Kind::Count);
    fn skip_value(
        b: &[u8],
        pos: &mut usize,
        ty: u64,
        out: &mut Vec<Field>,
        depth: usize,
    ) -> Option<()> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                out.push(Field {
                    pos: *pos,
                    width: 8,
                    kind: Kind::StrLen,
                });
                let n = u64::from_le_bytes(b.get(*pos..*pos + 8)?.try_into().ok()?);
                *pos = pos.checked_add(8)?.checked_add(usize::try_from(n).ok()?)?;
                return (*pos <= b.len()).then_some(());
            }
            9 if depth < 4 => {
                out.push(Field {
                    pos: *pos,
                    width: 4,
                    kind: Kind::ArrayType,
                });
                let et = u32::from_le_bytes(b.get(*pos..*pos + 4)?.try_into().ok()?) as u64;
                out.push(Field {
                    pos: *pos + 4,
                    width: 8,
                    kind: Kind::ArrayLen,
                });
                let n = u64::from_le_bytes(b.get(*pos + 4..*pos + 12)?.try_into().ok()?);
                *pos += 12;
                // Record only the first few elements' fields (token lists are long).
                let before = out.len();
                for i in 0..n {
                    skip_value(b, pos, et, out, depth + 1)?;
                    if i > 8 {
                        out.truncate(before + 16);
                    }
                }
                return Some(());
            }
            _ => return None,
        };
        if size >= 4 {
            out.push(Field {
                pos: *pos,
                width: size,
                kind: Kind::Scalar,
            });
        }
        *pos = pos.checked_add(size)?;
        (*pos <= b.len()).then_some(())
    }
    for _ in 0..n_kv.min(10_000) {
        let klen = field!(8, Kind::StrLen);
        pos = match usize::try_from(klen).ok().and_then(|k| pos.checked_add(k)) {
            Some(p) if p <= b.len() => p,
            _ => return out,
        };
        let ty = field!(4, Kind::ValueType);
        if skip_value(b, &mut pos, ty, &mut out, 0).is_none() {
            return out;
        }
    }
    for _ in 0..n_tensors.min(10_000) {
        let nlen = field!(8, Kind::StrLen);
        pos = match usize::try_from(nlen).ok().and_then(|k| pos.checked_add(k)) {
            Some(p) if p <= b.len() => p,
            _ => return out,
        };
        let nd = field!(4, Kind::NDims);
        for _ in 0..nd.min(8) {
            field!(8, Kind::Dim);
        }
        field!(4, Kind::GgmlType);
        field!(8, Kind::Offset);
    }
    out
}

fn lie(rng: &mut Rng, f: Field, old: u64, file_len: u64) -> u64 {
    let generic = |rng: &mut Rng| -> u64 {
        if f.width == 4 {
            *pick(rng, INTERESTING_U32) as u64
        } else {
            *pick(rng, INTERESTING_U64)
        }
    };
    match (f.kind, rng.below(3)) {
        (_, 0) => generic(rng),
        (Kind::Version, _) => rng.below(5) as u64,
        (Kind::ValueType | Kind::ArrayType, _) => rng.below(14) as u64,
        (Kind::GgmlType, _) => rng.below(42) as u64,
        (Kind::NDims, _) => rng.below(6) as u64,
        (Kind::Offset, _) => match rng.below(4) {
            0 => old.wrapping_add(1),
            1 => old.wrapping_add(32),
            2 => file_len,
            _ => 0,
        },
        (Kind::Scalar, _) => match rng.below(4) {
            0 => 0,
            1 => old.wrapping_mul(2),
            2 => old / 2,
            _ => old.wrapping_add(1),
        },
        _ => match rng.below(5) {
            0 => old.wrapping_add(1),
            1 => old.wrapping_sub(1),
            2 => old.wrapping_mul(2),
            3 => file_len,
            _ => 0,
        },
    }
}

/// One case: field lies, byte edits inside the header, truncation.
pub fn case(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = pick(rng, seeds).clone();
    let fs = fields(&out);
    let header_end = fs.last().map_or(64, |f| f.pos + f.width);
    for _ in 0..stack_depth(rng) {
        if !fs.is_empty() && rng.below(3) != 0 && out.len() >= header_end {
            let f = *pick(rng, &fs);
            let old = if f.width == 4 {
                u32::from_le_bytes(out[f.pos..f.pos + 4].try_into().unwrap()) as u64
            } else {
                u64::from_le_bytes(out[f.pos..f.pos + 8].try_into().unwrap())
            };
            let v = lie(rng, f, old, out.len() as u64);
            if f.width == 4 {
                out[f.pos..f.pos + 4].copy_from_slice(&(v as u32).to_le_bytes());
            } else {
                out[f.pos..f.pos + 8].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            bytes_once(rng, &mut out, seeds, header_end);
        }
    }
    out
}

/// Options of a seed model.
pub struct SeedOpts {
    pub layers: usize,
    pub tied: bool,
    /// Type of the matrices (F32, F16, Q8_0, Q4_1, Q4K).
    pub matrix: GgmlDType,
    pub bos_eos: bool,
}

/// A tiny llama GGUF that `Decoder::load` accepts: hidden 64 (256 for K-quants, whose
/// blocks span 256 values), 2 heads, 1 kv head, ffn = hidden, a 20-token byte-level BPE
/// vocabulary with special and user-defined tokens.
pub fn seed(o: &SeedOpts) -> anyhow::Result<Vec<u8>> {
    let h = if o.matrix.block_size() > 32 { 256 } else { 64 };
    let (ffn, heads, kv) = (h, 2usize, 1usize);
    let head_dim = h / heads;
    let tokens: Vec<&str> = vec![
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "1",
        "2",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "<tool>",
    ];
    let vocab = tokens.len();
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, _)| {
            Value::I32(match i {
                0..=2 => 3,
                19 => 4,
                _ => 1,
            })
        })
        .collect();
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"];
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("fuzz-seed".into())),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.embedding_length".into(), Value::U32(h as u32)),
        ("llama.block_count".into(), Value::U32(o.layers as u32)),
        ("llama.feed_forward_length".into(), Value::U32(ffn as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(kv as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(head_dim as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ];
    if o.bos_eos {
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)));
        meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)));
    }
    let mut rng = Rng::new(o.layers as u64 * 7 + o.tied as u64);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType| -> anyhow::Result<()> {
        let t: Tensor = rng.normal_tensor(shape, 0.02)?;
        let t = if shape.len() == 1 { (t + 1.0)? } else { t };
        let q = QTensor::quantize(&t, dtype)?;
        tensors.push((name, q));
        Ok(())
    };
    add("token_embd.weight".into(), &[vocab, h], GgmlDType::F32)?;
    add("output_norm.weight".into(), &[h], GgmlDType::F32)?;
    if !o.tied {
        add("output.weight".into(), &[vocab, h], GgmlDType::F32)?;
    }
    for l in 0..o.layers {
        let b = |p: &str| format!("blk.{l}.{p}.weight");
        add(b("attn_norm"), &[h], GgmlDType::F32)?;
        add(b("ffn_norm"), &[h], GgmlDType::F32)?;
        add(b("attn_q"), &[heads * head_dim, h], o.matrix)?;
        add(b("attn_k"), &[kv * head_dim, h], o.matrix)?;
        add(b("attn_v"), &[kv * head_dim, h], o.matrix)?;
        add(b("attn_output"), &[h, heads * head_dim], o.matrix)?;
        add(b("ffn_gate"), &[ffn, h], o.matrix)?;
        add(b("ffn_up"), &[ffn, h], o.matrix)?;
        add(b("ffn_down"), &[h, ffn], o.matrix)?;
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &t_refs)?;
    Ok(buf.into_inner())
}

/// The seeds: one and two layers, tied and untied heads, F32/F16/Q8_0/Q4_1/Q4_K matrices.
pub fn seeds() -> anyhow::Result<Vec<Vec<u8>>> {
    let mut v = Vec::new();
    for (layers, tied, matrix, bos_eos) in [
        (1, true, GgmlDType::Q8_0, false),
        (1, false, GgmlDType::Q4_1, true),
        (2, true, GgmlDType::F16, false),
        (1, true, GgmlDType::Q4K, false),
        (1, true, GgmlDType::F32, true),
    ] {
        v.push(seed(&SeedOpts {
            layers,
            tied,
            matrix,
            bos_eos,
        })?);
    }
    Ok(v)
}
