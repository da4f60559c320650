//! Llama-architecture configuration: the serde mirror of Hugging Face's `config.json`
//! (`LlamaConfig`) and the plain struct the model uses. GGUF files give the same struct from
//! their `llama.*` metadata (see [`super::gguf`]).

use std::path::Path;

use deltatune_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `config.json` of a Hugging Face Llama-family checkpoint (only the fields the model reads).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LlamaConfigFile {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older files (transformers 4) give `rope_theta` at the top level; transformers 5 writes
    /// it inside `rope_parameters`. Default 10000.
    pub rope_theta: Option<f64>,
    /// transformers 5: `{"rope_theta": ..., "rope_type": "default"}`; other rope types are
    /// refused.
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// One id or a list (Llama 3 lists several).
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
    /// Must be `silu` when present.
    pub hidden_act: Option<String>,
    /// Refused unless absent or null (no rope scaling support yet).
    pub rope_scaling: Option<serde_json::Value>,
    /// Bias on q/k/v/o; must be false when present.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections; must be false when present.
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// What the model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Width of the keys and values of one layer: `num_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Rejects shapes the model cannot run (heads not dividing, zero sizes); `source` names
    /// the file in the error.
    pub fn validate(&self, source: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::MalformedConfig {
                path: source.to_path_buf(),
                msg,
            })
        };
        if self.hidden_size == 0 || self.num_layers == 0 || self.num_heads == 0 {
            return bad(
                "hidden_size, num_hidden_layers and num_attention_heads must be positive".into(),
            );
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        Ok(())
    }
}

impl LlamaConfig {
    /// A Hugging Face `config.json` for this model (`LlamaForCausalLM`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "pad_token_id": self.pad_token_id,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        })
    }
}

impl LlamaConfigFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Checks what the model does not support and fills the defaults.
    pub fn into_config(self, path: &Path) -> Result<LlamaConfig> {
        let bad = |msg: String| {
            Err(Error::MalformedConfig {
                path: path.to_path_buf(),
                msg,
            })
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!("hidden_act `{act}` is not supported (only silu)"));
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad(
                "rope_scaling is not supported; remove it or use a model without it".into(),
            );
        }
        if self.attention_bias || self.mlp_bias {
            return bad("attention_bias / mlp_bias are not supported".into());
        }
        let eos_token_ids = match &self.eos_token_id {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(o) => return bad(format!("eos_token_id `{o}` is neither a number nor a list")),
        };
        let mut rope_theta = self.rope_theta;
        if let Some(rp) = self.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            let ty = rp
                .get("rope_type")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if ty != "default" {
                return bad(format!(
                    "rope_parameters.rope_type `{ty}` is not supported (only default)"
                ));
            }
            if let Some(t) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
                rope_theta = Some(t);
            }
        }
        let num_heads = self.num_attention_heads;
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / num_heads.max(1));
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids,
            pad_token_id: self.pad_token_id,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}
