//! Decoder configuration: one struct describing every supported family (Llama, Mistral, Qwen2,
//! Qwen3, Gemma 2, Gemma 3, Phi-3) by the few ways they differ, read from a Hugging Face
//! `config.json` ([`HfDecoderConfig`], transformers 4 and 5 layouts) or from GGUF metadata
//! (see [`super::gguf`]).

use std::path::Path;

use deltatune_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// A decoder family: how its checkpoints are named and which variations it switches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 2/3, SmolLM, TinyLlama.
    #[default]
    Llama,
    Mistral,
    /// Qwen2 and Qwen2.5 (biases on q/k/v).
    Qwen2,
    /// Qwen3 (QK-norm).
    Qwen3,
    /// Gemma 2 (GeGLU, (1 + w) norms, sandwich norms, soft-capping, alternating windows).
    Gemma2,
    /// Gemma 3 text (Gemma 2 without soft-capping, with QK-norm and local/global rope bases).
    Gemma3,
    /// Phi-3 (fused qkv and gate_up projections).
    Phi3,
}

impl Family {
    /// Every family, in the order the README lists them.
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];

    /// The family's short name (`llama`, `qwen2`, ..., as `--show-config` prints it).
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    /// The family of a `config.json` `model_type`.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Some(match t {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The family of a GGUF `general.architecture` (llama.cpp writes Mistral 7B as `llama`).
    pub fn from_gguf_arch(a: &str) -> Option<Family> {
        Some(match a {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// transformers' `model_type` for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3_text",
            f => f.name(),
        }
    }

    /// transformers' causal-LM class name.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Gemma's RMSNorm multiplies by `1 + w`; the others by `w`.
    pub fn norm_plus_one(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Norms after attention and after the feed-forward as well as before them.
    pub fn sandwich_norms(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// RMSNorm on each query and key head before rope.
    pub fn qk_norm(self) -> bool {
        matches!(self, Family::Qwen3 | Family::Gemma3)
    }

    /// One `qkv_proj` and one `gate_up_proj` instead of separate projections.
    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }

    /// Embeddings multiplied by `sqrt(hidden_size)`.
    pub fn scales_embeddings(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// transformers' default for `tie_word_embeddings` when `config.json` omits it.
    fn ties_by_default(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The feed-forward's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    #[default]
    Silu,
    /// GeGLU with the tanh approximation: `gelu_tanh(gate) * up`.
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Activation::GeluTanh,
            _ => return None,
        })
    }

    fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions compressed).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend
    /// between (wavelengths measured against `original_max_position_embeddings`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Each frequency divided by its own factor: llama.cpp's `rope_freqs.weight`, which its
    /// converter computes from Llama 3's settings (a GGUF file has only the factors). Written
    /// to config.json as `"rope_type": "factors"`, which only deltatune reads.
    Factors { factors: Vec<f32> },
}

/// One set of rotary frequencies: a base and an optional scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    #[serde(default)]
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// A base with no scaling.
    pub fn plain(theta: f64) -> Self {
        Rope {
            theta,
            scaling: None,
        }
    }

    /// The inverse frequencies `θ^(-2j/D)` of `head_dim / 2` pairs, scaled, computed in f32
    /// as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let half = head_dim / 2;
        let base = self.theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        match &self.scaling {
            None => inv,
            Some(RopeScaling::Linear { factor }) => {
                inv.into_iter().map(|f| f / *factor as f32).collect()
            }
            Some(RopeScaling::Factors { factors }) => inv
                .into_iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high, orig) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The rope as transformers 5 writes it in `rope_parameters`.
    fn to_hf_json(&self) -> serde_json::Value {
        let mut v = match &self.scaling {
            None => serde_json::json!({"rope_type": "default"}),
            Some(s) => serde_json::to_value(s).expect("rope scaling serializes"),
        };
        v["rope_theta"] = serde_json::json!(self.theta);
        v
    }
}

/// What the model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    #[serde(default)]
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// The rotary frequencies of full-attention layers.
    pub rope: Rope,
    /// Those of sliding-window layers when they differ (Gemma 3's local base).
    #[serde(default)]
    pub local_rope: Option<Rope>,
    /// Keys a query sees in a sliding-window layer, itself included.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per layer: whether it is a sliding-window layer (all false without a window).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Biases on q, k and v (Qwen2; Llama's `attention_bias` also gives `o_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default)]
    pub o_bias: bool,
    #[serde(default)]
    pub activation: Activation,
    /// Attention scores scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap · tanh(score / cap)` on attention scores (Gemma 2).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// `cap · tanh(logit / cap)` on the output logits (Gemma 2).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
}

impl DecoderConfig {
    /// Width of the keys and values of one layer: `num_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the queries: `num_heads * head_dim`.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// The factor attention scores are multiplied by before the softmax.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn window(&self, l: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(l).copied().unwrap_or(false))
    }

    /// The rotary frequencies of layer `l`.
    pub fn rope_of(&self, l: usize) -> &Rope {
        match &self.local_rope {
            Some(local) if self.sliding_layers.get(l).copied().unwrap_or(false) => local,
            _ => &self.rope,
        }
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
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive for rotary embeddings",
                self.head_dim
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.num_layers {
            return bad(format!(
                "layer_types lists {} layers but the model has {}",
                self.sliding_layers.len(),
                self.num_layers
            ));
        }
        for (name, v) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return bad(format!("{name} must be a positive number"));
            }
        }
        for rope in std::iter::once(&self.rope).chain(&self.local_rope) {
            if !(rope.theta.is_finite() && rope.theta > 1.0) {
                return bad(format!("rope theta {} must be above 1", rope.theta));
            }
        }
        Ok(())
    }

    /// A Hugging Face `config.json` for this model (transformers 5 layout), which transformers
    /// and [`HfDecoderConfig`] read back to the same model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let f = self.family;
        let mut v = serde_json::json!({
            "architectures": [f.hf_architecture()],
            "model_type": f.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        let act = self.activation.hf_name();
        if f.norm_plus_one() {
            v["hidden_activation"] = serde_json::json!(act);
        } else {
            v["hidden_act"] = serde_json::json!(act);
        }
        match f {
            Family::Llama => {
                v["attention_bias"] = serde_json::json!(self.qkv_bias);
                v["mlp_bias"] = serde_json::json!(false);
            }
            Family::Qwen3 => v["attention_bias"] = serde_json::json!(self.qkv_bias),
            _ => {}
        }
        let layer_types: Vec<&str> = (0..self.num_layers)
            .map(|l| {
                if self.sliding_layers.get(l).copied().unwrap_or(false) {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        v["sliding_window"] = serde_json::json!(self.sliding_window);
        if matches!(
            f,
            Family::Qwen2 | Family::Qwen3 | Family::Gemma2 | Family::Gemma3
        ) {
            v["layer_types"] = serde_json::json!(layer_types);
        }
        if matches!(f, Family::Qwen2 | Family::Qwen3) {
            let any = self.sliding_window.is_some() && self.sliding_layers.iter().any(|&s| s);
            v["use_sliding_window"] = serde_json::json!(any);
            let first = self.sliding_layers.iter().position(|&s| s);
            v["max_window_layers"] = serde_json::json!(first.unwrap_or(self.num_layers));
        }
        if f.norm_plus_one() {
            v["query_pre_attn_scalar"] = serde_json::json!(self.query_pre_attn_scalar);
            v["attn_logit_softcapping"] = serde_json::json!(self.attn_logit_softcapping);
            v["final_logit_softcapping"] = serde_json::json!(self.final_logit_softcapping);
        }
        v["rope_parameters"] = match &self.local_rope {
            Some(local) => serde_json::json!({
                "full_attention": self.rope.to_hf_json(),
                "sliding_attention": local.to_hf_json(),
            }),
            None => self.rope.to_hf_json(),
        };
        v
    }
}

/// `config.json` of a Hugging Face decoder checkpoint: the union of the fields the supported
/// families use (transformers 4 and 5 spell rope settings differently; both are read).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfDecoderConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3_text`, `phi3`.
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    /// transformers 4: at the top level. Default 10000.
    pub rope_theta: Option<f64>,
    /// transformers 4's scaling (`{"rope_type"|"type": "linear"|"llama3", "factor": ...}`).
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{"rope_theta", "rope_type", ...}`, or per layer type
    /// (`{"full_attention": {...}, "sliding_attention": {...}}`, Gemma 3).
    pub rope_parameters: Option<serde_json::Value>,
    /// Gemma 3 (transformers 4): the sliding layers' rope base.
    pub rope_local_base_freq: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    /// One id or a list (Llama 3 lists several).
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    /// Gemma's name for the activation.
    pub hidden_activation: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
}

/// `f(l)` for each of `n` layers. A count no real model has (a corrupt header) gives no flags:
/// loading then fails at the first layer the weights lack, not in an allocation.
pub fn layer_flags(n: usize, f: impl Fn(usize) -> bool) -> Vec<bool> {
    if n > 65_536 {
        return Vec::new();
    }
    (0..n).map(f).collect()
}

/// A token id given as a number (or null); lists take their first element.
fn one_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
        _ => None,
    }
}

/// Reads one rope description (transformers 4 `rope_scaling` or 5 `rope_parameters` entry)
/// over `theta`; unsupported kinds are refused by name.
pub fn parse_rope(
    v: Option<&serde_json::Value>,
    theta: f64,
    key: &str,
) -> std::result::Result<Rope, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Rope::plain(theta));
    };
    let theta = v
        .get("rope_theta")
        .and_then(|t| t.as_f64())
        .unwrap_or(theta);
    let ty = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |name: &str| -> std::result::Result<f64, String> {
        v.get(name)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("{key}: rope type `{ty}` needs a number `{name}`"))
    };
    let scaling = match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "factors" => {
            let Some(list) = v.get("factors").and_then(|f| f.as_array()) else {
                return Err(format!("{key}: rope type `factors` needs a list `factors`"));
            };
            let factors: Option<Vec<f32>> =
                list.iter().map(|x| x.as_f64().map(|x| x as f32)).collect();
            let Some(factors) = factors.filter(|f| f.iter().all(|x| x.is_finite() && *x > 0.0))
            else {
                return Err(format!("{key}: rope `factors` must be positive numbers"));
            };
            Some(RopeScaling::Factors { factors })
        }
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            return Err(format!(
                "{key}: rope type `{other}` is not supported (default, linear and llama3 are)"
            ))
        }
    };
    if let Some(RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. }) = &scaling {
        if !(factor.is_finite() && *factor > 0.0) {
            return Err(format!("{key}: rope factor {factor} must be positive"));
        }
    }
    Ok(Rope { theta, scaling })
}

impl HfDecoderConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// The family named by `model_type` (or the first architecture); unknown ones are refused
    /// with the list of supported families.
    pub fn family(&self, path: &Path) -> Result<Family> {
        let from_arch = || {
            let a = self.architectures.as_ref()?.first()?;
            Family::ALL.into_iter().find(|f| f.hf_architecture() == a)
        };
        let fam = match &self.model_type {
            Some(t) => Family::from_model_type(t),
            None => from_arch(),
        };
        fam.ok_or_else(|| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: format!(
                "model_type `{}` is not a decoder deltatune loads (supported: {})",
                self.model_type.as_deref().unwrap_or("(absent)"),
                Family::ALL.map(|f| f.model_type()).join(", ")
            ),
        })
    }

    /// Checks what the model does not support and fills the defaults.
    pub fn into_config(self, path: &Path) -> Result<DecoderConfig> {
        let bad = |msg: String| {
            Err(Error::MalformedConfig {
                path: path.to_path_buf(),
                msg,
            })
        };
        let family = self.family(path)?;
        let act_name = self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or(if family.norm_plus_one() {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        let Some(activation) = Activation::parse(act_name) else {
            return bad(format!(
                "hidden_act `{act_name}` is not supported (silu and gelu_pytorch_tanh are)"
            ));
        };
        if self.mlp_bias == Some(true) {
            return bad("mlp_bias is not supported".into());
        }
        if let Some(p) = self
            .partial_rotary_factor
            .or_else(|| {
                self.rope_parameters
                    .as_ref()?
                    .get("partial_rotary_factor")?
                    .as_f64()
            })
            .filter(|&p| p != 1.0)
        {
            return bad(format!(
                "partial_rotary_factor {p}: partial rotary embeddings are not supported"
            ));
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
        // Rotary frequencies: transformers 5's rope_parameters (flat or per layer type), else
        // transformers 4's rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq).
        let theta = self.rope_theta.unwrap_or(10_000.0);
        let per_type = self
            .rope_parameters
            .as_ref()
            .filter(|v| v.get("full_attention").is_some());
        let (rope, mut local_rope) = match per_type {
            Some(rp) => {
                let full = parse_rope(
                    rp.get("full_attention"),
                    theta,
                    "rope_parameters.full_attention",
                );
                let local = rp
                    .get("sliding_attention")
                    .map(|v| parse_rope(Some(v), theta, "rope_parameters.sliding_attention"))
                    .transpose();
                match (full, local) {
                    (Ok(f), Ok(l)) => (f, l),
                    (Err(e), _) | (_, Err(e)) => return bad(e),
                }
            }
            None => {
                let flat = self
                    .rope_parameters
                    .as_ref()
                    .filter(|v| !v.is_null())
                    .map(|v| ("rope_parameters", v))
                    .or(self.rope_scaling.as_ref().map(|v| ("rope_scaling", v)));
                let rope = match flat {
                    Some((key, v)) => parse_rope(Some(v), theta, key),
                    None => Ok(Rope::plain(theta)),
                };
                match rope {
                    Ok(r) => (r, None),
                    Err(e) => return bad(e),
                }
            }
        };
        if local_rope.is_none() && family == Family::Gemma3 {
            local_rope = Some(Rope::plain(self.rope_local_base_freq.unwrap_or(10_000.0)));
        }
        let n = self.num_hidden_layers;
        // Which layers slide: layer_types when given, else each family's rule.
        let window = self.sliding_window.filter(|_| match family {
            Family::Qwen2 | Family::Qwen3 => self.use_sliding_window.unwrap_or(false),
            _ => true,
        });
        let sliding_layers: Vec<bool> = match (&self.layer_types, window) {
            (_, None) => Vec::new(),
            (Some(types), Some(_)) => {
                let mut v = Vec::with_capacity(types.len());
                for t in types {
                    match t.as_str() {
                        "sliding_attention" => v.push(true),
                        "full_attention" => v.push(false),
                        other => return bad(format!("layer_types: `{other}` is not supported")),
                    }
                }
                v
            }
            (None, Some(_)) => match family {
                Family::Gemma2 => layer_flags(n, |l| (l + 1) % 2 != 0),
                Family::Gemma3 => {
                    let p = self
                        .sliding_window_pattern
                        .or(self.sliding_window_pattern_private)
                        .unwrap_or(6)
                        .max(1);
                    layer_flags(n, |l| (l + 1) % p != 0)
                }
                Family::Qwen2 | Family::Qwen3 => {
                    let from = self.max_window_layers.unwrap_or(0);
                    layer_flags(n, |l| l >= from)
                }
                _ => layer_flags(n, |_| true),
            },
        };
        let num_heads = self.num_attention_heads;
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / num_heads.max(1));
        let qkv_bias = match family {
            Family::Qwen2 => self.attention_bias.unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        };
        let gemma = family.norm_plus_one();
        let cfg = DecoderConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: n,
            num_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope,
            local_rope,
            sliding_window: window,
            sliding_layers,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(family.ties_by_default()),
            bos_token_id: one_id(&self.bos_token_id),
            eos_token_ids,
            pad_token_id: one_id(&self.pad_token_id),
            qkv_bias,
            // Llama's attention_bias covers o_proj too; Qwen2's biases are on q/k/v only.
            o_bias: family == Family::Llama && qkv_bias,
            activation,
            query_pre_attn_scalar: if gemma {
                self.query_pre_attn_scalar
            } else {
                None
            },
            attn_logit_softcapping: self.attn_logit_softcapping.filter(|_| gemma),
            final_logit_softcapping: self.final_logit_softcapping.filter(|_| gemma),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}
