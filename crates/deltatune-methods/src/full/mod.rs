//! The two references every delta-tuning paper reports beside its methods: the linear probe
//! (only the head trains) and full fine-tuning (every base tensor trains). Both are deltatune's
//! own `peft_type`s (`LINEAR_PROBE`, `FULL_FINETUNE`); the saved tensors are the trained ones
//! under `base_model.model.<path>`, and loading them replaces the base's.

use std::collections::BTreeMap;

use candle_core::Var;
use deltatune_core::{Error, HasSites, Result, Rng};
use serde::{Deserialize, Serialize};

use crate::common::{check_other, PeftCommon};
use crate::delta::{peft_key, train_modules, Trainable, PEFT_PREFIX};
use crate::method::{method_basics, Method};

/// The linear probe: nothing but `modules_to_save` (default `["classifier"]`) trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LinearProbeConfig {
    /// PEFT's shared fields; `modules_to_save` names the head.
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field: accepted only at a neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl LinearProbeConfig {
    /// Rejects unknown non-neutral fields and an empty head.
    pub fn validate(&self) -> Result<()> {
        if self
            .common
            .modules_to_save
            .as_ref()
            .is_none_or(|m| m.is_empty())
        {
            return Err(Error::InvalidConfig {
                field: "modules_to_save".into(),
                msg: "a linear probe trains only modules_to_save: name the head (e.g. \
                      [\"classifier\"])"
                    .into(),
            });
        }
        check_other(&self.other, "LINEAR_PROBE", &[], "linear probe")
    }
}

/// Makes the head trainable.
pub fn attach_probe(
    model: &mut dyn HasSites,
    cfg: &LinearProbeConfig,
    _rng: &Rng,
) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )
}

impl Method for LinearProbeConfig {
    method_basics!("probe", "LINEAR_PROBE");

    fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        _init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>> {
        attach_probe(model, self, rng)
    }

    fn merge_blocker(&self) -> Option<String> {
        None
    }
}

/// Full fine-tuning: every linear layer (weights and biases) and every other base tensor the
/// model offers (norms, embeddings, layer scales) trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FullFinetuneConfig {
    /// PEFT's shared fields (`modules_to_save` is implied: everything trains).
    #[serde(flatten)]
    pub common: PeftCommon,
    /// Any other field: accepted only at a neutral value.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl FullFinetuneConfig {
    /// Rejects unknown non-neutral fields.
    pub fn validate(&self) -> Result<()> {
        check_other(&self.other, "FULL_FINETUNE", &[], "full fine-tuning")
    }
}

/// Makes every base tensor trainable. Weight decay applies to linear weights only.
pub fn attach_full(
    model: &mut dyn HasSites,
    cfg: &FullFinetuneConfig,
    _rng: &Rng,
) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    if model.dense_parameters_mut().is_empty() {
        return Err(Error::Msg(
            "full fine-tuning is offered for the image models; this model does not list its \
             norms and embeddings for training (use lora with target_modules all-linear for a \
             large update)"
                .into(),
        ));
    }
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        if lin.quant.is_some() {
            return Err(Error::Msg(format!(
                "full fine-tuning needs an f32 base, and {} is stored quantized",
                lin.path
            )));
        }
        let path = lin.path.clone();
        out.push(Trainable::new(
            peft_key(&path, "weight"),
            lin.make_weight_trainable()?,
            true,
        ));
        if lin.bias.is_some() {
            out.push(Trainable::new(
                peft_key(&path, "bias"),
                lin.make_bias_trainable()?,
                false,
            ));
        }
    }
    for (key, t) in model.dense_parameters_mut() {
        let v = Var::from_tensor(&t.detach().copy()?)?;
        *t = v.as_tensor().clone();
        out.push(Trainable::new(format!("{PEFT_PREFIX}{key}"), v, false));
    }
    Ok(out)
}

impl Method for FullFinetuneConfig {
    method_basics!("full", "FULL_FINETUNE");

    fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        _init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>> {
        attach_full(model, self, rng)
    }

    fn merge_blocker(&self) -> Option<String> {
        None
    }
}
