//! The Vision Transformer with an image-classification head, as Hugging Face's
//! `Dinov2ForImageClassification` and `ViTForImageClassification`: patch embedding, CLS token,
//! position embeddings interpolated bicubically to the input's grid, pre-norm blocks (with layer
//! scale where the checkpoint has it), a final norm, and the head. Module paths are the
//! checkpoint's (`dinov2.encoder.layer.3.attention.attention.query`), so LoRA, IA3, adapters,
//! prefixes and prompts attach by PEFT's names.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{ops, Ctx, Error, HasSites, Linear, Result, Rng, SiteInfo, SiteKind, Weights};

use super::config::{VitConfig, VitConfigFile, VitFamily};
use crate::backbone::{Backbone, SequenceClassifier};
use crate::layers::{self, KeyMap, LayerNorm as Norm};

#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    /// Layer scale of the attention branch (DINOv2's `layer_scale1.lambda1`).
    scale1: Option<Tensor>,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    scale2: Option<Tensor>,
}

/// A ViT (DINOv2 or ViT) with a classification head, deltas attachable at its sites.
#[derive(Debug, Clone)]
pub struct VitClassifier {
    pub config: VitConfig,
    pub num_labels: usize,
    /// The patch embedding (a stride-`patch` convolution in the checkpoint), as a linear map of
    /// flattened patches: weight `[hidden, channels * patch * patch]`.
    patch: Linear,
    /// `[hidden]`.
    cls_token: Tensor,
    /// DINOv2's unused mask token, kept so a saved model is complete.
    mask_token: Option<Tensor>,
    /// `[1 + G * G, hidden]`, the CLS position first, G the trained grid side.
    position: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    /// The head, path `classifier`; it reads `[CLS, mean of patch tokens]` (DINOv2) or CLS.
    pub classifier: Linear,
    pub site_deltas: Vec<Arc<dyn SiteDelta>>,
    device: Device,
}

/// PyTorch's bicubic interpolation (`align_corners=False`, A = -0.75, borders clamped) from
/// `n_in` to `n_out` samples, as a matrix `[n_out, n_in]`: resizing along an axis is a product.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let src = scale * (i as f64 + 0.5) - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (x0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[i * n_in + idx] += *wk as f32;
        }
    }
    m
}

impl VitClassifier {
    /// Loads `config.json` and `model.safetensors` from `dir`. The head is read from the
    /// checkpoint when it has one of the right size, else initialised normal(0, 0.02) with zero
    /// bias from `rng`.
    pub fn load(dir: &Path, num_labels: usize, rng: &mut Rng) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config = VitConfigFile::read(&cfg_path)?.into_config(&cfg_path)?;
        let weights = Weights::load(&dir.join("model.safetensors"), DType::F32)?;
        Self::from_weights(config, &weights, num_labels, rng)
    }

    /// Builds the model from a parsed config and weights.
    pub fn from_weights(
        config: VitConfig,
        weights: &Weights,
        num_labels: usize,
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
        let (c, p) = (config.num_channels, config.patch_size);
        let g = config.trained_grid();
        let e = |name: &str| format!("{prefix}.embeddings.{name}");
        let hint_h = "hidden_size in config.json";
        let patch_path = e("patch_embeddings.projection");
        let pw = km.get(
            &format!("{patch_path}.weight"),
            &[h, c, p, p],
            "hidden_size, num_channels and patch_size in config.json",
        )?;
        let pb = km.get(&format!("{patch_path}.bias"), &[h], hint_h)?;
        let patch = Linear::new(patch_path, pw.reshape((h, c * p * p))?, Some(pb));
        let cls_token = km.get(&e("cls_token"), &[1, 1, h], hint_h)?.reshape(h)?;
        let mask_key = km.key(&e("mask_token"));
        let mask_token = weights.get_opt(&mask_key, &[1, h], hint_h)?;
        let position = km
            .get(
                &e("position_embeddings"),
                &[1, 1 + g * g, h],
                "image_size / patch_size (the trained grid) and hidden_size in config.json",
            )?
            .reshape((1 + g * g, h))?;
        let i = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for n in 0..config.num_layers {
            let l = format!("{prefix}.encoder.layer.{n}");
            let att = format!("{l}.attention.attention");
            let qkv =
                |name: &str| km.linear(&format!("{att}.{name}"), h, h, config.qkv_bias, hint_h);
            let (norm1, norm2, fc1, fc2, scale1, scale2) = match config.family {
                VitFamily::Dinov2 => (
                    km.norm(&format!("{l}.norm1"), h, eps)?,
                    km.norm(&format!("{l}.norm2"), h, eps)?,
                    km.linear(&format!("{l}.mlp.fc1"), i, h, true, hint_h)?,
                    km.linear(&format!("{l}.mlp.fc2"), h, i, true, hint_h)?,
                    Some(km.get(&format!("{l}.layer_scale1.lambda1"), &[h], hint_h)?),
                    Some(km.get(&format!("{l}.layer_scale2.lambda1"), &[h], hint_h)?),
                ),
                VitFamily::Vit => (
                    km.norm(&format!("{l}.layernorm_before"), h, eps)?,
                    km.norm(&format!("{l}.layernorm_after"), h, eps)?,
                    km.linear(&format!("{l}.intermediate.dense"), i, h, true, hint_h)?,
                    km.linear(&format!("{l}.output.dense"), h, i, true, hint_h)?,
                    None,
                    None,
                ),
            };
            blocks.push(Block {
                norm1,
                query: qkv("query")?,
                key: qkv("key")?,
                value: qkv("value")?,
                attn_out: km.linear(&format!("{l}.attention.output.dense"), h, h, true, hint_h)?,
                scale1,
                norm2,
                fc1,
                fc2,
                scale2,
            });
        }
        let norm = km.norm(&format!("{prefix}.layernorm"), h, eps)?;
        let head_in = match config.family {
            VitFamily::Dinov2 => 2 * h,
            VitFamily::Vit => h,
        };
        let device = pw.device().clone();
        // A head of another size (another label set) is replaced by a fresh one.
        let head_w = weights
            .get_opt("classifier.weight", &[num_labels, head_in], "")
            .ok()
            .flatten();
        let classifier = match head_w {
            Some(w) => {
                let b = weights.get_opt("classifier.bias", &[num_labels], "")?;
                Linear::new("classifier", w, b)
            }
            None => {
                let w = rng
                    .normal_tensor((num_labels, head_in), 0.02)?
                    .to_device(&device)?;
                let b = Tensor::zeros(num_labels, DType::F32, &device)?;
                Linear::new("classifier", w, Some(b))
            }
        };
        Ok(Self {
            config,
            num_labels,
            patch,
            cls_token,
            mask_token,
            position,
            blocks,
            norm,
            classifier,
            site_deltas: Vec::new(),
            device,
        })
    }

    fn prefix(&self) -> &'static str {
        self.config.family.prefix()
    }

    /// The position embeddings for a `gh` x `gw` grid: the trained ones, or their bicubic
    /// interpolation (as transformers does: in the graph, so they can train).
    ///
    /// # Shapes
    /// -> [1 + gh * gw, hidden]
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.config.trained_grid();
        if gh == g && gw == g {
            return Ok(self.position.clone());
        }
        let h = self.config.hidden_size;
        let cls = self.position.narrow(0, 0, 1)?;
        let grid = self.position.narrow(0, 1, g * g)?; // [(a, b), h]
        let mh = Tensor::from_vec(bicubic_matrix(g, gh), (gh, g), &self.device)?;
        let mw = Tensor::from_vec(bicubic_matrix(g, gw), (gw, g), &self.device)?;
        // Rows: [gh, g * h] = Mh [gh, g] x P [g, g * h].
        let rows = mh.matmul(&grid.reshape((g, g * h))?)?; // [gh, (b, h)]
                                                           // Columns: for each output row, [gw, g] x [g, h].
        let rows = rows.reshape((gh, g, h))?;
        let out = mw
            .unsqueeze(0)?
            .broadcast_as((gh, gw, g))?
            .contiguous()?
            .matmul(&rows.contiguous()?)?; // [gh, gw, h]
        Ok(Tensor::cat(&[&cls, &out.reshape((gh * gw, h))?], 0)?)
    }

    /// The last hidden states (after the final norm) and the number of prompt vectors inserted
    /// after CLS.
    ///
    /// # Shapes
    /// `pixels`: [B, C, H, W] -> [B, 1 + P + (H / patch) * (W / patch), hidden]
    pub fn encode(&self, pixels: &Tensor, ctx: &Ctx) -> Result<(Tensor, usize)> {
        let cfg = &self.config;
        let (b, c, hh, ww) = pixels.dims4()?;
        if c != cfg.num_channels {
            return Err(Error::Msg(format!(
                "the images have {c} channel(s), the model reads {}: {}",
                cfg.num_channels,
                if c == 1 {
                    "repeat the grey channel to RGB (the image pipeline does with channels = 3)"
                } else {
                    "convert the images to greyscale for this model"
                }
            )));
        }
        let p = cfg.patch_size;
        let (gh, gw) = (hh / p, ww / p);
        if gh == 0 || gw == 0 {
            return Err(Error::Msg(format!(
                "images of {hh} x {ww} pixels are smaller than one {p} x {p} patch"
            )));
        }
        let h = cfg.hidden_size;
        // Flattened patches in the convolution's (channel, row, column) order.
        let patches = pixels
            .narrow(2, 0, gh * p)?
            .narrow(3, 0, gw * p)?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let emb = self.patch.forward(&patches, ctx)?;
        let cls = self.cls_token.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls.to_dtype(emb.dtype())?, &emb], 1)?;
        let x = x.broadcast_add(&self.positions(gh, gw)?.unsqueeze(0)?)?;
        // Prompt vectors go right after CLS (visual prompt tuning).
        let mut parts = vec![x.narrow(1, 0, 1)?];
        let mut n_prompt = 0;
        for pr in layers::prompts(&self.site_deltas, ctx)? {
            let n = pr.dim(0)?;
            n_prompt += n;
            parts.push(
                pr.unsqueeze(0)?
                    .broadcast_as((b, n, h))?
                    .to_dtype(x.dtype())?,
            );
        }
        parts.push(x.narrow(1, 1, gh * gw)?);
        let mut x = if n_prompt == 0 {
            x
        } else {
            Tensor::cat(&parts, 1)?
        };
        x = ctx.dropout(&x, cfg.hidden_dropout)?;
        let t = x.dim(1)?;
        let key_bias = Tensor::zeros((b, t), DType::F32, &self.device)?;
        let nh = cfg.num_heads;
        let dh = h / nh;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = ctx.cut(x);
            if i > 0 {
                x = layers::deep_prompts(&self.site_deltas, i, x, 1, ctx)?;
            }
            let y = blk.norm1.forward(&x)?;
            let q = blk.query.forward(&y, ctx)?;
            let k = blk.key.forward(&y, ctx)?;
            let v = blk.value.forward(&y, ctx)?;
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
            let mut o = ctx.dropout(&blk.attn_out.forward(&attn, ctx)?, cfg.hidden_dropout)?;
            if let Some(s) = &blk.scale1 {
                o = o.broadcast_mul(s)?;
            }
            let o = layers::sublayer(&self.site_deltas, i, Sublayer::Attention, &y, o, ctx)?;
            x = (x + o)?;
            let y = blk.norm2.forward(&x)?;
            let a = ops::gelu_erf(&blk.fc1.forward(&y, ctx)?)?;
            let a = layers::activation(&self.site_deltas, i, a, ctx)?;
            let mut o = ctx.dropout(&blk.fc2.forward(&a, ctx)?, cfg.hidden_dropout)?;
            if let Some(s) = &blk.scale2 {
                o = o.broadcast_mul(s)?;
            }
            let o = layers::sublayer(&self.site_deltas, i, Sublayer::FeedForward, &y, o, ctx)?;
            x = (x + o)?;
        }
        Ok((self.norm.forward(&x)?, n_prompt))
    }

    /// What the head reads: `[CLS, mean of the patch tokens]` (DINOv2) or CLS (ViT); prompt
    /// vectors are not patch tokens.
    ///
    /// # Shapes
    /// `hidden`: [B, T, hidden] -> [B, 2 * hidden] or [B, hidden]
    pub fn pool(&self, hidden: &Tensor, n_prompt: usize) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(match self.config.family {
            VitFamily::Dinov2 => {
                let t = hidden.dim(1)?;
                let patches = hidden.narrow(1, 1 + n_prompt, t - 1 - n_prompt)?;
                Tensor::cat(&[&cls, &patches.mean(1)?], D::Minus1)?
            }
            VitFamily::Vit => cls,
        })
    }

    /// Class logits.
    ///
    /// # Shapes
    /// `pixels`: [B, C, H, W] -> [B, num_labels]
    pub fn forward(&self, pixels: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (hidden, n_prompt) = self.encode(pixels, ctx)?;
        let pooled = self.pool(&hidden, n_prompt)?;
        Ok(self.classifier.forward(&pooled, ctx)?)
    }
}

impl Backbone for VitClassifier {
    type Batch = Tensor;

    fn device(&self) -> &Device {
        &self.device
    }

    fn hidden_states(&self, pixels: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(self.encode(pixels, ctx)?.0)
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cfg = &self.config;
        let prefix = self.prefix();
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let e = |name: &str| format!("{prefix}.embeddings.{name}");
        let g = cfg.trained_grid();
        let mut v = vec![
            (e("cls_token"), self.cls_token.reshape((1, 1, h))?),
            (
                e("position_embeddings"),
                self.position.reshape((1, 1 + g * g, h))?,
            ),
            (
                format!("{}.weight", self.patch.path),
                self.patch.weight.reshape((h, c, p, p))?,
            ),
        ];
        if let Some(b) = &self.patch.bias {
            v.push((format!("{}.bias", self.patch.path), b.clone()));
        }
        if let Some(m) = &self.mask_token {
            v.push((e("mask_token"), m.clone()));
        }
        let (n1, n2) = match cfg.family {
            VitFamily::Dinov2 => ("norm1", "norm2"),
            VitFamily::Vit => ("layernorm_before", "layernorm_after"),
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            let l = format!("{prefix}.encoder.layer.{i}");
            for (name, n) in [(n1, &blk.norm1), (n2, &blk.norm2)] {
                v.push((format!("{l}.{name}.weight"), n.weight.clone()));
                v.push((format!("{l}.{name}.bias"), n.bias.clone()));
            }
            if let Some(s) = &blk.scale1 {
                v.push((format!("{l}.layer_scale1.lambda1"), s.clone()));
            }
            if let Some(s) = &blk.scale2 {
                v.push((format!("{l}.layer_scale2.lambda1"), s.clone()));
            }
        }
        v.push((
            format!("{prefix}.layernorm.weight"),
            self.norm.weight.clone(),
        ));
        v.push((format!("{prefix}.layernorm.bias"), self.norm.bias.clone()));
        for lin in self.linears() {
            v.push((format!("{}.weight", lin.path), lin.weight.clone()));
            if let Some(b) = &lin.bias {
                v.push((format!("{}.bias", lin.path), b.clone()));
            }
        }
        Ok(v)
    }
}

impl SequenceClassifier for VitClassifier {
    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn classify(&self, pixels: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward(pixels, ctx)
    }
}

impl HasSites for VitClassifier {
    fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for b in &self.blocks {
            v.extend([&b.query, &b.key, &b.value, &b.attn_out, &b.fc1, &b.fc2]);
        }
        v.push(&self.classifier);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in &mut self.blocks {
            v.extend([
                &mut b.query,
                &mut b.key,
                &mut b.value,
                &mut b.attn_out,
                &mut b.fc1,
                &mut b.fc2,
            ]);
        }
        v.push(&mut self.classifier);
        v
    }

    fn sites(&self) -> Vec<SiteInfo> {
        let prefix = self.prefix();
        let h = self.config.hidden_size;
        let lin = |x: &Linear| SiteInfo {
            path: x.path.clone(),
            kind: SiteKind::Linear,
            params: x.param_count(),
        };
        let mut out = vec![SiteInfo {
            path: format!("{prefix}.embeddings"),
            kind: SiteKind::Embeddings,
            params: self.patch.param_count() + self.position.elem_count() + h,
        }];
        for (i, b) in self.blocks.iter().enumerate() {
            let l = self.layer_path(i);
            out.push(SiteInfo {
                path: format!("{l}.attention.attention"),
                kind: SiteKind::KeyValue,
                params: 0,
            });
            out.extend([lin(&b.query), lin(&b.key), lin(&b.value), lin(&b.attn_out)]);
            out.push(SiteInfo {
                path: self.sublayer_path(i, Sublayer::Attention),
                kind: SiteKind::SublayerOutput,
                params: 0,
            });
            out.push(lin(&b.fc1));
            out.push(SiteInfo {
                path: format!(
                    "{}.activation",
                    self.sublayer_path(i, Sublayer::FeedForward)
                ),
                kind: SiteKind::Activation,
                params: 0,
            });
            out.push(lin(&b.fc2));
            out.push(SiteInfo {
                path: self.sublayer_path(i, Sublayer::FeedForward),
                kind: SiteKind::SublayerOutput,
                params: 0,
            });
        }
        out.push(lin(&self.classifier));
        out
    }

    fn param_count(&self) -> usize {
        self.named_tensors()
            .map(|v| v.iter().map(|(_, t)| t.elem_count()).sum())
            .unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer_path(&self, i: usize) -> String {
        format!("{}.encoder.layer.{i}", self.prefix())
    }

    fn sublayer_path(&self, i: usize, kind: Sublayer) -> String {
        match (kind, self.config.family) {
            (Sublayer::Attention, _) => format!("{}.attention", self.layer_path(i)),
            (Sublayer::FeedForward, VitFamily::Dinov2) => format!("{}.mlp", self.layer_path(i)),
            (Sublayer::FeedForward, VitFamily::Vit) => format!("{}.output", self.layer_path(i)),
        }
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// A ViT has no vocabulary: the position embeddings stand in (prompt initialisation reads
    /// the scale of the model's input vectors from them).
    fn word_embeddings(&self) -> Tensor {
        self.position.clone()
    }

    fn norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let prefix = self.config.family.prefix();
        let (n1, n2) = match self.config.family {
            VitFamily::Dinov2 => ("norm1", "norm2"),
            VitFamily::Vit => ("layernorm_before", "layernorm_after"),
        };
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let l = format!("{prefix}.encoder.layer.{i}");
            v.push((format!("{l}.{n1}.bias"), &mut b.norm1.bias));
            v.push((format!("{l}.{n2}.bias"), &mut b.norm2.bias));
        }
        v.push((format!("{prefix}.layernorm.bias"), &mut self.norm.bias));
        v
    }

    fn dense_parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let prefix = self.config.family.prefix();
        let (n1, n2) = match self.config.family {
            VitFamily::Dinov2 => ("norm1", "norm2"),
            VitFamily::Vit => ("layernorm_before", "layernorm_after"),
        };
        let e = |name: &str| format!("{prefix}.embeddings.{name}");
        let patch = self.patch.path.clone();
        let mut v = vec![
            (e("cls_token"), &mut self.cls_token),
            (e("position_embeddings"), &mut self.position),
            (format!("{patch}.weight"), &mut self.patch.weight),
        ];
        if let Some(b) = self.patch.bias.as_mut() {
            v.push((format!("{patch}.bias"), b));
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let l = format!("{prefix}.encoder.layer.{i}");
            v.push((format!("{l}.{n1}.weight"), &mut b.norm1.weight));
            v.push((format!("{l}.{n1}.bias"), &mut b.norm1.bias));
            v.push((format!("{l}.{n2}.weight"), &mut b.norm2.weight));
            v.push((format!("{l}.{n2}.bias"), &mut b.norm2.bias));
            if let Some(s) = b.scale1.as_mut() {
                v.push((format!("{l}.layer_scale1.lambda1"), s));
            }
            if let Some(s) = b.scale2.as_mut() {
                v.push((format!("{l}.layer_scale2.lambda1"), s));
            }
        }
        v.push((format!("{prefix}.layernorm.weight"), &mut self.norm.weight));
        v.push((format!("{prefix}.layernorm.bias"), &mut self.norm.bias));
        v
    }

    fn attach_site_delta(&mut self, delta: Arc<dyn SiteDelta>) {
        self.site_deltas.push(delta);
    }

    fn site_deltas_mut(&mut self) -> &mut Vec<Arc<dyn SiteDelta>> {
        &mut self.site_deltas
    }
}
