//! Combining deltas: LoRA + prefix + adapter (UniPELT, gated) and prefix + parallel adapter
//! (MAM) on the tiny BERT.

mod common;

use common::*;
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_methods::compose::{self, ComposeConfig};
use deltatune_methods::{load_state_dict, DeltaConfig};
use serde_json::json;

fn member(v: serde_json::Value) -> DeltaConfig {
    DeltaConfig::from_json(v).unwrap()
}

fn lora() -> DeltaConfig {
    member(
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}),
    )
}
fn prefix() -> DeltaConfig {
    member(json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}))
}
fn adapter() -> DeltaConfig {
    member(
        json!({"peft_type": "BOTTLENECK_ADAPTER", "placement": "pfeiffer", "reduction_factor": 4}),
    )
}

fn unipelt() -> ComposeConfig {
    ComposeConfig::new(vec![lora(), prefix(), adapter()], true)
}

fn err_of<T: std::fmt::Debug>(r: deltatune_core::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn zero_init_members_with_gates_leave_the_output_unchanged() {
    let base = eval_logits(&tiny());
    let mut m = tiny();
    let c = ComposeConfig::new(vec![lora(), adapter()], true);
    compose::attach(&mut m, &c, &Rng::new(1), None, false).unwrap();
    assert!(max_abs(&eval_logits(&m), &base) < 1e-6);
    // A prefix is not zero-initialised: with it the output moves.
    let mut m = tiny();
    compose::attach(&mut m, &unipelt(), &Rng::new(1), None, false).unwrap();
    assert!(max_abs(&eval_logits(&m), &base) > 1e-4);
}

#[test]
fn every_member_gate_and_the_head_get_gradients_and_nothing_else() {
    let mut m = tiny();
    let ts = compose::attach(&mut m, &unipelt(), &Rng::new(1), None, false).unwrap();
    // Keys are namespaced per member; gates per layer; the head once.
    let keys: Vec<&str> = ts.iter().map(|t| t.key.as_str()).collect();
    for want in [
        "lora.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "prefix.prompt_embeddings",
        "adapter.base_model.model.bert.encoder.layer.1.output.adapter.up.weight",
        "gates.lora.layer.1.weight",
        "gates.adapter.layer.0.bias",
        "gates.prefix.layer.1.logit",
        CLS_W,
    ] {
        assert!(keys.contains(&want), "missing {want} in {keys:?}");
    }
    assert_eq!(
        keys.iter()
            .filter(|k| k.ends_with("classifier.weight"))
            .count(),
        1
    );
    // With B and up at zero, A and down get no gradient: move them off zero first.
    randomise(&ts, "lora_B", 3, 0.3);
    randomise(&ts, "adapter.up.", 4, 0.3);
    check_gradients(&m, &ts, "unipelt");
}

#[test]
fn gates_scale_the_member_contribution() {
    // With a gate logit of -30 the prefix contributes nothing: equal to the base model.
    let mut m = tiny();
    let c = ComposeConfig::new(vec![prefix()], true);
    let ts = compose::attach(&mut m, &c, &Rng::new(1), None, false).unwrap();
    randomise(&ts, "prompt_embeddings", 6, 2.0);
    let base = eval_logits(&tiny());
    let gated_on = eval_logits(&m);
    // The prefix values are scaled by sigmoid(0) = 0.5 at start; with the gate near 0 the
    // prefix only still takes attention mass (keys), so the output differs from both.
    for t in ts.iter().filter(|t| t.key.ends_with(".logit")) {
        t.var
            .set(&(t.var.as_tensor().ones_like().unwrap() * -30.0).unwrap())
            .unwrap();
    }
    let gated_off = eval_logits(&m);
    assert!(max_abs(&gated_on, &gated_off) > 1e-5);
    assert!(max_abs(&gated_off, &base) > 1e-6);
    // LoRA with its gate bias at -30 contributes nothing even with non-zero B.
    let mut m = tiny();
    let c = ComposeConfig::new(vec![lora()], true);
    let ts = compose::attach(&mut m, &c, &Rng::new(1), None, false).unwrap();
    randomise(&ts, "lora_B", 3, 0.5);
    let open = eval_logits(&m);
    assert!(max_abs(&open, &base) > 1e-4);
    for t in ts
        .iter()
        .filter(|t| t.key.starts_with("gates.") && t.key.ends_with(".bias"))
    {
        t.var
            .set(&(t.var.as_tensor().ones_like().unwrap() * -30.0).unwrap())
            .unwrap();
    }
    assert!(max_abs(&eval_logits(&m), &base) < 1e-5);
}

#[test]
fn save_then_load_is_identical_as_one_artifact() {
    for (name, cfg) in [
        ("unipelt", unipelt()),
        (
            "mam",
            ComposeConfig::new(
                vec![
                    member(
                        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 8}),
                    ),
                    member(json!({"peft_type": "BOTTLENECK_ADAPTER", "placement": "parallel"})),
                ],
                false,
            ),
        ),
    ] {
        let mut m = tiny();
        let ts = compose::attach(&mut m, &cfg, &Rng::new(1), None, false).unwrap();
        randomise(&ts, "lora_B", 3, 0.3);
        randomise(&ts, "adapter.up.", 4, 0.3);
        randomise(&ts, "gates.", 5, 0.5);
        let want = eval_logits(&m);
        let saved = round_trip(&compose::export(&cfg, &ts).unwrap());
        // The config goes through adapter_config.json too.
        let json = DeltaConfig::Compose(cfg.clone()).to_json(&m);
        let back = DeltaConfig::from_json(json).unwrap();
        let mut m2 = tiny();
        let ts2 = back.attach_saved(&mut m2, &Rng::new(99)).unwrap();
        load_state_dict(&ts2, &saved, std::path::Path::new("mem")).unwrap();
        assert!(max_abs(&eval_logits(&m2), &want) < 1e-6, "{name}");
        // Prefix with projection is stored folded.
        if name == "mam" {
            assert!(saved.contains_key("prefix.prompt_embeddings"));
            assert!(
                !saved.keys().any(|k| k.contains("transform")),
                "{:?}",
                saved.keys()
            );
        }
    }
}

#[test]
fn lr_scale_reaches_the_trainables() {
    let mut c = unipelt();
    c.lr_scale.insert("prefix".into(), 20.0);
    let mut m = tiny();
    let ts = compose::attach(&mut m, &c, &Rng::new(1), None, false).unwrap();
    for t in &ts {
        let want = if t.key.starts_with("prefix.") {
            20.0
        } else {
            1.0
        };
        assert_eq!(t.lr_scale, want, "{}", t.key);
    }
}

#[test]
fn bad_compositions_are_rejected_by_name() {
    let e = err_of(ComposeConfig::new(vec![], false).validate());
    assert!(e.contains("deltas") && e.contains("empty"), "{e}");
    let e = err_of(ComposeConfig::new(vec![lora(), lora()], false).validate());
    assert!(e.contains("deltas[1]") && e.contains("lora"), "{e}");
    let nested = DeltaConfig::Compose(unipelt());
    let e = err_of(ComposeConfig::new(vec![nested], false).validate());
    assert!(e.contains("composition"), "{e}");
    let mut c = unipelt();
    c.lr_scale.insert("ia3".into(), 2.0);
    let e = err_of(c.validate());
    assert!(e.contains("lr_scale") && e.contains("ia3"), "{e}");
    let mut c = unipelt();
    c.lr_scale.insert("lora".into(), 0.0);
    assert!(err_of(c.validate()).contains("> 0"));
    let bad_member = member(json!({"peft_type": "LORA", "r": 4}));
    let DeltaConfig::Lora(mut l) = bad_member else {
        unreachable!()
    };
    l.r = 0;
    let e = err_of(ComposeConfig::new(vec![DeltaConfig::Lora(l)], false).validate());
    assert!(e.contains("deltas[0]") && e.contains("`r`"), "{e}");
    let e = err_of(DeltaConfig::from_json(
        json!({"peft_type": "COMPOSITION", "deltas": [], "gatez": true}),
    ));
    assert!(e.contains("gatez"), "{e}");
}

#[test]
fn merge_is_possible_only_without_gates_and_non_linear_members() {
    assert!(
        DeltaConfig::Compose(ComposeConfig::new(vec![lora()], false))
            .merge_blocker()
            .is_none()
    );
    let why = DeltaConfig::Compose(ComposeConfig::new(vec![lora()], true))
        .merge_blocker()
        .unwrap();
    assert!(why.contains("gate"), "{why}");
    let why = DeltaConfig::Compose(unipelt()).merge_blocker().unwrap();
    assert!(why.contains("gate"));
    let why = prefix().merge_blocker().unwrap();
    assert!(why.contains("prefix") && why.contains("unmerged"), "{why}");
    // And a gated LoRA layer refuses to fold.
    let mut m = tiny();
    compose::attach(
        &mut m,
        &ComposeConfig::new(vec![lora()], true),
        &Rng::new(1),
        None,
        false,
    )
    .unwrap();
    let lin = m
        .linears_mut()
        .into_iter()
        .find(|l| l.path.ends_with("layer.0.attention.self.query"))
        .unwrap();
    let e = lin.merge().unwrap_err().to_string();
    assert!(e.contains("cannot be merged"), "{e}");
    let _ = Ctx::eval();
}
