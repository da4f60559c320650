//! The Llama decoder against transformers: the tiny random Llama fixtures (grouped-query
//! attention, untied and tied heads, right padding, KV cache) and the real SmolLM2 GGUF
//! (greedy tokens of three prompts; skipped with a message when it is not fetched, required
//! under `DELTATUNE_REQUIRE_ASSETS=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Weights};
use deltatune_models::decoder::{GenerateConfig, Generator};
use deltatune_models::{Decoder, KvCache};

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
        let m = Decoder::load(&fixtures().join(dir)).unwrap();
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
    let m = Decoder::load(&dir).unwrap();
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
    let m = Decoder::load(&dir).unwrap();
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
    let m = Decoder::load(&fixtures().join("tiny-llama")).unwrap();
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
    let m = Decoder::load(&path).unwrap();
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
    // With 8-bit activations (the default, llama.cpp's rounding) the tokens are llama.cpp's
    // (tests/fixtures/smollm2/greedy_llamacpp.json) or, where llama.cpp's own rounding and ours
    // part near a tie, transformers'; with f32 activations they are transformers'.
    let lcpp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/greedy_llamacpp.json")).unwrap(),
    )
    .unwrap();
    let mut llamacpp_only = 0;
    for (p, lp) in fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lcpp["prompts"].as_array().unwrap())
    {
        let prompt = ids(&p["input_ids"]);
        assert_eq!(prompt, ids(&lp["input_ids"]), "fixtures out of step");
        let want = ids(&p["new_ids"]);
        let want_lcpp = ids(&lp["new_ids"]);
        let tokens = |int8: bool| {
            let cfg = GenerateConfig {
                max_new_tokens: 24,
                int8_activations: int8,
                ..Default::default()
            };
            let out = g
                .generate(std::slice::from_ref(&prompt), &cfg, &mut |_, _| true)
                .unwrap();
            // transformers and llama.cpp keep the end-of-sequence id in their output; ours
            // reports it as the stop.
            let mut got = out[0].ids.clone();
            if out[0].stop == deltatune_models::decoder::StopReason::Eos {
                got.push(2);
            }
            got
        };
        assert_eq!(
            tokens(false),
            want,
            "f32 activations, prompt {:?}",
            p["prompt"]
        );
        let got = tokens(true);
        assert!(
            got == want_lcpp || got == want,
            "8-bit activations, prompt {:?}: {got:?}, llama.cpp {want_lcpp:?}, transformers {want:?}",
            p["prompt"]
        );
        if got == want_lcpp && got != want {
            llamacpp_only += 1;
        }
    }
    if deltatune_core::ops::int8_products_supported() {
        assert!(
            llamacpp_only > 0,
            "8-bit activations gave transformers' tokens on every prompt: not llama.cpp's rounding"
        );
    }
}

#[test]
fn smollm2_tokenizer_from_gguf_equals_transformers() {
    let Some(path) = smollm2() else { return };
    let d = deltatune_models::decoder::load_decoder(&path).unwrap();
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

/// The logits at the last position of a one-row batch.
fn last_logits(m: &Decoder, h: &Tensor, ctx: &Ctx) -> Vec<f32> {
    let t = h.dim(1).unwrap();
    m.logits(&h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(), ctx)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Greedy next-token logits of `prompt` alone for `steps` tokens (the serving engine's
/// reference): `(tokens fed after the prompt, logits before each)`.
fn alone_steps(m: &Decoder, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let ctx = Ctx::inference();
    let mut cache = KvCache::default();
    let mut ids = vec![prompt.to_vec()];
    let mut mask = vec![vec![1u32; prompt.len()]];
    let mut out = Vec::new();
    for _ in 0..steps {
        let h = m
            .forward_hidden(&ids, &mask, Some(&mut cache), &ctx)
            .unwrap();
        let l = last_logits(m, &h, &ctx);
        let next = deltatune_models::decoder::generate::argmax(&l);
        out.push(l);
        ids = vec![vec![next]];
        mask = vec![vec![1]];
    }
    out
}

/// A continuous batch: sequences prefilled on their own join a running cache
/// (`KvCache::append`, left-padded), a finished one leaves (`KvCache::keep_rows`), and every
/// row's logits at every step equal those of its sequence run alone.
#[test]
fn cache_rows_join_and_leave_a_running_batch() {
    let m = Decoder::load(&fixtures().join("tiny-llama")).unwrap();
    let prompts: [Vec<u32>; 3] = [vec![5, 17, 30], vec![8, 9, 40, 41, 60], vec![70, 3]];
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| alone_steps(&m, p, 8)).collect();
    let ctx = Ctx::inference();
    // Prefills `p` into a cache of its own; returns its cache and first logits.
    let prefill = |p: &[u32]| {
        let mut c = KvCache::default();
        let h = m
            .forward_hidden(&[p.to_vec()], &[vec![1; p.len()]], Some(&mut c), &ctx)
            .unwrap();
        (c, last_logits(&m, &h, &ctx))
    };
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    // rows: (sequence, step)
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut last: Vec<u32> = Vec::new();
    let mut cache = KvCache::default();
    let join =
        |k: usize, cache: &mut KvCache, rows: &mut Vec<(usize, usize)>, last: &mut Vec<u32>| {
            let (c, l) = prefill(&prompts[k]);
            assert!(close(&l, &want[k][0]) < 1e-5);
            cache.append(c).unwrap();
            rows.push((k, 1));
            last.push(deltatune_models::decoder::generate::argmax(&l));
        };
    let step = |cache: &mut KvCache, rows: &mut Vec<(usize, usize)>, last: &mut Vec<u32>| {
        let ids: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
        let mask = vec![vec![1u32]; ids.len()];
        let h = m.forward_hidden(&ids, &mask, Some(cache), &ctx).unwrap();
        let l: Vec<Vec<f32>> = m
            .logits(&h.squeeze(1).unwrap(), &ctx)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (r, (k, s)) in rows.iter_mut().enumerate() {
            let d = close(&l[r], &want[*k][*s]);
            assert!(d < 1e-5, "sequence {k} step {s}: {d}");
            *s += 1;
            last[r] = deltatune_models::decoder::generate::argmax(&l[r]);
        }
    };
    join(0, &mut cache, &mut rows, &mut last);
    step(&mut cache, &mut rows, &mut last);
    step(&mut cache, &mut rows, &mut last);
    // The longer prompt joins a cache that is shorter than it.
    join(1, &mut cache, &mut rows, &mut last);
    assert_eq!(cache.rows(), 2);
    step(&mut cache, &mut rows, &mut last);
    // Sequence 0 leaves; the leading positions only it used go with it.
    let before = cache.len();
    cache.keep_rows(&[1]).unwrap();
    rows.remove(0);
    last.remove(0);
    assert!(cache.len() <= before);
    step(&mut cache, &mut rows, &mut last);
    // A short prompt joins a longer cache.
    join(2, &mut cache, &mut rows, &mut last);
    for _ in 0..3 {
        step(&mut cache, &mut rows, &mut last);
    }
    assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), vec![6, 4]);
    assert!(cache.keep_rows(&[4]).is_err());
}
