//! Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021, and the parallel adapter of
//! He et al. 2022) at the attention and feed-forward sub-layer outputs.
//!
//! Keys in `adapter_model.safetensors`:
//! `base_model.model.<sub-layer>.adapter.{down,up}.{weight,bias}` where `<sub-layer>` is the
//! model's path of the sub-layer the adapter follows: for BERT
//! `bert.encoder.layer.<i>.attention.output` (attention) and `bert.encoder.layer.<i>.output`
//! (feed-forward), for Llama `model.layers.<i>.self_attn` and `model.layers.<i>.mlp`.

mod config;

use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{ops, Ctx, HasSites, Result, Rng};

pub use config::{AdapterSite, BottleneckConfig, NonLinearity, Placement};

use crate::delta::{peft_key, train_modules, Trainable};
use crate::method::{method_basics, unmergeable, GatePlacement, Method};

/// One bottleneck `up(act(down(x)))`.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    /// [b, hidden]
    pub down_w: Tensor,
    /// [b]
    pub down_b: Tensor,
    /// [hidden, b]
    pub up_w: Tensor,
    /// [hidden]
    pub up_b: Tensor,
}

impl Bottleneck {
    /// # Shapes
    /// `x`: [B, T, hidden] -> [B, T, hidden]
    pub fn forward(&self, x: &Tensor, act: NonLinearity) -> candle_core::Result<Tensor> {
        self.forward_in(x, act, &Ctx::eval())
    }

    /// [`Bottleneck::forward`] in a pass `ctx`: without gradients the products go through
    /// `ops::frozen_linear`, whose rows do not depend on each other (candle's matmul picks its
    /// kernel by the number of rows), so a sequence gets the same numbers in any batch.
    pub fn forward_in(
        &self,
        x: &Tensor,
        act: NonLinearity,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let h = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / h, h))?;
        let rows = ctx.no_grad && !ctx.train;
        let lin = |x: &Tensor, w: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
            if rows {
                ops::frozen_linear(x, w, Some(b))
            } else {
                x.matmul(&w.t()?)?.broadcast_add(b)
            }
        };
        let z = lin(&x2, &self.down_w, &self.down_b)?;
        let z = match act {
            NonLinearity::Relu => z.relu()?,
            NonLinearity::Gelu => ops::gelu_erf(&z)?,
            NonLinearity::Tanh => z.tanh()?,
            NonLinearity::Silu => z.silu()?,
        };
        let y = lin(&z, &self.up_w, &self.up_b)?;
        y.reshape(dims)
    }
}

/// The adapters of every layer, acting at the sub-layer site.
#[derive(Debug, Clone)]
pub struct AdapterDelta {
    /// Per layer: the adapter at the attention sub-layer and the one at the feed-forward one.
    pub adapters: Vec<[Option<Bottleneck>; 2]>,
    pub placement: Placement,
    pub residual: bool,
    pub scaling: f64,
    pub dropout: f64,
    pub act: NonLinearity,
}

impl SiteDelta for AdapterDelta {
    fn sublayer(
        &self,
        layer: usize,
        kind: Sublayer,
        input: &Tensor,
        output: Tensor,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let slot = match kind {
            Sublayer::Attention => 0,
            Sublayer::FeedForward => 1,
        };
        let Some(a) = self.adapters.get(layer).and_then(|s| s[slot].as_ref()) else {
            return Ok(output);
        };
        match self.placement {
            Placement::Parallel => {
                let y = a.forward_in(&ctx.dropout(input, self.dropout)?, self.act, ctx)?;
                output + (y * self.scaling)?
            }
            Placement::Houlsby | Placement::Pfeiffer => {
                let y = a.forward_in(&ctx.dropout(&output, self.dropout)?, self.act, ctx)?;
                if self.residual {
                    output + y
                } else {
                    Ok(y)
                }
            }
        }
    }
}

/// The module path of the adapter at `site` of layer `layer`: `.adapter` under the
/// sub-layer's path, as the model names it.
pub fn adapter_path(model: &dyn HasSites, layer: usize, site: AdapterSite) -> String {
    let kind = match site {
        AdapterSite::Attention => Sublayer::Attention,
        AdapterSite::FeedForward => Sublayer::FeedForward,
    };
    format!("{}.adapter", model.sublayer_path(layer, kind))
}

/// Attaches bottleneck adapters where `cfg` places them and makes `modules_to_save` trainable.
/// Returns the trainable tensors under their keys (weights decay, biases do not).
pub fn attach(
    model: &mut dyn HasSites,
    cfg: &BottleneckConfig,
    rng: &Rng,
) -> Result<Vec<Trainable>> {
    cfg.validate_for(model)?;
    let (hidden, n_layers) = (model.hidden_size(), model.num_layers());
    let b = cfg.bottleneck(hidden);
    let sites = cfg.sites();
    let mut out = Vec::new();
    let mut adapters = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let mut slots: [Option<Bottleneck>; 2] = [None, None];
        if cfg.layers.as_ref().is_none_or(|l| l.contains(&i)) {
            for &site in &sites {
                let path = adapter_path(model, i, site);
                let mut r = rng.derive(&path);
                let bound = 1.0 / (hidden as f64).sqrt();
                let down_w = r.uniform_tensor((b, hidden), -bound, bound)?;
                let dt = down_w.dtype();
                let dev = down_w.device().clone();
                let mut var = |leaf: &str, t: Tensor, decay: bool| -> Result<Tensor> {
                    let v = Var::from_tensor(&t)?;
                    out.push(Trainable::new(peft_key(&path, leaf), v.clone(), decay));
                    Ok(v.as_tensor().clone())
                };
                let a = Bottleneck {
                    down_w: var("down.weight", down_w, true)?,
                    down_b: var("down.bias", Tensor::zeros(b, dt, &dev)?, false)?,
                    up_w: var("up.weight", Tensor::zeros((hidden, b), dt, &dev)?, true)?,
                    up_b: var("up.bias", Tensor::zeros(hidden, dt, &dev)?, false)?,
                };
                let slot = match site {
                    AdapterSite::Attention => 0,
                    AdapterSite::FeedForward => 1,
                };
                slots[slot] = Some(a);
            }
        }
        adapters.push(slots);
    }
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    model.attach_site_delta(Arc::new(AdapterDelta {
        adapters,
        placement: cfg.placement,
        residual: cfg.residual,
        scaling: cfg.scaling,
        dropout: cfg.adapter_dropout,
        act: cfg.non_linearity,
    }));
    Ok(out)
}

impl Method for BottleneckConfig {
    method_basics!("adapter", "BOTTLENECK_ADAPTER", attach);

    fn merge_blocker(&self) -> Option<String> {
        unmergeable("bottleneck adapters add a non-linear module after the sub-layers; no weight change reproduces it")
    }

    fn gate(&self) -> Option<GatePlacement<'_>> {
        Some(GatePlacement::Sublayers {
            layers: self.layers.as_deref(),
        })
    }
}
