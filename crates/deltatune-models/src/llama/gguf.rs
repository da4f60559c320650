//! Loading a llama-architecture GGUF file (llama.cpp's converter output) as Hugging Face
//! tensors: the config from the `llama.*` metadata, every tensor under its Hugging Face key,
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

use super::config::LlamaConfig;
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

/// A llama GGUF file loaded with Hugging Face names.
pub struct LlamaGguf {
    pub config: LlamaConfig,
    /// Hugging Face key -> weight.
    pub tensors: BTreeMap<String, GgufTensor>,
    pub tokenizer: tokenizers::Tokenizer,
    /// `tokenizer.chat_template` (Jinja), when the file has one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for LlamaGguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaGguf")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The Hugging Face key of a llama.cpp tensor name (`None` for names llama has no such
/// parameter for).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
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

/// The [`LlamaConfig`] of a llama GGUF file (from `llama.*` and `tokenizer.ggml.*`).
pub fn llama_config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    let path = file.path();
    let bad = |msg: String| Error::MalformedConfig {
        path: path.to_path_buf(),
        msg,
    };
    let arch = file.architecture()?;
    if arch != "llama" {
        return Err(bad(format!(
            "general.architecture is `{arch}`; only `llama` GGUF files are supported \
             (SmolLM/SmolLM2, Llama 2, TinyLlama, ...)"
        )));
    }
    let u = |key: &str| file.metadata_u32(key).map(|v| v as usize);
    let hidden_size = u("llama.embedding_length")?;
    let num_heads = u("llama.attention.head_count")?;
    let num_kv_heads = match file.metadata_u32_opt("llama.attention.head_count_kv")? {
        Some(n) => n as usize,
        None => num_heads,
    };
    let key_length = file.metadata_u32_opt("llama.attention.key_length")?;
    let value_length = file.metadata_u32_opt("llama.attention.value_length")?;
    let rope_dims = file.metadata_u32_opt("llama.rope.dimension_count")?;
    let head_dim = match (key_length, rope_dims) {
        (Some(k), _) => k as usize,
        (None, Some(r)) => r as usize,
        (None, None) => hidden_size / num_heads.max(1),
    };
    if let Some(r) = rope_dims {
        if r as usize != head_dim {
            return Err(bad(format!(
                "llama.rope.dimension_count is {r} but the head size is {head_dim}: partial \
                 rotary embeddings are not supported"
            )));
        }
    }
    if let Some(v) = value_length {
        if v as usize != head_dim {
            return Err(bad(format!(
                "llama.attention.value_length {v} differs from the key length {head_dim}: \
                 not supported"
            )));
        }
    }
    if let Some(kind) = file.metadata_str_opt("llama.rope.scaling.type")? {
        if kind != "none" {
            return Err(bad(format!(
                "llama.rope.scaling.type is `{kind}`: rope scaling is not supported"
            )));
        }
    }
    let vocab_size = match file.metadata_u32_opt("llama.vocab_size")? {
        Some(v) => v as usize,
        None => file.metadata_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let bos_token_id = file.metadata_u32_opt("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = file.metadata_u32_opt(key)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: u("llama.feed_forward_length")?,
        num_layers: u("llama.block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: file.metadata_f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: file
            .metadata_f64_opt("llama.rope.freq_base")?
            .unwrap_or(10_000.0),
        max_position_embeddings: file
            .metadata_u32_opt("llama.context_length")?
            .map_or(2048, |v| v as usize),
        tie_word_embeddings: !file.has_tensor("output.weight"),
        bos_token_id,
        eos_token_ids,
        pad_token_id: file.metadata_u32_opt("tokenizer.ggml.padding_token_id")?,
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

fn expected_tensors(cfg: &LlamaConfig) -> Vec<Expected> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qw, kvw) = (cfg.num_heads * cfg.head_dim, cfg.kv_width());
    let mut list = vec![
        ("token_embd.weight".to_string(), vec![v, h], None),
        ("output_norm.weight".to_string(), vec![h], None),
    ];
    if !cfg.tie_word_embeddings {
        list.push(("output.weight".to_string(), vec![v, h], None));
    }
    for l in 0..cfg.num_layers {
        let b = |p: &str| format!("blk.{l}.{p}.weight");
        list.extend([
            (b("attn_norm"), vec![h], None),
            (b("ffn_norm"), vec![h], None),
            (b("attn_q"), vec![qw, h], Some(cfg.num_heads)),
            (b("attn_k"), vec![kvw, h], Some(cfg.num_kv_heads)),
            (b("attn_v"), vec![kvw, h], None),
            (b("attn_output"), vec![h, qw], None),
            (b("ffn_gate"), vec![f, h], None),
            (b("ffn_up"), vec![f, h], None),
            (b("ffn_down"), vec![h, f], None),
        ]);
    }
    list.into_iter()
        .map(|(gguf, shape, rope_heads)| Expected {
            hf: hf_name(&gguf).expect("every expected name maps"),
            gguf,
            shape,
            rope_heads,
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
            hint: " (from the llama.* metadata: embedding_length, feed_forward_length, \
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

/// Loads a llama-architecture GGUF file: config, Hugging Face-named tensors (quantized
/// matrices stay quantized; q/k rows in Hugging Face order), tokenizer and chat template.
pub fn load_llama_gguf(path: impl AsRef<Path>) -> Result<LlamaGguf> {
    let file = GgufFile::open(path.as_ref())?;
    load_llama_from(&file)
}

/// [`load_llama_gguf`] for an already opened file.
pub fn load_llama_from(file: &GgufFile) -> Result<LlamaGguf> {
    let path = file.path();
    let config = llama_config_from_gguf(file)?;
    if file.has_tensor("rope_freqs.weight") {
        return Err(Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: "the file has `rope_freqs.weight` (Llama 3.1-style rope frequency scaling), \
                  which deltatune's llama does not implement"
                .into(),
        });
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
                "llama.block_count is {} but the file has tensors for {layers_in_file} layer(s) \
                 (blk.0 .. blk.{}): the header is corrupt or the file is truncated",
                config.num_layers,
                layers_in_file.saturating_sub(1)
            ),
        });
    }
    let expected = expected_tensors(&config);
    let known: std::collections::HashSet<&str> = expected.iter().map(|e| e.gguf.as_str()).collect();
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
                "{} tensor(s) that a llama model with {} layers has no parameter for: {}{} \
                 (a different architecture labelled llama, or block_count is wrong)",
                unexpected.len(),
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
    let tokenizer = tokenizer_from_gguf(file)?;
    let chat_template = file
        .metadata_str_opt("tokenizer.chat_template")?
        .map(str::to_string);
    Ok(LlamaGguf {
        config,
        tensors,
        tokenizer,
        chat_template,
    })
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
