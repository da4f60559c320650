//! The decoder's ops with backward: RMS normalisation, rotary position embeddings and the
//! SiLU-gated product of a SwiGLU feed-forward block.
//!
//! candle's `candle_nn::ops::rms_norm` and `rotary_emb::rope` are fused kernels without a
//! backward pass (the graph is silently cut); composing them from elementwise ops works but
//! allocates a temporary per step and differentiates through each. Each op here is one
//! parallel pass per row in forward and one in backward, in the input dtype (f32 or f64):
//!
//! * [`rms_norm`]: `y = x / sqrt(mean(x²) + eps) · w`; `dx`, and `dw` only when `w` trains.
//! * [`rope`]: Hugging Face's rotate-half rotary embedding with per-row angles;
//!   the backward is the same rotation by the opposite angle.
//! * [`swiglu`]: `silu(gate) · up`, gradients for both.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{
    check_float, check_same_dtype, contiguous, min_rows, simd_kernel, wants_grad, with_slice, Real,
};

fn to_storage<T: Real>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let mut s = 0f64;
    for &v in row {
        let v = v.to_f64();
        s += v * v;
    }
    T::from_f64(1.0 / (s / row.len().max(1) as f64 + eps).sqrt())
}

fn rms_fwd<T: Real>(x: &[T], xl: &Layout, w: &[T], wl: &Layout, eps: f64) -> Vec<T> {
    let d = xl.dims().last().copied().unwrap_or(1);
    let x = contiguous(x, xl);
    let w = contiguous(w, wl);
    let mut y = vec![T::ZERO; x.len()];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(yr, xr)| {
            let r = inv_rms(xr, eps);
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w.iter()) {
                *o = xv * r * wv;
            }
        });
    y
}

/// `(dx, dw)`; `dw` only when asked.
fn rms_bwd<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    d: usize,
    eps: f64,
    want_dw: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let mut dx = vec![T::ZERO; x.len()];
    if d == 0 {
        return (dx, want_dw.then(Vec::new));
    }
    let inv_d = T::from_f64(1.0 / d as f64);
    let rows = 64usize;
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(d * rows)
        .zip(x.par_chunks(d * rows).zip(g.par_chunks(d * rows)))
        .map(|(dxb, (xb, gb))| {
            let mut dw = if want_dw {
                vec![T::ZERO; d]
            } else {
                Vec::new()
            };
            for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                let r = inv_rms(xr, eps);
                let mut s = T::ZERO;
                for ((&gv, &wv), &xv) in gr.iter().zip(w).zip(xr) {
                    s += gv * wv * xv;
                }
                let c = r * r * r * s * inv_d;
                for (((o, &gv), &wv), &xv) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                    *o = r * gv * wv - xv * c;
                }
                if want_dw {
                    for ((a, &gv), &xv) in dw.iter_mut().zip(gr).zip(xr) {
                        *a += gv * xv * r;
                    }
                }
            }
            dw
        })
        .collect();
    let dw = want_dw.then(|| {
        let mut acc = vec![T::ZERO; d];
        for p in partials {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += v;
            }
        }
        acc
    });
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "deltatune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => to_storage(rms_fwd(x, l1, w, l2, self.eps)),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => to_storage(rms_fwd(x, l1, w, l2, self.eps)),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), self.name()).bt())
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (wants_grad(x), wants_grad(w));
        if !want_dx && !want_dw {
            return Ok((None, None));
        }
        let d = x.dims().last().copied().unwrap_or(1);
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(x, |xs| {
                    with_slice::<$t, _>(w, |ws| {
                        with_slice::<$t, _>(g, |gs| {
                            let (dx, dw) = rms_bwd(xs, ws, gs, d, self.eps, want_dw);
                            let dx = if want_dx {
                                Some(Tensor::from_vec(dx, x.shape(), dev)?)
                            } else {
                                None
                            };
                            let dw = match dw {
                                Some(v) => Some(Tensor::from_vec(v, w.shape(), dev)?),
                                None => None,
                            };
                            Ok((dx, dw))
                        })
                    })
                })
            };
        }
        match x.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "rms-norm-bwd").bt()),
        }
    }
}

/// RMS normalisation over the last dimension, as Llama's `LlamaRMSNorm`:
/// `y = x / sqrt(mean(x²) + eps) · w` (the mean square accumulated in f64).
///
/// # Shapes
/// `x`: [..., d], `w`: [d] -> [..., d]
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    check_float(x, "rms_norm")?;
    check_same_dtype(x, w, "weight", "rms_norm")?;
    let d = x.dims().last().copied().unwrap_or(0);
    if w.dims() != [d] {
        bail!("rms_norm: weight must be [{d}], got {:?}", w.dims());
    }
    if super::portable::active(x) {
        return super::portable::rms_norm(x, w, eps);
    }
    x.apply_op2(w, RmsNorm { eps })
}

// ------------------------------------------------------------------- rope

/// Rotation angles: `cos` and `sin`, each `[B, T, D/2]` (f32 or f64 like the input).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Heads between batch and time: x is `[B, H, T, D]`.
    heads: usize,
}

fn rope_kernel<T: Real>(
    x: &[T],
    xl: &Layout,
    cos: &[T],
    sin: &[T],
    heads: usize,
    sign: T,
) -> Vec<T> {
    let dims = xl.dims();
    let (t, d) = (dims[2], dims[3]);
    let half = d / 2;
    let x = contiguous(x, xl);
    let mut y = vec![T::ZERO; x.len()];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(row, (yr, xr))| {
            let ti = row % t;
            let bi = row / (t * heads);
            let at = (bi * t + ti) * half;
            let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
            for j in 0..half {
                let (x1, x2) = (xr[j], xr[j + half]);
                let sj = sign * s[j];
                yr[j] = x1 * c[j] - x2 * sj;
                yr[j + half] = x2 * c[j] + x1 * sj;
            }
        });
    y
}

impl Rope {
    fn run(&self, x: &Tensor, sign: f64) -> Result<Tensor> {
        let dev = x.device();
        let l = Layout::contiguous(x.shape());
        let x = x.contiguous()?;
        match x.dtype() {
            candle_core::DType::F32 => with_slice::<f32, _>(&x, |xs| {
                with_slice::<f32, _>(&self.cos, |c| {
                    with_slice::<f32, _>(&self.sin, |s| {
                        Tensor::from_vec(
                            rope_kernel(xs, &l, c, s, self.heads, sign as f32),
                            x.shape(),
                            dev,
                        )
                    })
                })
            }),
            candle_core::DType::F64 => with_slice::<f64, _>(&x, |xs| {
                with_slice::<f64, _>(&self.cos, |c| {
                    with_slice::<f64, _>(&self.sin, |s| {
                        Tensor::from_vec(
                            rope_kernel(xs, &l, c, s, self.heads, sign),
                            x.shape(),
                            dev,
                        )
                    })
                })
            }),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "rope").bt()),
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "deltatune-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => with_slice::<f32, _>(&self.cos, |c| {
                with_slice::<f32, _>(&self.sin, |sn| {
                    Ok(to_storage(rope_kernel(x, l, c, sn, self.heads, 1.0)))
                })
            })?,
            CpuStorage::F64(x) => with_slice::<f64, _>(&self.cos, |c| {
                with_slice::<f64, _>(&self.sin, |sn| {
                    Ok(to_storage(rope_kernel(x, l, c, sn, self.heads, 1.0)))
                })
            })?,
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), self.name()).bt())
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !wants_grad(x) {
            return Ok(None);
        }
        // The transpose of a rotation is the rotation by the opposite angle.
        self.run(g, -1.0).map(Some)
    }
}

/// Rotary position embedding in Hugging Face's rotate-half layout: for `j < D/2`,
/// `y[j] = x[j]·cos - x[j + D/2]·sin` and `y[j + D/2] = x[j + D/2]·cos + x[j]·sin`, with the
/// angles of each example's own positions (left-padded batches have their own offsets).
///
/// # Shapes
/// `x`: [B, H, T, D], `cos`, `sin`: [B, T, D/2] -> [B, H, T, D]
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_float(x, "rope")?;
    let (b, h, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [b, t, d / 2] || sin.dims() != cos.dims() {
        bail!(
            "rope: x {:?} needs even D and cos/sin [B, T, D/2] = [{b}, {t}, {}], got {:?} / {:?}",
            x.dims(),
            d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    if super::portable::active(x) {
        return super::portable::rope(x, cos, sin);
    }
    let op = Rope {
        cos: cos.detach().to_dtype(x.dtype())?.contiguous()?,
        sin: sin.detach().to_dtype(x.dtype())?.contiguous()?,
        heads: h,
    };
    x.apply_op1(op)
}

/// `cos` and `sin` of the rotary angles `pos · θ^(-2j/D)` for every position id.
///
/// # Shapes
/// `positions`: B rows of T ids -> (`cos`, `sin`): [B, T, D/2] f32
pub fn rope_angles(
    positions: &[Vec<u32>],
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|j| (1.0 / theta.powf((2 * j) as f64 / head_dim as f64)) as f32)
        .collect();
    rope_angles_inv(positions, &inv, device)
}

/// `cos` and `sin` of the rotary angles `pos · inv[j]` for every position id, from given
/// inverse frequencies (scaled ropes compute their own).
///
/// # Shapes
/// `positions`: B rows of T ids, `inv`: D/2 -> (`cos`, `sin`): [B, T, D/2] f32
pub fn rope_angles_inv(
    positions: &[Vec<u32>],
    inv: &[f32],
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv.len();
    let b = positions.len();
    let t = positions.first().map_or(0, |p| p.len());
    let mut c = Vec::with_capacity(b * t * half);
    let mut s = Vec::with_capacity(b * t * half);
    for row in positions {
        if row.len() != t {
            bail!(
                "rope_angles: rows of different lengths ({} and {t})",
                row.len()
            );
        }
        for &p in row {
            for &f in inv {
                // Angles in f32 as transformers computes them (inv_freq f32, product f32).
                let a = (p as f32) * f;
                c.push(a.cos());
                s.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(c, (b, t, half), device)?,
        Tensor::from_vec(s, (b, t, half), device)?,
    ))
}

// ----------------------------------------------------------------- SwiGLU

struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Real>(v: T) -> T {
    T::ONE / (T::ONE + (-v).fexp())
}

/// Elements per parallel chunk of the SwiGLU kernels.
const SWIGLU_CHUNK: usize = 4096;

simd_kernel! {
    /// `y = silu(g) · u` over a chunk.
    fn swiglu_chunk<T>(g: &[T], u: &[T], y: &mut [T]) {
        for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            *o = gv * sigmoid(gv) * uv;
        }
    }
}

simd_kernel! {
    /// Both gradients over a chunk: `du = d · silu(g)`, `dg = d · u · silu'(g)`.
    fn swiglu_bwd_chunk<T>(g: &[T], u: &[T], d: &[T], dg: &mut [T], du: &mut [T]) {
        for i in 0..g.len().min(dg.len()).min(du.len()) {
            let s = sigmoid(g[i]);
            du[i] = d[i] * g[i] * s;
            dg[i] = d[i] * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
        }
    }
}

simd_kernel! {
    /// The gate's gradient alone over a chunk.
    fn swiglu_bwd_gate_chunk<T>(g: &[T], u: &[T], d: &[T], dg: &mut [T]) {
        for (((o, &gv), &uv), &dv) in dg.iter_mut().zip(g).zip(u).zip(d) {
            let s = sigmoid(gv);
            *o = dv * uv * s * (T::ONE + gv * (T::ONE - s));
        }
    }
}

simd_kernel! {
    /// The up projection's gradient alone over a chunk.
    fn swiglu_bwd_up_chunk<T>(g: &[T], d: &[T], du: &mut [T]) {
        for ((o, &gv), &dv) in du.iter_mut().zip(g).zip(d) {
            *o = dv * gv * sigmoid(gv);
        }
    }
}

fn swiglu_fwd<T: Real>(g: &[T], gl: &Layout, u: &[T], ul: &Layout) -> Vec<T> {
    let g = contiguous(g, gl);
    let u = contiguous(u, ul);
    let mut y = vec![T::ZERO; g.len()];
    y.par_chunks_mut(SWIGLU_CHUNK)
        .zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK)))
        .for_each(|(yc, (gc, uc))| swiglu_chunk(gc, uc, yc));
    y
}

/// The gradients `(dg, du)` that are wanted (empty vectors for the others), in parallel chunks.
fn swiglu_bwd<T: Real>(g: &[T], u: &[T], d: &[T], wg: bool, wu: bool) -> (Vec<T>, Vec<T>) {
    let n = g.len();
    let mut dg = vec![T::ZERO; if wg { n } else { 0 }];
    let mut du = vec![T::ZERO; if wu { n } else { 0 }];
    let c = SWIGLU_CHUNK;
    let inputs = g.par_chunks(c).zip(u.par_chunks(c)).zip(d.par_chunks(c));
    match (wg, wu) {
        (true, true) => inputs
            .zip(dg.par_chunks_mut(c).zip(du.par_chunks_mut(c)))
            .for_each(|(((gc, uc), dc), (dgc, duc))| swiglu_bwd_chunk(gc, uc, dc, dgc, duc)),
        (true, false) => inputs
            .zip(dg.par_chunks_mut(c))
            .for_each(|(((gc, uc), dc), dgc)| swiglu_bwd_gate_chunk(gc, uc, dc, dgc)),
        (false, true) => inputs
            .zip(du.par_chunks_mut(c))
            .for_each(|(((gc, _), dc), duc)| swiglu_bwd_up_chunk(gc, dc, duc)),
        (false, false) => {}
    }
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "deltatune-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => to_storage(swiglu_fwd(g, l1, u, l2)),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => to_storage(swiglu_fwd(g, l1, u, l2)),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), self.name()).bt())
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (wg, wu) = (wants_grad(gate), wants_grad(up));
        if !wg && !wu {
            return Ok((None, None));
        }
        let dev = gate.device();
        macro_rules! run {
            ($t:ty) => {
                with_slice::<$t, _>(gate, |gs| {
                    with_slice::<$t, _>(up, |us| {
                        with_slice::<$t, _>(grad, |ds| {
                            let (dg, du) = swiglu_bwd(gs, us, ds, wg, wu);
                            let dg = if wg {
                                Some(Tensor::from_vec(dg, gate.shape(), dev)?)
                            } else {
                                None
                            };
                            let du = if wu {
                                Some(Tensor::from_vec(du, up.shape(), dev)?)
                            } else {
                                None
                            };
                            Ok((dg, du))
                        })
                    })
                })
            };
        }
        match gate.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, "swiglu-bwd").bt()),
        }
    }
}

/// The gated activation of a SwiGLU feed-forward block: `silu(gate) · up`.
///
/// # Shapes
/// `gate`, `up`: [..., I] -> [..., I]
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_float(gate, "swiglu")?;
    check_same_dtype(gate, up, "up", "swiglu")?;
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    if super::portable::active(gate) {
        return super::portable::swiglu(gate, up);
    }
    gate.apply_op2(up, SwiGlu)
}
