//! The Llama decoder against transformers: the tiny random Llama fixtures (grouped-query
//! attention, untied and tied heads, right padding, KV cache) and the real SmolLM2 GGUF
//! (greedy tokens of three prompts; skipped with a message when it is not fetched, required
//! under `DELTATUNE_REQUIRE_ASSETS=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Weights};
use deltatune_models::llama::{GenerateConfig, Generator};
use deltatune_models::{KvCache, LlamaModel};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load_map(p: &Path) -> BTreeMap<String, Tensor> {
    Weights::load(p, DType::F32)
        .unwrap()
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
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
fn tiny_llama_matches_transformers_logits_and_hidden() {
    for dir in ["tiny-llama", "tiny-llama-tied"] {
        let m = LlamaModel::load(&fixtures().join(dir)).unwrap();
        let exp = load_map(&fixtures().join(dir).join("expected.safetensors"));
        let ids = rows(&exp["input_ids"]);
        let mask = rows(&exp["attention_mask"]);
        let ctx = Ctx::eval();
        let logits = m.forward(&ids, &mask, None, &ctx).unwrap();
        let d = max_abs(&logits, &exp["logits"]);
        assert!(d < 1e-4, "{dir}: logits differ by {d}");
        if let Some(h) = exp.get("hidden_last") {
            let hid = m.forward_hidden(&ids, &mask, None, &ctx).unwrap();
            let d = max_abs(&hid, h);
            assert!(d < 1e-4, "{dir}: hidden states differ by {d}");
        }
    }
}

#[test]
fn tiny_llama_kv_cache_matches_full_pass() {
    let dir = fixtures().join("tiny-llama");
    let m = LlamaModel::load(&dir).unwrap();
    let exp = load_map(&dir.join("expected.safetensors"));
    let ids = rows(&exp["input_ids"]);
    let ctx = Ctx::eval();
    let mut cache = KvCache::default();
    let first = vec![ids[0][..4].to_vec()];
    m.forward(&first, &[vec![1; 4]], Some(&mut cache), &ctx)
        .unwrap();
    assert_eq!(cache.len(), 4);
    let rest = vec![ids[0][4..].to_vec()];
    let logits = m
        .forward(&rest, &[vec![1; 3]], Some(&mut cache), &ctx)
        .unwrap();
    let d = max_abs(&logits, &exp["cached_logits"]);
    assert!(d < 1e-4, "cached logits differ from transformers' by {d}");
    let full = exp["logits"]
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(1, 4, 3)
        .unwrap();
    let d = max_abs(&logits, &full);
    assert!(d < 1e-4, "cached logits differ from the full pass by {d}");
}

#[test]
fn left_padding_does_not_change_a_rows_logits() {
    let dir = fixtures().join("tiny-llama");
    let m = LlamaModel::load(&dir).unwrap();
    let exp = load_map(&dir.join("expected.safetensors"));
    let ids = rows(&exp["input_ids"]);
    let ctx = Ctx::eval();
    // Row 1's five real tokens, alone and left-padded by two.
    let real = ids[1][..5].to_vec();
    let alone = m
        .forward(std::slice::from_ref(&real), &[vec![1; 5]], None, &ctx)
        .unwrap();
    let mut padded = vec![0u32, 0];
    padded.extend(&real);
    let left = m
        .forward(&[padded], &[vec![0, 0, 1, 1, 1, 1, 1]], None, &ctx)
        .unwrap()
        .narrow(1, 2, 5)
        .unwrap();
    let d = max_abs(&alone, &left);
    assert!(d < 1e-4, "left padding changed the logits by {d}");
}

#[test]
fn greedy_generation_stops_at_eos_and_respects_budget() {
    let m = LlamaModel::load(&fixtures().join("tiny-llama")).unwrap();
    let g = Generator {
        model: &m,
        decode: None,
    };
    let cfg = GenerateConfig {
        max_new_tokens: 5,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let out = g
        .generate(&[vec![30, 42, 30], vec![5, 6]], &cfg, &mut |r, t| {
            streamed.push((r, t));
            true
        })
        .unwrap();
    for (r, o) in out.iter().enumerate() {
        assert!(o.ids.len() <= 5);
        let s: Vec<u32> = streamed
            .iter()
            .filter(|(rr, _)| *rr == r)
            .map(|x| x.1)
            .collect();
        assert_eq!(s, o.ids, "streamed tokens equal the result");
    }
    // Greedy batch equals each prompt alone (left padding is exact).
    let alone = g.generate(&[vec![5, 6]], &cfg, &mut |_, _| true).unwrap();
    assert_eq!(alone[0].ids, out[1].ids);
    let zero = GenerateConfig {
        max_new_tokens: 0,
        ..Default::default()
    };
    let err = g.generate(&[vec![1]], &zero, &mut |_, _| true).unwrap_err();
    assert!(err.to_string().contains("max_new_tokens"), "{err}");
}

/// The SmolLM2 GGUF: `$DELTATUNE_SMOLLM2_GGUF`, or the deltatune cache.
fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("DELTATUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("DELTATUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/deltatune")
                });
            cache.join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var("DELTATUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run `deltatune fetch`", p.display());
    }
    eprintln!(
        "skipping: {} not found (run `deltatune fetch`)",
        p.display()
    );
    None
}

#[test]
fn smollm2_greedy_tokens_equal_transformers() {
    let Some(path) = smollm2() else { return };
    let m = LlamaModel::load(&path).unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/greedy.json")).unwrap(),
    )
    .unwrap();
    let g = Generator {
        model: &m,
        decode: None,
    };
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    // First-step logits against the dequantized model's (f32 activations on the same blocks).
    let first = load_map(&fixtures().join("smollm2/first_logits.safetensors"));
    let p0 = rows(&first["input_ids"].unsqueeze(0).unwrap());
    let logits = m
        .forward(&p0, &[vec![1; p0[0].len()]], None, &Ctx::eval())
        .unwrap();
    let t = logits.dim(1).unwrap();
    let last = logits.narrow(1, t - 1, 1).unwrap().flatten_all().unwrap();
    let d = max_abs(&last, &first["logits"]);
    assert!(d < 2e-3, "first-step logits differ by {d}");
    for p in fx["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let want = ids(&p["new_ids"]);
        let cfg = GenerateConfig {
            max_new_tokens: 24,
            ..Default::default()
        };
        let out = g.generate(&[prompt], &cfg, &mut |_, _| true).unwrap();
        // transformers keeps the end-of-sequence id in its output; ours reports it as the stop.
        let mut got = out[0].ids.clone();
        if out[0].stop == deltatune_models::llama::StopReason::Eos {
            got.push(2);
        }
        assert_eq!(got, want, "prompt {:?}", p["prompt"]);
    }
}

#[test]
fn smollm2_tokenizer_from_gguf_equals_transformers() {
    let Some(path) = smollm2() else { return };
    let d = deltatune_models::llama::load_decoder(&path).unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/tokens.json")).unwrap(),
    )
    .unwrap();
    for s in fx["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<u32> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(d.encode(text, true).unwrap(), want, "{text:?}");
        // transformers' `decoded` keeps special tokens; `decode` (for generated text) skips them.
        let kept = d.tokenizer.decode(&want, false).unwrap();
        assert_eq!(kept, s["decoded"].as_str().unwrap(), "{text:?}");
    }
}
