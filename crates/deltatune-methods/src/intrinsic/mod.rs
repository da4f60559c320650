//! Intrinsic prompt tuning: a soft prompt decoded from a low-dimensional vector,
//! `prompt = P0 + reshape(D z)`, with only `z` [d] (and the head) trained.
//!
//! The random subspace follows Aghajanyan et al. 2021 ("Intrinsic Dimensionality Explains the
//! Effectiveness of Language Model Fine-Tuning"), applied to the prompt rather than to all
//! weights; the learned subspace ([`fit_subspace`]) follows Qin et al. 2021.
//!
//! Scale of `D`: entries behave like N(0, s^2 / d), `s` the root-mean-square entry of the base
//! model's word-embedding matrix. A `z` whose coordinates are about 1 then moves each prompt
//! entry by about `s`, the size of a real token's embedding, so Adam at learning rates 1e-2 to
//! 1e-1 moves the prompt by a token's scale in tens of steps, whatever `d` is. (N(0, 1/d), the
//! textbook choice, would make a unit `z` move prompt entries by 1, 20 to 50 times a BERT
//! embedding, and one Adam step at lr 1e-1 would swamp the prompt.)
//!
//! `D` and `P0` are regenerated from `projection_seed` and the base model when an adapter is
//! loaded, so `adapter_model.safetensors` stores only `intrinsic_z` [d] and `modules_to_save`.

mod config;
mod projection;
mod subspace;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use deltatune_core::hooks::SiteDelta;
use deltatune_core::{Ctx, HasSites, Result, Rng};

pub use config::{BasePromptInit, IntrinsicPromptConfig, ProjectionKind};
pub use projection::{fwht, Fastfood, Projection};
pub use subspace::{fit_subspace, Subspace, BASIS_KEY, P0_KEY};

use crate::delta::{train_modules, Trainable};
use crate::method::{method_basics, unmergeable, Method};
use crate::prompt::{bad, rms, sample_vocab};

/// The key of `z` in `adapter_model.safetensors`.
pub const Z_KEY: &str = "intrinsic_z";

/// The fixed part of an intrinsic prompt: `P0` and `D`.
#[derive(Debug, Clone)]
pub struct Decoder {
    p0: Tensor,
    projection: Projection,
}

impl Decoder {
    /// The base prompt `P0` [P, hidden] (what `z = 0` decodes to).
    pub fn p0(&self) -> &Tensor {
        &self.p0
    }

    /// The map `D`.
    pub fn projection(&self) -> &Projection {
        &self.projection
    }

    /// `P0 + reshape(D z)`, differentiable in `z`.
    ///
    /// # Shapes
    /// `z`: [d] -> [P, hidden]
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.projection.apply(z)?.reshape(self.p0.shape())?;
        &self.p0 + x
    }
}

/// Builds `P0` and `D` for `cfg` on `model`: from `cfg.subspace` when set, else from
/// `cfg.projection_seed`. Deterministic: the same config and base model give the same decoder.
pub fn decoder(model: &dyn HasSites, cfg: &IntrinsicPromptConfig) -> Result<Decoder> {
    let hidden = model.hidden_size();
    cfg.validate_for(hidden)?;
    let (p, d) = (cfg.num_virtual_tokens, cfg.intrinsic_dim);
    let n = p * hidden;
    if let Some(path) = &cfg.subspace {
        let s = Subspace::load(Path::new(path))?;
        if s.p0.dims() != [p, hidden] || s.dim() != d {
            return bad(
                "subspace",
                format!(
                    "`{path}` holds P0 {:?} and a basis of dimension {}, but the config asks for \
                     [{p}, {hidden}] (num_virtual_tokens, hidden) and intrinsic_dim {d}",
                    s.p0.dims(),
                    s.dim()
                ),
            );
        }
        return Ok(Decoder {
            p0: s.p0,
            projection: Projection::Dense { d: s.d },
        });
    }
    let words = model.word_embeddings().to_dtype(DType::F32)?;
    let root = Rng::new(cfg.projection_seed);
    let p0 = match cfg.base_prompt_init {
        BasePromptInit::SampleVocab => {
            sample_vocab(&words, p, &mut root.derive("intrinsic.base_prompt"))?
        }
        BasePromptInit::Zero => Tensor::zeros((p, hidden), DType::F32, words.device())?,
    };
    let scale = rms(&words)? / (d as f64).sqrt();
    let mut r = root.derive("intrinsic.projection");
    let projection = match cfg.projection {
        ProjectionKind::Dense => Projection::dense(n, d, scale, &mut r)?,
        ProjectionKind::Fastfood => Projection::fastfood(n, d, scale, &mut r)?,
    };
    Ok(Decoder { p0, projection })
}

/// The site delta: decodes the prompt from `z` at every forward, so gradients reach `z`.
#[derive(Debug, Clone)]
pub struct IntrinsicPromptDelta {
    /// `z` [d] (a [`Var`]'s tensor when training).
    pub z: Tensor,
    pub decoder: Decoder,
}

impl SiteDelta for IntrinsicPromptDelta {
    fn prompt(&self, _ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.decoder.decode(&self.z)?))
    }
}

/// Attaches an intrinsic prompt and makes `modules_to_save` trainable. `z` starts at zero (the
/// prompt starts at `P0`) and trains under [`Z_KEY`] without weight decay. `D` and `P0` come
/// from `cfg` alone (see [`decoder`]); `_rng` is taken for a uniform signature and unused.
pub fn attach(
    model: &mut dyn HasSites,
    cfg: &IntrinsicPromptConfig,
    _rng: &Rng,
) -> Result<Vec<Trainable>> {
    let dec = decoder(model, cfg)?;
    let z = Var::zeros(cfg.intrinsic_dim, DType::F32, &candle_core::Device::Cpu)?;
    let mut out = vec![Trainable::new(Z_KEY.into(), z.clone(), false)];
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    model.attach_site_delta(Arc::new(IntrinsicPromptDelta {
        z: z.as_tensor().clone(),
        decoder: dec,
    }));
    Ok(out)
}

impl Method for IntrinsicPromptConfig {
    method_basics!("intrinsic", "INTRINSIC_PROMPT", attach);

    fn merge_blocker(&self) -> Option<String> {
        unmergeable("intrinsic prompt tuning adds input vectors (the sequence gets longer); no weight change reproduces them")
    }

    fn subspace_mut(&mut self) -> Option<&mut Option<String>> {
        Some(&mut self.subspace)
    }
}
