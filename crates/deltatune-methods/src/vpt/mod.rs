//! Visual prompt tuning (Jia et al. 2022), shallow and deep: trainable vectors after CLS,
//! at the input only or replaced at every layer. Saved as `vpt_prompts` `[L or 1, P, hidden]`
//! (row 0: the input prompts; row i: the prompts entering layer i).

mod config;

use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::hooks::SiteDelta;
use deltatune_core::{Ctx, HasSites, Result, Rng};

pub use config::VptConfig;

use crate::delta::{train_modules, Trainable};
use crate::method::{method_basics, unmergeable, Method};

/// The key of the prompts in `adapter_model.safetensors`.
pub const VPT_KEY: &str = "vpt_prompts";

/// The prompts `[L or 1, P, hidden]` at the prompt and deep-prompt sites.
#[derive(Debug, Clone)]
pub struct VptDelta {
    pub prompts: Tensor,
    pub dropout: f64,
}

impl SiteDelta for VptDelta {
    fn prompt(&self, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(ctx.dropout(&self.prompts.get(0)?, self.dropout)?))
    }

    fn deep_prompt(&self, layer: usize, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        if layer == 0 || layer >= self.prompts.dim(0)? {
            return Ok(None);
        }
        Ok(Some(ctx.dropout(&self.prompts.get(layer)?, self.dropout)?))
    }
}

/// Attaches the prompts (a set per layer with `deep`) and makes `modules_to_save` trainable.
pub fn attach(model: &mut dyn HasSites, cfg: &VptConfig, rng: &Rng) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let h = model.hidden_size();
    let sets = if cfg.deep { model.num_layers() } else { 1 };
    let v = cfg
        .init_range
        .unwrap_or_else(|| (6.0 / (2.0 * h as f64)).sqrt());
    let mut r = rng.derive(VPT_KEY);
    let init = r.uniform_tensor((sets, cfg.num_virtual_tokens, h), -v, v)?;
    let var = Var::from_tensor(&init)?;
    let mut out = vec![Trainable::new(VPT_KEY.into(), var.clone(), false)];
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    model.attach_site_delta(Arc::new(VptDelta {
        prompts: var.as_tensor().clone(),
        dropout: cfg.prompt_dropout,
    }));
    Ok(out)
}

impl Method for VptConfig {
    method_basics!("vpt", "VISUAL_PROMPT_TUNING", attach);

    fn merge_blocker(&self) -> Option<String> {
        unmergeable(
            "visual prompt tuning adds input vectors (the sequence gets longer); no weight change \
             reproduces them",
        )
    }
}
