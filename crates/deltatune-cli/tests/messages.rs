//! Inputs that used to give a wrong or misleading answer now get a clear refusal naming the
//! input, with a non-zero exit status (issue 27's "silent wrong results" and "unclear messages").

use std::path::Path;
use std::process::Output;

mod support;
use support::{fixtures, run_with, text};

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, Some(&dir.join("cache")))
}

fn fails(o: &Output, needles: &[&str]) {
    let msg = text(o);
    assert!(!o.status.success(), "expected a refusal:\n{msg}");
    for n in needles {
        assert!(msg.contains(n), "message lacks `{n}`:\n{msg}");
    }
}

fn data(d: &Path) {
    let mut s = String::from("text,label\n");
    for i in 0..8 {
        s.push_str(if i % 2 == 0 {
            "good film,pos\n"
        } else {
            "bad film,neg\n"
        });
    }
    std::fs::write(d.join("train.csv"), &s).unwrap();
    std::fs::write(d.join("dev.csv"), &s).unwrap();
}

fn train<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        model,
        "--train-file",
        "train.csv",
        "--dev-file",
        "dev.csv",
        "--epochs",
        "1",
        "--no-progress",
        "-o",
        "run",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn settings_that_would_train_nothing_or_fail_mid_run_are_refused_up_front() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    data(d);
    let model = fixtures().join("tiny-bert").display().to_string();
    let o = run(&train(&model, &["--set", "train.max_steps=0"]), d);
    fails(&o, &["max_steps", "at least 1"]);
    assert!(!text(&o).contains("checkpoint"), "{}", text(&o));
    // The tiny BERT has 64 positions; a 100-token cap lets a long example through.
    let long = "a very long review ".repeat(30);
    std::fs::write(
        d.join("train.csv"),
        format!("text,label\ngood,pos\nbad,neg\n{long},pos\n"),
    )
    .unwrap();
    let o = run(&train(&model, &["--max-length", "100"]), d);
    fails(
        &o,
        &[
            "train example 3",
            "a very long review",
            "64 positions",
            "--max-length 64",
        ],
    );
    // A failed run leaves no checkpoint folder behind.
    assert!(!d.join("run.checkpoints").exists());
    assert!(!d.join("run").exists());
}

#[test]
fn generate_refuses_negative_sampling_values_by_name_before_loading() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let o = run(&["generate", "--temperature", "-1", "hello"], d);
    fails(&o, &["temperature", "0 (greedy) or a positive number"]);
    assert!(!text(&o).contains("-- -1"), "{}", text(&o));
    let o = run(&["generate", "--top-k", "-1", "hello"], d);
    fails(&o, &["--top-k -1", "at least 1"]);
    let o = run(&["generate", "--top-k", "0", "hello"], d);
    fails(&o, &["--top-k 0", "at least 1"]);
    // Nothing was fetched for the refused commands.
    assert!(!d.join("cache").exists());
}

#[test]
fn a_text_adapter_given_images_names_its_task() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    data(d);
    let model = fixtures().join("tiny-bert").display().to_string();
    let o = run(&train(&model, &["--max-length", "32"]), d);
    assert!(o.status.success(), "{}", text(&o));
    image::GrayImage::from_pixel(8, 8, image::Luma([9u8]))
        .save(d.join("x.png"))
        .unwrap();
    let o = run(&["predict", "--adapter", "run", "--image", "x.png"], d);
    fails(
        &o,
        &[
            "has task `classify`",
            "deltatune predict --adapter run TEXT",
        ],
    );
    assert!(!text(&o).contains("null"), "{}", text(&o));
}
