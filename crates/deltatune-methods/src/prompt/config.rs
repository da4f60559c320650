//! Prompt-tuning configuration, read and written as PEFT's `adapter_config.json`.

use std::collections::BTreeMap;

use deltatune_core::{Error, HasSites, Result};
use serde::{Deserialize, Serialize};

/// How the soft prompt starts (PEFT's `prompt_tuning_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptTuningInit {
    /// Gaussian rows at the scale of the vocabulary (default). PEFT's RANDOM leaves
    /// `nn.Embedding`'s default N(0, 1), about 20 to 50 times the size of a BERT word embedding;
    /// deltatune draws N(0, s^2) with `s` the root-mean-square entry of the model's word-embedding
    /// matrix, so that the prompt starts at the scale of real tokens and trains at the usual
    /// prompt-tuning learning rates (1e-2 to 3e-1).
    #[default]
    Random,
    /// The word embeddings of the tokens of `prompt_tuning_init_text`, repeated or truncated to
    /// `num_virtual_tokens` rows (as PEFT does).
    Text,
    /// Rows of the word-embedding matrix at token ids drawn uniformly from the whole vocabulary
    /// with the seeded generator (as PEFT's `SAMPLE_VOCAB`).
    SampleVocab,
}

/// Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable vectors inserted into the
/// input embeddings. deltatune inserts them right after the first token (CLS), so that CLS
/// pooling still reads CLS; PEFT puts them before CLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// Always `"PROMPT_TUNING"`.
    #[serde(default = "peft_type")]
    pub peft_type: String,
    /// PEFT task type; `"SEQ_CLS"` for classification (default).
    #[serde(default = "task_type")]
    pub task_type: Option<String>,
    /// Number of prompt vectors (default 20). Must be at least 1.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// Width of a prompt vector; must equal the model's hidden size. Default: unset, filled with
    /// the hidden size by [`PromptTuningConfig::completed`] (PEFT writes it on save).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for an encoder; default unset, written as 1 on save. Other values are rejected.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Written by PEFT on save; not used (default unset).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Written on save as the model's layer count; not used (default unset).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// How the prompt starts (default `RANDOM`).
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text whose token embeddings start the prompt; required with `TEXT` (default unset).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer that turned the init text into ids (default unset; informational).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// Modules trained in full and saved with the adapter (default `["classifier"]`).
    #[serde(default = "default_modules_to_save")]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model this adapter was trained on (default unset).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Written as PEFT writes it; not used (default false).
    #[serde(default)]
    pub inference_mode: bool,
    /// Any other field PEFT writes: accepted only at PEFT's neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn peft_type() -> String {
    "PROMPT_TUNING".into()
}
fn task_type() -> Option<String> {
    Some("SEQ_CLS".into())
}
fn default_tokens() -> usize {
    20
}
fn default_modules_to_save() -> Option<Vec<String>> {
    Some(vec!["classifier".into()])
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

pub(crate) fn bad<T>(field: &str, msg: String) -> Result<T> {
    Err(Error::InvalidConfig {
        field: field.into(),
        msg,
    })
}

/// Rejects PEFT fields deltatune does not know unless they hold a neutral value (null, false,
/// empty) or are listed in `harmless`.
pub(crate) fn check_other(
    other: &BTreeMap<String, serde_json::Value>,
    harmless: &[&str],
    method: &str,
) -> Result<()> {
    for (k, v) in other {
        let neutral = match v {
            serde_json::Value::Null => true,
            serde_json::Value::Bool(b) => !b,
            serde_json::Value::Object(m) => m.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::String(s) => s.is_empty(),
            _ => false,
        };
        if !neutral && !harmless.contains(&k.as_str()) {
            return bad(
                k,
                format!("PEFT option `{k}` = {v} is not supported by deltatune's {method}"),
            );
        }
    }
    Ok(())
}

impl PromptTuningConfig {
    /// Rejects values outside their range and PEFT options deltatune does not implement.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "PROMPT_TUNING" {
            return bad(
                "peft_type",
                format!("`{}` is not PROMPT_TUNING", self.peft_type),
            );
        }
        if self.num_virtual_tokens == 0 {
            return bad(
                "num_virtual_tokens",
                "0 prompt vectors is not allowed; use num_virtual_tokens >= 1 (e.g. 20)".into(),
            );
        }
        if let Some(n) = self.num_transformer_submodules {
            if n != 1 {
                return bad(
                    "num_transformer_submodules",
                    format!("{n} is not supported; an encoder has exactly 1"),
                );
            }
        }
        if self.prompt_tuning_init == PromptTuningInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(|t| t.is_empty())
        {
            return bad(
                "prompt_tuning_init_text",
                "prompt_tuning_init TEXT needs a non-empty prompt_tuning_init_text".into(),
            );
        }
        check_other(
            &self.other,
            &["revision", "auto_mapping", "peft_version"],
            "prompt tuning",
        )
    }

    /// The config as it is saved next to an adapter trained on `model`: `token_dim`,
    /// `num_layers` and `num_transformer_submodules` filled in (PEFT writes them on save).
    pub fn completed(&self, model: &dyn HasSites) -> Self {
        let mut c = self.clone();
        c.token_dim = Some(model.hidden_size());
        c.num_layers = Some(model.num_layers());
        c.num_transformer_submodules = Some(1);
        c
    }
}
