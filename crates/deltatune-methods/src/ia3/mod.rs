//! (IA)^3: learned rescaling vectors on selected linear layers, PEFT-compatible
//! (`base_model.model.<path>.ia3_l`, shape [out, 1] or [1, in] for feed-forward targets).
//!
//! On BERT with PEFT's defaults (`key`, `value`, `output.dense`; feed-forward `output.dense`,
//! which by PEFT's plain suffix test also covers `attention.output.dense`), each layer trains
//! `hidden` (key) + `hidden` (value) + `hidden` (attention.output.dense input) + `intermediate`
//! (output.dense input) values: 144 per layer on the 2-layer tiny BERT (hidden 32,
//! intermediate 48), 288 in all, 387 with the 3-label classifier; 16,898 on MiniLM-L6 with a
//! 2-label classifier, as PEFT reports.

mod config;
mod layer;

use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::{Error, HasSites, Result, Rng};

pub use config::IA3Config;
pub use layer::Ia3Linear;

use crate::delta::{peft_key, train_modules, Trainable};
use crate::method::{method_basics, Method};

/// Attaches a scaling vector to every site `cfg` selects and makes `modules_to_save` trainable.
/// Returns the trainable tensors under their PEFT keys (the vectors without weight decay).
pub fn attach(model: &mut dyn HasSites, cfg: &IA3Config, rng: &Rng) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    let path_refs: Vec<&str> = paths.iter().map(|s| s.as_str()).collect();
    let save = cfg.common.modules_to_save.clone().unwrap_or_default();
    let is_saved = |p: &str| save.iter().any(|m| p == m || p.ends_with(&format!(".{m}")));
    // Heads that train in full are not IA3 targets.
    let candidates: Vec<&str> = path_refs.iter().copied().filter(|p| !is_saved(p)).collect();
    let targets: Vec<String> = cfg
        .target_modules
        .select(&candidates)?
        .into_iter()
        .map(String::from)
        .collect();
    if targets.is_empty() {
        return Err(Error::Msg("IA3 selected no linear layer".into()));
    }
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        if !targets.contains(&lin.path) {
            continue;
        }
        let path = lin.path.clone();
        let feedforward = cfg.is_feedforward(&path)?;
        let shape = if feedforward {
            (1, lin.in_features())
        } else {
            (lin.out_features(), 1)
        };
        let (dtype, device) = (lin.weight.dtype(), lin.weight.device().clone());
        let init = if cfg.init_ia3_weights {
            Tensor::ones(shape, dtype, &device)?
        } else {
            rng.derive(&path)
                .normal_tensor(shape, 1.0)?
                .to_dtype(dtype)?
                .to_device(&device)?
        };
        let l = Var::from_tensor(&init)?;
        out.push(Trainable::new(peft_key(&path, "ia3_l"), l.clone(), false));
        lin.deltas.push(Arc::new(Ia3Linear { l, feedforward }));
    }
    out.extend(train_modules(model, &save)?);
    Ok(out)
}

impl Method for IA3Config {
    method_basics!("ia3", "IA3", attach);

    fn merge_blocker(&self) -> Option<String> {
        None
    }
}
