//! Every method behind one config type: read from and written to `adapter_config.json` by its
//! `peft_type`, attached to a model by name.

use deltatune_core::{Error, HasSites, Result, Rng};
use serde_json::Value;

use crate::adapter::BottleneckConfig;
use crate::bitfit::BitFitConfig;
use crate::compose::ComposeConfig;
use crate::delta::Trainable;
use crate::ia3::IA3Config;
use crate::intrinsic::IntrinsicPromptConfig;
use crate::lora::LoraConfig;
use crate::prefix::PrefixTuningConfig;
use crate::prompt::PromptTuningConfig;

/// The method names `--method` accepts.
pub const METHODS: &[&str] = &[
    "lora",
    "ia3",
    "bitfit",
    "prompt",
    "prefix",
    "adapter",
    "intrinsic",
    "compose",
    "unipelt",
    "mam",
];

/// One delta method's configuration.
#[derive(Debug, Clone)]
pub enum DeltaConfig {
    Lora(LoraConfig),
    Ia3(IA3Config),
    BitFit(BitFitConfig),
    Prompt(PromptTuningConfig),
    Intrinsic(IntrinsicPromptConfig),
    Prefix(PrefixTuningConfig),
    Adapter(BottleneckConfig),
    /// Several of the above on one model.
    Compose(ComposeConfig),
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::InvalidConfig {
        field: what.into(),
        msg: e.to_string(),
    })
}

impl DeltaConfig {
    /// Reads an `adapter_config.json` value, dispatching on `peft_type`.
    pub fn from_json(v: Value) -> Result<Self> {
        let ty = v
            .get("peft_type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string();
        Ok(match ty.as_str() {
            "LORA" => Self::Lora(parse(v, "LoraConfig")?),
            "IA3" => Self::Ia3(parse(v, "IA3Config")?),
            "BITFIT" => Self::BitFit(parse(v, "BitFitConfig")?),
            "PROMPT_TUNING" => Self::Prompt(parse(v, "PromptTuningConfig")?),
            "INTRINSIC_PROMPT" => Self::Intrinsic(parse(v, "IntrinsicPromptConfig")?),
            "PREFIX_TUNING" => Self::Prefix(parse(v, "PrefixTuningConfig")?),
            "BOTTLENECK_ADAPTER" => Self::Adapter(parse(v, "BottleneckConfig")?),
            "COMPOSITION" => Self::Compose(ComposeConfig::from_json(v)?),
            other => {
                return Err(Error::InvalidConfig {
                    field: "peft_type".into(),
                    msg: format!(
                        "`{other}` is not a method deltatune knows (LORA, IA3, BITFIT, PROMPT_TUNING, PREFIX_TUNING, BOTTLENECK_ADAPTER, INTRINSIC_PROMPT, COMPOSITION)"
                    ),
                })
            }
        })
    }

    /// The `adapter_config.json` value, completed with what the model tells (e.g. `token_dim`).
    pub fn to_json(&self, model: &dyn HasSites) -> Value {
        let v = match self {
            Self::Lora(c) => serde_json::to_value(c),
            Self::Ia3(c) => serde_json::to_value(c),
            Self::BitFit(c) => serde_json::to_value(c),
            Self::Prompt(c) => serde_json::to_value(c.completed(model)),
            Self::Intrinsic(c) => serde_json::to_value(c),
            Self::Prefix(c) => serde_json::to_value(c.completed(model)),
            Self::Adapter(c) => serde_json::to_value(c),
            Self::Compose(c) => return c.to_json(model),
        };
        v.expect("configs serialise")
    }

    /// The `--method` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lora(_) => "lora",
            Self::Ia3(_) => "ia3",
            Self::BitFit(_) => "bitfit",
            Self::Prompt(_) => "prompt",
            Self::Intrinsic(_) => "intrinsic",
            Self::Prefix(_) => "prefix",
            Self::Adapter(_) => "adapter",
            Self::Compose(_) => "compose",
        }
    }

    /// Checks every field against its allowed range (what can be checked without a model).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Lora(c) => c.validate(),
            Self::Ia3(c) => c.validate(),
            Self::BitFit(c) => c.validate(),
            Self::Prompt(c) => c.validate(),
            Self::Intrinsic(c) => c.validate(),
            Self::Prefix(c) => c.validate(),
            Self::Adapter(c) => c.validate(),
            Self::Compose(c) => c.validate(),
        }
    }

    /// The modules trained in full and saved with the delta.
    pub fn modules_to_save(&self) -> Option<&[String]> {
        match self {
            Self::Lora(c) => c.modules_to_save.as_deref(),
            Self::Ia3(c) => c.modules_to_save.as_deref(),
            Self::BitFit(c) => c.modules_to_save.as_deref(),
            Self::Prompt(c) => c.modules_to_save.as_deref(),
            Self::Intrinsic(c) => c.modules_to_save.as_deref(),
            Self::Prefix(c) => c.modules_to_save.as_deref(),
            Self::Adapter(c) => c.modules_to_save.as_deref(),
            Self::Compose(c) => c.modules_to_save.as_deref(),
        }
    }

    /// The same config with `modules_to_save` replaced.
    pub fn with_modules_to_save(&self, m: Option<Vec<String>>) -> Self {
        let mut c = self.clone();
        match &mut c {
            Self::Lora(x) => x.modules_to_save = m,
            Self::Ia3(x) => x.modules_to_save = m,
            Self::BitFit(x) => x.modules_to_save = m,
            Self::Prompt(x) => x.modules_to_save = m,
            Self::Intrinsic(x) => x.modules_to_save = m,
            Self::Prefix(x) => x.modules_to_save = m,
            Self::Adapter(x) => x.modules_to_save = m,
            Self::Compose(x) => x.modules_to_save = m,
        }
        c
    }

    /// The learned-subspace path of an intrinsic prompt (itself or a composition member), to
    /// copy the artifact beside a saved adapter and resolve it on load.
    pub fn subspace_mut(&mut self) -> Option<&mut Option<String>> {
        match self {
            Self::Intrinsic(c) => Some(&mut c.subspace),
            Self::Compose(c) => c.deltas.iter_mut().find_map(|d| d.subspace_mut()),
            _ => None,
        }
    }

    /// Why the delta cannot be folded into the base weights, or `None` when it can (LoRA, IA3,
    /// BitFit, and compositions of only those without gates).
    pub fn merge_blocker(&self) -> Option<String> {
        let why = match self {
            Self::Lora(_) | Self::Ia3(_) | Self::BitFit(_) => return None,
            Self::Prompt(_) => "prompt tuning adds input vectors (the sequence gets longer); no weight change reproduces them",
            Self::Intrinsic(_) => "intrinsic prompt tuning adds input vectors (the sequence gets longer); no weight change reproduces them",
            Self::Prefix(_) => "prefix tuning adds keys and values to every attention layer; no weight change reproduces them",
            Self::Adapter(_) => "bottleneck adapters add a non-linear module after the sub-layers; no weight change reproduces it",
            Self::Compose(c) => {
                if c.gates {
                    return Some("gated compositions cannot be merged: each gate depends on the input".into());
                }
                return c.deltas.iter().find_map(|d| d.merge_blocker());
            }
        };
        Some(format!(
            "{why}. Use the adapter unmerged (`deltatune predict --adapter ...`)"
        ))
    }

    /// Sets `base_model_name_or_path` and `inference_mode` for saving.
    pub fn for_saving(&self, base: &str) -> Self {
        let mut c = self.clone();
        macro_rules! set {
            ($x:expr) => {{
                $x.base_model_name_or_path = Some(base.to_string());
                $x.inference_mode = true;
            }};
        }
        match &mut c {
            Self::Lora(x) => set!(x),
            Self::Ia3(x) => set!(x),
            Self::BitFit(x) => set!(x),
            Self::Prompt(x) => set!(x),
            Self::Intrinsic(x) => set!(x),
            Self::Prefix(x) => set!(x),
            Self::Adapter(x) => set!(x),
            Self::Compose(x) => set!(x),
        }
        c
    }

    /// Attaches the method for training; `init_text_ids` are the token ids of a
    /// prompt-initialisation text.
    pub fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>> {
        match self {
            Self::Prefix(c) => crate::prefix::attach(model, c, rng),
            Self::Adapter(c) => crate::adapter::attach(model, c, rng),
            Self::Lora(c) => crate::lora::attach(model, c, rng),
            Self::Ia3(c) => crate::ia3::attach(model, c, rng),
            Self::BitFit(c) => crate::bitfit::attach(model, c, rng),
            Self::Prompt(c) => crate::prompt::attach(model, c, rng, init_text_ids),
            Self::Intrinsic(c) => crate::intrinsic::attach(model, c, rng),
            Self::Compose(c) => crate::compose::attach(model, c, rng, init_text_ids, false),
        }
    }
}

impl DeltaConfig {
    /// Attaches the method in the form its saved file holds (prefix tuning: the folded
    /// `prompt_embeddings`, without the reparameterisation MLP).
    pub fn attach_saved(&self, model: &mut dyn HasSites, rng: &Rng) -> Result<Vec<Trainable>> {
        match self {
            Self::Prefix(c) => crate::prefix::attach_folded(model, c, rng),
            Self::Compose(c) => crate::compose::attach(model, c, rng, None, true),
            _ => self.attach(model, rng, None),
        }
    }

    /// The tensors to save from the training-form trainables.
    pub fn export(
        &self,
        trainables: &[Trainable],
    ) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        match self {
            Self::Prefix(c) if c.prefix_projection => crate::prefix::export(trainables),
            Self::Compose(c) => crate::compose::export(c, trainables),
            _ => Ok(crate::delta::state_dict(trainables)),
        }
    }
}
