//! Bottleneck-adapter configuration (deltatune's own: PEFT has no bottleneck adapter), written
//! beside the adapter as `adapter_config.json` with `peft_type` `"BOTTLENECK_ADAPTER"`.

use std::collections::BTreeMap;

use deltatune_core::{HasSites, Result};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};

use crate::prompt::bad;

/// Where the adapters sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Houlsby et al. 2019 (default): a sequential adapter on the attention output and one on
    /// the feed-forward output, `out = out + up(act(down(out)))`, before the residual add and
    /// LayerNorm.
    #[default]
    Houlsby,
    /// Pfeiffer et al. 2021: one sequential adapter, on the feed-forward output.
    Pfeiffer,
    /// He et al. 2022: `out = out + scaling * up(act(down(input)))` beside the sub-layers named
    /// in `parallel_sites`.
    Parallel,
}

/// The adapter's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NonLinearity {
    /// max(0, x) (default).
    #[default]
    Relu,
    /// The exact (erf) GELU.
    Gelu,
    Tanh,
    /// x * sigmoid(x).
    Silu,
}

/// A sub-layer beside which a parallel adapter sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterSite {
    Attention,
    FeedForward,
}

/// Bottleneck adapters: `up(act(down(x)))` with `down` [b, hidden] and `up` [hidden, b] (both
/// with biases) at the sub-layer outputs of every layer (or of the layers in `layers`). `up`
/// starts at zero and `down` Kaiming-uniform (U(-1/sqrt(hidden), 1/sqrt(hidden)), as LoRA's A),
/// biases at zero, so that with `residual` (sequential) or in parallel the model's output starts
/// unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Where the adapters sit (default `houlsby`).
    #[serde(default)]
    pub placement: Placement,
    /// Bottleneck width = hidden / reduction_factor (default 16); must be in 1..=hidden.
    #[serde(default = "default_reduction")]
    pub reduction_factor: usize,
    /// Bottleneck width, overriding `reduction_factor` when set (default unset); 1..=hidden.
    #[serde(default)]
    pub bottleneck_size: Option<usize>,
    /// The activation inside the bottleneck (default `relu`).
    #[serde(default)]
    pub non_linearity: NonLinearity,
    /// Sequential placements: add the adapter's input to its output (default true). With false,
    /// the sub-layer output is replaced by the adapter's output (and the model no longer starts
    /// unchanged). Ignored by `parallel`, which always adds.
    #[serde(default = "yes")]
    pub residual: bool,
    /// Multiplier of a parallel adapter's output (default 4.0, as He et al.); finite.
    #[serde(default = "default_scaling")]
    pub scaling: f64,
    /// Sub-layers beside which parallel adapters sit (default `["feed_forward"]`; also
    /// `["attention", "feed_forward"]`). Only for `parallel`.
    #[serde(default = "default_parallel_sites")]
    pub parallel_sites: Vec<AdapterSite>,
    /// Only these layer indices get adapters (default: every layer).
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Dropout on the adapter's input while training, in [0, 1) (default 0).
    #[serde(default)]
    pub adapter_dropout: f64,
    /// PEFT's shared fields (`task_type`, `modules_to_save`, ...).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Unknown fields: rejected by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_reduction() -> usize {
    16
}
fn default_scaling() -> f64 {
    4.0
}
fn default_parallel_sites() -> Vec<AdapterSite> {
    vec![AdapterSite::FeedForward]
}
fn yes() -> bool {
    true
}

impl Default for BottleneckConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl BottleneckConfig {
    /// The bottleneck width for a model of width `hidden`.
    pub fn bottleneck(&self, hidden: usize) -> usize {
        self.bottleneck_size
            .unwrap_or(hidden / self.reduction_factor.max(1))
    }

    /// The sub-layers that get an adapter.
    pub fn sites(&self) -> Vec<AdapterSite> {
        match self.placement {
            Placement::Houlsby => vec![AdapterSite::Attention, AdapterSite::FeedForward],
            Placement::Pfeiffer => vec![AdapterSite::FeedForward],
            Placement::Parallel => {
                let mut s = self.parallel_sites.clone();
                s.sort();
                s.dedup();
                s
            }
        }
    }

    /// Rejects values outside their range that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if self.reduction_factor == 0 {
            return bad(
                "reduction_factor",
                "0 is not allowed; use a reduction_factor in 1..=hidden (e.g. 16)".into(),
            );
        }
        if self.bottleneck_size == Some(0) {
            return bad(
                "bottleneck_size",
                "0 is not allowed; use a bottleneck_size in 1..=hidden".into(),
            );
        }
        if !self.scaling.is_finite() {
            return bad(
                "scaling",
                format!("{} must be a finite number", self.scaling),
            );
        }
        if !(0.0..1.0).contains(&self.adapter_dropout) {
            return bad(
                "adapter_dropout",
                format!("{} must be in [0, 1)", self.adapter_dropout),
            );
        }
        if self.placement == Placement::Parallel && self.parallel_sites.is_empty() {
            return bad(
                "parallel_sites",
                "the list is empty; use [\"feed_forward\"] or [\"attention\", \"feed_forward\"]"
                    .into(),
            );
        }
        if let Some(l) = &self.layers {
            if l.is_empty() {
                return bad(
                    "layers",
                    "the list is empty; name at least one layer or leave it unset for all".into(),
                );
            }
        }
        check_other(
            &self.other,
            "BOTTLENECK_ADAPTER",
            &[],
            "bottleneck adapters",
        )
    }

    /// [`BottleneckConfig::validate`] plus the ranges that depend on `model`.
    pub fn validate_for(&self, model: &dyn HasSites) -> Result<()> {
        self.validate()?;
        let (hidden, n_layers) = (model.hidden_size(), model.num_layers());
        if self.reduction_factor > hidden {
            return bad(
                "reduction_factor",
                format!(
                    "{} is out of range; use a reduction_factor in 1..={hidden} (the hidden size)",
                    self.reduction_factor
                ),
            );
        }
        if let Some(b) = self.bottleneck_size {
            if b > hidden {
                return bad(
                    "bottleneck_size",
                    format!("{b} is out of range; use a bottleneck_size in 1..={hidden}"),
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
}
