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
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp;
        let x2 = x.reshape((rows, inp))?;
        let z = deltatune_core::ops::dropout_project(&x2, self.a.as_tensor(), self.dropout, ctx)?;
        let z = (z.matmul(&self.b.as_tensor().t()?)? * self.scale)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.b.dims()[0];
        base + z.reshape(out_dims)?
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
