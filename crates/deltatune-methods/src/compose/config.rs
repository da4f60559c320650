//! Composition configuration: `adapter_config.json` with `peft_type` `"COMPOSITION"` (deltatune's
//! own; PEFT has no equivalent) listing each member's own configuration.

use std::collections::BTreeMap;

use deltatune_core::{Error, HasSites, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::PeftCommon;
use crate::method::ToFields;
use crate::registry::DeltaConfig;

/// Several deltas on one model, e.g. LoRA + a prefix + a bottleneck adapter (UniPELT).
///
/// Each member keeps its own configuration (PEFT field names) but not its own
/// `modules_to_save`: the composition's `modules_to_save` (default `["classifier"]`) trains the
/// head once for all. Members' tensors are saved under `<method>.<their own key>`, gates under
/// `gates.<method>.layer.<i>.*`, the head under its PEFT key.
#[derive(Debug, Clone)]
pub struct ComposeConfig {
    /// The members, applied in this order (each method at most once).
    pub deltas: Vec<DeltaConfig>,
    /// UniPELT gates on the members that support them: LoRA (per token, per layer), bottleneck
    /// adapters (per token, per layer) and prefix tuning (a scalar per layer); other members are
    /// not gated (default false).
    pub gates: bool,
    /// Learning-rate multiplier per member method name, e.g. `{"prefix": 10.0}` (default: 1
    /// for every member); the head and the gates use the run's learning rate.
    pub lr_scale: BTreeMap<String, f64>,
    /// PEFT's shared fields; its `modules_to_save` (default `["classifier"]`) trains the head
    /// once for all members.
    pub common: PeftCommon,
}

#[derive(Deserialize)]
struct Raw {
    deltas: Vec<Value>,
    #[serde(default)]
    gates: bool,
    #[serde(default)]
    lr_scale: BTreeMap<String, f64>,
    #[serde(flatten)]
    common: PeftCommon,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

fn bad(field: &str, msg: String) -> Error {
    Error::InvalidConfig {
        field: field.into(),
        msg,
    }
}

impl ComposeConfig {
    /// A composition of `deltas` with the head `["classifier"]` trained; the members'
    /// own `modules_to_save` are dropped.
    pub fn new(deltas: Vec<DeltaConfig>, gates: bool) -> Self {
        Self {
            deltas: deltas
                .into_iter()
                .map(|d| d.with_modules_to_save(None))
                .collect(),
            gates,
            lr_scale: BTreeMap::new(),
            common: PeftCommon::default(),
        }
    }

    /// Reads the `adapter_config.json` value.
    pub fn from_json(v: Value) -> Result<Self> {
        let raw: Raw =
            serde_json::from_value(v).map_err(|e| bad("ComposeConfig", e.to_string()))?;
        // Every field is known: a composition is deltatune's own format.
        if let Some(k) = raw.other.keys().find(|k| *k != "peft_type") {
            return Err(bad(
                k,
                format!(
                    "unknown composition option `{k}`; the options are deltas, gates, lr_scale, \
                     task_type, modules_to_save, base_model_name_or_path, inference_mode"
                ),
            ));
        }
        let deltas = raw
            .deltas
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                DeltaConfig::from_json(d).map_err(|e| bad(&format!("deltas[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let c = Self {
            deltas,
            gates: raw.gates,
            lr_scale: raw.lr_scale,
            common: raw.common,
        };
        c.validate()?;
        Ok(c)
    }

    /// The `adapter_config.json` fields (without `peft_type`).
    pub fn fields_json(&self, model: &dyn HasSites) -> Value {
        self.fields(|d| d.to_json(model))
    }

    /// The fields with each member written by `member`.
    fn fields(&self, member: impl Fn(&DeltaConfig) -> Value) -> Value {
        let mut v = json!({
            "deltas": self.deltas.iter().map(member).collect::<Vec<_>>(),
            "gates": self.gates,
            "lr_scale": self.lr_scale,
        });
        if let (Value::Object(m), Value::Object(c)) = (&mut v, self.common.to_fields()) {
            m.extend(c);
        }
        v
    }

    /// Rejects an empty or nested composition, a method listed twice, a member with its own
    /// `modules_to_save`, and learning-rate multipliers for absent methods or outside (0, inf).
    pub fn validate(&self) -> Result<()> {
        if self.deltas.is_empty() {
            return Err(bad(
                "deltas",
                "is empty: list at least one method (e.g. lora, prefix, adapter)".into(),
            ));
        }
        let mut seen = Vec::new();
        for (i, d) in self.deltas.iter().enumerate() {
            let name = d.name();
            if matches!(d, DeltaConfig::Compose(_)) {
                return Err(bad(
                    &format!("deltas[{i}]"),
                    "is itself a composition: list its members directly".into(),
                ));
            }
            if seen.contains(&name) {
                return Err(bad(
                    &format!("deltas[{i}]"),
                    format!("lists `{name}` a second time: each method at most once"),
                ));
            }
            if d.modules_to_save().is_some_and(|m| !m.is_empty()) {
                return Err(bad(
                    &format!("deltas[{i}].modules_to_save"),
                    "must be empty in a composition: set the composition's `modules_to_save`"
                        .into(),
                ));
            }
            d.validate()
                .map_err(|e| bad(&format!("deltas[{i}] ({name})"), e.to_string()))?;
            seen.push(name);
        }
        for (k, v) in &self.lr_scale {
            if !seen.contains(&k.as_str()) {
                return Err(bad(
                    "lr_scale",
                    format!(
                        "names `{k}`, which is not a member (members: {})",
                        seen.join(", ")
                    ),
                ));
            }
            if !(v.is_finite() && *v > 0.0) {
                return Err(bad(
                    "lr_scale",
                    format!("`{k}` is {v}: a multiplier must be finite and > 0"),
                ));
            }
        }
        Ok(())
    }
}

/// The composition's fields as configured (members not completed by a model).
impl serde::Serialize for ComposeConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.fields(|d| {
            let mut v = d.to_fields();
            if let Value::Object(m) = &mut v {
                m.insert("peft_type".into(), Value::from(d.peft_type()));
            }
            v
        })
        .serialize(s)
    }
}
