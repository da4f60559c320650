//! `deltatune serve` as a process on the real SmolLM2 GGUF (skipped with a message when it is
//! not fetched; required under `DELTATUNE_REQUIRE_ASSETS=1`): it listens where told, answers,
//! and on SIGTERM finishes the generation in flight before exiting cleanly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

mod support;
use std::time::{Duration, Instant};
use support::{cache, gguf};

fn send(port: u16, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

#[test]
fn sigterm_finishes_the_generation_in_flight() {
    let Some(g) = gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let port_file = tmp.path().join("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .args(["serve", "--model"])
        .arg(&g)
        .args(["--port", "0", "--port-file"])
        .arg(&port_file)
        .env("DELTATUNE_CACHE", cache())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !port_file.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let port: u16 = std::fs::read_to_string(&port_file)
        .unwrap()
        .parse()
        .unwrap();
    let mut models = String::new();
    send(port, "GET", "/v1/models", "")
        .read_to_string(&mut models)
        .unwrap();
    assert!(models.contains("SmolLM2-135M-Instruct.Q4_1"), "{models}");
    // A streamed generation; once its first token has arrived, SIGTERM.
    let mut s = send(
        port,
        "POST",
        "/v1/completions",
        r#"{"model": "base", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": true}"#,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: {") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("data: [DONE]"), "{text}");
    let chunks = text.matches("\"text_completion\"").count();
    assert!(chunks >= 10, "the generation was cut short: {text}");
    // The server then exits cleanly.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("shutting down"), "{err}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// `deltatune serve ARGS` refused at start-up (before any model is loaded): the exit status
/// and the message.
fn serve_refused(args: &[&str], dir: &std::path::Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_deltatune"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .current_dir(dir)
        .env("DELTATUNE_CACHE", dir.join("no-cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        !dir.join("no-cache").exists(),
        "{args:?} fetched or wrote a cache"
    );
    err
}

#[test]
fn serve_refuses_limits_that_would_refuse_every_request() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            ["--max-queue", "0"],
            "error: --max-queue 0: it is requests waiting at most: 0 refuses every request; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--max-batch", "0"],
            "error: --max-batch 0: it is requests running together at most: 0 runs none; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--max-body-bytes", "0"],
            "error: --max-body-bytes 0: it is the largest request body: 0 refuses every request; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--max-tokens", "0"],
            "error: --max-tokens 0: it is prompt plus completion tokens of a request at most: 0 refuses every generation; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--timeout", "0"],
            "error: --timeout 0: it is seconds to answer a request: 0 abandons every request; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--body-timeout", "0"],
            "error: --body-timeout 0: it is seconds a request body may pause: 0 abandons every request with a body; give at least 1 (or leave the flag out for its default)",
        ),
        (
            ["--timeout", "18446744073709551615"],
            "error: --timeout 18446744073709551615: give at most 86400 seconds (a day)",
        ),
        (
            ["--body-timeout", "86401"],
            "error: --body-timeout 86401: give at most 86400 seconds (a day)",
        ),
    ] {
        let err = serve_refused(&args, tmp.path());
        assert_eq!(err.trim_end(), want, "{args:?}");
    }
}

/// A copy of the tiny Llama's LoRA adapter fixture at `dir`.
fn copy_adapter(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let src = support::fixtures().join("tiny-llama-lora");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn serve_refuses_an_adapter_name_given_twice_naming_both_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapters");
    copy_adapter(&dir.join("sql"));
    copy_adapter(&tmp.path().join("mine"));
    // --adapter and a folder of --adapter-dir.
    let err = serve_refused(
        &["--adapter", "sql=mine", "--adapter-dir", "adapters"],
        tmp.path(),
    );
    assert_eq!(
        err.trim_end(),
        "error: two adapters are named `sql`: --adapter sql=mine and adapters/sql in --adapter-dir; give the --adapter another name (or rename the folder)"
    );
    // Two --adapter.
    let err = serve_refused(
        &["--adapter", "sql=mine", "--adapter", "sql=adapters/sql"],
        tmp.path(),
    );
    assert_eq!(
        err.trim_end(),
        "error: two adapters are named `sql`: --adapter sql=mine and --adapter sql=adapters/sql; give each --adapter a name of its own"
    );
}

#[cfg(unix)]
#[test]
fn serve_refuses_a_link_out_of_the_adapter_dir_as_post_v1_adapters_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapters");
    copy_adapter(&dir.join("inside"));
    let outside = tmp.path().join("outside");
    copy_adapter(&outside);
    std::os::unix::fs::symlink(&outside, dir.join("linked")).unwrap();
    let err = serve_refused(&["--adapter-dir", "adapters"], tmp.path());
    // The message of deltatune_serve::folder::resolve_in, as the server's POST /v1/adapters
    // answers it (crates/deltatune-serve/tests/refusals.rs).
    assert_eq!(
        err.trim_end(),
        format!(
            "error: `linked` in the adapter directory adapters leads to {}, outside it: adapters are served only from inside the directory (copy the folder in, or name it with --adapter NAME=DIR)",
            outside.canonicalize().unwrap().display()
        )
    );
}
