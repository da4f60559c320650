//! What every delta method implements. A method is its configuration: it validates itself,
//! writes its `adapter_config.json`, attaches to a model's named sites, and says how it is
//! saved, merged and gated. Nothing outside a method's folder knows which method it is.

use std::collections::BTreeMap;

use candle_core::Tensor;
use deltatune_core::{HasSites, Result, Rng};
use serde_json::Value;

use crate::common::PeftCommon;
use crate::delta::{state_dict, Trainable};
use crate::registry::DeltaConfig;

/// Where a composition with `gates` puts a method's UniPELT gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePlacement<'a> {
    /// A per-token sigmoid gate per layer on the outputs of the linear deltas the method
    /// attached (LoRA).
    LinearOutputs,
    /// A per-token sigmoid gate per layer on the method's sub-layer deltas, in `layers`
    /// (`None`: all layers) (bottleneck adapters).
    Sublayers { layers: Option<&'a [usize]> },
    /// A scalar gate per layer on the method's attention prefix, in `layers` (prefix tuning).
    Prefix { layers: Option<&'a [usize]> },
}

/// A config as JSON: every serde config has it.
pub trait ToFields {
    /// `serde_json::to_value` of the config.
    fn to_fields(&self) -> Value;
}

impl<T: serde::Serialize> ToFields for T {
    fn to_fields(&self) -> Value {
        serde_json::to_value(self).expect("configs serialise")
    }
}

/// One delta method's configuration and behaviour.
pub trait Method: ToFields + std::fmt::Debug + Send + Sync {
    /// The `--method` name (`lora`, `prefix`, ...).
    fn name(&self) -> &'static str;

    /// PEFT's `peft_type` (`LORA`, `PREFIX_TUNING`, ...; deltatune's own methods have their own).
    fn peft_type(&self) -> &'static str;

    /// PEFT's shared fields.
    fn common(&self) -> &PeftCommon;

    /// PEFT's shared fields, to change.
    fn common_mut(&mut self) -> &mut PeftCommon;

    /// Checks every field against its allowed range (what can be checked without a model).
    fn validate(&self) -> Result<()>;

    /// The method's fields as `adapter_config.json` holds them (without `peft_type`), completed
    /// with what `model` tells (e.g. a prompt's `token_dim`); by default the config as it is.
    fn fields_json(&self, _model: &dyn HasSites) -> Value {
        self.to_fields()
    }

    /// Attaches the method for training; `init_text_ids` are the token ids of a
    /// prompt-initialisation text, when [`Method::init_text`] gave one.
    fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>>;

    /// Attaches the method in the form its saved file holds (prefix tuning: the folded
    /// `prompt_embeddings`, without the reparameterisation MLP).
    fn attach_saved(&self, model: &mut dyn HasSites, rng: &Rng) -> Result<Vec<Trainable>> {
        self.attach(model, rng, None)
    }

    /// The tensors to save from the training-form trainables.
    fn export(&self, trainables: &[Trainable]) -> Result<BTreeMap<String, Tensor>> {
        Ok(state_dict(trainables))
    }

    /// Why the delta cannot be folded into the base weights, or `None` when it can.
    fn merge_blocker(&self) -> Option<String>;

    /// Where a gated composition puts this method's gate; `None`: the method is not gated.
    fn gate(&self) -> Option<GatePlacement<'_>> {
        None
    }

    /// The text whose token ids initialise a prompt, if the method (or a member) wants one.
    fn init_text(&self) -> Option<&str> {
        None
    }

    /// The learned-subspace path of an intrinsic prompt (itself or a member), to copy the
    /// artifact beside a saved adapter and resolve it on load.
    fn subspace_mut(&mut self) -> Option<&mut Option<String>> {
        None
    }

    /// The members of a composition; empty for a single method.
    fn members(&self) -> &[DeltaConfig] {
        &[]
    }
}

/// The sentence every non-mergeable method ends its [`Method::merge_blocker`] with.
pub(crate) fn unmergeable(why: &str) -> Option<String> {
    Some(format!(
        "{why}. Use the adapter unmerged (`deltatune predict --adapter ...`)"
    ))
}

/// The [`Method`] functions every single method writes the same way: its names, its
/// [`PeftCommon`] field `common`, `validate` by its inherent `validate`, and (with `attach`)
/// `attach` by the module's `attach(model, cfg, rng)`.
macro_rules! method_basics {
    ($name:literal, $peft_type:literal, attach) => {
        $crate::method::method_basics!($name, $peft_type);

        fn attach(
            &self,
            model: &mut dyn deltatune_core::HasSites,
            rng: &deltatune_core::Rng,
            _init_text_ids: Option<&[u32]>,
        ) -> deltatune_core::Result<Vec<$crate::Trainable>> {
            attach(model, self, rng)
        }
    };
    ($name:literal, $peft_type:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn peft_type(&self) -> &'static str {
            $peft_type
        }

        fn common(&self) -> &$crate::common::PeftCommon {
            &self.common
        }

        fn common_mut(&mut self) -> &mut $crate::common::PeftCommon {
            &mut self.common
        }

        fn validate(&self) -> deltatune_core::Result<()> {
            Self::validate(self)
        }
    };
}
pub(crate) use method_basics;
