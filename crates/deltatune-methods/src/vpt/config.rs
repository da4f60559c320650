//! Visual prompt tuning configuration (deltatune's own `adapter_config.json`, `peft_type`
//! `"VISUAL_PROMPT_TUNING"`; PEFT has no deep prompts).

use std::collections::BTreeMap;

use deltatune_core::Result;
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};
use crate::prompt::bad;

/// Visual prompt tuning (Jia et al. 2022, "Visual Prompt Tuning"): `num_virtual_tokens`
/// trainable vectors inserted after CLS. Shallow: only at the input. Deep: each layer gets its
/// own prompt vectors, replacing the previous layer's outputs at those positions. Works on any
/// model with a prompt site (the ViT, and the text encoders).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VptConfig {
    /// Prompt vectors per layer (default 10). Must be at least 1.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// Deep prompts, a set per layer (default false: shallow, input only).
    #[serde(default)]
    pub deep: bool,
    /// Dropout on the prompt vectors, in [0, 1) (default 0.0; the paper uses 0.1 on some
    /// tasks).
    #[serde(default)]
    pub prompt_dropout: f64,
    /// Prompts start uniform in [-v, v] (default v = sqrt(6 / (2 * hidden)), Xavier's bound
    /// for a hidden x hidden map; the paper's is sqrt(6 / (3 * patch^2 + hidden)), close for
    /// ViT-S/14).
    #[serde(default)]
    pub init_range: Option<f64>,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field: accepted only at a neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_tokens() -> usize {
    10
}

impl Default for VptConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl VptConfig {
    /// Rejects values outside their range.
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return bad(
                "num_virtual_tokens",
                "0 prompt vectors is not allowed; use num_virtual_tokens >= 1 (e.g. 10)".into(),
            );
        }
        if !(0.0..1.0).contains(&self.prompt_dropout) {
            return bad(
                "prompt_dropout",
                format!("{} must be in [0, 1)", self.prompt_dropout),
            );
        }
        if let Some(v) = self.init_range {
            if !(v.is_finite() && v > 0.0) {
                return bad("init_range", format!("{v} must be a positive number"));
            }
        }
        check_other(
            &self.other,
            "VISUAL_PROMPT_TUNING",
            &[],
            "visual prompt tuning",
        )
    }
}
