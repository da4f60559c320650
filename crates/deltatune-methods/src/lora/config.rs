//! LoRA configuration, read and written as PEFT's `adapter_config.json`.

use std::collections::BTreeMap;

use deltatune_core::{Error, Result, TargetModules};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};

/// Which biases train beside the LoRA matrices (PEFT's `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// No bias trains (default).
    #[default]
    None,
    /// Every bias of every linear layer trains.
    All,
    /// Only the biases of the LoRA-targeted layers train.
    LoraOnly,
}

/// LoRA (Hu et al. 2021): `y = x W^T + b + scale * dropout(x) A^T B^T`, `A` [r, in] and `B`
/// [out, r] trainable, `B` zero at init so the output starts unchanged.
/// `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update (default 8). Must be at least 1.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator (default 16).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input, in [0, 1) (default 0.1).
    #[serde(default = "default_dropout")]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling `alpha / sqrt(r)` (default false).
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules that get LoRA: a list of name suffixes or a full-match regex
    /// (default `["query", "value"]`).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Which biases train (default `none`).
    #[serde(default)]
    pub bias: LoraBias,
    /// Only these layer indices get LoRA (default: all layers).
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Must be false: weights are stored `[out, in]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `true`: A Kaiming-uniform, B zero (default). `false`: both random (tests only).
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field PEFT writes: accepted only at PEFT's neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.1
}
fn default_targets() -> TargetModules {
    TargetModules::Suffixes(vec!["query".into(), "value".into()])
}
fn yes() -> bool {
    true
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl LoraConfig {
    /// The multiplier of `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Rejects values outside their range and PEFT options deltatune does not implement.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::InvalidConfig {
                field: field.into(),
                msg,
            })
        };
        if self.r == 0 {
            return bad("r", "rank 0 is not allowed; use r >= 1 (e.g. 8)".into());
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad(
                "lora_alpha",
                format!("{} must be a positive number", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} must be in [0, 1)", self.lora_dropout),
            );
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "true is not supported (weights are [out, in])".into(),
            );
        }
        if let TargetModules::Suffixes(v) = &self.target_modules {
            if v.is_empty() {
                return bad(
                    "target_modules",
                    "the list is empty; name at least one module".into(),
                );
            }
        }
        check_other(
            &self.other,
            "LORA",
            &[
                "init_lora_weights",
                "layers_pattern",
                "megatron_core",
                "runtime_config",
                "exclude_modules",
                "layer_replication",
                "corda_config",
                "eva_config",
                "loftq_config",
                "target_parameters",
                "trainable_token_indices",
                "qalora_group_size",
                "alora_invocation_tokens",
                "arrow_config",
                "ensure_weight_tying",
                "lora_bias",
                "use_qalora",
                "megatron_config",
            ],
            "LoRA",
        )?;
        Ok(())
    }
}
