//! Scaled dot-product attention as one op on token-major `q`, `k`, `v`, with its backward.
//!
//! Composed from candle ops, attention on `[B, T, H·D]` projections is a chain of about a dozen
//! graph nodes: three head transposes and copies per operand, the score product, the softmax,
//! the dropout, the value product and the transposes back. candle's backward gives every node
//! a zero-filled gradient buffer and adds into it, so the chain costs a dozen full passes over
//! tensors as large as the scores (`B·H·T²` values) besides the products. [`attention`] is one
//! node with three inputs:
//!
//! * forward, per (example, key/value head): `Kᵀ` and `V` of that head are gathered into small
//!   contiguous buffers; for each query row the scores are accumulated over the head dimension
//!   (vector updates along the keys), `softmax(s·scale + key_bias)` (or the causal form) gives
//!   the row of `P`, the dropout keeps or zeroes each probability by its bit, and the output row
//!   is the sum of the kept rows of `V`. `P` (before dropout) is kept for the backward pass.
//! * backward, per (example, key/value head): `dP̃ = dO·Vᵀ`, `dV += P̃ᵀ·dO` (`P̃` = `P` after
//!   dropout), `dS = scale · P ⊙ (dP - Σ dP⊙P)` with `dP` = `dP̃` masked, `dQ = dS·K` and
//!   `dK += dSᵀ·Q`. Query heads that share a key/value head (grouped-query attention) run in
//!   the same task, so their `dK`, `dV` sums need no locks.
//!
//! The dropout bits are the ones [`crate::sites::Ctx::dropout`] would draw for the `[B, H, Tq,
//! Tk]` probabilities, in that order, so this op equals the composed chain draw for draw.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dropout::{keep_times, keep_times_in_place};
use super::kernels::{contiguous, dot, par_new, par_new_map, simd_kernel, with_slice, Real};

/// Geometry and settings of one attention call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    tq: usize,
    tk: usize,
    heads: usize,
    kv_heads: usize,
    dh: usize,
    scale: f64,
    /// Query `i` sees keys `0..=i + offset` only.
    causal: Option<usize>,
}

impl Geometry {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The dropout on the probabilities: keep-bits over `[B, H, Tq, Tk]` and the kept scale.
#[derive(Clone)]
struct ProbDropout {
    keep: Arc<Vec<u64>>,
    scale: f64,
}

struct Attention {
    g: Geometry,
    /// `[B, Tk]`, 0 or a large negative number per key.
    bias: Tensor,
    drop: Option<ProbDropout>,
    /// `P` before dropout, `[B, H, Tq, Tk]`, set by the forward pass for the backward pass.
    probs: Mutex<Option<CpuStorage>>,
}

/// `out = (out +) Σ_i coef[i·ce] · m[i·stride ..][..out.len()]` (`i < n`): a row vector (read
/// with element stride `ce`) times the first `n` rows of a row-major matrix, for [`combo4`]
/// where its AVX-512 kernel does not apply (f64, or a CPU without AVX-512). The columns go in
/// blocks of 32 with two sets of accumulators (even and odd rows), so the compiler keeps them
/// in registers.
#[inline(always)]
fn combo<T: Real>(
    coef: &[T],
    ce: usize,
    n: usize,
    m: &[T],
    stride: usize,
    out: &mut [T],
    accumulate: bool,
) {
    if n == 0 {
        if !accumulate {
            out.fill(T::ZERO);
        }
        return;
    }
    debug_assert!(coef.len() > (n - 1) * ce);
    debug_assert!(m.len() >= (n - 1) * stride + out.len());
    const W: usize = 32;
    let w = out.len();
    let mut c0 = 0;
    while c0 + W <= w {
        let mut a = [T::ZERO; W];
        let mut b = [T::ZERO; W];
        for r in 0..n / 2 {
            let (x0, x1) = (coef[2 * r * ce], coef[(2 * r + 1) * ce]);
            let m0 = &m[2 * r * stride + c0..][..W];
            let m1 = &m[(2 * r + 1) * stride + c0..][..W];
            for l in 0..W {
                a[l] += x0 * m0[l];
                b[l] += x1 * m1[l];
            }
        }
        if n % 2 == 1 {
            let x = coef[(n - 1) * ce];
            let m0 = &m[(n - 1) * stride + c0..][..W];
            for l in 0..W {
                a[l] += x * m0[l];
            }
        }
        let o = &mut out[c0..c0 + W];
        for l in 0..W {
            let v = a[l] + b[l];
            o[l] = if accumulate { o[l] + v } else { v };
        }
        c0 += W;
    }
    for (c, o) in out.iter_mut().enumerate().skip(c0) {
        let mut s = T::ZERO;
        for r in 0..n {
            s += coef[r * ce] * m[r * stride + c];
        }
        *o = if accumulate { *o + s } else { s };
    }
}

/// Up to four rows of `out[r·os ..][..w] = (out +) Σ_i coef[r·cs + i·ce] · m[i·stride ..][..w]`
/// (`r < rows`, `i < n`) at once over the same matrix, the core of every product here. The
/// strides let each operand be read where it lies: a head's rows inside a token-major tensor
/// (`stride` or `cs` = heads·D) and a transposed left operand (`cs` = 1, `ce` = row length).
/// f32 with AVX-512 (`fast`) takes [`x86::combo4_f32`], where each load of `m` feeds four FMAs;
/// otherwise each row goes through [`combo`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn combo4<T: Real>(
    coef: &[T],
    cs: usize,
    ce: usize,
    n: usize,
    rows: usize,
    m: &[T],
    stride: usize,
    out: &mut [T],
    os: usize,
    w: usize,
    accumulate: bool,
    fast: bool,
) {
    debug_assert!((1..=4).contains(&rows));
    #[cfg(target_arch = "x86_64")]
    if fast && n > 0 && w > 0 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        assert!(
            coef.len() > (rows - 1) * cs + (n - 1) * ce,
            "combo4: coef too short"
        );
        assert!(out.len() >= (rows - 1) * os + w, "combo4: out too short");
        assert!(m.len() >= (n - 1) * stride + w, "combo4: m too short");
        // SAFETY: `T` is f32 (checked); `fast` is only set with AVX-512F; the extents were
        // asserted just above.
        unsafe {
            x86::combo4_f32(
                &*(coef as *const [T] as *const [f32]),
                cs,
                ce,
                n,
                rows,
                &*(m as *const [T] as *const [f32]),
                stride,
                &mut *(out as *mut [T] as *mut [f32]),
                os,
                w,
                accumulate,
            );
        }
        return;
    }
    for r in 0..rows {
        combo(
            &coef[r * cs..],
            ce,
            n,
            m,
            stride,
            &mut out[r * os..r * os + w],
            accumulate,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::combo4`] for f32: 32 columns (two zmm) of up to four output rows at a time,
    /// eight accumulators; each pair of loads of `m` feeds eight FMAs.
    ///
    /// # Safety
    /// AVX-512F must be available; `coef` must hold `(rows - 1)·cs + (n - 1)·ce + 1` values,
    /// `m` `(n - 1)·stride + w`, `out` `(rows - 1)·os + w`; `1 <= rows <= 4`, `n >= 1`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn combo4_f32(
        coef: &[f32],
        cs: usize,
        ce: usize,
        n: usize,
        rows: usize,
        m: &[f32],
        stride: usize,
        out: &mut [f32],
        os: usize,
        w: usize,
        accumulate: bool,
    ) {
        let mp = m.as_ptr();
        let op = out.as_mut_ptr();
        // Rows past `rows` repeat the last one and are not stored.
        let cp: [*const f32; 4] = std::array::from_fn(|r| coef.as_ptr().add(r.min(rows - 1) * cs));
        let mut c0 = 0;
        while c0 < w {
            let left = w - c0;
            let k0 = ((1u32 << left.min(16)) - 1) as __mmask16;
            let k1 = ((1u32 << left.saturating_sub(16).min(16)) - 1) as __mmask16;
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            for i in 0..n {
                let row = mp.add(i * stride + c0);
                let b0 = _mm512_maskz_loadu_ps(k0, row);
                let b1 = _mm512_maskz_loadu_ps(k1, row.wrapping_add(16));
                for (a, c) in acc.iter_mut().zip(cp) {
                    let x = _mm512_set1_ps(*c.add(i * ce));
                    a[0] = _mm512_fmadd_ps(x, b0, a[0]);
                    a[1] = _mm512_fmadd_ps(x, b1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                for (h, k) in [(0usize, k0), (1, k1)] {
                    // Masked-off vectors may lie past the end: no `add` on them.
                    let o = op.wrapping_add(r * os + c0 + 16 * h);
                    let mut v = a[h];
                    if accumulate {
                        v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), v);
                    }
                    _mm512_mask_storeu_ps(o, k, v);
                }
            }
            c0 += 32;
        }
    }
}

/// Softmax of `s·scale + bias` in place over the first `limit` keys; later keys get 0.
#[inline(always)]
fn softmax_row<T: Real>(s: &mut [T], bias: &[T], scale: T, limit: usize) {
    let (live, masked) = s.split_at_mut(limit.min(s.len()));
    for (v, &b) in live.iter_mut().zip(bias) {
        *v = *v * scale + b;
    }
    masked.fill(T::ZERO);
    super::softmax::softmax_logits_inplace(live);
}

/// Keys row `i` of a causal (or not) attention sees.
#[inline(always)]
fn limit_of(g: &Geometry, i: usize) -> usize {
    match g.causal {
        Some(off) => (i + off + 1).min(g.tk),
        None => g.tk,
    }
}

/// The first query row that sees key `j` (`tq` if none does).
#[inline(always)]
fn first_query_of(g: &Geometry, j: usize) -> usize {
    match g.causal {
        Some(off) => j.saturating_sub(off).min(g.tq),
        None => 0,
    }
}

/// The transpose `[D, T]` of head `h` of a token-major `[B, T, heads·D]` tensor, example `b`.
/// Sixteen tokens at a time, so each head dimension's row is written sixteen values at once.
#[inline(always)]
fn gather_head_t<T: Real>(
    x: &[T],
    b: usize,
    t: usize,
    heads: usize,
    dh: usize,
    h: usize,
) -> Vec<T> {
    const R: usize = 16;
    let mut out = vec![T::ZERO; t * dh];
    let row = |r: usize| &x[(b * t + r) * heads * dh + h * dh..][..dh];
    for r0 in (0..t).step_by(R) {
        let n = (t - r0).min(R);
        let src: [&[T]; R] = std::array::from_fn(|i| row(r0 + i.min(n - 1)));
        for d in 0..dh {
            let o = &mut out[d * t + r0..d * t + r0 + n];
            for (i, v) in o.iter_mut().enumerate() {
                *v = src[i][d];
            }
        }
    }
    out
}

simd_kernel! {
    /// One forward task: example `task / kv_heads`, key/value head `task % kv_heads`; fills
    /// its query heads' rows of `P` (`p`) and returns their output rows `[group, Tq, D]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_task<T>(
        q: &[T],
        k: &[T],
        v: &[T],
        bias: &[T],
        g: &Geometry,
        drop: Option<&ProbDropout>,
        task: usize,
        p: &mut [T],
        fast: bool,
    ) -> Vec<T> {
        let Geometry {
            tq,
            tk,
            heads,
            kv_heads,
            dh,
            ..
        } = *g;
        let (qw, kw) = (heads * dh, kv_heads * dh);
        let group = g.group();
        let scale = T::from_f64(g.scale);
        let (bi, kvh) = (task / kv_heads, task % kv_heads);
        let kt = gather_head_t(k, bi, tk, kv_heads, dh, kvh);
        // The head's rows of V, read in place (row stride `kw`).
        let vh = &v[bi * tk * kw + kvh * dh..];
        let brow = &bias[bi * tk..(bi + 1) * tk];
        let mut out = vec![T::ZERO; group * tq * dh];
        // The kept (dropped-out) probabilities of up to four rows.
        let mut kept = vec![T::ZERO; 4 * tk];
        for hg in 0..group {
            let h = kvh * group + hg;
            let qh = &q[bi * tq * qw + h * dh..];
            for i0 in (0..tq).step_by(4) {
                let rows = (tq - i0).min(4);
                // Rows see more keys further down: the last row sees the most.
                let span = limit_of(g, i0 + rows - 1);
                let pb = &mut p[(hg * tq + i0) * tk..(hg * tq + i0 + rows) * tk];
                // Scores S = Q_rows · Kᵀ over the keys any of the rows sees.
                combo4(&qh[i0 * qw..], qw, 1, dh, rows, &kt, tk, pb, tk, span, false, fast);
                for r in 0..rows {
                    let i = i0 + r;
                    let limit = limit_of(g, i);
                    let row = &mut pb[r * tk..(r + 1) * tk];
                    softmax_row(row, brow, scale, limit);
                    if let Some(dr) = drop {
                        let base = ((bi * heads + h) * tq + i) * tk;
                        let kr = &mut kept[r * tk..r * tk + span];
                        let (live, masked) = kr.split_at_mut(limit);
                        keep_times(&dr.keep, base, T::from_f64(dr.scale), &row[..limit], live);
                        masked.fill(T::ZERO);
                    }
                }
                // out_rows = P̃_rows · V over the keys any of the rows sees (P is 0 past a
                // row's own).
                let pr: &[T] = if drop.is_some() { &kept } else { pb };
                let o = &mut out[(hg * tq + i0) * dh..];
                combo4(pr, tk, 1, span, rows, vh, kw, o, dh, dh, false, fast);
            }
        }
        out
    }
}

/// Copies the query-head rows `[group, Tq, D]` of key/value head `kvh`'s task into `dst`, the
/// example's token-major `[Tq, heads·D]` rows.
fn scatter_query_heads<T: Copy>(rows: &[T], kvh: usize, g: &Geometry, dst: &mut [T]) {
    let (tq, heads, dh, group) = (g.tq, g.heads, g.dh, g.group());
    for hg in 0..group {
        let h = kvh * group + hg;
        for i in 0..tq {
            let d0 = i * heads * dh + h * dh;
            dst[d0..d0 + dh].copy_from_slice(&rows[(hg * tq + i) * dh..(hg * tq + i + 1) * dh]);
        }
    }
}

/// Forward: `(out [B, Tq, H·D], P [B, H, Tq, Tk])`.
fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    bias: &[T],
    g: &Geometry,
    drop: Option<&ProbDropout>,
) -> (Vec<T>, Vec<T>) {
    let Geometry {
        tq, tk, heads, dh, ..
    } = *g;
    let fast = super::gemm::has_avx512();
    let n = g.b * heads * tq * tk;
    let per_task = g.group() * tq * tk;
    // Each task: one example and one key/value head (its `group` query heads), its rows of `P`.
    let (probs, outs) = par_new_map(n, per_task, |task, p| {
        forward_task(q, k, v, bias, g, drop, task, p, fast)
    });
    let kv = g.kv_heads;
    let y = par_new(g.b * tq * heads * dh, tq * heads * dh, |bi, ye| {
        for (kvh, out) in outs[bi * kv..(bi + 1) * kv].iter().enumerate() {
            scatter_query_heads(out, kvh, g, ye);
        }
    });
    (y, probs)
}

simd_kernel! {
    /// One backward task (as [`forward_task`]): `dq` rows `[group, Tq, D]` of its query heads,
    /// and `dk`, `dv` rows `[Tk, D]` of its key/value head.
    #[allow(clippy::too_many_arguments)]
    fn backward_task<T>(
        q: &[T],
        k: &[T],
        v: &[T],
        probs: &[T],
        dout: &[T],
        g: &Geometry,
        drop: Option<&ProbDropout>,
        task: usize,
        fast: bool,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Geometry {
            tq,
            tk,
            heads,
            kv_heads,
            dh,
            ..
        } = *g;
        let (qw, kw) = (heads * dh, kv_heads * dh);
        let group = g.group();
        let scale = T::from_f64(g.scale);
        let (bi, kvh) = (task / kv_heads, task % kv_heads);
        let kh = &k[bi * tk * kw + kvh * dh..];
        let vt = gather_head_t(v, bi, tk, kv_heads, dh, kvh);
        let mut dq = vec![T::ZERO; group * tq * dh];
        let mut dk = vec![T::ZERO; tk * dh];
        let mut dv = vec![T::ZERO; tk * dh];
        let mut dp = vec![T::ZERO; 4 * tk];
        // P̃ and dS of one head, [Tq, Tk] (zero past each row's visible keys).
        let mut pd = vec![T::ZERO; tq * tk];
        let mut dsm = vec![T::ZERO; tq * tk];
        for hg in 0..group {
            let h = kvh * group + hg;
            let qh = &q[bi * tq * qw + h * dh..];
            let goh = &dout[bi * tq * qw + h * dh..];
            for i0 in (0..tq).step_by(4) {
                let rows = (tq - i0).min(4);
                let span = limit_of(g, i0 + rows - 1);
                // dP̃ = dO_rows · Vᵀ over the visible keys.
                combo4(&goh[i0 * qw..], qw, 1, dh, rows, &vt, tk, &mut dp, tk, span, false, fast);
                for r in 0..rows {
                    let i = i0 + r;
                    let base = ((bi * heads + h) * tq + i) * tk;
                    let limit = limit_of(g, i);
                    let p = &probs[base..base + limit];
                    let dpr = &mut dp[r * tk..r * tk + limit];
                    let (pdr, pd_masked) = pd[i * tk..(i + 1) * tk].split_at_mut(limit);
                    // Dropout: P̃ and dP masked alike.
                    if let Some(dr) = drop {
                        let s = T::from_f64(dr.scale);
                        keep_times(&dr.keep, base, s, p, pdr);
                        keep_times_in_place(&dr.keep, base, s, dpr);
                    } else {
                        pdr.copy_from_slice(p);
                    }
                    pd_masked.fill(T::ZERO);
                    // Softmax backward: dS = scale · P ⊙ (dP - Σ dP⊙P).
                    let sum = dot(dpr, p);
                    let (dsr, ds_masked) = dsm[i * tk..(i + 1) * tk].split_at_mut(limit);
                    for ((d, &pj), &dpj) in dsr.iter_mut().zip(p).zip(dpr.iter()) {
                        *d = scale * pj * (dpj - sum);
                    }
                    ds_masked.fill(T::ZERO);
                }
                // dQ_rows = dS_rows · K.
                let dqr = &mut dq[(hg * tq + i0) * dh..];
                combo4(&dsm[i0 * tk..], tk, 1, span, rows, kh, kw, dqr, dh, dh, false, fast);
            }
            // dV += P̃ᵀ · dO and dK += dSᵀ · Q, four keys at a time (the transposes are read
            // in place: key j's coefficients are column j, element stride Tk), over the
            // queries that see the keys.
            for j0 in (0..tk).step_by(4) {
                let rows = (tk - j0).min(4);
                let i0 = first_query_of(g, j0);
                let n = tq - i0;
                if n == 0 {
                    continue;
                }
                let c = i0 * tk + j0;
                combo4(&pd[c..], 1, tk, n, rows, &goh[i0 * qw..], qw, &mut dv[j0 * dh..], dh, dh, true, fast);
                combo4(&dsm[c..], 1, tk, n, rows, &qh[i0 * qw..], qw, &mut dk[j0 * dh..], dh, dh, true, fast);
            }
        }
        (dq, dk, dv)
    }
}

/// One backward task's `(dq, dk, dv)` rows.
type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// Backward: `(dq, dk, dv)` in the inputs' token-major shapes.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dout: &[T],
    g: &Geometry,
    drop: Option<&ProbDropout>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Geometry {
        tq,
        tk,
        heads,
        kv_heads,
        dh,
        ..
    } = *g;
    let fast = super::gemm::has_avx512();
    // Per task: dq rows [group, Tq, D], dk and dv rows [Tk, D].
    let parts: Vec<Grads<T>> = (0..g.b * kv_heads)
        .into_par_iter()
        .map(|task| backward_task(q, k, v, probs, dout, g, drop, task, fast))
        .collect();
    // Into the token-major shapes, one example per chunk.
    let example = |bi: usize| &parts[bi * kv_heads..(bi + 1) * kv_heads];
    let gq = par_new(q.len(), tq * heads * dh, |bi, c| {
        for (kvh, (dq, _, _)) in example(bi).iter().enumerate() {
            scatter_query_heads(dq, kvh, g, c);
        }
    });
    let key_rows = |pick: fn(&Grads<T>) -> &Vec<T>| {
        par_new(k.len(), tk * kv_heads * dh, |bi, c| {
            for (kvh, part) in example(bi).iter().enumerate() {
                let rows = pick(part);
                for j in 0..tk {
                    let d0 = j * kv_heads * dh + kvh * dh;
                    c[d0..d0 + dh].copy_from_slice(&rows[j * dh..(j + 1) * dh]);
                }
            }
        })
    };
    let gk = key_rows(|p| &p.1);
    let gv = key_rows(|p| &p.2);
    (gq, gk, gv)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "deltatune-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let shape = Shape::from((g.b, g.tq, g.heads * g.dh));
        let (out, probs) = match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (y, p) = with_slice::<f32, _>(&self.bias, |bias| {
                    Ok(forward(
                        &contiguous(q, ql),
                        &contiguous(k, kl),
                        &contiguous(v, vl),
                        bias,
                        g,
                        self.drop.as_ref(),
                    ))
                })?;
                (CpuStorage::F32(y), CpuStorage::F32(p))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (y, p) = with_slice::<f64, _>(&self.bias, |bias| {
                    Ok(forward(
                        &contiguous(q, ql),
                        &contiguous(k, kl),
                        &contiguous(v, vl),
                        bias,
                        g,
                        self.drop.as_ref(),
                    ))
                })?;
                (CpuStorage::F64(y), CpuStorage::F64(p))
            }
            _ => bail!(
                "attention: q, k and v must all be f32 or all f64, got {:?}, {:?}, {:?}",
                qs.dtype(),
                ks.dtype(),
                vs.dtype()
            ),
        };
        *self.probs.lock().expect("attention probs lock") = Some(probs);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.probs.lock().expect("attention probs lock");
        let Some(probs) = guard.as_ref() else {
            bail!("attention: backward before forward");
        };
        let g = &self.g;
        let dev = q.device();
        macro_rules! run {
            ($t:ty, $p:expr) => {{
                with_slice::<$t, _>(q, |qd| {
                    with_slice::<$t, _>(k, |kd| {
                        with_slice::<$t, _>(v, |vd| {
                            with_slice::<$t, _>(grad, |gd| {
                                let (gq, gk, gv) =
                                    backward(qd, kd, vd, $p, gd, g, self.drop.as_ref());
                                Ok((
                                    Tensor::from_vec(gq, q.shape(), dev)?,
                                    Tensor::from_vec(gk, k.shape(), dev)?,
                                    Tensor::from_vec(gv, v.shape(), dev)?,
                                ))
                            })
                        })
                    })
                })?
            }};
        }
        let (gq, gk, gv) = match probs {
            CpuStorage::F32(p) => run!(f32, p),
            CpuStorage::F64(p) => run!(f64, p),
            _ => bail!("attention: unexpected saved dtype"),
        };
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

/// Scaled dot-product attention over token-major projections, as one op with backward.
///
/// `softmax(q·kᵀ·scale + key_bias)` per head (query heads `h` read key/value head
/// `h / (heads / kv_heads)`), optionally causal (query `i` sees keys `0..=i + offset`), with
/// dropout on the probabilities given as keep-bits over `[B, heads, Tq, Tk]` and the kept
/// scale, then times `v`. Gradients flow to `q`, `k` and `v` (not to `key_bias`).
///
/// # Shapes
/// * `q`: `[B, Tq, heads·D]`; `k`, `v`: `[B, Tk, kv_heads·D]` (any layout), f32 or f64 on the
///   CPU.
/// * `key_bias`: `[B, Tk]` (same dtype).
/// * returns `[B, Tq, heads·D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    causal_offset: Option<usize>,
    dropout: Option<(Vec<u64>, f32)>,
) -> Result<Tensor> {
    let (b, tq, qw) = q.dims3()?;
    let (bk, tk, kw) = k.dims3()?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !qw.is_multiple_of(heads) {
        bail!(
            "attention: {heads} query heads cannot share {kv_heads} key/value heads of q {:?}",
            q.dims()
        );
    }
    let dh = qw / heads;
    if bk != b || kw != kv_heads * dh || v.dims() != k.dims() {
        bail!(
            "attention: q {:?} ({heads} heads of {dh}) does not fit k {:?} and v {:?} ({kv_heads} heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if key_bias.dims() != [b, tk] {
        bail!(
            "attention: key_bias must be [{b}, {tk}], got {:?}",
            key_bias.dims()
        );
    }
    if let Some((bits, _)) = &dropout {
        if bits.len() * 64 < b * heads * tq * tk {
            bail!("attention: too few dropout bits");
        }
    }
    if super::portable::active(q) {
        let drop = dropout.as_ref().map(|(bits, s)| (bits.as_slice(), *s));
        return super::portable::attention(
            q,
            k,
            v,
            key_bias,
            heads,
            kv_heads,
            scale,
            causal_offset,
            drop,
        );
    }
    if !matches!(q.dtype(), DType::F32 | DType::F64) {
        bail!("attention: f32 or f64 tensors only, got {:?}", q.dtype());
    }
    let op = Attention {
        g: Geometry {
            b,
            tq,
            tk,
            heads,
            kv_heads,
            dh,
            scale,
            causal: causal_offset,
        },
        bias: key_bias.to_dtype(q.dtype())?.detach(),
        drop: dropout.map(|(keep, scale)| ProbDropout {
            keep: Arc::new(keep),
            scale: f64::from(scale),
        }),
        probs: Mutex::new(None),
    };
    q.apply_op3(k, v, op)
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_abs_diff;
    use super::*;
    use crate::sites::Ctx;
    use crate::Rng;
    use candle_core::Var;

    /// The same attention from candle ops and the crate's softmax and dropout ops.
    #[allow(clippy::too_many_arguments)]
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        heads: usize,
        kv_heads: usize,
        causal: Option<usize>,
        drop: Option<(Vec<u64>, f32)>,
    ) -> Tensor {
        let (b, tq, w) = q.dims3().unwrap();
        let tk = k.dim(1).unwrap();
        let dh = w / heads;
        let group = heads / kv_heads;
        let hm = |x: &Tensor, t: usize, n: usize| {
            x.reshape((b, t, n, dh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let qh = hm(q, tq, heads)
            .reshape((b, kv_heads, group * tq, dh))
            .unwrap();
        let (kh, vh) = (hm(k, tk, kv_heads), hm(v, tk, kv_heads));
        let scores = qh
            .matmul(&kh.t().unwrap())
            .unwrap()
            .reshape((b, heads, tq, tk))
            .unwrap();
        let scale = 1.0 / (dh as f64).sqrt();
        let mut p = match causal {
            Some(off) => super::super::causal_attention_softmax(&scores, bias, scale, off),
            None => super::super::attention_softmax(&scores, bias, scale),
        }
        .unwrap();
        if let Some((bits, s)) = drop {
            p = super::super::dropout_bits_op(&p, bits, s).unwrap();
        }
        p.reshape((b, kv_heads, group * tq, tk))
            .unwrap()
            .matmul(&vh)
            .unwrap()
            .reshape((b, heads, tq, dh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, tq, heads * dh))
            .unwrap()
    }

    /// Forward and the three gradients equal the composed chain's: plain, padded keys, causal
    /// with an offset, grouped-query heads, dropout, head sizes off the 32-column blocks, f32
    /// and f64.
    #[test]
    fn attention_op_equals_the_composed_chain() {
        let mut r = Rng::new(8);
        for (b, tq, tk, heads, kv_heads, dh, causal, p, dtype) in [
            (2, 5, 5, 2, 2, 4, None, 0.0, DType::F64),
            (2, 7, 9, 4, 2, 40, Some(2), 0.3, DType::F64),
            (3, 16, 16, 6, 6, 32, None, 0.1, DType::F32),
            (1, 3, 11, 4, 1, 64, Some(8), 0.5, DType::F32),
            (2, 1, 6, 3, 3, 33, None, 0.0, DType::F32),
        ] {
            let mut t = |dims: (usize, usize, usize)| {
                Var::from_tensor(&r.normal_tensor(dims, 1.0).unwrap().to_dtype(dtype).unwrap())
                    .unwrap()
            };
            let q = t((b, tq, heads * dh));
            let k = t((b, tk, kv_heads * dh));
            let v = t((b, tk, kv_heads * dh));
            // The last key of the first example is padding.
            let mut bias = vec![0f32; b * tk];
            bias[tk - 1] = -1e9;
            let bias = Tensor::from_vec(bias, (b, tk), &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let drop =
                (p > 0.0).then(|| Ctx::train(Rng::new(4)).dropout_bits(b * heads * tq * tk, p));
            let w = r
                .normal_tensor((b, tq, heads * dh), 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y1 = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &bias,
                heads,
                kv_heads,
                1.0 / (dh as f64).sqrt(),
                causal,
                drop.clone(),
            )
            .unwrap();
            let y2 = composed(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &bias,
                heads,
                kv_heads,
                causal,
                drop,
            );
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            let what = format!("b {b} tq {tq} tk {tk} heads {heads}/{kv_heads} dh {dh}");
            assert!(
                max_abs_diff(&y1, &y2) < tol,
                "forward, {what}: {}",
                max_abs_diff(&y1, &y2)
            );
            let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, c) = (
                    g1.get(x.as_tensor()).unwrap(),
                    g2.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    max_abs_diff(a, c) < tol,
                    "d{name}, {what}: {}",
                    max_abs_diff(a, c)
                );
                assert!(
                    max_abs_diff(a, &a.zeros_like().unwrap()) > 0.0,
                    "d{name} is zero, {what}"
                );
            }
        }
    }

    #[test]
    fn attention_rejects_misfit_shapes() {
        let z = |d: (usize, usize, usize)| {
            Tensor::zeros(d, DType::F32, &candle_core::Device::Cpu).unwrap()
        };
        let bias = Tensor::zeros((2, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        let err = attention(
            &z((2, 3, 8)),
            &z((2, 4, 6)),
            &z((2, 4, 6)),
            &bias,
            2,
            2,
            1.0,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not fit"), "{err}");
        let err = attention(
            &z((2, 3, 8)),
            &z((2, 4, 8)),
            &z((2, 4, 8)),
            &z((2, 5, 1)).squeeze(2).unwrap(),
            2,
            2,
            1.0,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key_bias must be [2, 4]"), "{err}");
        let err = attention(
            &z((2, 3, 8)),
            &z((2, 4, 8)),
            &z((2, 4, 8)),
            &bias,
            3,
            2,
            1.0,
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot share"), "{err}");
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::Rng;

    /// `cargo test --release -p deltatune-core bench_attention -- --ignored --nocapture`:
    /// one MiniLM attention layer at 16 x 128 tokens (12 heads of 32), forward and backward.
    #[test]
    #[ignore]
    fn bench_attention() {
        let mut r = Rng::new(1);
        let (b, t, h, dh) = (16, 128, 12, 32);
        let q =
            candle_core::Var::from_tensor(&r.normal_tensor((b, t, h * dh), 1.0).unwrap()).unwrap();
        let k = r.normal_tensor((b, t, h * dh), 1.0).unwrap();
        let v = r.normal_tensor((b, t, h * dh), 1.0).unwrap();
        let bias = Tensor::zeros((b, t), DType::F32, &candle_core::Device::Cpu).unwrap();
        let run = |drop: bool| {
            let bits = drop.then(|| (vec![u64::MAX / 3; b * h * t * t / 64 + 1], 1.1f32));
            attention(q.as_tensor(), &k, &v, &bias, h, h, 0.17, None, bits).unwrap()
        };
        for drop in [false, true] {
            run(drop);
            let t0 = std::time::Instant::now();
            for _ in 0..10 {
                run(drop);
            }
            let fwd = t0.elapsed().as_secs_f64() * 100.0;
            let y = run(drop);
            let t0 = std::time::Instant::now();
            for _ in 0..10 {
                y.sum_all().unwrap().backward().unwrap();
            }
            let bwd = t0.elapsed().as_secs_f64() * 100.0;
            let flop = 2.0 * 2.0 * (b * h * t * t * dh) as f64;
            println!(
                "dropout {drop}: forward {fwd:.2} ms ({:.0} GFLOP/s), backward {bwd:.2} ms ({:.0} GFLOP/s)",
                flop / fwd / 1e6,
                2.0 * flop / bwd / 1e6
            );
        }
    }
}
