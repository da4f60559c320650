//! Combining deltas on one model (the seed's 4.1): any of the methods at once, optionally with
//! UniPELT gates (see [`gate`]), saved and loaded as one artifact.
//!
//! Presets: `unipelt` (Mao et al. 2022: LoRA on query/value + prefix + a sequential adapter after
//! the feed-forward, gated) and `mam` (He et al. 2022, "Towards a Unified View of
//! Parameter-Efficient Transfer Learning": prefix tuning + a parallel adapter beside the
//! feed-forward, scaling 4, not gated).

mod config;
pub mod gate;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::{Error, HasSites, Result, Rng};

pub use config::ComposeConfig;
use gate::{GatedLinear, GatedSite, TokenGate};

use crate::common::PeftCommon;
use crate::delta::{train_modules, Trainable};
use crate::method::{unmergeable, GatePlacement, Method};
use crate::registry::DeltaConfig;
use serde_json::Value;

/// The key of gate tensor `leaf` of `method` in layer `layer`.
pub fn gate_key(method: &str, layer: usize, leaf: &str) -> String {
    format!("gates.{method}.layer.{layer}.{leaf}")
}

fn token_gate(
    method: &str,
    layer: usize,
    hidden: usize,
    rng: &Rng,
    out: &mut Vec<Trainable>,
) -> Result<TokenGate> {
    let mut r = rng.derive(&gate_key(method, layer, "weight"));
    let bound = 1.0 / (hidden as f64).sqrt();
    let w = Var::from_tensor(&r.uniform_tensor((1, hidden), -bound, bound)?)?;
    let b = Var::from_tensor(&Tensor::zeros(1, w.dtype(), w.device())?)?;
    out.push(Trainable::new(
        gate_key(method, layer, "weight"),
        w.clone(),
        true,
    ));
    out.push(Trainable::new(
        gate_key(method, layer, "bias"),
        b.clone(),
        false,
    ));
    Ok(TokenGate { w, b })
}

/// Attaches every member (in the training form, or with `saved` in the form adapter files hold),
/// their gates and the composition's `modules_to_save`. Member keys are prefixed with
/// `<method>.`; their `lr_scale` comes from the config.
pub fn attach(
    model: &mut dyn HasSites,
    cfg: &ComposeConfig,
    rng: &Rng,
    init_text_ids: Option<&[u32]>,
    saved: bool,
) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let hidden = model.hidden_size();
    let n_layers = model.num_layers();
    let mut out = Vec::new();
    for d in &cfg.deltas {
        let name = d.name();
        let sub_rng = rng.derive(name);
        let lin_before: Vec<usize> = model.linears().iter().map(|l| l.deltas.len()).collect();
        let site_before = model.site_deltas_mut().len();
        let ts = if saved {
            d.attach_saved(model, &sub_rng)?
        } else {
            d.attach(model, &sub_rng, init_text_ids)?
        };
        let scale = cfg.lr_scale.get(name).copied().unwrap_or(1.0);
        for mut t in ts {
            t.key = format!("{name}.{}", t.key);
            t.lr_scale = scale;
            out.push(t);
        }
        if !cfg.gates {
            continue;
        }
        let gate_rng = rng.derive("gates");
        match d.gate() {
            Some(GatePlacement::LinearOutputs) => {
                let mut gates: BTreeMap<usize, TokenGate> = BTreeMap::new();
                let layer_of: Vec<Option<usize>> = model
                    .linears()
                    .iter()
                    .map(|l| model.layer_of(&l.path))
                    .collect();
                for (li, lin) in model.linears_mut().into_iter().enumerate() {
                    if lin.deltas.len() == lin_before[li] {
                        continue;
                    }
                    if lin.in_features() != hidden {
                        return Err(Error::Msg(format!(
                            "gates: LoRA on `{}` reads {} features but a layer's gate reads the \
                             hidden size {hidden}; gate LoRA only on layers that read the hidden \
                             states (e.g. q_proj, v_proj) or turn gates off",
                            lin.path,
                            lin.in_features()
                        )));
                    }
                    let layer = layer_of[li].ok_or_else(|| {
                        Error::Msg(format!(
                            "gates: `{}` is not inside a transformer layer, so it has no layer gate; \
                             leave it out of the LoRA targets or turn gates off",
                            lin.path
                        ))
                    })?;
                    let g = match gates.get(&layer) {
                        Some(g) => g.clone(),
                        None => {
                            let g = token_gate(name, layer, hidden, &gate_rng, &mut out)?;
                            gates.insert(layer, g.clone());
                            g
                        }
                    };
                    for k in lin_before[li]..lin.deltas.len() {
                        lin.deltas[k] = Arc::new(GatedLinear {
                            inner: lin.deltas[k].clone(),
                            gate: g.clone(),
                        });
                    }
                }
            }
            Some(GatePlacement::Sublayers { layers }) => {
                let mut sub = Vec::with_capacity(n_layers);
                for i in 0..n_layers {
                    sub.push(if layers.is_none_or(|l| l.contains(&i)) {
                        Some(token_gate(name, i, hidden, &gate_rng, &mut out)?)
                    } else {
                        None
                    });
                }
                wrap_sites(model, site_before, sub, vec![None; n_layers]);
            }
            Some(GatePlacement::Prefix { layers }) => {
                let mut pre = Vec::with_capacity(n_layers);
                for i in 0..n_layers {
                    pre.push(if layers.is_none_or(|l| l.contains(&i)) {
                        let s = Var::from_tensor(&Tensor::zeros(
                            1,
                            candle_core::DType::F32,
                            &deltatune_core::device::current(),
                        )?)?;
                        out.push(Trainable::new(gate_key(name, i, "logit"), s.clone(), false));
                        Some(s)
                    } else {
                        None
                    });
                }
                wrap_sites(model, site_before, vec![None; n_layers], pre);
            }
            None => {}
        }
    }
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    Ok(out)
}

fn wrap_sites(
    model: &mut dyn HasSites,
    from: usize,
    sublayer_gates: Vec<Option<TokenGate>>,
    prefix_gates: Vec<Option<Var>>,
) {
    let sds = model.site_deltas_mut();
    for k in from..sds.len() {
        sds[k] = Arc::new(GatedSite {
            inner: sds[k].clone(),
            sublayer_gates: sublayer_gates.clone(),
            prefix_gates: prefix_gates.clone(),
        });
    }
}

/// The tensors to save: each member exports its own (prefix tuning folds its MLP) under
/// `<method>.`; gates and the head as they are.
pub fn export(cfg: &ComposeConfig, trainables: &[Trainable]) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut claimed = vec![false; trainables.len()];
    for d in &cfg.deltas {
        let pre = format!("{}.", d.name());
        let mine: Vec<Trainable> = trainables
            .iter()
            .enumerate()
            .filter(|(_, t)| t.key.starts_with(&pre))
            .map(|(i, t)| {
                claimed[i] = true;
                let mut t = t.clone();
                t.key = t.key[pre.len()..].to_string();
                t
            })
            .collect();
        for (k, v) in d.export(&mine)? {
            out.insert(format!("{pre}{k}"), v);
        }
    }
    for (t, c) in trainables.iter().zip(claimed) {
        if !c {
            out.insert(t.key.clone(), t.var.as_tensor().detach());
        }
    }
    Ok(out)
}

impl Method for ComposeConfig {
    fn name(&self) -> &'static str {
        "compose"
    }

    fn peft_type(&self) -> &'static str {
        "COMPOSITION"
    }

    fn common(&self) -> &PeftCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut PeftCommon {
        &mut self.common
    }

    fn validate(&self) -> Result<()> {
        ComposeConfig::validate(self)
    }

    fn fields_json(&self, model: &dyn HasSites) -> Value {
        ComposeConfig::fields_json(self, model)
    }

    fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>> {
        attach(model, self, rng, init_text_ids, false)
    }

    fn attach_saved(&self, model: &mut dyn HasSites, rng: &Rng) -> Result<Vec<Trainable>> {
        attach(model, self, rng, None, true)
    }

    fn export(&self, trainables: &[Trainable]) -> Result<BTreeMap<String, Tensor>> {
        export(self, trainables)
    }

    fn merge_blocker(&self) -> Option<String> {
        if self.gates {
            return unmergeable(
                "gated compositions cannot be merged: each gate depends on the input",
            );
        }
        self.deltas.iter().find_map(|d| d.merge_blocker())
    }

    fn init_text(&self) -> Option<&str> {
        self.deltas.iter().find_map(|d| d.init_text())
    }

    fn subspace_mut(&mut self) -> Option<&mut Option<String>> {
        self.deltas.iter_mut().find_map(|d| d.subspace_mut())
    }

    fn members(&self) -> &[DeltaConfig] {
        &self.deltas
    }
}
