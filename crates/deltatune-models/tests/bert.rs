//! The BERT encoder against Hugging Face transformers outputs written by
//! `scripts/gen_fixtures.py` (see tests/fixtures/README.md).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Rng, Weights};
use deltatune_models::{BertClassifier, Inputs, Pooling, TextTokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn expected(dir: &str) -> Weights {
    Weights::load(
        &fixtures().join(dir).join("expected.safetensors"),
        DType::F32,
    )
    .unwrap()
}

fn get(w: &Weights, k: &str) -> Tensor {
    w.tensors().find(|(n, _)| *n == k).unwrap().1.clone()
}

fn inputs(w: &Weights) -> Inputs {
    let u = |k: &str| get(w, k).to_dtype(DType::U32).unwrap();
    Inputs {
        input_ids: u("input_ids"),
        attention_mask: u("attention_mask"),
        token_type_ids: Some(u("token_type_ids")),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn tiny_bert_matches_transformers() {
    let exp = expected("tiny-bert");
    let model = BertClassifier::load(
        &fixtures().join("tiny-bert"),
        3,
        Pooling::Cls,
        &mut Rng::new(0),
    )
    .unwrap();
    let inp = inputs(&exp);
    let ctx = Ctx::eval();
    let hidden = model.encode(&inp, &ctx).unwrap();
    let d = max_abs(&hidden, &get(&exp, "last_hidden_state"));
    assert!(d <= 1e-4, "last_hidden_state differs by {d}");
    let pooled = model.pool(&hidden, &inp.attention_mask, &ctx).unwrap();
    assert!(max_abs(&pooled, &get(&exp, "pooler_output")) <= 1e-4);
    let mean = deltatune_models::bert::mean_pool(&hidden, &inp.attention_mask).unwrap();
    assert!(max_abs(&mean, &get(&exp, "mean_pooled")) <= 1e-4);
    let logits = model.forward(&inp, &ctx).unwrap();
    let d = max_abs(&logits, &get(&exp, "logits"));
    assert!(d <= 1e-4, "logits differ by {d}");
}

/// The real all-MiniLM-L6-v2, when `deltatune fetch` has put it in the cache. CI sets
/// `DELTATUNE_REQUIRE_ASSETS=1`, which turns a missing model into a failure.
fn minilm_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("DELTATUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/deltatune"));
    let dir = cache.join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var("DELTATUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "all-MiniLM-L6-v2 is not in {}; run `deltatune fetch`",
            dir.display()
        );
    }
    eprintln!("skipping: all-MiniLM-L6-v2 not fetched (run `deltatune fetch`)");
    None
}

#[test]
fn minilm_matches_transformers_and_tokenizer_matches() {
    let Some(dir) = minilm_dir() else { return };
    let exp = expected("minilm");
    let inp = inputs(&exp);
    let sentences: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm/sentences.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = sentences["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let tok = TextTokenizer::load(&dir.join("tokenizer.json"), 128).unwrap();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let ids = tok.encode_batch(&refs).unwrap();
    let ours = Inputs::from_ids(&ids, 0).unwrap();
    assert_eq!(
        ours.input_ids.to_vec2::<u32>().unwrap(),
        inp.input_ids.to_vec2::<u32>().unwrap(),
        "token ids differ from the Hugging Face tokenizer's"
    );
    let model = BertClassifier::load(&dir, 2, Pooling::Mean, &mut Rng::new(0)).unwrap();
    let hidden = model.encode(&inp, &Ctx::eval()).unwrap();
    let d = max_abs(&hidden, &get(&exp, "last_hidden_state"));
    assert!(d <= 1e-4, "MiniLM last_hidden_state differs by {d}");
}

#[test]
fn config_hidden_size_disagreeing_with_weights_names_the_tensor() {
    let tmp = std::env::temp_dir().join(format!("dt-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = fixtures().join("tiny-bert");
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    std::fs::write(tmp.join("config.json"), cfg).unwrap();
    std::fs::copy(src.join("model.safetensors"), tmp.join("model.safetensors")).unwrap();
    let err = BertClassifier::load(&tmp, 3, Pooling::Cls, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("word_embeddings") && err.contains("[120, 32]") && err.contains("hidden_size"),
        "{err}"
    );
    // A truncated weights file is named as such.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.join("config.json"),
        std::fs::read(src.join("config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = BertClassifier::load(&tmp, 3, Pooling::Cls, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A missing folder names config.json.
    let err = BertClassifier::load(&tmp.join("nope"), 3, Pooling::Cls, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("deltatune fetch"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
