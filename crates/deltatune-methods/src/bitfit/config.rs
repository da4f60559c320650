//! BitFit configuration (deltatune's own `adapter_config.json`, `peft_type` `"BITFIT"`).

use std::collections::BTreeMap;

use deltatune_core::{Error, Result, TargetModules};
use serde::{Deserialize, Serialize};

/// BitFit (Ben Zaken et al. 2022): only the bias terms train (plus the task head).
///
/// Nothing is attached to the model: the selected biases become trainable variables, and the
/// trained values simply replace the base model's biases. There is therefore nothing to merge;
/// [`deltatune_core::Linear::merge`] is a no-op on BitFit layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFitConfig {
    /// Always `"BITFIT"`.
    #[serde(default = "peft_type")]
    pub peft_type: String,
    /// Task type, as PEFT writes it; `"SEQ_CLS"` for classification (default).
    #[serde(default = "task_type")]
    pub task_type: Option<String>,
    /// Only the biases of modules whose path matches train: a list of module-name suffixes or a
    /// full-match regex, PEFT `target_modules` semantics, tested against linear module paths
    /// (`bert.encoder.layer.0.attention.self.query`) and, with `include_norms`, norm module
    /// paths (`bert.encoder.layer.0.output.LayerNorm`). Default `null`: every bias.
    #[serde(default)]
    pub bias_pattern: Option<TargetModules>,
    /// Whether LayerNorm biases (beta) train too (default true).
    #[serde(default = "yes")]
    pub include_norms: bool,
    /// Modules trained in full and saved with the adapter (default `["classifier"]`).
    #[serde(default = "default_modules_to_save")]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Written on save; not used.
    #[serde(default)]
    pub inference_mode: bool,
    /// Any other field: accepted only at a neutral value (null, false, empty).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn peft_type() -> String {
    "BITFIT".into()
}
fn task_type() -> Option<String> {
    Some("SEQ_CLS".into())
}
fn default_modules_to_save() -> Option<Vec<String>> {
    Some(vec!["classifier".into()])
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
        if self.peft_type != "BITFIT" {
            return bad("peft_type", format!("`{}` is not BITFIT", self.peft_type));
        }
        if let Some(TargetModules::Suffixes(v)) = &self.bias_pattern {
            if v.is_empty() {
                return bad(
                    "bias_pattern",
                    "the list is empty; name at least one module, or use null for every bias"
                        .into(),
                );
            }
        }
        for (k, v) in &self.other {
            let neutral = match v {
                serde_json::Value::Null => true,
                serde_json::Value::Bool(b) => !b,
                serde_json::Value::Object(m) => m.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                _ => false,
            };
            if !neutral && !matches!(k.as_str(), "revision" | "peft_version") {
                return bad(k, format!("option `{k}` = {v} is not a BitFit option"));
            }
        }
        Ok(())
    }
}
