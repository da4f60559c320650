//! Tests for the ops layer: forward against composite candle references
//! (f32), backward against central finite differences (f64), gradient
//! routing for frozen/trainable parameters, masking, strided inputs and
//! graph continuity. The `bench_*` tests are `#[ignore]`d timings.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::kernels::{erfc_f32, erfc_f64, exp_f32};
use super::*;

// ---------------------------------------------------------------- helpers

/// Small seeded generator (64-bit LCG, Knuth's MMIX constants) so inputs are
/// reproducible; candle's CPU RNG cannot be seeded.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        let mut g = Lcg(seed ^ 0x9e37_79b9_7f4a_7c15);
        g.next_u64();
        g
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let mut g = Lcg::new(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| g.normal()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    a.to_dtype(DType::F64)
        .unwrap()
        .sub(&b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max |diff| = {d:e} > {tol:e}");
}

fn var(t: &Tensor) -> Tensor {
    Var::from_tensor(t).unwrap().as_tensor().clone()
}

// ----------------------------------------------------- composite references

fn ref_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn ref_layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(g)?
        .broadcast_add(b)
}

fn ref_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn ref_attention(s: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, tk) = bias.dims2()?;
    ref_softmax(&(s * scale)?.broadcast_add(&bias.reshape((b, 1, 1, tk))?)?)
}

fn ref_gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Additive key mask `[B, Tk]`: 0 to keep, `neg` for the last `masked[b]` keys.
fn key_mask(b: usize, tk: usize, masked: &[usize], neg: f64, dtype: DType) -> Tensor {
    let mut v = vec![0f64; b * tk];
    for (bi, &m) in masked.iter().enumerate() {
        for k in tk - m..tk {
            v[bi * tk + k] = neg;
        }
    }
    Tensor::from_vec(v, (b, tk), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

// ------------------------------------------------------- finite differences

type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Check the gradients of `loss = Σ f(inputs) ⊙ r` (r fixed, random) with
/// respect to `inputs[i]` for every `i` in `wrt` against central differences
/// (f64, h = 1e-6). Returns the worst relative error seen.
fn check_fd(inputs: &[Tensor], wrt: &[usize], f: &Op, seed: u64) -> f64 {
    const H: f64 = 1e-6;
    const TOL: f64 = 1e-6;
    let tracked: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| if wrt.contains(&i) { var(t) } else { t.clone() })
        .collect();
    let y = f(&tracked).unwrap();
    let r = randn(seed, y.dims(), DType::F64);
    let loss = y.mul(&r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let eval = |i: usize, data: &[f64]| -> f64 {
        let mut ins = inputs.to_vec();
        ins[i] = Tensor::from_slice(data, inputs[i].dims(), &Device::Cpu).unwrap();
        f(&ins)
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut worst = 0f64;
    for &i in wrt {
        let g = grads
            .get(&tracked[i])
            .unwrap_or_else(|| panic!("no gradient for input {i}"));
        assert_eq!(g.dims(), inputs[i].dims());
        let analytic = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for j in 0..base.len() {
            let mut p = base.clone();
            p[j] += H;
            let mut m = base.clone();
            m[j] -= H;
            let num = (eval(i, &p) - eval(i, &m)) / (2.0 * H);
            let err = (analytic[j] - num).abs() / num.abs().max(1.0);
            worst = worst.max(err);
            assert!(
                err <= TOL,
                "input {i} element {j}: analytic {} vs numeric {num} (rel err {err:e})",
                analytic[j]
            );
        }
    }
    worst
}

// ------------------------------------------------------------ math kernels

#[test]
fn exp_f32_is_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let got = f64::from(exp_f32(x));
        let want = f64::from(x).exp();
        worst = worst.max((got - want).abs() / want);
        x += 0.001_3;
    }
    assert!(worst < 2.5e-7, "exp_f32 worst relative error {worst:e}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-1e4), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(1e4), f32::INFINITY);
}

#[test]
fn erfc_matches_libm() {
    let mut worst32 = 0f64;
    let mut worst64 = 0f64;
    let mut x = -6.0f64;
    while x <= 9.0 {
        let want = candle_core::cpu::erf::erfc_f64(x);
        let got64 = erfc_f64(x);
        worst64 = worst64.max((got64 - want).abs() / want);
        let got32 = f64::from(erfc_f32(x as f32));
        let want32 = candle_core::cpu::erf::erfc_f64(f64::from(x as f32));
        worst32 = worst32.max((got32 - want32).abs() / want32);
        x += 0.000_97;
    }
    // NR erfcc is documented at < 1.2e-7 relative; allow f32 rounding on top.
    assert!(worst32 < 5e-7, "erfc_f32 worst relative error {worst32:e}");
    assert!(worst64 < 1e-14, "erfc_f64 worst relative error {worst64:e}");
    assert!(erfc_f32(f32::NAN).is_nan());
    assert!(erfc_f64(f64::NAN).is_nan());
    assert_eq!(erfc_f64(40.0), 0.0);
    assert_eq!(erfc_f64(-40.0), 2.0);
}

// ----------------------------------------------------- (a) forward, f32

#[test]
fn forward_matches_composite_f32() {
    let f = DType::F32;
    // frozen_linear: 3-D input, with and without bias.
    let x = randn(1, &[2, 5, 24], f);
    let w = randn(2, &[13, 24], f);
    let b = randn(3, &[13], f);
    assert_close(
        &frozen_linear(&x, &w, Some(&b)).unwrap(),
        &ref_linear(&x, &w, Some(&b)).unwrap(),
        1e-5,
        "frozen_linear+b",
    );
    assert_close(
        &frozen_linear(&x, &w, None).unwrap(),
        &ref_linear(&x, &w, None).unwrap(),
        1e-5,
        "frozen_linear",
    );
    // layer_norm, row lengths with and without a remainder of 8.
    for d in [8, 19, 384] {
        let x = (randn(4, &[3, 7, d], f) * 3.0)
            .unwrap()
            .affine(1.0, 2.5)
            .unwrap();
        let g = randn(5, &[d], f);
        let b = randn(6, &[d], f);
        assert_close(
            &layer_norm(&x, &g, &b, 1e-12).unwrap(),
            &ref_layer_norm(&x, &g, &b, 1e-12).unwrap(),
            1e-5,
            "layer_norm",
        );
    }
    // softmax
    let x = (randn(7, &[4, 3, 37], f) * 4.0).unwrap();
    assert_close(
        &softmax_last_dim(&x).unwrap(),
        &ref_softmax(&x).unwrap(),
        1e-6,
        "softmax",
    );
    // attention softmax
    let s = (randn(8, &[2, 3, 5, 11], f) * 5.0).unwrap();
    let mask = key_mask(2, 11, &[0, 4], -1e4, f);
    assert_close(
        &attention_softmax(&s, &mask, 0.125).unwrap(),
        &ref_attention(&s, &mask, 0.125).unwrap(),
        1e-6,
        "attention_softmax",
    );
    // gelu, including the tails.
    let x = (randn(9, &[5, 203], f) * 3.0).unwrap();
    assert_close(&gelu_erf(&x).unwrap(), &ref_gelu(&x).unwrap(), 1e-5, "gelu");
}

/// Backward of the custom ops equals candle's composite backward in f32,
/// and a Var upstream of each op receives a gradient (the graph is not cut).
#[test]
fn graph_is_not_cut_and_backward_matches_composite_f32() {
    let f = DType::F32;
    type Pair = (Box<Op>, Box<Op>, Vec<usize>);
    let cases: Vec<Pair> = vec![
        (
            Box::new(|t: &[Tensor]| frozen_linear(&t[0], &t[1], Some(&t[2]))),
            Box::new(|t: &[Tensor]| ref_linear(&t[0], &t[1], Some(&t[2]))),
            vec![2, 6, 16, 16, 16],
        ),
        (
            Box::new(|t: &[Tensor]| layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            Box::new(|t: &[Tensor]| ref_layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            vec![2, 6, 16, 16, 16],
        ),
        (
            Box::new(|t: &[Tensor]| softmax_last_dim(&t[0])),
            Box::new(|t: &[Tensor]| ref_softmax(&t[0])),
            vec![2, 6, 16, 16, 16],
        ),
        (
            Box::new(|t: &[Tensor]| gelu_erf(&t[0])),
            Box::new(|t: &[Tensor]| ref_gelu(&t[0])),
            vec![2, 6, 16, 16, 16],
        ),
    ];
    for (k, (op, reference, dims)) in cases.iter().enumerate() {
        let (b, t, d, out) = (dims[0], dims[1], dims[2], dims[3]);
        let v = var(&randn(10 + k as u64, &[b, t, d], f));
        // Upstream computation on the Var: x depends on v through ordinary ops.
        let x = v.affine(1.5, 0.25).unwrap().tanh().unwrap();
        let w = randn(20, &[out, d], f);
        let g = randn(21, &[d], f);
        let bb = randn(22, &[d], f);
        let ins = if k == 0 {
            vec![x.clone(), w, randn(23, &[out], f)]
        } else {
            vec![x.clone(), g, bb]
        };
        let y = op(&ins).unwrap();
        let y_ref = reference(&ins).unwrap();
        assert_close(&y, &y_ref, 1e-5, "forward");
        let r = randn(30, y.dims(), f);
        let gv = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let gv_ref = y_ref
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = gv.get(&v).expect("upstream Var received no gradient");
        let want = gv_ref.get(&v).unwrap();
        assert!(max_abs_diff(got, &got.zeros_like().unwrap()) > 0.0);
        assert_close(got, want, 1e-4, "upstream gradient");
    }
    // attention_softmax: scores come from a Var through a matmul.
    let q = var(&randn(40, &[2, 3, 5, 8], f));
    let kk = randn(41, &[2, 3, 7, 8], f);
    let s = q.matmul(&kk.t().unwrap()).unwrap();
    let mask = key_mask(2, 7, &[2, 0], -1e4, f);
    let y = attention_softmax(&s, &mask, 0.3).unwrap();
    let y_ref = ref_attention(&s, &mask, 0.3).unwrap();
    let r = randn(42, y.dims(), f);
    let g1 = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = y_ref
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        g1.get(&q).unwrap(),
        g2.get(&q).unwrap(),
        1e-5,
        "attention upstream",
    );
}

// ------------------------------------------- (b) backward vs FD, f64

#[test]
fn frozen_linear_fd_f64() {
    let d = DType::F64;
    let x = randn(50, &[2, 3, 6], d);
    let w = randn(51, &[5, 6], d);
    let b = randn(52, &[5], d);
    // x (custom op path) and a trainable bias (broadcast_add path).
    check_fd(
        &[x.clone(), w.clone(), b.clone()],
        &[0, 2],
        &|t| frozen_linear(&t[0], &t[1], Some(&t[2])),
        53,
    );
    // Frozen bias fused into the op.
    check_fd(
        &[x.clone(), w.clone(), b.clone()],
        &[0],
        &|t| frozen_linear(&t[0], &t[1], Some(&t[2])),
        54,
    );
    // Trainable weight falls back to plain candle ops: both gradients.
    check_fd(
        &[x, w, b],
        &[0, 1, 2],
        &|t| frozen_linear(&t[0], &t[1], Some(&t[2])),
        55,
    );
}

#[test]
fn layer_norm_fd_f64() {
    let d = DType::F64;
    for (k, dim) in [5usize, 11, 16].into_iter().enumerate() {
        let x = randn(60 + k as u64, &[2, 3, dim], d)
            .affine(2.0, 0.7)
            .unwrap();
        let g = randn(61, &[dim], d);
        let b = randn(62, &[dim], d);
        check_fd(
            &[x.clone(), g.clone(), b.clone()],
            &[0, 1, 2],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            63,
        );
        // Only x differentiable (frozen affine).
        check_fd(
            &[x, g, b],
            &[0],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            64,
        );
    }
}

#[test]
fn softmax_fd_f64() {
    let x = randn(70, &[3, 4, 9], DType::F64).affine(2.0, 0.0).unwrap();
    check_fd(&[x], &[0], &|t| softmax_last_dim(&t[0]), 71);
}

#[test]
fn attention_softmax_fd_f64() {
    let s = randn(72, &[2, 2, 3, 6], DType::F64)
        .affine(3.0, 0.0)
        .unwrap();
    // Second example: every key masked (finite mask), first: two masked.
    let mask = key_mask(2, 6, &[2, 6], -1e4, DType::F64);
    check_fd(
        &[s, mask],
        &[0],
        &|t| attention_softmax(&t[0], &t[1], 0.35),
        73,
    );
}

#[test]
fn gelu_fd_f64() {
    let x = randn(74, &[4, 13], DType::F64).affine(2.5, 0.0).unwrap();
    check_fd(&[x], &[0], &|t| gelu_erf(&t[0]), 75);
}

// ----------------------------------------- (c), (d) gradient routing

#[test]
fn frozen_linear_gradient_routing() {
    let f = DType::F32;
    let x = var(&randn(80, &[4, 3, 8], f));
    let w = randn(81, &[6, 8], f);
    let b_plain = randn(82, &[6], f);
    let b_var = var(&b_plain);
    let r = randn(83, &[4, 3, 6], f);

    // Plain w, Var bias: bias and x get gradients, w does not.
    let y = frozen_linear(&x, &w, Some(&b_var)).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none(), "frozen weight received a gradient");
    let gb = grads.get(&b_var).expect("Var bias received no gradient");
    assert_close(gb, &r.sum((0, 1)).unwrap(), 1e-5, "bias gradient");
    let gx = grads.get(&x).expect("x received no gradient");
    assert_close(gx, &r.broadcast_matmul(&w).unwrap(), 1e-5, "x gradient");

    // Plain w, plain bias: only x.
    let y = frozen_linear(&x, &w, Some(&b_plain)).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    assert!(grads.get(&b_plain).is_none());
    assert!(grads.get(&x).is_some());

    // Var w: falls back to candle ops, w and x both get gradients.
    let w_var = var(&w);
    let y = frozen_linear(&x, &w_var, None).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gw = grads.get(&w_var).expect("Var weight received no gradient");
    let want = r
        .reshape((12, 6))
        .unwrap()
        .t()
        .unwrap()
        .matmul(&x.reshape((12, 8)).unwrap())
        .unwrap();
    assert_close(gw, &want, 1e-4, "weight gradient");

    // w = w0 + delta with a Var delta (tracks an op): delta gets a gradient.
    let delta = var(&randn(84, &[6, 8], f).affine(0.01, 0.0).unwrap());
    let w_eff = w.add(&delta).unwrap();
    let y = frozen_linear(&x, &w_eff, None).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        grads.get(&delta).expect("delta received no gradient"),
        &want,
        1e-4,
        "delta gradient",
    );
}

#[test]
fn layer_norm_gradient_routing() {
    let f = DType::F32;
    let x = var(&randn(90, &[3, 4, 10], f));
    let g = randn(91, &[10], f);
    let b = randn(92, &[10], f);
    let r = randn(93, &[3, 4, 10], f);

    let y = layer_norm(&x, &g, &b, 1e-5).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&g).is_none());
    assert!(grads.get(&b).is_none());
    assert!(grads.get(&x).is_some());

    let (gv, bv) = (var(&g), var(&b));
    let y = layer_norm(&x, &gv, &bv, 1e-5).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let y_ref = ref_layer_norm(&x, &gv, &bv, 1e-5).unwrap();
    let grads_ref = y_ref
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (t, name) in [(&x, "x"), (&gv, "gamma"), (&bv, "beta")] {
        let got = grads
            .get(t)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_close(got, grads_ref.get(t).unwrap(), 1e-4, name);
    }

    // Only gamma trainable, x a plain tensor: gamma's gradient, nothing else.
    let xp = x.detach();
    let y = layer_norm(&xp, &gv, &b, 1e-5).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        grads.get(&gv).unwrap(),
        grads_ref.get(&gv).unwrap(),
        1e-4,
        "gamma only",
    );
    assert!(grads.get(&b).is_none());
    assert!(grads.get(&xp).is_none());
}

// ------------------------------------------------------ (e) masking

#[test]
fn attention_softmax_fully_masked_rows_are_finite() {
    for dtype in [DType::F32, DType::F64] {
        for neg in [-1e4, f64::from(f32::MIN), f64::NEG_INFINITY] {
            let s = var(&randn(100, &[2, 2, 3, 5], dtype).affine(4.0, 0.0).unwrap());
            // Example 0 partially masked, example 1 fully masked.
            let mask = key_mask(2, 5, &[3, 5], neg, dtype);
            let y = attention_softmax(&s, &mask, 0.5).unwrap();
            let v = y.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let v = v.to_vec1::<f64>().unwrap();
            assert!(
                v.iter().all(|p| p.is_finite()),
                "non-finite output for {neg}"
            );
            // Partially masked rows: masked keys get 0, rows sum to 1.
            let y0 = y.get(0).unwrap();
            let sums = y0.sum(D::Minus1).unwrap().flatten_all().unwrap();
            let sums = sums.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
            let masked = y0.narrow(D::Minus1, 2, 3).unwrap();
            assert_eq!(max_abs_diff(&masked, &masked.zeros_like().unwrap()), 0.0);
            // Gradient is finite too.
            let r = randn(101, y.dims(), dtype);
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = grads.get(&s).unwrap().flatten_all().unwrap();
            let gs = gs.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert!(gs.iter().all(|g| g.is_finite()));
            if neg == f64::NEG_INFINITY {
                let y1 = y.get(1).unwrap();
                assert_eq!(max_abs_diff(&y1, &y1.zeros_like().unwrap()), 0.0);
            }
        }
    }
    // The same for plain softmax on a row of -inf.
    let x = Tensor::new(
        &[[f32::NEG_INFINITY; 4], [0.0, 1.0, 2.0, 3.0]],
        &Device::Cpu,
    )
    .unwrap();
    let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y[0], [0.0; 4]);
    assert!((y[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

// ------------------------------------------- (f) non-contiguous inputs

/// Run `op` on a contiguous input and on a strided view with the same
/// values; compare outputs and the gradient reaching the input.
fn check_strided(name: &str, op: &Op, extra: &[Tensor], x_base: &Tensor, x_view: &Tensor) {
    let xc = var(&x_view.contiguous().unwrap());
    let xv_base = var(x_base);
    let xv = rebuild_view(&xv_base, x_base, x_view);
    assert!(!xv.is_contiguous(), "{name}: view should be strided");
    let mut ins_c = vec![xc.clone()];
    ins_c.extend_from_slice(extra);
    let mut ins_v = vec![xv.clone()];
    ins_v.extend_from_slice(extra);
    let yc = op(&ins_c).unwrap();
    let yv = op(&ins_v).unwrap();
    assert_close(&yc, &yv, 1e-6, name);
    let r = randn(110, yc.dims(), yc.dtype());
    let gc = yc.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gv = yv.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let gxc = gc.get(&xc).unwrap();
    // Push the contiguous gradient back through the same view to compare.
    let gxv_base = gv.get(&xv_base).unwrap();
    let gxv = rebuild_view(gxv_base, x_base, x_view);
    assert_close(gxc, &gxv, 1e-6, name);
}

/// Apply to `t` the view that maps `base` to `view` (transpose of the last
/// two dims, or a narrow of the last dim by one on each side).
fn rebuild_view(t: &Tensor, base: &Tensor, view: &Tensor) -> Tensor {
    let r = base.rank();
    if base.dims()[r - 1] == view.dims()[r - 1] + 2 {
        t.narrow(r - 1, 1, view.dims()[r - 1]).unwrap()
    } else {
        t.transpose(r - 2, r - 1).unwrap()
    }
}

#[test]
fn strided_inputs_give_same_results() {
    let f = DType::F32;
    let w = randn(120, &[5, 9], f);
    let b = randn(121, &[5], f);
    let g = randn(122, &[9], f);
    let beta = randn(123, &[9], f);
    let mask = key_mask(2, 9, &[1, 3], -1e4, f);
    type Case = (&'static str, Box<Op>, Vec<Tensor>);
    let cases: Vec<Case> = vec![
        (
            "frozen_linear",
            Box::new(|t: &[Tensor]| frozen_linear(&t[0], &t[1], Some(&t[2]))),
            vec![w, b],
        ),
        (
            "layer_norm",
            Box::new(|t: &[Tensor]| layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            vec![g, beta],
        ),
        (
            "softmax",
            Box::new(|t: &[Tensor]| softmax_last_dim(&t[0])),
            vec![],
        ),
        ("gelu", Box::new(|t: &[Tensor]| gelu_erf(&t[0])), vec![]),
        (
            "attention",
            Box::new(|t: &[Tensor]| attention_softmax(&t[0], &t[1], 0.4)),
            vec![mask],
        ),
    ];
    for (name, op, extra) in &cases {
        let (shape_t, shape_n): (Vec<usize>, Vec<usize>) = if *name == "attention" {
            (vec![2, 3, 9, 4], vec![2, 3, 4, 11])
        } else {
            (vec![2, 9, 4], vec![2, 4, 11])
        };
        // Transposed view: [.., 9, 4] -> [.., 4, 9].
        let base = randn(124, &shape_t, f);
        let view = base.transpose(base.rank() - 2, base.rank() - 1).unwrap();
        check_strided(name, op.as_ref(), extra, &base, &view);
        // Narrowed view with a start offset: [.., 11] -> [.., 1..10].
        let base = randn(125, &shape_n, f);
        let view = base.narrow(base.rank() - 1, 1, 9).unwrap();
        check_strided(name, op.as_ref(), extra, &base, &view);
        // 2-D transposed input.
        if *name != "attention" {
            let base = randn(126, &[9, 6], f);
            let view = base.t().unwrap();
            check_strided(name, op.as_ref(), extra, &base, &view);
        }
    }

    // Strided parameters and a strided (transposed) upstream gradient.
    let x = var(&randn(127, &[6, 9], f));
    let gb = randn(128, &[2, 11], f);
    let g_view = gb.get(0).unwrap().narrow(0, 1, 9).unwrap();
    let b_view = gb.get(1).unwrap().narrow(0, 2, 9).unwrap();
    let y = layer_norm(&x, &g_view, &b_view, 1e-5).unwrap();
    let y_ref = ref_layer_norm(&x, &g_view, &b_view, 1e-5).unwrap();
    assert_close(&y, &y_ref, 1e-5, "strided gamma/beta");
    let r = randn(129, &[9, 6], f);
    for (k, op) in [
        Box::new(|t: &Tensor| layer_norm(t, &g_view, &b_view, 1e-5))
            as Box<dyn Fn(&Tensor) -> Result<Tensor>>,
        Box::new(softmax_last_dim),
        Box::new(gelu_erf),
        Box::new(|t: &Tensor| frozen_linear(t, &randn(130, &[9, 9], f), None)),
    ]
    .iter()
    .enumerate()
    {
        // loss = Σ yᵀ ⊙ r makes the incoming gradient a transposed view.
        let y = op(&x).unwrap();
        let g1 = y
            .t()
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = y
            .mul(&r.t().unwrap().contiguous().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close(
            g1.get(&x).unwrap(),
            g2.get(&x).unwrap(),
            1e-6,
            &format!("strided grad, op {k}"),
        );
    }
}

// ------------------------------------- (g) frozen-linear GEMM vs candle

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    if b.elem_count() == 0 {
        return 0.0;
    }
    let scale = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    max_abs_diff(a, b) / scale
}

/// `frozen_linear` forward (with and without a fused bias) and its input
/// gradient against candle's matmul (`ref_linear`), for `x = view(base)`;
/// then the same with a trainable `w` (and a trainable bias), whose forward
/// must be bit-identical to the frozen one and whose weight gradient must
/// match candle's.
fn check_linear_vs_candle(
    base: &Tensor,
    view: &dyn Fn(&Tensor) -> Tensor,
    w: &Tensor,
    seed: u64,
    what: &str,
) {
    let out_f = w.dim(0).unwrap();
    let b = randn(seed, &[out_f], DType::F32);
    let (xb1, xb2) = (var(base), var(base));
    let (x1, x2) = (view(&xb1), view(&xb2));
    let mut y_frozen = None;
    for bias in [Some(&b), None] {
        let y = frozen_linear(&x1, w, bias).unwrap();
        let y_ref = ref_linear(&x2, w, bias).unwrap();
        let d = rel_diff(&y, &y_ref);
        assert!(
            d <= 1e-4,
            "{what} (bias {}): forward rel diff {d:e}",
            bias.is_some()
        );
        let r = randn(seed + 1, y.dims(), DType::F32);
        let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = rel_diff(g.get(&xb1).unwrap(), g_ref.get(&xb2).unwrap());
        assert!(d <= 1e-4, "{what}: dx rel diff {d:e}");
        y_frozen.get_or_insert(y);
    }
    let y_frozen = y_frozen.unwrap();
    // Trainable weight, frozen / trainable bias.
    let (w1, w2) = (var(w), var(w));
    for trainable_bias in [false, true] {
        let (b1, b2) = if trainable_bias {
            (var(&b), var(&b))
        } else {
            (b.clone(), b.clone())
        };
        let y = frozen_linear(&x1, &w1, Some(&b1)).unwrap();
        assert_eq!(
            rel_diff(&y, &y_frozen),
            0.0,
            "{what}: trainable w (bias {trainable_bias}) changes the forward"
        );
        let y_ref = ref_linear(&x2, &w2, Some(&b2)).unwrap();
        let r = randn(seed + 2, y.dims(), DType::F32);
        let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut pairs = vec![("dx", &xb1, &xb2), ("dw", &w1, &w2)];
        if trainable_bias {
            pairs.push(("db", &b1, &b2));
        }
        for (name, p1, p2) in pairs {
            // (candle gives no bias gradient at all for an empty input)
            match (g.get(p1), g_ref.get(p2)) {
                (Some(g1), Some(g2)) => {
                    let d = rel_diff(g1, g2);
                    assert!(d <= 1e-4, "{what}: trainable w, {name} rel diff {d:e}");
                }
                (g1, g2) => assert_eq!(g1.is_some(), g2.is_some(), "{what}: {name}"),
            }
        }
    }
    // A frozen bias fused into the op rounds like one added afterwards.
    let yb = frozen_linear(&x1, w, Some(&var(&b))).unwrap();
    assert_eq!(rel_diff(&yb, &y_frozen), 0.0, "{what}: fused bias");
}

#[test]
fn frozen_linear_gemm_matches_candle_matmul() {
    let f = DType::F32;
    let mut seed = 300;
    for rows in [1, 7, 33, 1000] {
        for in_f in [1, 17, 384, 1536] {
            for out_f in [1, 17, 384, 1536] {
                seed += 10;
                let x = randn(seed, &[rows, in_f], f);
                let w = randn(seed + 2, &[out_f, in_f], f);
                let what = format!("[{rows},{in_f}]x[{out_f},{in_f}]ᵀ");
                check_linear_vs_candle(&x, &|t| t.clone(), &w, seed + 4, &what);
            }
        }
    }
    // Depths that are not a multiple of the packing block, widths with a
    // partial last vector, several column blocks, 3-D and strided inputs.
    for (lead, in_f, out_f) in [
        (&[3usize, 41][..], 1000usize, 50usize),
        (&[2, 64], 769, 1100),
        (&[5, 9], 48, 2000),
        (&[1, 1], 3, 5),
        (&[0, 4], 8, 8),
    ] {
        seed += 10;
        let dims: Vec<usize> = lead.iter().copied().chain([in_f]).collect();
        let x = randn(seed, &dims, f);
        let w = randn(seed + 2, &[out_f, in_f], f);
        let what = format!("{dims:?}x[{out_f},{in_f}]ᵀ");
        check_linear_vs_candle(&x, &|t| t.clone(), &w, seed + 4, &what);
    }
    // Non-contiguous x: a transposed view.
    for (rows, in_f, out_f) in [(9, 17, 33), (130, 384, 100), (1000, 384, 384)] {
        seed += 10;
        let base = randn(seed, &[in_f, rows], f);
        let w = randn(seed + 2, &[out_f, in_f], f);
        let what = format!("transposed x [{rows},{in_f}]");
        check_linear_vs_candle(&base, &|t| t.t().unwrap(), &w, seed + 4, &what);
        // A 3-D input narrowed in its last dimension (start offset, row gaps).
        let base = randn(seed + 6, &[2, rows, in_f + 5], f);
        let what = format!("narrowed x [2,{rows},{in_f}]");
        check_linear_vs_candle(
            &base,
            &|t| t.narrow(2, 3, in_f).unwrap(),
            &w,
            seed + 8,
            &what,
        );
    }
    // Non-contiguous weights: transposed and narrowed views.
    for (rows, in_f, out_f) in [(7, 17, 33), (100, 384, 200)] {
        seed += 10;
        let x = randn(seed, &[rows, in_f], f);
        let id = |t: &Tensor| t.clone();
        let wt = randn(seed + 2, &[in_f, out_f], f);
        check_linear_vs_candle(&x, &id, &wt.t().unwrap(), seed + 4, "transposed w");
        let wn = randn(seed + 6, &[out_f, in_f + 3], f)
            .narrow(1, 2, in_f)
            .unwrap();
        check_linear_vs_candle(&x, &id, &wn, seed + 8, "narrowed w");
    }
}

#[test]
fn frozen_linear_candle_path_matches_gemm_path() {
    let f = DType::F32;
    let x = var(&randn(400, &[3, 37, 70], f));
    let w = randn(401, &[90, 70], f);
    let b = randn(402, &[90], f);
    let r = randn(403, &[3, 37, 90], f);
    let run = |candle: bool| {
        linear::USE_CANDLE_MATMUL.with(|c| c.set(candle));
        let y = frozen_linear(&x, &w, Some(&b)).unwrap();
        let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        linear::USE_CANDLE_MATMUL.with(|c| c.set(false));
        (y, g.get(&x).unwrap().clone())
    };
    let (y1, g1) = run(true);
    let (y2, g2) = run(false);
    assert!(rel_diff(&y1, &y2) <= 1e-5);
    assert!(rel_diff(&g1, &g2) <= 1e-5);
}

// --------------------------------------------------------- errors

#[test]
fn unsupported_dtypes_and_shapes_are_errors() {
    let x = randn(140, &[2, 4], DType::F32);
    for dt in [DType::F16, DType::BF16] {
        let xh = x.to_dtype(dt).unwrap();
        let e = softmax_last_dim(&xh).unwrap_err().to_string();
        assert!(e.contains("unsupported dtype"), "{e}");
        assert!(gelu_erf(&xh).is_err());
        let g = Tensor::ones(4, dt, &Device::Cpu).unwrap();
        assert!(layer_norm(&xh, &g, &g, 1e-5).is_err());
        let w = Tensor::ones((3, 4), dt, &Device::Cpu).unwrap();
        assert!(frozen_linear(&xh, &w, None).is_err());
        let m = Tensor::zeros((2, 4), dt, &Device::Cpu).unwrap();
        assert!(attention_softmax(&xh.reshape((2, 1, 1, 4)).unwrap(), &m, 1.0).is_err());
    }
    let w = randn(141, &[3, 5], DType::F32);
    assert!(frozen_linear(&x, &w, None).is_err());
    let w64 = randn(141, &[3, 4], DType::F64);
    assert!(frozen_linear(&x, &w64, None).is_err());
    let g = randn(142, &[3], DType::F32);
    assert!(layer_norm(&x, &g, &g, 1e-5).is_err());
}

// --------------------------------------------------------- timings

/// A named closure to time.
type Timed<'a> = (&'a str, Box<dyn FnMut() + 'a>);

/// Time several closures round-robin (so load from other processes hits
/// all of them alike) and print the fastest and the median run of each, ms.
fn compare(title: &str, iters: usize, cases: &mut [Timed<'_>]) {
    for (_, f) in cases.iter_mut() {
        f();
        f();
    }
    let mut times = vec![Vec::with_capacity(iters); cases.len()];
    for _ in 0..iters {
        for (k, (_, f)) in cases.iter_mut().enumerate() {
            let t = std::time::Instant::now();
            f();
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("{title}  (min / median ms over {iters} runs)");
    for ((name, _), t) in cases.iter().zip(times.iter_mut()) {
        t.sort_by(f64::total_cmp);
        println!("  {name:<40} {:8.2} {:8.2}", t[0], t[t.len() / 2]);
    }
}

/// `cargo test --release -p deltatune-core bench_ops -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_ops() {
    let f = DType::F32;
    let n = 30;
    let x0 = randn(150, &[2048, 384], f);
    let w = randn(151, &[384, 384], f).affine(0.05, 0.0).unwrap();
    let b = randn(152, &[384], f);
    let r = randn(153, &[2048, 384], f);
    let x = var(&x0);
    let g = randn(154, &[384], f);
    let gv = var(&g);
    let bv = var(&b);
    let wv = var(&w);
    // Forward, then backward of loss = Σ y ⊙ r.
    let step = |y: Tensor, r: &Tensor, probe: &Tensor| {
        let grads = y.mul(r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(probe).is_some());
    };

    compare(
        "linear: x [2048,384] (Var) · w [384,384]ᵀ + b, b frozen, w frozen unless noted",
        n,
        &mut [
            (
                "frozen_linear fwd+bwd",
                Box::new(|| step(frozen_linear(&x, &w, Some(&b)).unwrap(), &r, &x)),
            ),
            (
                "candle broadcast_matmul fwd+bwd",
                Box::new(|| step(ref_linear(&x, &w, Some(&b)).unwrap(), &r, &x)),
            ),
            (
                "frozen_linear fwd+bwd, w a Var (dx, dw)",
                Box::new(|| step(frozen_linear(&x, &wv, Some(&b)).unwrap(), &r, &wv)),
            ),
            (
                "candle fwd+bwd, w a Var (dx, dw)",
                Box::new(|| step(ref_linear(&x, &wv, Some(&b)).unwrap(), &r, &wv)),
            ),
            (
                "loss/backward harness alone",
                Box::new(|| step(x.clone(), &r, &x)),
            ),
            (
                "frozen_linear fwd",
                Box::new(|| drop(frozen_linear(&x0, &w, Some(&b)).unwrap())),
            ),
            (
                "candle broadcast_matmul fwd",
                Box::new(|| drop(ref_linear(&x0, &w, Some(&b)).unwrap())),
            ),
        ],
    );
    compare(
        "layer_norm [2048,384]",
        n,
        &mut [
            (
                "layer_norm fwd+bwd (frozen gamma/beta)",
                Box::new(|| step(layer_norm(&x, &g, &b, 1e-12).unwrap(), &r, &x)),
            ),
            (
                "layer_norm fwd+bwd (Var gamma/beta)",
                Box::new(|| step(layer_norm(&x, &gv, &bv, 1e-12).unwrap(), &r, &x)),
            ),
            (
                "composite candle fwd+bwd (frozen)",
                Box::new(|| step(ref_layer_norm(&x, &g, &b, 1e-12).unwrap(), &r, &x)),
            ),
            (
                "loss/backward harness alone",
                Box::new(|| step(x.clone(), &r, &x)),
            ),
            (
                "layer_norm fwd",
                Box::new(|| drop(layer_norm(&x0, &g, &b, 1e-12).unwrap())),
            ),
            (
                "composite candle fwd",
                Box::new(|| drop(ref_layer_norm(&x0, &g, &b, 1e-12).unwrap())),
            ),
        ],
    );

    let s0 = randn(155, &[16, 12, 128, 128], f);
    let s = var(&s0);
    let rs = randn(156, &[16, 12, 128, 128], f);
    let mask = key_mask(16, 128, &[10; 16], -1e4, f);
    compare(
        "attention softmax [16,12,128,128]",
        10,
        &mut [
            (
                "attention_softmax fwd+bwd",
                Box::new(|| step(attention_softmax(&s, &mask, 0.125).unwrap(), &rs, &s)),
            ),
            (
                "composite candle fwd+bwd",
                Box::new(|| step(ref_attention(&s, &mask, 0.125).unwrap(), &rs, &s)),
            ),
            (
                "loss/backward harness alone",
                Box::new(|| step(s.clone(), &rs, &s)),
            ),
            (
                "attention_softmax fwd",
                Box::new(|| drop(attention_softmax(&s0, &mask, 0.125).unwrap())),
            ),
            (
                "composite candle fwd",
                Box::new(|| drop(ref_attention(&s0, &mask, 0.125).unwrap())),
            ),
        ],
    );

    let h0 = randn(157, &[2048, 1536], f);
    let h = var(&h0);
    let rh = randn(158, &[2048, 1536], f);
    compare(
        "gelu [2048,1536]",
        n,
        &mut [
            (
                "gelu_erf fwd+bwd",
                Box::new(|| step(gelu_erf(&h).unwrap(), &rh, &h)),
            ),
            (
                "candle Tensor::gelu_erf fwd+bwd",
                Box::new(|| step(ref_gelu(&h).unwrap(), &rh, &h)),
            ),
            (
                "loss/backward harness alone",
                Box::new(|| step(h.clone(), &rh, &h)),
            ),
            ("gelu_erf fwd", Box::new(|| drop(gelu_erf(&h0).unwrap()))),
            (
                "candle Tensor::gelu_erf fwd",
                Box::new(|| drop(h0.gelu_erf().unwrap())),
            ),
        ],
    );
}

/// GFLOP/s of the AVX-512 GEMM (packing included) against candle's matmul
/// on the BERT-small frozen-linear products, median of 10 runs after
/// warm-up, on the rayon pool (2 threads on the reference machine):
/// `cargo test --release -p deltatune-core bench_gemm -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_gemm() {
    use super::gemm::{self, MatRef};
    let f = DType::F32;
    let median = |f: &mut dyn FnMut()| {
        for _ in 0..3 {
            f();
        }
        let mut t: Vec<f64> = (0..10)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    println!(
        "avx512f: {}, threads: {}",
        gemm::has_avx512(),
        rayon::current_num_threads()
    );
    println!("| product | ours GFLOP/s | candle GFLOP/s | speed-up |");
    println!("|---|---|---|---|");
    let rows = 2048;
    for (out_f, in_f) in [(384, 384), (1536, 384), (384, 1536)] {
        let w = randn(500, &[out_f, in_f], f);
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for backward in [false, true] {
            // forward: [rows, in] · Wᵀ; backward: [rows, out] · W.
            let (k, n) = if backward {
                (out_f, in_f)
            } else {
                (in_f, out_f)
            };
            let a = randn(501, &[rows, k], f);
            let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bm = if backward {
                MatRef {
                    data: &wv,
                    rs: in_f,
                    cs: 1,
                }
            } else {
                MatRef {
                    data: &wv,
                    rs: 1,
                    cs: in_f,
                }
            };
            let am = MatRef {
                data: &av,
                rs: k,
                cs: 1,
            };
            let ours = median(&mut || {
                drop(gemm::sgemm(rows, n, k, am, bm, None).unwrap());
            });
            let wt = w.t().unwrap();
            let candle = median(&mut || {
                let y = if backward {
                    a.matmul(&w)
                } else {
                    a.matmul(&wt)
                };
                drop(y.unwrap());
            });
            let gf = 2.0 * (rows * n * k) as f64 * 1e-9;
            let name = if backward {
                format!("bwd [{rows},{out_f}]·W[{out_f},{in_f}]")
            } else {
                format!("fwd [{rows},{in_f}]·W[{out_f},{in_f}]ᵀ")
            };
            println!(
                "| {name} | {:.0} | {:.0} | {:.2}x |",
                gf / ours,
                gf / candle,
                candle / ours
            );
        }
    }
}

// ------------------------------------------------------- decoder ops

fn ref_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

#[test]
fn rms_norm_matches_composite_and_fd_f64() {
    let d = DType::F64;
    let x = randn(80, &[2, 3, 11], d).affine(2.0, 0.3).unwrap();
    let w = randn(81, &[11], d).affine(0.5, 1.0).unwrap();
    assert_close(
        &rms_norm(&x, &w, 1e-6).unwrap(),
        &ref_rms_norm(&x, &w, 1e-6).unwrap(),
        1e-12,
        "rms_norm f64",
    );
    check_fd(
        &[x.clone(), w.clone()],
        &[0, 1],
        &|t| rms_norm(&t[0], &t[1], 1e-6),
        82,
    );
    check_fd(&[x, w], &[1], &|t| rms_norm(&t[0], &t[1], 1e-6), 83);
}

/// Rotate-half rope from candle ops: `x·cos + rotate_half(x)·sin`.
fn ref_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(3)?;
    let x1 = x.narrow(3, 0, d / 2)?;
    let x2 = x.narrow(3, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    let c = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
    let s = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
    x.broadcast_mul(&c)? + rot.broadcast_mul(&s)?
}

#[test]
fn rope_matches_composite_and_fd_f64() {
    let d = DType::F64;
    let x = randn(84, &[2, 3, 4, 6], d);
    let pos = vec![vec![0u32, 1, 2, 3], vec![5, 6, 7, 8]];
    let (c, s) = rope_angles(&pos, 6, 100.0, &Device::Cpu).unwrap();
    let (c, s) = (c.to_dtype(d).unwrap(), s.to_dtype(d).unwrap());
    assert_close(
        &rope(&x, &c, &s).unwrap(),
        &ref_rope(&x, &c, &s).unwrap(),
        1e-12,
        "rope f64",
    );
    // A transposed (strided) input gives the same result.
    let xt = x
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert_close(
        &rope(&xt, &c, &s).unwrap(),
        &rope(&x, &c, &s).unwrap(),
        0.0,
        "rope strided",
    );
    check_fd(&[x], &[0], &move |t| rope(&t[0], &c, &s), 85);
}

#[test]
fn swiglu_matches_composite_and_fd_f64() {
    let d = DType::F64;
    let g = randn(86, &[3, 7], d).affine(2.0, 0.0).unwrap();
    let u = randn(87, &[3, 7], d);
    let composite = (g.silu().unwrap() * &u).unwrap();
    assert_close(&swiglu(&g, &u).unwrap(), &composite, 1e-12, "swiglu f64");
    check_fd(
        &[g.clone(), u.clone()],
        &[0, 1],
        &|t| swiglu(&t[0], &t[1]),
        88,
    );
    check_fd(&[g.clone(), u.clone()], &[0], &|t| swiglu(&t[0], &t[1]), 89);
    check_fd(&[g, u], &[1], &|t| swiglu(&t[0], &t[1]), 90);
    // Several parallel chunks (4096 elements each, a partial last one), each gradient alone
    // and both, against the composed ops, in f32 and f64.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let g = randn(91, &[3, 5000], dtype).affine(3.0, 0.0).unwrap();
        let u = randn(92, &[3, 5000], dtype);
        for wrt in [vec![0, 1], vec![0], vec![1]] {
            kernels_equal_composed(
                "swiglu, several chunks",
                &[g.clone(), u.clone()],
                &wrt,
                &|t| swiglu(&t[0], &t[1]),
                tol,
            );
        }
    }
}

#[test]
fn causal_attention_softmax_masks_future_keys_and_fd_f64() {
    let d = DType::F64;
    // Tq = 3 queries after 2 earlier keys (offset 2): Tk = 5.
    let s = randn(90, &[2, 2, 3, 5], d).affine(3.0, 0.0).unwrap();
    let mask = key_mask(2, 5, &[1, 0], -1e4, d);
    let p = causal_attention_softmax(&s, &mask, 0.5, 2).unwrap();
    // Reference: the same with an explicit [Tq, Tk] causal bias.
    let mut causal = vec![0f64; 15];
    for i in 0..3 {
        for j in 0..5 {
            if j > i + 2 {
                causal[i * 5 + j] = f64::NEG_INFINITY;
            }
        }
    }
    let causal = Tensor::from_vec(causal, (1, 1, 3, 5), &Device::Cpu).unwrap();
    let logits = (s
        .affine(0.5, 0.0)
        .unwrap()
        .broadcast_add(&mask.reshape((2, 1, 1, 5)).unwrap()))
    .unwrap()
    .broadcast_add(&causal)
    .unwrap();
    assert_close(&p, &ref_softmax(&logits).unwrap(), 1e-12, "causal softmax");
    let v = p.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(v[4], 0.0, "query 0 must not see key 3+1");
    check_fd(
        &[s, mask],
        &[0],
        &|t| causal_attention_softmax(&t[0], &t[1], 0.5, 2),
        91,
    );
}

#[test]
fn cross_entropy_matches_candle_and_fd_f64() {
    let x = randn(92, &[5, 7], DType::F64).affine(3.0, 0.0).unwrap();
    let targets = [0u32, 6, 3, 3, 1];
    let t = Tensor::new(&targets, &Device::Cpu).unwrap();
    let want = candle_nn_free_cross_entropy(&x, &t);
    let got = cross_entropy(&x, &targets).unwrap();
    assert!((got.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    // The loss is a scalar: check_fd weights it by a random scalar.
    check_fd(&[x], &[0], &move |t| cross_entropy(&t[0], &targets), 93);
    assert!(cross_entropy(&randn(1, &[2, 3], DType::F32), &[0, 3]).is_err());
}

/// f32 over a decoder-sized vocabulary (exponentials in f32 lanes) against the same logits in
/// f64: loss and gradient.
#[test]
fn cross_entropy_f32_matches_f64_on_a_wide_vocabulary() {
    let x64 = randn(94, &[4, 49_157], DType::F64)
        .affine(4.0, 0.0)
        .unwrap();
    let x32 = x64.to_dtype(DType::F32).unwrap();
    let x64 = x32.to_dtype(DType::F64).unwrap();
    let targets = [0u32, 49_156, 17, 30_000];
    let (v64, v32) = (var(&x64), var(&x32));
    let l64 = cross_entropy(&v64, &targets).unwrap();
    let l32 = cross_entropy(&v32, &targets).unwrap();
    let (a, b) = (
        l64.to_scalar::<f64>().unwrap(),
        f64::from(l32.to_scalar::<f32>().unwrap()),
    );
    assert!((a - b).abs() < 1e-5 * a.abs(), "loss f64 {a} f32 {b}");
    let g64 = l64.backward().unwrap().get(&v64).unwrap().clone();
    let g32 = l32.backward().unwrap().get(&v32).unwrap().clone();
    // Gradients are probabilities / rows: compare against the largest entry.
    let scale = g64.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f64>().unwrap();
    assert_close(
        &g64,
        &g32,
        1e-5 * scale,
        "cross-entropy gradient f32 against f64",
    );
}

/// Mean of `logsumexp(x) - x[t]` computed directly.
fn candle_nn_free_cross_entropy(x: &Tensor, t: &Tensor) -> f64 {
    let rows: Vec<Vec<f64>> = x.to_vec2().unwrap();
    let ts: Vec<u32> = t.to_vec1().unwrap();
    let mut s = 0.0;
    for (r, &k) in rows.iter().zip(&ts) {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        s += lse - r[k as usize];
    }
    s / rows.len() as f64
}

// ------------------------------------------------ composed (device) path

/// Runs `f` on fresh variables made from `inputs`, once through the CPU kernels and once
/// through the composed path ([`portable::force`]), and checks that the outputs and the
/// gradients of `Σ f ⊙ r` with respect to every input in `wrt` agree within `tol`.
fn kernels_equal_composed(
    name: &str,
    inputs: &[Tensor],
    wrt: &[usize],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) {
    let run = |composed: bool| {
        let _guard = composed.then(portable::force);
        let ts: Vec<Tensor> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| if wrt.contains(&i) { var(t) } else { t.clone() })
            .collect();
        let y = f(&ts).unwrap();
        let r = randn(99, y.dims(), y.dtype());
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = wrt
            .iter()
            .map(|&i| {
                grads
                    .get(&ts[i])
                    .unwrap_or_else(|| {
                        panic!("{name}: no gradient for input {i} (composed: {composed})")
                    })
                    .clone()
            })
            .collect();
        (y, g)
    };
    let (y, g) = run(false);
    let (yc, gc) = run(true);
    assert_close(&y, &yc, tol, &format!("{name}: forward"));
    for (k, (a, b)) in g.iter().zip(&gc).enumerate() {
        assert_close(a, b, tol, &format!("{name}: gradient of input {}", wrt[k]));
    }
}

#[test]
fn composed_path_is_active_only_while_forced() {
    let x = randn(1, &[2, 3], DType::F32);
    assert!(!portable::active(&x));
    {
        let _g = portable::force();
        assert!(portable::active(&x));
        {
            let _inner = portable::force();
        }
        assert!(
            portable::active(&x),
            "an inner guard must restore the outer setting"
        );
    }
    assert!(!portable::active(&x));
}

/// Every op's composed path (the one a GPU takes) equals its CPU kernel, forward and
/// backward, in f64 (to rounding) and f32.
#[test]
fn composed_path_equals_the_kernels() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        let x = randn(1, &[3, 5, 24], dtype);
        let d = randn(2, &[24], dtype);
        let e = randn(3, &[24], dtype);
        kernels_equal_composed(
            "layer_norm",
            &[x.clone(), d.clone(), e.clone()],
            &[0, 1, 2],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            tol,
        );
        kernels_equal_composed(
            "rms_norm",
            &[x.clone(), d.clone()],
            &[0, 1],
            &|t| rms_norm(&t[0], &t[1], 1e-6),
            tol,
        );
        kernels_equal_composed(
            "softmax",
            std::slice::from_ref(&x),
            &[0],
            &|t| softmax_last_dim(&t[0]),
            tol,
        );
        kernels_equal_composed(
            "gelu",
            std::slice::from_ref(&x),
            &[0],
            &|t| gelu_erf(&t[0]),
            tol,
        );
        let u = randn(4, &[3, 5, 24], dtype);
        kernels_equal_composed(
            "swiglu",
            &[x.clone(), u],
            &[0, 1],
            &|t| swiglu(&t[0], &t[1]),
            tol,
        );

        // Attention probabilities: padded keys (finite and -inf masks), causal with an offset.
        let s = randn(5, &[2, 3, 4, 6], dtype);
        for neg in [-1e4, f64::NEG_INFINITY] {
            let bias = key_mask(2, 6, &[0, 2], neg, dtype);
            kernels_equal_composed(
                "attention_softmax",
                std::slice::from_ref(&s),
                &[0],
                &|t| attention_softmax(&t[0], &bias, 0.3),
                tol,
            );
            kernels_equal_composed(
                "causal_attention_softmax",
                std::slice::from_ref(&s),
                &[0],
                &|t| causal_attention_softmax(&t[0], &bias, 0.3, 2),
                tol,
            );
        }

        // Rotary embedding on [B, H, T, D] with per-row angles.
        let positions = vec![vec![0u32, 1, 2, 7, 9], vec![3, 4, 5, 6, 8]];
        let (cos, sin) = rope_angles(&positions, 8, 10_000.0, &Device::Cpu).unwrap();
        let hx = randn(6, &[2, 3, 5, 8], dtype);
        kernels_equal_composed("rope", &[hx], &[0], &|t| rope(&t[0], &cos, &sin), tol);

        let logits = randn(7, &[6, 11], dtype);
        kernels_equal_composed(
            "cross_entropy",
            &[logits],
            &[0],
            &|t| cross_entropy(&t[0], &[0, 10, 3, 3, 7, 1]),
            tol,
        );

        // Linear: frozen weight (input gradient only), trainable weight and bias.
        let w = randn(8, &[7, 24], dtype);
        let b = randn(9, &[7], dtype);
        kernels_equal_composed(
            "frozen_linear",
            &[x.clone(), w.clone(), b.clone()],
            &[0],
            &|t| frozen_linear(&t[0], &t[1], Some(&t[2])),
            tol,
        );
        kernels_equal_composed(
            "trainable linear",
            &[x.clone(), w.clone(), b.clone()],
            &[0, 1, 2],
            &|t| frozen_linear(&t[0], &t[1], Some(&t[2])),
            tol,
        );

        // Attention on token-major projections: grouped-query heads, padding, causal offset,
        // dropout bits.
        let (bsz, tq, tk, heads, kv, dh) = (2, 3, 5, 4, 2, 6);
        let q = randn(10, &[bsz, tq, heads * dh], dtype);
        let k = randn(11, &[bsz, tk, kv * dh], dtype);
        let v = randn(12, &[bsz, tk, kv * dh], dtype);
        let bias = key_mask(bsz, tk, &[1, 0], -1e4, dtype);
        let mut g = Lcg::new(13);
        let bits: Vec<u64> = (0..(bsz * heads * tq * tk).div_ceil(64))
            .map(|_| g.next_u64())
            .collect();
        for (causal, drop) in [(None, None), (Some(2), None), (Some(2), Some(bits.clone()))] {
            kernels_equal_composed(
                "attention",
                &[q.clone(), k.clone(), v.clone()],
                &[0, 1, 2],
                &|t| {
                    attention(
                        &t[0],
                        &t[1],
                        &t[2],
                        &bias,
                        heads,
                        kv,
                        0.4,
                        causal,
                        drop.clone().map(|b| (b, 1.25)),
                    )
                },
                tol,
            );
        }
        let x_bits: Vec<u64> = (0..x.elem_count().div_ceil(64))
            .map(|_| g.next_u64())
            .collect();
        kernels_equal_composed(
            "dropout_bits_op",
            std::slice::from_ref(&x),
            &[0],
            &|t| dropout_bits_op(&t[0], x_bits.clone(), 1.25),
            tol,
        );
    }
}

/// The composed path of the quantized and dropout-then-project products, in f32 (the dtype
/// they compute in).
#[test]
fn composed_path_equals_the_kernels_for_quantized_and_dropout_products() {
    let x = randn(20, &[6, 64], DType::F32);
    let w = randn(21, &[9, 64], DType::F32);
    let q = crate::quant::QuantMatrix::quantize(&w, candle_core::quantized::GgmlDType::Q8_0, "w")
        .unwrap();
    let b = randn(22, &[9], DType::F32);
    kernels_equal_composed(
        "quant_linear",
        &[x.clone(), b],
        &[0, 1],
        &|t| quant_linear(&t[0], &q, Some(&t[1])),
        2e-4,
    );
    let a = randn(23, &[4, 64], DType::F32);
    kernels_equal_composed(
        "dropout_project",
        &[x.clone(), a.clone()],
        &[0, 1],
        &|t| {
            let ctx = crate::sites::Ctx::train(crate::rng::Rng::new(5));
            dropout_project(&t[0], &t[1], 0.2, &ctx)
        },
        2e-4,
    );
    // Rank 3, as LoRA calls it: [B, T, in] -> [B, T, r].
    let x3 = randn(24, &[2, 3, 64], DType::F32);
    kernels_equal_composed(
        "dropout_project (rank 3)",
        &[x3, a],
        &[0, 1],
        &|t| {
            let ctx = crate::sites::Ctx::train(crate::rng::Rng::new(6));
            dropout_project(&t[0], &t[1], 0.2, &ctx)
        },
        2e-4,
    );
}

#[test]
fn lora_up_add_equals_the_composed_sum() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        // [B, T, out] + scale · [B, T, r] · [out, r]ᵀ, every input differentiated.
        let base = randn(30, &[2, 5, 24], dtype);
        let z = randn(31, &[2, 5, 3], dtype);
        let b = randn(32, &[24, 3], dtype);
        kernels_equal_composed(
            "lora_up_add",
            &[base, z, b],
            &[0, 1, 2],
            &|t| lora_up_add(&t[0], &t[1], &t[2], 0.7),
            tol,
        );
        // 2-D, rank 1, and a transposed (strided) b.
        let base = randn(33, &[7, 9], dtype);
        let z = randn(34, &[7, 1], dtype);
        let bt = randn(35, &[1, 9], dtype);
        kernels_equal_composed(
            "lora_up_add (strided b)",
            &[base, z, bt],
            &[0, 1, 2],
            &|t| lora_up_add(&t[0], &t[1], &t[2].t()?, 2.0),
            tol,
        );
    }
    let bad = lora_up_add(
        &randn(36, &[4, 6], DType::F32),
        &randn(37, &[4, 2], DType::F32),
        &randn(38, &[5, 2], DType::F32),
        1.0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("lora_up_add") && bad.contains("[5, 2]"),
        "{bad}"
    );
}

/// The CPU's f32 peak as our code can reach it: each thread runs 16 independent chains of
/// 512-bit FMAs from registers (no memory traffic), 1 thread and then every thread of the
/// pool at once. The ceiling any f32 product (ours or PyTorch's) works under:
/// `cargo test --release -p deltatune-core bench_fma_peak -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_fma_peak() {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::gemm::has_avx512() {
            println!("no AVX-512F");
            return;
        }
        /// FLOPs done: 16 chains x 16 lanes x 2 per FMA x `iters`.
        #[target_feature(enable = "avx512f")]
        unsafe fn chains(iters: usize) -> f32 {
            use std::arch::x86_64::*;
            let mul = _mm512_set1_ps(0.999_999);
            let add = _mm512_set1_ps(1e-7);
            let mut acc = [_mm512_set1_ps(1.0); 16];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, mul, add);
                }
            }
            let mut s = _mm512_setzero_ps();
            for a in acc {
                s = _mm512_add_ps(s, a);
            }
            _mm512_reduce_add_ps(s)
        }
        let iters = 20_000_000;
        let flops = 16.0 * 16.0 * 2.0 * iters as f64;
        for threads in [1, rayon::current_num_threads()] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                let s: f32 = rayon::broadcast(|ctx| {
                    if ctx.index() < threads {
                        // SAFETY: AVX-512F was checked above.
                        unsafe { chains(iters) }
                    } else {
                        0.0
                    }
                })
                .into_iter()
                .sum();
                std::hint::black_box(s);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            println!(
                "{threads} thread(s): {:.0} GFLOP/s f32 FMA peak (best of 3)",
                flops * threads as f64 / best * 1e-9
            );
        }
    }
}

#[test]
fn residual_layer_norm_equals_dropout_add_and_layer_norm() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        // 3 x 50 x 24: the dropout words straddle rows; every input differentiated.
        let x = randn(40, &[3, 50, 24], dtype);
        let r = randn(41, &[3, 50, 24], dtype);
        let g = randn(42, &[24], dtype);
        let b = randn(43, &[24], dtype);
        for p in [0.0, 0.3] {
            let f = |t: &[Tensor]| {
                let ctx = crate::sites::Ctx::train(crate::rng::Rng::new(9));
                let bits = (p > 0.0).then(|| ctx.dropout_bits(t[0].elem_count(), p));
                residual_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-5, bits)
            };
            let inputs = [x.clone(), r.clone(), g.clone(), b.clone()];
            kernels_equal_composed("residual_layer_norm", &inputs, &[0, 1, 2, 3], &f, tol);
            // The unfused ops from the same stream give the same output.
            let ctx = crate::sites::Ctx::train(crate::rng::Rng::new(9));
            let want =
                layer_norm(&(ctx.dropout(&x, p).unwrap() + &r).unwrap(), &g, &b, 1e-5).unwrap();
            assert_close(
                &f(&inputs).unwrap(),
                &want,
                tol,
                "residual_layer_norm: unfused",
            );
        }
    }
    let bad = residual_layer_norm(
        &randn(44, &[2, 8], DType::F32),
        &randn(45, &[2, 7], DType::F32),
        &randn(46, &[8], DType::F32),
        &randn(47, &[8], DType::F32),
        1e-5,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("residual [2, 7]"), "{bad}");
}

/// Gradients are the same bits from run to run: the ops whose backward adds up partial sums
/// from several threads (the quantized product's input gradient for few rows, the layer norm's
/// parameter gradients) add them in a fixed order, not in the order work stealing gives.
/// (A rayon `fold`/`reduce` here made trained adapters differ between identical runs.)
#[test]
fn backward_sums_do_not_depend_on_scheduling() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let w = randn(40, &[1536, 64], DType::F32);
    let q = crate::quant::QuantMatrix::quantize(&w, candle_core::quantized::GgmlDType::Q4_1, "w")
        .unwrap();
    let x = randn(41, &[6, 64], DType::F32);
    let gy = randn(42, &[6, 1536], DType::F32);
    let xn = randn(43, &[700, 96], DType::F32);
    let gamma = randn(44, &[96], DType::F32);
    let beta = randn(45, &[96], DType::F32);
    let gn = randn(46, &[700, 96], DType::F32);
    let grads = || -> Vec<Vec<u32>> {
        let xv = Var::from_tensor(&x).unwrap();
        let y = quant_linear(xv.as_tensor(), &q, None).unwrap();
        let g = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap().flatten_all().unwrap();
        let (gv, bv) = (
            Var::from_tensor(&gamma).unwrap(),
            Var::from_tensor(&beta).unwrap(),
        );
        let y = layer_norm(&xn, gv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
        let g = (y * &gn).unwrap().sum_all().unwrap().backward().unwrap();
        [
            dx,
            g.get(gv.as_tensor()).unwrap().clone(),
            g.get(bv.as_tensor()).unwrap().clone(),
        ]
        .iter()
        .map(|t| {
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
    };
    let first = pool.install(grads);
    for run in 1..60 {
        let again = pool.install(grads);
        for (i, what) in ["quant_linear dx", "layer_norm dgamma", "layer_norm dbeta"]
            .iter()
            .enumerate()
        {
            assert!(first[i] == again[i], "{what}: run {run} differs from run 0");
        }
    }
}
