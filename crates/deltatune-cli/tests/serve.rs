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
