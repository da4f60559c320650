//! Helpers shared by the method tests: the tiny random BERT of tests/fixtures (hidden 32,
//! 2 layers, 4 heads), its saved inputs, tensor comparisons and a gradient check.
#![allow(dead_code)]

use deltatune_models::Backbone;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use deltatune_core::{Ctx, Rng, Weights};
use deltatune_methods::Trainable;
use deltatune_models::{BertClassifier, Inputs, Pooling};

pub const H: usize = 32;
pub const L: usize = 2;
pub const CLS_W: &str = "base_model.model.classifier.weight";
pub const CLS_B: &str = "base_model.model.classifier.bias";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny BERT with a 3-label head and the given pooling.
pub fn tiny_with(pooling: Pooling) -> BertClassifier {
    BertClassifier::load(&fixtures().join("tiny-bert"), 3, pooling, &mut Rng::new(0)).unwrap()
}

pub fn tiny() -> BertClassifier {
    tiny_with(Pooling::Cls)
}

/// Every tensor of a safetensors file.
pub fn load_map(p: &Path) -> BTreeMap<String, Tensor> {
    Weights::load(p, DType::F32)
        .unwrap()
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

/// The inputs saved with a fixture folder's `expected.safetensors`, and all its tensors.
pub fn fixture_inputs(dir: &str) -> (Inputs, BTreeMap<String, Tensor>) {
    let m = load_map(&fixtures().join(dir).join("expected.safetensors"));
    let u = |k: &str| m[k].to_dtype(DType::U32).unwrap();
    let inputs = Inputs {
        input_ids: u("input_ids"),
        attention_mask: u("attention_mask"),
        token_type_ids: Some(u("token_type_ids")),
    };
    (inputs, m)
}

/// The tiny BERT's saved batch (3 sequences).
pub fn inputs() -> Inputs {
    fixture_inputs("tiny-bert").0
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
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

pub fn abs_sum(t: &Tensor) -> f32 {
    t.abs().unwrap().sum_all().unwrap().to_scalar().unwrap()
}

/// Writes `tensors` to safetensors bytes and reads them back.
pub fn round_trip(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let bytes = deltatune_core::to_safetensors_bytes(tensors).unwrap();
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

pub fn eval_logits(m: &BertClassifier) -> Tensor {
    m.forward(&inputs(), &Ctx::eval()).unwrap()
}

/// Sets every trainable whose key contains `part` to random values (so that tensors behind a
/// zero-initialised one get a gradient too).
pub fn randomise(trainables: &[Trainable], part: &str, seed: u64, std: f64) {
    let mut r = Rng::new(seed);
    for t in trainables.iter().filter(|t| t.key.contains(part)) {
        let v = r.normal_tensor(t.var.dims(), std).unwrap();
        t.var.set(&v).unwrap();
    }
}

/// One training forward/backward on the tiny batch: every trainable gets a non-zero gradient,
/// no frozen base tensor gets one.
pub fn check_gradients(m: &BertClassifier, trainables: &[Trainable], what: &str) {
    let logits = m.forward(&inputs(), &Ctx::train(Rng::new(5))).unwrap();
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    for t in trainables {
        let g = grads
            .get(t.var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {}", t.key));
        assert!(abs_sum(g) > 0.0, "{what}: zero gradient for {}", t.key);
    }
    for (name, t) in m.named_tensors().unwrap() {
        if trainables
            .iter()
            .any(|tr| tr.var.as_tensor().id() == t.id())
        {
            continue;
        }
        assert!(
            grads.get(&t).is_none(),
            "{what}: frozen tensor {name} received a gradient"
        );
    }
}
