//! What the binary's end-to-end tests share: the fixtures, scratch folders, the real assets'
//! cache, running `deltatune` and reading its output.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A scratch folder, removed when dropped.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fetched assets' cache (`DELTATUNE_CACHE`, else `~/.cache/deltatune`).
pub fn cache() -> PathBuf {
    std::env::var_os("DELTATUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/deltatune"))
}

/// The fetched SmolLM2 GGUF, or `None` (with a message) when absent and not required
/// (`DELTATUNE_REQUIRE_ASSETS=1` requires it).
pub fn gguf() -> Option<PathBuf> {
    let p = cache().join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("DELTATUNE_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{} missing: run `deltatune fetch`",
        p.display()
    );
    eprintln!(
        "NOTE: skipping: {} not found (run `deltatune fetch`)",
        p.display()
    );
    None
}

/// A made-up decoder task, a colour's word to its code: the first `n` (at most six) of its
/// prompt/completion pairs as a JSONL file at `path`.
pub fn write_colour_codes(path: &Path, n: usize) {
    let pairs = [
        ("red", "R1"),
        ("green", "G2"),
        ("blue", "B3"),
        ("black", "K4"),
        ("white", "W5"),
        ("grey", "Y6"),
    ];
    let mut s = String::new();
    for (w, c) in pairs.iter().take(n) {
        s.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("Colour: {w}\nCode:"), "completion": format!(" {c}")})
        ));
    }
    std::fs::write(path, s).unwrap();
}

/// `deltatune ARGS` in `dir`, with `cache` as its assets' cache when given.
pub fn command<S: AsRef<OsStr>>(args: &[S], dir: &Path, cache: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deltatune"));
    c.args(args).current_dir(dir);
    if let Some(cache) = cache {
        c.env("DELTATUNE_CACHE", cache);
    }
    c
}

/// Runs `deltatune ARGS` in `dir` to the end.
pub fn run_with<S: AsRef<OsStr>>(args: &[S], dir: &Path, cache: Option<&Path>) -> Output {
    command(args, dir, cache).output().unwrap()
}

/// Standard output then standard error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}
