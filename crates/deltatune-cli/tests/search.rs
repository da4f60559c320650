//! Multi-worker search against a real store: three worker processes share one study of 30
//! trials of the fast synthetic objective, one is killed with SIGKILL mid-trial, and every
//! trial must end complete or failed-and-retried, none lost and none run twice.
//! The PostgreSQL variant needs `DELTATUNE_TEST_POSTGRES` (a database URL; `.ci/run` starts a
//! server with scripts/start_test_postgres.sh) and is required when `DELTATUNE_REQUIRE_PG=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SPACE: &str = r#"
[train]
lr = { float = [1e-4, 1e-2], log = true }
[methods.lora]
r = { int = [4, 16], step = 4 }
[methods.prompt]
num_virtual_tokens = { int = [10, 40], step = 10 }
"#;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dt-search-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn worker(dir: &Path, storage: &str, study: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "search",
            "--space",
            "space.toml",
            "--study",
            study,
            "--storage",
            storage,
            "--trials",
            "30",
            "--workers",
            "1",
            "--objective",
            "synthetic",
            "--pruner",
            "none",
            "--heartbeat",
            "0.2",
            "--stale-timeout",
            "2",
        ])
        .current_dir(dir)
        .env("DELTATUNE_SYNTHETIC_SLEEP", "0.15")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait(mut c: Child, limit: Duration) {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            assert!(s.success(), "a surviving worker failed: {s}");
            return;
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            panic!("a worker did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `deltatune study export STUDY --storage STORAGE --format json`, run in `dir`.
fn export(dir: &Path, storage: &str, study: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "study",
            "export",
            study,
            "--storage",
            storage,
            "--format",
            "json",
        ])
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Trials of `study` in state RUNNING now (0 while the study does not exist yet).
fn running_trials(dir: &Path, storage: &str, study: &str) -> usize {
    let out = export(dir, storage, study);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["trials"].as_array().map_or(0, |ts| {
        ts.iter().filter(|t| t["state"] == "RUNNING").count()
    })
}

fn kill_one_of_three(dir: &Path, storage: &str, study: &str) {
    std::fs::write(dir.join("space.toml"), SPACE).unwrap();
    let mut ws: Vec<Child> = (0..3).map(|_| worker(dir, storage, study)).collect();
    // Wait until all three workers are inside a trial (three RUNNING at once; a slow start under
    // load must not let the victim die before its first claim), then kill one at once: trials
    // take 0.45 s and claims milliseconds, so it is inside its trial.
    let t = Instant::now();
    while running_trials(dir, storage, study) < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the three workers never ran trials at once"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut victim = ws.remove(0);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    for w in ws {
        wait(w, Duration::from_secs(120));
    }
    let out = export(dir, storage, study);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    let state = |t: &serde_json::Value| t["state"].as_str().unwrap().to_string();
    let complete: Vec<&serde_json::Value> =
        trials.iter().filter(|t| state(t) == "COMPLETE").collect();
    let failed: Vec<&serde_json::Value> = trials.iter().filter(|t| state(t) == "FAILED").collect();
    assert_eq!(complete.len(), 30, "complete trials: {trials:#?}");
    assert!(
        !failed.is_empty(),
        "the killed worker's trial should have failed: {trials:#?}"
    );
    assert_eq!(trials.len(), 30 + failed.len(), "nothing else: {trials:#?}");
    for f in &failed {
        assert!(
            f["message"].as_str().unwrap_or("").contains("heartbeat"),
            "{f}"
        );
        // Its configuration was retried, and the retry completed with the same parameters.
        let retry = trials
            .iter()
            .find(|t| t["retry_of"] == f["id"])
            .unwrap_or_else(|| panic!("no retry of {f}"));
        assert_eq!(state(retry), "COMPLETE", "{retry}");
        assert_eq!(retry["params"], f["params"]);
        assert_eq!(retry["attempt"], 2);
    }
    // Trial numbers are unique; every complete trial was finished by one worker and has its
    // three intermediate values exactly once.
    let mut numbers: Vec<i64> = trials
        .iter()
        .map(|t| t["number"].as_i64().unwrap())
        .collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers.len(), trials.len());
    for c in &complete {
        assert!(c["worker"].is_string());
        let steps: Vec<u64> = c["intermediate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{c}");
    }
}

#[test]
fn sqlite_three_workers_one_killed_no_trial_lost_or_duplicated() {
    let d = tmp("sqlite");
    kill_one_of_three(&d, "studies.db", "kill-test");
    // Resuming a finished study runs nothing more.
    let out = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "search",
            "--space",
            "space.toml",
            "--study",
            "kill-test",
            "--storage",
            "studies.db",
            "--trials",
            "30",
            "--objective",
            "synthetic",
        ])
        .current_dir(&d)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("resumed") && text.contains("30 complete"),
        "{text}"
    );
    // A different space under the same name is refused.
    std::fs::write(d.join("space.toml"), "[methods.bitfit]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "search",
            "--space",
            "space.toml",
            "--study",
            "kill-test",
            "--storage",
            "studies.db",
            "--objective",
            "synthetic",
        ])
        .current_dir(&d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("different search space"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn postgres_three_workers_one_killed_no_trial_lost_or_duplicated() {
    let Ok(url) = std::env::var("DELTATUNE_TEST_POSTGRES") else {
        assert!(
            std::env::var("DELTATUNE_REQUIRE_PG").as_deref() != Ok("1"),
            "DELTATUNE_REQUIRE_PG=1 but DELTATUNE_TEST_POSTGRES is not set: start a server with \
             `eval \"$(bash scripts/start_test_postgres.sh)\"`"
        );
        eprintln!("skipped: set DELTATUNE_TEST_POSTGRES to run against PostgreSQL");
        return;
    };
    let d = tmp("pg");
    let study = format!(
        "kill-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    kill_one_of_three(&d, &url, &study);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_store_with_a_newer_schema_is_refused() {
    let d = tmp("schema");
    let db = d.join("s.db");
    let out = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args(["study", "list", "--storage", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let conn = rusqlite_free_update(&db);
    assert!(conn);
    let out = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args(["study", "list", "--storage", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("schema version 99") && e.contains("newer"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Bumps the schema version with the sqlite3 command-line tool if present, else through
/// Python's sqlite3 module.
fn rusqlite_free_update(db: &Path) -> bool {
    let sql = "UPDATE deltatune_schema SET version = 99";
    let py = format!(
        "import sqlite3; c = sqlite3.connect({:?}); c.execute({sql:?}); c.commit()",
        db.display().to_string()
    );
    Command::new("python3")
        .args(["-c", &py])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs one worker to the end with the given pruner (random sampler, seed 3, 12 trials).
fn study_with(dir: &Path, study: &str, pruner: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "search",
            "--space",
            "space.toml",
            "--study",
            study,
            "--storage",
            "c.db",
            "--trials",
            "12",
            "--objective",
            "synthetic",
            "--sampler",
            "random",
            "--seed",
            "3",
            "--pruner",
            pruner,
        ])
        .current_dir(dir)
        .env("DELTATUNE_SYNTHETIC_SLEEP", "0.05")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn compare_prints_what_pruned_trials_cost_against_the_same_trials_run_to_completion() {
    let dir = tmp("compare");
    std::fs::write(dir.join("space.toml"), SPACE).unwrap();
    study_with(&dir, "pruned", "asha");
    study_with(&dir, "full", "none");
    let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args([
            "study",
            "compare",
            "pruned",
            "--against",
            "full",
            "--storage",
            "c.db",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The random sampler with one seed proposes the same 12 configurations in both studies.
    assert!(out.contains("12 trials with the same parameters"), "{out}");
    // ASHA (rungs at steps 1 and 3, keeping the top third) prunes some of them, each after
    // one of its three steps, so they cost less than the same trials run to the end.
    let line = out
        .lines()
        .find(|l| l.contains("pruned in `pruned` took"))
        .unwrap_or_else(|| panic!("no trial was pruned:\n{out}"));
    let secs: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    // [number of pruned trials, seconds in A, seconds in B]
    assert!(secs.len() >= 3 && secs[1] < secs[2], "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_spaces_and_stores_are_refused_before_any_trial_runs() {
    let dir = tmp("bad-space");
    let search = |space: &str, storage: &str| {
        std::fs::write(dir.join("space.toml"), space).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
            .args([
                "search",
                "--space",
                "space.toml",
                "--study",
                "s",
                "--storage",
                storage,
                "--trials",
                "2",
                "--runs",
                "trials",
            ])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{space}");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    for (space, needles) in [
        // An unknown method: the known ones are listed.
        (
            "[methods.lorra]\nr = { int = [4, 8] }\n",
            &["[methods.lorra]", "unknown method `lorra`", "lora"][..],
        ),
        // An unknown parameter of a method, and of the shared training settings.
        (
            "[methods.lora]\nrr = { int = [4, 8] }\n",
            &["[methods.lora]", "unknown setting `lora.rr`", "lora.r"][..],
        ),
        (
            "[train]\nlrr = { float = [1e-4, 1e-3], log = true }\n[methods.lora]\n",
            &["unknown setting `train.lrr`", "train.lr"][..],
        ),
        // A range whose end is not a valid value of the setting.
        (
            "[methods.lora]\nr = { int = [0, 8] }\n",
            &["[methods.lora] with lora.r=0", "space.toml"][..],
        ),
        // Empty ranges.
        (
            "[methods.lora]\nr = { int = [8, 4] }\n",
            &["lora.r", "low <= high"][..],
        ),
        (
            "[methods.prompt]\nprompt_tuning_init = { choice = [] }\n",
            &["prompt.prompt_tuning_init", "non-empty"][..],
        ),
    ] {
        let e = search(space, "s.db");
        for n in needles {
            assert!(e.contains(n), "{space}: `{n}` not in: {e}");
        }
        assert!(!dir.join("trials").exists(), "a trial ran for {space}: {e}");
    }
    // Nothing listens on port 1: the URL is named (password hidden) with the fix.
    let e = search(
        "[methods.lora]\n",
        "postgres://me:secret@127.0.0.1:1/studies",
    );
    assert!(
        e.contains("cannot connect") && e.contains("127.0.0.1:1") && !e.contains("secret"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
