//! Silent wrong results refused, end to end on the tiny BERT and ViT of tests/fixtures:
//! non-finite weights in an adapter or a base model, damaged checkpoints (checksums and the
//! fall-back to the checkpoint before), data changed under a resume, and a training split of
//! one class. Each gives a clear message and a non-zero exit status (or, for a damaged newest
//! checkpoint, the fall-back message and the same adapter as an uninterrupted run).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{fixtures, text, Tmp};

/// 120 training rows in batches of 4: 30 steps an epoch.
const STEPS_PER_EPOCH: usize = 30;

fn write_csv(path: &Path, n: usize, one_class: bool) {
    let pos = ["good film", "great movie", "a witty story", "superb acting"];
    let neg = ["bad film", "awful movie", "a dull story", "terrible acting"];
    let mut s = String::from("text,label\n");
    for i in 0..n {
        let j = (i / 2) % 4;
        if i % 2 == 0 || one_class {
            s.push_str(&format!("{} it is,pos\n", pos[j]));
        } else {
            s.push_str(&format!("{} it is,neg\n", neg[j]));
        }
    }
    std::fs::write(path, s).unwrap();
}

fn setup(name: &str) -> Tmp {
    let t = Tmp::new(name);
    write_csv(&t.0.join("train.csv"), 120, false);
    write_csv(&t.0.join("dev.csv"), 12, false);
    t
}

fn model() -> String {
    fixtures()
        .join("tiny-bert")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

fn train_args(out: &str, epochs: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        &model(),
        "--train-file",
        "train.csv",
        "--dev-file",
        "dev.csv",
        "--output",
        out,
        "--epochs",
        &epochs.to_string(),
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--no-progress",
        "--set",
        "train.checkpoint_every=1",
        // f32 products in every process: with `train.bf16` on, each process times bf16
        // against f32 once at start-up, and on a loaded machine one run (the uninterrupted
        // one, the interrupted one or the resume) can come out on the other side of the
        // threshold; bytes compared across processes then differ in their last bits.
        "--set",
        "train.bf16=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn resume_args(out: &str) -> Vec<String> {
    ["train", "--resume", out, "--no-progress"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn command<S: AsRef<std::ffi::OsStr>>(args: &[S], dir: &Path) -> Command {
    support::command(args, dir, Some(&dir.join("cache")))
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S], dir: &Path) -> Output {
    command(args, dir).output().unwrap()
}

/// The complete checkpoints in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('e') && n.contains("-b"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn steps_of(p: &Path) -> usize {
    let n = p.file_name().unwrap().to_str().unwrap();
    let (e, b) = n[1..].split_once("-b").unwrap();
    (e.parse::<usize>().unwrap() - 1) * STEPS_PER_EPOCH + b.parse::<usize>().unwrap()
}

/// Starts `args` and stops it (SIGTERM) once the checkpoint folder `ck` holds a checkpoint of
/// at least `step` steps; returns the checkpoints left.
fn interrupt(args: &[String], dir: &Path, ck: &Path, step: usize) -> Vec<PathBuf> {
    let mut child: Child = command(args, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if checkpoints(ck).last().is_some_and(|p| steps_of(p) >= step) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {step}"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_micros(300));
    }
    // SIGTERM: the run finishes its step, writes a checkpoint and exits, so what is left does
    // not depend on where a SIGKILL would have landed (crates/deltatune-cli/tests/resume.rs
    // covers SIGKILL at random steps).
    // SAFETY: sends a signal to the child this test started and still owns.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let left = checkpoints(ck);
    assert!(left.len() >= 2, "{left:?}");
    left
}

/// The byte range of tensor `key`'s data in a safetensors file.
fn tensor_range(bytes: &[u8], key: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[key]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
    8 + n + a as usize..8 + n + b as usize
}

/// The keys of a safetensors file ending in `suffix`, sorted.
fn keys_ending(bytes: &[u8], suffix: &str) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut v: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.ends_with(suffix))
        .cloned()
        .collect();
    v.sort();
    v
}

/// Sets value `index` of f32 tensor `key` of the safetensors file `path` to `v` (in place: the
/// file keeps its size).
fn poke(path: &Path, key: &str, index: usize, v: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let r = tensor_range(&bytes, key);
    let at = r.start + 4 * index;
    assert!(at + 4 <= r.end);
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn non_finite_weights_in_an_adapter_or_a_model_are_refused_by_name() {
    let t = setup("nonfinite");
    let o = run(&train_args("out", 1, &["--set", "train.max_steps=3"]), &t.0);
    assert!(o.status.success(), "{}", text(&o));
    let file = t.0.join("out/adapter_model.safetensors");
    let good = std::fs::read(&file).unwrap();
    let lora_b = keys_ending(&good, "lora_B.weight")[0].clone();
    let lora_a = keys_ending(&good, "lora_A.weight")[0].clone();
    let head = keys_ending(&good, "classifier.weight")[0].clone();
    let hint = "the adapter is damaged, or the run that trained it diverged: copy it again from \
                where it came from, or train it again (a run whose loss turns NaN stops with an \
                error, so a finished deltatune run never saves one)";
    for (key, index, v, found) in [
        (&lora_b, 0, f32::NAN, "1 NaN"),
        (&lora_a, 5, f32::INFINITY, "1 infinite"),
        (&head, 1, f32::NEG_INFINITY, "1 infinite"),
    ] {
        std::fs::write(&file, &good).unwrap();
        poke(&file, key, index, v);
        let n = tensor_range(&good, key).len() / 4;
        let want = format!(
            "tensor `{key}` in out/adapter_model.safetensors holds {found} among its {n} values \
             (the first at index {index}): {hint}"
        );
        for args in [
            vec!["predict", "--adapter", "out", "good film"],
            vec!["eval", "--adapter", "out", "--data", "dev.csv"],
        ] {
            let o = run(&args, &t.0);
            assert!(!o.status.success(), "{args:?}: {}", text(&o));
            assert!(text(&o).contains(&want), "{args:?}: {}", text(&o));
            assert!(!text(&o).contains("accuracy"), "{}", text(&o));
        }
    }

    // A base model with an infinity in one weight: training refuses it before any step.
    let m = t.0.join("model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-bert"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(f.path(), m.join(f.file_name())).unwrap();
    }
    let weights = m.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let key = keys_ending(&bytes, "attention.self.query.weight")[0].clone();
    poke(&weights, &key, 7, f32::NAN);
    let mut args = train_args("out2", 1, &[]);
    args[2] = m.display().to_string();
    let o = run(&args, &t.0);
    assert!(!o.status.success());
    let n = tensor_range(&bytes, &key).len() / 4;
    assert!(
        text(&o).contains(&format!(
            "tensor `{key}` in {} holds 1 NaN among its {n} values (the first at index 7): the \
             model file is damaged: fetch it again (`deltatune fetch` for the default models) or \
             download it again from its source",
            weights.display()
        )),
        "{}",
        text(&o)
    );
    assert!(!t.0.join("out2").exists());
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_ends_with_the_same_bytes() {
    let t = setup("fallback");
    let whole = run(&train_args("whole", 2, &[]), &t.0);
    assert!(whole.status.success(), "{}", text(&whole));
    let ck = t.0.join("cut.checkpoints");
    let left = interrupt(&train_args("cut", 2, &[]), &t.0, &ck, 12);
    let (newest, before) = (&left[left.len() - 1], &left[left.len() - 2]);
    // As the run names them: relative to its folder, as --output was given.
    let rel = |p: &Path| p.strip_prefix(&t.0).unwrap().to_path_buf();
    let (newest_r, before_r) = (rel(newest), rel(before));
    // A same-size change: one byte of the tensor data.
    let tp = newest.join("tensors.safetensors");
    let mut bytes = std::fs::read(&tp).unwrap();
    let r = tensor_range(&bytes, &keys_ending(&bytes, "lora_A.weight")[0]);
    bytes[r.start + 2] ^= 0x10;
    std::fs::write(&tp, &bytes).unwrap();

    let o = run(&resume_args("cut"), &t.0);
    assert!(o.status.success(), "{}", text(&o));
    let msg = text(&o);
    let aside = rel(&ck).join(format!(
        "damaged-{}",
        newest.file_name().unwrap().to_str().unwrap()
    ));
    assert!(
        msg.contains(&format!(
            "checkpoint {} is damaged ({}: its SHA-256 is ",
            newest_r.display(),
            rel(&tp).display()
        )) && msg.contains(&format!(
            "(its bytes changed after it was written)); it is set aside as {}\nresuming from the \
             newest intact checkpoint instead: {}",
            aside.display(),
            before_r.display()
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("resuming from {} (", before_r.display())),
        "{msg}"
    );
    assert_eq!(
        adapter_bytes(&t.0.join("cut")),
        adapter_bytes(&t.0.join("whole")),
        "resumed from the checkpoint before the damaged one: the adapter differs"
    );
}

#[test]
fn checkpoints_without_a_manifest_are_checked_for_nan_and_none_intact_is_an_error() {
    let t = setup("nomanifest");
    let ck = t.0.join("cut.checkpoints");
    let left = interrupt(&train_args("cut", 2, &[]), &t.0, &ck, 6);
    // As an older deltatune wrote them: no manifest.json.
    for p in &left {
        std::fs::remove_file(p.join("manifest.json")).unwrap();
    }
    // NaN in the newest one's Adam moments: caught by the non-finite check (not blamed on the
    // learning rate when the loss turns NaN), and the run falls back.
    let newest = left.last().unwrap();
    let tp = newest.join("tensors.safetensors");
    let bytes = std::fs::read(&tp).unwrap();
    let key = keys_ending(&bytes, "lora_B.weight")
        .into_iter()
        .find(|k| k.starts_with("adam_v/"))
        .unwrap();
    poke(&tp, &key, 3, f32::NAN);
    let n = tensor_range(&bytes, &key).len() / 4;
    // Every other checkpoint is cut short: nothing intact is left.
    for p in &left[..left.len() - 1] {
        let f = p.join("tensors.safetensors");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() / 2]).unwrap();
    }
    let o = run(&resume_args("cut"), &t.0);
    assert!(!o.status.success());
    let msg = text(&o);
    let rel = |p: &Path| p.strip_prefix(&t.0).unwrap().to_path_buf();
    assert!(
        msg.contains(&format!(
            "no intact checkpoint to resume from in cut.checkpoints: {} ({}: tensor `{key}` holds \
             1 NaN among its {n} values (the first at index 3))",
            rel(newest).display(),
            rel(&tp).display()
        )),
        "{msg}"
    );
    assert!(
        msg.contains("(the file is truncated or not a safetensors file; a damaged checkpoint)"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "damaged. The run cannot continue: start it over by deleting {} and running the \
             same `deltatune train` command again",
            rel(&ck).display()
        )),
        "{msg}"
    );
    assert!(!msg.contains("learning rate"), "{msg}");
    assert!(!msg.contains("fetch it again"), "{msg}");
    assert!(!t.0.join("cut").exists());

    // An intact checkpoint without a manifest resumes, with a note.
    let t2 = setup("nomanifest2");
    let ck2 = t2.0.join("cut.checkpoints");
    let left2 = interrupt(&train_args("cut", 1, &[]), &t2.0, &ck2, 4);
    for p in &left2 {
        std::fs::remove_file(p.join("manifest.json")).unwrap();
    }
    let o = run(&resume_args("cut"), &t2.0);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "note: checkpoint {} has no manifest.json (written by an older deltatune): its files \
             cannot be verified against checksums; its tensors were checked for NaN and infinity",
            left2.last().unwrap().strip_prefix(&t2.0).unwrap().display()
        )),
        "{}",
        text(&o)
    );
}

#[test]
fn a_resume_refuses_data_that_changed_naming_the_file() {
    let t = setup("datachange");
    let ck = t.0.join("cut.checkpoints");
    interrupt(&train_args("cut", 2, &[]), &t.0, &ck, 4);
    let original = std::fs::read_to_string(t.0.join("train.csv")).unwrap();
    // Same path, same size, other contents: one label flipped (pos and neg have one length).
    let flipped = original.replacen("good film it is,pos", "good film it is,neg", 1);
    assert_eq!(flipped.len(), original.len());
    std::fs::write(t.0.join("train.csv"), &flipped).unwrap();
    let o = run(&resume_args("cut"), &t.0);
    assert!(!o.status.success());
    let tail = "A resumed run must train on the data it started with: put the original back, or \
                start a new run (another --output, or delete cut.checkpoints to start this one \
                over)";
    let msg = text(&o);
    assert!(
        msg.contains(&format!(
            "the data changed since the run started: train.csv (train data) has the same size \
             ({} bytes) but other contents (SHA-256 ",
            original.len()
        )) && msg.contains(tail),
        "{msg}"
    );
    // A shrunk file.
    let cut: String = original
        .lines()
        .take(40)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(t.0.join("train.csv"), &cut).unwrap();
    let o = run(&resume_args("cut"), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!(
            "the data changed since the run started: train.csv (train data) was {} bytes and is \
             now {} bytes.",
            original.len(),
            cut.len()
        )),
        "{}",
        text(&o)
    );
    // The dev file too.
    std::fs::write(t.0.join("train.csv"), &original).unwrap();
    let dev = std::fs::read_to_string(t.0.join("dev.csv")).unwrap();
    std::fs::write(t.0.join("dev.csv"), format!("{dev}superb acting,pos\n")).unwrap();
    let o = run(&resume_args("cut"), &t.0);
    assert!(!o.status.success());
    assert!(text(&o).contains("dev.csv (dev data) was "), "{}", text(&o));
    // Back as it was: the run resumes.
    std::fs::write(t.0.join("dev.csv"), &dev).unwrap();
    let o = run(&resume_args("cut"), &t.0);
    assert!(o.status.success(), "{}", text(&o));
}

/// A 16 x 16 RGB image, bright on the left or the right half.
fn write_png(path: &Path, left: bool, seed: u32) {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        let bright = (x < 8) == left;
        let n = ((x * 7 + y * 13 + seed * 31) % 40) as u8;
        let v = if bright { 200 + n / 2 } else { 20 + n };
        image::Rgb([v, v / 2 + 20, 255 - v])
    });
    img.save(path).unwrap();
}

fn image_folder(root: &Path, classes: &[&str], per_class: usize) {
    for split in ["train", "dev"] {
        for class in classes {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..per_class {
                write_png(&d.join(format!("{i}.png")), *class == "left", i as u32);
            }
        }
    }
}

fn image_args(out: &str, data: &str, extra: &[&str]) -> Vec<String> {
    let model = fixtures().join("tiny-vit");
    let mut v: Vec<String> = [
        "train",
        "--task",
        "image",
        "--model",
        model.to_str().unwrap(),
        "--output",
        out,
        "--no-progress",
        "--epochs",
        "20",
        "--batch-size",
        "2",
        "--set",
        &format!("data.train={data}"),
        "--set",
        "data.image_size=16",
        "--set",
        "train.checkpoint_every=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn a_resume_refuses_an_image_folder_whose_images_changed() {
    let t = Tmp::new("imgchange");
    image_folder(&t.0.join("imgs"), &["left", "right"], 6);
    let ck = t.0.join("out.checkpoints");
    interrupt(&image_args("out", "imgs", &[]), &t.0, &ck, 3);
    // One image rewritten (another image of the same class).
    write_png(&t.0.join("imgs/train/left/2.png"), true, 99);
    let o = run(&resume_args("out"), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "the data changed since the run started: the image imgs/train/left/2.png of the \
             image folder imgs has other contents ("
        ),
        "{}",
        text(&o)
    );
    // One image more.
    write_png(&t.0.join("imgs/train/left/2.png"), true, 2);
    write_png(&t.0.join("imgs/train/right/9.png"), false, 9);
    let o = run(&resume_args("out"), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "the image imgs/train/right/9.png is new in the image folder imgs (24 images then, \
             25 now)"
        ),
        "{}",
        text(&o)
    );
}

#[test]
fn a_training_split_of_one_class_is_refused_naming_the_file_and_the_class() {
    let t = setup("oneclass");
    write_csv(&t.0.join("train.csv"), 40, true);
    let o = run(&train_args("out", 1, &[]), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "the training split has one class: all 40 examples of train.csv are labelled `pos` \
             (column `label`). A classifier learns nothing from one class (it would report loss \
             0 and accuracy 1.0): add examples of the other classes, or check data.label_column"
        ),
        "{}",
        text(&o)
    );
    assert!(!t.0.join("out").exists());

    // Images: one class folder.
    image_folder(&t.0.join("imgs"), &["left"], 3);
    let o = run(&image_args("img", "imgs", &[]), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "the training split has one class: imgs/train holds one class folder, `left` (3 \
             images). A classifier learns nothing from one class (it would report loss 0 and \
             accuracy 1.0): add a folder of images for each other class beside it"
        ),
        "{}",
        text(&o)
    );
    assert!(!t.0.join("img").exists());
}

/// A resumed run multiplies by the frozen weights in the precision its first process chose
/// (recorded in `products.json`), not in whatever a new timing on a loaded machine says: the
/// record is followed even when it is changed to the other precision.
#[test]
fn a_resumed_run_keeps_the_precision_its_first_process_chose() {
    let t = setup("products");
    let ck = t.0.join("p.checkpoints");
    let mut args = train_args("p", 2, &[]);
    // train_args pins f32; this is about the bf16 default.
    args.extend(["--set".to_string(), "train.bf16=true".to_string()]);
    interrupt(&args, &t.0, &ck, 4);
    let file = ck.join("products.json");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let first = rec["bf16"].as_bool().expect("products.json records bf16");
    std::fs::write(&file, format!("{{\"bf16\": {}}}\n", !first)).unwrap();
    let o = run(&resume_args("p"), &t.0);
    assert!(o.status.success(), "{}", text(&o));
    let msg = text(&o);
    let want = if !first && deltatune_core::ops::has_bf16() {
        "frozen products: bf16 on"
    } else {
        "frozen products: f32 (as the run's first process decided"
    };
    assert!(msg.contains(want), "{msg}");
    assert!(msg.contains("as the run's first process decided"), "{msg}");
}
