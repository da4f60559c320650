//! Files found by `deltatune-fuzz` (crates/deltatune-fuzz) that once panicked or asked for an
//! allocation sized by a corrupt header; each test is named after the bug it pins and builds
//! its minimized input in code.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use deltatune_core::{Error, Rng};
use deltatune_models::decoder::gguf::load_gguf;
use deltatune_models::{BertClassifier, Decoder, Pooling, TextTokenizer};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// A one-layer llama GGUF (hidden 64, 2 heads, 1 kv head) with a 4-token BPE vocabulary,
/// whose `llama.block_count` is `block_count`.
fn write_llama_gguf(path: &Path, block_count: u32) {
    let (h, heads, kv, hd) = (64usize, 2usize, 1usize, 32usize);
    let toks = ["a", "b", "ab", "<|endoftext|>"];
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.block_count", Value::U32(block_count)),
        ("llama.feed_forward_length", Value::U32(h as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(toks.iter().map(|t| Value::String(t.to_string())).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        ),
    ];
    let mut rng = Rng::new(5);
    let mut q = |shape: &[usize]| {
        QTensor::quantize(&rng.normal_tensor(shape, 0.02).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(&[toks.len(), h])),
        ("output_norm.weight".into(), q(&[h])),
    ];
    for (name, shape) in [
        ("attn_norm", vec![h]),
        ("ffn_norm", vec![h]),
        ("attn_q", vec![heads * hd, h]),
        ("attn_k", vec![kv * hd, h]),
        ("attn_v", vec![kv * hd, h]),
        ("attn_output", vec![h, heads * hd]),
        ("ffn_gate", vec![h, h]),
        ("ffn_up", vec![h, h]),
        ("ffn_down", vec![h, h]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), q(&shape)));
    }
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &m, &t).unwrap();
}

/// `llama.block_count = u32::MAX` made the loader build its list of expected tensors (9 per
/// layer) before looking at the file: ~38 billion entries, an abort on allocation failure.
#[test]
fn gguf_block_count_beyond_the_tensors_is_an_error_not_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_llama_gguf(&p, 1);
    load_gguf(&p).expect("the well-formed file loads");
    for count in [2, 1000, u32::MAX] {
        write_llama_gguf(&p, count);
        let err = load_gguf(&p).unwrap_err();
        assert!(matches!(err, Error::MalformedConfig { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("m.gguf")
                && msg.contains(&format!("block_count is {count}"))
                && msg.contains("1 layer(s)"),
            "{msg}"
        );
    }
}

fn tiny_bert_tokenizer() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("tiny-bert/tokenizer.json")).unwrap()).unwrap()
}

fn load_tokenizer(v: &serde_json::Value) -> deltatune_core::Result<TextTokenizer> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    TextTokenizer::load(&p, 16)
}

/// A syntax error inside the `decoder` object (here a raw control character in a string)
/// made the tokenizers library panic (`expect("Helper")` in its decoder deserialiser) inside
/// `Tokenizer::from_file` instead of returning an error.
#[test]
fn tokenizer_json_with_malformed_decoder_is_an_error_not_a_panic() {
    let mut v = tiny_bert_tokenizer();
    v["decoder"] = serde_json::json!({"type": "WordPiece", "prefix": "@@MARK@@", "cleanup": true});
    let text = serde_json::to_string(&v)
        .unwrap()
        .replace("@@MARK@@", "#\u{1}#");
    // The library itself still panics on this input (so this test keeps pinning the bug).
    let lib = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>().map(|_| ()));
    assert!(lib.is_err(), "tokenizers no longer panics here: {lib:?}");

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    std::fs::write(&p, &text).unwrap();
    let err = TextTokenizer::load(&p, 16).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("malformed"),
        "{err}"
    );
}

/// A post-processor template naming a special token missing from its `special_tokens`
/// loaded fine and then panicked on the first encoding (`no entry found for key`).
#[test]
fn tokenizer_template_with_undefined_special_token_is_an_error_not_a_panic() {
    let mut v = tiny_bert_tokenizer();
    v["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "[NOPE]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {}
    });
    // The library loads it and panics on the first encoding.
    let tok: tokenizers::Tokenizer = serde_json::to_string(&v).unwrap().parse().unwrap();
    let lib = std::panic::catch_unwind(|| tok.encode("hello", true).map(|_| ()));
    assert!(lib.is_err(), "tokenizers no longer panics here: {lib:?}");

    let err = load_tokenizer(&v).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("special_tokens"),
        "{err}"
    );
    // The fixture itself still loads and encodes.
    let t = load_tokenizer(&tiny_bert_tokenizer()).unwrap();
    assert!(!t.encode_batch(&["hello"]).unwrap()[0].is_empty());
}

/// An added token of 32,768 bytes made loading take 28 s (the tokenizers library builds its
/// matcher in time quadratic in the token's length); now refused with the token named.
#[test]
fn tokenizer_json_with_a_32k_added_token_is_an_error_not_a_28s_load() {
    let mut v = tiny_bert_tokenizer();
    v["added_tokens"] = serde_json::json!([{
        "id": 0, "content": "x".repeat(32768), "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true
    }]);
    let t = std::time::Instant::now();
    let err = load_tokenizer(&v).unwrap_err().to_string();
    assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    assert!(
        err.contains("tokenizer.json") && err.contains("added_tokens[0] is 32768 bytes"),
        "{err}"
    );
}

/// A model folder whose config.json copies `model.safetensors` and `tokenizer.json` from
/// `fixture_dir` and has `num_hidden_layers` set to `layers`.
fn model_dir(fixture_dir: &str, files: &[&str], layers: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(fixture(&format!("{fixture_dir}/{f}")), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture(&format!("{fixture_dir}/config.json"))).unwrap(),
    )
    .unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(layers);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    dir
}

/// `num_hidden_layers: 7130735639373133823` in a BERT config.json: `Vec::with_capacity` of
/// that many layers panicked with "capacity overflow" (and a count of 10^8 would have asked
/// for ~100 GB) before the first layer's weights were looked up.
#[test]
fn bert_config_huge_num_hidden_layers_is_an_error_not_a_capacity_overflow() {
    for layers in [7_130_735_639_373_133_823u64, 100_000_000, 3] {
        let dir = model_dir(
            "tiny-bert",
            &["model.safetensors", "tokenizer.json"],
            layers,
        );
        let err = BertClassifier::load(dir.path(), 3, Pooling::Cls, &mut Rng::new(0))
            .unwrap_err()
            .to_string();
        // The fixture has layers 0 and 1: layer 2 is the first one missing.
        assert!(
            err.contains("layer.2") && err.contains("model.safetensors"),
            "{layers}: {err}"
        );
    }
}

/// The same in a Llama config.json.
#[test]
fn llama_config_huge_num_hidden_layers_is_an_error_not_a_capacity_overflow() {
    for layers in [7_130_735_639_373_133_823u64, 100_000_000, 3] {
        let dir = model_dir("tiny-llama", &["model.safetensors"], layers);
        let err = Decoder::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("layers.2") && err.contains("model.safetensors"),
            "{layers}: {err}"
        );
    }
}
