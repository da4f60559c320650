//! `deltatune serve`'s HTTP API on the tiny Llama: answers equal each adapter alone, streams,
//! chat, adapters loaded and unloaded at run time, and every bad request refused with a 4xx
//! naming its field while the server keeps serving.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::*;
use deltatune_models::decoder::GenerateConfig;
use deltatune_serve::decoder;
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::http::{router, Backend, ServerOptions};
use deltatune_serve::metrics::Metrics;
use serde_json::json;

const TOKEN: &str = "s3cret-token";

fn server(adapter_dir: Option<&std::path::Path>, max_queue: usize) -> TestServer {
    let metrics = Arc::new(Metrics::default());
    let eng = decoder::start(
        decoder(),
        vec![folder("a"), folder("prompt")],
        &EngineOptions {
            max_batch: 8,
            max_queue,
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
        ..ServerOptions::default()
    };
    TestServer::start(router(Backend::Decoder(eng), opts, metrics))
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, true).unwrap().get_ids().to_vec()
}

fn greedy(n: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: n,
        ..GenerateConfig::default()
    }
}

#[test]
fn completions_chat_and_streams_answer_as_each_adapter_alone() {
    let s = server(None, 64);
    assert_eq!(s.get("/health").json()["status"], "ok");
    let models = s.get("/v1/models").json();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny-llama", "a", "prompt"]);
    assert_eq!(models["data"][1]["shared_batch"], true);
    assert_eq!(models["data"][2]["method"], "prompt");

    let prompt = "w5 w17 w30 w44";
    for (model, adapter) in [
        ("a", Some("a")),
        ("prompt", Some("prompt")),
        ("tiny-llama", None),
    ] {
        let want = text(&alone(adapter, &ids(prompt), &greedy(8)));
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0});
        let a = s.post(
            "/v1/completions",
            &body.to_string(),
            &[("x-request-id", "req-1")],
        );
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.headers["x-request-id"], "req-1");
        let v = a.json();
        assert_eq!(v["choices"][0]["text"], want, "{model}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["prompt_tokens"], 4);
        // The same as a stream: chunks, a final chunk with the reason, then [DONE].
        let mut body = body.clone();
        body["stream"] = true.into();
        let a = s.post("/v1/completions", &body.to_string(), &[]);
        assert_eq!(a.status, 200);
        assert!(a.headers["content-type"].starts_with("text/event-stream"));
        let events: Vec<String> = a
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect();
        assert_eq!(events.last().unwrap(), "[DONE]", "{}", a.text());
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let streamed: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(streamed, want);
        assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    }
    // Chat: the model's template, then the assistant's turn.
    let msgs = json!([{"role": "w10", "content": "w11 w12"}]);
    let rendered = "w10 w11 w12 w90";
    let want = text(&alone(Some("a"), &ids(rendered), &greedy(6)));
    let a = s.post(
        "/v1/chat/completions",
        &json!({"model": "a", "messages": msgs, "max_tokens": 6, "temperature": 0}).to_string(),
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["choices"][0]["message"]["content"], want);
    assert_eq!(a.json()["object"], "chat.completion");
    // Metrics count them, per adapter.
    let m = s.get("/metrics").text();
    assert!(
        m.contains(
            "deltatune_requests_total{endpoint=\"completions\",model=\"a\",status=\"200\"} 2"
        ),
        "{m}"
    );
    assert!(m.contains("deltatune_completion_tokens_total{model=\"a\"}"));
}

/// Writes a LoRA adapter for the tiny Llama whose q_proj A has the wrong width.
fn misfit_adapter(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        folder_dir("a").join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = HashMap::new();
    let k = "base_model.model.model.layers.0.self_attn.q_proj";
    t.insert(
        format!("{k}.lora_A.weight"),
        Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        format!("{k}.lora_B.weight"),
        Tensor::zeros((64, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn adapters_load_and_unload_at_run_time_behind_the_token() {
    let root = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(folder_dir(name).join(f), d.join(f)).unwrap();
        }
    };
    copy("e");
    copy("ia3");
    misfit_adapter(&root.path().join("misfit"));
    let s = server(Some(root.path()), 64);
    let auth = format!("Bearer {TOKEN}");
    let load = |body: serde_json::Value, auth: &str| {
        s.post(
            "/v1/adapters",
            &body.to_string(),
            &[("Authorization", auth)],
        )
    };
    // Wrong or missing token.
    refused(
        &load(json!({"name": "e"}), "Bearer nope"),
        401,
        "authorization",
    );
    refused(
        &s.post("/v1/adapters", &json!({"name": "e"}).to_string(), &[]),
        401,
        "authorization",
    );
    // Paths outside the adapter directory.
    for p in ["../e", "/etc", "e/../../x"] {
        refused(&load(json!({"name": "x", "path": p}), &auth), 400, "path");
    }
    refused(&load(json!({"name": "nope"}), &auth), 400, "path");
    refused(&load(json!({"name": "bad name!"}), &auth), 400, "name");
    // A base mismatch names the layer and the shapes.
    let a = load(json!({"name": "misfit"}), &auth);
    refused(&a, 400, "path");
    let msg = a.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("q_proj") && msg.contains("[4, 32]") && msg.contains("[64, 64]"),
        "{msg}"
    );
    // Loaded: served at once, equal to the adapter alone.
    let a = load(json!({"name": "e"}), &auth);
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(
        load(json!({"name": "ia3b", "path": "ia3"}), &auth).status,
        201
    );
    refused(&load(json!({"name": "e"}), &auth), 409, "name");
    for (model, adapter) in [("e", "e"), ("ia3b", "ia3")] {
        let want = text(&alone(Some(adapter), &[7, 8, 9], &greedy(5)));
        let a = s.post(
            "/v1/completions",
            &json!({"model": model, "prompt": "w7 w8 w9", "max_tokens": 5, "temperature": 0})
                .to_string(),
            &[],
        );
        assert_eq!(a.json()["choices"][0]["text"], want, "{}", a.text());
    }
    // Unloaded: refused as unknown.
    let del = |name: &str, auth: &str| {
        s.conn()
            .request(
                "DELETE",
                &format!("/v1/adapters/{name}"),
                &[("Authorization", auth)],
                b"",
            )
            .unwrap()
    };
    refused(&del("e", "Bearer wrong"), 401, "authorization");
    assert_eq!(del("e", &auth).status, 200);
    refused(&del("e", &auth), 404, "model");
    let a = s.post(
        "/v1/completions",
        &json!({"model": "e", "prompt": "w7"}).to_string(),
        &[],
    );
    refused(&a, 404, "model");
}

#[test]
fn bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving() {
    let s = server(None, 64);
    // A long generation runs while the bad requests arrive.
    let addr = s.addr;
    let long = std::thread::spawn(move || {
        let mut c = deltatune_serve::loadgen::Conn::new(addr, Duration::from_secs(60));
        c.request(
            "POST",
            "/v1/completions",
            &[],
            json!({"model": "a", "prompt": "w3 w4", "max_tokens": 40, "temperature": 0.7, "seed": 5})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    });
    let post = |path: &str, body: serde_json::Value| s.post(path, &body.to_string(), &[]);
    refused(&s.post("/v1/completions", "{not json", &[]), 400, "body");
    refused(&s.post("/v1/completions", "[1, 2]", &[]), 400, "body");
    refused(
        &post("/v1/completions", json!({"prompt": "w3"})),
        400,
        "model",
    );
    refused(
        &post("/v1/completions", json!({"model": "zz", "prompt": "w3"})),
        404,
        "model",
    );
    refused(
        &post("/v1/completions", json!({"model": "a"})),
        400,
        "prompt",
    );
    refused(
        &post("/v1/completions", json!({"model": "a", "prompt": 3})),
        400,
        "prompt",
    );
    refused(
        &post(
            "/v1/completions",
            json!({"model": "a", "prompt": "w3", "max_tokens": 500}),
        ),
        400,
        "max_tokens",
    );
    refused(
        &post(
            "/v1/completions",
            json!({"model": "a", "prompt": "w3", "max_tokens": 0}),
        ),
        400,
        "max_tokens",
    );
    refused(
        &post(
            "/v1/completions",
            json!({"model": "a", "prompt": "w3", "temperature": -1}),
        ),
        400,
        "temperature",
    );
    refused(
        &post(
            "/v1/completions",
            json!({"model": "a", "prompt": "w3", "n": 2}),
        ),
        400,
        "n",
    );
    refused(
        &post(
            "/v1/chat/completions",
            json!({"model": "a", "messages": "hi"}),
        ),
        400,
        "messages",
    );
    refused(
        &post("/v1/classify", json!({"model": "a", "inputs": ["w3"]})),
        400,
        "model",
    );
    let big = format!(
        "{{\"model\": \"a\", \"prompt\": \"{}\"}}",
        "w3 ".repeat(3000)
    );
    refused(&s.post("/v1/completions", &big, &[]), 413, "body");
    refused(&s.get("/v1/nothing"), 404, "null");
    // The long generation was not disturbed: it equals the adapter alone.
    let a = long.join().unwrap();
    let want = alone(
        Some("a"),
        &[3, 4],
        &GenerateConfig {
            max_new_tokens: 40,
            temperature: 0.7,
            seed: 5,
            ..GenerateConfig::default()
        },
    );
    assert_eq!(a.json()["choices"][0]["text"], text(&want), "{}", a.text());
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = server(None, 0);
    let a = s.post(
        "/v1/completions",
        &json!({"model": "a", "prompt": "w3"}).to_string(),
        &[],
    );
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.json()["error"]["type"], "overloaded_error");
}
