//! Deltas that act at a model's non-linear sites: the input embeddings (prompt tuning), the keys
//! and values of attention (prefix tuning), the outputs of the attention and feed-forward
//! sub-layers (bottleneck adapters) and the feed-forward activation (scaling vectors).
//!
//! A model calls every attached [`SiteDelta`] at each of these places; each method overrides
//! only the sites it uses, the others are identities. Linear layers have their own mechanism,
//! [`crate::LinearDelta`].

use std::fmt::Debug;

use candle_core::{Result, Tensor};

use crate::sites::Ctx;

/// The two sub-layers of a transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sublayer {
    /// Self-attention, ending with its output projection.
    Attention,
    /// The feed-forward block, ending with its down projection.
    FeedForward,
}

/// A delta acting at the non-linear sites of a model.
pub trait SiteDelta: Debug + Send + Sync {
    /// Vectors inserted into the input embeddings: `[P, hidden]`, shared by the batch.
    /// The model inserts them after the first token (so CLS pooling still reads CLS) and
    /// extends the attention mask.
    fn prompt(&self, _ctx: &Ctx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the prompt goes before the first token instead (PEFT's placement for encoders:
    /// CLS pooling then reads the first prompt vector). When any delta asks for it, every
    /// prompt of the model goes there.
    fn prompt_at_start(&self) -> bool {
        false
    }

    /// Deep prompts (VPT-deep): the vectors that replace this delta's prompt vectors at the
    /// input of layer `layer` (1 and up; layer 0 reads [`SiteDelta::prompt`]'s), `[P, hidden]`
    /// with the same P. The outputs of the previous layer at those positions are discarded.
    fn deep_prompt(&self, _layer: usize, _ctx: &Ctx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Extra keys and values for attention layer `layer`: each `[P, hidden]`, shared by the
    /// batch; every query attends to them.
    fn prefix(&self, _layer: usize, _ctx: &Ctx) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// The output of sub-layer `kind` of layer `layer` before its residual connection;
    /// `input` is what the sub-layer read. Returns the (possibly changed) output.
    ///
    /// # Shapes
    /// `input`, `output`: [B, T, hidden] -> [B, T, hidden]
    fn sublayer(
        &self,
        _layer: usize,
        _kind: Sublayer,
        _input: &Tensor,
        output: Tensor,
        _ctx: &Ctx,
    ) -> Result<Tensor> {
        Ok(output)
    }

    /// The feed-forward activation of layer `layer` (the input of the down projection).
    ///
    /// # Shapes
    /// `a`: [B, T, intermediate] -> [B, T, intermediate]
    fn activation(&self, _layer: usize, a: Tensor, _ctx: &Ctx) -> Result<Tensor> {
        Ok(a)
    }
}
