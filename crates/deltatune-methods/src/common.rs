//! PEFT's bookkeeping fields, the same in every method's `adapter_config.json`, and the check
//! that every field a method does not know holds a neutral value.

use std::collections::BTreeMap;

use deltatune_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The fields every `adapter_config.json` carries beside the method's own, flattened into each
/// method's config (`#[serde(flatten)] common: PeftCommon`), so the JSON keeps PEFT's flat shape.
/// `peft_type` is not here: it names the method, so the method writes it
/// ([`crate::Method::peft_type`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftCommon {
    /// PEFT task type: `"SEQ_CLS"` for classification (default), `"CAUSAL_LM"` for a decoder.
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    /// Modules trained in full and saved with the delta (default `["classifier"]`). A module
    /// matches when its path equals a name or ends with `.` + name.
    #[serde(default = "default_modules_to_save")]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model this delta was trained on (default unset; set on save).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Written as PEFT writes it (true on save); not used (default false).
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_task_type() -> Option<String> {
    Some("SEQ_CLS".into())
}

fn default_modules_to_save() -> Option<Vec<String>> {
    Some(vec!["classifier".into()])
}

impl Default for PeftCommon {
    fn default() -> Self {
        Self {
            task_type: default_task_type(),
            modules_to_save: default_modules_to_save(),
            base_model_name_or_path: None,
            inference_mode: false,
        }
    }
}

/// Fields PEFT writes in every config that never change what a delta computes.
const ALWAYS_HARMLESS: &[&str] = &["revision", "auto_mapping", "peft_version"];

/// Whether `v` is the value PEFT writes for an option that is off: null, false, empty.
fn is_neutral(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// Checks the fields a method's config did not recognise (its flattened `other` map):
/// `peft_type` must be the method's own; `revision`, `auto_mapping`, `peft_version` and the
/// names in `harmless` may hold anything; every other field must be neutral (null, false,
/// empty), or it is refused by name as an option `method` does not implement.
pub fn check_other(
    other: &BTreeMap<String, Value>,
    peft_type: &str,
    harmless: &[&str],
    method: &str,
) -> Result<()> {
    for (k, v) in other {
        if k == "peft_type" {
            if v.as_str() != Some(peft_type) {
                return Err(Error::InvalidConfig {
                    field: "peft_type".into(),
                    msg: format!("{v} is not {peft_type}"),
                });
            }
            continue;
        }
        let harmless = ALWAYS_HARMLESS.contains(&k.as_str()) || harmless.contains(&k.as_str());
        if !harmless && !is_neutral(v) {
            return Err(Error::InvalidConfig {
                field: k.clone(),
                msg: format!("PEFT option `{k}` = {v} is not supported by deltatune's {method}"),
            });
        }
    }
    Ok(())
}
