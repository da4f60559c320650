//! Every method behind one config type: read from and written to `adapter_config.json` by its
//! `peft_type`, attached to a model through the [`Method`] trait.

use std::ops::{Deref, DerefMut};

use deltatune_core::{Error, HasSites, Result};
use serde_json::Value;

use crate::adapter::BottleneckConfig;
use crate::bitfit::BitFitConfig;
use crate::compose::ComposeConfig;
use crate::full::{FullFinetuneConfig, LinearProbeConfig};
use crate::ia3::IA3Config;
use crate::intrinsic::IntrinsicPromptConfig;
use crate::lora::LoraConfig;
use crate::method::Method;
use crate::prefix::PrefixTuningConfig;
use crate::prompt::PromptTuningConfig;
use crate::vpt::VptConfig;

/// The method names `--method` accepts (`unipelt` and `mam` are compositions with fixed
/// members).
pub const METHODS: &[&str] = &[
    "lora",
    "ia3",
    "bitfit",
    "prompt",
    "prefix",
    "adapter",
    "intrinsic",
    "vpt",
    "probe",
    "full",
    "compose",
    "unipelt",
    "mam",
];

/// One delta method's configuration. Each variant implements [`Method`]; the enum derefs to
/// it, so `cfg.attach(..)`, `cfg.validate()`, `cfg.name()` work on any of them.
#[derive(Debug, Clone)]
pub enum DeltaConfig {
    Lora(LoraConfig),
    Ia3(IA3Config),
    BitFit(BitFitConfig),
    Prompt(PromptTuningConfig),
    Intrinsic(IntrinsicPromptConfig),
    Prefix(PrefixTuningConfig),
    Adapter(BottleneckConfig),
    Vpt(VptConfig),
    /// The head only (the linear probe).
    Probe(LinearProbeConfig),
    /// Every base tensor (full fine-tuning).
    Full(FullFinetuneConfig),
    /// Several of the above on one model.
    Compose(ComposeConfig),
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::InvalidConfig {
        field: what.into(),
        msg: e.to_string(),
    })
}

/// `peft_type` -> how to read that method's config.
type Reader = fn(Value) -> Result<DeltaConfig>;

const REGISTRY: &[(&str, Reader)] = &[
    ("LORA", |v| Ok(DeltaConfig::Lora(parse(v, "LoraConfig")?))),
    ("IA3", |v| Ok(DeltaConfig::Ia3(parse(v, "IA3Config")?))),
    ("BITFIT", |v| {
        Ok(DeltaConfig::BitFit(parse(v, "BitFitConfig")?))
    }),
    ("PROMPT_TUNING", |v| {
        Ok(DeltaConfig::Prompt(parse(v, "PromptTuningConfig")?))
    }),
    ("INTRINSIC_PROMPT", |v| {
        Ok(DeltaConfig::Intrinsic(parse(v, "IntrinsicPromptConfig")?))
    }),
    ("PREFIX_TUNING", |v| {
        Ok(DeltaConfig::Prefix(parse(v, "PrefixTuningConfig")?))
    }),
    ("BOTTLENECK_ADAPTER", |v| {
        Ok(DeltaConfig::Adapter(parse(v, "BottleneckConfig")?))
    }),
    ("VISUAL_PROMPT_TUNING", |v| {
        Ok(DeltaConfig::Vpt(parse(v, "VptConfig")?))
    }),
    ("LINEAR_PROBE", |v| {
        Ok(DeltaConfig::Probe(parse(v, "LinearProbeConfig")?))
    }),
    ("FULL_FINETUNE", |v| {
        Ok(DeltaConfig::Full(parse(v, "FullFinetuneConfig")?))
    }),
    ("COMPOSITION", |v| {
        Ok(DeltaConfig::Compose(ComposeConfig::from_json(v)?))
    }),
];

impl Deref for DeltaConfig {
    type Target = dyn Method;

    fn deref(&self) -> &(dyn Method + 'static) {
        match self {
            Self::Lora(c) => c,
            Self::Ia3(c) => c,
            Self::BitFit(c) => c,
            Self::Prompt(c) => c,
            Self::Intrinsic(c) => c,
            Self::Prefix(c) => c,
            Self::Adapter(c) => c,
            Self::Vpt(c) => c,
            Self::Probe(c) => c,
            Self::Full(c) => c,
            Self::Compose(c) => c,
        }
    }
}

impl DerefMut for DeltaConfig {
    fn deref_mut(&mut self) -> &mut (dyn Method + 'static) {
        match self {
            Self::Lora(c) => c,
            Self::Ia3(c) => c,
            Self::BitFit(c) => c,
            Self::Prompt(c) => c,
            Self::Intrinsic(c) => c,
            Self::Prefix(c) => c,
            Self::Adapter(c) => c,
            Self::Vpt(c) => c,
            Self::Probe(c) => c,
            Self::Full(c) => c,
            Self::Compose(c) => c,
        }
    }
}

impl DeltaConfig {
    /// Reads an `adapter_config.json` value, dispatching on `peft_type`.
    pub fn from_json(v: Value) -> Result<Self> {
        let ty = v.get("peft_type").and_then(|t| t.as_str()).unwrap_or("");
        match REGISTRY.iter().find(|(name, _)| *name == ty) {
            Some((_, read)) => read(v),
            None => Err(Error::InvalidConfig {
                field: "peft_type".into(),
                msg: format!(
                    "`{ty}` is not a method deltatune knows ({})",
                    REGISTRY
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// The `adapter_config.json` value: `peft_type` and the method's fields, completed with
    /// what the model tells (e.g. `token_dim`).
    pub fn to_json(&self, model: &dyn HasSites) -> Value {
        let mut v = self.fields_json(model);
        if let Value::Object(m) = &mut v {
            m.insert("peft_type".into(), Value::from(self.peft_type()));
        }
        v
    }

    /// The modules trained in full and saved with the delta.
    pub fn modules_to_save(&self) -> Option<&[String]> {
        self.common().modules_to_save.as_deref()
    }

    /// The same config with `modules_to_save` replaced.
    pub fn with_modules_to_save(&self, m: Option<Vec<String>>) -> Self {
        let mut c = self.clone();
        c.common_mut().modules_to_save = m;
        c
    }

    /// Sets `base_model_name_or_path` and `inference_mode` for saving.
    pub fn for_saving(&self, base: &str) -> Self {
        let mut c = self.clone();
        let common = c.common_mut();
        common.base_model_name_or_path = Some(base.to_string());
        common.inference_mode = true;
        c
    }
}
