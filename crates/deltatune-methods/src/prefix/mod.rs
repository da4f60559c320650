//! Prefix tuning (Li and Liang 2021): trainable keys and values prepended to those of every
//! attention layer, PEFT-compatible (`adapter_model.safetensors` holds `prompt_embeddings`
//! `[P, num_layers * 2 * hidden]`).

mod config;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::hooks::SiteDelta;
use deltatune_core::{Ctx, Error, HasSites, Result, Rng};

pub use config::{PrefixTuningConfig, DEFAULT_PREFIX_INIT_STD};

use crate::delta::{state_dict, train_modules, Trainable, PEFT_PREFIX};
use crate::method::{method_basics, unmergeable, GatePlacement, Method, ToFields};

/// The key of the (folded) prefix table in `adapter_model.safetensors` (PEFT's).
pub const PREFIX_KEY: &str = "prompt_embeddings";
/// Training-form keys with `prefix_projection` (PEFT's `PrefixEncoder` module names); they never
/// reach an adapter file, [`export`] folds them into [`PREFIX_KEY`].
pub const ENCODER_EMBEDDING_KEY: &str = "prompt_encoder.embedding.weight";
pub const ENCODER_W1_KEY: &str = "prompt_encoder.transform.0.weight";
pub const ENCODER_B1_KEY: &str = "prompt_encoder.transform.0.bias";
pub const ENCODER_W2_KEY: &str = "prompt_encoder.transform.2.weight";
pub const ENCODER_B2_KEY: &str = "prompt_encoder.transform.2.bias";

/// Where the prefixes come from.
#[derive(Debug, Clone)]
pub enum PrefixSource {
    /// PEFT's table `[P, L * 2 * hidden]`.
    Table(Tensor),
    /// PEFT's `PrefixEncoder` with projection: `emb` [P, hidden], `w1` [E, hidden], `b1` [E],
    /// `w2` [L * 2 * hidden, E], `b2` [L * 2 * hidden].
    Mlp {
        emb: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
    },
}

/// `x W^T + b`, with gradients for every operand.
///
/// # Shapes
/// `x`: [N, in], `w`: [out, in], `b`: [out] -> [N, out]
fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// The keys and values of selected layers, returned at the key/value site.
#[derive(Debug, Clone)]
pub struct PrefixDelta {
    pub source: PrefixSource,
    pub hidden: usize,
    /// Whether layer `i` gets a prefix.
    pub enabled: Vec<bool>,
}

impl PrefixDelta {
    /// Columns `[layer * 2 * hidden, (layer + 1) * 2 * hidden)` of the table: `[P, 2 * hidden]`.
    fn layer_columns(&self, layer: usize) -> candle_core::Result<Tensor> {
        let (h2, at) = (2 * self.hidden, layer * 2 * self.hidden);
        match &self.source {
            PrefixSource::Table(t) => t.narrow(1, at, h2),
            // Only the rows of the second linear that produce this layer's columns.
            PrefixSource::Mlp {
                emb,
                w1,
                b1,
                w2,
                b2,
            } => {
                let z = affine(emb, w1, b1)?.tanh()?;
                affine(&z, &w2.narrow(0, at, h2)?, &b2.narrow(0, at, h2)?)
            }
        }
    }
}

impl SiteDelta for PrefixDelta {
    fn prefix(&self, layer: usize, _ctx: &Ctx) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        if !self.enabled.get(layer).copied().unwrap_or(false) {
            return Ok(None);
        }
        let kv = self.layer_columns(layer)?;
        let h = self.hidden;
        Ok(Some((kv.narrow(1, 0, h)?, kv.narrow(1, h, h)?)))
    }
}

fn enabled_layers(cfg: &PrefixTuningConfig, n_layers: usize) -> Vec<bool> {
    (0..n_layers)
        .map(|i| cfg.layers.as_ref().is_none_or(|l| l.contains(&i)))
        .collect()
}

/// Attaches prefixes for training: through PEFT's MLP when `cfg.prefix_projection`, else as the
/// table [`PREFIX_KEY`]; makes `modules_to_save` trainable. Returns the trainable tensors (no
/// weight decay on the table, the embedding and the biases). Save with [`export`].
pub fn attach(
    model: &mut dyn HasSites,
    cfg: &PrefixTuningConfig,
    rng: &Rng,
) -> Result<Vec<Trainable>> {
    attach_with(model, cfg, rng, true)
}

/// Attaches prefixes in the folded form [`PREFIX_KEY`] `[P, L * 2 * hidden]` whatever
/// `prefix_projection` says: the form of every adapter file (load into it with
/// [`crate::load_state_dict`]).
pub fn attach_folded(
    model: &mut dyn HasSites,
    cfg: &PrefixTuningConfig,
    rng: &Rng,
) -> Result<Vec<Trainable>> {
    attach_with(model, cfg, rng, false)
}

/// [`attach`] when `for_training`, else [`attach_folded`].
pub fn attach_with(
    model: &mut dyn HasSites,
    cfg: &PrefixTuningConfig,
    rng: &Rng,
    for_training: bool,
) -> Result<Vec<Trainable>> {
    cfg.validate_for(model)?;
    // Prefix keys and values are as wide as the model's keys: the hidden size, or fewer
    // columns with grouped-query attention (PEFT's `token_dim`).
    let (hidden, n_layers) = (model.kv_width(), model.num_layers());
    let p = cfg.num_virtual_tokens;
    let width = n_layers * 2 * hidden;
    let mut out = Vec::new();
    let source = if for_training && cfg.prefix_projection {
        let e = cfg.encoder_hidden_size.unwrap_or(hidden);
        let mut r = rng.derive("prompt_encoder");
        // PEFT: nn.Embedding's N(0, 1); nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        let emb = r.normal_tensor((p, hidden), 1.0)?;
        let b = 1.0 / (hidden as f64).sqrt();
        let w1 = r.uniform_tensor((e, hidden), -b, b)?;
        let b1 = r.uniform_tensor(e, -b, b)?;
        let b = 1.0 / (e as f64).sqrt();
        let w2 = r.uniform_tensor((width, e), -b, b)?;
        let b2 = r.uniform_tensor(width, -b, b)?;
        let mut var = |key: &str, t: Tensor, decay: bool| -> Result<Tensor> {
            let v = Var::from_tensor(&t)?;
            out.push(Trainable::new(key.into(), v.clone(), decay));
            Ok(v.as_tensor().clone())
        };
        PrefixSource::Mlp {
            emb: var(ENCODER_EMBEDDING_KEY, emb, false)?,
            w1: var(ENCODER_W1_KEY, w1, true)?,
            b1: var(ENCODER_B1_KEY, b1, false)?,
            w2: var(ENCODER_W2_KEY, w2, true)?,
            b2: var(ENCODER_B2_KEY, b2, false)?,
        }
    } else {
        let t = rng
            .derive(PREFIX_KEY)
            .normal_tensor((p, width), cfg.init_std())?;
        let v = Var::from_tensor(&t)?;
        out.push(Trainable::new(PREFIX_KEY.into(), v.clone(), false));
        PrefixSource::Table(v.as_tensor().clone())
    };
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    model.attach_site_delta(Arc::new(PrefixDelta {
        source,
        hidden,
        enabled: enabled_layers(cfg, n_layers),
    }));
    Ok(out)
}

/// The tensors to write to `adapter_model.safetensors`: as [`state_dict`], except that PEFT's
/// MLP (training form with `prefix_projection`) is evaluated once and saved as the table
/// [`PREFIX_KEY`] `[P, L * 2 * hidden]`, as PEFT saves it.
pub fn export(trainables: &[Trainable]) -> Result<BTreeMap<String, Tensor>> {
    let mut sd = state_dict(trainables);
    let keys = [
        ENCODER_EMBEDDING_KEY,
        ENCODER_W1_KEY,
        ENCODER_B1_KEY,
        ENCODER_W2_KEY,
        ENCODER_B2_KEY,
    ];
    let present = keys.iter().filter(|k| sd.contains_key(**k)).count();
    if present == 0 {
        return Ok(sd);
    }
    if present != keys.len() {
        return Err(Error::Msg(format!(
            "prefix export: the trainables hold only part of the prefix encoder ({present} of \
             {}: {})",
            keys.len(),
            keys.join(", ")
        )));
    }
    let mut take = |k: &str| sd.remove(k).expect("checked above");
    let (emb, w1, b1, w2, b2) = (
        take(ENCODER_EMBEDDING_KEY),
        take(ENCODER_W1_KEY),
        take(ENCODER_B1_KEY),
        take(ENCODER_W2_KEY),
        take(ENCODER_B2_KEY),
    );
    let z = affine(&emb, &w1, &b1)?.tanh()?;
    let table = affine(&z, &w2, &b2)?.detach();
    sd.insert(PREFIX_KEY.into(), table);
    Ok(sd)
}

/// `sd` under the keys PEFT writes for a prompt-learning method, whose model it does not wrap
/// twice: a trained module (`modules_to_save`) under `base_model.<module>`, not
/// `base_model.model.<module>` (PEFT's loader finds nothing under the longer key; deltatune's
/// [`crate::load_state_dict`] reads both).
fn prompt_learning_keys(sd: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    sd.into_iter()
        .map(|(k, t)| match k.strip_prefix(PEFT_PREFIX) {
            Some(rest) => (format!("base_model.{rest}"), t),
            None => (k, t),
        })
        .collect()
}

impl Method for PrefixTuningConfig {
    method_basics!("prefix", "PREFIX_TUNING", attach);

    fn fields_json(&self, model: &dyn HasSites) -> serde_json::Value {
        self.completed(model).to_fields()
    }

    fn attach_saved(&self, model: &mut dyn HasSites, rng: &Rng) -> Result<Vec<Trainable>> {
        attach_folded(model, self, rng)
    }

    fn export(&self, trainables: &[Trainable]) -> Result<BTreeMap<String, Tensor>> {
        let sd = if self.prefix_projection {
            export(trainables)?
        } else {
            state_dict(trainables)
        };
        Ok(prompt_learning_keys(sd))
    }

    fn merge_blocker(&self) -> Option<String> {
        unmergeable("prefix tuning adds keys and values to every attention layer; no weight change reproduces them")
    }

    fn gate(&self) -> Option<GatePlacement<'_>> {
        Some(GatePlacement::Prefix {
            layers: self.layers.as_deref(),
        })
    }
}
