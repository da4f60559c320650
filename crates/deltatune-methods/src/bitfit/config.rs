//! BitFit configuration (deltatune's own `adapter_config.json`, `peft_type` `"BITFIT"`).

use std::collections::BTreeMap;

use deltatune_core::{Error, Result, TargetModules};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};

/// BitFit (Ben Zaken et al. 2022): only the bias terms train (plus the task head).
///
/// Nothing is attached to the model: the selected biases become trainable variables, and the
/// trained values simply replace the base model's biases. There is therefore nothing to merge;
/// [`deltatune_core::Linear::merge`] is a no-op on BitFit layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFitConfig {
    /// Only the biases of modules whose path matches train: a list of module-name suffixes or a
    /// full-match regex, PEFT `target_modules` semantics, tested against linear module paths
    /// (`bert.encoder.layer.0.attention.self.query`) and, with `include_norms`, norm module
    /// paths (`bert.encoder.layer.0.output.LayerNorm`). Default `null`: every bias.
    #[serde(default)]
    pub bias_pattern: Option<TargetModules>,
    /// Whether LayerNorm biases (beta) train too (default true).
    #[serde(default = "yes")]
    pub include_norms: bool,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field: accepted only at a neutral value (null, false, empty).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}

impl Default for BitFitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl BitFitConfig {
    /// Rejects a wrong `peft_type`, an empty pattern list and unknown non-neutral fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::InvalidConfig {
                field: field.into(),
                msg,
            })
        };
        if let Some(TargetModules::Suffixes(v)) = &self.bias_pattern {
            if v.is_empty() {
                return bad(
                    "bias_pattern",
                    "the list is empty; name at least one module, or use null for every bias"
                        .into(),
                );
            }
        }
        check_other(&self.other, "BITFIT", &[], "BitFit")?;
        Ok(())
    }
}
