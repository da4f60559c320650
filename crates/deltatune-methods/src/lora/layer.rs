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

impl LinearDelta for LoraLinear {
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        // Two ops, no reshapes: each graph node costs the backward a zero-filled buffer and an
        // add over its output (deltatune_core::ops::lora_up_add).
        let z = deltatune_core::ops::dropout_project(x, self.a.as_tensor(), self.dropout, ctx)?;
        deltatune_core::ops::lora_up_add(&base, &z, self.b.as_tensor(), self.scale)
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
