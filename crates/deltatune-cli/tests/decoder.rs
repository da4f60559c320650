//! End-to-end runs of `deltatune` on the real SmolLM2 GGUF (skipped with a message when it is
//! not fetched; required under `DELTATUNE_REQUIRE_ASSETS=1`): a short decoder training run on a
//! few prompt/completion pairs and generation with its adapter, every method's adapter saved and
//! reloaded with the same greedy output (`eval` and `generate`), the same run twice giving the
//! same adapter bytes, and bad input (clear message, non-zero exit, no
//! partial output).

use std::path::Path;
use std::process::Output;

mod support;
use support::{cache, gguf, run_with, stderr, stdout, write_colour_codes, Tmp};

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, Some(&cache()))
}

fn train_args<'a>(gguf: &'a str, out: &'a str, method: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--task",
        "generate",
        "--model",
        gguf,
        "--method",
        method,
        "--train-file",
        "d.jsonl",
        "--dev-file",
        "d.jsonl",
        "--test-file",
        "d.jsonl",
        "--max-steps",
        "2",
        "--batch-size",
        "3",
        "--no-progress",
        "-o",
        out,
        "--set",
        "generation.max_new_tokens=4",
        "--set",
        "prefix.num_virtual_tokens=4",
        "--set",
        "prompt.num_virtual_tokens=4",
    ]
}

#[test]
fn every_method_trains_on_the_decoder_and_its_adapter_generates_the_same_after_reload() {
    let Some(g) = gguf() else { return };
    let g = g.display().to_string();
    let tmp = Tmp::new("methods");
    write_colour_codes(&tmp.0.join("d.jsonl"), 6);
    for method in ["lora", "ia3", "prefix", "prompt", "adapter", "intrinsic"] {
        let out = format!("run-{method}");
        let o = run(&train_args(&g, &out, method), &tmp.0);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("test exact match"),
            "{method}: {}",
            stdout(&o)
        );
        let dir = tmp.0.join(&out);
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "results.json",
            "train.jsonl",
        ] {
            assert!(dir.join(f).exists(), "{method}: {f} missing");
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["task_type"], "CAUSAL_LM", "{method}");
        // The saved adapter reloads: `eval` on it regenerates the test examples in the same
        // batches as training did and gets the same texts and score.
        let test_gens = std::fs::read_to_string(dir.join("test_generations.jsonl")).unwrap();
        let o = run(
            &["eval", "--adapter", &out, "--output", "again.jsonl"],
            &tmp.0,
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        assert_eq!(
            std::fs::read_to_string(tmp.0.join("again.jsonl")).unwrap(),
            test_gens,
            "{method}: the reloaded adapter's test generations differ"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        let em = results["test"]["exact_match"].as_f64().unwrap();
        assert!(
            stdout(&o).contains(&format!("exact match {em:.4}")),
            "{method}: {} (training scored {em})",
            stdout(&o)
        );
        // `generate` (one prompt, streamed) gives the text `eval` gives it in batches of one.
        // (Alone and in a padded batch a greedy text may differ at a near tie: the 8-bit
        // activations round a last-bit difference between the products' paths up to a step.)
        let o = run(
            &[
                "eval",
                "--adapter",
                &out,
                "--batch-size",
                "1",
                "--output",
                "alone.jsonl",
            ],
            &tmp.0,
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let alone: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(tmp.0.join("alone.jsonl"))
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        let o = run(
            &[
                "generate",
                "--adapter",
                &out,
                "--max-new-tokens",
                "4",
                "--stop",
                "\n",
                "Colour: red\nCode:",
            ],
            &tmp.0,
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let text = stdout(&o);
        let text = text.split('\n').next().unwrap().trim();
        assert_eq!(text, alone["generated"].as_str().unwrap(), "{method}");
    }
    // The same seed and data train the same adapter, to the bit.
    let o = run(&train_args(&g, "run-lora-again", "lora"), &tmp.0);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read(tmp.0.join("run-lora/adapter_model.safetensors")).unwrap()
            == std::fs::read(tmp.0.join("run-lora-again/adapter_model.safetensors")).unwrap(),
        "a second identical run trained a different adapter"
    );
    // BitFit: Llama has no biases, refused by name before training.
    let o = run(&train_args(&g, "run-bitfit", "bitfit"), &tmp.0);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no bias"), "{}", stderr(&o));
    assert!(!tmp.0.join("run-bitfit").exists(), "no partial output");
}

#[test]
fn bad_decoder_input_is_a_clear_error() {
    let Some(g) = gguf() else { return };
    let g = g.display().to_string();
    let tmp = Tmp::new("bad");
    let check = |args: &[&str], needle: &str| {
        let o = run(args, &tmp.0);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: expected `{needle}` in: {e}");
    };
    check(
        &["generate", "--model", &g, "--max-new-tokens", "0", "hi"],
        "max_new_tokens",
    );
    let long = "word ".repeat(9000);
    check(&["generate", "--model", &g, &long], "context");
    // JSONL without the named fields.
    std::fs::write(
        tmp.0.join("bad.jsonl"),
        "{\"text\": \"a\", \"label\": \"b\"}\n",
    )
    .unwrap();
    check(
        &[
            "train",
            "--task",
            "generate",
            "--model",
            &g,
            "--train-file",
            "bad.jsonl",
            "--dev-file",
            "bad.jsonl",
            "-o",
            "out",
        ],
        "prompt",
    );
    assert!(!tmp.0.join("out").exists(), "no partial output");
    // A truncated GGUF.
    let bytes = std::fs::read(&g).unwrap();
    std::fs::write(tmp.0.join("cut.gguf"), &bytes[..100_000]).unwrap();
    check(&["generate", "--model", "cut.gguf", "hi"], "cut.gguf");
    // A decoder adapter given to the classifier, and a classifier adapter to the decoder.
    write_colour_codes(&tmp.0.join("d.jsonl"), 6);
    let o = run(&train_args(&g, "dec", "lora"), &tmp.0);
    assert!(o.status.success(), "{}", stderr(&o));
    check(
        &["predict", "--adapter", "dec", "a fine film"],
        "deltatune generate",
    );
    check(
        &["eval", "--adapter", "dec", "--batch-size", "0"],
        "--batch-size",
    );
    check(
        &["eval", "--adapter", "dec", "--data", "missing.jsonl"],
        "missing.jsonl",
    );
    // A run_config.json that exists but cannot be read (a folder in its place) is an error
    // naming it, not a PEFT folder without one, even with --data.
    std::fs::create_dir_all(tmp.0.join("unreadable/run_config.json")).unwrap();
    std::fs::copy(
        tmp.0.join("dec/adapter_config.json"),
        tmp.0.join("unreadable/adapter_config.json"),
    )
    .unwrap();
    check(
        &["eval", "--adapter", "unreadable", "--data", "d.jsonl"],
        "cannot read",
    );
    std::fs::create_dir_all(tmp.0.join("cls")).unwrap();
    std::fs::write(
        tmp.0.join("cls/adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "target_modules": ["query"]}"#,
    )
    .unwrap();
    check(
        &["generate", "--adapter", "cls", "--model", &g, "hi"],
        "deltatune predict",
    );
}

/// `train --task classify` on decoders (tiny Qwen2 folder, tiny Phi-3 GGUF with its
/// SentencePiece tokenizer): a `score` head on the last token is trained and saved as PEFT's
/// SEQ_CLS `modules_to_save`, Phi-3's LoRA goes on its fused `qkv_proj`.
#[test]
fn classify_trains_a_score_head_on_a_decoder_folder_and_gguf() {
    let tmp = Tmp::new("decoder-classify");
    let mut csv = String::from("text,label\n");
    for i in 0..24 {
        let (text, label) = if i % 2 == 0 {
            ("a fine warm film", 1)
        } else {
            ("a dull cold mess", 0)
        };
        csv.push_str(&format!("{text} {i},{label}\n"));
    }
    std::fs::write(tmp.0.join("d.csv"), csv).unwrap();
    let dec = support::fixtures().join("decoders");
    for (model, targets) in [
        (dec.join("qwen2"), "q_proj"),
        (dec.join("phi3/model.gguf"), "qkv_proj"),
    ] {
        let model = model.display().to_string();
        let out = format!("run-{}", targets);
        let o = run(
            &[
                "train",
                "--model",
                &model,
                "--train-file",
                "d.csv",
                "--dev-file",
                "d.csv",
                "--test-file",
                "d.csv",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--no-progress",
                "-o",
                &out,
            ],
            &tmp.0,
        );
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        assert!(stdout(&o).contains("test accuracy"), "{}", stdout(&o));
        let dir = tmp.0.join(&out);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["task_type"], "SEQ_CLS", "{model}");
        assert_eq!(
            cfg["modules_to_save"],
            serde_json::json!(["score"]),
            "{model}"
        );
        assert!(
            cfg["target_modules"].to_string().contains(targets),
            "{model}: {}",
            cfg["target_modules"]
        );
        let w = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let keys = candle_core::safetensors::load_buffer(&w, &candle_core::Device::Cpu).unwrap();
        assert!(
            keys.contains_key("base_model.model.score.weight"),
            "{model}: {:?}",
            keys.keys().collect::<Vec<_>>()
        );
        // The saved classifier reloads: `eval` on the run's test file scores what training
        // scored, and `predict` gives each text a distribution over the run's labels.
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        let acc = results["test"]["accuracy"].as_f64().unwrap();
        let o = run(&["eval", "--adapter", &out], &tmp.0);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        assert!(
            stdout(&o).contains(&format!("24 examples, accuracy {acc:.4}")),
            "{model}: {} (training scored {acc})",
            stdout(&o)
        );
        let o = run(
            &[
                "predict",
                "--adapter",
                &out,
                "--json",
                "a fine warm film 0",
                "a dull cold mess 1",
            ],
            &tmp.0,
        );
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let lines: Vec<serde_json::Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{model}");
        for l in &lines {
            let p: Vec<f64> = serde_json::from_value(l["probabilities"].clone()).unwrap();
            assert_eq!(p.len(), 2, "{model}");
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{model}: {p:?}");
            assert!(["0", "1"].contains(&l["label"].as_str().unwrap()), "{l}");
        }
        // Merging a decoder's classifier is refused by name (only encoder classifiers merge).
        let o = run(&["merge", "--adapter", &out, "-o", "merged"], &tmp.0);
        assert!(!o.status.success(), "{model}");
        assert!(
            stderr(&o).contains("classifier on the decoder"),
            "{}",
            stderr(&o)
        );
    }
    // PEFT's SEQ_CLS folder on the Qwen2 folder (its class logits are checked against PEFT's in
    // the methods crate) predicts from the command line: three classes named by the base.
    let peft = dec.join("qwen2-seqcls-lora").display().to_string();
    let qwen = dec.join("qwen2").display().to_string();
    let o = run(
        &[
            "predict",
            "--adapter",
            &peft,
            "--model",
            &qwen,
            "--json",
            "hello there",
        ],
        &tmp.0,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let l: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(l["probabilities"].as_array().unwrap().len(), 3, "{l}");
    assert!(l["label"].as_str().unwrap().starts_with("LABEL_"), "{l}");
}

/// A short LoRA generation run (into `run`) on the tiny GGUF of `family`, in a fresh folder.
fn lora_on_tiny_gguf(family: &str) -> (Tmp, Output) {
    let tmp = Tmp::new(&format!("decoder-{family}"));
    write_colour_codes(&tmp.0.join("d.jsonl"), 6);
    let g = support::fixtures()
        .join(format!("decoders/{family}/model.gguf"))
        .display()
        .to_string();
    let o = run(&train_args(&g, "run", "lora"), &tmp.0);
    assert!(o.status.success(), "{family}: {}", stderr(&o));
    (tmp, o)
}

/// The generation job on the tiny Gemma 3 GGUF (SentencePiece tokenizer from its metadata,
/// local/global layers): a short LoRA run trains and scores, and merges into a Gemma 3 folder.
#[test]
fn generate_trains_on_a_gemma3_gguf() {
    let (tmp, o) = lora_on_tiny_gguf("gemma3");
    assert!(stdout(&o).contains("test exact match"), "{}", stdout(&o));
    // Merged into a Gemma 3 folder (norms back in transformers' `w` form), which reloads with
    // the adapter's logits (merge checks them itself) and says it is gemma3_text.
    let o = run(&["merge", "--adapter", "run", "-o", "merged"], &tmp.0);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.0.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
}

/// The generation job on the tiny Phi-3 GGUF with the default targets (`q_proj`, `v_proj`):
/// the LoRA goes on the fused `qkv_proj`, and the adapter folder says so (PEFT looks up the
/// config's names in transformers' Phi-3, which has no `q_proj`).
#[test]
fn generate_on_phi3_saves_the_fused_targets_it_trained() {
    let (tmp, _) = lora_on_tiny_gguf("phi3");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.0.join("run/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["target_modules"], serde_json::json!(["qkv_proj"]));
    let w = std::fs::read(tmp.0.join("run/adapter_model.safetensors")).unwrap();
    let keys = candle_core::safetensors::load_buffer(&w, &candle_core::Device::Cpu).unwrap();
    assert!(keys.keys().all(|k| k.contains(".qkv_proj.")), "{keys:?}");
}
