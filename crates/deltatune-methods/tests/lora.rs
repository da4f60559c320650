//! LoRA properties and PEFT compatibility, on the tiny random BERT of tests/fixtures.

mod common;

use common::*;
use deltatune_models::Backbone;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, HasSites, Rng, TargetModules};
use deltatune_methods::{load_state_dict, lora, state_dict, LoraConfig};

fn cfg(json: &str) -> LoraConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn zero_init_lora_leaves_output_unchanged() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let base = tiny();
    let before = base.forward(&inp, &Ctx::eval()).unwrap();
    let mut m = tiny();
    let c = cfg(
        r#"{"r": 4, "lora_alpha": 12, "target_modules": ["query", "key", "value", "dense"], "modules_to_save": null}"#,
    );
    lora::attach(&mut m, &c, &Rng::new(1)).unwrap();
    let after = m.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&before, &after), 0.0);
}

#[test]
fn merged_equals_unmerged_with_alpha_ne_r() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut m = tiny();
    // init_lora_weights = false: B random too, so the delta is non-zero; alpha / r = 3.
    let c = cfg(
        r#"{"r": 4, "lora_alpha": 12, "init_lora_weights": false, "target_modules": ["query", "value", "intermediate.dense"]}"#,
    );
    lora::attach(&mut m, &c, &Rng::new(7)).unwrap();
    let ctx = Ctx::eval();
    let unmerged = (
        m.encode(&inp, &ctx).unwrap(),
        m.forward(&inp, &ctx).unwrap(),
    );
    let base = tiny().encode(&inp, &ctx).unwrap();
    let moved = max_abs(&unmerged.0, &base);
    assert!(
        moved > 1e-2,
        "the delta must change the hidden states (moved {moved})"
    );
    for l in m.linears_mut() {
        l.merge().unwrap();
    }
    let merged = (
        m.encode(&inp, &ctx).unwrap(),
        m.forward(&inp, &ctx).unwrap(),
    );
    let d = max_abs(&merged.0, &unmerged.0).max(max_abs(&merged.1, &unmerged.1));
    assert!(d <= 1e-5, "merged differs from unmerged by {d}");
    for l in m.linears_mut() {
        l.unmerge().unwrap();
    }
    let back = m.encode(&inp, &ctx).unwrap();
    assert!(max_abs(&back, &unmerged.0) <= 1e-5);
}

#[test]
fn only_delta_params_get_gradients_and_all_of_them_do() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut m = tiny();
    let c = cfg(
        r#"{"r": 2, "lora_alpha": 5, "lora_dropout": 0.1, "init_lora_weights": false, "bias": "all",
            "target_modules": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]}"#,
    );
    let trainables = lora::attach(&mut m, &c, &Rng::new(3)).unwrap();
    // 2 layers x 6 targets x (A, B, bias) + pooler bias + classifier weight and bias + the
    // norms' biases (PEFT's `all`: the embeddings' and 2 per layer)
    let keys: Vec<&str> = trainables.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys.len(), 2 * 6 * 3 + 1 + 2 + 5, "{keys:?}");
    // Under PEFT's keys: a targeted layer's bias on its wrapped base layer.
    for k in [
        "base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.bias",
        "base_model.model.bert.pooler.dense.bias",
        "base_model.model.bert.embeddings.LayerNorm.bias",
        "base_model.model.bert.encoder.layer.0.output.LayerNorm.bias",
    ] {
        assert!(keys.contains(&k), "{k} not in {keys:?}");
    }
    let logits = m.forward(&inp, &Ctx::train(Rng::new(5))).unwrap();
    let labels = Tensor::new(&[0u32, 2, 1], &candle_core::Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    for t in &trainables {
        let g = grads
            .get(t.var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", t.key));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "zero gradient for {}", t.key);
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
            "frozen tensor {name} received a gradient"
        );
    }
}

#[test]
fn peft_adapter_loads_and_matches_peft_logits() {
    for dir in ["tiny-bert-lora", "tiny-bert-lora-rslora"] {
        let (inp, exp) = fixture_inputs(dir);
        let c: LoraConfig = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(dir).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let mut m = tiny();
        let tr = lora::attach(&mut m, &c, &Rng::new(0)).unwrap();
        let path = fixtures().join(dir).join("adapter_model.safetensors");
        load_state_dict(&tr, &load_map(&path), &path).unwrap();
        let logits = m.forward(&inp, &Ctx::eval()).unwrap();
        let d = max_abs(&logits, &exp["logits"]);
        assert!(d <= 1e-5, "{dir}: logits differ from PEFT's by {d}");
        for l in m.linears_mut() {
            l.merge().unwrap();
        }
        let merged = m.forward(&inp, &Ctx::eval()).unwrap();
        let d = max_abs(&merged, &exp["logits_merged"]);
        assert!(d <= 1e-5, "{dir}: merged logits differ from PEFT's by {d}");
    }
}

#[test]
fn save_then_load_is_identical() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut a = tiny();
    let c = cfg(r#"{"r": 3, "lora_alpha": 7, "init_lora_weights": false, "bias": "lora_only"}"#);
    let ta = lora::attach(&mut a, &c, &Rng::new(11)).unwrap();
    let bytes = deltatune_core::to_safetensors_bytes(&state_dict(&ta)).unwrap();
    let reread: BTreeMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let mut b = tiny();
    let tb = lora::attach(&mut b, &c, &Rng::new(999)).unwrap();
    load_state_dict(&tb, &reread, Path::new("mem")).unwrap();
    let la = a.forward(&inp, &Ctx::eval()).unwrap();
    let lb = b.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&la, &lb), 0.0);
    // The biases of targeted layers are saved under PEFT's `<layer>.base_layer.bias`; files of
    // deltatune before it wrote PEFT's key (`<layer>.bias`) load the same.
    let q = "base_model.model.bert.encoder.layer.0.attention.self.query";
    assert!(reread.contains_key(&format!("{q}.base_layer.bias")));
    let mut old = reread.clone();
    let t = old.remove(&format!("{q}.base_layer.bias")).unwrap();
    old.insert(format!("{q}.bias"), t);
    let mut c2 = tiny();
    let tc = lora::attach(&mut c2, &c, &Rng::new(5)).unwrap();
    load_state_dict(&tc, &old, Path::new("old.safetensors")).unwrap();
    assert_eq!(max_abs(&la, &c2.forward(&inp, &Ctx::eval()).unwrap()), 0.0);
    // An adapter with an extra or a misshapen tensor is refused by name.
    let mut extra = reread.clone();
    extra.insert(
        "base_model.model.foo.lora_A.weight".into(),
        Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let err = load_state_dict(&tb, &extra, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("foo.lora_A"), "{err}");
}

#[test]
fn target_that_matches_nothing_lists_nearest_modules() {
    let mut m = tiny();
    let c = cfg(r#"{"target_modules": ["qurey"]}"#);
    let err = lora::attach(&mut m, &c, &Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qurey") && err.contains("attention.self.query"),
        "{err}"
    );
    let c = LoraConfig {
        target_modules: TargetModules::Regex(r".*\.nothing".into()),
        ..LoraConfig::default()
    };
    let err = lora::attach(&mut m, &c, &Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no module"), "{err}");
    let err = lora::attach(&mut m, &cfg(r#"{"r": 0}"#), &Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`r`"), "{err}");
}

#[test]
fn peft_regex_and_suffix_semantics() {
    let list = TargetModules::Suffixes(vec!["query".into(), "output.dense".into()]);
    assert!(list
        .matches("bert.encoder.layer.0.attention.self.query")
        .unwrap());
    assert!(list
        .matches("bert.encoder.layer.0.attention.output.dense")
        .unwrap());
    assert!(!list
        .matches("bert.encoder.layer.0.attention.self.query_proj")
        .unwrap());
    let re = TargetModules::Regex(r".*layer\.1\..*value".into());
    assert!(re
        .matches("bert.encoder.layer.1.attention.self.value")
        .unwrap());
    // fullmatch: a prefix match is not enough
    assert!(!TargetModules::Regex("bert".into())
        .matches("bert.pooler.dense")
        .unwrap());
}
