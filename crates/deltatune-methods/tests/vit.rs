//! Every method on the Vision Transformer (the tiny random ViT of tests/fixtures): LoRA on the
//! attention, IA3, BitFit, prompt and visual prompt tuning (shallow and deep), prefixes,
//! bottleneck adapters, AdaptFormer's parallel adapter and a gated composition attach through
//! the model's named sites and train every parameter they add, and nothing frozen.

mod common;

use candle_core::Tensor;
use common::{abs_sum, fixtures, load_map, max_abs, randomise};
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_methods::compose::ComposeConfig;
use deltatune_methods::DeltaConfig;
use deltatune_models::VitClassifier;
use serde_json::json;

fn tiny_vit() -> VitClassifier {
    VitClassifier::load(&fixtures().join("tiny-vit"), 3, &mut Rng::new(0)).unwrap()
}

fn pixels() -> Tensor {
    load_map(&fixtures().join("tiny-vit/expected.safetensors"))["square.pixels"].clone()
}

fn configs() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "lora",
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                   "target_modules": ["query", "value"]}),
        ),
        (
            "lora-all-linear",
            json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "all-linear"}),
        ),
        (
            "ia3",
            json!({"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
                   "feedforward_modules": ["output.dense"]}),
        ),
        ("bitfit", json!({"peft_type": "BITFIT"})),
        (
            "prompt",
            json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}),
        ),
        (
            "vpt-shallow",
            json!({"peft_type": "VISUAL_PROMPT_TUNING", "num_virtual_tokens": 3}),
        ),
        (
            "vpt-deep",
            json!({"peft_type": "VISUAL_PROMPT_TUNING", "num_virtual_tokens": 3, "deep": true}),
        ),
        (
            "prefix",
            json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3,
                   "prefix_projection": true, "encoder_hidden_size": 16}),
        ),
        (
            "adapter",
            json!({"peft_type": "BOTTLENECK_ADAPTER", "reduction_factor": 8}),
        ),
        (
            "adaptformer",
            json!({"peft_type": "BOTTLENECK_ADAPTER", "placement": "parallel",
                   "parallel_sites": ["feed_forward"], "reduction_factor": 8, "scaling": 0.1}),
        ),
    ]
}

fn unipelt() -> DeltaConfig {
    let members = [
        json!({"peft_type": "LORA", "r": 2, "target_modules": ["query", "value"]}),
        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2}),
        json!({"peft_type": "BOTTLENECK_ADAPTER", "reduction_factor": 8}),
    ]
    .into_iter()
    .map(|v| DeltaConfig::from_json(v).unwrap())
    .collect();
    DeltaConfig::Compose(ComposeConfig::new(members, true))
}

fn loss(m: &VitClassifier) -> Tensor {
    let logits = m.forward(&pixels(), &Ctx::train(Rng::new(5))).unwrap();
    let labels = Tensor::new(&[0u32, 2], logits.device()).unwrap();
    candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
}

#[test]
fn every_method_trains_every_parameter_on_the_vit() {
    let base = tiny_vit();
    let base_logits = base.forward(&pixels(), &Ctx::eval()).unwrap();
    let mut all: Vec<(&str, DeltaConfig)> = configs()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                DeltaConfig::from_json(v).unwrap_or_else(|e| panic!("{n}: {e}")),
            )
        })
        .collect();
    all.push(("unipelt", unipelt()));
    for (name, cfg) in all {
        let mut m = base.clone();
        let tr = cfg
            .attach(&mut m, &Rng::new(1), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            tr.iter().any(|t| t.key.contains("classifier")),
            "{name}: the head trains"
        );
        if matches!(name, "lora" | "lora-all-linear" | "adapter" | "adaptformer") {
            let d = max_abs(&m.forward(&pixels(), &Ctx::eval()).unwrap(), &base_logits);
            assert!(
                d < 1e-5,
                "{name}: zero-init delta changed the logits by {d}"
            );
        }
        for part in ["lora_B", "up", "gate"] {
            randomise(&tr, part, 7, 0.1);
        }
        let grads = loss(&m).backward().unwrap();
        for t in &tr {
            let g = grads
                .get(t.var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {}", t.key));
            assert!(abs_sum(g) > 0.0, "{name}: zero gradient for {}", t.key);
        }
        for l in m.linears() {
            if l.path != "classifier" {
                assert!(
                    grads.get(&l.weight).is_none(),
                    "{name}: frozen {} received a gradient",
                    l.path
                );
            }
        }
    }
}

/// Deep prompts replace the previous layer's outputs at the prompt positions: with the same
/// input prompts, deep and shallow runs differ by what enters the later layers.
#[test]
fn deep_prompts_enter_every_layer() {
    let base = tiny_vit();
    let run = |deep: bool| {
        let mut m = base.clone();
        let cfg = DeltaConfig::from_json(json!({"peft_type": "VISUAL_PROMPT_TUNING",
            "num_virtual_tokens": 2, "deep": deep}))
        .unwrap();
        let tr = cfg.attach(&mut m, &Rng::new(4), None).unwrap();
        let prompts = &tr.iter().find(|t| t.key == "vpt_prompts").unwrap().var;
        (m, prompts.clone())
    };
    let (shallow, ps) = run(false);
    let (deep, pd) = run(true);
    assert_eq!(ps.dims(), &[1, 2, 32]);
    assert_eq!(pd.dims(), &[2, 2, 32]);
    // Same input prompts in both: the deep run's first set.
    ps.set(&pd.as_tensor().narrow(0, 0, 1).unwrap()).unwrap();
    let ctx = Ctx::eval();
    let a = shallow.forward(&pixels(), &ctx).unwrap();
    let b = deep.forward(&pixels(), &ctx).unwrap();
    assert!(max_abs(&a, &b) > 1e-4, "layer 1's prompts changed nothing");
    // Both insert the same number of vectors; only what enters layer 1 differs.
    let (_, na) = shallow.encode(&pixels(), &ctx).unwrap();
    let (_, nb) = deep.encode(&pixels(), &ctx).unwrap();
    assert_eq!((na, nb), (2, 2));
}

/// The two references: the linear probe trains only the head; full fine-tuning trains every
/// base tensor (each gets a gradient), and the saved keys cover the whole checkpoint.
#[test]
fn linear_probe_and_full_finetuning_train_what_they_say() {
    use deltatune_models::Backbone;
    let base = tiny_vit();
    let mut m = base.clone();
    let probe = DeltaConfig::from_json(json!({"peft_type": "LINEAR_PROBE"})).unwrap();
    let tr = probe.attach(&mut m, &Rng::new(1), None).unwrap();
    let keys: Vec<&str> = tr.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "base_model.model.classifier.weight",
            "base_model.model.classifier.bias"
        ]
    );

    let mut m = base.clone();
    let full = DeltaConfig::from_json(json!({"peft_type": "FULL_FINETUNE"})).unwrap();
    let tr = full.attach(&mut m, &Rng::new(1), None).unwrap();
    let grads = loss(&m).backward().unwrap();
    for t in &tr {
        let g = grads
            .get(t.var.as_tensor())
            .unwrap_or_else(|| panic!("full: no gradient for {}", t.key));
        assert!(abs_sum(g) > 0.0, "full: zero gradient for {}", t.key);
    }
    // Every tensor of the checkpoint trains (the unused mask token aside).
    let trained: std::collections::BTreeSet<String> = tr
        .iter()
        .map(|t| t.key.trim_start_matches("base_model.model.").to_string())
        .collect();
    for (k, _) in base.named_tensors().unwrap() {
        assert!(
            trained.contains(&k) || k.ends_with("mask_token"),
            "full fine-tuning leaves {k} frozen"
        );
    }
}
