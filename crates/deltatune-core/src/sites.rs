//! Named sites: the places of a model where a delta can attach.
//!
//! A model exposes its linear layers as [`Linear`] values whose `path` is the Hugging Face
//! checkpoint path of the module (`bert.encoder.layer.3.attention.self.query`). A delta method
//! selects sites with a [`TargetModules`] pattern (PEFT's semantics) and attaches a
//! [`LinearDelta`] or makes a parameter trainable. Models do not know methods; methods do not know
//! model families.
//!
//! Further site kinds (attention key/value for prefixes, input embeddings for prompts, sub-layer
//! outputs for adapters, activations for scaling) are listed by [`SiteKind`] so that `inspect` can
//! show them; the methods that use them attach through the same path names.

use std::cell::RefCell;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{nearest_names, Error, Result};
use crate::ops;
use crate::quant::QuantMatrix;
use crate::rng::Rng;

/// PEFT's `target_modules`: a list of module-name suffixes, or one string that must match a whole
/// module path as a regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its path equals an entry or ends with `.` + entry.
    Suffixes(Vec<String>),
    /// A module matches when the regex matches its whole path (Python's `re.fullmatch`).
    Regex(String),
}

impl TargetModules {
    /// PEFT's shorthand for every linear layer but the output layer (`lm_head`).
    pub const ALL_LINEAR: &'static str = "all-linear";

    fn is_all_linear(&self) -> bool {
        match self {
            TargetModules::Regex(r) => r == Self::ALL_LINEAR,
            TargetModules::Suffixes(l) => l.len() == 1 && l[0] == Self::ALL_LINEAR,
        }
    }

    /// Whether `path` is selected.
    pub fn matches(&self, path: &str) -> Result<bool> {
        if self.is_all_linear() {
            return Ok(path != "lm_head" && !path.ends_with(".lm_head"));
        }
        Ok(match self {
            TargetModules::Suffixes(list) => list
                .iter()
                .any(|s| path == s || path.ends_with(&format!(".{s}"))),
            TargetModules::Regex(re) => full_match_regex(re)?.is_match(path),
        })
    }

    /// The paths among `paths` that match; an error naming the nearest paths when a pattern
    /// (or, for a list, any one entry) selects nothing.
    pub fn select<'a>(&self, paths: &[&'a str]) -> Result<Vec<&'a str>> {
        match self {
            _ if self.is_all_linear() => {}
            TargetModules::Suffixes(list) => {
                for s in list {
                    let one = TargetModules::Suffixes(vec![s.clone()]);
                    if !paths.iter().any(|p| one.matches(p).unwrap_or(false)) {
                        return Err(Error::NoMatch {
                            pattern: s.clone(),
                            nearest: nearest_names(s, paths.iter().copied(), 5),
                        });
                    }
                }
            }
            TargetModules::Regex(re) => {
                let r = full_match_regex(re)?;
                if !paths.iter().any(|p| r.is_match(p)) {
                    return Err(Error::NoMatch {
                        pattern: re.clone(),
                        nearest: nearest_names(re, paths.iter().copied(), 5),
                    });
                }
            }
        }
        let mut out = Vec::new();
        for p in paths {
            if self.matches(p)? {
                out.push(*p);
            }
        }
        Ok(out)
    }
}

fn full_match_regex(re: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| Error::InvalidConfig {
        field: "target_modules".into(),
        msg: format!("`{re}` is not a valid regular expression: {e}"),
    })
}

/// The kinds of places where deltas attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// A linear layer (LoRA, IA3 on outputs, bias tuning).
    Linear,
    /// The keys and values of one attention layer (prefix tuning).
    KeyValue,
    /// The input embeddings (prompt tuning).
    Embeddings,
    /// The output of an attention or feed-forward sub-layer (bottleneck adapters).
    SublayerOutput,
    /// An activation inside the feed-forward block (IA3 scaling).
    Activation,
}

/// One site, as listed by a model.
#[derive(Debug, Clone, Serialize)]
pub struct SiteInfo {
    pub path: String,
    pub kind: SiteKind,
    /// Parameter count of the module at this site (0 where the site holds no parameters).
    pub params: usize,
}

/// Per-forward context: whether the model trains (dropout on) and the random stream dropout
/// draws from.
#[derive(Debug)]
pub struct Ctx {
    pub train: bool,
    /// No gradient will be asked for: models cut the autograd graph between layers
    /// ([`Ctx::cut`]), so a forward pass holds one layer's intermediate tensors, not all. Such
    /// passes (generation, serving, evaluation) also use kernels whose result for one batch
    /// row does not depend on the other rows (`ops::quant_linear_rows`, `ops::lora_down`,
    /// `ops::attention_rows`): a sequence gets the same numbers alone and in any batch.
    pub no_grad: bool,
    /// For a batch mixing adapters (serving): the adapter of each batch row, an index into a
    /// multi-adapter delta's adapters (`u32::MAX`: the base model alone). `None`: every row
    /// uses every attached delta.
    pub adapter_rows: Option<std::sync::Arc<[u32]>>,
    /// Whether layers holding a bf16 copy of their weight ([`Linear::use_bf16`]) may multiply
    /// by it in this pass: on for training steps, off for evaluation and prediction (so what a
    /// run reports equals what `predict` and `eval` give later) unless asked with
    /// [`Ctx::with_bf16`].
    pub bf16: bool,
    /// Whether products by a quantized weight may round the activations to 8 bits per block of
    /// 32 and multiply with integer dot products, as llama.cpp does: on for generation
    /// ([`Ctx::with_int8`]), off elsewhere, so training steps and losses use f32 activations.
    pub int8: bool,
    rng: RefCell<Rng>,
}

impl Ctx {
    /// Dropout off; the graph is kept (gradients can still be taken).
    pub fn eval() -> Self {
        Self {
            train: false,
            no_grad: false,
            adapter_rows: None,
            bf16: false,
            int8: false,
            rng: RefCell::new(Rng::new(0)),
        }
    }

    /// The same context with bf16 products allowed or not (see [`Ctx::bf16`]).
    pub fn with_bf16(mut self, on: bool) -> Self {
        self.bf16 = on;
        self
    }

    /// The same context with 8-bit activations allowed or not (see [`Ctx::int8`]).
    pub fn with_int8(mut self, on: bool) -> Self {
        self.int8 = on;
        self
    }

    /// The same context with the adapter of each batch row (see [`Ctx::adapter_rows`]).
    pub fn with_adapter_rows(mut self, rows: Vec<u32>) -> Self {
        self.adapter_rows = Some(rows.into());
        self
    }

    /// Dropout off and no gradients: for evaluation, prediction and generation.
    pub fn inference() -> Self {
        Self {
            no_grad: true,
            ..Self::eval()
        }
    }

    pub fn train(rng: Rng) -> Self {
        Self {
            train: true,
            no_grad: false,
            adapter_rows: None,
            bf16: true,
            int8: false,
            rng: RefCell::new(rng),
        }
    }

    /// `x` cut from the autograd graph when no gradient will be asked for
    /// ([`Ctx::inference`]), else `x` itself. Trainable deltas make every later tensor track
    /// its inputs; cutting at each layer lets the earlier layers' tensors go.
    pub fn cut(&self, x: Tensor) -> Tensor {
        if self.no_grad {
            x.detach()
        } else {
            x
        }
    }

    /// Inverted dropout with probability `p`, active only when training.
    pub fn dropout(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let (bits, scale) = self.dropout_bits(x.elem_count(), p);
        ops::dropout_bits_op(x, bits, scale)
    }

    /// The keep-mask of a dropout over `n` elements as bits (bit `i % 64` of word `i / 64`),
    /// and the scale `1 / (1 - p)` of kept elements: the draws [`Ctx::dropout`] makes.
    pub fn dropout_bits(&self, n: usize, p: f64) -> (Vec<u64>, f32) {
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let mut rng = self.rng.borrow_mut();
        let threshold = (keep * (1u64 << 32) as f64) as u64;
        // Two 32-bit draws per 64-bit number: word `w` reads numbers 32w..32w + 32.
        let bits = rng.threshold_bits(n, threshold);
        rng.advance(n.div_ceil(2) as u64);
        (bits, scale)
    }
}

/// A delta on a linear layer: it may rescale the layer's input (IA3 on feed-forward layers) and
/// add to or rescale its output (LoRA, IA3).
pub trait LinearDelta: Debug + Send + Sync {
    /// The input the frozen layer should see instead of `x`, if this delta changes it.
    fn input(&self, _x: &Tensor, _ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    /// `base` is the frozen layer's output `x W^T + b`; returns the output with the delta applied.
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor>;

    /// The merged weight and bias `(W', b')` given the current ones, when this delta can be
    /// folded into the layer; `None` when it cannot.
    fn merge_into(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>>;
}

/// A linear layer at a named site: frozen weight `[out, in]` (PyTorch layout), optional bias,
/// optional attached delta. When `weight` or `bias` is a [`Var`]'s tensor, it trains.
#[derive(Debug, Clone)]
pub struct Linear {
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Attached deltas, applied in order.
    pub deltas: Vec<Arc<dyn LinearDelta>>,
    /// The unmerged weight, bias and quantized weight while the deltas are folded into
    /// `weight` and `bias` (a merged layer runs on the plain merged weight).
    unmerged: Option<(Tensor, Option<Tensor>, Option<QuantMatrix>)>,
    /// The frozen weight kept block-quantized (GGUF); `weight` is then a zero-stride
    /// placeholder of the right shape holding no memory. Products dequantize block by block.
    pub quant: Option<QuantMatrix>,
    /// A bf16 copy of the frozen weight for the products ([`Linear::use_bf16`]), with the id of
    /// the weight it was made from: a weight replaced since (merged, made trainable) is never
    /// multiplied by a stale copy.
    bf16: Option<(candle_core::TensorId, Arc<ops::Bf16Weight>)>,
    /// Whether the products use `bf16` (the copy is kept while off, so switching is free).
    bf16_on: bool,
}

impl Linear {
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path: path.into(),
            weight,
            bias,
            deltas: Vec::new(),
            unmerged: None,
            quant: None,
            bf16: None,
            bf16_on: false,
        }
    }

    /// A linear layer whose frozen weight stays quantized (no bias).
    pub fn quantized(path: impl Into<String>, q: QuantMatrix) -> Result<Self> {
        let placeholder = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?
            .reshape((1, 1))?
            .broadcast_as((q.rows(), q.cols()))?;
        Ok(Self {
            path: path.into(),
            weight: placeholder,
            bias: None,
            deltas: Vec::new(),
            unmerged: None,
            quant: Some(q),
            bf16: None,
            bf16_on: false,
        })
    }

    /// The weight as a plain f32 tensor (dequantized when stored quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => q.dequantize(),
            None => Ok(self.weight.clone()),
        }
    }

    /// Bytes the frozen weight and bias occupy (quantized blocks as stored).
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.quant {
            Some(q) => q.size_in_bytes(),
            None => self.weight.elem_count() * self.weight.dtype().size_in_bytes(),
        };
        w + self
            .bias
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// `x W^T + b` through the frozen weight (quantized, bf16 when the layer has a current bf16
    /// copy and the pass allows it, or plain).
    fn base_forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        match (&self.quant, self.bf16_weight()) {
            (_, Some(w)) if ctx.bf16 && !ops::portable::active(x) => {
                ops::bf16_linear(x, w, self.bias.as_ref())
            }
            (Some(q), _) => {
                let _int8 = ctx.int8.then(ops::int8_activations);
                if ctx.no_grad {
                    // Inference batches unrelated sequences: a row's numbers must not depend
                    // on how many rows share the product.
                    ops::quant_linear_rows(x, q, self.bias.as_ref())
                } else {
                    ops::quant_linear(x, q, self.bias.as_ref())
                }
            }
            _ => ops::frozen_linear(x, &self.weight, self.bias.as_ref()),
        }
    }

    /// Multiply by the frozen weight in bf16 (`on`) or f32 in the passes that allow it
    /// ([`Ctx::bf16`]: training steps). bf16 rounds the weight and the product's other operand
    /// to bf16 and sums in f32 (see `ops::bf16`): about twice the speed where the CPU has
    /// AVX-512 BF16. Returns whether the layer now uses bf16: not on CPUs without it, nor for a
    /// trainable or non-f32 weight.
    ///
    /// A block-quantized weight is dequantized once into the bf16 copy, which takes 4 bytes per
    /// weight (Q4_1 blocks take 0.56): training steps multiply by the copy, while evaluation
    /// and generation keep multiplying by the blocks. `use_bf16(false)` keeps the copy (to switch
    /// back for free); a layer that must stay small should never be switched on.
    pub fn use_bf16(&mut self, on: bool) -> Result<bool> {
        let eligible = on
            && !self.weight.is_variable()
            && !self.weight.track_op()
            && self.weight.dtype() == candle_core::DType::F32
            && self.weight.device().is_cpu();
        self.bf16_on = eligible;
        if !eligible {
            return Ok(false);
        }
        if !matches!(&self.bf16, Some((id, _)) if *id == self.weight.id()) {
            // A quantized layer's `weight` is a placeholder whose id changes with the blocks
            // (merging and dequantizing replace both), so the id keys its copy too.
            let dense = self.dense_weight()?;
            self.bf16 = ops::Bf16Weight::pack(&dense)?.map(|w| (self.weight.id(), w));
        }
        self.bf16_on = self.bf16.is_some();
        Ok(self.bf16_on)
    }

    /// The bf16 copy of the weight when it is on and made from the current weight.
    fn bf16_weight(&self) -> Option<&Arc<ops::Bf16Weight>> {
        match &self.bf16 {
            Some((id, w)) if self.bf16_on && *id == self.weight.id() => Some(w),
            _ => None,
        }
    }

    /// Whether training passes multiply by the bf16 copy of the weight.
    pub fn uses_bf16(&self) -> bool {
        self.bf16_weight().is_some()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn param_count(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Whether the deltas are currently folded into the weights.
    pub fn is_merged(&self) -> bool {
        self.unmerged.is_some()
    }

    /// # Shapes
    /// `x`: [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        if self.is_merged() || self.deltas.is_empty() {
            return self.base_forward(x, ctx);
        }
        let mut xin = None;
        for d in &self.deltas {
            if let Some(v) = d.input(xin.as_ref().unwrap_or(x), ctx)? {
                xin = Some(v);
            }
        }
        let x = xin.as_ref().unwrap_or(x);
        let mut y = self.base_forward(x, ctx)?;
        for d in &self.deltas {
            y = d.forward(x, y, ctx)?;
        }
        Ok(y)
    }

    /// Folds the deltas into the weights; an error naming the layer when one cannot merge.
    pub fn merge(&mut self) -> Result<()> {
        if self.is_merged() || self.deltas.is_empty() {
            return Ok(());
        }
        let (mut w, mut b) = (
            self.dense_weight()?.detach(),
            self.bias.as_ref().map(|b| b.detach()),
        );
        // Input-side deltas act first, output-side ones after: fold in that order.
        for d in &self.deltas {
            let (w2, b2) = d.merge_into(&w, b.as_ref())?.ok_or_else(|| {
                Error::Msg(format!(
                    "the delta {d:?} at `{}` cannot be merged into the weight; keep it unmerged",
                    self.path
                ))
            })?;
            w = w2.detach();
            b = b2.map(|b| b.detach());
        }
        let old_w = std::mem::replace(&mut self.weight, w);
        let old_b = std::mem::replace(&mut self.bias, b);
        self.unmerged = Some((old_w, old_b, self.quant.take()));
        Ok(())
    }

    /// Restores the weights saved by [`Linear::merge`].
    pub fn unmerge(&mut self) -> Result<()> {
        if let Some((w, b, q)) = self.unmerged.take() {
            self.weight = w;
            self.bias = b;
            self.quant = q;
        }
        Ok(())
    }

    /// Replaces the bias with a trainable variable initialised from it (zeros if absent).
    pub fn make_bias_trainable(&mut self) -> Result<Var> {
        let init = match &self.bias {
            Some(b) => b.detach().copy()?,
            None => Tensor::zeros(
                self.out_features(),
                self.weight.dtype(),
                self.weight.device(),
            )?,
        };
        let v = Var::from_tensor(&init)?;
        self.bias = Some(v.as_tensor().clone());
        Ok(v)
    }

    /// Replaces the weight with a trainable variable initialised from it.
    pub fn make_weight_trainable(&mut self) -> Result<Var> {
        let v = Var::from_tensor(&self.dense_weight()?.detach().copy()?)?;
        self.quant = None;
        self.weight = v.as_tensor().clone();
        Ok(v)
    }
}

/// [`use_bf16`] where bf16 products are faster than f32 on this CPU ([`ops::bf16_pays`]), f32
/// elsewhere: what the `train.bf16` setting asks for. Returns how many layers now use bf16.
pub fn use_bf16_where_faster<M: HasSites + ?Sized>(model: &mut M, on: bool) -> Result<usize> {
    use_bf16(model, on && ops::bf16_pays())
}

/// [`Linear::use_bf16`] on every linear layer of `model`; returns how many now use bf16.
pub fn use_bf16<M: HasSites + ?Sized>(model: &mut M, on: bool) -> Result<usize> {
    let mut n = 0;
    for lin in model.linears_mut() {
        n += usize::from(lin.use_bf16(on)?);
    }
    Ok(n)
}

/// What a model offers to delta methods.
pub trait HasSites {
    /// Every linear layer, in module order.
    fn linears(&self) -> Vec<&Linear>;
    /// Every linear layer, mutable, in module order.
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Every site of every kind, for `inspect`.
    fn sites(&self) -> Vec<SiteInfo>;
    /// Total parameter count of the base model (head included).
    fn param_count(&self) -> usize;
    /// Number of transformer layers.
    fn num_layers(&self) -> usize;
    /// The module path of layer `i` (`bert.encoder.layer.3`, `model.layers.3`).
    fn layer_path(&self, i: usize) -> String;
    /// The module path of sub-layer `kind` of layer `i`, where a delta after it is named
    /// (`bert.encoder.layer.3.output`, `model.layers.3.mlp`).
    fn sublayer_path(&self, i: usize, kind: crate::hooks::Sublayer) -> String;
    /// The layer a module path belongs to, if any.
    fn layer_of(&self, path: &str) -> Option<usize> {
        (0..self.num_layers()).find(|&i| {
            let p = self.layer_path(i);
            path.strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
    }
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// Width of one layer's keys and values (prefix tuning's `token_dim`): the hidden size,
    /// or less with grouped-query attention.
    fn kv_width(&self) -> usize {
        self.hidden_size()
    }
    /// The input word-embedding matrix [vocab, hidden] as f32 (prompt initialisation reads it;
    /// a quantized table is dequantized for the call).
    fn word_embeddings(&self) -> Tensor;
    /// The bias of every normalisation layer with its path (`...LayerNorm.bias`), mutable, so
    /// that bias tuning can make them trainable.
    fn norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// Every base tensor outside the linear layers of [`HasSites::linears`] (norms, embeddings,
    /// layer scales, a patch projection), under its key, mutable: what full fine-tuning trains
    /// besides the linear layers. Empty where the model does not offer it.
    fn dense_parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Vec::new()
    }
    /// Attaches a delta acting at the non-linear sites (see [`crate::hooks::SiteDelta`]).
    fn attach_site_delta(&mut self, delta: Arc<dyn crate::hooks::SiteDelta>);
    /// The attached site deltas in order, mutable (a composition wraps them in gates).
    fn site_deltas_mut(&mut self) -> &mut Vec<Arc<dyn crate::hooks::SiteDelta>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense and a quantized layer in bf16: training passes multiply by the bf16 copy (the
    /// quantized one's made from its dequantized blocks), evaluation passes by the f32 weight or
    /// the blocks; a replaced weight is never multiplied by the copy of the old one.
    #[test]
    fn bf16_copies_serve_training_passes_only_and_never_go_stale() {
        if ops::lacks_cpu_feature(ops::has_bf16(), "AVX-512 BF16") {
            return;
        }
        let mut rng = crate::Rng::new(3);
        let w = rng.normal_tensor(&[40, 64], 1.0).unwrap();
        let x = rng.normal_tensor(&[5, 64], 1.0).unwrap();
        let q = QuantMatrix::quantize(&w, candle_core::quantized::GgmlDType::Q4_1, "w").unwrap();
        let diff = crate::ops::tests::max_abs_diff;
        let train = Ctx::train(crate::Rng::new(0));
        let eval = Ctx::eval();
        for (mut lin, dense) in [
            (Linear::new("d", w.clone(), None), w.clone()),
            (
                Linear::quantized("q", q.clone()).unwrap(),
                q.dequantize().unwrap(),
            ),
        ] {
            assert!(lin.use_bf16(true).unwrap(), "{}: bf16 refused", lin.path);
            assert!(lin.uses_bf16());
            let packed = ops::Bf16Weight::pack(&dense).unwrap().unwrap();
            let want_bf16 = ops::bf16_linear(&x, &packed, None).unwrap();
            let want_f32 = match &lin.quant {
                Some(q) => ops::quant_linear(&x, q, None).unwrap(),
                None => ops::frozen_linear(&x, &dense, None).unwrap(),
            };
            assert_eq!(diff(&lin.forward(&x, &train).unwrap(), &want_bf16), 0.0);
            assert_eq!(diff(&lin.forward(&x, &eval).unwrap(), &want_f32), 0.0);
            // bf16 differs from f32 (the check above is not vacuous).
            assert!(diff(&want_bf16, &want_f32) > 1e-4, "{}", lin.path);

            // Replace the weight (what merging and dequantizing do): the old copy is unused.
            let w2 = (&dense * 2.0).unwrap();
            lin.quant = None;
            lin.weight = w2.clone();
            assert!(!lin.uses_bf16(), "{}: stale copy in use", lin.path);
            let y = lin.forward(&x, &train).unwrap();
            assert_eq!(
                diff(&y, &ops::frozen_linear(&x, &w2, None).unwrap()),
                0.0,
                "{}",
                lin.path
            );
            assert!(lin.use_bf16(true).unwrap());
            let packed2 = ops::Bf16Weight::pack(&w2).unwrap().unwrap();
            let y = lin.forward(&x, &train).unwrap();
            assert_eq!(
                diff(&y, &ops::bf16_linear(&x, &packed2, None).unwrap()),
                0.0
            );
        }
    }

    #[test]
    fn all_linear_selects_every_linear_but_the_output_layer() {
        let paths = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
            "lm_head",
        ];
        for t in [
            TargetModules::Regex("all-linear".into()),
            TargetModules::Suffixes(vec!["all-linear".into()]),
        ] {
            assert_eq!(t.select(&paths).unwrap(), &paths[..2]);
        }
        // Anything else is still a suffix list.
        let q = TargetModules::Suffixes(vec!["q_proj".into()]);
        assert_eq!(q.select(&paths).unwrap(), &paths[..1]);
    }

    /// The keep-bits (filled word by word, in parallel for large `n`) are the draws of the plain
    /// sequential loop: two 32-bit halves per number, low half first, and the stream goes on
    /// from the same place.
    #[test]
    fn dropout_bits_are_the_sequential_draws() {
        for (n, p) in [
            (1usize, 0.1),
            (63, 0.5),
            (64, 0.2),
            (129, 0.9),
            ((1 << 16) + 77, 0.1),
            (3 * 64 * 256 + 5, 0.3),
            (1000, 0.0),
        ] {
            let ctx = Ctx::train(Rng::new(21));
            let (bits, scale) = ctx.dropout_bits(n, p);
            assert_eq!(scale, (1.0 / (1.0 - p)) as f32);
            let mut rng = Rng::new(21);
            let threshold = ((1.0 - p) * (1u64 << 32) as f64) as u64;
            let mut want = vec![0u64; n.div_ceil(64)];
            let mut i = 0;
            while i < n {
                let r = rng.next_u64();
                for half in [r & 0xffff_ffff, r >> 32] {
                    if i < n {
                        if half < threshold {
                            want[i / 64] |= 1 << (i % 64);
                        }
                        i += 1;
                    }
                }
            }
            assert_eq!(bits, want, "n = {n}");
            assert_eq!(
                ctx.rng.borrow_mut().next_u64(),
                rng.next_u64(),
                "n = {n}: the stream goes on"
            );
        }
    }

    #[test]
    fn dropout_is_seeded_scaled_and_off_in_eval() {
        let x = Tensor::ones(
            (200, 100),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let eval = Ctx::eval().dropout(&x, 0.1).unwrap();
        assert_eq!(
            eval.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            20_000.0
        );
        let a = Ctx::train(Rng::new(1))
            .dropout(&x, 0.1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = Ctx::train(Rng::new(1))
            .dropout(&x, 0.1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = Ctx::train(Rng::new(2))
            .dropout(&x, 0.1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "same seed, same mask");
        assert_ne!(a, c, "another seed, another mask");
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped fraction {dropped}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.9).abs() < 1e-6));
    }
}
