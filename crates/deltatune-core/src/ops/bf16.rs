//! bf16 products for frozen weights: `y = x·Wᵀ (+ b)` and its input gradient `dx = g·W`
//! with AVX-512 BF16 dot products (`vdpbf16ps`) and f32 accumulation.
//!
//! On CPUs with AVX-512 BF16 one `vdpbf16ps` does 32 multiply-adds where an f32 FMA does 16,
//! so the frozen weights' products, most of the work of a delta-tuning step, take about half
//! the time. What changes in the numbers: `W` and the left operand (`x` forward, `g` backward)
//! are rounded to bf16 (8 significant bits, round to nearest even) before they are multiplied;
//! the products and sums are f32, and so is everything else in the network (norms, softmax,
//! the deltas and their gradients, the optimizer's master copies). This is what PyTorch's
//! `autocast(dtype=torch.bfloat16)` does for a linear layer.
//!
//! * [`Bf16Weight::pack`] rounds `W` once and keeps it in the kernel's layout twice: as
//!   `Wᵀ` (forward) and as `W` (backward). Both together take the f32 weight's size. A step
//!   then never packs `B`.
//! * Layout of a packed `B` `[k, n]`: `NR`-column panels; in a panel, for each pair of rows
//!   `(2p, 2p + 1)` the `NR` pairs `(B[2p, j], B[2p + 1, j])` in column order, which is what
//!   one `vdpbf16ps` reads: sixteen columns times two depths. An odd last row and the columns
//!   past `n` are zero.
//! * The left operand is rounded to bf16 once per product (16 values per instruction).
//! * Microkernel `MR × NR` = 8 × 48 as in [`super::gemm`]: per pair of depths three loads of
//!   `B`, eight broadcasts of a pair of `A`, 24 `vdpbf16ps`. Blocking and threading are
//!   [`super::gemm`]'s: one rectangle per thread, `B` blocks sized for L2.
//!
//! The path is taken only when the CPU reports AVX-512F and AVX-512 BF16 at run time;
//! [`Bf16Weight::pack`] returns `None` otherwise and the layer keeps its f32 products.

// Everything but the public items serves the x86-64 kernel only.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{block_width, equal_part, split, MatRef, SendPtr};
use super::kernels::{add_unfused_bias, contiguous, split_bias, with_slice};

/// Rows of the microkernel tile.
const MR: usize = 8;
/// zmm vectors per tile row.
const NV: usize = 3;
/// Columns of the microkernel tile (and of a packed panel).
const NR: usize = 16 * NV;
/// Most pairs of depths in one block (1024 bytes of `A` per row).
const KCP_MAX: usize = 256;
/// Largest `B` block a thread sweeps per depth block (kept in L2), bytes.
const B_BLOCK_BYTES: usize = 512 * 1024;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 21;

/// Whether this CPU has the bf16 path (AVX-512F, BW for the rounding's masked stores, and
/// AVX-512 BF16).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::gemm::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 products are faster than f32 ones on this CPU, measured once per process.
///
/// Having AVX-512 BF16 is not enough: on AMD Zen 4 one `vdpbf16ps` does twice an f32 FMA's
/// work per cycle and the frozen products take about 0.55x the time, but on the Intel Xeons
/// seen here the products took 1.4-1.8x as long as f32 (`cargo test --release -p
/// deltatune-core bench_bf16 -- --ignored --nocapture`). So the first call times one
/// MiniLM-sized product ([512, 384]·[1536, 384]ᵀ, both threads) each way, best of five taking
/// turns (45-63 ms on that Xeon), and says yes only when bf16 takes at most 0.85x as long.
/// False without AVX-512 BF16, without a measurement.
pub fn bf16_pays() -> bool {
    if let Some(&decided) = DECIDED.get() {
        return decided && has_bf16();
    }
    bf16_time_ratio().is_some_and(|r| r <= BF16_MAX_TIME_RATIO)
}

static DECIDED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Fixes [`bf16_pays`]'s answer for this process instead of measuring: a resumed run takes the
/// decision its first process made, so a measurement on the other side of the threshold (a
/// loaded machine) cannot change the precision of its products half way, and the resumed
/// adapter is the same bytes. Only the first call counts; `true` still needs AVX-512 BF16.
pub fn decide_bf16(pays: bool) {
    let _ = DECIDED.set(pays);
}

/// The decision [`decide_bf16`] fixed, if any.
pub fn bf16_decided() -> Option<bool> {
    DECIDED.get().copied()
}

/// The most of f32's time a bf16 product may take for [`bf16_pays`] to say yes.
pub const BF16_MAX_TIME_RATIO: f64 = 0.85;

/// bf16's time over f32's for the product [`bf16_pays`] measures (once per process); `None`
/// without AVX-512 BF16.
pub fn bf16_time_ratio() -> Option<f64> {
    static RATIO: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *RATIO.get_or_init(|| {
        if has_bf16() {
            measure_bf16_against_f32().ok()
        } else {
            None
        }
    })
}

/// bf16's time over f32's for one product (see [`bf16_pays`]).
fn measure_bf16_against_f32() -> Result<f64> {
    let (m, k, n) = (512, 384, 1536);
    // Deterministic values in [-1, 1): a cheap hash of the index.
    let fill = |len: usize, salt: u32| -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i ^ salt).wrapping_mul(0x9e37_79b9).rotate_left(13);
                (h as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let dev = candle_core::Device::Cpu;
    let x = Tensor::from_vec(fill(m * k, 1), (m, k), &dev)?;
    let w = Tensor::from_vec(fill(n * k, 2), (n, k), &dev)?;
    let Some(packed) = Bf16Weight::pack(&w)? else {
        bail!("no AVX-512 BF16");
    };
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let t = std::time::Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let f32_product = || super::frozen_linear(&x, &w, None);
    let bf16_product = || bf16_linear(&x, &packed, None);
    // One untimed run each (page faults, thread start-up), then five timed in turns.
    f32_product()?;
    bf16_product()?;
    let (mut best_f32, mut best_bf16) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        best_f32 = best_f32.min(time(&f32_product)?);
        best_bf16 = best_bf16.min(time(&bf16_product)?);
    }
    Ok(best_bf16 / best_f32)
}

/// `v` rounded to bf16 (nearest, ties to even), as its 16 bits. NaN stays NaN.
pub(crate) fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// A `[k, n]` right-hand operand rounded to bf16 and packed for the kernel (see the module
/// docs for the layout).
struct Panels {
    k: usize,
    n: usize,
    /// Pairs of depths: `ceil(k / 2)`.
    kp: usize,
    data: Vec<u16>,
}

impl Panels {
    fn pack(b: MatRef<'_>, k: usize, n: usize) -> Self {
        let kp = k.div_ceil(2);
        let panel_len = kp * NR * 2;
        let mut data = vec![0u16; n.div_ceil(NR) * panel_len];
        data.par_chunks_mut(panel_len.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let j0 = p * NR;
                for (j, col) in (j0..n.min(j0 + NR)).enumerate() {
                    for r in 0..k {
                        let v = b.data[r * b.rs + col * b.cs];
                        panel[((r / 2) * NR + j) * 2 + r % 2] = to_bf16(v);
                    }
                }
            });
        Panels { k, n, kp, data }
    }
}

/// A frozen `[out, in]` f32 weight rounded to bf16 and packed for both products of a linear
/// layer. Built once per layer ([`Bf16Weight::pack`]); a step only reads it.
pub struct Bf16Weight {
    /// `Wᵀ` (`k = in`, `n = out`): the forward product's right operand.
    fwd: Panels,
    /// `W` (`k = out`, `n = in`): the input gradient's right operand.
    bwd: Panels,
}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weight[{}, {}]", self.fwd.n, self.fwd.k)
    }
}

impl Bf16Weight {
    /// `w` (`[out, in]`, f32, CPU, any layout) rounded and packed; `None` when this CPU lacks
    /// AVX-512 BF16 (the caller keeps the f32 products).
    pub fn pack(w: &Tensor) -> Result<Option<Arc<Self>>> {
        if !has_bf16() {
            return Ok(None);
        }
        let (out_f, in_f) = match w.dims() {
            &[o, i] => (o, i),
            d => bail!("bf16 weight: expected [out, in], got {d:?}"),
        };
        if w.dtype() != DType::F32 {
            bail!("bf16 weight: expected f32, got {:?}", w.dtype());
        }
        let (s, l) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(d)) = &*s else {
            bail!("bf16 weight: only CPU tensors are supported");
        };
        let d = &d[l.start_offset()..];
        let (s0, s1) = (l.stride()[0], l.stride()[1]);
        // W[o, i] = d[o * s0 + i * s1].
        let wt = MatRef {
            data: d,
            rs: s1,
            cs: s0,
        };
        let wm = MatRef {
            data: d,
            rs: s0,
            cs: s1,
        };
        Ok(Some(Arc::new(Bf16Weight {
            fwd: Panels::pack(wt, in_f, out_f),
            bwd: Panels::pack(wm, out_f, in_f),
        })))
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.fwd.n, self.fwd.k)
    }

    /// The rounded weight as f32 `[out, in]` (what the products multiply by).
    pub fn to_f32(&self) -> Vec<f32> {
        let (out_f, in_f) = self.dims2();
        let p = &self.fwd;
        let mut w = vec![0f32; out_f * in_f];
        for o in 0..out_f {
            let panel = &p.data[(o / NR) * p.kp * NR * 2..];
            for i in 0..in_f {
                w[o * in_f + i] = from_bf16(panel[((i / 2) * NR + o % NR) * 2 + i % 2]);
            }
        }
        w
    }
}

/// `a[m, k] · B (+ bias)` for a row-major f32 `a` and a packed `B` `[k, n]`, as a new
/// row-major `m × n` vector. Only called when [`has_bf16`] holds.
fn product(a: &[f32], m: usize, b: &Panels, bias: Option<&[f32]>) -> Vec<f32> {
    let (k, n, kp) = (b.k, b.n, b.kp);
    assert_eq!(a.len(), m * k, "bf16 product: a has the wrong length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bf16 product: bias has the wrong length");
    }
    if m == 0 || n == 0 || k == 0 {
        return match bias {
            Some(bias) if k == 0 => bias.repeat(m),
            _ => vec![0.0; m * n],
        };
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(has_bf16(), "bf16 product without AVX-512 BF16");
        let lda = 2 * kp;
        let mut ab: Vec<u16> = Vec::with_capacity(m * lda);
        let par = m * n * k >= PAR_MIN_MACS;
        {
            let spare = &mut ab.spare_capacity_mut()[..m * lda];
            let convert = |(src, dst): (&[f32], &mut [std::mem::MaybeUninit<u16>])| {
                // SAFETY: AVX-512 BF16 was checked; `dst` has room for `lda >= k` values.
                unsafe { x86::convert_row(src, dst) }
            };
            let rows = a.chunks_exact(k).zip(spare.chunks_exact_mut(lda));
            if par {
                rows.par_bridge().for_each(convert);
            } else {
                rows.for_each(convert);
            }
        }
        // SAFETY: every row was written in full (its `k` values and the zero padding).
        unsafe { ab.set_len(m * lda) };
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let threads = if par { rayon::current_num_threads() } else { 1 };
        let tasks = split(m, n, threads);
        let c_ptr = SendPtr(c.as_mut_ptr());
        let run = |&(r0, r1, c0, c1): &(usize, usize, usize, usize)| {
            let c_ptr = &c_ptr;
            // SAFETY: the CPU has AVX-512 BF16; the rectangles tile `c` (capacity m·n) without
            // overlapping; `ab` holds m rows of `lda` values and `b` the packed `[k, n]`.
            unsafe { x86::block(&ab, lda, b, bias, c_ptr.0, r0, r1, c0, c1) }
        };
        if tasks.len() > 1 {
            tasks.par_iter().for_each(run);
        } else {
            tasks.iter().for_each(run);
        }
        // SAFETY: the tasks wrote every element of the m × n output.
        unsafe { c.set_len(m * n) };
        c
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, kp);
        unreachable!("bf16 products need x86-64 with AVX-512 BF16")
    }
}

/// Pairs of depths per block: `kp` cut into equal parts of at most `KCP_MAX`.
fn kcp_of(kp: usize) -> usize {
    equal_part(kp, KCP_MAX)
}

/// Width of the column blocks of a task `width` columns wide: at most `B_BLOCK_BYTES` of `B`
/// per depth block (a pair of bf16 depths takes 4 bytes per column).
fn nc_of(width: usize, kcp: usize) -> usize {
    block_width(width, 4 * kcp * NR, B_BLOCK_BYTES)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{kcp_of, nc_of, Panels, MR, NR, NV};

    /// `src` (`k` values) rounded to bf16 into `dst` (`k` rounded up to even; the padding
    /// value is zero).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be available; `dst.len() >= src.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_row(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
        let (k, len) = (src.len(), dst.len());
        debug_assert!(len >= k);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut u16);
        let mut i = 0;
        while i < len {
            let left = (k.saturating_sub(i)).min(16);
            let v = _mm512_maskz_loadu_ps(((1u32 << left) - 1) as __mmask16, s.add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            let store = (len - i).min(16);
            _mm256_mask_storeu_epi16(d.add(i) as *mut i16, ((1u32 << store) - 1) as __mmask16, h);
            i += 16;
        }
    }

    /// How the kernel combines its tile with `C`:
    /// `C = (C if accumulate else 0) + acc (+ bias[j])`.
    #[derive(Clone, Copy)]
    struct Store {
        accumulate: bool,
        /// The bias of the tile's first column.
        bias: Option<*const f32>,
    }

    /// Rows `r0..r1`, columns `c0..c1` (`c0` a multiple of `NR`) of the `m × n` row-major `c`.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be available; `c` valid for writes of `m × n` values with
    /// `r1 <= m`, `c1 <= n = b.n`, the rectangle touched by no other thread; `a` holds `r1`
    /// rows of `lda = 2 * b.kp` values; `bias` (if any) `n` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        a: &[u16],
        lda: usize,
        b: &Panels,
        bias: Option<&[f32]>,
        c: *mut f32,
        r0: usize,
        r1: usize,
        c0: usize,
        c1: usize,
    ) {
        let (n, kp) = (b.n, b.kp);
        let kcp = kcp_of(kp);
        let nc = nc_of(c1 - c0, kcp);
        let panel_len = kp * NR * 2;
        let mut jc = c0;
        while jc < c1 {
            let jc_end = (jc + nc).min(c1);
            let mut pc = 0;
            while pc < kp {
                let kpe = kcp.min(kp - pc);
                let store = Store {
                    accumulate: pc > 0,
                    bias: bias.filter(|_| pc + kpe == kp).map(<[f32]>::as_ptr),
                };
                let mut ir = r0;
                while ir < r1 {
                    let mr = MR.min(r1 - ir);
                    let a_tile = a.as_ptr().add(ir * lda + 2 * pc);
                    let mut jr = jc;
                    while jr < jc_end {
                        let bp = b.data.as_ptr().add((jr / NR) * panel_len + pc * NR * 2);
                        let st = Store {
                            bias: store.bias.map(|p| p.wrapping_add(jr)),
                            ..store
                        };
                        kernel(
                            kpe,
                            a_tile,
                            lda,
                            mr,
                            bp,
                            c.add(ir * n + jr),
                            n,
                            NR.min(n - jr),
                            st,
                        );
                        jr += NR;
                    }
                    ir += MR;
                }
                pc += kpe;
            }
            jc = jc_end;
        }
    }

    /// One `MR × NR` tile over `kpe` pairs of depths, written to the `mr × nr` valid part of
    /// `c` (row stride `ldc`) as `store` says. Rows `mr..MR` re-read row `mr - 1` of `a` and
    /// are not stored; columns `nr..NR` are masked off.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kpe: usize,
        a: *const u16,
        lda: usize,
        mr: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        store: Store,
    ) {
        let mut rows = [a as *const i32; MR];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = a.add(i.min(mr - 1) * lda) as *const i32;
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut bp = b;
        for p in 0..kpe {
            let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(32 * v) as *const _,
                ));
            }
            for i in 0..MR {
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    rows[i].add(p).read_unaligned(),
                ));
                for v in 0..NV {
                    acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
                }
            }
            bp = bp.add(NR * 2);
        }
        let mut masks = [0 as __mmask16; NV];
        for (v, m) in masks.iter_mut().enumerate() {
            let left = nr.saturating_sub(16 * v).min(16);
            *m = ((1u32 << left) - 1) as __mmask16;
        }
        for (i, row_acc) in acc.iter().enumerate().take(mr) {
            let row = c.add(i * ldc);
            for v in 0..NV {
                let m = masks[v];
                // Masked-off vectors may lie past the end: no `add` on them.
                let p = row.wrapping_add(16 * v);
                let mut val = row_acc[v];
                if store.accumulate {
                    val = _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), val);
                }
                if let Some(bias) = store.bias {
                    val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, bias.wrapping_add(16 * v)));
                }
                _mm512_mask_storeu_ps(p, m, val);
            }
        }
    }
}

/// The custom op on `x`: forward `x·Wᵀ (+ frozen b)`, backward `dx = g·W`, both in bf16.
struct Bf16Linear {
    w: Arc<Bf16Weight>,
    /// `[out]`, fused into the forward; `None` when absent or trainable.
    b: Option<Tensor>,
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "deltatune-bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.w.dims2();
        let CpuStorage::F32(xd) = s else {
            bail!("bf16_linear: x must be f32, got {:?}", s.dtype());
        };
        let dims = l.dims();
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1 checked") = out_f;
        debug_assert_eq!(dims.last(), Some(&in_f));
        let x = contiguous(xd, l);
        let y = match &self.b {
            Some(b) => {
                with_slice::<f32, _>(b, |bias| Ok(product(&x, rows, &self.w.fwd, Some(bias))))?
            }
            None => product(&x, rows, &self.w.fwd, None),
        };
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, _) = self.w.dims2();
        let rows = arg.dims()[..arg.rank() - 1].iter().product::<usize>();
        let dx = with_slice::<f32, _>(grad, |g| {
            debug_assert_eq!(g.len(), rows * out_f);
            Ok(product(g, rows, &self.w.bwd, None))
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `y = x·Wᵀ + b` through a bf16-packed frozen weight (see the module docs). A trainable bias
/// gets its gradient (it is added outside the op); `W` never does.
///
/// # Shapes
/// * `x`: `[..., in]`, f32 on the CPU, any layout.
/// * `b`: `[out]`, f32.
/// * returns `[..., out]`.
pub fn bf16_linear(x: &Tensor, w: &Arc<Bf16Weight>, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2();
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        bail!(
            "bf16_linear: x must be an f32 CPU tensor, got {:?} on {:?}",
            x.dtype(),
            x.device()
        );
    }
    if x.rank() == 0 || x.dims().last() != Some(&in_f) {
        bail!(
            "bf16_linear: x {:?} does not end in the weight's input size {in_f} (weight [{out_f}, {in_f}])",
            x.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [out_f] || b.dtype() != DType::F32 {
            bail!(
                "bf16_linear: b must be f32 [{out_f}], got {:?} {:?}",
                b.dtype(),
                b.dims()
            );
        }
    }
    let (fused, added) = split_bias(b);
    let y = x.apply_op1(Bf16Linear {
        w: Arc::clone(w),
        b: fused,
    })?;
    add_unfused_bias(y, added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(seed: u64, dims: &[usize]) -> Tensor {
        let mut rng = crate::Rng::new(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn round(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| f64::from(from_bf16(to_bf16(v))))
            .collect()
    }

    /// `a[m, k] · b[k, n]` in f64 on bf16-rounded operands.
    fn reference(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    fn assert_close(got: &[f32], want: &[f64], scale: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            // f32 sums of up to ~2k terms of size ~1: well under 1e-4 relative to the scale.
            assert!(
                (f64::from(g) - w).abs() <= 2e-5 * scale,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// The start-up measurement exists exactly where the kernel does, is a sane ratio, and
    /// decides [`bf16_pays`].
    #[test]
    fn bf16_measurement_decides_the_default() {
        match bf16_time_ratio() {
            None => assert!(!has_bf16() && !bf16_pays()),
            Some(r) => {
                assert!(has_bf16());
                assert!(r.is_finite() && r > 0.05 && r < 20.0, "ratio {r}");
                assert_eq!(bf16_pays(), r <= BF16_MAX_TIME_RATIO);
            }
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Forward and input gradient against f64 products of the rounded operands, over shapes
    /// that hit every edge: odd depths, partial panels and tiles, one row, and products large
    /// enough to run on several threads and in several depth blocks.
    #[test]
    fn bf16_linear_matches_rounded_f64_products() {
        if crate::ops::lacks_cpu_feature(has_bf16(), "AVX-512 BF16") {
            return;
        }
        for (seed, (lead, out_f, in_f, bias)) in [
            (&[1usize][..], 5usize, 3usize, true),
            (&[3, 5][..], 48, 17, false),
            (&[2, 9][..], 50, 64, true),
            (&[130][..], 97, 513, true),
            (&[4, 128][..], 384, 384, false),
            (&[2, 100][..], 200, 1100, true),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = seed as u64;
            let m: usize = lead.iter().product();
            let mut xd = lead.to_vec();
            xd.push(in_f);
            let x = Var::from_tensor(&randn(10 + seed, &xd)).unwrap();
            let w = randn(20 + seed, &[out_f, in_f]);
            let b = bias.then(|| randn(30 + seed, &[out_f]));
            let packed = Bf16Weight::pack(&w).unwrap().unwrap();
            // The packed weight is W rounded, in both layouts.
            let wr = round(&w);
            let back: Vec<f64> = packed.to_f32().into_iter().map(f64::from).collect();
            assert_eq!(back, wr, "packed weight");

            let y = bf16_linear(x.as_tensor(), &packed, b.as_ref()).unwrap();
            let mut od = lead.to_vec();
            od.push(out_f);
            assert_eq!(y.dims(), &od[..]);
            let mut wt = vec![0f64; in_f * out_f];
            for o in 0..out_f {
                for i in 0..in_f {
                    wt[i * out_f + o] = wr[o * in_f + i];
                }
            }
            let mut want = reference(&round(x.as_tensor()), &wt, m, in_f, out_f);
            if let Some(b) = &b {
                let bv = b.to_vec1::<f32>().unwrap();
                for row in want.chunks_mut(out_f) {
                    for (o, bv) in row.iter_mut().zip(&bv) {
                        *o += f64::from(*bv);
                    }
                }
            }
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&got, &want, (in_f as f64).sqrt(), "forward");

            let g = randn(40 + seed, &od);
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).expect("x gets a gradient");
            let want = reference(&round(&g), &wr, m, out_f, in_f);
            let got = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&got, &want, (out_f as f64).sqrt(), "input gradient");
        }
    }

    /// The bf16 products differ from the f32 ones only by the rounding of the operands.
    #[test]
    fn bf16_linear_is_close_to_f32() {
        if crate::ops::lacks_cpu_feature(has_bf16(), "AVX-512 BF16") {
            return;
        }
        let x = randn(1, &[64, 384]);
        let w = (randn(2, &[256, 384]) * 0.05).unwrap();
        let b = randn(3, &[256]);
        let packed = Bf16Weight::pack(&w).unwrap().unwrap();
        let y16 = bf16_linear(&x, &packed, Some(&b)).unwrap();
        let y32 = super::super::frozen_linear(&x, &w, Some(&b)).unwrap();
        let rel = ((y16 - &y32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / y32
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap())
        .sqrt();
        assert!(rel > 0.0 && rel < 1e-2, "relative error {rel}");
    }

    #[test]
    fn trainable_bias_gets_its_gradient_and_bad_inputs_are_named() {
        if crate::ops::lacks_cpu_feature(has_bf16(), "AVX-512 BF16") {
            return;
        }
        let w = randn(5, &[8, 6]);
        let packed = Bf16Weight::pack(&w).unwrap().unwrap();
        let b = Var::from_tensor(&randn(6, &[8])).unwrap();
        let x = randn(7, &[3, 6]);
        let y = bf16_linear(&x, &packed, Some(b.as_tensor())).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gb, vec![3.0; 8]);
        let err = bf16_linear(&randn(8, &[3, 5]), &packed, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("input size 6"), "{err}");
        let err = bf16_linear(&x, &packed, Some(&randn(9, &[7])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[8]"), "{err}");
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test --release -p deltatune-core bench_bf16 -- --ignored --nocapture`: the
    /// products of a MiniLM layer at 16 x 128 tokens, bf16 against the f32 GEMM.
    #[test]
    #[ignore]
    fn bench_bf16() {
        if !has_bf16() {
            return;
        }
        let m = 2048;
        for (out_f, in_f) in [(384, 384), (1536, 384), (384, 1536)] {
            let w: Vec<f32> = (0..out_f * in_f)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect();
            let x: Vec<f32> = (0..m * in_f)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let g: Vec<f32> = (0..m * out_f)
                .map(|i| ((i % 83) as f32 - 41.0) / 83.0)
                .collect();
            let wt = Tensor::from_vec(w.clone(), (out_f, in_f), &candle_core::Device::Cpu).unwrap();
            let p = Bf16Weight::pack(&wt).unwrap().unwrap();
            let time = |f: &dyn Fn()| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    f();
                }
                t.elapsed().as_secs_f64() * 100.0
            };
            let xm = MatRef {
                data: &x,
                rs: in_f,
                cs: 1,
            };
            let gm = MatRef {
                data: &g,
                rs: out_f,
                cs: 1,
            };
            let wtm = MatRef {
                data: &w,
                rs: 1,
                cs: in_f,
            };
            let wm = MatRef {
                data: &w,
                rs: in_f,
                cs: 1,
            };
            let f32_fwd = time(&|| {
                super::super::gemm::sgemm(m, out_f, in_f, xm, wtm, None);
            });
            let f32_bwd = time(&|| {
                super::super::gemm::sgemm(m, in_f, out_f, gm, wm, None);
            });
            let b_fwd = time(&|| {
                product(&x, m, &p.fwd, None);
            });
            let b_bwd = time(&|| {
                product(&g, m, &p.bwd, None);
            });
            let gf = |ms: f64| 2.0 * (m * out_f * in_f) as f64 / ms / 1e6;
            println!(
                "[{out_f}, {in_f}] fwd f32 {f32_fwd:.2} ms ({:.0} GFLOP/s) bf16 {b_fwd:.2} ms ({:.0}); bwd f32 {f32_bwd:.2} ({:.0}) bf16 {b_bwd:.2} ({:.0})",
                gf(f32_fwd), gf(b_fwd), gf(f32_bwd), gf(b_bwd)
            );
        }
    }
}
