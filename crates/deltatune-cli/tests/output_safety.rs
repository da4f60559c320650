//! deltatune never removes or replaces what it did not write: every command that writes a
//! folder or file refuses one holding a user's files, one that is (or contains, or lies inside)
//! an input of the same command, and the current folder; a finished output is replaced only
//! with `--overwrite`. Each case checks that the user's files are byte-identical afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod support;
use support::{fixtures, run_with, text};

fn run(args: &[&str], dir: &Path) -> Output {
    run_with(args, dir, Some(&dir.join("cache")))
}

/// Every file under `dir` (relative path -> bytes), folders included as empty entries.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn csv(path: &Path, offset: usize) {
    let pos = ["good film", "great movie", "a witty story", "superb acting"];
    let neg = ["bad film", "awful movie", "a dull story", "terrible acting"];
    let mut s = String::from("text,label\n");
    for i in 0..16 {
        let j = (i / 2 + offset) % 4;
        if i % 2 == 0 {
            s.push_str(&format!("{} it is,pos\n", pos[j]));
        } else {
            s.push_str(&format!("{} it is,neg\n", neg[j]));
        }
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, s).unwrap();
}

fn tiny_bert() -> String {
    fixtures()
        .join("tiny-bert")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

/// A short `train` run's arguments on the tiny BERT with data in `data/`.
fn train<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        model,
        "--train-file",
        "data/train.csv",
        "--dev-file",
        "data/dev.csv",
        "--output",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
    ];
    v.extend_from_slice(extra);
    v
}

fn fails(o: &Output, needles: &[&str]) {
    let msg = text(o);
    assert!(!o.status.success(), "expected a refusal:\n{msg}");
    for n in needles {
        assert!(msg.contains(n), "message lacks `{n}`:\n{msg}");
    }
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

/// No staging or `.old` folder is left beside the outputs.
fn no_leftovers(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-") || n.contains(".old-") || n.ends_with(".checkpoints"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn train_never_replaces_a_users_folder_and_needs_overwrite_for_a_finished_run() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    csv(&d.join("data/train.csv"), 0);
    csv(&d.join("data/dev.csv"), 1);
    let model = tiny_bert();

    // A folder holding a user's file.
    std::fs::create_dir_all(d.join("out/x")).unwrap();
    std::fs::write(d.join("out/x/notes.txt"), b"my notes").unwrap();
    let before = snapshot(d);
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = run(&train(&model, "out/x", extra), d);
        fails(&o, &["out/x", "notes.txt", "deltatune did not write"]);
        assert_eq!(snapshot(d), before);
    }

    // The data's own folder, a folder above it, and the current folder (by absolute path).
    let cwd = d.display().to_string();
    for (out, relation) in [
        ("data", "contains data.train"),
        ("data/train.csv", "is data.train"),
        (cwd.as_str(), "current folder"),
    ] {
        let o = run(&train(&model, out, &["--overwrite"]), d);
        fails(&o, &[relation]);
        assert_eq!(snapshot(d), before, "{out}");
    }

    // A finished run is replaced only with --overwrite.
    ok(&run(&train(&model, "runs/a", &[]), d));
    let done = snapshot(&d.join("runs/a"));
    assert!(done.contains_key(Path::new(".deltatune-output.json")));
    let o = run(&train(&model, "runs/a", &["--seed", "7"]), d);
    fails(&o, &["runs/a", "pass --overwrite"]);
    assert_eq!(snapshot(&d.join("runs/a")), done);
    ok(&run(
        &train(&model, "runs/a", &["--seed", "7", "--overwrite"]),
        d,
    ));
    assert_ne!(
        snapshot(&d.join("runs/a"))[Path::new("adapter_model.safetensors")],
        done[Path::new("adapter_model.safetensors")],
        "the new seed's adapter replaced the old one"
    );
    no_leftovers(&d.join("runs"));

    // A user's file added to a finished run makes it the user's.
    std::fs::write(d.join("runs/a/README.md"), b"# my run").unwrap();
    let before = snapshot(d);
    let o = run(&train(&model, "runs/a", &["--overwrite"]), d);
    fails(&o, &["README.md", "deltatune did not write"]);
    assert_eq!(snapshot(d), before);
}

#[test]
fn merge_refuses_its_own_inputs_the_current_folder_and_a_users_folder() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    csv(&d.join("data/train.csv"), 0);
    csv(&d.join("data/dev.csv"), 1);
    let model = tiny_bert();
    // Two LoRA adapters to combine (PEFT's, from the combination fixtures) and a trained
    // classifier to merge into its base.
    for (from, to) in [("a", "runs/A"), ("b", "runs/B")] {
        let src = fixtures().join("tiny-llama-combine").join(from);
        std::fs::create_dir_all(d.join(to)).unwrap();
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(to).join(e.file_name())).unwrap();
        }
    }
    ok(&run(&train(&model, "runs/T", &[]), d));
    std::fs::create_dir_all(d.join("mine")).unwrap();
    std::fs::write(d.join("mine/keep.bin"), [1u8, 2, 3]).unwrap();
    let before = snapshot(d);
    let cwd = d.display().to_string();
    let cases: [(&[&str], &str); 6] = [
        (
            &["merge", "--adapters", "runs/A,runs/B", "-o", "runs/A"],
            "is --adapters runs/A",
        ),
        (
            &["merge", "--adapters", "runs/A,runs/B", "-o", "runs"],
            "contains --adapters",
        ),
        (
            &["merge", "--adapter", "runs/A", "-o", "runs/A"],
            "is --adapter runs/A",
        ),
        (
            &["merge", "--adapter", "runs/A", "-o", "runs/A/merged"],
            "lies inside --adapter",
        ),
        (
            &["merge", "--adapters", "runs/A,runs/B", "-o", "mine"],
            "keep.bin",
        ),
        (
            &["merge", "--adapters", "runs/A,runs/B", "-o", &cwd],
            "current folder",
        ),
    ];
    for (args, needle) in cases {
        let mut args = args.to_vec();
        args.push("--overwrite");
        let o = run(&args, d);
        fails(&o, &[needle]);
        assert_eq!(snapshot(d), before, "{args:?}");
    }
    // Into a new folder, then again: the second needs --overwrite.
    let combine = ["merge", "--adapters", "runs/A,runs/B", "-o", "runs/C"];
    ok(&run(&combine, d));
    let o = run(&combine, d);
    fails(&o, &["pass --overwrite"]);
    let mut again = combine.to_vec();
    again.push("--overwrite");
    ok(&run(&again, d));
    // A plain model folder from `merge --adapter`.
    ok(&run(&["merge", "--adapter", "runs/T", "-o", "merged"], d));
    fails(
        &run(&["merge", "--adapter", "runs/T", "-o", "merged"], d),
        &["pass --overwrite"],
    );
    no_leftovers(d);
    no_leftovers(&d.join("runs"));
}

#[test]
fn image_training_never_writes_into_its_image_folder() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for split in ["train", "dev"] {
        for (class, v) in [("a", 30u8), ("b", 220u8)] {
            let dir = d.join("imgs").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..2u8 {
                image::GrayImage::from_pixel(8, 8, image::Luma([v + i]))
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let model = fixtures().join("tiny-vit").display().to_string();
    let before = snapshot(d);
    for out in ["imgs", "imgs/train/run", "."] {
        let o = run(
            &[
                "train",
                "--task",
                "image",
                "--model",
                &model,
                "--set",
                "data.train=imgs",
                "--no-progress",
                "--overwrite",
                "-o",
                out,
            ],
            d,
        );
        fails(&o, &[out]);
        assert_eq!(snapshot(d), before, "-o {out}");
    }
}

#[test]
fn convert_subspace_study_experiment_and_auto_refuse_a_users_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir_all(d.join("mine")).unwrap();
    std::fs::write(d.join("mine/photo.jpg"), b"\xff\xd8 not really").unwrap();
    std::fs::write(d.join("notes.md"), b"# my notes\n").unwrap();
    std::fs::write(d.join("results.csv"), b"a,b\n1,2\n").unwrap();
    csv(&d.join("data/train.csv"), 0);
    csv(&d.join("data/dev.csv"), 1);
    let before = snapshot(d);
    let onnx = fixtures()
        .join("tiny-dinov2/model.onnx")
        .display()
        .to_string();
    let model = tiny_bert();
    let auto = |extra: &[&'static str]| -> Vec<&str> {
        let mut v = vec![
            "auto",
            "--model",
            &model,
            "--train-file",
            "data/train.csv",
            "--dev-file",
            "data/dev.csv",
            "--budget",
            "1m",
            "--storage",
            "st.db",
        ];
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["convert", "--onnx", &onnx, "-o", "mine", "--overwrite"],
            "photo.jpg",
        ),
        (
            vec![
                "subspace",
                "fit",
                "--adapters",
                "a,b",
                "--dim",
                "1",
                "-o",
                "notes.md",
            ],
            "deltatune did not write it",
        ),
        (
            vec![
                "study",
                "export",
                "s",
                "--storage",
                "st.db",
                "-o",
                "results.csv",
            ],
            "pass --overwrite",
        ),
        (
            vec![
                "study",
                "report",
                "s",
                "--storage",
                "st.db",
                "-o",
                "notes.md",
            ],
            "deltatune did not write it",
        ),
        (
            vec![
                "experiment",
                "methods",
                "--table",
                "notes.md",
                "--runs",
                "exp",
            ],
            "deltatune did not write it",
        ),
        (auto(&["-o", "mine", "--overwrite"]), "photo.jpg"),
        (auto(&["-o", "data"]), "contains data.train"),
    ];
    for (args, needle) in cases {
        let o = run(&args, d);
        fails(&o, &[needle]);
        let mut now = snapshot(d);
        // A study store may be created by the refused command; nothing else may change.
        now.remove(Path::new("st.db"));
        assert_eq!(now, before, "{args:?}");
    }
    // convert checks before it reads, and creates nothing when the conversion fails.
    let small = fixtures().join("onnx/small.onnx").display().to_string();
    let o = run(&["convert", "--onnx", &small, "-o", "new/parent/out"], d);
    fails(&o, &["small.onnx"]);
    assert!(
        !d.join("new").exists(),
        "convert created the output's parent"
    );
}
