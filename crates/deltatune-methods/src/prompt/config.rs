//! Prompt-tuning configuration, read and written as PEFT's `adapter_config.json`.

use std::collections::BTreeMap;

use deltatune_core::{Error, HasSites, Result};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};

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

/// Where an encoder's prompt goes (deltatune's own field `prompt_position`; decoders always put
/// it first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptPosition {
    /// After the first token (CLS), so CLS pooling still reads CLS (deltatune's default).
    #[default]
    AfterFirst,
    /// Before every token, as PEFT does: CLS pooling then reads the first prompt vector. A
    /// folder PEFT wrote (no `prompt_position`, no run_config.json) loads with this.
    Start,
}

/// Prompt tuning (Lester et al. 2021): `num_virtual_tokens` trainable vectors inserted into the
/// input embeddings. deltatune inserts them right after the first token (CLS), so that CLS
/// pooling still reads CLS; PEFT puts them before CLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
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
    /// Where the prompt goes in an encoder's input (default `after_first`; PEFT's is `start`).
    #[serde(default)]
    pub prompt_position: PromptPosition,
    /// How the prompt starts (default `RANDOM`).
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text whose token embeddings start the prompt; required with `TEXT` (default unset).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer that turned the init text into ids (default unset; informational).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field PEFT writes: accepted only at PEFT's neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_tokens() -> usize {
    20
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

impl PromptTuningConfig {
    /// Rejects values outside their range and PEFT options deltatune does not implement.
    pub fn validate(&self) -> Result<()> {
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
        check_other(&self.other, "PROMPT_TUNING", &[], "prompt tuning")
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
