//! Intrinsic prompt tuning configuration (`adapter_config.json`, deltatune's own `peft_type`).

use std::collections::BTreeMap;

use deltatune_core::Result;
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};
use crate::prompt::bad;

/// The fixed random map from `z` [d] to the flattened prompt [P * hidden].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProjectionKind {
    /// A dense Gaussian matrix [P * hidden, d] (default): memory and time O(P * hidden * d).
    #[default]
    Dense,
    /// Fastfood (Le et al. 2013) `S H G Pi H B`, as in Aghajanyan et al. 2021: memory
    /// O(P * hidden) and time O(L log L), L the next power of two >= P * hidden.
    Fastfood,
}

/// The fixed base prompt `P0` that `z = 0` decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BasePromptInit {
    /// Rows of the word-embedding matrix at ids drawn (seeded by `projection_seed`) uniformly
    /// from the vocabulary (default).
    #[default]
    SampleVocab,
    /// All zeros.
    Zero,
}

/// Intrinsic prompt tuning: the soft prompt is `P0 + reshape(D z)` with `P0` [P, hidden] and
/// `D` [P * hidden, d] fixed and only `z` [d] (plus `modules_to_save`) trained; `z` starts at 0.
///
/// `D` and `P0` are regenerated from `projection_seed` (and the base model's word embeddings)
/// when an adapter is loaded, so `adapter_model.safetensors` holds only `intrinsic_z` [d] and
/// the head. With `subspace`, `P0` and `D` come from that artifact instead (see
/// [`super::fit_subspace`]) and `projection`, `projection_seed` and `base_prompt_init` are unused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntrinsicPromptConfig {
    /// Number of prompt vectors P (default 20). Must be at least 1.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// Dimension d of the trained vector `z` (default 32); in 1..=P * hidden.
    #[serde(default = "default_dim")]
    pub intrinsic_dim: usize,
    /// The random map `D` (default `dense`).
    #[serde(default)]
    pub projection: ProjectionKind,
    /// Seed of `D` and of the sampled `P0` (default 0).
    #[serde(default)]
    pub projection_seed: u64,
    /// The base prompt `P0` (default `SAMPLE_VOCAB`).
    #[serde(default)]
    pub base_prompt_init: BasePromptInit,
    /// A learned-subspace artifact (safetensors with `subspace.p0` and `subspace.basis`) that
    /// supplies `P0` and `D` (default unset: random `D`).
    #[serde(default)]
    pub subspace: Option<String>,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field: accepted only at a neutral value (null, false, empty).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_tokens() -> usize {
    20
}
fn default_dim() -> usize {
    32
}

impl Default for IntrinsicPromptConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl IntrinsicPromptConfig {
    /// Rejects values outside their range (the bound of `intrinsic_dim` that depends on the
    /// model is checked by [`IntrinsicPromptConfig::validate_for`]).
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return bad(
                "num_virtual_tokens",
                "0 prompt vectors is not allowed; use num_virtual_tokens >= 1 (e.g. 20)".into(),
            );
        }
        if self.intrinsic_dim == 0 {
            return bad(
                "intrinsic_dim",
                "0 is not allowed; use intrinsic_dim >= 1 (e.g. 32)".into(),
            );
        }
        check_other(
            &self.other,
            "INTRINSIC_PROMPT",
            &[],
            "intrinsic prompt tuning",
        )
    }

    /// [`IntrinsicPromptConfig::validate`] plus `intrinsic_dim <= num_virtual_tokens * hidden`.
    pub fn validate_for(&self, hidden: usize) -> Result<()> {
        self.validate()?;
        let n = self.num_virtual_tokens * hidden;
        if self.intrinsic_dim > n {
            return bad(
                "intrinsic_dim",
                format!(
                    "{} exceeds the prompt's size num_virtual_tokens * hidden = {} * {hidden}; \
                     allowed range 1..={n}",
                    self.intrinsic_dim, self.num_virtual_tokens
                ),
            );
        }
        Ok(())
    }
}
