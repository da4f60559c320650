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
