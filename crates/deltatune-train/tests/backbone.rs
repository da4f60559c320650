//! The model layer: every family behind one `Backbone` trait, checked by code that knows no
//! family. The same generic checks run on the BERT encoder and the Llama decoder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Rng, Weights};
use deltatune_methods::DeltaConfig;
use deltatune_models::{Backbone, BertClassifier, Decoder, Pooling, TextBackbone};
use deltatune_train::{predict_proba, Encoded};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const SEQS: [&[u32]; 3] = [&[1, 5, 9, 4, 2], &[1, 7, 2], &[1, 3, 3, 8, 6, 11, 2]];

fn seqs() -> Vec<Vec<u32>> {
    SEQS.iter().map(|s| s.to_vec()).collect()
}

/// Every base tensor the backbone names is in its checkpoint under that key, with the same
/// values; the checkpoint holds nothing the backbone leaves out (ties excepted).
fn named_tensors_are_the_checkpoint<B: Backbone>(m: &B, file: &Path, ignored: &[&str]) {
    let w = Weights::load(file, DType::F32).unwrap();
    let named: BTreeMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
    for (k, t) in &named {
        let Some((_, want)) = w.tensors().find(|(n, _)| n == k) else {
            panic!("{k} is not in {}", file.display());
        };
        assert_eq!(t.dims(), want.dims(), "{k}");
        assert!(max_abs_diff(t, want) == 0.0, "{k} differs from the file");
    }
    for k in w.keys() {
        assert!(
            named.contains_key(k) || ignored.iter().any(|i| k.ends_with(i)),
            "{k} of the checkpoint is not among the backbone's tensors"
        );
    }
    assert_eq!(m.device().location(), candle_core::DeviceLocation::Cpu);
}

/// A zero-initialised LoRA on every linear layer leaves the hidden states unchanged, and a
/// trained-looking (random B) one changes them: the forward pass reads the attached deltas.
fn hidden_states_follow_the_deltas<B: TextBackbone + Clone>(m: &B) {
    let ctx = Ctx::eval();
    let batch = m.token_batch(&seqs()).unwrap();
    let before = m.hidden_states(&batch, &ctx).unwrap();
    assert_eq!(before.dims()[0], SEQS.len());
    assert_eq!(before.dims()[2], m.hidden_size());

    let lora = |init: bool| {
        DeltaConfig::from_json(serde_json::json!({
            "peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": "all-linear",
            "modules_to_save": null, "init_lora_weights": init,
        }))
        .unwrap()
    };
    let mut zero = m.clone();
    lora(true).attach(&mut zero, &Rng::new(3), None).unwrap();
    let same = zero.hidden_states(&batch, &ctx).unwrap();
    assert!(max_abs_diff(&before, &same) < 1e-6);

    let mut moved = m.clone();
    lora(false).attach(&mut moved, &Rng::new(3), None).unwrap();
    let other = moved.hidden_states(&batch, &ctx).unwrap();
    assert!(max_abs_diff(&before, &other) > 1e-3);
}

#[test]
fn the_encoder_is_a_backbone() {
    let dir = fixture("tiny-bert");
    let m = BertClassifier::load(&dir, 3, Pooling::Cls, &mut Rng::new(0)).unwrap();
    // The checkpoint's pooler is a base tensor; the head is initialised (not in the file).
    named_tensors_are_the_checkpoint(&m, &dir.join("model.safetensors"), &["position_ids"]);
    hidden_states_follow_the_deltas(&m);
}

#[test]
fn the_decoder_is_a_backbone() {
    let dir = fixture("tiny-llama");
    let m = Decoder::load(&dir).unwrap();
    named_tensors_are_the_checkpoint(&m, &dir.join("model.safetensors"), &[]);
    hidden_states_follow_the_deltas(&m);
}

/// Class probabilities through the generic batching equal the model's own forward pass on the
/// same rows, whatever order the length-sorted batches take.
#[test]
fn generic_predict_proba_equals_the_models_own_forward() {
    let m = BertClassifier::load(&fixture("tiny-bert"), 3, Pooling::Cls, &mut Rng::new(0)).unwrap();
    let data = Encoded {
        ids: seqs(),
        labels: vec![0, 1, 2],
    };
    let probs = predict_proba(&m, &data, 2).unwrap();
    for (i, s) in seqs().iter().enumerate() {
        let own = m
            .forward(&m.inputs(std::slice::from_ref(s)).unwrap(), &Ctx::eval())
            .unwrap();
        let own = candle_nn::ops::softmax_last_dim(&own)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        for (a, b) in own.iter().zip(&probs[i]) {
            assert!((a - b).abs() < 1e-5, "row {i}: {own:?} vs {:?}", probs[i]);
        }
    }
}
