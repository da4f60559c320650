//! Shared CPU building blocks for the custom ops: the [`Real`] scalar trait
//! (f32/f64), a vectorisable `exp` for f32, accurate `erfc` for both widths,
//! lane-split reductions the compiler can turn into SIMD, and helpers that
//! turn any strided [`Layout`] into a contiguous slice.
//!
//! Everything here is `pub(crate)`: the public surface of the ops layer is
//! the functions re-exported from [`crate::ops`].

use std::borrow::Cow;

use candle_core::{bail, DType, Layout, Result, Storage, Tensor, WithDType};

/// Number of independent accumulators used by the reductions below. Eight
/// lanes fill an AVX register for f32 and let the compiler vectorise the
/// loops without reassociating floating-point adds on its own.
const LANES: usize = 8;

/// Whether the running CPU supports the AVX-512 subsets the widest kernel copies use (F, BW,
/// DQ, VL; std caches the probes).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::gemm::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the running CPU supports AVX2 and FMA (std caches the probe).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Define a kernel generic over `T: Real` that is compiled three times: for
/// the baseline target, with AVX2+FMA and with AVX-512, picking the widest
/// the CPU has at run time. The loops are written lane by lane, so every
/// copy computes the same numbers; only the vector width changes. The workspace builds for baseline
/// x86-64 (SSE2), where the 8-lane loops below only get 4-wide vectors;
/// the AVX2 copy roughly halves the time of the exp/erf-heavy kernels.
/// Helpers called from the body must be `#[inline(always)]` (or be inlined)
/// to be compiled with the wider instructions.
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        #[inline]
        $vis fn $name<$T: $crate::ops::kernels::Real>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn wide512<$T: $crate::ops::kernels::Real>($($arg: $ty),*) $(-> $ret)? $body
                if $crate::ops::kernels::has_avx512() {
                    // SAFETY: the CPU supports these AVX-512 subsets (checked just above).
                    return unsafe { wide512::<$T>($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide<$T: $crate::ops::kernels::Real>($($arg: $ty),*) $(-> $ret)? $body
                if $crate::ops::kernels::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { wide::<$T>($($arg),*) };
                }
            }
            #[inline(always)]
            fn narrow<$T: $crate::ops::kernels::Real>($($arg: $ty),*) $(-> $ret)? $body
            narrow::<$T>($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Floating-point element types the ops support (f32 and f64).
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;

    /// `e^self`; for f32 a branch-free polynomial that vectorises (see [`exp_f32`]).
    fn fexp(self) -> Self;
    fn fsqrt(self) -> Self;
    /// Standard normal CDF `Φ(self) = 0.5 * erfc(-self / √2)`.
    fn normal_cdf(self) -> Self;
    /// Standard normal density `φ(self) = e^(-self²/2) / √(2π)`.
    fn normal_pdf(self) -> Self;

    /// Larger of the two; a NaN in `other` is ignored (select form, vectorises).
    #[inline(always)]
    fn max_of(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;

    #[inline(always)]
    fn fexp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn fsqrt(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        0.5 * erfc_f32(-self * std::f32::consts::FRAC_1_SQRT_2)
    }
    #[inline(always)]
    fn normal_pdf(self) -> Self {
        exp_f32(-0.5 * self * self) * FRAC_1_SQRT_2PI as f32
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;

    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn fsqrt(self) -> Self {
        self.sqrt()
    }
    #[inline]
    fn normal_cdf(self) -> Self {
        0.5 * erfc_f64(-self * std::f64::consts::FRAC_1_SQRT_2)
    }
    #[inline]
    fn normal_pdf(self) -> Self {
        (-0.5 * self * self).exp() * FRAC_1_SQRT_2PI
    }
}

/// `e^x` for f32 without a libm call, written so that loops over it vectorise.
///
/// Cody–Waite range reduction `x = n·ln2 + r`, `|r| ≤ ln2/2` (ln2 split into
/// `355/512` plus a small correction so `n·C1` is exact), then a degree-7
/// Taylor polynomial for `e^r` (truncation error `r^8/8! < 6e-9` relative,
/// well below f32's 6e-8 epsilon) and `2^n` built from the exponent bits.
/// Measured against f64 `exp` in the tests: ≤ 2 ulp on [-87, 88].
/// Outside that range it returns 0 below -87 (true value < 1.7e-38) and +inf
/// above 88; the ops only call it with arguments ≤ ~1. NaN propagates.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Adding -0.0 is an exact identity the optimiser removes.
    exp_f32_parts(x, -0.0)
}

/// `e^(hi + lo)` where `hi + lo` is not rounded to one f32 first: `lo` is
/// added after the range reduction, so an argument that is large in
/// magnitude but known to more than f32 precision (as `-z²` in `erfc`) keeps
/// its accuracy. Same method and limits as [`exp_f32`].
#[inline(always)]
fn exp_f32_parts(hi: f32, lo: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 355.0 / 512.0; // 0.693359375, 9 significant bits
    const C2: f32 = (std::f64::consts::LN_2 - 355.0 / 512.0) as f32;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const P: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        (1.0 / 6.0f64) as f32,
        (1.0 / 24.0f64) as f32,
        (1.0 / 120.0f64) as f32,
        (1.0 / 720.0f64) as f32,
        (1.0 / 5040.0f64) as f32,
    ];
    let x = hi + lo;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    // For large |hi| this subtraction is exact (Sterbenz), so the only
    // rounding left is that of the small terms.
    let r = ((hi - n * C1) - n * C2) + lo;
    let p = P[0]
        + r * (P[1] + r * (P[2] + r * (P[3] + r * (P[4] + r * (P[5] + r * (P[6] + r * P[7]))))));
    // n is in [-126, 127] after the clamp, so n + 127 is a valid biased exponent.
    let bits = t
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127)
        << 23;
    let y = p * f32::from_bits(bits);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// Complementary error function for f32.
///
/// The Chebyshev-fitted formula `erfcc` of Numerical Recipes in C (2nd ed.,
/// §6.2, Press et al.): `erfc(z) ≈ t·exp(-z² + P(t))`, `t = 1/(1 + z/2)`,
/// with a fractional (relative) error below 1.2e-7 for every z ≥ 0, and
/// `erfc(-z) = 2 - erfc(z)`. Relative accuracy in the tail is what GELU's
/// `Φ(x) = erfc(-x/√2)/2` needs for negative x. `z²` is formed exactly as
/// `zh² + zl·(z + zh)` (`zh` = z with 12 significant bits) so that f32
/// rounding of the large exponent does not cost accuracy in the tail.
/// Measured against libm `erfc`: < 3e-7 relative up to z = 9. Branch-free;
/// vectorises.
#[inline(always)]
pub(crate) fn erfc_f32(x: f32) -> f32 {
    const C: [f32; 10] = [
        -1.265_512_23f64 as f32,
        1.000_023_68f64 as f32,
        0.374_091_96f64 as f32,
        0.096_784_18f64 as f32,
        -0.186_288_06f64 as f32,
        0.278_868_07f64 as f32,
        -1.135_203_98f64 as f32,
        1.488_515_87f64 as f32,
        -0.822_152_23f64 as f32,
        0.170_872_77f64 as f32,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = C[0]
        + t * (C[1]
            + t * (C[2]
                + t * (C[3]
                    + t * (C[4] + t * (C[5] + t * (C[6] + t * (C[7] + t * (C[8] + t * C[9]))))))));
    let zh = f32::from_bits(z.to_bits() & 0xffff_f000);
    let zl = z - zh;
    let ans = t * exp_f32_parts(-(zh * zh), poly - zl * (z + zh));
    if x >= 0.0 {
        ans
    } else {
        2.0 - ans
    }
}

/// Complementary error function for f64, within 1e-14 relative of libm's
/// `erfc` over [-6, 9] (checked in the tests).
///
/// * |x| < 0.75: `erfc = 1 - erf`, with erf from the all-positive series
///   `erf(x) = 2/√π · e^(-x²) · Σ 2ⁿ x^(2n+1) / (1·3···(2n+1))`
///   (Abramowitz & Stegun 7.1.6); no cancellation between terms, and
///   `erf < 0.72` there so `1 - erf` loses nothing.
/// * |x| ≥ 0.75: Laplace's continued fraction (A&S 7.1.14)
///   `erfc(x) = e^(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …))))`,
///   evaluated bottom-up from a fixed depth of 300 (converged to f64
///   precision from 0.75 up).
///
/// This is the slow, accurate path used for f64 (finite-difference tests).
pub(crate) fn erfc_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let c = if a < ERFC_SERIES_MAX {
        1.0 - erf_series(a)
    } else if a < 27.5 {
        erfc_continued_fraction(a)
    } else {
        0.0
    };
    if x < 0.0 {
        2.0 - c
    } else {
        c
    }
}

const ERFC_SERIES_MAX: f64 = 0.75;
const ERFC_CF_DEPTH: u32 = 300;

fn erf_series(a: f64) -> f64 {
    let two_a2 = 2.0 * a * a;
    let mut term = a;
    let mut sum = a;
    let mut n = 0.0;
    while term > 1e-17 * sum && n < 400.0 {
        n += 1.0;
        term *= two_a2 / (2.0 * n + 1.0);
        sum += term;
    }
    sum * (-a * a).exp() * std::f64::consts::FRAC_2_SQRT_PI
}

fn erfc_continued_fraction(a: f64) -> f64 {
    const DEPTH: u32 = ERFC_CF_DEPTH;
    let mut f = a;
    for k in (1..=DEPTH).rev() {
        f = a + (0.5 * f64::from(k)) / f;
    }
    (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
}

#[inline(always)]
fn combine<T: Real>(acc: [T; LANES]) -> T {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Sum of a slice with eight independent accumulators.
#[inline(always)]
pub(crate) fn sum<T: Real>(v: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut it = v.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = combine(acc);
    for &x in it.remainder() {
        s += x;
    }
    s
}

/// Dot product of two equally long slices, eight accumulators.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = combine(acc);
    for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x * y;
    }
    s
}

/// `Σ (v - c)²`, eight accumulators.
#[inline(always)]
pub(crate) fn sum_sq_dev<T: Real>(v: &[T], c: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut it = v.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            let d = ch[l] - c;
            acc[l] += d * d;
        }
    }
    let mut s = combine(acc);
    for &x in it.remainder() {
        let d = x - c;
        s += d * d;
    }
    s
}

/// Maximum of a slice (NaNs ignored; `-inf` for an empty slice).
#[inline(always)]
pub(crate) fn max<T: Real>(v: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let mut it = v.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] = acc[l].max_of(c[l]);
        }
    }
    let mut m = T::NEG_INFINITY;
    for a in acc {
        m = m.max_of(a);
    }
    for &x in it.remainder() {
        m = m.max_of(x);
    }
    m
}

/// Smallest number of rows of length `row_len` worth handing to one rayon
/// task (about 4k elements), so tiny tensors are not split into tiny jobs.
#[inline]
pub(crate) fn min_rows(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

/// A new vector of `n` values written chunk by chunk on the thread pool: `f(i, c)` gets chunk
/// `i` (`chunk` values, the last one shorter) and returns a value; the results come back in
/// chunk order. Each chunk is zeroed on its task's thread right before `f` writes it, while it
/// sits in cache: the alternative, `vec![0; n]` first, is one more single-threaded pass
/// through memory, which for cheap elementwise ops costs about as much as the op itself.
pub(crate) fn par_new_map<T, R, F>(n: usize, chunk: usize, f: F) -> (Vec<T>, Vec<R>)
where
    T: Real,
    R: Send,
    F: Fn(usize, &mut [T]) -> R + Sync + Send,
{
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(n);
    let results = v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| {
            for x in c.iter_mut() {
                x.write(T::ZERO);
            }
            // SAFETY: every element of `c` was initialised just above.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            f(i, c)
        })
        .collect();
    // SAFETY: the chunks cover `0..n` and each was initialised by its task.
    unsafe { v.set_len(n) };
    (v, results)
}

/// [`par_new_map`] without per-chunk results.
pub(crate) fn par_new<T, F>(n: usize, chunk: usize, f: F) -> Vec<T>
where
    T: Real,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    par_new_map(n, chunk, |i, c| f(i, c)).0
}

/// The elements of `layout` over `data`, in row-major order: borrowed when
/// the layout is contiguous (any start offset), gathered otherwise.
pub(crate) fn contiguous<'a, T: Copy>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Cow::Borrowed(&data[start..end]),
        None => Cow::Owned(gather(data, layout)),
    }
}

/// Copy a strided view into a fresh row-major vector (odometer over all but
/// the last dimension, a straight copy or strided loop over the last).
fn gather<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let strides = layout.stride();
    let n = layout.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let rank = dims.len();
    let mut base = layout.start_offset();
    if rank == 0 {
        out.push(data[base]);
        return out;
    }
    let last = dims[rank - 1];
    let last_stride = strides[rank - 1];
    let mut idx = vec![0usize; rank - 1];
    loop {
        if last_stride == 1 {
            out.extend_from_slice(&data[base..base + last]);
        } else {
            out.extend((0..last).map(|j| data[base + j * last_stride]));
        }
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            base += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            base -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// Run `f` on the row-major elements of a CPU tensor of element type `T`.
pub(crate) fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let cpu = match &*storage {
        Storage::Cpu(cpu) => cpu,
        _ => bail!("deltatune ops: only CPU tensors are supported"),
    };
    let data = contiguous(T::cpu_storage_as_slice(cpu)?, layout);
    f(&data)
}

/// Fail with a clear error unless `t` is f32 or f64 (the dtypes the ops implement).
pub(crate) fn check_float(t: &Tensor, op: &'static str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, op).bt()),
    }
}

/// Fail unless `t` has the same dtype as `reference`.
pub(crate) fn check_same_dtype(
    reference: &Tensor,
    t: &Tensor,
    what: &str,
    op: &'static str,
) -> Result<()> {
    if reference.dtype() != t.dtype() {
        bail!(
            "{op}: {what} has dtype {:?} but the input is {:?}",
            t.dtype(),
            reference.dtype()
        );
    }
    Ok(())
}

/// Whether backward should produce a gradient for `t`.
#[inline]
pub(crate) fn wants_grad(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

/// A linear layer's bias split into what its op fuses (a frozen bias) and what is added after
/// the op with `broadcast_add`, so that candle differentiates it (a trainable bias).
pub(crate) fn split_bias(b: Option<&Tensor>) -> (Option<Tensor>, Option<&Tensor>) {
    match b {
        Some(b) if wants_grad(b) => (None, Some(b)),
        b => (b.cloned(), None),
    }
}

/// `y` plus the trainable bias [`split_bias`] left outside the op.
pub(crate) fn add_unfused_bias(y: Tensor, added: Option<&Tensor>) -> Result<Tensor> {
    match added {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
