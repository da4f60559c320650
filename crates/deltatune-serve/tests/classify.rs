//! Classification through the server: the PEFT-written classifier folders (LoRA in every layout
//! and with trained biases, IA3, prompt and prefix tuning; fixtures of
//! scripts/gen_peft_folders.py) on one encoder base, asked concurrently so their requests share
//! batches: each answer is PEFT's probabilities to 1e-5.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use deltatune_core::Rng;
use deltatune_models::{BertClassifier, Pooling};
use deltatune_serve::encoder;
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::http::{router, Backend, ServerOptions};
use deltatune_serve::metrics::Metrics;
use deltatune_serve::AdapterFolder;
use serde_json::json;

const FOLDERS: [&str; 11] = [
    "lora",
    "lora-regex",
    "lora-all-linear",
    "lora-rslora",
    "lora-layers",
    "lora-patterns",
    "ia3",
    "prompt",
    // LoRA with trained biases (each on its own model) and prefix tuning.
    "lora-bias-all",
    "lora-bias-lora-only",
    "prefix",
];

#[test]
fn mixed_classifier_batches_give_pefts_probabilities() {
    let fx = fixtures().join("peft-folders");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let base_dir = fx.join("base");
    let base = BertClassifier::load(&base_dir, 2, Pooling::Cls, &mut Rng::new(0)).unwrap();
    let folders = FOLDERS
        .iter()
        .map(|n| AdapterFolder::read(n, &fx.join(n), Some(&base_dir)).unwrap())
        .collect();
    let metrics = Arc::new(Metrics::default());
    let eng = encoder::start(
        base,
        base_dir.join("tokenizer.json"),
        folders,
        &EngineOptions::default(),
        metrics.clone(),
    )
    .unwrap();
    let opts = ServerOptions {
        base_name: "tiny-bert".into(),
        timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    };
    let s = TestServer::start(router(Backend::Encoder(eng), opts, metrics.clone()));
    let models = s.get("/v1/models").json();
    let shared: Vec<bool> = models["data"].as_array().unwrap()[1..]
        .iter()
        .map(|m| m["shared_batch"].as_bool().unwrap())
        .collect();
    assert_eq!(
        shared.iter().filter(|&&b| b).count(),
        6,
        "the LoRA folders share a batch"
    );
    // Every folder asked at once, a few times over, from several clients.
    let answers: Vec<(String, serde_json::Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .flat_map(|_| FOLDERS.iter())
            .map(|&name| {
                let s = &s;
                let texts = exp["texts"].clone();
                scope.spawn(move || {
                    let a = s.post(
                        "/v1/classify",
                        &json!({"model": name, "inputs": texts}).to_string(),
                        &[],
                    );
                    assert_eq!(a.status, 200, "{}", a.text());
                    (name.to_string(), a.json())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, v) in answers {
        assert_eq!(v["labels"], exp["labels"]);
        for (i, row) in v["data"].as_array().unwrap().iter().enumerate() {
            let got: Vec<f64> = row["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let want: Vec<f64> = exp[&name][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(d < 1e-5, "{name} text {i}: {got:?} vs PEFT {want:?}");
            let best = want
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(row["label"], exp["labels"][best]);
        }
    }
    // A decoder endpoint on an encoder is refused, naming the field.
    refused(
        &s.post(
            "/v1/completions",
            &json!({"model": "lora", "prompt": "x"}).to_string(),
            &[],
        ),
        400,
        "model",
    );
    refused(
        &s.post(
            "/v1/classify",
            &json!({"model": "tiny-bert", "inputs": "x"}).to_string(),
            &[],
        ),
        400,
        "model",
    );
    refused(
        &s.post("/v1/classify", &json!({"model": "lora"}).to_string(), &[]),
        400,
        "inputs",
    );
    refused(
        &s.post(
            "/v1/classify",
            &json!({"model": "lora", "inputs": []}).to_string(),
            &[],
        ),
        400,
        "inputs",
    );
}
