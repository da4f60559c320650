//! `deltatune merge --adapters`: LoRA adapters combined through the command line give PEFT's
//! `add_weighted_adapter` tensors (fixtures of scripts/gen_combine_fixtures.py), and bad
//! requests are refused by name.

use std::path::{Path, PathBuf};
use std::process::Output;

mod support;
use support::{run_with, text};

use candle_core::DType;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama-combine")
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S], dir: &Path) -> Output {
    run_with(args, dir, None)
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    deltatune_core::Weights::load(p, DType::F32)
        .unwrap()
        .tensors()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            (k.to_string(), v.to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn merge_adapters_writes_peft_combinations() {
    let t = tempfile::tempdir().unwrap();
    let f = fixture();
    let src = |names: &[&str]| {
        names
            .iter()
            .map(|n| f.join(n).display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let expected: std::collections::BTreeMap<String, Vec<f32>> =
        tensors(&f.join("expected.safetensors"))
            .into_iter()
            .collect();
    for (case, adapters, weights, extra) in [
        (
            "ties",
            ["a", "b", "c"].as_slice(),
            "0.7,-0.3,0.5",
            ["--density", "0.5"].as_slice(),
        ),
        ("cat", &["a", "b", "d"], "1.0,0.5,-0.8", &[]),
        (
            "magnitude_prune",
            &["a", "b", "c"],
            "0.7,-0.3,0.5",
            &["--density", "0.4"],
        ),
    ] {
        let sources = src(adapters);
        let mut args = vec![
            "merge",
            "--adapters",
            &sources,
            "--weights",
            weights,
            "--combination",
            case,
            "-o",
            case,
        ];
        args.extend(extra);
        let o = run(&args, t.path());
        assert!(o.status.success(), "{case}: {}", text(&o));
        let got = tensors(&t.path().join(case).join("adapter_model.safetensors"));
        assert_eq!(got.len(), 12, "{case}");
        for (k, v) in got {
            let want = &expected[&format!("{case}/{k}")];
            let d = v
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{case}: {k} differs from PEFT's by {d}");
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(t.path().join(case).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], cfg["lora_alpha"].as_f64().unwrap() as u64);
        assert!(t.path().join(case).join("combination.json").exists());
    }

    // Bad requests, each named.
    let (ad, ab) = (src(&["a", "d"]), src(&["a", "b"]));
    for (args, want) in [
        (
            vec![
                "merge",
                "--adapters",
                &ad,
                "--combination",
                "linear",
                "-o",
                "x",
            ],
            "needs adapters of one rank",
        ),
        (
            vec![
                "merge",
                "--adapters",
                &ab,
                "--combination",
                "dare_ties",
                "-o",
                "x",
            ],
            "needs a density",
        ),
        (
            vec![
                "merge",
                "--adapters",
                &ab,
                "--combination",
                "svd",
                "-o",
                "x",
            ],
            "unknown combination `svd`",
        ),
        (
            vec!["merge", "--adapters", &ab, "--weights", "1", "-o", "x"],
            "1 weights for 2 adapters",
        ),
        (
            vec![
                "merge",
                "--adapter",
                "somewhere",
                "--weights",
                "1",
                "-o",
                "x",
            ],
            "use them with --adapters",
        ),
    ] {
        let o = run(&args, t.path());
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(!t.path().join("x").exists(), "nothing written on error");
    }
}
