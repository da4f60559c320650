//! UniPELT-style gates (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient
//! Language Model Tuning"): each gated method's contribution is multiplied by a learned gate in
//! (0, 1), one gate per method per layer.
//!
//! - A linear delta (LoRA) and a sub-layer delta (bottleneck adapter) get an input-dependent gate
//!   `sigmoid(x w + b)` per token, `x` the input of the linear layer or of the sub-layer, as in
//!   UniPELT; `w` [1, hidden] starts Kaiming-uniform, `b` at 0.
//! - A prefix gets one learned scalar per layer, `sigmoid(s)`, multiplying the prefix values (so
//!   what the prefix contributes to each attention output). UniPELT's prefix gate is per token;
//!   ours is not, because the prefix enters attention before the token dimension exists.
//!
//! Gates are not mergeable: a gated linear delta reports that it cannot be folded.

use candle_core::{Tensor, Var};
use deltatune_core::hooks::{SiteDelta, Sublayer};
use deltatune_core::{Ctx, LinearDelta};
use std::sync::Arc;

/// `1 / (1 + exp(-x))` from ops that all have a backward.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// A token-wise gate `sigmoid(x w^T + b)`.
#[derive(Debug, Clone)]
pub struct TokenGate {
    /// [1, hidden]
    pub w: Var,
    /// [1]
    pub b: Var,
}

impl TokenGate {
    /// # Shapes
    /// `x`: [..., hidden] -> [..., 1]
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let h = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / h, h))?;
        let z = x2
            .matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?;
        let mut out = dims;
        *out.last_mut().unwrap() = 1;
        sigmoid(&z)?.reshape(out)
    }
}

/// A linear delta whose contribution is gated: `base + g(x) * (inner(x, base) - base)`.
#[derive(Debug)]
pub struct GatedLinear {
    pub inner: Arc<dyn LinearDelta>,
    pub gate: TokenGate,
}

impl LinearDelta for GatedLinear {
    fn input(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        self.inner.input(x, ctx)
    }

    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let full = self.inner.forward(x, base.clone(), ctx)?;
        let delta = (full - &base)?;
        base + delta.broadcast_mul(&self.gate.forward(x)?)?
    }

    fn merge_into(
        &self,
        _w: &Tensor,
        _b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        // The gate depends on the input: no fixed weight reproduces it.
        Ok(None)
    }
}

/// A site delta with its sub-layer outputs and prefix values gated per layer.
#[derive(Debug)]
pub struct GatedSite {
    pub inner: Arc<dyn SiteDelta>,
    /// Token gates of the sub-layer deltas, per layer (None: that layer is not gated).
    pub sublayer_gates: Vec<Option<TokenGate>>,
    /// Scalar logits [1] of the prefix gates, per layer.
    pub prefix_gates: Vec<Option<Var>>,
}

impl SiteDelta for GatedSite {
    fn prompt(&self, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        self.inner.prompt(ctx)
    }

    fn prefix(&self, layer: usize, ctx: &Ctx) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Some((k, v)) = self.inner.prefix(layer, ctx)? else {
            return Ok(None);
        };
        match self.prefix_gates.get(layer).and_then(|g| g.as_ref()) {
            Some(s) => {
                let g = sigmoid(s.as_tensor())?;
                Ok(Some((k, v.broadcast_mul(&g)?)))
            }
            None => Ok(Some((k, v))),
        }
    }

    fn sublayer(
        &self,
        layer: usize,
        kind: Sublayer,
        input: &Tensor,
        output: Tensor,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let Some(gate) = self.sublayer_gates.get(layer).and_then(|g| g.as_ref()) else {
            return self.inner.sublayer(layer, kind, input, output, ctx);
        };
        let full = self
            .inner
            .sublayer(layer, kind, input, output.clone(), ctx)?;
        let delta = (full - &output)?;
        output + delta.broadcast_mul(&gate.forward(input)?)?
    }

    fn activation(&self, layer: usize, a: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        self.inner.activation(layer, a, ctx)
    }
}
