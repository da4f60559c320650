//! Adapter folders exactly as PEFT's `save_pretrained` writes them (no run_config.json or
//! labels.json; fixtures of scripts/gen_peft_folders.py): `deltatune predict` loads each on the
//! base its config names, with the base's labels, and gives PEFT's probabilities to 1e-5.
//! A tensor that neither the config nor PEFT's own naming explains is refused by name.

use std::path::Path;
use std::process::Output;

mod support;
use support::{root, run_with, text, Tmp};

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, None)
}

#[test]
fn peft_written_folders_predict_like_peft() {
    let fx = root().join("tests/fixtures/peft-folders");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let texts: Vec<&str> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let labels: Vec<&str> = exp["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let folders = [
        "lora",
        "lora-regex",
        "lora-all-linear",
        "lora-rslora",
        "lora-layers",
        "lora-patterns",
        "ia3",
        "prompt",
        // The biases PEFT's `bias` option trains replace the base's (the targeted layers'
        // under `<layer>.base_layer.bias`, with `all` the norms' and the head's copies too).
        "lora-bias-all",
        "lora-bias-lora-only",
        // Prefix tuning: the tokens' positions start after the prefix, as transformers' BERT
        // counts the prefix as past positions.
        "prefix",
    ];
    for name in folders {
        let dir = format!("tests/fixtures/peft-folders/{name}");
        assert!(!root().join(&dir).join("run_config.json").exists());
        let mut args = vec!["predict", "--adapter", &dir, "--json"];
        args.extend(&texts);
        // From the repository root, as base_model_name_or_path is relative to it.
        let o = run(&args, &root());
        assert!(o.status.success(), "{name}: {}", text(&o));
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), texts.len(), "{name}");
        for (i, line) in lines.iter().enumerate() {
            let want = exp[name][i].as_array().unwrap();
            let got = line["probabilities"].as_array().unwrap();
            for (g, w) in got.iter().zip(want) {
                let d = (g.as_f64().unwrap() - w.as_f64().unwrap()).abs();
                assert!(d < 1e-5, "{name}, text {i}: {got:?} vs PEFT's {want:?}");
            }
            assert!(
                labels.contains(&line["label"].as_str().unwrap()),
                "{name}: {line}"
            );
        }
    }

    // Elsewhere, the relative base is not found: the error says how to give it, and --model
    // does.
    let t = tempfile::tempdir().unwrap();
    let lora = fx.join("lora");
    let lora = lora.to_str().unwrap();
    let o = run(&["predict", "--adapter", lora, "a good movie"], t.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("--model"), "{}", text(&o));
    let base = fx.join("base");
    let o = run(
        &[
            "predict",
            "--adapter",
            lora,
            "--model",
            base.to_str().unwrap(),
            "a good movie",
        ],
        t.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// A copy of fixture folder `name` in a scratch folder, its adapter_config.json edited by
/// `config` and `extra` tensors (`[2]` zeros) added to its weights.
fn edited_copy(name: &str, config: impl Fn(&mut serde_json::Value), extra: &[&str]) -> Tmp {
    let src = root().join("tests/fixtures/peft-folders").join(name);
    let t = Tmp::new(&format!("peft-{name}"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    std::fs::write(t.0.join("adapter_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 8];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    for k in extra {
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &zeros);
        tensors.push((k.to_string(), v.unwrap()));
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(t.0.join("adapter_model.safetensors"), out).unwrap();
    t
}

#[test]
fn peft_bias_folders_refuse_what_nothing_explains() {
    let predict = |dir: &Path| {
        let o = run(
            &[
                "predict",
                "--adapter",
                dir.to_str().unwrap(),
                "a good movie",
            ],
            &root(),
        );
        assert!(!o.status.success(), "{}", text(&o));
        text(&o)
    };
    // A bias tensor of a layer the model does not have.
    let bad = "base_model.model.bert.encoder.layer.0.attention.self.qkv.bias";
    let t = edited_copy("lora-bias-all", |_| {}, &[bad]);
    let e = predict(&t.0);
    assert!(
        e.contains("tensors the adapter config does not explain") && e.contains(bad),
        "{e}"
    );
    // Saved biases with a config that trains none (`bias` "none"): named, not dropped.
    let t = edited_copy("lora-bias-lora-only", |c| c["bias"] = "none".into(), &[]);
    let e = predict(&t.0);
    assert!(
        e.contains("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"),
        "{e}"
    );
    // The norms' biases of `all` with a config that says `lora_only`.
    let t = edited_copy("lora-bias-all", |c| c["bias"] = "lora_only".into(), &[]);
    let e = predict(&t.0);
    assert!(
        e.contains("base_model.model.bert.embeddings.LayerNorm.bias"),
        "{e}"
    );
}

/// The keys of an adapter folder's weights.
fn weight_keys(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    keys
}

#[test]
fn deltatune_writes_bias_and_prefix_tensors_under_peft_keys() {
    // What PEFT's loader looks for (a tensor under another key is skipped by PEFT with a
    // warning, a silent difference): a LoRA-targeted layer's bias on its base layer, and a
    // prompt-learning method's head under `base_model.<module>`.
    let t = Tmp::new("peft-keys");
    let mut csv = String::from("text,label\n");
    for i in 0..16 {
        csv.push_str(if i % 2 == 0 {
            "a great film it is,pos\n"
        } else {
            "a dull mess it is,neg\n"
        });
    }
    std::fs::write(t.0.join("train.csv"), &csv).unwrap();
    std::fs::write(t.0.join("dev.csv"), &csv).unwrap();
    let model = root().join("tests/fixtures/tiny-bert");
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            "train.csv",
            "--dev-file",
            "dev.csv",
            "--output",
            out,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--no-progress",
        ];
        args.extend(extra);
        let o = run_with(&args, &t.0, Some(&t.0.join("cache")));
        assert!(o.status.success(), "{out}: {}", text(&o));
        weight_keys(&t.0.join(out))
    };
    let keys = train(
        "prefix",
        &["--method", "prefix", "--set", "prefix.num_virtual_tokens=4"],
    );
    assert_eq!(
        keys,
        [
            "base_model.classifier.bias",
            "base_model.classifier.weight",
            "prompt_embeddings"
        ],
    );
    let q = "base_model.model.bert.encoder.layer.0.attention.self.query";
    let keys = train("lora-only", &["--method", "lora", "--bias", "lora_only"]);
    assert!(keys.contains(&format!("{q}.base_layer.bias")), "{keys:?}");
    assert!(!keys.contains(&format!("{q}.bias")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("LayerNorm")), "{keys:?}");
    let keys = train("all", &["--method", "lora", "--bias", "all"]);
    for k in [
        format!("{q}.base_layer.bias"),
        "base_model.model.bert.encoder.layer.0.attention.self.key.bias".into(),
        "base_model.model.bert.embeddings.LayerNorm.bias".into(),
        "base_model.model.bert.encoder.layer.1.output.LayerNorm.bias".into(),
    ] {
        assert!(keys.contains(&k), "{k} not in {keys:?}");
    }
    // And each loads back (`predict`).
    for out in ["prefix", "lora-only", "all"] {
        let o = run_with(
            &["predict", "--adapter", out, "a great film"],
            &t.0,
            Some(&t.0.join("cache")),
        );
        assert!(o.status.success(), "{out}: {}", text(&o));
    }
}
