//! Tokenizers rebuilt from GGUF metadata against llama.cpp (llama-cpp-python) and the
//! `tokenizers` package, on the fixtures of `scripts/gen_tokenizer_fixtures.py`
//! (tests/fixtures/tokenizers/):
//!
//! * the real Gemma 3 270M file (SentencePiece, 262,144 pieces) and SmolLM2-135M-Instruct file
//!   (byte-level BPE) when present (skipped with a message otherwise): the ids of 34 strings,
//!   with and without BOS, equal llama.cpp's, and decoding gives the text back;
//! * a small SentencePiece vocabulary, Llama 2 style (space prefix, BOS, byte fallback), and a
//!   small byte-level BPE vocabulary under the `qwen2`, `llama-bpe` and `tekken`
//!   pre-tokenizers, written here as GGUF files with candle's writer: ids equal llama.cpp's on
//!   the same files, and the pre-tokenized pieces equal those of the `tokenizers` package with
//!   the families' tokenizer.json pre-tokenizers.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use deltatune_core::GgufFile;
use deltatune_models::gguf_tokenizer::{
    builtin_chat_template, chat_template_from_gguf, tokenizer_from_gguf,
};
use serde_json::Value as Json;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers")
}

fn fixture(name: &str) -> Json {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn strs(v: &Json) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// The first existing file among `candidates`, or `None` with a message.
fn first_file(what: &str, candidates: Vec<PathBuf>) -> Option<PathBuf> {
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    if found.is_none() {
        if std::env::var("DELTATUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("{what} not found (looked at {candidates:?}): run `deltatune fetch`");
        }
        eprintln!("skipping: {what} not found (looked at {candidates:?})");
    }
    found
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("DELTATUNE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/deltatune")))
}

fn gemma3_file() -> Option<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("DELTATUNE_GEMMA3_GGUF").filter(|v| !v.is_empty()) {
        c.push(PathBuf::from(p));
    }
    if let Some(d) = cache_dir() {
        c.push(d.join("models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf"));
    }
    first_file("the Gemma 3 270M GGUF (set DELTATUNE_GEMMA3_GGUF)", c)
}

fn smollm2_file() -> Option<PathBuf> {
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("DELTATUNE_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        c.push(PathBuf::from(p));
    }
    if let Some(d) = cache_dir() {
        c.push(d.join("models/SmolLM2-135M-Instruct").join(name));
    }
    first_file(name, c)
}

/// Each fixture case: our ids with and without BOS equal llama.cpp's; decoding (special
/// tokens kept) gives the text back where `round_trip(text)`.
fn check_cases(tok: &Tokenizer, cases: &Json, what: &str, round_trip: impl Fn(&str) -> bool) {
    let mut checked = 0;
    for c in cases.as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&c["ids"]), "{what}: ids of {text:?}");
        let got_bos = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(
            got_bos,
            ids(&c["ids_bos"]),
            "{what}: ids with BOS of {text:?}"
        );
        if round_trip(text) {
            assert_eq!(tok.decode(&got, false).unwrap(), text, "{what}: decode");
        }
        checked += 1;
    }
    assert!(checked >= 30, "{what}: only {checked} cases");
}

#[test]
fn gemma3_ids_equal_llama_cpp() {
    let Some(path) = gemma3_file() else { return };
    let file = GgufFile::open(&path).unwrap();
    let t0 = std::time::Instant::now();
    let tok = tokenizer_from_gguf(&file).unwrap();
    eprintln!("Gemma 3 tokenizer built in {:.2?}", t0.elapsed());
    assert_eq!(tok.get_vocab_size(true), 262_144);
    let fx = fixture("gemma3.json");
    check_cases(&tok, &fx["cases"], "gemma3", |_| true);
    // The family's turn markers are single tokens; decoding for a user drops them.
    let turn = tok
        .encode("<start_of_turn>model\nHi<end_of_turn>", false)
        .unwrap();
    assert_eq!(turn.get_ids()[0], 105);
    assert_eq!(*turn.get_ids().last().unwrap(), 106);
    assert_eq!(tok.decode(turn.get_ids(), true).unwrap(), "model\nHi");
}

#[test]
fn gemma_files_without_a_chat_template_get_the_family_one() {
    // The built-in templates are the fixture copies whose renderings by transformers
    // deltatune-data's tests/chat_templates.rs checks.
    for (arch, file) in [
        ("gemma3", "gemma3.jinja"),
        ("gemma2", "gemma2.jinja"),
        ("gemma", "gemma2.jinja"),
    ] {
        let want = std::fs::read_to_string(fixtures().join("templates").join(file)).unwrap();
        assert_eq!(builtin_chat_template(arch), Some(want.as_str()), "{arch}");
    }
    assert_eq!(builtin_chat_template("llama"), None);
    assert_eq!(builtin_chat_template("qwen2"), None);
    let dir = tempfile::tempdir().unwrap();
    let with = write_gguf(
        dir.path(),
        "with.gguf",
        vec![("tokenizer.chat_template", s("{{ messages }}"))],
    );
    let without = write_gguf(dir.path(), "without.gguf", vec![]);
    let t = |p: &Path| chat_template_from_gguf(&GgufFile::open(p).unwrap()).unwrap();
    assert_eq!(t(&with).as_deref(), Some("{{ messages }}"));
    assert_eq!(
        t(&without),
        None,
        "architecture llama has no built-in template"
    );
    let Some(path) = gemma3_file() else { return };
    let got = t(&path).unwrap();
    assert!(got.contains("<start_of_turn>") && got.contains("first_user_prefix"));
}

#[test]
fn smollm2_ids_equal_llama_cpp() {
    let Some(path) = smollm2_file() else { return };
    let file = GgufFile::open(&path).unwrap();
    let tok = tokenizer_from_gguf(&file).unwrap();
    check_cases(&tok, &fixture("smollm2.json")["cases"], "smollm2", |_| true);
}

// ------------------------------------------------------------ synthetic files

fn s(v: &str) -> Value {
    Value::String(v.into())
}

/// A GGUF file holding only `meta` (and the llama hyper-parameters llama.cpp wanted).
fn write_gguf(dir: &Path, name: &str, meta: Vec<(&str, Value)>) -> PathBuf {
    let path = dir.join(name);
    let mut all: Vec<(&str, Value)> = vec![("general.architecture", s("llama"))];
    all.extend(meta);
    let refs: Vec<(&str, &Value)> = all.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = File::create(&path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
    path
}

fn str_array(v: &Json) -> Value {
    Value::Array(strs(v).iter().map(|t| s(t)).collect())
}

fn i32_array(v: &Json) -> Value {
    Value::Array(
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| Value::I32(x.as_i64().unwrap() as i32))
            .collect(),
    )
}

fn spm_meta(fx: &Json) -> Vec<(&'static str, Value)> {
    let scores = fx["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| Value::F32(x.as_f64().unwrap() as f32))
        .collect();
    vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", str_array(&fx["tokens"])),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", i32_array(&fx["token_type"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(true)),
    ]
}

#[test]
fn sentencepiece_llama2_style_ids_equal_llama_cpp() {
    let fx = fixture("spm_synthetic.json");
    assert_eq!(fx["add_space_prefix"], Json::Bool(true));
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), "spm.gguf", spm_meta(&fx));
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    // Every string without a special token decodes back (the space prefix is dropped again);
    // after a special token llama.cpp, and so we, put a space prefix too.
    let specials = ["<unk>", "<s>", "</s>", "<|turn|>", "<sep>", "<|endoftext|>"];
    check_cases(&tok, &fx["cases"], "spm", |t| {
        !specials.iter().any(|sp| t.contains(sp))
    });
    // The prefix shows in the pieces, and characters outside the vocabulary fall back to bytes.
    let enc = tok.encode("hello 日", false).unwrap();
    let pieces: Vec<&str> = enc.get_tokens().iter().map(String::as_str).collect();
    assert_eq!(pieces[0].chars().next(), Some('\u{2581}'), "{pieces:?}");
    assert_eq!(
        &pieces[pieces.len() - 3..],
        ["<0xE6>", "<0x97>", "<0xA5>"],
        "{pieces:?}"
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "hello 日");
}

#[test]
fn phi3_special_tokens_strip_the_whitespace_after_them_as_llama_cpp() {
    let fx = fixture("spm_synthetic.json");
    let dir = tempfile::tempdir().unwrap();
    let mut meta = spm_meta(&fx);
    let name = fx["phi3_general_name"].as_str().unwrap().to_string();
    meta.push(("general.name", s(&name)));
    let path = write_gguf(dir.path(), "phi3.gguf", meta);
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let cases = fx["phi3_cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&c["ids"]), "phi3: ids of {text:?}");
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&c["ids_bos"]), "phi3: ids with BOS of {text:?}");
    }
    // Under another name the whitespace stays.
    let plain = tokenizer_from_gguf(
        &GgufFile::open(write_gguf(dir.path(), "plain.gguf", spm_meta(&fx))).unwrap(),
    )
    .unwrap();
    let text = cases[0]["text"].as_str().unwrap();
    assert_ne!(
        plain.encode(text, false).unwrap().get_ids(),
        ids(&cases[0]["ids"]).as_slice()
    );
}

#[test]
fn sentencepiece_without_space_prefix_keeps_leading_text() {
    let fx = fixture("spm_synthetic.json");
    let dir = tempfile::tempdir().unwrap();
    let mut meta = spm_meta(&fx);
    meta.retain(|(k, _)| *k != "tokenizer.ggml.add_space_prefix");
    meta.push(("tokenizer.ggml.add_space_prefix", Value::Bool(false)));
    let path = write_gguf(dir.path(), "spm-noprefix.gguf", meta);
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let with = {
        let path = write_gguf(dir.path(), "spm.gguf", spm_meta(&fx));
        tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    };
    // "the" with the prefix is the word piece "▁the"; without, it starts with no marker.
    let a = with.encode("the", false).unwrap();
    let b = tok.encode("the", false).unwrap();
    assert_eq!(a.get_tokens()[0], "\u{2581}the");
    assert!(
        !b.get_tokens()[0].starts_with('\u{2581}'),
        "{:?}",
        b.get_tokens()
    );
    // Without the prefix, " the" is what "the" was with it.
    assert_eq!(tok.encode(" the", false).unwrap().get_ids(), a.get_ids());
    for text in ["the lazy dog", " two", "x  y\tz"] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn sentencepiece_without_scores_is_refused_by_name() {
    let fx = fixture("spm_synthetic.json");
    let dir = tempfile::tempdir().unwrap();
    let mut meta = spm_meta(&fx);
    meta.retain(|(k, _)| *k != "tokenizer.ggml.scores");
    let path = write_gguf(dir.path(), "noscores.gguf", meta);
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.scores is missing") && err.contains("noscores.gguf"),
        "{err}"
    );
    // Scores shorter than the vocabulary.
    let mut meta = spm_meta(&fx);
    meta.retain(|(k, _)| *k != "tokenizer.ggml.scores");
    meta.push((
        "tokenizer.ggml.scores",
        Value::Array(vec![Value::F32(0.0); 3]),
    ));
    let path = write_gguf(dir.path(), "shortscores.gguf", meta);
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.scores has 3 entries but tokenizer.ggml.tokens has"),
        "{err}"
    );
}

/// The pieces our pre-tokenizer cuts `text` into (byte-level characters).
fn pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
    let mut pre = PreTokenizedString::from(text);
    tok.get_pre_tokenizer()
        .unwrap()
        .pre_tokenize(&mut pre)
        .unwrap();
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect()
}

#[test]
fn byte_level_pre_tokenizers_equal_llama_cpp_and_transformers() {
    let fx = fixture("bpe_pre.json");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for (name, spec) in fx["pre"].as_object().unwrap() {
        let mut meta = vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s(name)),
            ("tokenizer.ggml.tokens", str_array(&fx["tokens"])),
            ("tokenizer.ggml.token_type", i32_array(&fx["token_type"])),
            ("tokenizer.ggml.merges", str_array(&fx["merges"])),
            (
                "tokenizer.ggml.bos_token_id",
                Value::U32(fx["bos_token_id"].as_u64().unwrap() as u32),
            ),
            (
                "tokenizer.ggml.eos_token_id",
                Value::U32(fx["eos_token_id"].as_u64().unwrap() as u32),
            ),
        ];
        if let Some(b) = spec["add_bos_token"].as_bool() {
            meta.push(("tokenizer.ggml.add_bos_token", Value::Bool(b)));
        }
        let path = write_gguf(dir.path(), &format!("bpe-{name}.gguf"), meta);
        let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        check_cases(&tok, &spec["cases"], name, |_| true);
        for c in spec["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            assert_eq!(
                pieces(&tok, text),
                strs(&c["hf_pieces"]),
                "{name}: pieces of {text:?}"
            );
        }
        names.push(name.clone());
    }
    assert_eq!(names, ["llama-bpe", "qwen2", "tekken"]);
}

#[test]
fn byte_level_pre_tokenizers_differ_where_the_families_do() {
    // The same vocabulary, three pre-tokenizers: digits by one (Qwen2, Tekken) or by three
    // (Llama 3); Tekken cuts CamelCase words.
    let fx = fixture("bpe_pre.json");
    let dir = tempfile::tempdir().unwrap();
    let tok = |name: &str| {
        let meta = vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s(name)),
            ("tokenizer.ggml.tokens", str_array(&fx["tokens"])),
            ("tokenizer.ggml.merges", str_array(&fx["merges"])),
        ];
        let path = write_gguf(dir.path(), &format!("{name}.gguf"), meta);
        tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    };
    assert_eq!(
        pieces(&tok("qwen2"), "x 2024"),
        ["x", "Ġ", "2", "0", "2", "4"]
    );
    assert_eq!(pieces(&tok("llama-bpe"), "x 2024"), ["x", "Ġ", "202", "4"]);
    assert_eq!(pieces(&tok("tekken"), "CamelCase"), ["Camel", "Case"]);
    assert_eq!(pieces(&tok("qwen2"), "CamelCase"), ["CamelCase"]);
    let err = {
        let meta = vec![
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("no-such-pre")),
            ("tokenizer.ggml.tokens", str_array(&fx["tokens"])),
            ("tokenizer.ggml.merges", str_array(&fx["merges"])),
        ];
        let path = write_gguf(dir.path(), "unknown-pre.gguf", meta);
        tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(
        err.contains("tokenizer.ggml.pre is `no-such-pre`") && err.contains("qwen2"),
        "{err}"
    );
}
