//! The Llama-architecture decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query causal
//! attention, tied or untied LM head) with deltas attachable at its named sites.
//!
//! Module paths are those of Hugging Face's `LlamaForCausalLM`
//! (`model.layers.3.self_attn.q_proj`, `model.layers.3.mlp.down_proj`, `lm_head`), so a path in
//! a checkpoint, in a target pattern and in a PEFT key are the same string. Frozen linear weights
//! may stay block-quantized (GGUF): their products dequantize block by block, never the whole
//! matrix ([`deltatune_core::ops::quant_linear`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::quant::QuantMatrix;
use deltatune_core::{ops, Ctx, Error, HasSites, Linear, Result, SiteInfo, SiteKind, Weights};

use super::config::{Activation, DecoderConfig, Family, HfDecoderConfig};
use super::gguf::GgufTensor;
use crate::backbone::{Backbone, CausalLm, TextBackbone};
use crate::layers;

/// The token-embedding table: a plain tensor or kept quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quant(QuantMatrix),
}

impl Embedding {
    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                Ok(t.index_select(&idx, 0)?)
            }
            Embedding::Quant(q) => q.gather_rows(ids),
        }
    }

    fn rows(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.dims()[0],
            Embedding::Quant(q) => q.rows(),
        }
    }

    fn elem_count(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count(),
            Embedding::Quant(q) => q.rows() * q.cols(),
        }
    }

    /// A plain f32 copy (prompt initialisation reads rows of it).
    fn dense(&self) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.clone()),
            Embedding::Quant(q) => q.dequantize(),
        }
    }
}

/// q, k and v as three projections or one (`qkv_proj`, Phi-3). One per layer: the size
/// difference between the variants does not matter.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The feed-forward's gate and up projections, or one `gate_up_proj` (Phi-3; gate first).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    qkv: Qkv,
    /// RMSNorm over each query / key head before rope (Qwen3, Gemma 3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: Linear,
    /// On the attention output before the residual (Gemma 2/3).
    post_attn_norm: Option<Tensor>,
    /// Before the feed-forward (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    ffn_norm: Tensor,
    /// On the feed-forward output before the residual (Gemma 2/3).
    post_ffn_norm: Option<Tensor>,
    gate_up: GateUp,
    down: Linear,
}

impl Layer {
    fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::with_capacity(7);
        match &self.qkv {
            Qkv::Split { q, k, v: vv } => v.extend([q, k, vv]),
            Qkv::Fused(l) => v.push(l),
        }
        v.push(&self.o);
        match &self.gate_up {
            GateUp::Split { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&self.down);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::with_capacity(7);
        match &mut self.qkv {
            Qkv::Split { q, k, v: vv } => v.extend([q, k, vv]),
            Qkv::Fused(l) => v.push(l),
        }
        v.push(&mut self.o);
        match &mut self.gate_up {
            GateUp::Split { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&mut self.down);
        v
    }

    /// The layer's norm weights under their Hugging Face names (after `model.layers.N.`).
    fn norms(&self, family: Family) -> Vec<(&'static str, &Tensor)> {
        let ffn_name = if family.sandwich_norms() {
            "pre_feedforward_layernorm.weight"
        } else {
            "post_attention_layernorm.weight"
        };
        let mut v = vec![("input_layernorm.weight", &self.input_norm)];
        if let Some(t) = &self.q_norm {
            v.push(("self_attn.q_norm.weight", t));
        }
        if let Some(t) = &self.k_norm {
            v.push(("self_attn.k_norm.weight", t));
        }
        if let Some(t) = &self.post_attn_norm {
            v.push(("post_attention_layernorm.weight", t));
        }
        v.push((ffn_name, &self.ffn_norm));
        if let Some(t) = &self.post_ffn_norm {
            v.push(("post_feedforward_layernorm.weight", t));
        }
        v
    }
}

/// Keys and values of the positions run so far, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values `[B, kv_heads, T_past, head_dim]` (keys already rotated).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[B, T_past]` u32: 1 where the cached position is a real token (or a prompt vector).
    mask: Option<Tensor>,
    /// Next position id of each row.
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of sequences (batch rows) cached.
    pub fn rows(&self) -> usize {
        self.next_pos.len()
    }

    /// Keeps only the rows `keep` (in that order): a finished sequence leaves a continuous
    /// batch. Leading positions that no kept row uses any more are dropped.
    pub fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.is_empty() {
            *self = Self::default();
            return Ok(());
        }
        if let Some(&bad) = keep.iter().find(|&&r| r >= self.rows()) {
            return Err(Error::Msg(format!(
                "row {bad} is not in a cache of {} rows",
                self.rows()
            )));
        }
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        let idx = Tensor::from_vec(
            keep.iter().map(|&r| r as u32).collect::<Vec<u32>>(),
            keep.len(),
            mask.device(),
        )?;
        let mask = mask.index_select(&idx, 0)?;
        // The first column some kept row attends to.
        let cols: Vec<Vec<u32>> = mask.to_vec2()?;
        let first = cols
            .iter()
            .filter_map(|r| r.iter().position(|&m| m == 1))
            .min()
            .unwrap_or(0);
        let t = mask.dim(1)?;
        self.mask = Some(mask.narrow(1, first, t - first)?);
        for kv in self.layers.iter_mut().flatten() {
            let k = kv.0.index_select(&idx, 0)?;
            let v = kv.1.index_select(&idx, 0)?;
            *kv = (
                k.narrow(2, first, t - first)?,
                v.narrow(2, first, t - first)?,
            );
        }
        self.next_pos = keep.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }

    /// Appends the rows of `other` (sequences prefilled on their own) below this cache's: the
    /// shorter side is left-padded with masked positions, so each row attends to exactly what
    /// it did alone (a request joins a continuous batch between decoding steps).
    pub fn append(&mut self, other: KvCache) -> Result<()> {
        if other.rows() == 0 {
            return Ok(());
        }
        if self.rows() == 0 {
            *self = other;
            return Ok(());
        }
        let (Some(m1), Some(m2)) = (&self.mask, &other.mask) else {
            return Err(Error::Msg("appending to a cache that ran no pass".into()));
        };
        if self.layers.len() != other.layers.len() {
            return Err(Error::Msg(format!(
                "caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let (t1, t2) = (m1.dim(1)?, m2.dim(1)?);
        let t = t1.max(t2);
        // Left-pads `x` along `dim` to `t` positions with zeros.
        let pad = |x: &Tensor, dim: usize| -> Result<Tensor> {
            let n = x.dim(dim)?;
            if n == t {
                return Ok(x.clone());
            }
            let mut shape = x.dims().to_vec();
            shape[dim] = t - n;
            let z = Tensor::zeros(shape, x.dtype(), x.device())?;
            Ok(Tensor::cat(&[&z, x], dim)?)
        };
        self.mask = Some(Tensor::cat(&[pad(m1, 1)?, pad(m2, 1)?], 0)?);
        for (a, b) in self.layers.iter_mut().zip(other.layers) {
            match (a.as_mut(), b) {
                (Some((k1, v1)), Some((k2, v2))) => {
                    *k1 = Tensor::cat(&[pad(k1, 2)?, pad(&k2, 2)?], 0)?;
                    *v1 = Tensor::cat(&[pad(v1, 2)?, pad(&v2, 2)?], 0)?;
                }
                _ => return Err(Error::Msg("appending caches with an empty layer".into())),
            }
        }
        self.next_pos.extend(other.next_pos);
        Ok(())
    }
}

/// A decoder-only causal LM of any supported family (`LlamaForCausalLM`,
/// `Gemma3ForCausalLM`, ...) with deltas attachable at its sites.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: DecoderConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The LM head, path `lm_head` (the embedding table itself when tied).
    pub lm_head: Linear,
    /// Deltas at the non-linear sites (prompts, prefixes, adapters, activation scaling).
    pub site_deltas: Vec<Arc<dyn SiteDelta>>,
    device: Device,
}

fn linear_from(path: &str, t: GgufTensor, bias: Option<Tensor>) -> Result<Linear> {
    Ok(match t {
        GgufTensor::Dense(w) => Linear::new(path, w, bias),
        GgufTensor::Quant(q) => {
            let mut l = Linear::quantized(path, q)?;
            l.bias = bias;
            l
        }
    })
}

/// One tensor the model reads: its Hugging Face key and shape, and the llama.cpp name it has
/// in a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub hf: String,
    pub gguf: String,
    pub shape: Vec<usize>,
}

/// Every tensor a model of `cfg` reads, in load order.
pub fn tensor_specs(cfg: &DecoderConfig) -> Vec<TensorSpec> {
    let fam = cfg.family;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qw, kvw, dh) = (cfg.q_width(), cfg.kv_width(), cfg.head_dim);
    let mut out = Vec::new();
    let mut add =
        |hf: String, gguf: String, shape: Vec<usize>| out.push(TensorSpec { hf, gguf, shape });
    add(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![v, h],
    );
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut t = |hf: &str, gguf: &str, shape: Vec<usize>| {
            add(format!("{p}.{hf}"), format!("blk.{l}.{gguf}"), shape)
        };
        t("input_layernorm.weight", "attn_norm.weight", vec![h]);
        if fam.fused_projections() {
            t(
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                vec![qw + 2 * kvw, h],
            );
        } else {
            t("self_attn.q_proj.weight", "attn_q.weight", vec![qw, h]);
            t("self_attn.k_proj.weight", "attn_k.weight", vec![kvw, h]);
            t("self_attn.v_proj.weight", "attn_v.weight", vec![kvw, h]);
            if cfg.qkv_bias {
                t("self_attn.q_proj.bias", "attn_q.bias", vec![qw]);
                t("self_attn.k_proj.bias", "attn_k.bias", vec![kvw]);
                t("self_attn.v_proj.bias", "attn_v.bias", vec![kvw]);
            }
        }
        if fam.qk_norm() {
            t("self_attn.q_norm.weight", "attn_q_norm.weight", vec![dh]);
            t("self_attn.k_norm.weight", "attn_k_norm.weight", vec![dh]);
        }
        t("self_attn.o_proj.weight", "attn_output.weight", vec![h, qw]);
        if cfg.o_bias {
            t("self_attn.o_proj.bias", "attn_output.bias", vec![h]);
        }
        if fam.sandwich_norms() {
            t(
                "post_attention_layernorm.weight",
                "post_attention_norm.weight",
                vec![h],
            );
            t(
                "pre_feedforward_layernorm.weight",
                "ffn_norm.weight",
                vec![h],
            );
            t(
                "post_feedforward_layernorm.weight",
                "post_ffw_norm.weight",
                vec![h],
            );
        } else {
            t(
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                vec![h],
            );
        }
        if fam.fused_projections() {
            t("mlp.gate_up_proj.weight", "ffn_up.weight", vec![2 * i, h]);
        } else {
            t("mlp.gate_proj.weight", "ffn_gate.weight", vec![i, h]);
            t("mlp.up_proj.weight", "ffn_up.weight", vec![i, h]);
        }
        t("mlp.down_proj.weight", "ffn_down.weight", vec![h, i]);
    }
    add(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![h],
    );
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), "output.weight".into(), vec![v, h]);
    }
    out
}

/// A plain f32 tensor of `t` (dequantizing a quantized one).
fn dense_of(t: GgufTensor, key: &str, source: &Path) -> Result<Tensor> {
    match t {
        GgufTensor::Dense(t) => Ok(t),
        GgufTensor::Quant(q) => q
            .dequantize()
            .map_err(|e| Error::Msg(format!("dequantizing `{key}` in {}: {e}", source.display()))),
    }
}

/// The tensors of one layer (`p` is its path) from a loader's source.
struct Source<'a, 'g> {
    get: &'a mut dyn FnMut(&str, &[usize]) -> Result<GgufTensor>,
    source: &'g Path,
    p: &'g str,
}

impl Source<'_, '_> {
    fn norm(&mut self, name: &str, size: usize) -> Result<Tensor> {
        let key = format!("{}.{name}.weight", self.p);
        dense_of((self.get)(&key, &[size])?, &key, self.source)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let path = format!("{}.{name}", self.p);
        let w = (self.get)(&format!("{path}.weight"), &[out, inp])?;
        let b = if bias {
            let key = format!("{path}.bias");
            Some(dense_of((self.get)(&key, &[out])?, &key, self.source)?)
        } else {
            None
        };
        linear_from(&path, w, b)
    }
}

impl Decoder {
    /// Loads a Hugging Face folder (`config.json` + `model.safetensors` or a sharded
    /// `model.safetensors.index.json`) or a GGUF file (quantized weights stay quantized).
    pub fn load(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "gguf") {
            let file = deltatune_core::GgufFile::open(path)?;
            let (config, tensors) = super::gguf::read_weights(&file)?;
            return Self::from_gguf_parts(config, tensors, path);
        }
        let cfg_path = path.join("config.json");
        let config = HfDecoderConfig::read(&cfg_path)?.into_config(&cfg_path)?;
        let weights = super::loader::read_safetensors(path)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the model from a read GGUF file (its tokenizer is left in `g`'s place unused).
    ///
    /// On a device other than the CPU ([`deltatune_core::device::current`]) the quantized
    /// matrices are dequantized to f32 there: the block kernels are CPU code, and the other
    /// devices multiply through candle's own products.
    pub fn from_gguf(g: super::gguf::DecoderGguf, path: &Path) -> Result<Self> {
        Self::from_gguf_parts(g.config, g.tensors, path)
    }

    /// [`Decoder::from_gguf`] from the config and tensors of [`super::gguf::read_weights`].
    pub fn from_gguf_parts(
        config: DecoderConfig,
        mut tensors: std::collections::BTreeMap<String, GgufTensor>,
        path: &Path,
    ) -> Result<Self> {
        let device = deltatune_core::device::current();
        Self::from_tensors(config, path, &mut |key, shape| {
            let t = tensors.remove(key).ok_or_else(|| Error::MissingTensor {
                key: key.to_string(),
                path: path.to_path_buf(),
                nearest: String::new(),
            })?;
            check_shape(&t, key, shape, path)?;
            if device.is_cpu() {
                return Ok(t);
            }
            let dense = match t {
                GgufTensor::Dense(t) => t,
                GgufTensor::Quant(q) => q.dequantize().map_err(|e| {
                    Error::Msg(format!("dequantizing `{key}` in {}: {e}", path.display()))
                })?,
            };
            Ok(GgufTensor::Dense(dense.to_device(&device)?))
        })
    }

    /// Builds the model from a parsed config and safetensors weights (Hugging Face names and
    /// conventions: Gemma's norm weights are stored as `w` for `1 + w`).
    pub fn from_weights(config: DecoderConfig, weights: &Weights) -> Result<Self> {
        let hint = "the sizes in config.json";
        let path = weights.path().to_path_buf();
        let plus_one = config.family.norm_plus_one();
        Self::from_tensors(config, &path, &mut |key, shape| {
            if key == "lm_head.weight" && !weights.contains(key) {
                return Err(Error::MissingTensor {
                    key: key.into(),
                    path: weights.path().to_path_buf(),
                    nearest: "set tie_word_embeddings in config.json if the head is tied".into(),
                });
            }
            let t = weights.get(key, shape, hint)?;
            Ok(GgufTensor::Dense(
                if plus_one && key.ends_with("norm.weight") {
                    (t + 1.0)?
                } else {
                    t
                },
            ))
        })
    }

    /// Builds the model from a tensor source keyed by Hugging Face names (norm weights as the
    /// model multiplies by them: Gemma's `1 + w` already added); `source` names the file in
    /// errors.
    pub fn from_tensors(
        config: DecoderConfig,
        source: &Path,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<GgufTensor>,
    ) -> Result<Self> {
        config.validate(source)?;
        let fam = config.family;
        let (h, i, kv) = (
            config.hidden_size,
            config.intermediate_size,
            config.kv_width(),
        );
        let (qw, dh) = (config.q_width(), config.head_dim);
        let embed = match get("model.embed_tokens.weight", &[config.vocab_size, h])? {
            GgufTensor::Dense(t) => Embedding::Dense(t),
            GgufTensor::Quant(q) => Embedding::Quant(q),
        };
        // Not sized by the config: a corrupt layer count must fail at its first missing tensor,
        // not in an allocation.
        let mut layers = Vec::new();
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            let mut src = Source {
                get: &mut *get,
                source,
                p: &p,
            };
            let input_norm = src.norm("input_layernorm", h)?;
            let qkv = if fam.fused_projections() {
                Qkv::Fused(src.linear("self_attn.qkv_proj", qw + 2 * kv, h, false)?)
            } else {
                let qb = config.qkv_bias;
                Qkv::Split {
                    q: src.linear("self_attn.q_proj", qw, h, qb)?,
                    k: src.linear("self_attn.k_proj", kv, h, qb)?,
                    v: src.linear("self_attn.v_proj", kv, h, qb)?,
                }
            };
            let (q_norm, k_norm) = if fam.qk_norm() {
                (
                    Some(src.norm("self_attn.q_norm", dh)?),
                    Some(src.norm("self_attn.k_norm", dh)?),
                )
            } else {
                (None, None)
            };
            let o = src.linear("self_attn.o_proj", h, qw, config.o_bias)?;
            let (post_attn_norm, ffn_norm, post_ffn_norm) = if fam.sandwich_norms() {
                (
                    Some(src.norm("post_attention_layernorm", h)?),
                    src.norm("pre_feedforward_layernorm", h)?,
                    Some(src.norm("post_feedforward_layernorm", h)?),
                )
            } else {
                (None, src.norm("post_attention_layernorm", h)?, None)
            };
            let gate_up = if fam.fused_projections() {
                GateUp::Fused(src.linear("mlp.gate_up_proj", 2 * i, h, false)?)
            } else {
                GateUp::Split {
                    gate: src.linear("mlp.gate_proj", i, h, false)?,
                    up: src.linear("mlp.up_proj", i, h, false)?,
                }
            };
            let down = src.linear("mlp.down_proj", h, i, false)?;
            layers.push(Layer {
                input_norm,
                qkv,
                q_norm,
                k_norm,
                o,
                post_attn_norm,
                ffn_norm,
                post_ffn_norm,
                gate_up,
                down,
            });
        }
        let norm = dense_of(get("model.norm.weight", &[h])?, "model.norm.weight", source)?;
        let lm_head = if config.tie_word_embeddings {
            match &embed {
                Embedding::Dense(t) => Linear::new("lm_head", t.clone(), None),
                Embedding::Quant(q) => Linear::quantized("lm_head", q.clone())?,
            }
        } else {
            linear_from(
                "lm_head",
                get("lm_head.weight", &[config.vocab_size, h])?,
                None,
            )?
        };
        // Where the weights live; every tensor the model makes goes there.
        let device = norm.device().clone();
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            site_deltas: Vec::new(),
            device,
        })
    }

    /// The last hidden states (after the final norm) of `ids`, continuing `cache` when given
    /// (and appending to it). `mask` marks real tokens (1) against padding (0); rows may be
    /// left-padded (generation) or right-padded (training). Prompt vectors of attached deltas
    /// are prepended on the first pass (an empty or absent cache) and their positions returned
    /// too: the result has `T + P` positions then.
    ///
    /// # Shapes
    /// `ids`: B rows of T ids, `mask`: B rows of T -> [B, P + T, hidden]
    pub fn forward_hidden(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let b = ids.len();
        let t = ids.first().map_or(0, |r| r.len());
        if b == 0 || t == 0 {
            return Err(Error::Msg("forward: empty batch".into()));
        }
        if ids.iter().any(|r| r.len() != t) || mask.len() != b || mask.iter().any(|r| r.len() != t)
        {
            return Err(Error::Msg(
                "forward: ids and mask must be B rows of the same length".into(),
            ));
        }
        let h = cfg.hidden_size;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(bad) = flat.iter().find(|&&i| i as usize >= self.embed.rows()) {
            return Err(Error::Msg(format!(
                "token id {bad} is outside the vocabulary of {} ids",
                self.embed.rows()
            )));
        }
        let mut x = self.embed.lookup(&flat)?.reshape((b, t, h))?;
        let mut mask: Vec<Vec<u32>> = mask.to_vec();
        let first_pass = cache.as_ref().is_none_or(|c| c.is_empty());
        if first_pass {
            // Prompt vectors go before everything, as PEFT's prompt tuning does for causal LMs
            // (several deltas' prompts in delta order).
            let mut parts = Vec::new();
            for p in layers::prompts(&self.site_deltas, ctx)? {
                let n = p.dim(0)?;
                parts.push(
                    p.unsqueeze(0)?
                        .broadcast_as((b, n, h))?
                        .to_dtype(x.dtype())?,
                );
                for row in mask.iter_mut() {
                    let mut m = vec![1u32; n];
                    m.extend_from_slice(row);
                    *row = m;
                }
            }
            if !parts.is_empty() {
                parts.push(x);
                x = Tensor::cat(&parts, 1)?;
            }
        }
        if cfg.family.scales_embeddings() {
            // Gemma multiplies whatever enters the first layer (prompt vectors included, as
            // PEFT passes them in `inputs_embeds`) by sqrt(hidden), rounded to the dtype.
            x = (x * f64::from((h as f32).sqrt()))?;
        }
        let t = x.dim(1)?;
        // Prefix keys count as earlier positions (PEFT passes them as a past cache): the
        // first real token's position is the prefix length.
        // Every layer with a prefix has the same number of prefix positions: the first such
        // layer tells (each call may run a prefix's reparameterisation MLP, so stop there).
        let mut prefix_len = 0;
        for li in 0..self.layers.len() {
            prefix_len = layers::prefix_len(&self.site_deltas, li, ctx)?;
            if prefix_len > 0 {
                break;
            }
        }
        // Position ids: the count of real positions before each one (continuing the cache);
        // padding positions keep their index, as transformers' default positions do.
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mut positions = Vec::with_capacity(b);
        let mut next = Vec::with_capacity(b);
        for (r, row) in mask.iter().enumerate() {
            let mut p = cache
                .as_ref()
                .and_then(|c| c.next_pos.get(r).copied())
                .unwrap_or(prefix_len as u32);
            let mut out = Vec::with_capacity(t);
            for (j, &m) in row.iter().enumerate() {
                if m == 1 {
                    out.push(p);
                    p += 1;
                } else {
                    out.push((prefix_len + past + j) as u32);
                }
            }
            next.push(p);
            positions.push(out);
        }
        let max_pos = positions.iter().flatten().copied().max().unwrap_or(0) as usize;
        if max_pos >= cfg.max_position_embeddings {
            return Err(Error::Msg(format!(
                "position {max_pos} is beyond the model's context of {} tokens \
                 (max_position_embeddings); shorten the input",
                cfg.max_position_embeddings
            )));
        }
        // cos/sin per distinct rope of the layers (Gemma 3: local and global bases).
        let mut ropes: Vec<(super::config::Rope, Tensor, Tensor)> = Vec::new();
        for l in 0..self.layers.len() {
            let r = cfg.rope_of(l);
            if !ropes.iter().any(|(x, _, _)| x == r) {
                let (c, s) =
                    ops::rope_angles_inv(&positions, &r.inv_freq(cfg.head_dim), &self.device)?;
                ropes.push((r.clone(), c, s));
            }
        }
        // Key mask over [cached | current] positions.
        let cur_mask = Tensor::from_vec(
            mask.iter().flatten().copied().collect::<Vec<u32>>(),
            (b, t),
            &self.device,
        )?;
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(m) => Tensor::cat(&[m, &cur_mask], 1)?,
            None => cur_mask,
        };
        let key_bias = ((key_mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;

        let (nh, nkv, dh) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (qw, kvw) = (cfg.q_width(), cfg.kv_width());
        let eps = cfg.rms_norm_eps;
        for (li, layer) in self.layers.iter().enumerate() {
            x = ctx.cut(x);
            if first_pass && li > 0 {
                x = layers::deep_prompts(&self.site_deltas, li, x, 0, ctx)?;
            }
            let xn = ops::rms_norm(&x, &layer.input_norm, eps)?;
            let (q, k, v) = match &layer.qkv {
                Qkv::Split { q, k, v } => (
                    q.forward(&xn, ctx)?,
                    k.forward(&xn, ctx)?,
                    v.forward(&xn, ctx)?,
                ),
                Qkv::Fused(l) => {
                    let y = l.forward(&xn, ctx)?;
                    (
                        y.narrow(2, 0, qw)?,
                        y.narrow(2, qw, kvw)?,
                        y.narrow(2, qw + kvw, kvw)?,
                    )
                }
            };
            let mut q = q.reshape((b, t, nh, dh))?;
            let mut k = k.reshape((b, t, nkv, dh))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = ops::rms_norm(&q.contiguous()?, qn, eps)?;
                k = ops::rms_norm(&k.contiguous()?, kn, eps)?;
            }
            let q = q.transpose(1, 2)?;
            let k = k.transpose(1, 2)?;
            let v = v.reshape((b, t, nkv, dh))?.transpose(1, 2)?.contiguous()?;
            let rope = cfg.rope_of(li);
            let (_, cos, sin) = ropes
                .iter()
                .find(|(r, _, _)| r == rope)
                .expect("every layer's rope was computed");
            let q = ops::rope(&q, cos, sin)?;
            let k = ops::rope(&k, cos, sin)?;
            // Cached keys and values, then this pass's.
            let (k, v) = match cache.as_mut() {
                Some(c) => {
                    if c.layers.len() < self.layers.len() {
                        c.layers.resize(self.layers.len(), None);
                    }
                    let kv = match &c.layers[li] {
                        Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                        None => (k, v),
                    };
                    c.layers[li] = Some((kv.0.detach(), kv.1.detach()));
                    kv
                }
                None => (k, v),
            };
            let attn = layers::attention_with(
                &q,
                k,
                v,
                &key_bias,
                layers::Heads {
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: dh,
                },
                layers::AttnOptions {
                    scale: cfg.attention_scale(),
                    window: cfg.window(li),
                    softcap: cfg.attn_logit_softcapping,
                },
                li,
                &self.site_deltas,
                true,
                0.0,
                ctx,
            )?;
            let mut attn = layer.o.forward(&attn, ctx)?;
            if let Some(n) = &layer.post_attn_norm {
                attn = ops::rms_norm(&attn, n, eps)?;
            }
            let attn =
                layers::sublayer(&self.site_deltas, li, Sublayer::Attention, &xn, attn, ctx)?;
            let x1 = (attn + &x)?;
            let xn = ops::rms_norm(&x1, &layer.ffn_norm, eps)?;
            let (gate, up) = match &layer.gate_up {
                GateUp::Split { gate, up } => (gate.forward(&xn, ctx)?, up.forward(&xn, ctx)?),
                GateUp::Fused(l) => {
                    let y = l.forward(&xn, ctx)?;
                    let i = cfg.intermediate_size;
                    (y.narrow(2, 0, i)?, y.narrow(2, i, i)?)
                }
            };
            let a = match cfg.activation {
                Activation::Silu => ops::swiglu(&gate, &up)?,
                // With 8-bit activations generation follows llama.cpp, which reads GELU from
                // an f16 table.
                Activation::GeluTanh if ctx.int8 && !gate.device().is_cuda() => {
                    (ops::gelu_tanh_f16_table(&gate)? * up)?
                }
                Activation::GeluTanh => (gate.gelu()? * up)?,
            };
            let a = layers::activation(&self.site_deltas, li, a, ctx)?;
            let mut out = layer.down.forward(&a, ctx)?;
            if let Some(n) = &layer.post_ffn_norm {
                out = ops::rms_norm(&out, n, eps)?;
            }
            let out =
                layers::sublayer(&self.site_deltas, li, Sublayer::FeedForward, &xn, out, ctx)?;
            x = (out + x1)?;
        }
        if let Some(c) = cache {
            c.mask = Some(key_mask.detach());
            c.next_pos = next;
        }
        Ok(ops::rms_norm(&x, &self.norm, eps)?)
    }

    /// Next-token logits of hidden states.
    ///
    /// # Shapes
    /// `hidden`: [..., hidden] -> [..., vocab]
    pub fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden, ctx)?;
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// Logits at every position.
    ///
    /// # Shapes
    /// `ids`: B rows of T -> [B, P + T, vocab]
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let hdn = self.forward_hidden(ids, mask, cache, ctx)?;
        self.logits(&hdn, ctx)
    }

    /// Replaces every quantized weight by its f32 dequantization (the f32 base that QLoRA-style
    /// training avoids; for comparisons).
    pub fn dequantize_base(&mut self) -> Result<()> {
        if let Embedding::Quant(q) = &self.embed {
            self.embed = Embedding::Dense(q.dequantize()?);
        }
        let tied = self.config.tie_word_embeddings;
        for lin in self.linears_mut() {
            if let Some(q) = lin.quant.take() {
                lin.weight = q.dequantize()?;
            }
        }
        if tied {
            if let Embedding::Dense(t) = &self.embed {
                self.lm_head.weight = t.clone();
            }
        }
        Ok(())
    }

    /// Bytes held by the frozen base (quantized blocks counted as stored).
    pub fn base_bytes(&self) -> usize {
        let embed = match &self.embed {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Quant(q) => q.size_in_bytes(),
        };
        let lin = |l: &Linear| l.weight_bytes();
        let mut total = embed + self.norm.elem_count() * 4;
        for l in &self.layers {
            total += l.linears().into_iter().map(lin).sum::<usize>();
            total += l
                .norms(self.config.family)
                .iter()
                .map(|(_, t)| t.elem_count() * 4)
                .sum::<usize>();
        }
        if !self.config.tie_word_embeddings {
            total += lin(&self.lm_head);
        }
        total
    }
}

fn check_shape(t: &GgufTensor, key: &str, shape: &[usize], path: &Path) -> Result<()> {
    let actual: Vec<usize> = match t {
        GgufTensor::Dense(t) => t.dims().to_vec(),
        GgufTensor::Quant(q) => vec![q.rows(), q.cols()],
    };
    if actual != shape {
        return Err(Error::ShapeMismatch {
            key: key.into(),
            path: path.to_path_buf(),
            expected: shape.to_vec(),
            actual,
            hint: " (the GGUF metadata's sizes disagree with its tensors)".into(),
        });
    }
    Ok(())
}

/// Rows of token ids with their masks (1 real, 0 padding), as [`Decoder::forward_hidden`]
/// reads them; rows may be padded on either side.
#[derive(Debug, Clone, Default)]
pub struct TokenRows {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

impl Backbone for Decoder {
    type Batch = TokenRows;

    fn device(&self) -> &Device {
        &self.device
    }

    fn hidden_states(&self, batch: &TokenRows, ctx: &Ctx) -> Result<Tensor> {
        self.forward_hidden(&batch.ids, &batch.mask, None, ctx)
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        // Hugging Face stores Gemma's norm weights as `w` for `1 + w`.
        let fam = self.config.family;
        let hf_norm = |t: &Tensor| -> Result<Tensor> {
            Ok(if fam.norm_plus_one() {
                (t - 1.0)?
            } else {
                t.clone()
            })
        };
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.dense()?)];
        for (i, l) in self.layers.iter().enumerate() {
            for (name, t) in l.norms(fam) {
                v.push((format!("model.layers.{i}.{name}"), hf_norm(t)?));
            }
        }
        v.push(("model.norm.weight".to_string(), hf_norm(&self.norm)?));
        for lin in self.linears() {
            if lin.path == "lm_head" && self.config.tie_word_embeddings && lin.deltas.is_empty() {
                continue;
            }
            v.push((format!("{}.weight", lin.path), lin.dense_weight()?));
            if let Some(b) = &lin.bias {
                v.push((format!("{}.bias", lin.path), b.clone()));
            }
        }
        Ok(v)
    }
}

impl TextBackbone for Decoder {
    fn token_batch(&self, seqs: &[Vec<u32>]) -> Result<TokenRows> {
        let pad = self.config.pad_token_id.unwrap_or(0);
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let padded = |s: &[u32], fill: u32| {
            let mut r = s.to_vec();
            r.resize(t, fill);
            r
        };
        Ok(TokenRows {
            ids: seqs.iter().map(|s| padded(s, pad)).collect(),
            mask: seqs.iter().map(|s| padded(&vec![1; s.len()], 0)).collect(),
        })
    }
}

impl CausalLm for Decoder {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn lm_logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.logits(hidden, ctx)
    }
}

impl HasSites for Decoder {
    fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self.layers.iter().flat_map(|l| l.linears()).collect();
        v.push(&self.lm_head);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect();
        v.push(&mut self.lm_head);
        v
    }

    fn sites(&self) -> Vec<SiteInfo> {
        let mut out = vec![SiteInfo {
            path: "model.embed_tokens".into(),
            kind: SiteKind::Embeddings,
            params: self.embed.elem_count(),
        }];
        let lin = |x: &Linear| SiteInfo {
            path: x.path.clone(),
            kind: SiteKind::Linear,
            params: x.param_count(),
        };
        let site = |path: String, kind: SiteKind| SiteInfo {
            path,
            kind,
            params: 0,
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push(site(
                format!("{p}.self_attn.past_key_value"),
                SiteKind::KeyValue,
            ));
            let lins = l.linears();
            // q, k, v (or qkv) and o, then gate and up (or gate_up), then down.
            let n_attn = lins.len()
                - if matches!(l.gate_up, GateUp::Fused(_)) {
                    2
                } else {
                    3
                };
            out.extend(lins[..n_attn].iter().map(|x| lin(x)));
            out.push(site(format!("{p}.self_attn"), SiteKind::SublayerOutput));
            out.extend(lins[n_attn..lins.len() - 1].iter().map(|x| lin(x)));
            out.push(site(format!("{p}.mlp.act_fn"), SiteKind::Activation));
            out.push(lin(&l.down));
            out.push(site(format!("{p}.mlp"), SiteKind::SublayerOutput));
        }
        out.push(lin(&self.lm_head));
        out
    }

    fn param_count(&self) -> usize {
        let fam = self.config.family;
        let mut n = self.embed.elem_count() + self.norm.elem_count();
        for l in &self.layers {
            n += l.linears().iter().map(|x| x.param_count()).sum::<usize>();
            n += l
                .norms(fam)
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>();
        }
        if !self.config.tie_word_embeddings {
            n += self.lm_head.param_count();
        }
        n
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_path(&self, i: usize) -> String {
        format!("model.layers.{i}")
    }

    fn sublayer_path(&self, i: usize, kind: Sublayer) -> String {
        match kind {
            Sublayer::Attention => format!("model.layers.{i}.self_attn"),
            Sublayer::FeedForward => format!("model.layers.{i}.mlp"),
        }
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn kv_width(&self) -> usize {
        self.config.kv_width()
    }

    fn word_embeddings(&self) -> Tensor {
        self.embed
            .dense()
            .expect("dequantizing the embedding table")
    }

    fn norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        // RMSNorm has no bias; bias tuning trains the norms' weights instead (norm_weights_mut).
        Vec::new()
    }

    fn attach_site_delta(&mut self, delta: Arc<dyn SiteDelta>) {
        self.site_deltas.push(delta);
    }

    fn site_deltas_mut(&mut self) -> &mut Vec<Arc<dyn SiteDelta>> {
        &mut self.site_deltas
    }
}
