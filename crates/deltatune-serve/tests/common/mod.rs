//! The tiny Llama of the fixtures with a word-level tokenizer (`<pad>`, `<s>`, `</s>`, then
//! `w3`...`w95`), its PEFT adapters, and the expected output of each adapter alone.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use deltatune_core::Rng;
use deltatune_methods::load_state_dict;
use deltatune_models::decoder::{GenerateConfig, Generator, LoadedDecoder};
use deltatune_models::Decoder;
use deltatune_serve::AdapterFolder;
use tokenizers::Tokenizer;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tokenizer() -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for i in 0..96u32 {
        let w = match i {
            0 => "<pad>".to_string(),
            1 => "<s>".to_string(),
            2 => "</s>".to_string(),
            _ => format!("w{i}"),
        };
        vocab.insert(w, i.into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let j = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    });
    Tokenizer::from_bytes(j.to_string().as_bytes()).unwrap()
}

pub const CHAT_TEMPLATE: &str =
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}w90{% endif %}";

pub fn tiny() -> Decoder {
    Decoder::load(&fixtures().join("tiny-llama")).unwrap()
}

pub fn decoder() -> LoadedDecoder {
    LoadedDecoder {
        model: tiny(),
        tokenizer: tokenizer(),
        chat_template: Some(CHAT_TEMPLATE.into()),
        source: fixtures().join("tiny-llama"),
    }
}

/// The adapter folders of the tiny Llama, by name: LoRA adapters (a, e with rank and alpha
/// patterns, c) and one each of prompt, prefix and IA3.
pub fn folder_dir(name: &str) -> PathBuf {
    match name {
        "prompt" | "prefix" | "ia3" => fixtures().join(format!("tiny-llama-{name}")),
        _ => fixtures().join("tiny-llama-combine").join(name),
    }
}

pub fn folder(name: &str) -> AdapterFolder {
    AdapterFolder::read(name, &folder_dir(name), None).unwrap()
}

/// What `name`'s adapter alone (or the base, `None`) generates for `prompt`.
pub fn alone(name: Option<&str>, prompt: &[u32], cfg: &GenerateConfig) -> Vec<u32> {
    let mut m = tiny();
    if let Some(n) = name {
        let f = folder(n);
        let tr = f.delta.attach_saved(&mut m, &Rng::new(0)).unwrap();
        load_state_dict(&tr, &f.tensors, Path::new("x")).unwrap();
    }
    let g = Generator {
        model: &m,
        decode: None,
    };
    g.generate(&[prompt.to_vec()], cfg, &mut |_, _| true)
        .unwrap()
        .remove(0)
        .ids
}

/// The text of `ids` as the server decodes it.
pub fn text(ids: &[u32]) -> String {
    tokenizer().decode(ids, true).unwrap()
}

/// A server on a free loopback port, run by a runtime on its own thread.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl TestServer {
    pub fn start(app: axum::Router) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            deltatune_serve::http::serve(listener, app, std::future::pending())
                .await
                .unwrap()
        });
        Self { addr, _rt: rt }
    }

    pub fn conn(&self) -> deltatune_serve::loadgen::Conn {
        deltatune_serve::loadgen::Conn::new(self.addr, std::time::Duration::from_secs(60))
    }

    /// POSTs JSON (or any bytes) with extra headers.
    pub fn post(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> deltatune_serve::loadgen::Answer {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        self.conn()
            .request("POST", path, &h, body.as_bytes())
            .unwrap()
    }

    pub fn get(&self, path: &str) -> deltatune_serve::loadgen::Answer {
        self.conn().request("GET", path, &[], b"").unwrap()
    }
}

/// Asserts a refusal: its status and the field its JSON error names.
pub fn refused(a: &deltatune_serve::loadgen::Answer, status: u16, param: &str) {
    let v = a.json();
    assert_eq!(a.status, status, "{}", a.text());
    let want = if param == "null" {
        serde_json::Value::Null
    } else {
        param.into()
    };
    assert_eq!(v["error"]["param"], want, "{}", a.text());
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}
