//! Adapter folders exactly as PEFT's `save_pretrained` writes them (no run_config.json or
//! labels.json; fixtures of scripts/gen_peft_folders.py): `deltatune predict` loads each on the
//! base its config names, with the base's labels, and gives PEFT's probabilities to 1e-5.

use std::path::Path;
use std::process::Output;

mod support;
use support::{root, run_with, text};

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
