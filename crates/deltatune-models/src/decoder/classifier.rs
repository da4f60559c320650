//! Sequence classification on a decoder, as transformers' `LlamaForSequenceClassification`
//! (and the Qwen, Gemma, Mistral and Phi-3 ones): the decoder's last hidden state at each
//! row's last real token through a linear head `score` (no bias). PEFT saves that head under
//! `modules_to_save: ["score"]`, so SEQ_CLS adapters trained on a decoder load as they are.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{Ctx, Error, HasSites, Linear, Result, Rng, SiteInfo};

use super::model::{Decoder, TokenRows};
use crate::backbone::{Backbone, SequenceClassifier, TextBackbone};

/// A decoder with a classification head on its last real token.
#[derive(Debug, Clone)]
pub struct DecoderClassifier {
    pub decoder: Decoder,
    pub num_labels: usize,
    /// The head, path `score`: `[num_labels, hidden]`, no bias.
    pub score: Linear,
}

impl DecoderClassifier {
    /// Loads the decoder at `path` (folder or GGUF) with a head initialised normal(0, 0.02)
    /// from `rng` (transformers' `initializer_range` for these families).
    pub fn load(path: &Path, num_labels: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(Decoder::load(path)?, num_labels, rng)
    }

    /// `decoder` with a fresh head.
    pub fn new(decoder: Decoder, num_labels: usize, rng: &mut Rng) -> Result<Self> {
        if num_labels < 2 {
            return Err(Error::Msg(format!(
                "a classifier needs at least 2 labels, got {num_labels}"
            )));
        }
        let h = decoder.config.hidden_size;
        let w = rng
            .normal_tensor((num_labels, h), 0.02)?
            .to_device(Backbone::device(&decoder))?;
        Ok(Self {
            decoder,
            num_labels,
            score: Linear::new("score", w, None),
        })
    }

    /// Class logits of `batch`.
    ///
    /// # Shapes
    /// `batch`: B rows of T -> [B, num_labels]
    pub fn forward(&self, batch: &TokenRows, ctx: &Ctx) -> Result<Tensor> {
        let hidden = self
            .decoder
            .forward_hidden(&batch.ids, &batch.mask, None, ctx)?;
        // Prompt vectors come first: the tokens are the last T positions.
        let (b, total, _) = hidden.dims3()?;
        let t = batch.ids.first().map_or(0, |r| r.len());
        let offset = total - t;
        let mut rows = Vec::with_capacity(b);
        for (r, m) in batch.mask.iter().enumerate() {
            let Some(last) = m.iter().rposition(|&x| x == 1) else {
                return Err(Error::Msg(format!("classify: row {r} has no real token")));
            };
            rows.push(hidden.get(r)?.get(offset + last)?);
        }
        let pooled = Tensor::stack(&rows, 0)?;
        Ok(self.score.forward(&pooled, ctx)?)
    }
}

impl Backbone for DecoderClassifier {
    type Batch = TokenRows;

    fn device(&self) -> &Device {
        Backbone::device(&self.decoder)
    }

    fn hidden_states(&self, batch: &TokenRows, ctx: &Ctx) -> Result<Tensor> {
        self.decoder
            .forward_hidden(&batch.ids, &batch.mask, None, ctx)
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self
            .decoder
            .named_tensors()?
            .into_iter()
            .filter(|(k, _)| k != "lm_head.weight")
            .collect();
        v.push(("score.weight".into(), self.score.dense_weight()?));
        Ok(v)
    }
}

impl TextBackbone for DecoderClassifier {
    fn token_batch(&self, seqs: &[Vec<u32>]) -> Result<TokenRows> {
        self.decoder.token_batch(seqs)
    }
}

impl SequenceClassifier for DecoderClassifier {
    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn classify(&self, batch: &TokenRows, ctx: &Ctx) -> Result<Tensor> {
        self.forward(batch, ctx)
    }
}

impl HasSites for DecoderClassifier {
    fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self
            .decoder
            .linears()
            .into_iter()
            .filter(|l| l.path != "lm_head")
            .collect();
        v.push(&self.score);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self
            .decoder
            .linears_mut()
            .into_iter()
            .filter(|l| l.path != "lm_head")
            .collect();
        v.push(&mut self.score);
        v
    }

    fn sites(&self) -> Vec<SiteInfo> {
        let mut v: Vec<SiteInfo> = self
            .decoder
            .sites()
            .into_iter()
            .filter(|s| s.path != "lm_head")
            .collect();
        v.push(SiteInfo {
            path: "score".into(),
            kind: deltatune_core::SiteKind::Linear,
            params: self.score.param_count(),
        });
        v
    }

    fn param_count(&self) -> usize {
        let head = if self.decoder.config.tie_word_embeddings {
            0
        } else {
            self.decoder.lm_head.param_count()
        };
        self.decoder.param_count() - head + self.score.param_count()
    }

    fn num_layers(&self) -> usize {
        self.decoder.num_layers()
    }

    fn layer_path(&self, i: usize) -> String {
        self.decoder.layer_path(i)
    }

    fn sublayer_path(&self, i: usize, kind: Sublayer) -> String {
        self.decoder.sublayer_path(i, kind)
    }

    fn hidden_size(&self) -> usize {
        self.decoder.hidden_size()
    }

    fn kv_width(&self) -> usize {
        self.decoder.kv_width()
    }

    fn word_embeddings(&self) -> Tensor {
        self.decoder.word_embeddings()
    }

    fn norm_biases_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.decoder.norm_biases_mut()
    }

    fn attach_site_delta(&mut self, delta: Arc<dyn SiteDelta>) {
        self.decoder.attach_site_delta(delta)
    }

    fn site_deltas_mut(&mut self) -> &mut Vec<Arc<dyn SiteDelta>> {
        self.decoder.site_deltas_mut()
    }
}
