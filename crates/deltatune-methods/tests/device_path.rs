//! The composed path, the one a device without our kernels (a GPU) takes, run on the CPU with
//! `ops::portable::force`: a training step of each model family with deltas on every kind of
//! site gives the loss and the gradients of every trainable parameter that the CPU kernels
//! give.

mod common;

use candle_core::{DType, Tensor};
use common::{fixtures, inputs, load_map, max_abs, randomise, tiny};
use deltatune_core::{ops, Ctx, Rng};
use deltatune_methods::compose::ComposeConfig;
use deltatune_methods::{DeltaConfig, Trainable};
use deltatune_models::{Decoder, VitClassifier};
use serde_json::json;

/// UniPELT (gated LoRA + prefix + adapter) plus IA3: deltas on the attention products, keys and
/// values, feed-forward activations and sub-layer outputs, so every op of the layer runs.
fn deltas(lora_targets: serde_json::Value, ia3: serde_json::Value) -> DeltaConfig {
    let members = [
        json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": lora_targets}),
        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2,
               "prefix_projection": true, "encoder_hidden_size": 8}),
        json!({"peft_type": "BOTTLENECK_ADAPTER", "reduction_factor": 8}),
        ia3,
    ]
    .into_iter()
    .map(|v| DeltaConfig::from_json(v).unwrap())
    .collect();
    let mut c = ComposeConfig::new(members, true);
    c.common.modules_to_save = None;
    DeltaConfig::Compose(c)
}

/// The loss of `step` and the gradient of each trainable, through the kernels or composed.
fn step(tr: &[Trainable], composed: bool, step: &dyn Fn() -> Tensor) -> (f32, Vec<Tensor>) {
    let _guard = composed.then(ops::portable::force);
    let loss = step();
    let grads = loss.backward().unwrap();
    let g = tr
        .iter()
        .map(|t| {
            grads
                .get(t.var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {} (composed: {composed})", t.key))
                .clone()
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

fn check(name: &str, tr: &[Trainable], f: &dyn Fn() -> Tensor) {
    for part in ["lora_B", "up", "gate"] {
        randomise(tr, part, 7, 0.1);
    }
    let (loss, g) = step(tr, false, f);
    let (loss_c, g_c) = step(tr, true, f);
    assert!(
        (loss - loss_c).abs() <= 1e-5 * loss.abs().max(1.0),
        "{name}: loss {loss} through the kernels, {loss_c} composed"
    );
    for (t, (a, b)) in tr.iter().zip(g.iter().zip(&g_c)) {
        let scale = a
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap();
        let scale = scale.max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-3);
        let d = max_abs(a, b);
        assert!(
            d <= 1e-4 * scale,
            "{name}: gradient of {} differs by {d} (largest entry {scale})",
            t.key
        );
    }
}

#[test]
fn bert_step_is_the_same_composed() {
    let mut m = tiny();
    let cfg = deltas(
        json!(["query", "value", "intermediate.dense"]),
        json!({"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
               "feedforward_modules": ["output.dense"]}),
    );
    let tr = cfg.attach(&mut m, &Rng::new(1), None).unwrap();
    let labels = [0u32, 2, 1];
    check("bert", &tr, &|| {
        let logits = m.forward(&inputs(), &Ctx::train(Rng::new(5))).unwrap();
        ops::cross_entropy(&logits, &labels).unwrap()
    });
}

#[test]
fn vit_step_is_the_same_composed() {
    let mut m = VitClassifier::load(&fixtures().join("tiny-vit"), 3, &mut Rng::new(0)).unwrap();
    let cfg = deltas(
        json!(["query", "value"]),
        json!({"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
               "feedforward_modules": ["output.dense"]}),
    );
    let tr = cfg.attach(&mut m, &Rng::new(1), None).unwrap();
    let pixels =
        load_map(&fixtures().join("tiny-vit/expected.safetensors"))["square.pixels"].clone();
    check("vit", &tr, &|| {
        let logits = m.forward(&pixels, &Ctx::train(Rng::new(5))).unwrap();
        ops::cross_entropy(&logits, &[0, 2]).unwrap()
    });
}

#[test]
fn llama_step_is_the_same_composed() {
    let mut m = Decoder::load(&fixtures().join("tiny-llama")).unwrap();
    let mut cfg = deltas(
        json!(["q_proj", "v_proj", "gate_proj"]),
        json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
               "feedforward_modules": ["down_proj"]}),
    );
    if let DeltaConfig::Compose(c) = &mut cfg {
        c.common.task_type = Some("CAUSAL_LM".into());
    }
    let tr = cfg.attach(&mut m, &Rng::new(1), None).unwrap();
    let exp = load_map(&fixtures().join("tiny-llama/expected.safetensors"));
    let rows =
        |k: &str| -> Vec<Vec<u32>> { exp[k].to_dtype(DType::U32).unwrap().to_vec2().unwrap() };
    let (ids, mask) = (rows("input_ids"), rows("attention_mask"));
    check("llama", &tr, &|| {
        let logits = m
            .forward(&ids, &mask, None, &Ctx::train(Rng::new(3)))
            .unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        let n = ids[0].len();
        // Predict token j + 1 from position j (prefix keys do not add positions).
        let logits = logits
            .narrow(1, t - n, n - 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b * (n - 1), v))
            .unwrap();
        let targets: Vec<u32> = ids.iter().flat_map(|r| r[1..].to_vec()).collect();
        ops::cross_entropy(&logits, &targets).unwrap()
    });
}
