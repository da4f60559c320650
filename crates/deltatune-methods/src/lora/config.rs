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
    /// Every bias of the model trains: the linear layers' and the norms' (PEFT's `all`).
    All,
    /// Only the biases of the LoRA-targeted layers train (saved, as PEFT saves them, under
    /// `<layer>.base_layer.bias`).
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
    /// Per-module ranks overriding `r` (PEFT's `rank_pattern`): the first key, in the file's
    /// order, that matches the end of a module's path (Python's
    /// `re.match(rf"(.*\.)?({key})$", path)`) gives that module's rank.
    #[serde(default, skip_serializing_if = "Patterns::is_empty_pattern")]
    pub rank_pattern: Patterns<usize>,
    /// Per-module `lora_alpha` overrides (PEFT's `alpha_pattern`), matched as `rank_pattern`.
    #[serde(default, skip_serializing_if = "Patterns::is_empty_pattern")]
    pub alpha_pattern: Patterns<f64>,
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

/// An ordered map from module-name patterns to values (PEFT's `rank_pattern` and
/// `alpha_pattern`), kept in the file's order because the first match wins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<T> Patterns<T> {
    fn is_empty_pattern(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the first pattern matching `path` (PEFT's `get_pattern_key`).
    pub fn lookup(&self, path: &str, field: &str) -> Result<Option<&T>> {
        for (key, v) in &self.0 {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                Error::InvalidConfig {
                    field: field.into(),
                    msg: format!("key `{key}` is not a valid regular expression: {e}"),
                }
            })?;
            if re.is_match(path) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

impl<T: Serialize> Serialize for Patterns<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from module-name patterns to values (or null)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Patterns(out))
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(Patterns(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl LoraConfig {
    /// The multiplier of `B A` at the default rank and alpha.
    pub fn scale(&self) -> f64 {
        self.scale_of(self.r, self.lora_alpha)
    }

    fn scale_of(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The rank of the module at `path` (`rank_pattern`, else `r`).
    pub fn rank_for(&self, path: &str) -> Result<usize> {
        Ok(*self
            .rank_pattern
            .lookup(path, "rank_pattern")?
            .unwrap_or(&self.r))
    }

    /// The multiplier of `B A` at `path` (`rank_pattern` and `alpha_pattern` applied).
    pub fn scale_for(&self, path: &str) -> Result<f64> {
        let alpha = *self
            .alpha_pattern
            .lookup(path, "alpha_pattern")?
            .unwrap_or(&self.lora_alpha);
        Ok(self.scale_of(self.rank_for(path)?, alpha))
    }

    /// The largest rank any module can get (`r` and the `rank_pattern` values).
    pub fn max_rank(&self) -> usize {
        self.rank_pattern
            .0
            .iter()
            .map(|(_, r)| *r)
            .fold(self.r, usize::max)
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
        for (k, r) in &self.rank_pattern.0 {
            if *r == 0 {
                return bad("rank_pattern", format!("`{k}`: rank 0 is not allowed"));
            }
        }
        for (k, a) in &self.alpha_pattern.0 {
            if !(a.is_finite() && *a > 0.0) {
                return bad(
                    "alpha_pattern",
                    format!("`{k}`: {a} must be a positive number"),
                );
            }
        }
        self.rank_pattern.lookup("", "rank_pattern")?;
        self.alpha_pattern.lookup("", "alpha_pattern")?;
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
