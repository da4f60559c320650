//! The LoRA branch attached to one linear site.

use candle_core::{Tensor, Var};
use deltatune_core::{Ctx, LinearDelta};

/// `scale * dropout(x) A^T B^T`, added to the frozen output.
#[derive(Debug)]
pub struct LoraLinear {
    /// [r, in]
    pub a: Var,
    /// [out, r]
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// `base + scale · x Aᵀ Bᵀ` for the rows of `x`: in a pass without gradients through
/// [`deltatune_core::ops::lora_down`] (each row's numbers independent of the other rows, so a
/// sequence gets the same bits alone, in a batch, and in a server's batch mixing adapters,
/// [`super::multi::MultiLora`]); in a pass that may be differentiated through `project` (the
/// down projection with dropout).
pub(crate) fn lora_term(
    x: &Tensor,
    base: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    ctx: &Ctx,
    project: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    // Two ops, no reshapes: each graph node costs the backward a zero-filled buffer and an
    // add over its output (deltatune_core::ops::lora_up_add).
    let z = if ctx.no_grad && !ctx.train {
        deltatune_core::ops::lora_down(x, a)?
    } else {
        project(x)?
    };
    deltatune_core::ops::lora_up_add(base, &z, b, scale)
}

impl LinearDelta for LoraLinear {
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let a = self.a.as_tensor();
        lora_term(x, &base, a, self.b.as_tensor(), self.scale, ctx, |x| {
            deltatune_core::ops::dropout_project(x, a, self.dropout, ctx)
        })
    }

    fn merge_into(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        let dw = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?;
        Ok(Some(((w + dw)?, b.cloned())))
    }
}
