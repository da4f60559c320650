//! f32 matrix product with an AVX-512 microkernel for the linear-layer
//! products of [`super::frozen_linear`]: `x·Wᵀ` (forward), `g·W` (input
//! gradient) and, for a trainable `W`, `gᵀ·x` (weight gradient).
//!
//! candle's CPU matmul goes through the `gemm` crate, which on stable Rust
//! only has AVX2 kernels (its AVX-512 ones sit behind a nightly feature), so
//! on AVX-512 machines it runs at about half the FMA throughput the CPU
//! offers. [`sgemm`] computes `C = A·B (+ bias)` for
//!
//! * `A` `[m, k]` row-major with a row stride (read in place, not packed),
//! * `B` `[k, n]` with arbitrary row/column strides, so `Wᵀ` (forward) and
//!   `W` (backward) are both views of the `[out, in]` weight storage,
//! * `C` `[m, n]` a new row-major vector, every element written once per
//!   `KC` block (never zero-filled first).
//!
//! Design (Goto/BLIS-style):
//!
//! * microkernel `MR × NR` = 8 × 48: 24 zmm accumulators; per step of `k`
//!   three vector loads of packed `B` (64-byte aligned), eight broadcasts
//!   of `A` (one per row, straight from the rows of `A`) and 24 FMAs. It
//!   runs at ~88 % of the FMA peak with its operands in L1;
//! * threads: the output is cut into one rectangle per rayon thread — whole
//!   48-wide column panels when they split evenly (each thread then packs
//!   only its own columns of `B`), whole row ranges otherwise — so there is
//!   one task per thread and no per-tile task overhead; small products run
//!   on the calling thread;
//! * blocking: each thread walks its columns in `NC`-wide blocks and `k` in
//!   `KC`-deep blocks, packs that `KC × NC` block of `B` (≤ 768 KiB, stays
//!   in L2) into `KC × NR` row-major panels in a per-thread buffer reused
//!   across calls, then for each `MR`-row sliver of `A` (`MR × KC`, stays in
//!   L1) sweeps the kernel across the block's panels;
//! * edges: panels are zero-padded to `NR` columns and the kernel stores
//!   the valid columns with masked loads/stores; a partial last row tile
//!   re-reads its last valid row of `A` and stores only the valid rows;
//! * the first `KC` block overwrites `C`, later ones accumulate into it, and
//!   the bias is added with the last one, so `x·Wᵀ + b` rounds exactly as
//!   the product followed by a separate bias add.
//!
//! The fast path is taken only when the CPU reports AVX-512F at run time
//! (the workspace targets baseline x86-64); [`sgemm`] returns `None`
//! otherwise and the caller uses candle's matmul.

// Everything but `sgemm` and `has_avx512` serves the x86-64 kernel only.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

/// Rows of the microkernel tile (broadcast operand).
const MR: usize = 8;
/// zmm vectors per tile row.
const NV: usize = 3;
/// Columns of the microkernel tile.
const NR: usize = 16 * NV;
/// Largest depth of one packed block of `B`.
const KC_MAX: usize = 512;
/// Largest size of one packed `KC × NC` block of `B` (held in L2), bytes.
const B_BLOCK_BYTES: usize = 768 * 1024;
/// Below this many multiply-adds the product runs on the calling thread.
const PAR_MIN_FMAS: usize = 1 << 21;

/// Whether the AVX-512 path is usable on this CPU (std caches the probe).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A strided read-only matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `a[m, k] · b[k, n] (+ bias[n])` as a new row-major `m × n` vector.
///
/// `a` must have unit column stride (`a.cs == 1`). Returns `None` when the
/// CPU lacks AVX-512F; the caller then falls back to another
/// implementation.
///
/// # Panics
/// If a view is too short for its shape and strides or `bias.len() != n`.
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    bias: Option<&[f32]>,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return Some(sgemm_avx512(m, n, k, a, b, bias));
    }
    let _ = (m, n, k, a, b, bias);
    None
}

/// [`sgemm`] once AVX-512F is known to be available.
#[cfg(target_arch = "x86_64")]
fn sgemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert!(has_avx512());
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "sgemm: bias has the wrong length");
    }
    if m == 0 || n == 0 || k == 0 {
        return match bias {
            Some(bias) if k == 0 => bias.repeat(m),
            _ => vec![0.0; m * n],
        };
    }
    assert_eq!(a.cs, 1, "sgemm: a must have unit column stride");
    assert!(
        (m - 1) * a.rs + k <= a.data.len(),
        "sgemm: a is too short for its shape"
    );
    assert!(
        (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
        "sgemm: b is too short for its shape"
    );
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let threads = if m * n * k >= PAR_MIN_FMAS {
        rayon::current_num_threads()
    } else {
        1
    };
    let tasks = split(m, n, threads);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let run = |&(r0, r1, c0, c1): &Rect| {
        let c_ptr = &c_ptr;
        // SAFETY: AVX-512F is available (the caller checked); the tasks
        // cover disjoint rectangles that tile `c` (capacity m·n), and the
        // extents of `a`, `b` and `bias` were checked above.
        unsafe { x86::block(k, n, a, b, bias, c_ptr.0, r0, r1, c0, c1) }
    };
    if tasks.len() > 1 {
        use rayon::prelude::*;
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    // SAFETY: the tasks wrote every element of the m × n output.
    unsafe { c.set_len(m * n) };
    c
}

/// The transpose (`cols × rows`, row-major) of a row-major `rows × cols`
/// matrix, copied in 16 × 16 tiles so reads and writes both stay in cache.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 16;
    assert_eq!(src.len(), rows * cols, "transpose: wrong length");
    let mut dst = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(T) {
        let r1 = (r0 + T).min(rows);
        for c0 in (0..cols).step_by(T) {
            let c1 = (c0 + T).min(cols);
            for r in r0..r1 {
                let row = &src[r * cols + c0..r * cols + c1];
                for (c, &v) in (c0..c1).zip(row) {
                    dst[c * rows + r] = v;
                }
            }
        }
    }
    dst
}

/// A raw output pointer shared by tasks that write disjoint parts of it.
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: only used for disjoint writes from the tasks of one product (`sgemm`, the bf16
// product), each task writing its own rectangle.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// `(row0, row1, col0, col1)` of one task's part of the output.
type Rect = (usize, usize, usize, usize);

/// Split the `m × n` output into at most `threads` rectangles. Column
/// ranges of whole `NR`-wide panels when they divide evenly enough (each
/// task then packs only its part of `B`), whole row ranges otherwise.
pub(super) fn split(m: usize, n: usize, threads: usize) -> Vec<Rect> {
    let panels = n.div_ceil(NR);
    let row_tiles = m.div_ceil(MR);
    if threads <= 1 || (panels < threads && row_tiles < 2) {
        return vec![(0, m, 0, n)];
    }
    if panels.is_multiple_of(threads) || panels >= 4 * threads {
        let (per, extra) = (panels / threads, panels % threads);
        let mut start = 0;
        (0..threads)
            .map(|t| {
                let end = start + per + usize::from(t < extra);
                let r = (0, m, (start * NR).min(n), (end * NR).min(n));
                start = end;
                r
            })
            .filter(|r| r.2 < r.3)
            .collect()
    } else {
        let per = row_tiles.div_ceil(threads);
        (0..threads)
            .map(|t| ((t * per * MR).min(m), ((t + 1) * per * MR).min(m), 0, n))
            .filter(|r| r.0 < r.1)
            .collect()
    }
}

/// The size of each part when `n > 0` is cut into equal parts of at most `max`.
pub(super) fn equal_part(n: usize, max: usize) -> usize {
    n.div_ceil(n.div_ceil(max))
}

/// Width of the column blocks of a task `width` columns wide: a multiple of `NR`, equal parts,
/// each at most `max_bytes` of packed `B` where one `NR`-wide panel takes `panel_bytes`.
pub(super) fn block_width(width: usize, panel_bytes: usize, max_bytes: usize) -> usize {
    let max_panels = (max_bytes / panel_bytes).max(1);
    let panels = width.div_ceil(NR);
    let blocks = panels.div_ceil(max_panels);
    panels.div_ceil(blocks) * NR
}

/// Depth of the packed blocks: `k` cut into equal parts of at most `KC_MAX`.
fn kc_of(k: usize) -> usize {
    equal_part(k, KC_MAX)
}

/// Width of the column blocks of a task `width` columns wide: at most `B_BLOCK_BYTES` of
/// packed `B` (f32).
fn nc_of(width: usize, kc: usize) -> usize {
    block_width(width, 4 * kc * NR, B_BLOCK_BYTES)
}

/// Pack rows `pc..pc + kce` and columns `j0..j0 + nr` of `b` into `dst`
/// (`kce × NR`, row-major; columns `nr..NR` are zeroed).
fn pack_b_panel(b: MatRef<'_>, pc: usize, kce: usize, j0: usize, nr: usize, dst: &mut [f32]) {
    let dst = &mut dst[..kce * NR];
    if nr < NR {
        dst.fill(0.0);
    }
    if b.cs == 1 {
        for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
            let s = (pc + p) * b.rs + j0;
            d[..nr].copy_from_slice(&b.data[s..s + nr]);
        }
    } else if b.rs == 1 {
        // Transposing copy in 16-deep strips so the writes stay in L1.
        const STRIP: usize = 16;
        let mut p0 = 0;
        while p0 < kce {
            let depth = STRIP.min(kce - p0);
            let d = &mut dst[p0 * NR..(p0 + depth) * NR];
            for jj in 0..nr {
                let s = pc + p0 + (j0 + jj) * b.cs;
                for (q, &v) in b.data[s..s + depth].iter().enumerate() {
                    d[q * NR + jj] = v;
                }
            }
            p0 += depth;
        }
    } else {
        for p in 0..kce {
            for jj in 0..nr {
                dst[p * NR + jj] = b.data[(pc + p) * b.rs + (j0 + jj) * b.cs];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::{kc_of, nc_of, pack_b_panel, MatRef, MR, NR, NV};

    thread_local! {
        /// Per-thread buffer for packed blocks of `B`, kept between calls
        /// (so it is not allocated and page-faulted in every call).
        static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Compute rows `r0..r1`, columns `c0..c1` of the `m × n` row-major
    /// output `c` (`c0` a multiple of `NR`), writing every element.
    ///
    /// # Safety
    /// AVX-512F must be available, `c` must be valid for writes of `m × n`
    /// values with `r1 <= m`, `c1 <= n`, no other thread may touch that
    /// rectangle, `a` must cover `r1` rows of `k` values, `b` `k` rows of
    /// `n` values and `bias` (if any) `n` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        k: usize,
        n: usize,
        a: MatRef<'_>,
        b: MatRef<'_>,
        bias: Option<&[f32]>,
        c: *mut f32,
        r0: usize,
        r1: usize,
        c0: usize,
        c1: usize,
    ) {
        let kc = kc_of(k);
        let nc = nc_of(c1 - c0, kc);
        let len = kc * nc + 16;
        let run = |buf: &mut Vec<f32>| {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            let off = buf.as_ptr().align_offset(64).min(16);
            let packed = &mut buf[off..off + kc * nc];
            // SAFETY: forwarded from the caller.
            unsafe { block_with(k, n, a, b, bias, c, r0, r1, c0, c1, kc, nc, packed) }
        };
        // The buffer is only borrowed here, with no rayon call inside, so
        // no other task can run on this thread meanwhile; fall back to a
        // fresh buffer rather than panic if that ever changes.
        PACK.with(|p| match p.try_borrow_mut() {
            Ok(mut buf) => run(&mut buf),
            Err(_) => run(&mut Vec::new()),
        });
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn block_with(
        k: usize,
        n: usize,
        a: MatRef<'_>,
        b: MatRef<'_>,
        bias: Option<&[f32]>,
        c: *mut f32,
        r0: usize,
        r1: usize,
        c0: usize,
        c1: usize,
        kc: usize,
        nc: usize,
        packed: &mut [f32],
    ) {
        let ap = a.data.as_ptr();
        let mut jc = c0;
        while jc < c1 {
            let jc_end = (jc + nc).min(c1);
            let mut pc = 0;
            while pc < k {
                let kce = kc.min(k - pc);
                for (t, panel) in packed[..(jc_end - jc).div_ceil(NR) * kce * NR]
                    .chunks_exact_mut(kce * NR)
                    .enumerate()
                {
                    let j0 = jc + t * NR;
                    pack_b_panel(b, pc, kce, j0, NR.min(n - j0), panel);
                }
                // The bias goes in with the last block, after the whole sum.
                let store = Store {
                    accumulate: pc > 0,
                    bias: bias.filter(|_| pc + kce == k).map(<[f32]>::as_ptr),
                };
                let mut ir = r0;
                while ir < r1 {
                    let mr = MR.min(r1 - ir);
                    let a_tile = ap.add(ir * a.rs + pc);
                    let mut jr = jc;
                    while jr < jc_end {
                        kernel(
                            kce,
                            a_tile,
                            a.rs,
                            mr,
                            packed.as_ptr().add((jr - jc) * kce),
                            c.add(ir * n + jr),
                            n,
                            NR.min(n - jr),
                            store.offset(jr),
                        );
                        jr += NR;
                    }
                    ir += MR;
                }
                pc += kce;
            }
            jc = jc_end;
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

    impl Store {
        #[inline(always)]
        fn offset(self, j: usize) -> Store {
            Store {
                bias: self.bias.map(|p| p.wrapping_add(j)),
                ..self
            }
        }
    }

    /// One `MR × NR` tile: `acc[i][j] = Σ_p a[i * lda + p] · b[p * NR + j]`
    /// over `kc` steps, written to the `mr × nr` valid part of `c` (row
    /// stride `ldc`) as `store` says. Rows `mr..MR` re-read row `mr - 1` of
    /// `a` and are not stored; columns `nr..NR` are masked off.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        lda: usize,
        mr: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        store: Store,
    ) {
        let mut rows = [a; MR];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = a.add(i.min(mr - 1) * lda);
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut bp = b;
        for p in 0..kc {
            let mut bv = [_mm512_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm512_loadu_ps(bp.add(16 * v));
            }
            for i in 0..MR {
                let av = _mm512_set1_ps(*rows[i].add(p));
                for v in 0..NV {
                    acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
                }
            }
            bp = bp.add(NR);
        }
        let mut masks = [0 as __mmask16; NV];
        for v in 0..NV {
            let left = nr.saturating_sub(16 * v).min(16);
            masks[v] = ((1u32 << left) - 1) as __mmask16;
        }
        for i in 0..mr {
            let row = c.add(i * ldc);
            for v in 0..NV {
                let m = masks[v];
                // Masked-off vectors may lie past the end: no `add` on them.
                let p = row.wrapping_add(16 * v);
                let mut val = acc[i][v];
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
