//! Exact (erf-based) GELU as a single custom op.
//!
//! BERT's feed-forward activation is `gelu(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2))`.
//! [`gelu_erf`] computes it in one parallel, vectorisable pass and
//! differentiates it as `dx = g·(Φ(x) + x·φ(x))`, recomputing Φ and φ from
//! `x` in backward instead of keeping temporaries alive.
//!
//! `Φ` is evaluated through the complementary error function, which keeps
//! relative accuracy in the far negative tail: for f32 the Numerical Recipes
//! `erfcc` Chebyshev fit (relative error < 1.2e-7) with a vectorised `exp`,
//! for f64 a series / continued-fraction evaluation good to ~1e-15 (see
//! `kernels::erfc_f32` and `kernels::erfc_f64`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::kernels::{check_float, contiguous, par_new, simd_kernel, with_slice, Real};

/// Elements per rayon task (GELU is cheap per element).
const CHUNK: usize = 4096;

struct GeluErf;

simd_kernel! {
    /// `y = x·Φ(x)` over a chunk.
    fn gelu_chunk<T>(x: &[T], y: &mut [T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * v.normal_cdf();
        }
    }
}

simd_kernel! {
    /// `dx = g·(Φ(x) + x·φ(x))` over a chunk.
    fn gelu_bwd_chunk<T>(x: &[T], g: &[T], dx: &mut [T]) {
        for ((o, &v), &gv) in dx.iter_mut().zip(x).zip(g) {
            *o = gv * (v.normal_cdf() + v * v.normal_pdf());
        }
    }
}

fn gelu_fwd_kernel<T: Real>(x: &[T], layout: &Layout) -> Vec<T> {
    let x = contiguous(x, layout);
    par_new(x.len(), CHUNK, |i, yc| {
        gelu_chunk(&x[i * CHUNK..][..yc.len()], yc)
    })
}

fn gelu_bwd_kernel<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    par_new(x.len(), CHUNK, |i, dc| {
        let r = i * CHUNK..i * CHUNK + dc.len();
        gelu_bwd_chunk(&x[r.clone()], &g[r], dc)
    })
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "deltatune-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(gelu_fwd_kernel(x, l)),
            CpuStorage::F64(x) => CpuStorage::F64(gelu_fwd_kernel(x, l)),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name()).bt())
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dev = arg.device();
        let dx = match arg.dtype() {
            DType::F32 => with_slice::<f32, _>(arg, |x| {
                with_slice::<f32, _>(grad, |g| {
                    Tensor::from_vec(gelu_bwd_kernel(x, g), arg.shape(), dev)
                })
            })?,
            DType::F64 => with_slice::<f64, _>(arg, |x| {
                with_slice::<f64, _>(grad, |g| {
                    Tensor::from_vec(gelu_bwd_kernel(x, g), arg.shape(), dev)
                })
            })?,
            dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, self.name()).bt()),
        };
        Ok(Some(dx))
    }
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`, elementwise with backward
/// `Φ(x) + x·φ(x)`.
///
/// # Shapes
/// * `x`: any shape, f32 or f64, any layout.
/// * returns the same shape.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    check_float(x, "gelu_erf")?;
    if super::portable::active(x) {
        return super::portable::gelu_erf(x);
    }
    x.apply_op1(GeluErf)
}

/// llama.cpp's GELU (tanh form) as its CPU backend computes it: `x` rounded to f16, the value
/// looked up in a table of f16 results of `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`,
/// 0 below -10 and `x` above 10. For inference with 8-bit activations ([`crate::Ctx::int8`]),
/// where generation follows llama.cpp's numbers; no backward.
pub fn gelu_tanh_f16_table(x: &Tensor) -> Result<Tensor> {
    use std::sync::OnceLock;
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| {
                let f = half::f16::from_bits(b).to_f32();
                let g = 0.5 * f * (1.0 + (0.797_884_6_f32 * f * (1.0 + 0.044_715 * f * f)).tanh());
                half::f16::from_f32(g).to_f32()
            })
            .collect()
    });
    let shape = x.shape().clone();
    let v: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let y: Vec<f32> = v
        .iter()
        .map(|&x| {
            if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                table[half::f16::from_f32(x).to_bits() as usize]
            }
        })
        .collect();
    Tensor::from_vec(y, shape, x.device())
}

#[cfg(test)]
mod table_tests {
    use super::*;
    use candle_core::Device;

    /// The table GELU is the tanh GELU of the f16-rounded input, rounded to f16; 0 at and below
    /// -10, the identity at and above 10; and within f16 rounding of the f32 GELU.
    #[test]
    fn f16_table_gelu_is_llama_cpps() {
        let xs: Vec<f32> = vec![
            -12.0, -10.0, -9.99, -3.3, -0.5, -1e-3, 0.0, 1e-3, 0.7, 2.5, 9.9, 10.0, 17.0,
        ];
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let y: Vec<f32> = gelu_tanh_f16_table(&x).unwrap().to_vec1().unwrap();
        let exact: Vec<f32> = x.gelu().unwrap().to_vec1().unwrap();
        let h = |v: f32| half::f16::from_f32(v).to_f32();
        for ((&x, &y), &e) in xs.iter().zip(&y).zip(&exact) {
            if x <= -10.0 {
                assert_eq!(y, 0.0);
            } else if x >= 10.0 {
                assert_eq!(y, x);
            } else {
                let xh = h(x);
                let g =
                    0.5 * xh * (1.0 + (0.797_884_6_f32 * xh * (1.0 + 0.044_715 * xh * xh)).tanh());
                assert_eq!(y, h(g), "x = {x}");
                assert!(
                    (y - e).abs() <= 2e-3 * (1.0 + e.abs()),
                    "x = {x}: {y} vs {e}"
                );
            }
        }
    }
}
