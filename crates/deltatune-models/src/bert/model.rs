//! The BERT-family encoder with a sequence-classification head.
//!
//! Module paths are those of Hugging Face's `BertForSequenceClassification`
//! (`bert.encoder.layer.3.attention.self.query`, `classifier`), so a path in a checkpoint, in a
//! target pattern and in a PEFT key are the same string. Checkpoints saved from the bare encoder
//! (no `bert.` prefix, as all-MiniLM-L6-v2) load too.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{ops, Ctx, Error, HasSites, Linear, Result, Rng, SiteInfo, SiteKind, Weights};

use super::config::{BertConfig, BertConfigFile, Family};
use crate::backbone::{Backbone, SequenceClassifier, TextBackbone};
use crate::layers::{self, KeyMap, LayerNorm};

/// How the sequence is reduced to one vector for classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token through the pretrained pooler (dense + tanh) when the checkpoint has one,
    /// as `BertForSequenceClassification` does; the raw first token otherwise.
    Cls,
    /// The mean of the unmasked tokens' last hidden states.
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            o => Err(format!("unknown pooling `{o}` (expected cls or mean)")),
        }
    }
}

/// A padded batch.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// [B, T] u32 token ids.
    pub input_ids: Tensor,
    /// [B, T] u32, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor,
    /// [B, T] u32 segment ids; zeros when `None`.
    pub token_type_ids: Option<Tensor>,
}

impl Inputs {
    /// Pads `seqs` to the longest with `pad_id` (on the CPU).
    pub fn from_ids(seqs: &[Vec<u32>], pad_id: u32) -> candle_core::Result<Self> {
        Self::from_ids_on(seqs, pad_id, &Device::Cpu)
    }

    /// Pads `seqs` to the longest with `pad_id`, on `device`.
    pub fn from_ids_on(
        seqs: &[Vec<u32>],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].iter_mut().for_each(|m| *m = 1);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), device)?,
            token_type_ids: None,
        })
    }
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// `BertForSequenceClassification` (or RoBERTa's equivalent) with deltas attachable at its sites.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    pub config: BertConfig,
    pub pooling: Pooling,
    pub num_labels: usize,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    /// The classification head, path `classifier`.
    pub classifier: Linear,
    /// Deltas at the non-linear sites (prompts, prefixes, adapters, activation scaling).
    pub site_deltas: Vec<Arc<dyn SiteDelta>>,
    /// Where the weights live (every tensor the model makes goes there).
    device: Device,
}

impl BertClassifier {
    /// Loads `config.json` and `model.safetensors` from `dir`. The head is read from the
    /// checkpoint when it has one of the right size, else initialised normal(0,
    /// `initializer_range`) with zero bias from `rng`.
    pub fn load(dir: &Path, num_labels: usize, pooling: Pooling, rng: &mut Rng) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config = BertConfigFile::read(&cfg_path)?.into_config(&cfg_path)?;
        let weights = Weights::load(&dir.join("model.safetensors"), DType::F32)?;
        Self::from_weights(config, &weights, num_labels, pooling, rng)
    }

    /// Builds the model from parsed config and weights.
    pub fn from_weights(
        config: BertConfig,
        weights: &Weights,
        num_labels: usize,
        pooling: Pooling,
        rng: &mut Rng,
    ) -> Result<Self> {
        if num_labels == 0 {
            return Err(Error::InvalidConfig {
                field: "num_labels".into(),
                msg: "must be at least 1".into(),
            });
        }
        let prefix = config.family.prefix();
        let km = KeyMap::new(weights, prefix);
        let h = config.hidden_size;
        let e = |name: &str| format!("{prefix}.embeddings.{name}");
        let embeddings = Embeddings {
            word: weights.get(
                &km.key(&e("word_embeddings.weight")),
                &[config.vocab_size, h],
                "vocab_size x hidden_size in config.json",
            )?,
            position: weights.get(
                &km.key(&e("position_embeddings.weight")),
                &[config.max_position_embeddings, h],
                "max_position_embeddings x hidden_size in config.json",
            )?,
            token_type: weights.get(
                &km.key(&e("token_type_embeddings.weight")),
                &[config.type_vocab_size, h],
                "type_vocab_size x hidden_size in config.json",
            )?,
            norm: km.norm(&e("LayerNorm"), h, config.layer_norm_eps)?,
        };
        let hint_h = "hidden_size in config.json";
        let hint_i = "intermediate_size and hidden_size in config.json";
        // Not sized by the config: a corrupt layer count must fail at its first missing tensor,
        // not in an allocation.
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let p = format!("{prefix}.encoder.layer.{i}");
            layers.push(Layer {
                query: km.linear(&format!("{p}.attention.self.query"), h, h, false, hint_h)?,
                key: km.linear(&format!("{p}.attention.self.key"), h, h, false, hint_h)?,
                value: km.linear(&format!("{p}.attention.self.value"), h, h, false, hint_h)?,
                attn_out: km.linear(&format!("{p}.attention.output.dense"), h, h, false, hint_h)?,
                attn_norm: km.norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
                intermediate: km.linear(
                    &format!("{p}.intermediate.dense"),
                    config.intermediate_size,
                    h,
                    false,
                    hint_i,
                )?,
                output: km.linear(
                    &format!("{p}.output.dense"),
                    h,
                    config.intermediate_size,
                    false,
                    hint_i,
                )?,
                out_norm: km.norm(&format!("{p}.output.LayerNorm"), h, config.layer_norm_eps)?,
            });
        }
        let pooler_key = km.key(&format!("{prefix}.pooler.dense"));
        let pooler = if weights.contains(&format!("{pooler_key}.weight")) {
            Some(km.linear(&format!("{prefix}.pooler.dense"), h, h, false, hint_h)?)
        } else {
            None
        };
        // A checkpoint head for another label count is replaced by a fresh one, as
        // transformers does with `ignore_mismatched_sizes=True`.
        let head_fits = weights
            .tensors()
            .any(|(k, t)| k == "classifier.weight" && t.dims() == [num_labels, h])
            && weights.contains("classifier.bias");
        let classifier = if head_fits {
            Linear::new(
                "classifier",
                weights.get("classifier.weight", &[num_labels, h], "")?,
                Some(weights.get("classifier.bias", &[num_labels], "")?),
            )
        } else {
            Linear::new(
                "classifier",
                rng.normal_tensor((num_labels, h), config.initializer_range)?,
                Some(Tensor::zeros(
                    num_labels,
                    DType::F32,
                    embeddings.word.device(),
                )?),
            )
        };
        let device = embeddings.word.device().clone();
        Ok(Self {
            device,
            config,
            pooling,
            num_labels,
            embeddings,
            layers,
            pooler,
            classifier,
            site_deltas: Vec::new(),
        })
    }

    /// Position ids of `inputs`, after `past` earlier positions (the prefix keys and values of
    /// prefix tuning, which transformers' encoders take as a past cache: PEFT's first token is
    /// at position `past`).
    fn position_ids(&self, inputs: &Inputs, past: usize) -> candle_core::Result<Tensor> {
        let (b, t) = inputs.input_ids.dims2()?;
        let past = past as u32;
        match self.config.family {
            Family::Bert => Tensor::arange(past, past + t as u32, &self.device)?
                .unsqueeze(0)?
                .broadcast_as((b, t))?
                .contiguous(),
            Family::Roberta => {
                // Positions count real tokens (after `past`), starting after the padding id;
                // padding keeps it.
                let mask = inputs.attention_mask.to_vec2::<u32>()?;
                let pad = self.config.pad_token_id;
                let mut out = Vec::with_capacity(b * t);
                for row in mask {
                    let mut c = past;
                    for m in row {
                        c += m;
                        out.push(if m == 1 { pad + c } else { pad });
                    }
                }
                Tensor::from_vec(out, (b, t), &self.device)
            }
        }
    }

    /// The last hidden state.
    ///
    /// # Shapes
    /// `inputs.input_ids`: [B, T] -> [B, T, hidden]
    pub fn encode(&self, inputs: &Inputs, ctx: &Ctx) -> Result<Tensor> {
        Ok(self.run(inputs, ctx, false)?.0)
    }

    /// The encoder; with `first_only`, the last layer computes only position 0 (keys and values
    /// still come from every position), which is all that CLS pooling reads. The result is the
    /// same as `encode(..).narrow(1, 0, 1)` at a sixth less work per step.
    ///
    /// # Shapes
    /// `inputs.input_ids`: [B, T] -> ([B, T' or 1, hidden], mask [B, T']) where T' counts
    /// inserted prompt vectors
    fn run(&self, inputs: &Inputs, ctx: &Ctx, first_only: bool) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let (b, t) = inputs.input_ids.dims2()?;
        let h = cfg.hidden_size;
        let emb = &self.embeddings;
        let words = emb
            .word
            .index_select(&inputs.input_ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let mut types = match &inputs.token_type_ids {
            Some(tt) => tt.clone(),
            None => Tensor::zeros((b, t), DType::U32, &self.device)?,
        };
        let mut mask = inputs.attention_mask.clone();
        // Prompt vectors go right after the first token, so CLS pooling still reads CLS (or
        // before it, PEFT's placement, when a delta asks for that).
        let first = if layers::prompts_at_start(&self.site_deltas) {
            0
        } else {
            1.min(t)
        };
        let mut parts = vec![words.narrow(1, 0, first)?];
        for p in layers::prompts(&self.site_deltas, ctx)? {
            {
                let n = p.dim(0)?;
                parts.push(
                    p.unsqueeze(0)?
                        .broadcast_as((b, n, h))?
                        .to_dtype(words.dtype())?,
                );
                let at = |x: &Tensor, fill: u32| -> candle_core::Result<Tensor> {
                    let ins = Tensor::full(fill, (b, n), &self.device)?;
                    Tensor::cat(
                        &[
                            &x.narrow(1, 0, first)?,
                            &ins,
                            &x.narrow(1, first, x.dim(1)? - first)?,
                        ],
                        1,
                    )
                };
                types = at(&types, 0)?;
                mask = at(&mask.to_dtype(DType::U32)?, 1)?;
            }
        }
        if t > first {
            parts.push(words.narrow(1, first, t - first)?);
        }
        let words = if parts.len() == 1 {
            words
        } else {
            Tensor::cat(&parts, 1)?
        };
        let t = words.dim(1)?;
        // Prefix keys and values count as earlier positions, as PEFT passes them to
        // transformers' BERT as a past cache: the first token's position is the prefix length.
        // Every layer with a prefix has the same number of prefix positions: the first such
        // layer tells (each call may run a prefix's reparameterisation MLP, so stop there).
        let mut past = 0;
        for i in 0..self.layers.len() {
            past = layers::prefix_len(&self.site_deltas, i, ctx)?;
            if past > 0 {
                break;
            }
        }
        if past + t > cfg.max_position_embeddings {
            let with = if past > 0 {
                format!(" after {past} prefix positions")
            } else {
                String::new()
            };
            return Err(Error::Msg(format!(
                "sequence length {t} (with prompt tokens){with} exceeds \
                 max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        // Position ids follow the extended sequence (the ids are only read for their shape).
        let full = Inputs {
            input_ids: mask.clone(),
            attention_mask: mask.clone(),
            token_type_ids: None,
        };
        let pos = emb
            .position
            .index_select(&self.position_ids(&full, past)?.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let types = emb
            .token_type
            .index_select(&types.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let x = ((words + pos)? + types)?;
        let mut x = ctx.dropout(&emb.norm.forward(&x)?, cfg.hidden_dropout)?;

        // Additive key mask: 0 for real tokens, a large negative number for padding.
        let key_bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
        let nh = cfg.num_heads;
        let dh = h / nh;
        let n_layers = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = ctx.cut(x);
            if i > 0 {
                x = layers::deep_prompts(&self.site_deltas, i, x, first, ctx)?;
            }
            // Positions whose outputs this layer must produce.
            let xq = if first_only && i + 1 == n_layers {
                x.narrow(1, 0, 1)?.contiguous()?
            } else {
                x.clone()
            };
            let q = layer.query.forward(&xq, ctx)?;
            let k = layer.key.forward(&x, ctx)?;
            let v = layer.value.forward(&x, ctx)?;
            let attn = layers::attention_tokens(
                &q,
                k,
                v,
                &key_bias,
                layers::Heads {
                    heads: nh,
                    kv_heads: nh,
                    head_dim: dh,
                },
                i,
                &self.site_deltas,
                false,
                cfg.attention_dropout,
                ctx,
            )?;
            // Without deltas at the sub-layers (adapters act on the dropped output before the
            // residual), the dropout, the residual sum and the norm are one op: two graph
            // nodes fewer, each a zero-filled buffer and an add in the backward pass.
            let fused = self.site_deltas.is_empty();
            let attn = layer.attn_out.forward(&attn, ctx)?;
            let x1 = if fused {
                layer
                    .attn_norm
                    .forward_residual(&attn, &xq, cfg.hidden_dropout, ctx)?
            } else {
                let attn = ctx.dropout(&attn, cfg.hidden_dropout)?;
                let attn =
                    layers::sublayer(&self.site_deltas, i, Sublayer::Attention, &xq, attn, ctx)?;
                layer.attn_norm.forward_residual(&attn, &xq, 0.0, ctx)?
            };
            let inter = ops::gelu_erf(&layer.intermediate.forward(&x1, ctx)?)?;
            let inter = layers::activation(&self.site_deltas, i, inter, ctx)?;
            let out = layer.output.forward(&inter, ctx)?;
            x = if fused {
                layer
                    .out_norm
                    .forward_residual(&out, &x1, cfg.hidden_dropout, ctx)?
            } else {
                let out = ctx.dropout(&out, cfg.hidden_dropout)?;
                let out =
                    layers::sublayer(&self.site_deltas, i, Sublayer::FeedForward, &x1, out, ctx)?;
                layer.out_norm.forward_residual(&out, &x1, 0.0, ctx)?
            };
        }
        Ok((x, mask))
    }

    /// One vector per sequence, as the head sees it (before classifier dropout).
    ///
    /// # Shapes
    /// `hidden`: [B, T, hidden], `mask`: [B, T] -> [B, hidden]
    pub fn pool(&self, hidden: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(match self.pooling {
            Pooling::Cls => {
                let first = hidden.i((.., 0, ..))?.contiguous()?;
                match &self.pooler {
                    Some(p) => p.forward(&first, ctx)?.tanh()?,
                    None => first,
                }
            }
            Pooling::Mean => mean_pool(hidden, mask)?,
        })
    }

    /// Classification logits.
    ///
    /// # Shapes
    /// `inputs.input_ids`: [B, T] -> [B, num_labels]
    pub fn forward(&self, inputs: &Inputs, ctx: &Ctx) -> Result<Tensor> {
        let (hidden, mask) = self.run(inputs, ctx, self.pooling == Pooling::Cls)?;
        let pooled = self.pool(&hidden, &mask, ctx)?;
        let pooled = ctx.dropout(&pooled, self.config.classifier_dropout)?;
        Ok(self.classifier.forward(&pooled, ctx)?)
    }

    /// Pads `seqs` and builds the inputs with this model's padding id.
    pub fn inputs(&self, seqs: &[Vec<u32>]) -> Result<Inputs> {
        Ok(Inputs::from_ids_on(
            seqs,
            self.config.pad_token_id,
            &self.device,
        )?)
    }
}

/// Mean of the unmasked positions.
///
/// # Shapes
/// `hidden`: [B, T, H], `mask`: [B, T] -> [B, H]
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

impl Backbone for BertClassifier {
    type Batch = Inputs;

    fn device(&self) -> &Device {
        &self.device
    }

    fn hidden_states(&self, batch: &Inputs, ctx: &Ctx) -> Result<Tensor> {
        self.encode(batch, ctx)
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let prefix = self.config.family.prefix();
        let e = &self.embeddings;
        let mut v = vec![
            (
                format!("{prefix}.embeddings.word_embeddings.weight"),
                e.word.clone(),
            ),
            (
                format!("{prefix}.embeddings.position_embeddings.weight"),
                e.position.clone(),
            ),
            (
                format!("{prefix}.embeddings.token_type_embeddings.weight"),
                e.token_type.clone(),
            ),
            (
                format!("{prefix}.embeddings.LayerNorm.weight"),
                e.norm.weight.clone(),
            ),
            (
                format!("{prefix}.embeddings.LayerNorm.bias"),
                e.norm.bias.clone(),
            ),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("{prefix}.encoder.layer.{i}");
            for (name, n) in [
                ("attention.output.LayerNorm", &l.attn_norm),
                ("output.LayerNorm", &l.out_norm),
            ] {
                v.push((format!("{p}.{name}.weight"), n.weight.clone()));
                v.push((format!("{p}.{name}.bias"), n.bias.clone()));
            }
        }
        for l in self.linears() {
            v.push((format!("{}.weight", l.path), l.weight.clone()));
            if let Some(b) = &l.bias {
                v.push((format!("{}.bias", l.path), b.clone()));
            }
        }
        Ok(v)
    }
}

impl TextBackbone for BertClassifier {
    fn token_batch(&self, seqs: &[Vec<u32>]) -> Result<Inputs> {
        self.inputs(seqs)
    }
}

impl SequenceClassifier for BertClassifier {
    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn classify(&self, batch: &Inputs, ctx: &Ctx) -> Result<Tensor> {
        self.forward(batch, ctx)
    }
}

impl HasSites for BertClassifier {
    fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for l in &self.layers {
            v.extend([
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]);
        }
        if let Some(p) = &self.pooler {
            v.push(p);
        }
        v.push(&self.classifier);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for l in &mut self.layers {
            v.extend([
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ]);
        }
        if let Some(p) = &mut self.pooler {
            v.push(p);
        }
        v.push(&mut self.classifier);
        v
    }

    fn sites(&self) -> Vec<SiteInfo> {
        let prefix = self.config.family.prefix();
        let h = self.config.hidden_size;
        let emb = &self.embeddings;
        let mut out = vec![SiteInfo {
            path: format!("{prefix}.embeddings"),
            kind: SiteKind::Embeddings,
            params: emb.word.elem_count()
                + emb.position.elem_count()
                + emb.token_type.elem_count()
                + 2 * h,
        }];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("{prefix}.encoder.layer.{i}");
            let lin = |x: &Linear| SiteInfo {
                path: x.path.clone(),
                kind: SiteKind::Linear,
                params: x.param_count(),
            };
            let zero = |path: String, kind| SiteInfo {
                path,
                kind,
                params: 0,
            };
            out.push(zero(format!("{p}.attention.self"), SiteKind::KeyValue));
            out.extend([lin(&l.query), lin(&l.key), lin(&l.value), lin(&l.attn_out)]);
            out.push(SiteInfo {
                path: format!("{p}.attention.output.LayerNorm"),
                kind: SiteKind::SublayerOutput,
                params: 2 * h,
            });
            out.push(lin(&l.intermediate));
            out.push(zero(
                format!("{p}.intermediate.intermediate_act_fn"),
                SiteKind::Activation,
            ));
            out.push(lin(&l.output));
            out.push(SiteInfo {
                path: format!("{p}.output.LayerNorm"),
                kind: SiteKind::SublayerOutput,
                params: 2 * h,
            });
        }
        if let Some(p) = &self.pooler {
            out.push(SiteInfo {
                path: p.path.clone(),
                kind: SiteKind::Linear,
                params: p.param_count(),
            });
        }
        out.push(SiteInfo {
            path: "classifier".into(),
            kind: SiteKind::Linear,
            params: self.classifier.param_count(),
        });
        out
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_path(&self, i: usize) -> String {
        format!("{}.encoder.layer.{i}", self.config.family.prefix())
    }

    fn sublayer_path(&self, i: usize, kind: Sublayer) -> String {
        match kind {
            Sublayer::Attention => format!("{}.attention.output", self.layer_path(i)),
            Sublayer::FeedForward => format!("{}.output", self.layer_path(i)),
        }
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn word_embeddings(&self) -> Tensor {
        self.embeddings.word.clone()
    }

    fn norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let prefix = self.config.family.prefix();
        let mut v = vec![(
            format!("{prefix}.embeddings.LayerNorm.bias"),
            &mut self.embeddings.norm.bias,
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("{prefix}.encoder.layer.{i}");
            v.push((
                format!("{p}.attention.output.LayerNorm.bias"),
                &mut l.attn_norm.bias,
            ));
            v.push((format!("{p}.output.LayerNorm.bias"), &mut l.out_norm.bias));
        }
        v
    }

    fn attach_site_delta(&mut self, delta: Arc<dyn SiteDelta>) {
        self.site_deltas.push(delta);
    }

    fn site_deltas_mut(&mut self) -> &mut Vec<Arc<dyn SiteDelta>> {
        &mut self.site_deltas
    }

    fn param_count(&self) -> usize {
        let h = self.config.hidden_size;
        let emb = &self.embeddings;
        let norms = (2 * self.layers.len() + 1) * 2 * h;
        emb.word.elem_count()
            + emb.position.elem_count()
            + emb.token_type.elem_count()
            + norms
            + self
                .linears()
                .iter()
                .map(|l| l.param_count())
                .sum::<usize>()
    }
}
