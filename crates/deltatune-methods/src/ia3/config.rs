//! (IA)^3 configuration, read and written as PEFT's `adapter_config.json` (`IA3Config`).

use std::collections::BTreeMap;

use deltatune_core::{Error, Result, TargetModules};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};

/// (IA)^3 (Liu et al. 2022): a trainable vector `l` rescales each targeted linear layer.
/// For ordinary targets `l` [out] scales the output, bias included: `y = (x W^T + b) * l`.
/// For feed-forward targets `l` [in] scales the input: `y = (x * l) W^T + b`.
/// With `init_ia3_weights` every `l` starts at ones, so the output starts unchanged.
///
/// As in PEFT, a list of `feedforward_modules` is matched with a plain string suffix test
/// (`path.endswith(entry)`, no `.` boundary), so `"output.dense"` also makes
/// `attention.output.dense` feed-forward; `target_modules` uses the usual `.` boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IA3Config {
    /// Modules that get a scaling vector: a list of name suffixes or a full-match regex
    /// (default `["key", "value", "output.dense"]`, PEFT's choice for BERT).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Targets whose input, not output, is scaled: a list (entries must also be in a
    /// `target_modules` list) or a full-match regex. Default `["output.dense"]`; `null` means the
    /// default too (PEFT fills it from its BERT table); `[]` means no feed-forward module.
    #[serde(default = "default_feedforward")]
    pub feedforward_modules: Option<TargetModules>,
    /// `true`: every vector starts at ones (default). `false`: N(0, 1) entries, as PEFT
    /// (tests only).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    /// Must be false: weights are stored `[out, in]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field PEFT writes: accepted only at PEFT's neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_targets() -> TargetModules {
    TargetModules::Suffixes(vec!["key".into(), "value".into(), "output.dense".into()])
}
fn default_feedforward() -> Option<TargetModules> {
    Some(TargetModules::Suffixes(vec!["output.dense".into()]))
}
fn yes() -> bool {
    true
}

impl Default for IA3Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl IA3Config {
    /// The feed-forward pattern in effect (`null` falls back to the default).
    pub fn feedforward(&self) -> TargetModules {
        self.feedforward_modules
            .clone()
            .or_else(default_feedforward)
            .expect("default is set")
    }

    /// Whether the targeted module at `path` scales its input (PEFT's
    /// `_check_target_module_feedforward`: `re.fullmatch` for a string, `endswith` for a list).
    pub fn is_feedforward(&self, path: &str) -> Result<bool> {
        match self.feedforward() {
            TargetModules::Suffixes(list) => Ok(list.iter().any(|s| path.ends_with(s.as_str()))),
            re @ TargetModules::Regex(_) => re.matches(path),
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
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "true is not supported (weights are [out, in]); use false".into(),
            );
        }
        match &self.target_modules {
            TargetModules::Suffixes(v) if v.is_empty() => {
                return bad(
                    "target_modules",
                    "the list is empty; name at least one module".into(),
                );
            }
            TargetModules::Regex(r) if r == "all-linear" => {
                return bad(
                    "target_modules",
                    "`all-linear` is not supported; list the modules (e.g. [\"key\", \"value\", \
                     \"output.dense\"])"
                        .into(),
                );
            }
            _ => {}
        }
        // PEFT checks the subset relation only when both are lists.
        if let (TargetModules::Suffixes(ff), TargetModules::Suffixes(targets)) =
            (self.feedforward(), &self.target_modules)
        {
            let outside: Vec<&str> = ff
                .iter()
                .filter(|f| !targets.contains(f))
                .map(|s| s.as_str())
                .collect();
            if !outside.is_empty() {
                return bad(
                    "feedforward_modules",
                    format!(
                        "{} not in target_modules [{}]; feedforward_modules must be a subset of \
                         target_modules",
                        outside
                            .iter()
                            .map(|s| format!("`{s}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        targets.join(", ")
                    ),
                );
            }
        }
        check_other(&self.other, "IA3", &["exclude_modules"], "IA3")?;
        if let Some(v) = self.other.get("exclude_modules") {
            let empty = v.is_null() || v.as_array().is_some_and(|a| a.is_empty());
            if !empty {
                return bad(
                    "exclude_modules",
                    format!("{v} is not supported; narrow target_modules instead"),
                );
            }
        }
        Ok(())
    }
}
