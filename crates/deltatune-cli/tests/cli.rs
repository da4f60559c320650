//! End-to-end runs of the `deltatune` binary on the tiny BERT of tests/fixtures: training,
//! reruns, predict/eval, and bad input (clear message, non-zero exit, no partial output).

use std::path::Path;
use std::process::{Command, Output};

mod support;
use support::{fixtures, run_with, text, Tmp};

const POS: [&str; 6] = [
    "good film",
    "great movie",
    "a witty story",
    "superb acting",
    "gorgeous and moving",
    "lovely plot",
];
const NEG: [&str; 6] = [
    "bad film",
    "awful movie",
    "a dull story",
    "terrible acting",
    "boring and lifeless",
    "weak plot",
];

/// A small labelled set: `n` rows alternating positive and negative.
fn write_csv(path: &Path, n: usize, offset: usize) {
    let mut s = String::from("text,label\n");
    for i in 0..n {
        let j = (i / 2 + offset) % 6;
        if i % 2 == 0 {
            s.push_str(&format!("{} it is,pos\n", POS[j]));
        } else {
            s.push_str(&format!("{} it is,neg\n", NEG[j]));
        }
    }
    std::fs::write(path, s).unwrap();
}

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, Some(&dir.join("cache")))
}

fn train_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    files_args(model, out, "train.csv", "dev.csv", extra)
}

fn files_args<'a>(
    model: &'a str,
    out: &'a str,
    train: &'a str,
    dev: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        model,
        "--train-file",
        train,
        "--dev-file",
        dev,
        "--output",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--no-progress",
        "--lora-alpha",
        "8",
        // bf16 products are chosen by a start-up timing, which a loaded machine (tests in
        // parallel) can flip between two runs: f32 keeps reruns comparable.
        "--set",
        "train.bf16=false",
    ];
    v.extend_from_slice(extra);
    v
}

fn setup(name: &str) -> (Tmp, String) {
    let t = Tmp::new(name);
    write_csv(&t.0.join("train.csv"), 48, 0);
    write_csv(&t.0.join("dev.csv"), 12, 3);
    let model = fixtures()
        .join("tiny-bert")
        .canonicalize()
        .unwrap()
        .display()
        .to_string();
    (t, model)
}

/// The metrics log without wall-clock fields.
fn metrics_without_times(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("train_seconds");
            m.remove("examples_per_second");
            v
        })
        .collect()
}

#[test]
fn rerun_with_same_seed_gives_identical_metrics_and_adapter_is_usable() {
    let (t, model) = setup("rerun");
    let a = run(&train_args(&model, "out-a", &[]), &t.0);
    assert!(a.status.success(), "{}", text(&a));
    assert!(text(&a).contains("adapter saved to"), "{}", text(&a));
    let b = run(&train_args(&model, "out-b", &[]), &t.0);
    assert!(b.status.success(), "{}", text(&b));
    let (ma, mb) = (
        metrics_without_times(&t.0.join("out-a")),
        metrics_without_times(&t.0.join("out-b")),
    );
    assert_eq!(ma.len(), 2);
    assert_eq!(ma, mb, "same seed, different metrics");
    assert_eq!(
        std::fs::read(t.0.join("out-a/adapter_model.safetensors")).unwrap(),
        std::fs::read(t.0.join("out-b/adapter_model.safetensors")).unwrap()
    );
    // A different seed trains differently.
    let c = run(&train_args(&model, "out-c", &["--seed", "7"]), &t.0);
    assert!(c.status.success(), "{}", text(&c));
    assert_ne!(
        std::fs::read(t.0.join("out-a/adapter_model.safetensors")).unwrap(),
        std::fs::read(t.0.join("out-c/adapter_model.safetensors")).unwrap()
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "run_config.json",
        "results.json",
    ] {
        assert!(t.0.join("out-a").join(f).exists(), "missing {f}");
    }
    let p = run(
        &[
            "predict",
            "--adapter",
            "out-a",
            "--json",
            "great movie",
            "awful film",
        ],
        &t.0,
    );
    assert!(p.status.success(), "{}", text(&p));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&p.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let probs: Vec<f64> = l["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        assert!(["pos", "neg"].contains(&l["label"].as_str().unwrap()));
    }
    let e = run(&["eval", "--adapter", "out-a", "--data", "dev.csv"], &t.0);
    assert!(e.status.success(), "{}", text(&e));
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.0.join("out-a/results.json")).unwrap())
            .unwrap();
    let acc = res["dev"]["accuracy"].as_f64().unwrap();
    assert!(
        text(&e).contains(&format!("accuracy {acc:.4}")),
        "eval disagrees with training: {} vs {acc}",
        text(&e)
    );
}

fn assert_fails(t: &Tmp, args: &[&str], needles: &[&str]) {
    let o = run(args, &t.0);
    let msg = text(&o);
    assert!(!o.status.success(), "expected failure for {args:?}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message for {args:?} lacks `{n}`:\n{msg}");
    }
    assert!(
        !t.0.join("out").exists(),
        "partial output left for {args:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&t.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[test]
fn bad_input_gives_clear_errors_and_no_output() {
    let (t, model) = setup("bad");
    let d = &t.0;
    assert_fails(
        &t,
        &train_args("/nonexistent/model", "out", &[]),
        &["/nonexistent/model"],
    );
    assert_fails(
        &t,
        &train_args(&model, "out", &["--target-modules", "qurey"]),
        &["qurey", "attention.self.query"],
    );
    std::fs::write(d.join("empty.csv"), "").unwrap();
    assert_fails(
        &t,
        &files_args(&model, "out", "empty.csv", "dev.csv", &[]),
        &["empty.csv"],
    );
    std::fs::write(d.join("nolabel.csv"), "text,category\ngood film,pos\n").unwrap();
    assert_fails(
        &t,
        &files_args(&model, "out", "nolabel.csv", "dev.csv", &[]),
        &["label", "category"],
    );
    std::fs::write(
        d.join("dev-unseen.csv"),
        "text,label\ngood film,pos\nbad film,meh\n",
    )
    .unwrap();
    assert_fails(
        &t,
        &files_args(&model, "out", "train.csv", "dev-unseen.csv", &[]),
        &["meh", "dev"],
    );
    let mut bytes = b"text,label\ngood film,pos\n".to_vec();
    bytes.extend_from_slice(b"bad \xff\xfe film,neg\n");
    std::fs::write(d.join("latin1.csv"), bytes).unwrap();
    assert_fails(
        &t,
        &files_args(&model, "out", "latin1.csv", "dev.csv", &[]),
        &["latin1.csv", "UTF-8"],
    );
    std::fs::write(d.join("a-file"), "").unwrap();
    let o = run(&train_args(&model, "a-file/out", &[]), d);
    assert!(
        !o.status.success() && text(&o).contains("a-file"),
        "{}",
        text(&o)
    );
    assert_fails(
        &t,
        &train_args(&model, "out", &["--r", "0"]),
        &["`r`", "r >= 1"],
    );
    assert_fails(
        &t,
        &train_args(&model, "out", &["--device", "tpu"]),
        &["unknown device `tpu`", "cuda:N"],
    );
    if !cfg!(feature = "cuda") {
        assert_fails(
            &t,
            &train_args(&model, "out", &["--device", "cuda"]),
            &["built without CUDA", "--features cuda"],
        );
    }
    let mut cfg = std::fs::read_to_string(fixtures().join("tiny-bert/config.json")).unwrap();
    cfg = cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 48");
    std::fs::create_dir_all(d.join("badmodel")).unwrap();
    std::fs::write(d.join("badmodel/config.json"), cfg).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(
            fixtures().join("tiny-bert").join(f),
            d.join("badmodel").join(f),
        )
        .unwrap();
    }
    let bad = d.join("badmodel").display().to_string();
    assert_fails(
        &t,
        &train_args(&bad, "out", &[]),
        &["hidden_size", "[120, 32]"],
    );
}

#[test]
fn show_config_reports_sources() {
    let (t, model) = setup("show");
    std::fs::write(t.0.join("run.toml"), "[train]\nepochs = 7\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "train",
            "--config",
            "run.toml",
            "--model",
            &model,
            "--lr",
            "0.02",
            "--show-config",
        ])
        .env("DELTATUNE_TRAIN_SEED", "5")
        .current_dir(&t.0)
        .output()
        .unwrap();
    let s = text(&o);
    assert!(o.status.success(), "{s}");
    assert!(s.contains("train.epochs = 7    # file"), "{s}");
    assert!(s.contains("train.lr = 0.02    # flag"), "{s}");
    assert!(s.contains("train.seed = 5    # env"), "{s}");
    assert!(s.contains("lora.r = 8    # default"), "{s}");
}

#[test]
fn every_method_trains_saves_and_reloads_identically() {
    let (t, model) = setup("methods");
    for method in [
        "lora",
        "ia3",
        "bitfit",
        "prompt",
        "prefix",
        "adapter",
        "intrinsic",
        "unipelt",
        "mam",
    ] {
        let out = format!("out-{method}");
        let args = train_args(&model, &out, &["--method", method]);
        let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
            .args(&args)
            .current_dir(&t.0)
            .env("DELTATUNE_PROMPT_NUM_VIRTUAL_TOKENS", "4")
            .env("DELTATUNE_PREFIX_NUM_VIRTUAL_TOKENS", "4")
            .env("DELTATUNE_INTRINSIC_NUM_VIRTUAL_TOKENS", "4")
            .env("DELTATUNE_INTRINSIC_INTRINSIC_DIM", "8")
            .output()
            .unwrap();
        assert!(o.status.success(), "{method}: {}", text(&o));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(t.0.join(&out).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert!(cfg["peft_type"].is_string(), "{method}: {cfg}");
        // Reloading from the files gives the accuracy training reported.
        let res: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(t.0.join(&out).join("results.json")).unwrap(),
        )
        .unwrap();
        let acc = res["dev"]["accuracy"].as_f64().unwrap();
        let e = run(&["eval", "--adapter", &out, "--data", "dev.csv"], &t.0);
        assert!(e.status.success(), "{method}: {}", text(&e));
        assert!(
            text(&e).contains(&format!("accuracy {acc:.4}")),
            "{method}: eval {} vs trained {acc}",
            text(&e)
        );
    }
}

#[test]
fn merge_writes_a_plain_model_for_lora_and_refuses_non_linear_deltas() {
    let (t, model) = setup("merge");
    for method in ["lora", "prefix", "unipelt"] {
        let out = format!("out-{method}");
        let o = run(
            &train_args(
                &model,
                &out,
                &["--method", method, "--set", "prefix.num_virtual_tokens=4"],
            ),
            &t.0,
        );
        assert!(o.status.success(), "{method}: {}", text(&o));
    }
    let o = run(&["merge", "--adapter", "out-lora", "-o", "merged"], &t.0);
    assert!(o.status.success(), "{}", text(&o));
    // The command reloads what it wrote and compares it with the adapter.
    assert!(
        text(&o).contains("max probability difference"),
        "{}",
        text(&o)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.0.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["num_labels"], 2);
    assert!(t.0.join("merged/model.safetensors").exists());
    assert!(t.0.join("merged/tokenizer.json").exists());
    assert_fails(
        &t,
        &["merge", "--adapter", "out-prefix", "-o", "m2"],
        &["cannot merge", "prefix", "unmerged"],
    );
    assert_fails(
        &t,
        &["merge", "--adapter", "out-unipelt", "-o", "m3"],
        &["cannot merge", "gate"],
    );
    assert!(!t.0.join("m2").exists() && !t.0.join("m3").exists());
}

#[test]
fn learned_subspace_is_fitted_from_prompts_and_travels_with_the_adapter() {
    let (t, model) = setup("subspace");
    let mut dirs = Vec::new();
    for i in 0..3 {
        let out = format!("src-{i}");
        let shard = format!("data.train_shard={i}/3");
        let o = run(
            &train_args(
                &model,
                &out,
                &[
                    "--method",
                    "prompt",
                    "--set",
                    "prompt.num_virtual_tokens=4",
                    "--set",
                    &shard,
                ],
            ),
            &t.0,
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("train 16 /"), "{}", text(&o));
        dirs.push(out);
    }
    let adapters = dirs.join(",");
    assert_fails(
        &t,
        &[
            "subspace",
            "fit",
            "--adapters",
            &adapters,
            "--dim",
            "3",
            "-o",
            "s.safetensors",
        ],
        &["intrinsic_dim", "1..=2"],
    );
    let o = run(
        &[
            "subspace",
            "fit",
            "--adapters",
            &adapters,
            "--dim",
            "2",
            "-o",
            "s.safetensors",
        ],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &train_args(
            &model,
            "out-int",
            &[
                "--method",
                "intrinsic",
                "--set",
                "intrinsic.num_virtual_tokens=4",
                "--set",
                "intrinsic.intrinsic_dim=2",
                "--set",
                "intrinsic.subspace=s.safetensors",
            ],
        ),
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("68 trainable"), "{}", text(&o));
    // The adapter folder holds its own copy: it still loads after the artifact is gone.
    std::fs::remove_file(t.0.join("s.safetensors")).unwrap();
    let e = run(&["eval", "--adapter", "out-int", "--data", "dev.csv"], &t.0);
    assert!(e.status.success(), "{}", text(&e));
    // Around the sources' shared initial prompt (a run with the prompt frozen), d may be n.
    let o = run(
        &train_args(
            &model,
            "origin",
            &[
                "--method",
                "prompt",
                "--set",
                "prompt.num_virtual_tokens=4",
                "--set",
                "train.freeze=prompt_embeddings",
            ],
        ),
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    let fit = |dim: &str| {
        run(
            &[
                "subspace",
                "fit",
                "--adapters",
                &adapters,
                "--origin",
                "origin",
                "--dim",
                dim,
                "-o",
                "so.safetensors",
                // Fitted again below with another dimension.
                "--overwrite",
            ],
            &t.0,
        )
    };
    let o = fit("3");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("deviation from the origin kept: 1.00 1.00 1.00"),
        "{}",
        text(&o)
    );
    let o = fit("4");
    assert!(
        !o.status.success() && text(&o).contains("1..=3"),
        "{}",
        text(&o)
    );
    // A LoRA adapter is not a source.
    let o = run(&train_args(&model, "out-lora", &[]), &t.0);
    assert!(o.status.success());
    assert_fails(
        &t,
        &[
            "subspace",
            "fit",
            "--adapters",
            "src-0,out-lora",
            "--dim",
            "1",
            "-o",
            "x.safetensors",
        ],
        &["lora", "prompt-tuning"],
    );
}

#[test]
fn freeze_keeps_a_delta_at_its_initial_value() {
    let (t, model) = setup("freeze");
    let o = run(
        &train_args(
            &model,
            "zout",
            &[
                "--method",
                "intrinsic",
                "--set",
                "intrinsic.num_virtual_tokens=4",
                "--set",
                "train.freeze=intrinsic_z",
            ],
        ),
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("frozen by train.freeze: intrinsic_z"));
    let w = candle_core::safetensors::load(
        t.0.join("zout/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let z: Vec<f32> = w["intrinsic_z"].to_vec1().unwrap();
    assert!(z.iter().all(|v| *v == 0.0), "{z:?}");
    assert_fails(
        &t,
        &[
            "train",
            "--model",
            &model,
            "--train-file",
            "train.csv",
            "--dev-file",
            "dev.csv",
            "-o",
            "o2",
            "--set",
            "train.freeze=lora_,classifier",
        ],
        &["freezes every trainable"],
    );
    assert_fails(
        &t,
        &[
            "train",
            "--model",
            &model,
            "--train-file",
            "train.csv",
            "--dev-file",
            "dev.csv",
            "-o",
            "o3",
            "--set",
            "lora.rr=3",
        ],
        &["unknown setting `lora.rr`", "lora.r"],
    );
}

#[test]
fn auto_tries_methods_by_halving_and_trains_the_winner() {
    let (t, model) = setup("auto");
    let o = run(
        &[
            "auto",
            "--model",
            &model,
            "--data",
            "train.csv",
            "--dev",
            "dev.csv",
            "--batch-size",
            "8",
            "-o",
            "chosen",
            "--budget",
            "30s",
            "--candidates",
            "4",
        ],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("chosen:") && text(&o).contains("prior"),
        "{}",
        text(&o)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.0.join("chosen/auto.json")).unwrap())
            .unwrap();
    let rungs = v["rungs"].as_array().unwrap();
    // The plan's contenders (best prior first) ran in the first rung, the others are listed
    // with the reason; later rungs halve.
    let count = |k: usize| rungs.iter().filter(|r| r["rung"] == k).count();
    let first = count(0);
    assert_eq!(first as u64, v["plan"]["candidates"].as_u64().unwrap());
    assert!((2..=4).contains(&first), "{v}");
    let prior = v["prior"].as_array().unwrap();
    let not_tried = v["not_tried"].as_array().unwrap();
    assert_eq!(first + not_tried.len(), prior.len());
    for (i, r) in rungs.iter().filter(|r| r["rung"] == 0).enumerate() {
        assert_eq!(r["method"], prior[i]["method"], "{v}");
    }
    let planned: Vec<u64> = v["plan"]["rungs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_u64().unwrap())
        .collect();
    for (k, &m) in planned.iter().enumerate() {
        if v["stopped_early"].is_null() || count(k) > 0 {
            assert_eq!(count(k) as u64, m, "{v}");
        }
        if k > 0 {
            assert_eq!(m, planned[k - 1].div_ceil(2));
        }
    }
    let report = std::fs::read_to_string(t.0.join("chosen/auto-report.html")).unwrap();
    assert!(
        report.contains("Not tried") != not_tried.is_empty(),
        "{report}"
    );
    assert!(report.contains("Final training"), "{report}");
    // The rungs are in the store as a study; a second run learns from the first two.
    let l = run(&["study", "list"], &t.0);
    assert!(text(&l).contains("auto-"), "{}", text(&l));
    for out in ["chosen2", "chosen3"] {
        let o = run(
            &[
                "auto",
                "--model",
                &model,
                "--train-file",
                "train.csv",
                "--dev-file",
                "dev.csv",
                "--batch-size",
                "8",
                "-o",
                out,
                "--budget",
                "30s",
            ],
            &t.0,
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let v3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.0.join("chosen3/auto.json")).unwrap())
            .unwrap();
    // Run 3 saw the first rungs of runs 1 and 2 (each at least two methods).
    assert!(
        v3["past_auto_results"].as_u64().unwrap() >= first as u64 + 2,
        "{v3}"
    );
    // The winner's adapter is a normal adapter folder.
    let e = run(&["eval", "--adapter", "chosen", "--data", "dev.csv"], &t.0);
    assert!(e.status.success(), "{}", text(&e));
    assert_fails(
        &t,
        &["auto", "--model", &model, "--budget", "5y"],
        &["unknown unit"],
    );
    assert_fails(
        &t,
        &["auto", "--model", &model, "--candidates", "0"],
        &["--candidates 0", "at least one"],
    );
}

#[test]
fn search_with_the_train_objective_records_each_epoch() {
    let (t, model) = setup("search-train");
    std::fs::write(
        t.0.join("space.toml"),
        "[train]\nlr = { float = [1e-3, 1e-2], log = true }\n[methods.lora]\nr = { int = [2, 4], step = 2 }\n[methods.bitfit]\n",
    )
    .unwrap();
    let model_set = format!("model={model}");
    let o = run(
        &[
            "search",
            "--space",
            "space.toml",
            "--study",
            "s",
            "--storage",
            "s.db",
            "--trials",
            "3",
            "--pruner",
            "none",
            "--set",
            &model_set,
            "--set",
            "data.train=train.csv",
            "--set",
            "data.dev=dev.csv",
            "--set",
            "train.epochs=2",
            "--set",
            "train.batch_size=8",
        ],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    let e = run(
        &[
            "study",
            "export",
            "s",
            "--storage",
            "s.db",
            "--format",
            "json",
        ],
        &t.0,
    );
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3);
    for tr in trials {
        assert_eq!(tr["state"], "COMPLETE", "{tr}");
        // One intermediate value per epoch, the last equal to the trial's value or below the
        // best epoch's (the adapter keeps the best epoch).
        let inter = tr["intermediate"].as_array().unwrap();
        assert_eq!(inter.len(), 2, "{tr}");
        let best = inter
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!((tr["value"].as_f64().unwrap() - best).abs() < 1e-9, "{tr}");
    }
    let b = run(&["study", "best", "s", "--storage", "s.db"], &t.0);
    assert!(text(&b).contains("deltatune train --set"), "{}", text(&b));
    let r = run(
        &["study", "report", "s", "--storage", "s.db", "-o", "r.html"],
        &t.0,
    );
    assert!(r.status.success());
    let html = std::fs::read_to_string(t.0.join("r.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Optimisation history"));

    // --report-every-steps 4: 48 examples / batch 8 x 2 epochs = 12 steps, so each trial
    // reports 3 intermediate values (k = 1, 2, 3 at steps 4, 8, 12) instead of 2 epochs.
    let o = run(
        &[
            "search",
            "--space",
            "space.toml",
            "--study",
            "by-steps",
            "--storage",
            "s.db",
            "--trials",
            "2",
            "--pruner",
            "none",
            "--report-every-steps",
            "4",
            "--set",
            &model_set,
            "--set",
            "data.train=train.csv",
            "--set",
            "data.dev=dev.csv",
            "--set",
            "train.epochs=2",
            "--set",
            "train.batch_size=8",
        ],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    let e = run(
        &[
            "study",
            "export",
            "by-steps",
            "--storage",
            "s.db",
            "--format",
            "json",
        ],
        &t.0,
    );
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    for tr in v["trials"].as_array().unwrap() {
        let steps: Vec<u64> = tr["intermediate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{tr}");
    }

    // A setting that breaks every trial stops the search with the trials' error instead of
    // retrying forever.
    let o = run(
        &[
            "search",
            "--space",
            "space.toml",
            "--study",
            "broken",
            "--storage",
            "s.db",
            "--trials",
            "3",
            "--set",
            &model_set,
            "--set",
            "data.dev=dev.csv",
        ],
        &t.0,
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("5 trials in a row failed") && text(&o).contains("see "),
        "{}",
        text(&o)
    );
}

#[test]
fn inspect_shows_every_member_of_a_composition() {
    let (t, model) = setup("inspect-compose");
    let o = run(
        &[
            "inspect",
            "--model",
            &model,
            "--method",
            "unipelt",
            "--set",
            "prefix.num_virtual_tokens=4",
        ],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for needle in [
        "lora:lora_A.weight",
        "adapter:adapter.up.weight",
        "prefix: prompt_embeddings",
        "gate(lora)",
        "gate(adapter)",
        "gate(prefix)",
        "head",
        "merge: not possible (gated",
    ] {
        assert!(out.contains(needle), "missing `{needle}` in\n{out}");
    }
    let o = run(&["inspect", "--model", &model, "--method", "lora"], &t.0);
    assert!(text(&o).contains("merge: possible"), "{}", text(&o));
}

#[test]
fn convert_writes_a_dinov2_folder_and_refuses_other_graphs() {
    let t = Tmp::new("convert");
    let onnx = fixtures().join("tiny-dinov2/model.onnx");
    let o = run(
        &["convert", "--onnx", onnx.to_str().unwrap(), "-o", "out"],
        &t.0,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 layers, width 32, 2 heads"),
        "{}",
        text(&o)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.0.join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "dinov2");
    assert_eq!(cfg["num_attention_heads"], 2);
    let tensors = candle_core::safetensors::load(
        t.0.join("out/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 43);
    assert_eq!(
        tensors["encoder.layer.1.attention.attention.query.weight"].dims(),
        [32, 32]
    );
    assert_eq!(tensors["encoder.layer.0.mlp.fc1.weight"].dims(), [128, 32]);
    std::fs::remove_dir_all(t.0.join("out")).unwrap();
    let small = fixtures().join("onnx/small.onnx");
    assert_fails(
        &t,
        &["convert", "--onnx", small.to_str().unwrap(), "-o", "out"],
        &["small.onnx", "embeddings.cls_token"],
    );
    assert_fails(
        &t,
        &["convert", "--onnx", "missing.onnx", "-o", "out"],
        &["missing.onnx"],
    );
}
