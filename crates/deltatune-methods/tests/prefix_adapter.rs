//! Prefix tuning and bottleneck adapters, on the tiny random BERT of tests/fixtures
//! (hidden 32, 2 layers, 4 heads).

mod common;

use common::*;
use deltatune_models::Backbone;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use deltatune_core::hooks::SiteDelta;
use deltatune_core::{Ctx, Rng};
use deltatune_methods::adapter::{self, BottleneckConfig};
use deltatune_methods::prefix::{self, PrefixDelta, PrefixSource, PrefixTuningConfig};
use deltatune_methods::{load_state_dict, state_dict, Trainable};
use deltatune_models::BertClassifier;

fn prefix_cfg(json: &str) -> PrefixTuningConfig {
    serde_json::from_str(json).unwrap()
}

fn adapter_cfg(json: &str) -> BottleneckConfig {
    serde_json::from_str(json).unwrap()
}

/// The keys and shapes of `trainables`, sorted.
fn shapes(trainables: &[Trainable]) -> BTreeMap<String, Vec<usize>> {
    trainables
        .iter()
        .map(|t| (t.key.clone(), t.var.dims().to_vec()))
        .collect()
}

fn expect_shapes(trainables: &[Trainable], mut want: BTreeMap<String, Vec<usize>>) {
    want.insert(CLS_W.into(), vec![3, H]);
    want.insert(CLS_B.into(), vec![3]);
    assert_eq!(trainables.len(), want.len(), "duplicate keys?");
    assert_eq!(shapes(trainables), want);
}

/// The adapter keys and shapes for `sites` ("attention.output", "output") of every layer.
fn adapter_shapes(sites: &[&str], b: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    for i in 0..L {
        for s in sites {
            let p = format!("base_model.model.bert.encoder.layer.{i}.{s}.adapter");
            m.insert(format!("{p}.down.weight"), vec![b, H]);
            m.insert(format!("{p}.down.bias"), vec![b]);
            m.insert(format!("{p}.up.weight"), vec![H, b]);
            m.insert(format!("{p}.up.bias"), vec![H]);
        }
    }
    m
}

/// Sets every adapter `up` tensor to random values, so that `down` gets a gradient too.
fn randomise_up(trainables: &[Trainable], seed: u64) {
    let mut r = Rng::new(seed);
    for t in trainables.iter().filter(|t| t.key.contains(".adapter.up.")) {
        let v = r.normal_tensor(t.var.dims(), 0.3).unwrap();
        t.var.set(&v).unwrap();
    }
}

/// One training forward/backward: every trainable gets a non-zero gradient, no frozen base
/// tensor gets one.
fn check_gradients(m: &BertClassifier, trainables: &[Trainable], what: &str) {
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

#[test]
fn prefix_without_projection_trains_and_round_trips() {
    let c = prefix_cfg(r#"{"num_virtual_tokens": 5}"#);
    let mut m = tiny();
    let tr = prefix::attach(&mut m, &c, &Rng::new(1)).unwrap();
    expect_shapes(
        &tr,
        BTreeMap::from([("prompt_embeddings".to_string(), vec![5, L * 2 * H])]),
    );
    let moved = max_abs(&eval_logits(&m), &eval_logits(&tiny()));
    assert!(moved > 0.0, "the prefixes must change the logits");
    check_gradients(&m, &tr, "prefix");

    let reread = round_trip(&prefix::export(&tr).unwrap());
    let mut m2 = tiny();
    let tr2 = prefix::attach_folded(&mut m2, &c, &Rng::new(99)).unwrap();
    assert_ne!(max_abs(&eval_logits(&m), &eval_logits(&m2)), 0.0);
    load_state_dict(&tr2, &reread, Path::new("mem")).unwrap();
    assert_eq!(max_abs(&eval_logits(&m), &eval_logits(&m2)), 0.0);
}

#[test]
fn prefix_with_projection_trains_exports_folded_and_round_trips() {
    let c = prefix_cfg(
        r#"{"num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16}"#,
    );
    let mut m = tiny();
    let tr = prefix::attach(&mut m, &c, &Rng::new(2)).unwrap();
    expect_shapes(
        &tr,
        BTreeMap::from([
            (prefix::ENCODER_EMBEDDING_KEY.to_string(), vec![4, H]),
            (prefix::ENCODER_W1_KEY.to_string(), vec![16, H]),
            (prefix::ENCODER_B1_KEY.to_string(), vec![16]),
            (prefix::ENCODER_W2_KEY.to_string(), vec![L * 2 * H, 16]),
            (prefix::ENCODER_B2_KEY.to_string(), vec![L * 2 * H]),
        ]),
    );
    check_gradients(&m, &tr, "prefix projection");

    let exported = prefix::export(&tr).unwrap();
    assert_eq!(
        exported.keys().cloned().collect::<Vec<_>>(),
        vec![
            CLS_B.to_string(),
            CLS_W.to_string(),
            prefix::PREFIX_KEY.to_string()
        ]
    );
    assert_eq!(exported[prefix::PREFIX_KEY].dims(), &[4, L * 2 * H]);
    let reread = round_trip(&exported);
    let mut folded = tiny();
    let trf = prefix::attach_folded(&mut folded, &c, &Rng::new(77)).unwrap();
    expect_shapes(
        &trf,
        BTreeMap::from([(prefix::PREFIX_KEY.to_string(), vec![4, L * 2 * H])]),
    );
    load_state_dict(&trf, &reread, Path::new("mem")).unwrap();
    let d = max_abs(&eval_logits(&m), &eval_logits(&folded));
    assert!(
        d <= 1e-5,
        "folded logits differ from the training form by {d}"
    );

    // The folded form saves and loads exactly.
    let again = round_trip(&state_dict(&trf));
    let mut m3 = tiny();
    let tr3 = prefix::attach_folded(&mut m3, &c, &Rng::new(5)).unwrap();
    load_state_dict(&tr3, &again, Path::new("mem")).unwrap();
    assert_eq!(max_abs(&eval_logits(&folded), &eval_logits(&m3)), 0.0);
}

#[test]
fn prefix_table_layout_is_peft_and_layers_selects() {
    // Columns [l*2h, l*2h+h) are layer l's keys, the next h its values (PEFT's view(.., L*2,
    // heads, head_dim) then split(2)).
    let (p, h) = (2usize, 3usize);
    let vals: Vec<f32> = (0..p * L * 2 * h).map(|i| i as f32).collect();
    let table = Tensor::from_vec(vals, (p, L * 2 * h), &Device::Cpu).unwrap();
    let d = PrefixDelta {
        source: PrefixSource::Table(table.clone()),
        hidden: h,
        enabled: vec![false, true],
    };
    let ctx = Ctx::eval();
    assert!(d.prefix(0, &ctx).unwrap().is_none());
    let (k, v) = d.prefix(1, &ctx).unwrap().unwrap();
    assert_eq!(
        k.to_vec2::<f32>().unwrap(),
        vec![vec![6., 7., 8.], vec![18., 19., 20.]]
    );
    assert_eq!(
        v.to_vec2::<f32>().unwrap(),
        vec![vec![9., 10., 11.], vec![21., 22., 23.]]
    );

    // With layers [1], the columns of layer 0 are unused: no gradient reaches them.
    let mut m = tiny();
    let c = prefix_cfg(r#"{"num_virtual_tokens": 3, "layers": [1]}"#);
    let tr = prefix::attach(&mut m, &c, &Rng::new(3)).unwrap();
    let logits = m.forward(&inputs(), &Ctx::eval()).unwrap();
    let grads = logits.sum_all().unwrap().backward().unwrap();
    let g = grads.get(tr[0].var.as_tensor()).unwrap();
    assert_eq!(abs_sum(&g.narrow(1, 0, 2 * H).unwrap()), 0.0);
    assert!(abs_sum(&g.narrow(1, 2 * H, 2 * H).unwrap()) > 0.0);
}

#[test]
fn adapters_start_unchanged_train_and_round_trip() {
    let base = eval_logits(&tiny());
    let cases: [(&str, &str, &[&str], usize); 5] = [
        (
            "houlsby",
            r#"{"reduction_factor": 4}"#,
            &["attention.output", "output"],
            8,
        ),
        (
            "pfeiffer",
            r#"{"placement": "pfeiffer", "bottleneck_size": 5, "non_linearity": "gelu"}"#,
            &["output"],
            5,
        ),
        (
            "parallel",
            r#"{"placement": "parallel", "reduction_factor": 8, "non_linearity": "silu"}"#,
            &["output"],
            4,
        ),
        (
            "parallel both",
            r#"{"placement": "parallel", "parallel_sites": ["attention", "feed_forward"],
                "non_linearity": "tanh", "adapter_dropout": 0.1}"#,
            &["attention.output", "output"],
            2,
        ),
        (
            "houlsby no residual",
            r#"{"residual": false, "bottleneck_size": 3}"#,
            &["attention.output", "output"],
            3,
        ),
    ];
    for (what, json, sites, b) in cases {
        let c = adapter_cfg(json);
        let mut m = tiny();
        let tr = adapter::attach(&mut m, &c, &Rng::new(4)).unwrap();
        expect_shapes(&tr, adapter_shapes(sites, b));
        if c.residual {
            assert_eq!(
                max_abs(&eval_logits(&m), &base),
                0.0,
                "{what}: zero-init adapters must leave the output unchanged"
            );
        }
        // `up` starts at zero, which zeroes the gradient of `down`: set it random first.
        randomise_up(&tr, 6);
        assert!(max_abs(&eval_logits(&m), &base) > 0.0, "{what}");
        check_gradients(&m, &tr, what);

        let reread = round_trip(&state_dict(&tr));
        let mut m2 = tiny();
        let tr2 = adapter::attach(&mut m2, &c, &Rng::new(1234)).unwrap();
        load_state_dict(&tr2, &reread, Path::new("mem")).unwrap();
        assert_eq!(
            max_abs(&eval_logits(&m), &eval_logits(&m2)),
            0.0,
            "{what}: save then load"
        );
    }
}

#[test]
fn adapter_layers_restrict_the_sites() {
    let c = adapter_cfg(r#"{"placement": "pfeiffer", "layers": [1]}"#);
    let mut m = tiny();
    let tr = adapter::attach(&mut m, &c, &Rng::new(0)).unwrap();
    let keys: Vec<&str> = tr.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys.len(), 4 + 2, "{keys:?}");
    assert!(keys[..4]
        .iter()
        .all(|k| k.starts_with("base_model.model.bert.encoder.layer.1.output.adapter.")));
}

fn err_of<T: std::fmt::Debug>(r: deltatune_core::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_values_are_rejected_by_name() {
    let mut m = tiny();
    let e = err_of(prefix::attach(
        &mut m,
        &prefix_cfg(r#"{"num_virtual_tokens": 0}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("num_virtual_tokens"), "{e}");
    let e = err_of(prefix::attach(
        &mut m,
        &prefix_cfg(r#"{"layers": [0, 2]}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("layers") && e.contains("0..=1"), "{e}");
    let e = err_of(prefix::attach(
        &mut m,
        &prefix_cfg(r#"{"prefix_projection": true, "encoder_hidden_size": 0}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("encoder_hidden_size"), "{e}");
    let e = err_of(prefix::attach(
        &mut m,
        &prefix_cfg(r#"{"token_dim": 64}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("token_dim") && e.contains("32"), "{e}");

    for json in [r#"{"reduction_factor": 33}"#, r#"{"reduction_factor": 0}"#] {
        let e = err_of(adapter::attach(&mut m, &adapter_cfg(json), &Rng::new(0)));
        assert!(
            e.contains("reduction_factor") && e.contains("1..="),
            "{json}: {e}"
        );
    }
    let e = err_of(adapter::attach(
        &mut m,
        &adapter_cfg(r#"{"reduction_factor": 33}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("1..=32"), "{e}");
    let e = err_of(adapter::attach(
        &mut m,
        &adapter_cfg(r#"{"bottleneck_size": 40}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("bottleneck_size") && e.contains("1..=32"), "{e}");
    let e = err_of(adapter::attach(
        &mut m,
        &adapter_cfg(r#"{"layers": [5]}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("layers") && e.contains("0..=1"), "{e}");
    let e = err_of(adapter::attach(
        &mut m,
        &adapter_cfg(r#"{"adapter_dropout": 1.0}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("adapter_dropout"), "{e}");
    let e = err_of(adapter::attach(
        &mut m,
        &adapter_cfg(r#"{"reduction_factr": 8}"#),
        &Rng::new(0),
    ));
    assert!(e.contains("reduction_factr"), "{e}");
    // Nothing was attached by the refused calls.
    assert_eq!(max_abs(&eval_logits(&m), &eval_logits(&tiny())), 0.0);
}

#[test]
fn configs_have_documented_defaults_and_serialise() {
    let p = PrefixTuningConfig::default();
    assert_eq!(deltatune_methods::Method::peft_type(&p), "PREFIX_TUNING");
    assert_eq!(p.num_virtual_tokens, 20);
    assert!(!p.prefix_projection);
    assert_eq!(
        p.common.modules_to_save,
        Some(vec!["classifier".to_string()])
    );
    let done = p.completed(&tiny());
    assert_eq!(
        (
            done.token_dim,
            done.num_layers,
            done.num_transformer_submodules,
            done.encoder_hidden_size
        ),
        (Some(H), Some(L), Some(1), Some(H))
    );
    let json = serde_json::to_string(&done).unwrap();
    assert!(!json.contains("\"layers\""), "{json}");
    assert_eq!(
        serde_json::from_str::<PrefixTuningConfig>(&json).unwrap(),
        done
    );

    let a = BottleneckConfig::default();
    assert_eq!(
        deltatune_methods::Method::peft_type(&a),
        "BOTTLENECK_ADAPTER"
    );
    assert_eq!(a.placement, adapter::Placement::Houlsby);
    assert_eq!((a.reduction_factor, a.scaling, a.residual), (16, 4.0, true));
    assert_eq!(a.non_linearity, adapter::NonLinearity::Relu);
    assert_eq!(a.bottleneck(768), 48);
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<BottleneckConfig>(&json).unwrap(), a);
}
