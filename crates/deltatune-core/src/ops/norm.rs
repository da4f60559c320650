//! Layer normalisation over the last dimension with a hand-written backward.
//!
//! `candle_nn::ops::layer_norm` has no backward (the graph is silently cut),
//! and the composite version (mean, sub, sqr, mean, sqrt, div, mul, add)
//! allocates eight temporaries and differentiates through every one of them.
//! [`layer_norm`] is a single `CustomOp3`: one parallel pass per row in
//! forward, and in backward one pass per row that recomputes mean and
//! 1/std from `x` (nothing is stored between the passes) and produces `dx`
//! plus, only when they are trainable, `d_gamma`/`d_beta` from per-thread
//! partial sums. Arithmetic and accumulation happen in the input dtype
//! (f32 accumulation for f32, as PyTorch does on CPU).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{
    check_float, check_same_dtype, contiguous, min_rows, par_new, par_new_map, simd_kernel, sum,
    sum_sq_dev, wants_grad, with_slice, Real,
};

struct LayerNorm {
    eps: f64,
}

/// Mean and `1/sqrt(var + eps)` of one row (biased variance, two passes).
#[inline(always)]
fn row_stats<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = sum(x) / n;
    let var = sum_sq_dev(x, mean) / n;
    (mean, T::ONE / (var + eps).fsqrt())
}

fn ln_fwd_kernel<T: Real>(x: &[T], gamma: &[T], beta: &[T], d: usize, eps: T) -> Vec<T> {
    if d == 0 {
        return vec![T::ZERO; x.len()];
    }
    let chunk = min_rows(d) * d;
    par_new(x.len(), chunk, |i, yc| {
        for (yr, xr) in yc.chunks_mut(d).zip(x[i * chunk..].chunks(d)) {
            ln_fwd_row(xr, gamma, beta, eps, yr);
        }
    })
}

simd_kernel! {
    /// One row of the forward pass.
    fn ln_fwd_row<T>(x: &[T], gamma: &[T], beta: &[T], eps: T, y: &mut [T]) {
        let (mean, rstd) = row_stats(x, eps);
        for (((o, &xv), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (xv - mean) * rstd * g + b;
        }
    }
}

/// `(Σ g·γ, Σ g·γ·(x - mean))` over a row, eight accumulators each.
#[inline(always)]
fn bwd_sums<T: Real>(x: &[T], g: &[T], gamma: &[T], mean: T) -> (T, T) {
    const L: usize = 8;
    let mut a1 = [T::ZERO; L];
    let mut a2 = [T::ZERO; L];
    let mut ix = x.chunks_exact(L);
    let mut ig = g.chunks_exact(L);
    let mut iw = gamma.chunks_exact(L);
    for ((cx, cg), cw) in (&mut ix).zip(&mut ig).zip(&mut iw) {
        for l in 0..L {
            let gg = cg[l] * cw[l];
            a1[l] += gg;
            a2[l] += gg * (cx[l] - mean);
        }
    }
    let mut s1 = sum(&a1);
    let mut s2 = sum(&a2);
    for ((&xv, &gv), &w) in ix
        .remainder()
        .iter()
        .zip(ig.remainder())
        .zip(iw.remainder())
    {
        let gg = gv * w;
        s1 += gg;
        s2 += gg * (xv - mean);
    }
    (s1, s2)
}

/// Per-block partial `(d_gamma, d_beta)`.
type Partial<T> = Option<(Vec<T>, Vec<T>)>;

simd_kernel! {
    /// Backward over a block of whole rows. Writes `dx` when given and
    /// returns the block's partial parameter gradients when `params` is set.
    fn ln_bwd_block<T>(
        x: &[T],
        g: &[T],
        gamma: &[T],
        d: usize,
        eps: T,
        dx: Option<&mut [T]>,
        params: bool,
    ) -> Partial<T> {
        let mut dx = dx;
        let mut acc = params.then(|| (vec![T::ZERO; d], vec![T::ZERO; d]));
        let inv_d = T::ONE / T::from_f64(d as f64);
        for (r, (xr, gr)) in x.chunks_exact(d).zip(g.chunks_exact(d)).enumerate() {
            let (mean, rstd) = row_stats(xr, eps);
            if let Some(dx) = dx.as_deref_mut() {
                let dxr = &mut dx[r * d..(r + 1) * d];
                let (s1, s2) = bwd_sums(xr, gr, gamma, mean);
                // dx = rstd·(g·γ - mean(g·γ) - x̂·mean(g·γ·x̂)), x̂ = (x - mean)·rstd
                let a = s1 * inv_d;
                let b = s2 * rstd * rstd * inv_d;
                for (((o, &xv), &gv), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(gamma) {
                    *o = rstd * (gv * w - a - (xv - mean) * b);
                }
            }
            if let Some((dg, db)) = acc.as_mut() {
                for (((dgv, dbv), &xv), &gv) in dg.iter_mut().zip(db.iter_mut()).zip(xr).zip(gr) {
                    *dgv += gv * (xv - mean) * rstd;
                    *dbv += gv;
                }
            }
        }
        acc
    }
}

/// The blocks' partial sums added in block order. Rayon's `reduce` would add them along a tree
/// whose shape follows work stealing, so the same step could give gradients that differ in the
/// last bits from run to run (and a trained delta that differs with them).
fn sum_in_order<T: Real>(parts: Vec<Partial<T>>) -> Partial<T> {
    parts.into_iter().fold(None, add_partials)
}

fn add_partials<T: Real>(a: Partial<T>, b: Partial<T>) -> Partial<T> {
    match (a, b) {
        (Some((mut ga, mut ba)), Some((gb, bb))) => {
            for (x, y) in ga.iter_mut().zip(&gb) {
                *x += *y;
            }
            for (x, y) in ba.iter_mut().zip(&bb) {
                *x += *y;
            }
            Some((ga, ba))
        }
        (a, None) => a,
        (None, b) => b,
    }
}

/// Layer-norm backward kernel: `(dx, (d_gamma, d_beta))`, each only if asked.
fn ln_bwd_kernel<T: Real>(
    x: &[T],
    g: &[T],
    gamma: &[T],
    d: usize,
    eps: T,
    need_dx: bool,
    need_params: bool,
) -> (Option<Vec<T>>, Partial<T>) {
    let rows = x.len().checked_div(d).unwrap_or(0);
    if rows == 0 {
        let params = need_params.then(|| (vec![T::ZERO; d], vec![T::ZERO; d]));
        return (need_dx.then(|| vec![T::ZERO; x.len()]), params);
    }
    // A few blocks per thread: enough to balance, few enough partials to sum.
    let blocks = (rayon::current_num_threads() * 4).min(rows).max(1);
    let block_rows = rows.div_ceil(blocks).max(min_rows(d));
    let block = block_rows * d;
    if need_dx {
        let (dx, params) = par_new_map(x.len(), block, |i, dxb| {
            let r = i * block..i * block + dxb.len();
            ln_bwd_block(&x[r.clone()], &g[r], gamma, d, eps, Some(dxb), need_params)
        });
        (Some(dx), sum_in_order(params))
    } else {
        let params = x
            .par_chunks(block)
            .zip(g.par_chunks(block))
            .map(|(xb, gb)| ln_bwd_block(xb, gb, gamma, d, eps, None, need_params))
            .collect::<Vec<_>>();
        (None, sum_in_order(params))
    }
}

fn ln_fwd_dispatch<T: Real>(
    x: &[T],
    l1: &Layout,
    gamma: &[T],
    l2: &Layout,
    beta: &[T],
    l3: &Layout,
    eps: f64,
) -> Vec<T> {
    let d = l1.dims().last().copied().unwrap_or(1);
    let x = contiguous(x, l1);
    let gamma = contiguous(gamma, l2);
    let beta = contiguous(beta, l3);
    ln_fwd_kernel(&x, &gamma, &beta, d, T::from_f64(eps))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "deltatune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(ln_fwd_dispatch(x, l1, g, l2, b, l3, self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(ln_fwd_dispatch(x, l1, g, l2, b, l3, self.eps))
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), self.name()).bt())
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, gamma, beta, grad),
            DType::F64 => self.bwd_t::<f64>(x, gamma, beta, grad),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, self.name()).bt()),
        }
    }
}

impl LayerNorm {
    fn bwd_t<T: Real>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_dx = wants_grad(x);
        let need_dg = wants_grad(gamma);
        let need_db = wants_grad(beta);
        if !(need_dx || need_dg || need_db) {
            return Ok((None, None, None));
        }
        let d = gamma.elem_count();
        let dev = x.device();
        let eps = T::from_f64(self.eps);
        let (dx, params) = with_slice::<T, _>(x, |xs| {
            with_slice::<T, _>(grad, |gs| {
                with_slice::<T, _>(gamma, |ws| {
                    Ok(ln_bwd_kernel(
                        xs,
                        gs,
                        ws,
                        d,
                        eps,
                        need_dx,
                        need_dg || need_db,
                    ))
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let (dg, db) = match params {
            Some((dg, db)) => (
                need_dg
                    .then(|| Tensor::from_vec(dg, gamma.shape(), dev))
                    .transpose()?,
                need_db
                    .then(|| Tensor::from_vec(db, beta.shape(), dev))
                    .transpose()?,
            ),
            None => (None, None),
        };
        Ok((dx, dg, db))
    }
}

/// Layer normalisation over the last dimension, like `torch.nn.LayerNorm`
/// (biased variance): `y = (x - mean) / sqrt(var + eps) * gamma + beta`.
///
/// Backward always yields `dx` (when `x` is part of a graph) and yields
/// `d_gamma` / `d_beta` only when that tensor is a variable or tracks an op,
/// so frozen affine parameters cost nothing.
///
/// # Shapes
/// * `x`: `[..., d]`, f32 or f64, any layout.
/// * `gamma`, `beta`: `[d]`, same dtype as `x`.
/// * returns `[..., d]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    check_float(x, OP)?;
    check_same_dtype(x, gamma, "gamma", OP)?;
    check_same_dtype(x, beta, "beta", OP)?;
    let d = match x.dims().last() {
        Some(&d) => d,
        None => bail!("layer_norm: expected a tensor of rank >= 1"),
    };
    if gamma.dims() != [d] || beta.dims() != [d] {
        bail!(
            "layer_norm: gamma {:?} and beta {:?} must both be [{d}] for input {:?}",
            gamma.dims(),
            beta.dims(),
            x.dims()
        );
    }
    if super::portable::active(x) {
        return super::portable::layer_norm(x, gamma, beta, eps);
    }
    x.apply_op3(gamma, beta, LayerNorm { eps })
}

/// `layer_norm(dropout(x) + residual)`: the end of a post-norm sub-layer (BERT) as one op.
///
/// Composed, the dropout and the sum are two more graph nodes as large as `x`, and candle's
/// backward zero-fills a gradient buffer for each and adds into it. Here the sum is formed in
/// the forward pass and again in the backward (one cheap pass, nothing kept between them);
/// the backward gives `residual` the layer norm's input gradient and `x` the same, masked.
struct ResidualLayerNorm {
    eps: f64,
    /// Dropout on `x` (its keep-bits and scale).
    dropout: Option<super::dropout::Dropout>,
}

impl ResidualLayerNorm {
    /// `dropout(x) + residual`, row-major.
    fn sum<T: Real>(&self, x: &[T], r: &[T]) -> Vec<T> {
        let mut s = r.to_vec();
        match &self.dropout {
            None => s
                .par_chunks_mut(4096)
                .zip(x.par_chunks(4096))
                .for_each(|(sc, xc)| add_into(sc, xc)),
            Some(d) => {
                let scale = T::from_f64(f64::from(d.scale));
                // Whole 64-element words per task.
                s.par_chunks_mut(64 * 64)
                    .zip(x.par_chunks(64 * 64))
                    .enumerate()
                    .for_each(|(t, (sc, xc))| add_kept_into(sc, xc, &d.keep[t * 64..], scale));
            }
        }
        s
    }
}

simd_kernel! {
    /// `s += x`.
    fn add_into<T>(s: &mut [T], x: &[T]) {
        for (a, &b) in s.iter_mut().zip(x) {
            *a += b;
        }
    }
}

simd_kernel! {
    /// `s += x · scale` where bit `i` of `keep` is set (`s` and `x` start at a word).
    fn add_kept_into<T>(s: &mut [T], x: &[T], keep: &[u64], scale: T) {
        for (w, (sw, xw)) in s.chunks_mut(64).zip(x.chunks(64)).enumerate() {
            let word = keep[w];
            for (b, (a, &v)) in sw.iter_mut().zip(xw).enumerate() {
                *a += super::dropout::kept(word, b, v, scale);
            }
        }
    }
}

impl CustomOp3 for ResidualLayerNorm {
    fn name(&self) -> &'static str {
        "deltatune-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &ResidualLayerNorm,
            x: &[T],
            l1: &Layout,
            r: &[T],
            l2: &Layout,
            gb: &[T],
            l3: &Layout,
        ) -> Vec<T> {
            let d = l1.dims().last().copied().unwrap_or(1);
            let s = op.sum(&contiguous(x, l1), &contiguous(r, l2));
            let gb = contiguous(gb, l3);
            ln_fwd_kernel(&s, &gb[..d], &gb[d..], d, T::from_f64(op.eps))
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(r), CpuStorage::F32(gb)) => {
                CpuStorage::F32(run(self, x, l1, r, l2, gb, l3))
            }
            (CpuStorage::F64(x), CpuStorage::F64(r), CpuStorage::F64(gb)) => {
                CpuStorage::F64(run(self, x, l1, r, l2, gb, l3))
            }
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), self.name()).bt())
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, residual, gb, grad),
            DType::F64 => self.bwd_t::<f64>(x, residual, gb, grad),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, self.name()).bt()),
        }
    }
}

impl ResidualLayerNorm {
    fn bwd_t<T: Real>(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gb: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_r, need_gb) = (wants_grad(x), wants_grad(residual), wants_grad(gb));
        if !(need_x || need_r || need_gb) {
            return Ok((None, None, None));
        }
        let d = gb.dim(1)?;
        let dev = x.device();
        let eps = T::from_f64(self.eps);
        let (ds, params) = with_slice::<T, _>(x, |xs| {
            with_slice::<T, _>(residual, |rs| {
                with_slice::<T, _>(grad, |gs| {
                    with_slice::<T, _>(gb, |gbs| {
                        let s = self.sum(xs, rs);
                        Ok(ln_bwd_kernel(
                            &s,
                            gs,
                            &gbs[..d],
                            d,
                            eps,
                            need_x || need_r,
                            need_gb,
                        ))
                    })
                })
            })
        })?;
        let (dx, dr) = match (ds, &self.dropout) {
            // Without dropout both gradients are the same values: one tensor serves both
            // (candle's backward adds gradients into new tensors, never in place).
            (Some(ds), None) => {
                let t = Tensor::from_vec(ds, residual.shape(), dev)?;
                (need_x.then(|| t.clone()), need_r.then_some(t))
            }
            // `x`'s gradient is masked as the dropout masked `x` (the dropout op's own masking).
            (Some(ds), Some(drop)) => {
                let dx = need_x
                    .then(|| Tensor::from_vec(drop.apply(&ds), x.shape(), dev))
                    .transpose()?;
                let dr = need_r
                    .then(|| Tensor::from_vec(ds, residual.shape(), dev))
                    .transpose()?;
                (dx, dr)
            }
            (None, _) => (None, None),
        };
        let dgb = match params {
            Some((dg, db)) if need_gb => {
                let mut v = dg;
                v.extend_from_slice(&db);
                Some(Tensor::from_vec(v, (2, d), dev)?)
            }
            _ => None,
        };
        Ok((dx, dr, dgb))
    }
}

/// `layer_norm(dropout(x) + residual)` as one op (see [`ResidualLayerNorm`]); `dropout` is the
/// keep-bits and scale of [`crate::Ctx::dropout_bits`] (None: no dropout). Gradients reach
/// `x`, `residual`, and `gamma` / `beta` where they are trainable.
///
/// # Shapes
/// `x`, `residual`: `[..., d]` (f32 or f64, any layout); `gamma`, `beta`: `[d]` -> `[..., d]`
pub fn residual_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout: Option<(Vec<u64>, f32)>,
) -> Result<Tensor> {
    const OP: &str = "residual_layer_norm";
    check_float(x, OP)?;
    check_same_dtype(x, residual, "residual", OP)?;
    check_same_dtype(x, gamma, "gamma", OP)?;
    check_same_dtype(x, beta, "beta", OP)?;
    let d = match x.dims().last() {
        Some(&d) => d,
        None => bail!("residual_layer_norm: expected a tensor of rank >= 1"),
    };
    if residual.dims() != x.dims() || gamma.dims() != [d] || beta.dims() != [d] {
        bail!(
            "residual_layer_norm: x {:?}, residual {:?}, gamma {:?} and beta {:?} do not fit",
            x.dims(),
            residual.dims(),
            gamma.dims(),
            beta.dims()
        );
    }
    if let Some((keep, _)) = &dropout {
        if keep.len() * 64 < x.elem_count() {
            bail!(
                "residual_layer_norm: {} dropout bits for {} elements",
                keep.len() * 64,
                x.elem_count()
            );
        }
    }
    if super::portable::active(x) {
        let x = match &dropout {
            Some((keep, scale)) => super::portable::dropout(x, keep, *scale)?,
            None => x.clone(),
        };
        return super::portable::layer_norm(&(x + residual)?, gamma, beta, eps);
    }
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    x.apply_op3(
        residual,
        &gb,
        ResidualLayerNorm {
            eps,
            dropout: dropout.map(|(keep, scale)| super::dropout::Dropout {
                keep: std::sync::Arc::new(keep),
                scale,
            }),
        },
    )
}
