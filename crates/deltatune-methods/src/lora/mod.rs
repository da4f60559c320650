//! LoRA: low-rank updates of selected linear layers, PEFT-compatible.

pub mod combine;
mod config;
mod layer;
pub mod multi;

use std::sync::Arc;

use candle_core::Var;
use deltatune_core::{Error, HasSites, Result, Rng};

pub use config::{LoraBias, LoraConfig, Patterns};
pub use layer::LoraLinear;

use crate::delta::{peft_key, Trainable, PEFT_PREFIX};
use crate::method::{method_basics, GatePlacement, Method};

/// The leaf of a LoRA-targeted layer's bias in PEFT's files: PEFT wraps the layer, so its bias is
/// `<path>.base_layer.bias` (`bias` `lora_only` or `all`).
pub const BASE_LAYER_BIAS: &str = "base_layer.bias";

/// Attaches LoRA to the sites `cfg` selects and makes the requested biases and
/// `modules_to_save` trainable. Returns the trainable tensors under their PEFT keys.
pub fn attach(model: &mut dyn HasSites, cfg: &LoraConfig, rng: &Rng) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    let path_refs: Vec<&str> = paths.iter().map(|s| s.as_str()).collect();
    let save = cfg.common.modules_to_save.clone().unwrap_or_default();
    let is_saved = |p: &str| save.iter().any(|m| p == m || p.ends_with(&format!(".{m}")));
    // Heads that train in full are not LoRA targets.
    let candidates: Vec<&str> = path_refs.iter().copied().filter(|p| !is_saved(p)).collect();
    let mut targets = cfg.target_modules.select(&candidates)?;
    if let Some(layers) = &cfg.layers_to_transform {
        let n_layers = model.num_layers();
        if let Some(bad) = layers.iter().find(|&&l| l >= n_layers) {
            return Err(Error::InvalidConfig {
                field: "layers_to_transform".into(),
                msg: format!(
                    "layer {bad} is out of range; the model has layers 0..={}",
                    n_layers.saturating_sub(1)
                ),
            });
        }
        targets.retain(|p| model.layer_of(p).is_some_and(|i| layers.contains(&i)));
    }
    // PEFT ignores `modules_to_save` entries a model lacks (it lists `score` for every
    // classifier); a list of which no entry matches is an error.
    if !save.is_empty() && !path_refs.iter().any(|p| is_saved(p)) {
        return Err(Error::NoMatch {
            pattern: format!("modules_to_save: {}", save.join(", ")),
            nearest: deltatune_core::error::nearest_names(&save[0], path_refs.iter().copied(), 5),
        });
    }
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        let path = lin.path.clone();
        if targets.contains(&path.as_str()) {
            let mut r = rng.derive(&path);
            let (o, i) = (lin.out_features(), lin.in_features());
            let rank = cfg.rank_for(&path)?;
            // PEFT: kaiming_uniform_(a = sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
            let bound = 1.0 / (i as f64).sqrt();
            let a = r.uniform_tensor((rank, i), -bound, bound)?;
            let b = if cfg.init_lora_weights {
                candle_core::Tensor::zeros((o, rank), a.dtype(), a.device())?
            } else {
                r.uniform_tensor((o, rank), -bound, bound)?
            };
            let a = candle_core::Var::from_tensor(&a)?;
            let b = candle_core::Var::from_tensor(&b)?;
            out.push(Trainable::new(
                peft_key(&path, "lora_A.weight"),
                a.clone(),
                true,
            ));
            out.push(Trainable::new(
                peft_key(&path, "lora_B.weight"),
                b.clone(),
                true,
            ));
            lin.deltas.push(Arc::new(LoraLinear {
                a,
                b,
                scale: cfg.scale_for(&path)?,
                dropout: cfg.lora_dropout,
            }));
            // PEFT saves a targeted layer's bias under its wrapped base layer's name.
            if cfg.bias != LoraBias::None && lin.bias.is_some() {
                out.push(Trainable::new(
                    peft_key(&path, BASE_LAYER_BIAS),
                    lin.make_bias_trainable()?,
                    false,
                ));
            }
        } else if is_saved(&path) {
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
            continue;
        }
        if cfg.bias == LoraBias::All
            && lin.bias.is_some()
            && !targets.is_empty()
            && !targets.contains(&path.as_str())
        {
            out.push(Trainable::new(
                peft_key(&path, "bias"),
                lin.make_bias_trainable()?,
                false,
            ));
        }
    }
    // PEFT's `all` trains every bias of the model, the norms' too (`...LayerNorm.bias`).
    if cfg.bias == LoraBias::All && !targets.is_empty() {
        for (path, bias) in model.norm_biases_mut() {
            let v = Var::from_tensor(&bias.detach().copy()?)?;
            *bias = v.as_tensor().clone();
            out.push(Trainable::new(format!("{PEFT_PREFIX}{path}"), v, false));
        }
    }
    Ok(out)
}

impl Method for LoraConfig {
    method_basics!("lora", "LORA", attach);

    fn merge_blocker(&self) -> Option<String> {
        None
    }

    fn gate(&self) -> Option<GatePlacement<'_>> {
        Some(GatePlacement::LinearOutputs)
    }
}
