//! BitFit and (IA)^3 properties and PEFT IA3 compatibility, on the tiny random BERT of
//! tests/fixtures (hidden 32, 2 layers, intermediate 48, 3 labels).

mod common;

use common::*;
use deltatune_models::Backbone;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use deltatune_core::{Ctx, HasSites, Rng, TargetModules};
use deltatune_methods::bitfit::{self, BitFitConfig};
use deltatune_methods::ia3::{self, IA3Config};
use deltatune_methods::{load_state_dict, state_dict, Trainable};
use deltatune_models::{BertClassifier, Inputs};

fn keys(t: &[Trainable]) -> Vec<String> {
    t.iter().map(|t| t.key.clone()).collect()
}

/// One forward/backward in training mode: every trainable gets a non-zero gradient, no frozen
/// tensor of the model gets one.
fn check_gradients(m: &BertClassifier, inp: &Inputs, trainables: &[Trainable]) {
    let logits = m.forward(inp, &Ctx::train(Rng::new(5))).unwrap();
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    for t in trainables {
        let g = grads
            .get(t.var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", t.key));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "zero gradient for {}", t.key);
    }
    let mut frozen = 0;
    for (name, t) in m.named_tensors().unwrap() {
        if trainables
            .iter()
            .any(|tr| tr.var.as_tensor().id() == t.id())
        {
            continue;
        }
        frozen += 1;
        assert!(
            grads.get(&t).is_none(),
            "frozen tensor {name} received a gradient"
        );
    }
    assert!(frozen > 0);
}

fn roundtrip(trainables: &[Trainable]) -> BTreeMap<String, Tensor> {
    let bytes = deltatune_core::to_safetensors_bytes(&state_dict(trainables)).unwrap();
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Adds `N(0, std)` noise to every trainable, so that the adapter changes the model.
fn perturb(trainables: &[Trainable], seed: u64, std: f64) {
    let mut rng = Rng::new(seed);
    for t in trainables {
        let noise = rng.normal_tensor(t.var.dims(), std).unwrap();
        t.var.set(&(t.var.as_tensor() + noise).unwrap()).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// BitFit
// ---------------------------------------------------------------------------------------------

fn bitfit_cfg(json: &str) -> BitFitConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn bitfit_trains_every_bias_and_the_head() {
    let mut m = tiny();
    let tr = bitfit::attach(&mut m, &BitFitConfig::default(), &Rng::new(0)).unwrap();
    let k = keys(&tr);
    // 2 layers x 6 linear biases + pooler bias; embeddings LN + 2 x 2 layer LN; classifier w, b.
    assert_eq!(tr.len(), 2 * 6 + 1 + 1 + 2 * 2 + 2, "{k:?}");
    for l in 0..2 {
        let p = format!("base_model.model.bert.encoder.layer.{l}");
        for lin in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            assert!(k.contains(&format!("{p}.{lin}.bias")), "{lin} in {k:?}");
        }
        assert!(k.contains(&format!("{p}.attention.output.LayerNorm.bias")));
        assert!(k.contains(&format!("{p}.output.LayerNorm.bias")));
    }
    for key in [
        "base_model.model.bert.embeddings.LayerNorm.bias",
        "base_model.model.bert.pooler.dense.bias",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    ] {
        assert!(k.contains(&key.to_string()), "{key} in {k:?}");
    }
    // Only the classifier weight decays.
    let decayed: Vec<&str> = tr
        .iter()
        .filter(|t| t.decay)
        .map(|t| t.key.as_str())
        .collect();
    assert_eq!(decayed, ["base_model.model.classifier.weight"]);
    let n: usize = tr.iter().map(|t| t.var.elem_count()).sum();
    // biases: per layer 32*3 + 32 + 48 + 32 = 208; pooler 32; norms 5 x 32; head 99.
    assert_eq!(n, 2 * 208 + 32 + 5 * 32 + 99);

    let no_norms = bitfit::attach(
        &mut tiny(),
        &bitfit_cfg(r#"{"include_norms": false, "modules_to_save": null}"#),
        &Rng::new(0),
    )
    .unwrap();
    // Without modules_to_save the classifier bias is one more bias (its weight stays frozen).
    assert_eq!(no_norms.len(), 2 * 6 + 1 + 1, "{:?}", keys(&no_norms));
    assert!(keys(&no_norms).contains(&"base_model.model.classifier.bias".to_string()));
}

#[test]
fn bitfit_pattern_selects_only_matching_biases() {
    let mut m = tiny();
    let c = bitfit_cfg(r#"{"bias_pattern": ["query", "LayerNorm"]}"#);
    let tr = bitfit::attach(&mut m, &c, &Rng::new(0)).unwrap();
    let mut k = keys(&tr);
    k.sort();
    let mut want = vec![
        "base_model.model.bert.embeddings.LayerNorm.bias".to_string(),
        "base_model.model.classifier.bias".into(),
        "base_model.model.classifier.weight".into(),
    ];
    for l in 0..2 {
        let p = format!("base_model.model.bert.encoder.layer.{l}");
        want.push(format!("{p}.attention.self.query.bias"));
        want.push(format!("{p}.attention.output.LayerNorm.bias"));
        want.push(format!("{p}.output.LayerNorm.bias"));
    }
    want.sort();
    assert_eq!(k, want);

    let re = BitFitConfig {
        bias_pattern: Some(TargetModules::Regex(r".*layer\.1\..*dense".into())),
        ..BitFitConfig::default()
    };
    let tr = bitfit::attach(&mut tiny(), &re, &Rng::new(0)).unwrap();
    assert_eq!(tr.len(), 3 + 2, "{:?}", keys(&tr));

    // A pattern that matches nothing names the nearest modules.
    let err = bitfit::attach(
        &mut tiny(),
        &bitfit_cfg(r#"{"bias_pattern": ["qurey"]}"#),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("qurey") && err.contains("attention.self.query"),
        "{err}"
    );
    let err = bitfit::attach(
        &mut tiny(),
        &bitfit_cfg(r#"{"peft_type": "LORA"}"#),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`peft_type`"), "{err}");
}

#[test]
fn bitfit_gradients_reach_only_trainables() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut m = tiny();
    let tr = bitfit::attach(&mut m, &BitFitConfig::default(), &Rng::new(0)).unwrap();
    check_gradients(&m, &inp, &tr);
}

#[test]
fn bitfit_starts_at_the_base_model_and_round_trips() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let base = tiny().forward(&inp, &Ctx::eval()).unwrap();
    let mut a = tiny();
    let ta = bitfit::attach(&mut a, &BitFitConfig::default(), &Rng::new(0)).unwrap();
    assert_eq!(max_abs(&a.forward(&inp, &Ctx::eval()).unwrap(), &base), 0.0);
    perturb(&ta, 3, 0.2);
    let la = a.forward(&inp, &Ctx::eval()).unwrap();
    assert!(max_abs(&la, &base) > 1e-2);
    // Merging is a no-op: BitFit attaches no delta.
    for l in a.linears_mut() {
        assert!(l.deltas.is_empty());
        l.merge().unwrap();
    }
    assert_eq!(max_abs(&a.forward(&inp, &Ctx::eval()).unwrap(), &la), 0.0);
    assert!(bitfit::MERGE_NOTE.contains("nothing to merge"));

    let reread = roundtrip(&ta);
    let mut b = tiny();
    let tb = bitfit::attach(&mut b, &BitFitConfig::default(), &Rng::new(9)).unwrap();
    load_state_dict(&tb, &reread, Path::new("mem")).unwrap();
    let lb = b.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&la, &lb), 0.0);
}

// ---------------------------------------------------------------------------------------------
// IA3
// ---------------------------------------------------------------------------------------------

fn ia3_cfg(json: &str) -> IA3Config {
    serde_json::from_str(json).unwrap()
}

#[test]
fn ia3_default_sites_shapes_and_param_count() {
    let mut m = tiny();
    let tr = ia3::attach(&mut m, &IA3Config::default(), &Rng::new(0)).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = tr
        .iter()
        .map(|t| (t.key.clone(), t.var.dims().to_vec()))
        .collect();
    let mut want = BTreeMap::new();
    for l in 0..2 {
        let p = format!("base_model.model.bert.encoder.layer.{l}");
        want.insert(format!("{p}.attention.self.key.ia3_l"), vec![32, 1]);
        want.insert(format!("{p}.attention.self.value.ia3_l"), vec![32, 1]);
        // PEFT's plain `endswith("output.dense")` makes the attention output feed-forward too.
        want.insert(format!("{p}.attention.output.dense.ia3_l"), vec![1, 32]);
        want.insert(format!("{p}.output.dense.ia3_l"), vec![1, 48]);
    }
    want.insert("base_model.model.classifier.weight".into(), vec![3, 32]);
    want.insert("base_model.model.classifier.bias".into(), vec![3]);
    assert_eq!(shapes, want);
    let n: usize = tr.iter().map(|t| t.var.elem_count()).sum();
    // PEFT reports 387 trainable parameters for this configuration (scripts/gen_ia3_fixture.py).
    assert_eq!(n, 387);
    assert!(tr
        .iter()
        .all(|t| t.decay == (t.key == "base_model.model.classifier.weight")));
}

#[test]
fn ia3_ones_leave_the_output_unchanged() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let before = tiny().forward(&inp, &Ctx::eval()).unwrap();
    let mut m = tiny();
    let c = ia3_cfg(
        r#"{"target_modules": ["query", "key", "value", "dense", "intermediate.dense"],
            "feedforward_modules": ["intermediate.dense"], "modules_to_save": null}"#,
    );
    ia3::attach(&mut m, &c, &Rng::new(1)).unwrap();
    let after = m.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&before, &after), 0.0);
}

#[test]
fn ia3_gradients_reach_only_trainables() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut m = tiny();
    let c = ia3_cfg(
        r#"{"target_modules": ["query", "key", "value", "dense", "intermediate.dense", "output.dense"],
            "feedforward_modules": ["intermediate.dense", "output.dense"]}"#,
    );
    let tr = ia3::attach(&mut m, &c, &Rng::new(2)).unwrap();
    // 2 layers x (q, k, v, attn out, intermediate, output) + pooler + classifier w, b
    assert_eq!(tr.len(), 2 * 6 + 1 + 2, "{:?}", keys(&tr));
    perturb(&tr, 4, 0.3);
    check_gradients(&m, &inp, &tr);
}

#[test]
fn ia3_merged_equals_unmerged_with_random_scalings() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let ctx = Ctx::eval();
    let base = tiny().encode(&inp, &ctx).unwrap();
    let mut m = tiny();
    // Output scaling on layers with biases (q, k, v, pooler) and input scaling on both kinds
    // of feed-forward layers.
    let c = ia3_cfg(
        r#"{"target_modules": ["query", "key", "value", "dense", "output.dense"],
            "feedforward_modules": ["output.dense"], "init_ia3_weights": false}"#,
    );
    let tr = ia3::attach(&mut m, &c, &Rng::new(7)).unwrap();
    // Random non-one scalings: 1 + N(0, 0.3) (N(0, 1) alone would shrink the signal a lot).
    for t in tr.iter().filter(|t| t.key.ends_with("ia3_l")) {
        let v = t.var.as_tensor().affine(0.3, 1.0).unwrap();
        t.var.set(&v).unwrap();
    }
    let unmerged = (
        m.encode(&inp, &ctx).unwrap(),
        m.forward(&inp, &ctx).unwrap(),
    );
    let moved = max_abs(&unmerged.0, &base);
    assert!(
        moved > 1e-2,
        "the scalings must change the states ({moved})"
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
    assert!(max_abs(&m.encode(&inp, &ctx).unwrap(), &unmerged.0) <= 1e-5);
}

#[test]
fn ia3_save_then_load_is_identical() {
    let (inp, _) = fixture_inputs("tiny-bert");
    let mut a = tiny();
    let c = IA3Config::default();
    let ta = ia3::attach(&mut a, &c, &Rng::new(11)).unwrap();
    perturb(&ta, 12, 0.3);
    let reread = roundtrip(&ta);
    let mut b = tiny();
    let tb = ia3::attach(&mut b, &c, &Rng::new(999)).unwrap();
    load_state_dict(&tb, &reread, Path::new("mem")).unwrap();
    let la = a.forward(&inp, &Ctx::eval()).unwrap();
    let lb = b.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&la, &lb), 0.0);
    // An adapter saved with other feed-forward modules has other shapes: refused by key.
    let mut c2 = tiny();
    let other = ia3_cfg(r#"{"feedforward_modules": []}"#);
    let t2 = ia3::attach(&mut c2, &other, &Rng::new(0)).unwrap();
    let err = load_state_dict(&t2, &reread, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("output.dense.ia3_l"), "{err}");
}

#[test]
fn ia3_peft_adapter_loads_and_matches_peft_logits() {
    let dir = "tiny-bert-ia3";
    let (inp, exp) = fixture_inputs(dir);
    let c: IA3Config = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(dir).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut m = tiny();
    let tr = ia3::attach(&mut m, &c, &Rng::new(0)).unwrap();
    let path = fixtures().join(dir).join("adapter_model.safetensors");
    load_state_dict(&tr, &load_map(&path), &path).unwrap();
    let logits = m.forward(&inp, &Ctx::eval()).unwrap();
    let d = max_abs(&logits, &exp["logits"]);
    assert!(d <= 1e-5, "logits differ from PEFT's by {d}");
    for l in m.linears_mut() {
        l.merge().unwrap();
    }
    let merged = m.forward(&inp, &Ctx::eval()).unwrap();
    let d = max_abs(&merged, &exp["logits_merged"]);
    assert!(d <= 1e-5, "merged logits differ from PEFT's by {d}");
    // The config round-trips through serde.
    let again: IA3Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn ia3_config_errors_name_the_field() {
    let mut m = tiny();
    let err = ia3::attach(
        &mut m,
        &ia3_cfg(
            r#"{"target_modules": ["key", "value"], "feedforward_modules": ["output.dense"]}"#,
        ),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`feedforward_modules`") && err.contains("output.dense"),
        "{err}"
    );
    let err = ia3::attach(
        &mut m,
        &ia3_cfg(r#"{"fan_in_fan_out": true}"#),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`fan_in_fan_out`"), "{err}");
    let err = ia3::attach(
        &mut m,
        &ia3_cfg(r#"{"target_modules": ["kye"], "feedforward_modules": []}"#),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kye") && err.contains("attention.self.key"),
        "{err}"
    );
    let err = ia3::attach(
        &mut m,
        &ia3_cfg(r#"{"exclude_modules": ["key"]}"#),
        &Rng::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`exclude_modules`"), "{err}");
}
