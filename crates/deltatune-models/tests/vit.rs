//! The Vision Transformer against transformers: the tiny random ViT fixture
//! (`scripts/gen_vit_tiny_fixture.py`), on square inputs at the trained size and on a 22 x 12
//! input whose position embeddings are interpolated bicubically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Rng, Weights};
use deltatune_models::vit::bicubic_matrix;
use deltatune_models::{Backbone, VitClassifier};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_map(p: &Path) -> BTreeMap<String, Tensor> {
    Weights::load(p, DType::F32)
        .unwrap()
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn tiny_vit_matches_transformers_at_the_trained_size_and_interpolated() {
    let dir = fixtures().join("tiny-vit");
    let m = VitClassifier::load(&dir, 3, &mut Rng::new(0)).unwrap();
    let exp = load_map(&dir.join("expected.safetensors"));
    let ctx = Ctx::eval();
    for case in ["square", "odd"] {
        let px = &exp[&format!("{case}.pixels")];
        let (hidden, n_prompt) = m.encode(px, &ctx).unwrap();
        assert_eq!(n_prompt, 0);
        let d = max_abs(&hidden, &exp[&format!("{case}.last_hidden_state")]);
        assert!(d < 1e-4, "{case}: hidden states differ by {d}");
        let logits = m.forward(px, &ctx).unwrap();
        let d = max_abs(&logits, &exp[&format!("{case}.logits")]);
        assert!(d < 1e-4, "{case}: logits differ by {d}");
    }
}

#[test]
fn named_tensors_are_the_checkpoint() {
    let dir = fixtures().join("tiny-vit");
    let m = VitClassifier::load(&dir, 3, &mut Rng::new(0)).unwrap();
    let file = load_map(&dir.join("model.safetensors"));
    let named: BTreeMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
    assert_eq!(
        named.keys().collect::<Vec<_>>(),
        file.keys().collect::<Vec<_>>()
    );
    for (k, t) in &named {
        assert_eq!(max_abs(t, &file[k]), 0.0, "{k}");
    }
}

#[test]
fn bicubic_rows_sum_to_one_and_same_size_is_the_identity() {
    for (a, b) in [(37, 16), (4, 5), (4, 3), (7, 7)] {
        let m = bicubic_matrix(a, b);
        for i in 0..b {
            let s: f32 = m[i * a..(i + 1) * a].iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{a}->{b} row {i} sums to {s}");
        }
        if a == b {
            for i in 0..a {
                for j in 0..a {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((m[i * a + j] - want).abs() < 1e-6);
                }
            }
        }
    }
}

#[test]
fn wrong_channel_count_is_a_clear_error() {
    let dir = fixtures().join("tiny-vit");
    let m = VitClassifier::load(&dir, 3, &mut Rng::new(0)).unwrap();
    let grey = Tensor::zeros((1, 1, 16, 16), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = m.forward(&grey, &Ctx::eval()).unwrap_err().to_string();
    assert!(e.contains("1 channel(s), the model reads 3"), "{e}");
    assert!(e.contains("repeat the grey channel"), "{e}");
}

/// The tiny random Dinov2 of `scripts/gen_vit_fixtures.py`: square, non-square (20 x 16) and
/// upsampled (24 x 24) inputs against transformers' `last_hidden_state`.
#[test]
fn tiny_dinov2_matches_transformers() {
    let dir = fixtures().join("tiny-dinov2");
    let m = VitClassifier::load(&dir, 3, &mut Rng::new(0)).unwrap();
    let exp = load_map(&dir.join("expected.safetensors"));
    let ctx = Ctx::eval();
    for (px, want) in [
        ("pixel_values", "last_hidden_state"),
        ("pixel_values_nonsquare", "last_hidden_state_nonsquare"),
        ("pixel_values_big", "last_hidden_state_big"),
    ] {
        let (h, _) = m.encode(&exp[px], &ctx).unwrap();
        let d = max_abs(&h, &exp[want]);
        assert!(d < 1e-4, "{px}: hidden states differ by {d}");
    }
}

/// The real DINOv2 ViT-S/14 converted from the ONNX file (`deltatune fetch`) against
/// onnxruntime's last hidden state of the graph on the fixture image (7 rows and the means).
/// Skipped with a message when the asset is not fetched; required with
/// `DELTATUNE_REQUIRE_ASSETS=1`.
#[test]
fn real_dinov2_matches_onnxruntime() {
    let cache = std::env::var_os("DELTATUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/deltatune"));
    let dir = cache.join("models/dinov2-vits14");
    if !dir.join("model.safetensors").exists() {
        assert!(
            std::env::var("DELTATUNE_REQUIRE_ASSETS").is_err(),
            "{} is missing: run `deltatune fetch`",
            dir.display()
        );
        eprintln!("NOTE: skipped: no converted DINOv2 in {}", dir.display());
        return;
    }
    let m = VitClassifier::load(&dir, 10, &mut Rng::new(0)).unwrap();
    let exp = load_map(&fixtures().join("dinov2-vits14/expected.safetensors"));
    let (h, _) = m.encode(&exp["pixel_values"], &Ctx::eval()).unwrap();
    let rows: Vec<u32> = exp["rows"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let idx = Tensor::new(rows.as_slice(), h.device()).unwrap();
    let got = h.squeeze(0).unwrap().index_select(&idx, 0).unwrap();
    let d = max_abs(&got, &exp["last_hidden_state_rows"]);
    assert!(d < 1e-4, "rows differ from onnxruntime by {d}");
    let mean = h.squeeze(0).unwrap().mean(0).unwrap();
    let d = max_abs(&mean, &exp["token_mean"]);
    assert!(d < 1e-4, "the token mean differs by {d}");
}
