//! The server's refusals of issue 27, each a JSON error naming its field, after which the
//! server keeps serving: sampling values `generate` refuses, `stream` and `n` on
//! classification, a method an endpoint does not take (405 with `Allow`), a body that stops
//! short of its Content-Length (408, then the connection closes, while a slow body that keeps
//! coming is read), and a link out of the adapter directory (refused at start-up and at run
//! time with one message).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use deltatune_core::Rng;
use deltatune_models::decoder::GenerateConfig;
use deltatune_models::{BertClassifier, Pooling};
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::http::{router, Backend, ServerOptions};
use deltatune_serve::metrics::Metrics;
use deltatune_serve::{decoder, encoder, folder, AdapterFolder};
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-token";

fn decoder_server(adapter_dir: Option<&std::path::Path>, body_timeout: Duration) -> TestServer {
    let metrics = Arc::new(Metrics::default());
    let eng = decoder::start(
        decoder(),
        vec![folder("a")],
        &EngineOptions {
            max_batch: 8,
            max_queue: 64,
        },
        metrics.clone(),
    )
    .unwrap();
    let opts = ServerOptions {
        base_name: "tiny-llama".into(),
        adapter_dir: adapter_dir.map(|p| p.to_path_buf()),
        admin_token: Some(TOKEN.into()),
        max_body_bytes: 4096,
        max_tokens: 64,
        timeout: Duration::from_secs(30),
        body_timeout,
        ..ServerOptions::default()
    };
    TestServer::start(router(Backend::Decoder(eng), opts, metrics))
}

/// A greedy completion by adapter `a` that must succeed: the server still serves.
fn still_serves(s: &TestServer) {
    let a = s.post(
        "/v1/completions",
        &json!({"model": "a", "prompt": "w5 w6", "max_tokens": 3, "temperature": 0}).to_string(),
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let want = text(&alone(
        Some("a"),
        &[5, 6],
        &GenerateConfig {
            max_new_tokens: 3,
            ..GenerateConfig::default()
        },
    ));
    assert_eq!(a.json()["choices"][0]["text"], want);
}

/// Asserts a refusal's status, field and exact message.
fn refused_with(a: &deltatune_serve::loadgen::Answer, status: u16, param: &str, message: &str) {
    refused(a, status, param);
    assert_eq!(a.json()["error"]["message"], message, "{}", a.text());
}

/// What `generate` (GenerateConfig::validate) says of `cfg`, as the server words it.
fn generate_refusal(cfg: GenerateConfig) -> (String, String) {
    match cfg.validate().unwrap_err() {
        deltatune_core::Error::InvalidConfig { field, msg } => {
            let f = if field == "max_new_tokens" {
                "max_tokens".to_string()
            } else {
                field
            };
            (f.clone(), format!("`{f}` {msg}"))
        }
        e => panic!("{e}"),
    }
}

#[test]
fn sampling_values_generate_refuses_are_refused_by_the_server_too() {
    let s = decoder_server(None, Duration::from_secs(30));
    let d = GenerateConfig::default;
    let cases = [
        (
            json!({"top_k": 0}),
            GenerateConfig {
                top_k: Some(0),
                ..d()
            },
        ),
        (
            json!({"top_p": 0}),
            GenerateConfig {
                top_p: Some(0.0),
                ..d()
            },
        ),
        (
            json!({"top_p": 1.5}),
            GenerateConfig {
                top_p: Some(1.5),
                ..d()
            },
        ),
        (
            json!({"temperature": -0.5}),
            GenerateConfig {
                temperature: -0.5,
                ..d()
            },
        ),
        (
            json!({"max_tokens": 0}),
            GenerateConfig {
                max_new_tokens: 0,
                ..d()
            },
        ),
    ];
    for (extra, cfg) in cases {
        let (param, message) = generate_refusal(cfg);
        for (path, mut body) in [
            ("/v1/completions", json!({"model": "a", "prompt": "w3"})),
            (
                "/v1/chat/completions",
                json!({"model": "a", "messages": [{"role": "w10", "content": "w11"}]}),
            ),
        ] {
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let a = s.post(path, &body.to_string(), &[]);
            refused_with(&a, 400, &param, &message);
        }
    }
    // Chat's own name for it is named when given.
    let a = s.post(
        "/v1/chat/completions",
        &json!({"model": "a", "messages": [{"role": "w10", "content": "w11"}], "max_completion_tokens": 0})
            .to_string(),
        &[],
    );
    refused_with(
        &a,
        400,
        "max_completion_tokens",
        "`max_completion_tokens` must be at least 1",
    );
    assert_eq!(
        generate_refusal(GenerateConfig {
            top_k: Some(0),
            ..d()
        })
        .1,
        "`top_k` must be at least 1 (or unset: every token)"
    );
    // Types and `n`, each naming its field.
    let post = |extra: Value| {
        let mut body = json!({"model": "a", "prompt": "w3"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/completions", &body.to_string(), &[])
    };
    for (extra, param, message) in [
        (
            json!({"top_k": -1}),
            "top_k",
            "`top_k` must be a non-negative integer",
        ),
        (
            json!({"top_k": 2.5}),
            "top_k",
            "`top_k` must be a non-negative integer",
        ),
        (json!({"top_p": "0.9"}), "top_p", "`top_p` must be a number"),
        (json!({"n": 0}), "n", "only n = 1 is supported"),
        (json!({"n": 2}), "n", "only n = 1 is supported"),
        (json!({"n": "1"}), "n", "`n` must be a non-negative integer"),
        (
            json!({"stream": 1}),
            "stream",
            "`stream` must be true or false",
        ),
    ] {
        refused_with(&post(extra), 400, param, message);
    }
    // In range: top_k 1 is greedy, the adapter alone's answer.
    let a = post(json!({"top_k": 1, "top_p": 1.0, "n": 1, "max_tokens": 3, "temperature": 0.8}));
    assert_eq!(a.status, 200, "{}", a.text());
    still_serves(&s);
}

fn encoder_server() -> TestServer {
    let fx = fixtures().join("peft-folders");
    let base_dir = fx.join("base");
    let base = BertClassifier::load(&base_dir, 2, Pooling::Cls, &mut Rng::new(0)).unwrap();
    let folders = vec![AdapterFolder::read("lora", &fx.join("lora"), Some(&base_dir)).unwrap()];
    let metrics = Arc::new(Metrics::default());
    let eng = encoder::start(
        base,
        base_dir.join("tokenizer.json"),
        folders,
        &EngineOptions::default(),
        metrics.clone(),
    )
    .unwrap();
    let opts = ServerOptions {
        base_name: "tiny-bert".into(),
        timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    };
    TestServer::start(router(Backend::Encoder(eng), opts, metrics))
}

#[test]
fn classification_refuses_stream_and_n_it_cannot_honour() {
    let s = encoder_server();
    let post = |extra: Value| {
        let mut body = json!({"model": "lora", "inputs": ["a fine film", "dull"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/classify", &body.to_string(), &[])
    };
    let ok = post(json!({}));
    assert_eq!(ok.status, 200, "{}", ok.text());
    let want = ok.json()["data"].clone();
    assert_eq!(want.as_array().unwrap().len(), 2);
    for (extra, param, message) in [
        (
            json!({"stream": true}),
            "stream",
            "classification answers in one response: `stream` must be false or absent",
        ),
        (
            json!({"stream": "no"}),
            "stream",
            "`stream` must be true or false",
        ),
        (
            json!({"stream": 0}),
            "stream",
            "`stream` must be true or false",
        ),
        (
            json!({"n": 2}),
            "n",
            "classification gives one answer per input: `n` must be 1 or absent",
        ),
        (
            json!({"n": 0}),
            "n",
            "classification gives one answer per input: `n` must be 1 or absent",
        ),
        (json!({"n": "2"}), "n", "`n` must be a non-negative integer"),
        (json!({"n": -1}), "n", "`n` must be a non-negative integer"),
    ] {
        refused_with(&post(extra), 400, param, message);
    }
    // What classification can honour is answered as without it.
    for extra in [json!({"stream": false, "n": 1}), json!({"stream": null})] {
        let a = post(extra);
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["data"], want);
    }
}

#[test]
fn a_method_an_endpoint_does_not_take_gets_405_json_with_allow() {
    let s = decoder_server(None, Duration::from_secs(30));
    for (method, path, allow, message) in [
        (
            "GET",
            "/v1/completions",
            "POST",
            "/v1/completions does not take GET: send POST (see the Allow header)",
        ),
        (
            "PUT",
            "/v1/chat/completions",
            "POST",
            "/v1/chat/completions does not take PUT: send POST (see the Allow header)",
        ),
        (
            "GET",
            "/v1/adapters/a",
            "DELETE",
            "/v1/adapters/a does not take GET: send DELETE (see the Allow header)",
        ),
        (
            "POST",
            "/health",
            "GET,HEAD",
            "/health does not take POST: send GET or HEAD (see the Allow header)",
        ),
    ] {
        let a = s.conn().request(method, path, &[], b"").unwrap();
        assert_eq!(a.status, 405, "{method} {path}: {}", a.text());
        assert_eq!(a.headers["allow"], allow);
        assert!(a.headers["content-type"].starts_with("application/json"));
        let v = a.json();
        assert_eq!(v["error"]["message"], message);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], 405);
        assert_eq!(v["error"]["param"], Value::Null);
    }
    // An unknown path is still 404, and the server serves on.
    refused(&s.get("/v1/nothing"), 404, "null");
    still_serves(&s);
}

/// Sends a POST /v1/completions whose headers announce `declared` bytes (and `extra` headers),
/// then `parts` of the body with `pause` before each; returns the connection.
fn send_in_parts(
    s: &TestServer,
    declared: usize,
    extra: &str,
    parts: &[&[u8]],
    pause: Duration,
) -> TcpStream {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n{extra}\r\n"
    )
    .unwrap();
    for p in parts {
        std::thread::sleep(pause);
        c.write_all(p).unwrap();
        c.flush().unwrap();
    }
    c
}

#[test]
fn a_body_short_of_its_content_length_gets_408_and_a_slow_one_is_read() {
    let s = decoder_server(None, Duration::from_secs(1));
    // 19 bytes of 200, then silence: 408 after the body timeout, and the connection closes
    // (the client did not ask to close).
    let start = b"{\"model\": \"a\", \"pro";
    assert_eq!(start.len(), 19);
    let mut c = send_in_parts(&s, 200, "", &[start], Duration::ZERO);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got).to_string();
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 408 "), "{got}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{got}"
    );
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["param"], "body");
    assert_eq!(v["error"]["type"], "timeout_error");
    assert_eq!(
        v["error"]["message"],
        "the request body stopped arriving: 19 bytes of the 200 its Content-Length announced came, then nothing for 1 s (--body-timeout)"
    );
    // A body that keeps coming, slower than the timeout in all but never pausing that long,
    // is read to its end and answered.
    let body = json!({"model": "a", "prompt": "w5 w6", "max_tokens": 3, "temperature": 0})
        .to_string()
        .into_bytes();
    let parts: Vec<&[u8]> = body.chunks(body.len().div_ceil(6)).collect();
    let mut c = send_in_parts(
        &s,
        body.len(),
        "Connection: close\r\n",
        &parts,
        Duration::from_millis(250),
    );
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got).to_string();
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    still_serves(&s);
}

#[cfg(unix)]
#[test]
fn a_link_out_of_the_adapter_directory_is_refused_at_start_and_at_run_time_alike() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(folder_dir("e").join(f), outside.path().join(f)).unwrap();
    }
    std::os::unix::fs::symlink(outside.path(), root.path().join("linked")).unwrap();
    let want = format!(
        "`linked` in the adapter directory {} leads to {}, outside it: adapters are served only from inside the directory (copy the folder in, or name it with --adapter NAME=DIR)",
        root.path().display(),
        outside.path().canonicalize().unwrap().display()
    );
    // Start-up (the directory's folders, read by `deltatune serve`).
    let e = folder::scan(root.path()).unwrap_err();
    assert_eq!(e.message, want);
    // Run time.
    let s = decoder_server(Some(root.path()), Duration::from_secs(30));
    let a = s.post(
        "/v1/adapters",
        &json!({"name": "linked"}).to_string(),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    refused_with(&a, 400, "path", &want);
    let names: Vec<Value> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(names, [json!("tiny-llama"), json!("a")]);
    still_serves(&s);
}
