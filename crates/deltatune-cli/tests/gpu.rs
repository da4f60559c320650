//! `--device cuda` against `--device cpu`, end to end: built only with `--features cuda`, and
//! skipped with a message where no GPU answers (required under `DELTATUNE_REQUIRE_GPU=1`,
//! which `scripts/gpu_check.sh` sets). The same short training runs on the GPU and on the CPU
//! must log the same losses and accuracies and save the same adapter, to f32 rounding (the GPU
//! takes candle's kernels with the ops layer's composed backward; the CPU our kernels).
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::path::Path;

mod support;
use support::{cache, fixtures, gguf, run_with, text, write_colour_codes, Tmp};

fn gpu_present() -> bool {
    if candle_core::Device::new_cuda(0).is_ok() {
        return true;
    }
    assert!(
        std::env::var("DELTATUNE_REQUIRE_GPU").as_deref() != Ok("1"),
        "DELTATUNE_REQUIRE_GPU=1 but no CUDA GPU 0 answers"
    );
    eprintln!("NOTE: skipping: no CUDA GPU 0");
    false
}

/// The numbers of every line of metrics.jsonl (wall-clock fields left out).
fn metrics(dir: &Path) -> Vec<BTreeMap<String, f64>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| !k.contains("second") && !k.contains("rss"))
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect()
        })
        .collect()
}

fn adapter(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let f = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, f)
        })
        .collect()
}

/// Trains with `args` on each device and compares what the runs logged and saved.
fn same_on_both(t: &Tmp, args: &[&str], tol: f64) {
    let mut outs = Vec::new();
    for device in ["cpu", "cuda:0"] {
        let out = t.0.join(device.replace(':', ""));
        let mut a: Vec<&str> = vec!["--device", device];
        a.extend_from_slice(args);
        let o_str = out.display().to_string();
        a.extend_from_slice(&["--output", &o_str]);
        let o = run_with(&a, &t.0, Some(&cache()));
        assert!(o.status.success(), "{device}: {}", text(&o));
        outs.push(out);
    }
    let (m_cpu, m_gpu) = (metrics(&outs[0]), metrics(&outs[1]));
    assert_eq!(m_cpu.len(), m_gpu.len());
    for (a, b) in m_cpu.iter().zip(&m_gpu) {
        for (k, x) in a {
            let y = b[k];
            assert!(
                (x - y).abs() <= tol * x.abs().max(1.0),
                "{k}: {x} on the CPU, {y} on the GPU"
            );
        }
    }
    let (w_cpu, w_gpu) = (adapter(&outs[0]), adapter(&outs[1]));
    assert_eq!(
        w_cpu.keys().collect::<Vec<_>>(),
        w_gpu.keys().collect::<Vec<_>>()
    );
    for (k, a) in &w_cpu {
        let b = &w_gpu[k];
        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d <= tol as f32 * scale,
            "{k}: differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn classification_trains_the_same_on_the_gpu() {
    if !gpu_present() {
        return;
    }
    let t = Tmp::new("gpu-classify");
    let mut csv = String::from("text,label\n");
    for i in 0..32 {
        let (w, l) = if i % 2 == 0 {
            ("good", "pos")
        } else {
            ("bad", "neg")
        };
        csv.push_str(&format!("a {w} film number {i},{l}\n"));
    }
    std::fs::write(t.0.join("d.csv"), csv).unwrap();
    let model = fixtures().join("tiny-bert").display().to_string();
    for method in ["lora", "unipelt"] {
        same_on_both(
            &t,
            &[
                "train",
                "--model",
                &model,
                "--method",
                method,
                "--train-file",
                "d.csv",
                "--dev-file",
                "d.csv",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
            ],
            1e-4,
        );
    }
}

#[test]
fn the_decoder_trains_the_same_on_the_gpu() {
    if !gpu_present() {
        return;
    }
    let Some(g) = gguf() else { return };
    let t = Tmp::new("gpu-decoder");
    write_colour_codes(&t.0.join("d.jsonl"), 4);
    let g = g.display().to_string();
    same_on_both(
        &t,
        &[
            "train",
            "--task",
            "generate",
            "--model",
            &g,
            "--train-file",
            "d.jsonl",
            "--dev-file",
            "d.jsonl",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--set",
            "generation.max_new_tokens=3",
            "--set",
            "generation.int8_activations=false",
        ],
        1e-3,
    );
}
