//! BitFit: train only the biases of the linear layers (and of the LayerNorms), plus the head.
//!
//! Keys in `adapter_model.safetensors`: `base_model.model.<linear path>.bias` and
//! `base_model.model.<norm path>` (the norm path already ends in `.bias`), plus the
//! `modules_to_save` weights and biases. There is nothing to merge: loading the adapter sets the
//! biases, and the trained model is the base model with those biases replaced.

mod config;

use candle_core::Var;
use deltatune_core::{Error, HasSites, Result, Rng};

pub use config::BitFitConfig;

use crate::delta::{peft_key, train_modules, Trainable, PEFT_PREFIX};
use crate::method::{method_basics, Method};

/// Why a BitFit adapter is never merged.
pub const MERGE_NOTE: &str = "BitFit has nothing to merge: it adds no delta, the trained biases \
                              replace the base model's biases when the adapter is loaded";

/// The module path of a norm-bias path (`...LayerNorm.bias` -> `...LayerNorm`).
fn norm_module(path: &str) -> &str {
    path.strip_suffix(".bias").unwrap_or(path)
}

/// Makes the selected biases and `modules_to_save` trainable. Returns the trainable tensors under
/// their keys (biases without weight decay). `_rng` is unused (BitFit starts from the base
/// biases) and kept for the common `attach` signature.
pub fn attach(model: &mut dyn HasSites, cfg: &BitFitConfig, _rng: &Rng) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let save = cfg.common.modules_to_save.clone().unwrap_or_default();
    let is_saved = |p: &str| save.iter().any(|m| p == m || p.ends_with(&format!(".{m}")));
    // Linear layers with a bias that are not trained in full, then norm modules.
    let mut modules: Vec<String> = model
        .linears()
        .iter()
        .filter(|l| l.bias.is_some() && !is_saved(&l.path))
        .map(|l| l.path.clone())
        .collect();
    if cfg.include_norms {
        modules.extend(
            model
                .norm_biases_mut()
                .into_iter()
                .map(|(p, _)| norm_module(&p).to_string()),
        );
    }
    let refs: Vec<&str> = modules.iter().map(|s| s.as_str()).collect();
    let selected: Vec<String> = match &cfg.bias_pattern {
        Some(pattern) => pattern
            .select(&refs)?
            .into_iter()
            .map(String::from)
            .collect(),
        None => modules.clone(),
    };
    if selected.is_empty() {
        return Err(Error::Msg(
            "BitFit selected no bias: the model has none (Llama-family decoders have no biases); \
             use lora or ia3 instead"
                .into(),
        ));
    }
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        if lin.bias.is_some() && !is_saved(&lin.path) && selected.contains(&lin.path) {
            let key = peft_key(&lin.path, "bias");
            out.push(Trainable::new(key, lin.make_bias_trainable()?, false));
        }
    }
    if cfg.include_norms {
        for (path, bias) in model.norm_biases_mut() {
            if selected.iter().any(|s| s == norm_module(&path)) {
                let v = Var::from_tensor(&bias.detach().copy()?)?;
                *bias = v.as_tensor().clone();
                out.push(Trainable::new(format!("{PEFT_PREFIX}{path}"), v, false));
            }
        }
    }
    out.extend(train_modules(model, &save)?);
    Ok(out)
}

impl Method for BitFitConfig {
    method_basics!("bitfit", "BITFIT", attach);

    fn merge_blocker(&self) -> Option<String> {
        None
    }
}
