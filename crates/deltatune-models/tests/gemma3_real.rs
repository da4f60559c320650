//! The real Gemma 3 270M (GGUF Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 blocks) against llama.cpp and
//! transformers (tests/fixtures/gemma3-270m, made by scripts/gen_gemma3_fixtures.py): greedy
//! tokens of five prompts and the first step's top logits. Skipped with a message when the
//! file is not fetched, required under `DELTATUNE_REQUIRE_ASSETS=1`.

use std::path::{Path, PathBuf};

use candle_core::DType;
use deltatune_core::{Ctx, Weights};
use deltatune_models::decoder::{GenerateConfig, Generator, StopReason};
use deltatune_models::Decoder;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gemma3-270m")
}

/// The Gemma 3 GGUF: `$DELTATUNE_GEMMA3_GGUF`, or the deltatune cache.
fn gemma3() -> Option<PathBuf> {
    let p = std::env::var_os("DELTATUNE_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("DELTATUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/deltatune")
                });
            cache.join("models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf")
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

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

#[test]
fn gemma3_270m_greedy_tokens_equal_llama_cpp_and_transformers() {
    let Some(path) = gemma3() else { return };
    let m = Decoder::load(&path).unwrap();
    assert_eq!(m.config.num_layers, 18);
    assert_eq!(
        m.config.sliding_layers.iter().filter(|&&s| !s).count(),
        3,
        "layers 5, 11 and 17 are global"
    );
    let g = Generator {
        model: &m,
        decode: None,
    };
    let lcpp = json("greedy_llamacpp.json");
    let hf = json("greedy_transformers.json");
    let eos: Vec<u32> = ids(&lcpp["vocab"]["eog_ids"]);
    let (mut same_lcpp, mut same_hf) = (0, 0);
    for (lp, hp) in lcpp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(hf["prompts"].as_array().unwrap())
    {
        let prompt = ids(&lp["input_ids"]);
        assert_eq!(prompt, ids(&hp["input_ids"]), "fixtures out of step");
        let tokens = |int8: bool| {
            let cfg = GenerateConfig {
                max_new_tokens: 16,
                int8_activations: int8,
                ..Default::default()
            };
            let out = g
                .generate(std::slice::from_ref(&prompt), &cfg, &mut |_, _| true)
                .unwrap();
            let mut got = out[0].ids.clone();
            if out[0].stop == StopReason::Eos {
                got.push(*out[0].ids.last().unwrap_or(&eos[0]));
            }
            got
        };
        let f32_tokens = tokens(false);
        let int8_tokens = tokens(true);
        eprintln!(
            "{:?}\n  ours f32  {f32_tokens:?}\n  ours int8 {int8_tokens:?}\n  transformers {:?}\n  llama.cpp    {:?}",
            lp["prompt"], ids(&hp["new_ids"]), ids(&lp["new_ids"])
        );
        let want_lcpp = ids(&lp["new_ids"]);
        assert_eq!(
            int8_tokens[..4],
            want_lcpp[..4],
            "8-bit activations, {:?}",
            lp["prompt"]
        );
        same_hf += usize::from(f32_tokens == ids(&hp["new_ids"]));
        same_lcpp += usize::from(int8_tokens == ids(&lp["new_ids"]));
    }
    assert_eq!(
        same_hf, 5,
        "f32 activations: transformers' tokens on {same_hf} of 5 prompts"
    );
    // 8-bit activations round as llama.cpp's products do (f16 block scales, Q8_K per 256
    // values) and GELU reads llama.cpp's f16 table; llama.cpp still keeps its KV cache in f16
    // and its attention weights too. On "Once upon a time", where llama.cpp and transformers
    // part at the 5th token, the two ways of rounding part there as well (a 0.02 margin).
    assert!(
        same_lcpp >= 4,
        "8-bit activations: llama.cpp's tokens on {same_lcpp} of 5 prompts"
    );
}

/// The last prompt position's logits with f32 activations: transformers' 64 largest (values
/// and order) and its log-sum-exp over the whole 262,144-entry row.
#[test]
fn gemma3_270m_first_logits_match_transformers() {
    let Some(path) = gemma3() else { return };
    let m = Decoder::load(&path).unwrap();
    let fx = Weights::load(&fixtures().join("first_logits.safetensors"), DType::F32).unwrap();
    let get = |k: &str| -> Vec<f32> {
        fx.tensors()
            .find(|(n, _)| *n == k)
            .unwrap_or_else(|| panic!("{k}"))
            .1
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for i in [0, 2] {
        let prompt: Vec<u32> = get(&format!("prompt{i}_input_ids"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let n = prompt.len();
        let logits = m
            .forward(&[prompt], &[vec![1; n]], None, &Ctx::inference())
            .unwrap();
        let row: Vec<f32> = logits
            .get(0)
            .unwrap()
            .get(n - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let top_ids = get(&format!("prompt{i}_top_ids"));
        let top_values = get(&format!("prompt{i}_top_values"));
        let mut worst = 0f32;
        for (&id, &v) in top_ids.iter().zip(&top_values) {
            worst = worst.max((row[id as usize] - v).abs());
        }
        assert!(worst < 2e-3, "prompt {i}: top-64 logits differ by {worst}");
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let want = get(&format!("prompt{i}_logsumexp"))[0] as f64;
        assert!(
            (lse - want).abs() < 2e-3,
            "prompt {i}: logsumexp {lse} against {want}"
        );
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(best as f32, top_ids[0], "prompt {i}: argmax");
    }
}
