//! Killed runs resume: checkpoints, `train --resume`, signals and a full disk, end to end on
//! the tiny BERT of tests/fixtures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod support;
use std::time::{Duration, Instant};
use support::{fixtures, text, Tmp};

/// 200 training rows in batches of 4: 50 steps an epoch, 150 in all.
const STEPS_PER_EPOCH: usize = 50;
const EPOCHS: usize = 3;

fn setup(name: &str) -> Tmp {
    let t = Tmp::new(name);
    let pos = ["good film", "great movie", "a witty story", "superb acting"];
    let neg = ["bad film", "awful movie", "a dull story", "terrible acting"];
    for (file, n) in [("train.csv", 200), ("dev.csv", 12)] {
        let mut s = String::from("text,label\n");
        for i in 0..n {
            let j = (i / 2) % 4;
            if i % 2 == 0 {
                s.push_str(&format!("{} it is,pos\n", pos[j]));
            } else {
                s.push_str(&format!("{} it is,neg\n", neg[j]));
            }
        }
        std::fs::write(t.0.join(file), s).unwrap();
    }
    t
}

fn train_args(out: &str) -> Vec<String> {
    let model = fixtures().join("tiny-bert").canonicalize().unwrap();
    [
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
        &EPOCHS.to_string(),
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--no-progress",
        "--set",
        "train.checkpoint_every=1",
        // f32 products in every process: with `train.bf16` on, each process decides bf16 or
        // f32 by timing one product at start-up, and on a loaded machine runs compared byte
        // for byte can come out on different sides of the threshold.
        "--set",
        "train.bf16=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn command(args: &[String], dir: &Path) -> Command {
    support::command(args, dir, Some(&dir.join("cache")))
}

fn run(args: &[String], dir: &Path) -> Output {
    command(args, dir).output().unwrap()
}

fn spawn(args: &[String], dir: &Path) -> Child {
    command(args, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn resume_args(out: &str) -> Vec<String> {
    vec![
        "train".into(),
        "--resume".into(),
        out.into(),
        "--no-progress".into(),
    ]
}

/// The steps done by the newest complete checkpoint in `dir` (0 when there is none).
fn newest_step(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let (ep, b) = n.strip_prefix('e')?.split_once("-b")?;
            let (ep, b): (usize, usize) = (ep.parse().ok()?, b.parse().ok()?);
            Some((ep - 1) * STEPS_PER_EPOCH + b)
        })
        .max()
        .unwrap_or(0)
}

/// Waits until the newest checkpoint has at least `step` steps (the run is then somewhere in a
/// later step), or the child exits.
fn wait_for_step(child: &mut Child, dir: &Path, step: usize) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if newest_step(dir) >= step {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    panic!("no checkpoint with {step} steps within 120 s");
}

/// The metrics log without wall-clock fields.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
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

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn sigkill_at_five_random_steps_then_resume_gives_the_same_adapter_bytes() {
    let t = setup("kill");
    let whole = run(&train_args("whole"), &t.0);
    assert!(whole.status.success(), "{}", text(&whole));
    assert!(
        !t.0.join("whole.checkpoints").exists(),
        "a finished run leaves no checkpoints"
    );

    // Five kill points, drawn from a seeded generator, in increasing order.
    let total = STEPS_PER_EPOCH * EPOCHS;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut points: Vec<usize> = (0..5)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            2 + (x % (total as u64 - 20)) as usize
        })
        .collect();
    points.sort();
    points.dedup();
    let ck = t.0.join("cut.checkpoints");
    let mut killed_at = Vec::new();
    for (i, &p) in points.iter().enumerate() {
        let args = if i == 0 {
            train_args("cut")
        } else {
            resume_args("cut")
        };
        let mut child = spawn(&args, &t.0);
        let reached = wait_for_step(&mut child, &ck, p);
        assert!(reached, "the run ended before step {p}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed_at.push(newest_step(&ck));
        assert!(
            !t.0.join("cut").exists(),
            "a killed run leaves no output folder"
        );
    }
    let last = run(&resume_args("cut"), &t.0);
    assert!(last.status.success(), "{}", text(&last));
    assert!(text(&last).contains("resuming from"), "{}", text(&last));
    assert_eq!(
        adapter_bytes(&t.0.join("cut")),
        adapter_bytes(&t.0.join("whole")),
        "killed at steps {killed_at:?} and resumed: the adapter differs from the uninterrupted run's"
    );
    assert_eq!(metrics(&t.0.join("cut")), metrics(&t.0.join("whole")));
    assert!(!ck.exists(), "the finished run removed its checkpoints");
    // No staging folders of the killed processes are left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&t.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_prints_the_resume_command() {
    let t = setup("term");
    let whole = run(&train_args("whole"), &t.0);
    assert!(whole.status.success(), "{}", text(&whole));
    let ck = t.0.join("cut.checkpoints");
    let mut child = spawn(&train_args("cut"), &t.0);
    assert!(wait_for_step(&mut child, &ck, 20));
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(130), "{msg}");
    assert!(
        msg.contains("deltatune train --resume cut"),
        "the resume command is printed: {msg}"
    );
    let stopped = newest_step(&ck);
    assert!(
        (20..STEPS_PER_EPOCH * EPOCHS).contains(&stopped),
        "{stopped}"
    );
    let last = run(&resume_args("cut"), &t.0);
    assert!(last.status.success(), "{}", text(&last));
    assert_eq!(
        adapter_bytes(&t.0.join("cut")),
        adapter_bytes(&t.0.join("whole"))
    );
}

#[test]
fn resume_refuses_changed_settings_by_name_and_lets_epochs_change() {
    let t = setup("settings");
    let ck = t.0.join("cut.checkpoints");
    let mut child = spawn(&train_args("cut"), &t.0);
    assert!(wait_for_step(&mut child, &ck, 10));
    child.kill().unwrap();
    child.wait().unwrap();

    let mut changed = resume_args("cut");
    changed.extend(["--lr".into(), "0.5".into(), "--r".into(), "4".into()]);
    let o = run(&changed, &t.0);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("`train.lr` is 0.01 in the run and 0.5 here"),
        "{msg}"
    );
    assert!(msg.contains("`lora.r` is 8 in the run and 4 here"), "{msg}");

    // A fresh run into the same output would lose the interrupted one: refused.
    let o = run(&train_args("cut"), &t.0);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("holds an interrupted run") && text(&o).contains("--resume cut"),
        "{}",
        text(&o)
    );
    assert_eq!(
        text(&o).matches("--resume cut").count(),
        1,
        "the way to resume said once: {}",
        text(&o)
    );

    // Epochs may change: one more epoch than the run was started with.
    let mut more = resume_args("cut");
    more.extend(["--epochs".into(), "4".into()]);
    let o = run(&more, &t.0);
    assert!(o.status.success(), "{}", text(&o));
    let m = metrics(&t.0.join("cut"));
    assert_eq!(m.last().unwrap()["epoch"], 4);

    // Nothing left to resume.
    let o = run(&resume_args("cut"), &t.0);
    assert!(!o.status.success());
    assert!(text(&o).contains("is a finished run"), "{}", text(&o));
    let o = run(&resume_args("never-started"), &t.0);
    assert!(
        text(&o).contains("no run to resume at never-started"),
        "{}",
        text(&o)
    );
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop; `None` where mounting is not
/// allowed (not root, or no CAP_SYS_ADMIN in a container).
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mount(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success());
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_while_checkpointing_names_the_path_and_keeps_the_previous_checkpoint() {
    let t = setup("full");
    let whole = run(&train_args("whole"), &t.0);
    assert!(whole.status.success(), "{}", text(&whole));
    // 64 KiB hold the settings and one checkpoint of this delta (about 30 KB), not two.
    let Some(m) = Mount::tmpfs(&t.0.join("small"), "64k") else {
        eprintln!("skipped: mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        return;
    };
    let o = run(&train_args("small/out"), &t.0);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("no space left on the device writing checkpoint small/out.checkpoints/"),
        "{msg}"
    );
    assert!(msg.contains("bytes needed"), "{msg}");
    assert!(msg.contains("is intact"), "{msg}");
    assert!(!t.0.join("small/out").exists(), "no partial output");
    let ck = t.0.join("small/out.checkpoints");
    assert!(newest_step(&ck) >= 1);
    // With space again, the run continues from the checkpoint that was intact.
    m.resize("4m");
    let o = run(&resume_args("small/out"), &t.0);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        adapter_bytes(&t.0.join("small/out")),
        adapter_bytes(&t.0.join("whole"))
    );
}

#[test]
fn a_search_trial_whose_worker_dies_resumes_from_its_checkpoint() {
    let t = setup("search");
    std::fs::write(
        t.0.join("space.toml"),
        "[methods.lora]\nr = { int = [4, 8], step = 4 }\n",
    )
    .unwrap();
    let model = fixtures().join("tiny-bert").canonicalize().unwrap();
    let model_set = format!("model={}", model.display());
    let args: Vec<String> = [
        "search",
        "--space",
        "space.toml",
        "--study",
        "s",
        "--storage",
        "s.db",
        "--trials",
        "1",
        "--pruner",
        "none",
        "--runs",
        "runs",
        "--heartbeat",
        "0.2",
        "--stale-timeout",
        "1",
        "--set",
        &model_set,
        "--set",
        "data.train=train.csv",
        "--set",
        "data.dev=dev.csv",
        "--set",
        "train.epochs=3",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.checkpoint_every=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut worker = spawn(&args, &t.0);
    let ck = t.0.join("runs/s/trial-0000.checkpoints");
    assert!(wait_for_step(&mut worker, &ck, 30), "the trial ended early");
    worker.kill().unwrap(); // SIGKILL: the trial gets SIGTERM from the kernel and checkpoints
    worker.wait().unwrap();
    // The trial stops within a step; its heartbeat goes stale after a second.
    std::thread::sleep(Duration::from_millis(1500));
    let o = run(&args, &t.0);
    assert!(o.status.success(), "{}", text(&o));
    let log = std::fs::read_to_string(t.0.join("runs/s/trial-0001.log")).unwrap();
    assert!(
        log.contains("resuming from"),
        "the retry continued the dead worker's trial: {log}"
    );
    let res: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.0.join("runs/s/trial-0001/results.json")).unwrap(),
    )
    .unwrap();
    assert!(res["dev"]["accuracy"].as_f64().is_some());
    assert!(!t.0.join("runs/s/trial-0001.checkpoints").exists());
    assert!(!ck.exists(), "the checkpoints moved to the retry");
}

/// Commands that run for long check every path they will write before they start: a path
/// under a file is refused at once, naming the flag.
#[test]
fn long_commands_check_where_they_write_before_starting() {
    let t = setup("paths");
    let model = fixtures().join("tiny-bert").canonicalize().unwrap();
    let model = model.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "auto",
                "--model",
                model,
                "--train-file",
                "train.csv",
                "--dev-file",
                "dev.csv",
                "--report",
                "train.csv/report.html",
                "--budget",
                "1m",
            ],
            "--report",
        ),
        (
            vec![
                "experiment",
                "methods",
                "--table",
                "train.csv/table.md",
                "--runs",
                "runs",
            ],
            "--table",
        ),
        (
            vec![
                "train",
                "--model",
                model,
                "--train-file",
                "train.csv",
                "--dev-file",
                "dev.csv",
                "--output",
                "train.csv/out",
            ],
            "train.csv",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let t0 = Instant::now();
        let o = run(&args, &t.0);
        assert!(!o.status.success(), "{args:?}");
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{args:?} started work first"
        );
    }
}
