//! `train --task image`, `predict --image` and `eval` end to end on the tiny ViT of
//! tests/fixtures with a small image folder written by the test, and the image task's bad
//! inputs.

use std::path::Path;
use std::process::Output;

mod support;
use support::{fixtures, run_with, text};

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, Some(&dir.join("cache")))
}

/// A 16 x 16 RGB image, bright on the left (class `left`) or the right half, with noise.
fn write_png(path: &Path, left: bool, seed: u32) {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        let bright = (x < 8) == left;
        let n = ((x * 7 + y * 13 + seed * 31) % 40) as u8;
        let v = if bright { 200 + n / 2 } else { 20 + n };
        image::Rgb([v, v / 2 + 20, 255 - v])
    });
    img.save(path).unwrap();
}

fn image_folder(root: &Path) {
    for (split, n) in [("train", 12), ("dev", 4), ("test", 4)] {
        for class in ["left", "right"] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                write_png(&d.join(format!("{i}.png")), class == "left", i as u32);
            }
        }
    }
}

#[test]
fn image_task_trains_predicts_and_evaluates_on_a_folder() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    image_folder(&d.join("imgs"));
    let model = fixtures().join("tiny-vit");
    let model = model.to_str().unwrap();
    let o = run(
        &[
            "train",
            "--task",
            "image",
            "--model",
            model,
            "--output",
            "out",
            "--no-progress",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--set",
            "data.train=imgs",
            "--set",
            "data.image_size=16",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("test accuracy:"), "{out}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
        "results.json",
    ] {
        assert!(d.join("out").join(f).exists(), "{f}");
    }
    let res: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/results.json")).unwrap())
            .unwrap();
    let test_acc = res["test"]["accuracy"].as_f64().unwrap();

    // The saved adapter reloads to the same test accuracy.
    let o = run(&["eval", "--adapter", "out", "--data", "imgs"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("accuracy {test_acc:.4}")),
        "{} vs {test_acc}",
        text(&o)
    );

    let img = d.join("imgs/test/left/0.png");
    let o = run(
        &[
            "predict",
            "--adapter",
            "out",
            "--json",
            "--image",
            img.to_str().unwrap(),
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let p: Vec<f64> = line["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(p.len(), 2);
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4);

    // `merge` folds the LoRA into the ViT and writes a transformers image classifier with the
    // labels and the preprocessing (checked inside merge against the adapter to 1e-4).
    let o = run(&["merge", "--adapter", "out", "--output", "merged"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("max probability difference"),
        "{}",
        text(&o)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "ViTForImageClassification");
    assert_eq!(cfg["id2label"]["0"], "left");
    let pre: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("merged/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pre["crop_size"]["height"], 16);
    let key = "vit.encoder.layer.0.attention.attention.query.weight";
    let load = |p: &Path| {
        let w = deltatune_core::Weights::load(p, candle_core::DType::F32).unwrap();
        let t = w.tensors().find(|(k, _)| *k == key).unwrap().1.clone();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (base_q, merged_q) = (
        load(&fixtures().join("tiny-vit/model.safetensors")),
        load(&d.join("merged/model.safetensors")),
    );
    assert!(
        base_q
            .iter()
            .zip(&merged_q)
            .any(|(a, b)| (a - b).abs() > 1e-6),
        "the merged query weight equals the base one: the LoRA was not folded in"
    );
    // The merged folder is a base model again: an image run trains on it.
    let o = run(
        &[
            "train",
            "--task",
            "image",
            "--model",
            "merged",
            "--output",
            "out2",
            "--no-progress",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--set",
            "data.train=imgs",
            "--set",
            "data.image_size=16",
        ],
        d,
    );
    assert!(o.status.success(), "{}", text(&o));

    // Bad input, each a clear error.
    std::fs::write(d.join("broken.png"), b"not an image").unwrap();
    let o = run(&["predict", "--adapter", "out", "--image", "broken.png"], d);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("broken.png` does not decode"),
        "{}",
        text(&o)
    );
    let o = run(&["predict", "--adapter", "out", "a sentence"], d);
    assert!(text(&o).contains("image classifier's adapter: give images with --image"));
    std::fs::create_dir_all(d.join("imgs/train/empty")).unwrap();
    let o = run(
        &[
            "train",
            "--task",
            "image",
            "--model",
            model,
            "--output",
            "out3",
            "--no-progress",
            "--set",
            "data.train=imgs",
            "--set",
            "data.image_size=16",
        ],
        d,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("empty"), "{}", text(&o));
}
