//! The (IA)^3 scaling vector attached to one linear site.

use candle_core::{Tensor, Var};
use deltatune_core::{Ctx, LinearDelta};

/// A learned rescaling of a linear layer's output (`l` [out, 1]) or, for feed-forward targets,
/// of its input (`l` [1, in]); the shapes are PEFT's, so that `l` broadcasts against the
/// weight [out, in] when merging.
#[derive(Debug)]
pub struct Ia3Linear {
    /// [out, 1] (output scaling) or [1, in] (feed-forward, input scaling).
    pub l: Var,
    /// Whether the input is scaled instead of the output.
    pub feedforward: bool,
}

impl Ia3Linear {
    /// `l` as a vector [out] or [in].
    fn vector(&self) -> candle_core::Result<Tensor> {
        self.l.as_tensor().flatten_all()
    }
}

impl LinearDelta for Ia3Linear {
    /// `x * l` for feed-forward targets.
    fn input(&self, x: &Tensor, _ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        if self.feedforward {
            Ok(Some(x.broadcast_mul(&self.vector()?)?))
        } else {
            Ok(None)
        }
    }

    /// `(x W^T + b) * l` for the other targets.
    fn forward(&self, _x: &Tensor, base: Tensor, _ctx: &Ctx) -> candle_core::Result<Tensor> {
        if self.feedforward {
            Ok(base)
        } else {
            base.broadcast_mul(&self.vector()?)
        }
    }

    /// Output scaling multiplies the rows of `W` and the bias; input scaling multiplies the
    /// columns of `W` and leaves the bias.
    fn merge_into(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        let l = self.l.as_tensor();
        let w2 = w.broadcast_mul(l)?;
        let b2 = match b {
            Some(b) if !self.feedforward => Some(b.mul(&self.vector()?)?),
            other => other.cloned(),
        };
        Ok(Some((w2, b2)))
    }
}
