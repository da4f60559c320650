//! Building blocks every model family shares, and where the non-linear site hooks are called:
//! attention with prefix keys and values (any head grouping, causal or not), the sub-layer and
//! activation hooks, and prompt vectors. A model written with these gets every method that acts
//! at those sites without method code knowing the model.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{ops, Ctx, Result};

/// Maps a model's module paths to checkpoint keys: a checkpoint may or may not carry the
/// backbone's prefix (`bert.`, `dinov2.`), as transformers writes a bare backbone without it.
pub struct KeyMap<'a> {
    pub weights: &'a deltatune_core::Weights,
    prefixed: bool,
    prefix: &'static str,
}

impl<'a> KeyMap<'a> {
    /// Keys carry `prefix.` when any key of `weights` does.
    pub fn new(weights: &'a deltatune_core::Weights, prefix: &'static str) -> Self {
        let prefixed = weights.keys().any(|k| k.starts_with(&format!("{prefix}.")));
        Self {
            weights,
            prefixed,
            prefix,
        }
    }

    /// The checkpoint key of module path `path`.
    pub fn key(&self, path: &str) -> String {
        if self.prefixed {
            path.to_string()
        } else {
            path.strip_prefix(self.prefix)
                .and_then(|p| p.strip_prefix('.'))
                .unwrap_or(path)
                .to_string()
        }
    }

    /// The tensor at `path`, checked to be `shape`.
    pub fn get(&self, path: &str, shape: &[usize], hint: &str) -> Result<Tensor> {
        self.weights.get(&self.key(path), shape, hint)
    }

    /// The linear layer at `path` (`[out, in]` weight; the bias required with `bias`, else
    /// read when present).
    pub fn linear(
        &self,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
        hint: &str,
    ) -> Result<deltatune_core::Linear> {
        let k = self.key(path);
        let w = self
            .weights
            .get(&format!("{k}.weight"), &[out, inp], hint)?;
        let b = if bias {
            Some(self.weights.get(&format!("{k}.bias"), &[out], hint)?)
        } else {
            self.weights.get_opt(&format!("{k}.bias"), &[out], hint)?
        };
        Ok(deltatune_core::Linear::new(path, w, b))
    }

    /// The layer norm at `path`.
    pub fn norm(&self, path: &str, size: usize, eps: f64) -> Result<LayerNorm> {
        LayerNorm::load(self.weights, &self.key(path), size, eps)
    }
}

/// A layer norm with weight and bias (the encoders' and the ViT's).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// `{key}.weight` and `{key}.bias`, each `[size]`.
    pub fn load(w: &deltatune_core::Weights, key: &str, size: usize, eps: f64) -> Result<Self> {
        let hint = "hidden_size in config.json";
        Ok(Self {
            weight: w.get(&format!("{key}.weight"), &[size], hint)?,
            bias: w.get(&format!("{key}.bias"), &[size], hint)?,
            eps,
        })
    }

    /// # Shapes
    /// `x`: [..., size] -> [..., size]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// `norm(dropout(x, p) + residual)` as one op (`ops::residual_layer_norm`), the dropout
    /// drawn from `ctx` exactly as `ctx.dropout(x, p)` draws it.
    ///
    /// # Shapes
    /// `x`, `residual`: [..., size] -> [..., size]
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        p: f64,
        ctx: &deltatune_core::Ctx,
    ) -> candle_core::Result<Tensor> {
        let bits = (ctx.train && p > 0.0).then(|| ctx.dropout_bits(x.elem_count(), p));
        ops::residual_layer_norm(x, residual, &self.weight, &self.bias, self.eps, bits)
    }
}

/// Head layout of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (equal to `heads` without grouping; a divisor of it with grouped-query
    /// attention).
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `k`, `v` and the key bias `[B, Tk]` with every delta's prefix keys and values of layer
/// `layer` prepended along `axis` (each `[P, KVH * D]` prefix laid out by `lay(prefix, P)` for
/// that axis, then cast to `k`'s dtype) and zeros prepended to the bias (as f32).
#[allow(clippy::too_many_arguments)]
fn with_prefixes(
    mut k: Tensor,
    mut v: Tensor,
    mut bias: Tensor,
    layer: usize,
    deltas: &[Arc<dyn SiteDelta>],
    ctx: &Ctx,
    axis: usize,
    lay: impl Fn(Tensor, usize) -> candle_core::Result<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    for d in deltas {
        if let Some((pk, pv)) = d.prefix(layer, ctx)? {
            let n = pk.dim(0)?;
            let dt = k.dtype();
            k = Tensor::cat(&[&lay(pk, n)?.to_dtype(dt)?, &k], axis)?;
            v = Tensor::cat(&[&lay(pv, n)?.to_dtype(dt)?, &v], axis)?;
            let zeros = Tensor::zeros((bias.dim(0)?, n), DType::F32, bias.device())?;
            bias = Tensor::cat(&[&zeros, &bias.to_dtype(DType::F32)?], 1)?;
        }
    }
    Ok((k, v, bias))
}

/// Scaled dot-product attention of layer `layer`, with the prefixes of `deltas` prepended to
/// the keys and values (visible to every query). Grouped-query attention runs without
/// repeating keys: the query heads sharing a key/value head are stacked along the query axis.
/// `causal`: query `i` sees the keys before it and itself (prefixes and cached positions
/// count as before). `dropout` applies to the probabilities when training.
///
/// # Shapes
/// `q`: [B, H, Tq, D], `k`, `v`: [B, KVH, Tk, D], `key_bias`: [B, Tk] (0 or a large negative
/// number) -> [B, Tq, H * D]
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: &Tensor,
    heads: Heads,
    layer: usize,
    deltas: &[Arc<dyn SiteDelta>],
    causal: bool,
    dropout: f64,
    ctx: &Ctx,
) -> Result<Tensor> {
    let scale = 1.0 / (heads.head_dim as f64).sqrt();
    attention_with(
        q,
        k,
        v,
        key_bias,
        heads,
        AttnOptions {
            scale,
            window: None,
            softcap: None,
        },
        layer,
        deltas,
        causal,
        dropout,
        ctx,
    )
}

/// How a decoder family's attention differs from the plain scaled dot product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnOptions {
    /// Scores are multiplied by this (usually `head_dim^-1/2`).
    pub scale: f64,
    /// A query sees only the `window` keys ending at its own position (prefix and cached keys
    /// count as earlier positions), as transformers' and llama.cpp's sliding windows.
    pub window: Option<usize>,
    /// `cap · tanh(score / cap)` on the scaled scores before masking (Gemma 2).
    pub softcap: Option<f64>,
}

/// [`attention`] with a family's [`AttnOptions`]. A window that hides nothing (no more keys
/// than the window) and no soft-capping run the fast kernels; otherwise the scores are
/// composed from candle ops with a per-query mask (training and inference alike).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: &Tensor,
    heads: Heads,
    opts: AttnOptions,
    layer: usize,
    deltas: &[Arc<dyn SiteDelta>],
    causal: bool,
    dropout: f64,
    ctx: &Ctx,
) -> Result<Tensor> {
    let (nkv, dh) = (heads.kv_heads, heads.head_dim);
    let (b, _, tq, _) = q.dims4()?;
    let (k, v, bias) = with_prefixes(k, v, key_bias.clone(), layer, deltas, ctx, 2, |p, n| {
        p.reshape((n, nkv, dh))?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .broadcast_as((b, nkv, n, dh))
    })?;
    let tk = k.dim(2)?;
    let scale = opts.scale;
    let window = opts.window.filter(|&w| tk > w);
    if window.is_some() || opts.softcap.is_some() {
        return masked_attention(
            q,
            &k,
            &v,
            &bias,
            heads,
            scale,
            window,
            opts.softcap,
            causal,
            dropout,
            ctx,
        );
    }
    if ctx.no_grad && !ctx.train && !ops::portable::active(q) {
        // Inference batches unrelated sequences, padded: each row's numbers from its own
        // visible keys only, the same alone and in any batch.
        return Ok(ops::attention_rows(
            q,
            &k,
            &v,
            &bias,
            scale,
            causal.then(|| tk - tq),
        )?);
    }
    let scores = grouped_scores(q, &k, heads)?;
    let probs = if causal {
        ops::causal_attention_softmax(&scores, &bias, scale, tk - tq)?
    } else {
        ops::attention_softmax(&scores, &bias, scale)?
    };
    let probs = ctx.dropout(&probs, dropout)?;
    weighted_values(&probs, &v, heads)
}

/// `q·kᵀ` per head without repeating keys: the query heads sharing a key/value head are
/// stacked along the query axis.
///
/// # Shapes
/// `q`: [B, H, Tq, D], `k`: [B, KVH, Tk, D] -> [B, H, Tq, Tk]
fn grouped_scores(q: &Tensor, k: &Tensor, heads: Heads) -> Result<Tensor> {
    let (b, nh, tq, dh) = q.dims4()?;
    let (nkv, tk) = (heads.kv_heads, k.dim(2)?);
    let qg = q.contiguous()?.reshape((b, nkv, (nh / nkv) * tq, dh))?;
    Ok(qg.matmul(&k.contiguous()?.t()?)?.reshape((b, nh, tq, tk))?)
}

/// The probabilities times the values, heads concatenated per token.
///
/// # Shapes
/// `probs`: [B, H, Tq, Tk], `v`: [B, KVH, Tk, D] -> [B, Tq, H * D]
fn weighted_values(probs: &Tensor, v: &Tensor, heads: Heads) -> Result<Tensor> {
    let (b, nh, tq, tk) = probs.dims4()?;
    let (nkv, dh) = (heads.kv_heads, heads.head_dim);
    Ok(probs
        .reshape((b, nkv, (nh / nkv) * tq, tk))?
        .matmul(&v.contiguous()?)?
        .reshape((b, nh, tq, dh))?
        .transpose(1, 2)?
        .reshape((b, tq, nh * dh))?)
}

/// Attention composed from candle ops with a mask per query: soft-capped scores and sliding
/// windows. Query `i` sits at key index `i + Tk - Tq`; it sees key `j` when `j` is not after
/// it (causal) and, with a window `w`, when it is fewer than `w` keys before it.
#[allow(clippy::too_many_arguments)]
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: Heads,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
    causal: bool,
    dropout: f64,
    ctx: &Ctx,
) -> Result<Tensor> {
    let (b, _, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let mut scores = (grouped_scores(q, k, heads)? * scale)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let off = tk - tq;
    let mut pos_mask = vec![0f32; tq * tk];
    for i in 0..tq {
        let me = i + off;
        for j in 0..tk {
            let hidden = (causal && j > me) || window.is_some_and(|w| j + w <= me);
            if hidden {
                pos_mask[i * tk + j] = -1e9;
            }
        }
    }
    let pos_mask = Tensor::from_vec(pos_mask, (1, 1, tq, tk), q.device())?;
    let mask = pos_mask.broadcast_add(&key_bias.to_dtype(DType::F32)?.reshape((b, 1, 1, tk))?)?;
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let probs = ops::softmax_last_dim(&scores)?;
    let probs = ctx.dropout(&probs, dropout)?;
    weighted_values(&probs, v, heads)
}

/// [`attention`] on token-major projections, as one op with its own backward
/// (`deltatune_core::ops::attention`): the linear layers' outputs go in as they are, with no
/// head transposes, and prefixes are prepended along the token axis. Same numbers and the same
/// dropout draws as [`attention`]. Off the CPU it runs [`attention`].
///
/// # Shapes
/// `q`: [B, Tq, H * D], `k`, `v`: [B, Tk, KVH * D], `key_bias`: [B, Tk] -> [B, Tq, H * D]
#[allow(clippy::too_many_arguments)]
pub fn attention_tokens(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: &Tensor,
    heads: Heads,
    layer: usize,
    deltas: &[Arc<dyn SiteDelta>],
    causal: bool,
    dropout: f64,
    ctx: &Ctx,
) -> Result<Tensor> {
    let Heads {
        heads: nh,
        kv_heads: nkv,
        head_dim: dh,
    } = heads;
    let (b, tq, _) = q.dims3()?;
    let (k, v, bias) = with_prefixes(
        k,
        v,
        key_bias.to_dtype(DType::F32)?,
        layer,
        deltas,
        ctx,
        1,
        |p, n| p.reshape((1, n, nkv * dh))?.broadcast_as((b, n, nkv * dh)),
    )?;
    let tk = k.dim(1)?;
    // The draws `ctx.dropout` would make for the [B, H, Tq, Tk] probabilities.
    let drop = (ctx.train && dropout > 0.0).then(|| ctx.dropout_bits(b * nh * tq * tk, dropout));
    Ok(deltatune_core::ops::attention(
        q,
        &k,
        &v,
        &bias.to_dtype(q.dtype())?,
        nh,
        nkv,
        1.0 / (dh as f64).sqrt(),
        causal.then(|| tk - tq),
        drop,
    )?)
}

/// The output of sub-layer `kind` of layer `layer` through every delta's hook.
///
/// # Shapes
/// `input`, `output`: [B, T, hidden] -> [B, T, hidden]
pub fn sublayer(
    deltas: &[Arc<dyn SiteDelta>],
    layer: usize,
    kind: Sublayer,
    input: &Tensor,
    output: Tensor,
    ctx: &Ctx,
) -> Result<Tensor> {
    let mut out = output;
    for d in deltas {
        out = d.sublayer(layer, kind, input, out, ctx)?;
    }
    Ok(out)
}

/// The feed-forward activation of layer `layer` through every delta's hook.
pub fn activation(
    deltas: &[Arc<dyn SiteDelta>],
    layer: usize,
    a: Tensor,
    ctx: &Ctx,
) -> Result<Tensor> {
    let mut a = a;
    for d in deltas {
        a = d.activation(layer, a, ctx)?;
    }
    Ok(a)
}

/// The prompt vectors of every delta, in order (each `[P, hidden]`).
/// Whether a delta puts the prompts before the first token ([`SiteDelta::prompt_at_start`]).
pub fn prompts_at_start(deltas: &[Arc<dyn SiteDelta>]) -> bool {
    deltas.iter().any(|d| d.prompt_at_start())
}

pub fn prompts(deltas: &[Arc<dyn SiteDelta>], ctx: &Ctx) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for d in deltas {
        if let Some(p) = d.prompt(ctx)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// The hidden states entering layer `layer` with each delta's deep prompts in place of its
/// prompt vectors. Prompts sit after the first `first` positions (1 behind CLS, 0 at the
/// start), in delta order, each delta's block as long as its [`SiteDelta::prompt`].
///
/// # Shapes
/// `x`: [B, T, hidden] -> [B, T, hidden]
pub fn deep_prompts(
    deltas: &[Arc<dyn SiteDelta>],
    layer: usize,
    x: Tensor,
    first: usize,
    ctx: &Ctx,
) -> Result<Tensor> {
    let mut x = x;
    let mut at = first;
    for d in deltas {
        let Some(p) = d.prompt(ctx)? else { continue };
        let n = p.dim(0)?;
        if let Some(deep) = d.deep_prompt(layer, ctx)? {
            let (b, t, h) = x.dims3()?;
            let deep = deep
                .unsqueeze(0)?
                .broadcast_as((b, n, h))?
                .to_dtype(x.dtype())?;
            x = Tensor::cat(
                &[
                    &x.narrow(1, 0, at)?,
                    &deep,
                    &x.narrow(1, at + n, t - at - n)?,
                ],
                1,
            )?;
        }
        at += n;
    }
    Ok(x)
}

/// The number of prefix positions the deltas add to layer `layer`'s keys.
pub fn prefix_len(deltas: &[Arc<dyn SiteDelta>], layer: usize, ctx: &Ctx) -> Result<usize> {
    let mut n = 0;
    for d in deltas {
        if let Some((pk, _)) = d.prefix(layer, ctx)? {
            n += pk.dim(0)?;
        }
    }
    Ok(n)
}
