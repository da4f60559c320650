//! Prompt tuning, intrinsic prompt tuning and learned subspaces, on the tiny random BERT of
//! tests/fixtures (hidden 32, 2 layers, vocab 120).

mod common;

use common::*;
use deltatune_models::Backbone;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use deltatune_core::{Ctx, Error, HasSites, Rng};
use deltatune_methods::intrinsic::{self, IntrinsicPromptConfig, ProjectionKind};
use deltatune_methods::prompt::{self, PromptDelta, PromptTuningConfig};
use deltatune_methods::{load_state_dict, state_dict, Trainable};
use deltatune_models::{BertClassifier, Pooling};

fn pcfg(json: &str) -> PromptTuningConfig {
    serde_json::from_str(json).unwrap()
}

fn icfg(json: &str) -> IntrinsicPromptConfig {
    serde_json::from_str(json).unwrap()
}

fn keys(t: &[Trainable]) -> Vec<&str> {
    t.iter().map(|t| t.key.as_str()).collect()
}

fn field_of(e: Error) -> String {
    match e {
        Error::InvalidConfig { field, .. } => field,
        o => panic!("expected InvalidConfig, got {o}"),
    }
}

/// Backpropagates a cross-entropy loss; asserts every trainable has a non-zero gradient and no
/// frozen base tensor has one.
fn check_gradients(m: &BertClassifier, trainables: &[Trainable]) {
    let logits = m.forward(&inputs(), &Ctx::train(Rng::new(5))).unwrap();
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
    for (name, t) in m.named_tensors().unwrap() {
        if trainables
            .iter()
            .any(|tr| tr.var.as_tensor().id() == t.id())
        {
            continue;
        }
        assert!(
            grads.get(&t).is_none(),
            "frozen tensor {name} got a gradient"
        );
    }
}

#[test]
fn prompt_trainables_and_gradients() {
    let mut m = tiny();
    let c = pcfg(r#"{"num_virtual_tokens": 5}"#);
    let t = prompt::attach(&mut m, &c, &Rng::new(1), None).unwrap();
    assert_eq!(
        keys(&t),
        [
            "prompt_embeddings",
            "base_model.model.classifier.weight",
            "base_model.model.classifier.bias"
        ]
    );
    assert_eq!(t[0].var.dims(), &[5, 32]);
    check_gradients(&m, &t);
}

#[test]
fn prompt_changes_the_output_and_save_load_is_identical() {
    let inp = inputs();
    let before = tiny().forward(&inp, &Ctx::eval()).unwrap();
    let mut m = tiny();
    let c = pcfg(r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "SAMPLE_VOCAB"}"#);
    let ta = prompt::attach(&mut m, &c, &Rng::new(1), None).unwrap();
    // Move the head too, so that loading must restore it.
    for t in &ta[1..] {
        let v = t.var.as_tensor();
        t.var.set(&(v + 0.1).unwrap()).unwrap();
    }
    let want = m.forward(&inp, &Ctx::eval()).unwrap();
    assert!(max_abs(&before, &want) > 1e-3, "the prompt must matter");
    let bytes = deltatune_core::to_safetensors_bytes(&state_dict(&ta)).unwrap();
    let loaded: BTreeMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let mut m2 = tiny();
    let tb = prompt::attach(&mut m2, &c, &Rng::new(99), None).unwrap();
    assert!(max_abs(ta[0].var.as_tensor(), tb[0].var.as_tensor()) > 0.0);
    load_state_dict(&tb, &loaded, Path::new("adapter_model.safetensors")).unwrap();
    let got = m2.forward(&inp, &Ctx::eval()).unwrap();
    assert_eq!(max_abs(&want, &got), 0.0);
}

#[test]
fn sample_vocab_rows_are_embedding_rows() {
    let mut m = tiny();
    let words: Vec<Vec<f32>> = m.word_embeddings().to_vec2().unwrap();
    let c = pcfg(r#"{"num_virtual_tokens": 7, "prompt_tuning_init": "SAMPLE_VOCAB"}"#);
    let t = prompt::attach(&mut m, &c, &Rng::new(3), None).unwrap();
    let rows: Vec<Vec<f32>> = t[0].var.as_tensor().to_vec2().unwrap();
    for r in &rows {
        assert!(words.contains(r), "a prompt row is not an embedding row");
    }
    assert!(rows.iter().any(|r| r != &rows[0]), "rows should differ");
}

#[test]
fn text_init_uses_the_given_ids_repeated() {
    let mut m = tiny();
    let words = m.word_embeddings().clone();
    let c = pcfg(
        r#"{"num_virtual_tokens": 5, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "classify this"}"#,
    );
    let t = prompt::attach(&mut m, &c, &Rng::new(3), Some(&[7, 42])).unwrap();
    let ids = Tensor::new(&[7u32, 42, 7, 42, 7], &Device::Cpu).unwrap();
    let want = words.index_select(&ids, 0).unwrap();
    assert_eq!(max_abs(&want, t[0].var.as_tensor()), 0.0);
    // TEXT without ids, or with an id outside the vocabulary, is rejected by name.
    let e = prompt::attach(&mut tiny(), &c, &Rng::new(3), None).unwrap_err();
    assert_eq!(field_of(e), "prompt_tuning_init_text");
    let e = prompt::attach(&mut tiny(), &c, &Rng::new(3), Some(&[500])).unwrap_err();
    assert_eq!(field_of(e), "prompt_tuning_init_text");
}

#[test]
fn bad_prompt_configs_are_rejected_by_name() {
    for (json, field) in [
        (r#"{"num_virtual_tokens": 0}"#, "num_virtual_tokens"),
        (r#"{"token_dim": 768}"#, "token_dim"),
        (
            r#"{"num_transformer_submodules": 2}"#,
            "num_transformer_submodules",
        ),
        (r#"{"peft_type": "LORA"}"#, "peft_type"),
        (
            r#"{"prompt_tuning_init": "TEXT"}"#,
            "prompt_tuning_init_text",
        ),
        (r#"{"some_new_option": 3}"#, "some_new_option"),
    ] {
        let e = prompt::attach(&mut tiny(), &pcfg(json), &Rng::new(0), None).unwrap_err();
        assert_eq!(field_of(e), field, "{json}");
    }
    // PEFT's own fields at their neutral values are accepted, and the save form is complete.
    let c = pcfg(r#"{"num_virtual_tokens": 3, "revision": null, "peft_version": "0.17.0"}"#);
    prompt::attach(&mut tiny(), &c, &Rng::new(0), None).unwrap();
    let done = c.completed(&tiny());
    assert_eq!(
        (
            done.token_dim,
            done.num_layers,
            done.num_transformer_submodules
        ),
        (Some(32), Some(2), Some(1))
    );
    let back: PromptTuningConfig =
        serde_json::from_str(&serde_json::to_string(&done).unwrap()).unwrap();
    assert_eq!(back, done);
}

#[test]
fn mean_and_cls_pooling_run_with_prompts() {
    let inp = inputs();
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let base = tiny_with(pooling).forward(&inp, &Ctx::eval()).unwrap();
        let mut m = tiny_with(pooling);
        let c = pcfg(r#"{"num_virtual_tokens": 6, "prompt_tuning_init": "SAMPLE_VOCAB"}"#);
        prompt::attach(&mut m, &c, &Rng::new(2), None).unwrap();
        let logits = m.forward(&inp, &Ctx::eval()).unwrap();
        assert_eq!(logits.dims(), &[3, 3]);
        assert!(max_abs(&base, &logits) > 1e-4, "{pooling:?}");
        let hidden = m.encode(&inp, &Ctx::eval()).unwrap();
        assert_eq!(hidden.dims(), &[3, 9 + 6, 32]);
    }
}

#[test]
fn intrinsic_trains_only_z_and_the_head() {
    for proj in ["dense", "fastfood"] {
        let mut m = tiny();
        let c = icfg(&format!(
            r#"{{"num_virtual_tokens": 5, "intrinsic_dim": 12, "projection": "{proj}"}}"#
        ));
        let t = intrinsic::attach(&mut m, &c, &Rng::new(0)).unwrap();
        assert_eq!(
            keys(&t),
            [
                "intrinsic_z",
                "base_model.model.classifier.weight",
                "base_model.model.classifier.bias"
            ]
        );
        assert_eq!(t[0].var.dims(), &[12]);
        check_gradients(&m, &t);
    }
}

#[test]
fn intrinsic_at_zero_equals_a_frozen_p0_prompt() {
    let inp = inputs();
    let c = icfg(r#"{"num_virtual_tokens": 5, "intrinsic_dim": 8, "projection_seed": 4}"#);
    let mut m = tiny();
    intrinsic::attach(&mut m, &c, &Rng::new(0)).unwrap();
    let got = m.forward(&inp, &Ctx::eval()).unwrap();
    let p0 = intrinsic::decoder(&tiny(), &c).unwrap().p0().clone();
    // P0 is a sample of vocabulary rows.
    let words: Vec<Vec<f32>> = tiny().word_embeddings().to_vec2().unwrap();
    for r in p0.to_vec2::<f32>().unwrap() {
        assert!(words.contains(&r));
    }
    let mut expect = tiny();
    let t = prompt::attach(
        &mut expect,
        &pcfg(r#"{"num_virtual_tokens": 5}"#),
        &Rng::new(0),
        None,
    )
    .unwrap();
    t[0].var.set(&p0).unwrap();
    let want = expect.forward(&inp, &Ctx::eval()).unwrap();
    assert!(max_abs(&want, &got) <= 1e-6, "{}", max_abs(&want, &got));
    // A frozen prompt delta gives the same too.
    let mut frozen = tiny();
    frozen.attach_site_delta(Arc::new(PromptDelta::new(p0)));
    let f = frozen.forward(&inp, &Ctx::eval()).unwrap();
    assert!(max_abs(&f, &got) <= 1e-6);
}

#[test]
fn intrinsic_is_deterministic_in_the_seed_and_z_matters() {
    let inp = inputs();
    let run = |seed: u64, proj: &str| {
        let c = icfg(&format!(
            r#"{{"num_virtual_tokens": 4, "intrinsic_dim": 6, "projection": "{proj}", "projection_seed": {seed}}}"#
        ));
        let mut m = tiny();
        let t = intrinsic::attach(&mut m, &c, &Rng::new(seed + 10)).unwrap();
        let z = Tensor::new(&[3.0f32, -2.0, 1.5, 0.5, -1.0, 2.5], &Device::Cpu).unwrap();
        t[0].var.set(&z).unwrap();
        m.forward(&inp, &Ctx::eval()).unwrap()
    };
    for proj in ["dense", "fastfood"] {
        let a = run(1, proj);
        assert_eq!(max_abs(&a, &run(1, proj)), 0.0, "{proj}: same seed");
        assert!(max_abs(&a, &run(2, proj)) > 1e-5, "{proj}: another seed");
        let c0 = icfg(&format!(
            r#"{{"num_virtual_tokens": 4, "intrinsic_dim": 6, "projection": "{proj}", "projection_seed": 1}}"#
        ));
        let mut m0 = tiny();
        intrinsic::attach(&mut m0, &c0, &Rng::new(0)).unwrap();
        let zero = m0.forward(&inp, &Ctx::eval()).unwrap();
        assert!(
            max_abs(&a, &zero) > 1e-5,
            "{proj}: z must change the output"
        );
    }
}

#[test]
fn dense_and_fastfood_decode_to_the_prompt_shape() {
    for (proj, kind) in [
        ("dense", ProjectionKind::Dense),
        ("fastfood", ProjectionKind::Fastfood),
    ] {
        let c = icfg(&format!(
            r#"{{"num_virtual_tokens": 3, "intrinsic_dim": 10, "projection": "{proj}", "base_prompt_init": "ZERO"}}"#
        ));
        assert_eq!(c.projection, kind);
        let dec = intrinsic::decoder(&tiny(), &c).unwrap();
        assert_eq!(dec.projection().in_dim(), 10);
        assert_eq!(dec.projection().out_dim(), 96);
        let z = Rng::new(1).normal_tensor(10, 1.0).unwrap();
        let p = dec.decode(&z).unwrap();
        assert_eq!(p.dims(), &[3, 32]);
        // Linear in z (P0 is zero here): decode(2z) = 2 decode(z).
        let p2 = dec.decode(&(&z * 2.0).unwrap()).unwrap();
        assert!(max_abs(&p2, &(&p * 2.0).unwrap()) < 1e-5);
        // Entries at the scale of the word embeddings / sqrt(d) per unit of z.
        let words = tiny().word_embeddings().clone();
        let s: f32 = words
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let m = dec.projection().to_matrix().unwrap();
        let e: f32 = m.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
        let ratio = (e * 10.0 / s).sqrt();
        assert!((0.7..1.3).contains(&ratio), "{proj}: scale ratio {ratio}");
    }
}

#[test]
fn intrinsic_dim_out_of_range_is_rejected_by_name() {
    for json in [
        r#"{"num_virtual_tokens": 2, "intrinsic_dim": 65}"#,
        r#"{"intrinsic_dim": 0}"#,
    ] {
        let e = intrinsic::attach(&mut tiny(), &icfg(json), &Rng::new(0)).unwrap_err();
        assert_eq!(field_of(e), "intrinsic_dim", "{json}");
    }
    // The bound itself is allowed.
    let c = icfg(r#"{"num_virtual_tokens": 2, "intrinsic_dim": 64, "projection": "fastfood"}"#);
    intrinsic::attach(&mut tiny(), &c, &Rng::new(0)).unwrap();
    let e = intrinsic::attach(
        &mut tiny(),
        &icfg(r#"{"num_virtual_tokens": 0}"#),
        &Rng::new(0),
    )
    .unwrap_err();
    assert_eq!(field_of(e), "num_virtual_tokens");
}

#[test]
fn subspace_pca_reconstructs_prompts_in_a_2d_subspace() {
    let mut r = Rng::new(8);
    let (p, h) = (4, 32);
    let mu = r.normal_tensor((p, h), 1.0).unwrap();
    let u = r.normal_tensor((p, h), 1.0).unwrap();
    let v = r.normal_tensor((p, h), 1.0).unwrap();
    let prompts: Vec<Tensor> = (0..6)
        .map(|_| {
            let (a, b) = (r.normal(), r.normal());
            ((&mu + (&u * a).unwrap()).unwrap() + (&v * b).unwrap()).unwrap()
        })
        .collect();
    let s = intrinsic::fit_subspace(&prompts, 2, None).unwrap();
    assert_eq!(s.p0.dims(), &[p, h]);
    assert_eq!(s.d.dims(), &[p * h, 2]);
    for q in &prompts {
        let z = s.project(q).unwrap();
        let back = s.decode(&z).unwrap();
        assert!(max_abs(&back, q) < 1e-4, "{}", max_abs(&back, q));
    }
    // With one direction the reconstruction is not exact.
    let s1 = intrinsic::fit_subspace(&prompts, 1, None).unwrap();
    let worst = prompts
        .iter()
        .map(|q| max_abs(&s1.decode(&s1.project(q).unwrap()).unwrap(), q))
        .fold(0.0f32, f32::max);
    assert!(worst > 1e-2);
    // d must be <= n - 1.
    let e = intrinsic::fit_subspace(&prompts, 6, None).unwrap_err();
    assert_eq!(field_of(e), "intrinsic_dim");

    // Saved and loaded as an artifact, it drives an intrinsic prompt whose z = 0 is the mean.
    let dir = std::env::temp_dir().join(format!("deltatune-subspace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("subspace.safetensors");
    s.save(&path).unwrap();
    let back = intrinsic::Subspace::load(&path).unwrap();
    assert_eq!(max_abs(&back.d, &s.d), 0.0);
    let c = icfg(&format!(
        r#"{{"num_virtual_tokens": 4, "intrinsic_dim": 2, "subspace": {:?}}}"#,
        path.to_str().unwrap()
    ));
    let dec = intrinsic::decoder(&tiny(), &c).unwrap();
    assert_eq!(max_abs(dec.p0(), &s.p0), 0.0);
    let z = s.project(&prompts[3]).unwrap();
    assert!(max_abs(&dec.decode(&z).unwrap(), &prompts[3]) < 1e-4);
    let mut m = tiny();
    let t = intrinsic::attach(&mut m, &c, &Rng::new(0)).unwrap();
    assert_eq!(t[0].var.dims(), &[2]);
    let wrong = icfg(&format!(
        r#"{{"num_virtual_tokens": 4, "intrinsic_dim": 3, "subspace": {:?}}}"#,
        path.to_str().unwrap()
    ));
    assert_eq!(
        field_of(intrinsic::decoder(&tiny(), &wrong).unwrap_err()),
        "subspace"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn subspace_around_an_origin_keeps_the_shared_displacement() {
    // Sources that all moved from one origin along u (by different amounts) plus a little
    // along v: centred PCA loses u's common part into the mean, the origin fit keeps it.
    let mut r = Rng::new(9);
    let (p, h) = (3, 16);
    let origin = r.normal_tensor((p, h), 1.0).unwrap();
    let u = r.normal_tensor((p, h), 1.0).unwrap();
    let v = r.normal_tensor((p, h), 1.0).unwrap();
    let prompts: Vec<Tensor> = (0..5)
        .map(|i| {
            let a = 2.0 + 0.1 * i as f64;
            let b = 0.05 * r.normal();
            ((&origin + (&u * a).unwrap()).unwrap() + (&v * b).unwrap()).unwrap()
        })
        .collect();
    let s = intrinsic::fit_subspace(&prompts, 1, Some(&origin)).unwrap();
    assert_eq!(max_abs(&s.p0, &origin), 0.0);
    // z = 0 is the origin; the single direction is u's (cosine ~ 1), so going along it by
    // twice the sources' distance is expressible.
    let col = s.d.flatten_all().unwrap();
    let uf = u.flatten_all().unwrap();
    let dot: f32 = (&col * &uf)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let nc: f32 = col
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    let nu: f32 = uf
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        (dot / (nc * nu)).abs() > 0.999,
        "cosine {}",
        dot / (nc * nu)
    );
    let far = (&origin + (&u * 4.4).unwrap()).unwrap();
    let back = s.decode(&s.project(&far).unwrap()).unwrap();
    assert!(max_abs(&back, &far) < 0.1, "{}", max_abs(&back, &far));
    // Around an origin d may be n; n + 1 is refused by name, and so is a wrong-shaped origin.
    intrinsic::fit_subspace(&prompts, 5, Some(&origin)).unwrap();
    let e = intrinsic::fit_subspace(&prompts, 6, Some(&origin)).unwrap_err();
    assert_eq!(field_of(e), "intrinsic_dim");
    let e = intrinsic::fit_subspace(&prompts, 1, Some(&u.narrow(0, 0, 2).unwrap())).unwrap_err();
    assert_eq!(field_of(e), "origin");
    // The centred fit starts from the sources' mean, about 2.2 u away from the origin.
    let c = intrinsic::fit_subspace(&prompts, 1, None).unwrap();
    assert!(max_abs(&c.p0, &origin) > 1.0);
}

#[test]
fn random_subspace_around_an_origin_has_the_decoder_scale() {
    let mut r = Rng::new(10);
    let origin = r.normal_tensor((5, 32), 0.05).unwrap();
    let s = intrinsic::Subspace::random_around(&origin, 4, 7).unwrap();
    assert_eq!(max_abs(&s.p0, &origin), 0.0);
    assert_eq!(s.d.dims(), &[160, 4]);
    // Entries ~ N(0, rms(origin)^2 / d): a unit z moves each prompt entry by about rms(origin).
    let ms: f32 = s.d.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
    let ratio = (ms * 4.0).sqrt() / 0.05;
    assert!((0.8..1.2).contains(&ratio), "{ratio}");
    // Seeded: the same seed gives the same basis, another seed another one.
    let again = intrinsic::Subspace::random_around(&origin, 4, 7).unwrap();
    assert_eq!(max_abs(&again.d, &s.d), 0.0);
    let other = intrinsic::Subspace::random_around(&origin, 4, 8).unwrap();
    assert!(max_abs(&other.d, &s.d) > 0.0);
    let e = intrinsic::Subspace::random_around(&origin, 161, 7).unwrap_err();
    assert_eq!(field_of(e), "intrinsic_dim");
}

#[test]
fn intrinsic_z_trains_the_loss_down() {
    // A few Adam-free gradient steps on z alone (head frozen) lower the loss: the decode keeps
    // the graph to z.
    let inp = inputs();
    let c = icfg(
        r#"{"num_virtual_tokens": 5, "intrinsic_dim": 16, "projection": "fastfood", "modules_to_save": null}"#,
    );
    let mut m = tiny();
    let t = intrinsic::attach(&mut m, &c, &Rng::new(0)).unwrap();
    assert_eq!(t.len(), 1);
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let loss = |m: &BertClassifier| {
        let l = m.forward(&inp, &Ctx::eval()).unwrap();
        candle_nn::loss::cross_entropy(&l, &labels).unwrap()
    };
    let first: f32 = loss(&m).to_scalar().unwrap();
    for _ in 0..20 {
        let g = loss(&m).backward().unwrap();
        let gz = g.get(t[0].var.as_tensor()).unwrap();
        let norm: f32 = gz
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        let step = (gz * (0.5 / f64::from(norm.max(1e-12)))).unwrap();
        t[0].var
            .set(&(t[0].var.as_tensor() - step).unwrap())
            .unwrap();
    }
    let last: f32 = loss(&m).to_scalar().unwrap();
    assert!(last < first, "loss {first} -> {last}");
}
