//! The ops layer: CPU custom ops with hand-written backward passes for
//! training a transformer whose pretrained weights are frozen.
//!
//! Why these exist:
//!
//! * candle's autograd computes a gradient for every operand of a matmul,
//!   including frozen pretrained weights that are plain tensors; in delta
//!   tuning that is most of the backward cost. [`frozen_linear`] computes
//!   only the input gradient.
//! * `candle_nn::ops::layer_norm` and `candle_nn::ops::softmax_last_dim`
//!   have no backward and silently cut the graph; composites built from
//!   elementary ops are correct but slow and allocation-heavy.
//!   [`layer_norm`], [`softmax_last_dim`], [`attention_softmax`] and
//!   [`gelu_erf`] are fused single-pass kernels with exact backward passes.
//!
//! The kernels run on the CPU in f32 (training) or f64 (finite-difference
//! tests); any other dtype is rejected with `UnsupportedDTypeForOp`. A
//! tensor on another device (a GPU) takes [`portable`]: the same function
//! composed from candle operations, which candle differentiates on every
//! device; tests force that path on the CPU and compare it with the kernels. Row
//! loops are parallelised with rayon; inner loops are written as simple
//! lane-split loops the compiler vectorises, and the hot ones are compiled a
//! second time for AVX2 and picked at run time when the CPU has it (the
//! workspace itself targets baseline x86-64). f32 `exp`/`erfc` are
//! branch-free polynomial evaluations so those loops vectorise too. Inputs
//! may have any layout (transposed, narrowed, broadcast): non-contiguous
//! ones are gathered into row-major order first.

mod attention;
mod bf16;
mod decoder;
mod dropout;
mod gelu;
mod gemm;
mod kernels;
mod linear;
mod loss;
mod lowrank;
mod norm;
pub mod portable;
pub(crate) mod quant_dot;
pub(crate) mod quant_int8;
mod quant_linear;
mod rowwise;
mod softmax;

#[cfg(test)]
pub(crate) mod tests;

pub use attention::attention;
pub use bf16::{
    bf16_decided, bf16_linear, bf16_pays, bf16_time_ratio, decide_bf16, has_bf16, Bf16Weight,
    BF16_MAX_TIME_RATIO,
};
pub use decoder::{rms_norm, rope, rope_angles, rope_angles_inv, swiglu};
pub use dropout::{dropout_bits_op, dropout_project};
pub use gelu::{gelu_erf, gelu_tanh_f16_table};
pub use linear::frozen_linear;
pub use loss::cross_entropy;
pub use lowrank::lora_up_add;
pub use norm::{layer_norm, residual_layer_norm};
pub use quant_int8::{int8_activations, int8_products_supported, Int8Activations};
pub use quant_linear::{quant_linear, quant_linear_rows};
pub use rowwise::{attention_rows, lora_down};

/// For tests of CPU-specific kernels: `true` (skip the test, with a note) when this CPU lacks
/// `what` (`has` is false), unless `DELTATUNE_REQUIRE_CPU_KERNELS=1`, which turns the skip into
/// a failure, so a machine meant to run the kernels proves that it did (CI sets it where
/// /proc/cpuinfo lists AVX-512 BF16 and VNNI).
#[doc(hidden)]
pub fn lacks_cpu_feature(has: bool, what: &str) -> bool {
    if has {
        return false;
    }
    assert!(
        std::env::var("DELTATUNE_REQUIRE_CPU_KERNELS").as_deref() != Ok("1"),
        "this CPU lacks {what}, and DELTATUNE_REQUIRE_CPU_KERNELS=1 requires the kernels that \
         use it to be tested"
    );
    eprintln!("NOTE: skipping: this CPU lacks {what}");
    true
}
pub use softmax::{attention_softmax, causal_attention_softmax, softmax_last_dim};
