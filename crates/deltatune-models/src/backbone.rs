//! What every model family offers beside its named sites: a forward pass over a batch with the
//! attached deltas applied, its base tensors under checkpoint keys, its device and dtype; and
//! the task heads on top (sequence classification, causal LM). Trainers, evaluation and export
//! are written against these traits, so a new family plugs into all of them.

use candle_core::{DType, Device, Tensor};
use deltatune_core::{Ctx, HasSites, Result};

/// A model family's body: sites for deltas ([`HasSites`]) and a forward pass.
pub trait Backbone: HasSites {
    /// What one forward pass reads: padded token ids and a mask for text, pixels for images.
    type Batch;

    /// The device the weights live on; every tensor the model makes goes there.
    fn device(&self) -> &Device;

    /// The dtype of the activations.
    fn dtype(&self) -> DType {
        DType::F32
    }

    /// The last hidden states, every attached delta applied (inserted prompt vectors included:
    /// `T'` counts them).
    ///
    /// # Shapes
    /// a batch of B examples -> [B, T', hidden]
    fn hidden_states(&self, batch: &Self::Batch, ctx: &Ctx) -> Result<Tensor>;

    /// Every frozen base tensor under its checkpoint key, as f32 (quantized blocks
    /// dequantized; merged deltas included): what a `model.safetensors` of this model holds.
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>>;
}

/// A backbone that reads token ids.
pub trait TextBackbone: Backbone {
    /// The batch of `seqs`, padded to the longest (on the right) with the model's padding id.
    fn token_batch(&self, seqs: &[Vec<u32>]) -> Result<Self::Batch>;
}

/// A backbone with a classification head.
pub trait SequenceClassifier: Backbone {
    /// The number of classes.
    fn num_labels(&self) -> usize;

    /// Class logits.
    ///
    /// # Shapes
    /// a batch of B examples -> [B, num_labels]
    fn classify(&self, batch: &Self::Batch, ctx: &Ctx) -> Result<Tensor>;
}

/// A backbone with a next-token head.
pub trait CausalLm: TextBackbone {
    /// The vocabulary size.
    fn vocab_size(&self) -> usize;

    /// Next-token logits of hidden states.
    ///
    /// # Shapes
    /// `hidden`: [..., hidden] -> [..., vocab]
    fn lm_logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor>;
}
