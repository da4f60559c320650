//! Every method behind one config type: read from and written to `adapter_config.json` by its
//! `peft_type`, attached to a model by name.

use deltatune_core::{Error, HasSites, Result, Rng};
use serde_json::Value;

use crate::adapter::BottleneckConfig;
use crate::bitfit::BitFitConfig;
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
            other => {
                return Err(Error::InvalidConfig {
                    field: "peft_type".into(),
                    msg: format!(
                        "`{other}` is not a method deltatune knows (LORA, IA3, BITFIT, PROMPT_TUNING, PREFIX_TUNING, BOTTLENECK_ADAPTER, INTRINSIC_PROMPT)"
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
        }
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
        }
    }
}

impl DeltaConfig {
    /// Attaches the method in the form its saved file holds (prefix tuning: the folded
    /// `prompt_embeddings`, without the reparameterisation MLP).
    pub fn attach_saved(&self, model: &mut dyn HasSites, rng: &Rng) -> Result<Vec<Trainable>> {
        match self {
            Self::Prefix(c) => crate::prefix::attach_folded(model, c, rng),
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
            _ => Ok(crate::delta::state_dict(trainables)),
        }
    }
}
