//! Prefix-tuning configuration, read and written as PEFT's `adapter_config.json`.

use std::collections::BTreeMap;

use deltatune_core::{HasSites, Result};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};
use crate::prompt::bad;

/// The default standard deviation of the prefix table without projection (see
/// [`PrefixTuningConfig::prefix_init_std`]).
pub const DEFAULT_PREFIX_INIT_STD: f64 = 0.02;

/// Prefix tuning (Li and Liang 2021): `num_virtual_tokens` trainable keys and values prepended
/// to the keys and values of every attention layer (or of the layers in `layers`).
///
/// The adapter file holds PEFT's `prompt_embeddings` `[P, num_layers * 2 * hidden]`: along the
/// last axis, layer 0's keys, layer 0's values, layer 1's keys, ... With `prefix_projection`,
/// training goes through PEFT's `PrefixEncoder` (an embedding `[P, hidden]` and an MLP
/// `Linear(hidden, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size, L * 2 * hidden)`),
/// which [`crate::prefix::export`] folds into that table for saving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// Number of prefix positions per layer (default 20). Must be at least 1.
    #[serde(default = "default_tokens")]
    pub num_virtual_tokens: usize,
    /// Width of a key or value; must equal the model's hidden size. Default unset, filled with
    /// the hidden size by [`PrefixTuningConfig::completed`] (PEFT writes it on save).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// Number of transformer layers; must equal the model's when set. Default unset, filled on
    /// save.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Written by PEFT on save; not used (default unset).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// 1 for an encoder; default unset, written as 1 on save. Other values are rejected.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Train through PEFT's MLP reparameterisation (default false).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Width of the MLP's hidden layer with `prefix_projection` (default: the model's hidden
    /// size). Must be at least 1.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// deltatune: only these layer indices get a prefix (default: every layer). The table keeps
    /// PEFT's shape `[P, L * 2 * hidden]`; the columns of the other layers are unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
    /// deltatune: standard deviation of the normal draw of the prefix table without projection
    /// (default 0.02). PEFT leaves `nn.Embedding`'s N(0, 1), which puts keys far larger than the
    /// model's and makes the first steps chaotic; small prefixes start as near-neutral extra
    /// positions and train smoothly at the usual prefix-tuning learning rates (1e-3 to 1e-2).
    /// With `prefix_projection` the embedding starts as PEFT's, N(0, 1), and the linears use
    /// PyTorch's default uniform init, since the MLP itself sets the scale of the prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_init_std: Option<f64>,
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

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl PrefixTuningConfig {
    /// The standard deviation of the prefix table without projection.
    pub fn init_std(&self) -> f64 {
        self.prefix_init_std.unwrap_or(DEFAULT_PREFIX_INIT_STD)
    }

    /// Rejects values outside their range and PEFT options deltatune does not implement.
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return bad(
                "num_virtual_tokens",
                "0 prefix positions is not allowed; use num_virtual_tokens >= 1 (e.g. 20)".into(),
            );
        }
        if self.encoder_hidden_size == Some(0) {
            return bad(
                "encoder_hidden_size",
                "0 is not allowed; use encoder_hidden_size >= 1 (default: the hidden size)".into(),
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
        if let Some(s) = self.prefix_init_std {
            if !(s.is_finite() && s >= 0.0) {
                return bad(
                    "prefix_init_std",
                    format!("{s} must be a finite number >= 0 (default {DEFAULT_PREFIX_INIT_STD})"),
                );
            }
        }
        if let Some(l) = &self.layers {
            if l.is_empty() {
                return bad(
                    "layers",
                    "the list is empty; name at least one layer or leave it unset for all".into(),
                );
            }
        }
        check_other(&self.other, "PREFIX_TUNING", &[], "prefix tuning")
    }

    /// [`PrefixTuningConfig::validate`] plus the checks against `model`: `token_dim`,
    /// `num_layers` and the indices in `layers`.
    pub fn validate_for(&self, model: &dyn HasSites) -> Result<()> {
        self.validate()?;
        let (hidden, n_layers) = (model.kv_width(), model.num_layers());
        if let Some(td) = self.token_dim {
            if td != hidden {
                return bad(
                    "token_dim",
                    format!("{td} differs from the model's hidden size {hidden}; use {hidden}"),
                );
            }
        }
        if let Some(nl) = self.num_layers {
            if nl != n_layers {
                return bad(
                    "num_layers",
                    format!("{nl} differs from the model's {n_layers} layers; use {n_layers}"),
                );
            }
        }
        if let Some(bad_layer) = self.layers.iter().flatten().find(|&&l| l >= n_layers) {
            return bad(
                "layers",
                format!(
                    "layer {bad_layer} is out of range; the model has layers 0..={}",
                    n_layers.saturating_sub(1)
                ),
            );
        }
        Ok(())
    }

    /// The config as it is saved next to an adapter trained on `model`: `token_dim`,
    /// `num_layers`, `num_transformer_submodules` and `encoder_hidden_size` filled in (PEFT
    /// writes them on save). `num_attention_heads` is kept as given (the caller knows the model's
    /// head count).
    pub fn completed(&self, model: &dyn HasSites) -> Self {
        let mut c = self.clone();
        c.token_dim = Some(model.kv_width());
        c.num_layers = Some(model.num_layers());
        c.num_transformer_submodules = Some(1);
        c.encoder_hidden_size = Some(self.encoder_hidden_size.unwrap_or(model.kv_width()));
        c
    }
}
