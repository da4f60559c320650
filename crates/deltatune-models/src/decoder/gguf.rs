//! Loading a decoder GGUF file (llama.cpp's converter output; every family of
//! [`super::config::Family`]) as Hugging Face tensors: the config from the `<arch>.*`
//! metadata, every tensor under its Hugging Face key,
//! quantized matrices kept quantized, the tokenizer and the chat template.
//!
//! Two conventions differ between the formats and are undone here:
//!
//! * names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight` (see
//!   [`hf_name`]);
//! * q/k rows: llama.cpp applies rope to interleaved pairs `(x0, x1), (x2, x3), ...` while
//!   Hugging Face's Llama rotates halves (`rotate_half`), so the converter reorders the rows
//!   of `q_proj` and `k_proj` within each head: `w.reshape(n_head, 2, head_dim / 2, in)
//!   .swapaxes(1, 2).reshape(out, in)`. [`hf_rows_from_gguf`] is the inverse index map and
//!   the rows are moved back with [`QuantMatrix::permute_rows`] (whole quantized rows, no
//!   dequantization), so the loaded weights equal Hugging Face's.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use deltatune_core::error::nearest_names;
use deltatune_core::quant::ggml_type_name;
use deltatune_core::{Error, GgufFile, QuantMatrix, Result};

use super::config::{layer_flags, Activation, DecoderConfig, Family, Rope};
use super::model::tensor_specs;
use crate::gguf_tokenizer::tokenizer_from_gguf;

/// One weight: dense f32 (norms, and matrices stored as F32/F16/BF16) or quantized.
#[derive(Debug, Clone)]
pub enum GgufTensor {
    Dense(Tensor),
    Quant(QuantMatrix),
}

impl GgufTensor {
    /// The shape in row-major order (`[out, in]` for matrices).
    pub fn dims(&self) -> Vec<usize> {
        match self {
            GgufTensor::Dense(t) => t.dims().to_vec(),
            GgufTensor::Quant(q) => vec![q.rows(), q.cols()],
        }
    }

    /// A dense f32 copy (dequantizing a quantized matrix).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            GgufTensor::Dense(t) => Ok(t.clone()),
            GgufTensor::Quant(q) => q.dequantize(),
        }
    }
}

/// A decoder GGUF file loaded with Hugging Face names.
pub struct DecoderGguf {
    pub config: DecoderConfig,
    /// Hugging Face key -> weight.
    pub tensors: BTreeMap<String, GgufTensor>,
    pub tokenizer: tokenizers::Tokenizer,
    /// `tokenizer.chat_template` (Jinja), when the file has one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for DecoderGguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderGguf")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The Hugging Face key of a llama.cpp tensor name in a llama-architecture file (`None` for
/// names llama has no such parameter for). Other families map through
/// [`super::model::tensor_specs`].
pub fn hf_name(gguf: &str) -> Option<String> {
    let cfg = DecoderConfig {
        family: Family::Llama,
        vocab_size: 1,
        hidden_size: 2,
        intermediate_size: 1,
        num_layers: 0,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 2,
        rms_norm_eps: 1e-6,
        rope: Rope::plain(10_000.0),
        local_rope: None,
        sliding_window: None,
        sliding_layers: Vec::new(),
        max_position_embeddings: 1,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
        qkv_bias: false,
        o_bias: false,
        activation: Default::default(),
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
    };
    let (layer, rest) = match gguf.strip_prefix("blk.") {
        Some(r) => {
            let (l, part) = r.split_once('.')?;
            (Some(l.parse::<usize>().ok()?), format!("blk.0.{part}"))
        }
        None => (None, gguf.to_string()),
    };
    let cfg = DecoderConfig {
        num_layers: 1,
        ..cfg
    };
    let spec = tensor_specs(&cfg).into_iter().find(|s| s.gguf == rest)?;
    Some(match layer {
        Some(l) => spec
            .hf
            .replacen("model.layers.0.", &format!("model.layers.{l}."), 1),
        None => spec.hf,
    })
}

/// The rows of a GGUF q/k matrix in Hugging Face order: `hf[r] = gguf[map[r]]`, for `rows`
/// rows split into `n_head` heads. llama.cpp's converter stored
/// `gguf = hf.reshape(n_head, 2, half, in).swapaxes(1, 2).reshape(rows, in)` with
/// `half = rows / n_head / 2`, i.e. HF row `(h, j, i)` sits at GGUF row `(h, i, j)`.
pub fn hf_rows_from_gguf(rows: usize, n_head: usize) -> Result<Vec<usize>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(Error::Msg(format!(
            "cannot undo llama.cpp's rope permutation of {rows} rows over {n_head} heads: the \
             rows must split into heads of an even size"
        )));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (j, i) = (within / half, within % half);
            h * head_dim + 2 * i + j
        })
        .collect())
}

/// The [`DecoderConfig`] of a GGUF file (from `<arch>.*` and `tokenizer.ggml.*`, as
/// llama.cpp's converter writes them).
pub fn config_from_gguf(file: &GgufFile) -> Result<DecoderConfig> {
    let path = file.path();
    let bad = |msg: String| Error::MalformedConfig {
        path: path.to_path_buf(),
        msg,
    };
    let arch = file.architecture()?;
    let Some(family) = Family::from_gguf_arch(arch) else {
        return Err(bad(format!(
            "general.architecture is `{arch}`; deltatune loads the GGUF architectures {} \
             (Llama 2/3, SmolLM, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3)",
            Family::ALL.map(|f| f.name()).join(", ")
        )));
    };
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| file.metadata_u32(&key(k)).map(|v| v as usize);
    let u_opt = |k: &str| -> Result<Option<usize>> {
        Ok(file.metadata_u32_opt(&key(k))?.map(|v| v as usize))
    };
    let hidden_size = u("embedding_length")?;
    let num_heads = u("attention.head_count")?;
    let num_kv_heads = u_opt("attention.head_count_kv")?.unwrap_or(num_heads);
    let key_length = u_opt("attention.key_length")?;
    let value_length = u_opt("attention.value_length")?;
    let rope_dims = u_opt("rope.dimension_count")?;
    let head_dim = match (key_length, rope_dims) {
        (Some(k), _) => k,
        (None, Some(r)) => r,
        (None, None) => hidden_size / num_heads.max(1),
    };
    if let Some(r) = rope_dims {
        if r != head_dim {
            return Err(bad(format!(
                "{arch}.rope.dimension_count is {r} but the head size is {head_dim}: partial \
                 rotary embeddings are not supported"
            )));
        }
    }
    if let Some(v) = value_length {
        if v != head_dim {
            return Err(bad(format!(
                "{arch}.attention.value_length {v} differs from the key length {head_dim}: \
                 not supported"
            )));
        }
    }
    let theta = file
        .metadata_f64_opt(&key("rope.freq_base"))?
        .unwrap_or(10_000.0);
    let scaling = match file.metadata_str_opt(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = file.metadata_f64(&key("rope.scaling.factor"))?;
            Some(super::config::RopeScaling::Linear { factor })
        }
        Some(kind) => {
            return Err(bad(format!(
                "{arch}.rope.scaling.type is `{kind}`: only linear rope scaling is supported \
                 from GGUF"
            )))
        }
    };
    let rope = Rope {
        theta,
        scaling: scaling.filter(
            |s| !matches!(s, super::config::RopeScaling::Linear { factor } if *factor == 1.0),
        ),
    };
    let vocab_size = match u_opt("vocab_size")? {
        Some(v) => v,
        None => file.metadata_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let num_layers = u("block_count")?;
    let bos_token_id = file.metadata_u32_opt("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids = Vec::new();
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = file.metadata_u32_opt(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    // Gemma's end of turn: llama.cpp stops at it though older files do not list it.
    if family.norm_plus_one() {
        if let Ok(tokens) = file.metadata_str_array("tokenizer.ggml.tokens") {
            if let Some(id) = tokens.iter().position(|t| *t == "<end_of_turn>") {
                if !eos_token_ids.contains(&(id as u32)) {
                    eos_token_ids.push(id as u32);
                }
            }
        }
    }
    let sliding_window = u_opt("attention.sliding_window")?.filter(|&w| w > 0);
    // Which layers slide: llama.cpp fixes the pattern per architecture (Gemma 2: every other
    // layer from the first; Gemma 3: five of every six); Mistral and Phi-3 slide everywhere.
    let sliding_layers = match (family, sliding_window) {
        (_, None) => Vec::new(),
        (Family::Gemma2, Some(_)) => layer_flags(num_layers, |l| (l + 1) % 2 != 0),
        (Family::Gemma3, Some(_)) => {
            let p = u_opt("attention.sliding_window_pattern")?
                .unwrap_or(6)
                .max(1);
            layer_flags(num_layers, |l| (l + 1) % p != 0)
        }
        (_, Some(_)) => layer_flags(num_layers, |_| true),
    };
    let gemma = family.norm_plus_one();
    // llama.cpp scales Gemma's queries by 1/sqrt(hidden / heads) for the 27B models (46 and 62
    // layers) and by 1/sqrt(head_dim) otherwise, as their query_pre_attn_scalar says.
    let query_pre_attn_scalar = gemma.then(|| {
        if matches!(num_layers, 46 | 62) {
            (hidden_size / num_heads.max(1)) as f64
        } else {
            head_dim as f64
        }
    });
    let f_opt = |k: &str| file.metadata_f64_opt(&key(k));
    let cfg = DecoderConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: file.metadata_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope,
        // Gemma 3's local layers: `rope.freq_base_swa` (newer converters), else llama.cpp's
        // fixed 10,000.
        local_rope: match family {
            Family::Gemma3 => Some(Rope::plain(
                f_opt("rope.freq_base_swa")?.unwrap_or(10_000.0),
            )),
            _ => None,
        },
        sliding_window,
        sliding_layers,
        max_position_embeddings: u_opt("context_length")?.unwrap_or(2048),
        tie_word_embeddings: !file.has_tensor("output.weight"),
        bos_token_id,
        eos_token_ids,
        pad_token_id: file.metadata_u32_opt("tokenizer.ggml.padding_token_id")?,
        qkv_bias: file.has_tensor("blk.0.attn_q.bias"),
        o_bias: file.has_tensor("blk.0.attn_output.bias"),
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        query_pre_attn_scalar,
        attn_logit_softcapping: if family == Family::Gemma2 {
            f_opt("attn_logit_softcapping")?.filter(|&c| c > 0.0)
        } else {
            None
        },
        final_logit_softcapping: if family == Family::Gemma2 {
            f_opt("final_logit_softcapping")?.filter(|&c| c > 0.0)
        } else {
            None
        },
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// What the loader expects of one GGUF tensor.
struct Expected {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    /// Heads to undo the rope row permutation over (q: heads, k: kv heads).
    rope_heads: Option<usize>,
}

fn expected_tensors(cfg: &DecoderConfig) -> Vec<Expected> {
    // llama.cpp permutes q/k rows only for the llama architecture (interleaved rope); the
    // others use rotate-half rope as transformers does (llama.cpp's NEOX rope).
    let permuted = matches!(cfg.family, Family::Llama | Family::Mistral);
    tensor_specs(cfg)
        .into_iter()
        .map(|s| {
            let rope_heads = if !permuted || s.shape.len() != 2 {
                None
            } else if s.gguf.ends_with(".attn_q.weight") {
                Some(cfg.num_heads)
            } else if s.gguf.ends_with(".attn_k.weight") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            Expected {
                gguf: s.gguf,
                hf: s.hf,
                shape: s.shape,
                rope_heads,
            }
        })
        .collect()
}

/// Reads one tensor: 1-D and float-typed tensors as dense f32, quantized matrices as
/// [`QuantMatrix`], q/k rows put back in Hugging Face order.
fn load_tensor(file: &GgufFile, e: &Expected) -> Result<GgufTensor> {
    let path = file.path();
    let info = file.tensor_info(&e.gguf)?;
    let actual = info.shape.dims().to_vec();
    if actual != e.shape {
        return Err(Error::ShapeMismatch {
            key: format!("{} (GGUF `{}`)", e.hf, e.gguf),
            path: path.to_path_buf(),
            expected: e.shape.clone(),
            actual,
            hint: " (from the <arch>.* metadata: embedding_length, feed_forward_length, \
                   head_count, head_count_kv, vocab size); the file is inconsistent"
                .into(),
        });
    }
    let dense = actual.len() != 2
        || matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
    let q = file.tensor(&e.gguf)?;
    let weights_err = |msg: String| Error::Weights {
        path: path.to_path_buf(),
        msg: format!(
            "tensor `{}` ({}): {msg}",
            e.gguf,
            ggml_type_name(info.ggml_dtype)
        ),
    };
    let perm = match e.rope_heads {
        Some(heads) => {
            Some(hf_rows_from_gguf(e.shape[0], heads).map_err(|err| weights_err(err.to_string()))?)
        }
        None => None,
    };
    if dense {
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|err| weights_err(err.to_string()))?;
        if let Some(perm) = perm {
            let idx: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
            let idx = Tensor::from_vec(idx, perm.len(), &Device::Cpu)?;
            t = t.index_select(&idx, 0)?;
        }
        Ok(GgufTensor::Dense(t))
    } else {
        let m = QuantMatrix::from_qtensor(q, &e.hf).map_err(|err| weights_err(err.to_string()))?;
        Ok(GgufTensor::Quant(match perm {
            Some(perm) => m.permute_rows(&perm)?,
            None => m,
        }))
    }
}

/// Loads a decoder GGUF file: config, Hugging Face-named tensors (quantized
/// matrices stay quantized; q/k rows in Hugging Face order), tokenizer and chat template.
pub fn load_gguf(path: impl AsRef<Path>) -> Result<DecoderGguf> {
    let file = GgufFile::open(path.as_ref())?;
    load_gguf_from(&file)
}

/// [`load_gguf`] for an already opened file.
pub fn load_gguf_from(file: &GgufFile) -> Result<DecoderGguf> {
    let (config, tensors) = read_weights(file)?;
    let tokenizer = tokenizer_from_gguf(file)?;
    // The file's own template, else the family's (Gemma files from some converters have none).
    let chat_template = crate::gguf_tokenizer::chat_template_from_gguf(file)?;
    Ok(DecoderGguf {
        config,
        tensors,
        tokenizer,
        chat_template,
    })
}

/// The config and the Hugging Face-named tensors of a decoder GGUF file (no tokenizer).
pub fn read_weights(file: &GgufFile) -> Result<(DecoderConfig, BTreeMap<String, GgufTensor>)> {
    let path = file.path();
    let mut config = config_from_gguf(file)?;
    if file.has_tensor("rope_freqs.weight") {
        // Llama 3.1's frequency scaling as llama.cpp stores it: one divisor per frequency.
        let t = file.tensor("rope_freqs.weight")?;
        let factors: Vec<f32> = t
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(|e| Error::Weights {
                path: path.to_path_buf(),
                msg: format!("tensor `rope_freqs.weight`: {e}"),
            })?;
        if factors.len() != config.head_dim / 2
            || factors.iter().any(|f| !(f.is_finite() && *f > 0.0))
        {
            return Err(Error::MalformedConfig {
                path: path.to_path_buf(),
                msg: format!(
                    "`rope_freqs.weight` has {} factors; the rope needs {} positive ones \
                     (head_dim / 2)",
                    factors.len(),
                    config.head_dim / 2
                ),
            });
        }
        config.rope.scaling = Some(super::config::RopeScaling::Factors { factors });
    }
    // The expected-tensor list is sized by block_count: check it against the file first, so a
    // corrupt count is an error rather than an allocation of billions of entries.
    let layers_in_file = file
        .tensor_names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |l| l + 1);
    if config.num_layers > layers_in_file {
        return Err(Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: format!(
                "{}.block_count is {} but the file has tensors for {layers_in_file} layer(s) \
                 (blk.0 .. blk.{}): the header is corrupt or the file is truncated",
                config.family,
                config.num_layers,
                layers_in_file.saturating_sub(1)
            ),
        });
    }
    let expected = expected_tensors(&config);
    let mut known: std::collections::HashSet<&str> =
        expected.iter().map(|e| e.gguf.as_str()).collect();
    known.insert("rope_freqs.weight");
    let unexpected: Vec<&str> = file
        .tensor_names()
        .into_iter()
        .filter(|n| !known.contains(n))
        .collect();
    if !unexpected.is_empty() {
        let shown: Vec<&str> = unexpected.iter().take(8).copied().collect();
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: format!(
                "{} tensor(s) that a {} model with {} layers has no parameter for: {}{} \
                 (a different architecture under this name, or block_count is wrong)",
                unexpected.len(),
                config.family,
                config.num_layers,
                shown.join(", "),
                if unexpected.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        });
    }
    let mut tensors = BTreeMap::new();
    for e in &expected {
        if !file.has_tensor(&e.gguf) {
            return Err(Error::MissingTensor {
                key: format!("{} (Hugging Face `{}`)", e.gguf, e.hf),
                path: path.to_path_buf(),
                nearest: nearest_names(&e.gguf, file.tensor_names(), 5),
            });
        }
        tensors.insert(e.hf.clone(), load_tensor(file, e)?);
    }
    Ok((config, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    /// llama.cpp's permutation written literally with tensor ops.
    fn gguf_permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn rope_permutation_is_undone_exactly() {
        // 3 heads of size 8 (the 12-row case of k with 3 kv heads of 4 too).
        for (rows, heads) in [(24usize, 3usize), (12, 3), (8, 1)] {
            let hf = Tensor::arange(0f32, (rows * 32) as f32, &Device::Cpu)
                .unwrap()
                .reshape((rows, 32))
                .unwrap();
            let gguf = gguf_permute(&hf, heads);
            let map = hf_rows_from_gguf(rows, heads).unwrap();
            // Dense: index_select with the map.
            let idx = Tensor::new(
                map.iter().map(|&p| p as u32).collect::<Vec<_>>().as_slice(),
                &Device::Cpu,
            )
            .unwrap();
            let back = gguf.index_select(&idx, 0).unwrap();
            assert_eq!(
                back.to_vec2::<f32>().unwrap(),
                hf.to_vec2::<f32>().unwrap(),
                "{rows}/{heads}"
            );
            // Quantized: rows moved whole; quantization is per row, so exact.
            let hf_q = QuantMatrix::quantize(&hf, GgmlDType::Q8_0, "q").unwrap();
            let gguf_q = QuantMatrix::quantize(&gguf, GgmlDType::Q8_0, "q").unwrap();
            let back_q = gguf_q.permute_rows(&map).unwrap();
            assert_eq!(
                back_q.dequantize().unwrap().to_vec2::<f32>().unwrap(),
                hf_q.dequantize().unwrap().to_vec2::<f32>().unwrap()
            );
        }
        // Row 1 of head 0 in HF order (first half, i = 1) was GGUF row 2.
        assert_eq!(&hf_rows_from_gguf(8, 1).unwrap(), &[0, 2, 4, 6, 1, 3, 5, 7]);
        assert!(hf_rows_from_gguf(10, 3).is_err());
    }
}
