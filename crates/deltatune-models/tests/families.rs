//! Every decoder family against transformers and llama.cpp: the tiny random checkpoints of
//! `tests/fixtures/decoders/<family>` (made by scripts/gen_decoder_fixtures.py with each
//! family's quirks switched on: llama 3 and linear rope scaling, Mistral's window, Qwen2's
//! biases, Qwen3's QK-norm, Gemma 2's soft-capping, Gemma 3's local/global layers, Phi-3's fused
//! projections), loaded from the Hugging Face folder and from the GGUF file llama.cpp's
//! converter wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Weights};
use deltatune_models::decoder::Family;
use deltatune_models::{Decoder, KvCache};

const FAMILIES: [(&str, Family); 8] = [
    ("llama", Family::Llama),
    ("llama-linear", Family::Llama),
    ("mistral", Family::Mistral),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3),
    ("phi3", Family::Phi3),
];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders")
        .join(name)
}

fn expected(name: &str) -> BTreeMap<String, Tensor> {
    Weights::load(&dir(name).join("expected.safetensors"), DType::F32)
        .unwrap()
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

/// The largest difference over the real (mask 1) positions of `[B, T, V]` logits.
fn max_diff_real(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let mut worst = 0f32;
    for (r, m) in mask.iter().enumerate() {
        for (j, &on) in m.iter().enumerate() {
            if on == 0 {
                continue;
            }
            let x: Vec<f32> = a.get(r).unwrap().get(j).unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b.get(r).unwrap().get(j).unwrap().to_vec1().unwrap();
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs());
            }
        }
    }
    worst
}

#[test]
fn each_family_from_its_folder_matches_transformers() {
    for (name, family) in FAMILIES {
        let m = Decoder::load(&dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.config.family, family, "{name}");
        let exp = expected(name);
        let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
        for ctx in [Ctx::eval(), Ctx::inference()] {
            let logits = m.forward(&ids, &mask, None, &ctx).unwrap();
            let d = max_diff_real(&logits, &exp["logits"], &mask);
            assert!(
                d < 1e-4,
                "{name} (no_grad {}): logits differ by {d}",
                ctx.no_grad
            );
        }
    }
}

/// The GGUF file gives transformers' logits for what the file describes (`logits_gguf` where
/// llama.cpp's converter drops a setting, e.g. Mistral's window) and llama.cpp's own logits.
#[test]
fn each_family_from_gguf_matches_transformers_and_llama_cpp() {
    for (name, family) in FAMILIES {
        let m =
            Decoder::load(&dir(name).join("model.gguf")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_family = if family == Family::Mistral {
            Family::Llama // llama.cpp writes Mistral as `llama`
        } else {
            family
        };
        assert_eq!(m.config.family, want_family, "{name}");
        let exp = expected(name);
        let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
        let logits = m.forward(&ids, &mask, None, &Ctx::inference()).unwrap();
        let want = exp.get("logits_gguf").unwrap_or(&exp["logits"]);
        let d = max_diff_real(&logits, want, &mask);
        assert!(
            d < 1e-4,
            "{name} (GGUF): logits differ from transformers' by {d}"
        );
        for r in 0..2 {
            let Some(cpp) = exp.get(&format!("logits_llamacpp_row{r}")) else {
                continue;
            };
            let n = cpp.dim(0).unwrap();
            let ours = logits.get(r).unwrap().narrow(0, 0, n).unwrap();
            let d: f32 = (ours - cpp)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            // llama.cpp's CPU GELU looks its input up in an f16 table (GGML_GELU_FP16): a few
            // 1e-3 on the GeGLU families.
            let tol = if m.config.family.norm_plus_one() {
                5e-3
            } else {
                1e-4
            };
            assert!(
                d < tol,
                "{name} row {r}: logits differ from llama.cpp's by {d}"
            );
        }
    }
}

/// Decoding with the KV cache (5 tokens, then one at a time) gives the full pass's logits:
/// sliding windows and local/global ropes hold across cached positions.
#[test]
fn each_family_with_the_kv_cache_matches_the_full_pass() {
    for (name, _) in FAMILIES {
        let m = Decoder::load(&dir(name)).unwrap();
        let exp = expected(name);
        let ids = rows(&exp["input_ids"]);
        let row = &ids[0];
        let mut cache = KvCache::default();
        let ctx = Ctx::inference();
        let mut got = vec![m
            .forward(&[row[..5].to_vec()], &[vec![1; 5]], Some(&mut cache), &ctx)
            .unwrap()];
        for j in 5..row.len() {
            got.push(
                m.forward(&[vec![row[j]]], &[vec![1]], Some(&mut cache), &ctx)
                    .unwrap(),
            );
        }
        let got = Tensor::cat(&got, 1).unwrap();
        let want = exp["logits"].get(0).unwrap().unsqueeze(0).unwrap();
        let d = max_diff_real(&got, &want, &[vec![1; row.len()]]);
        assert!(d < 1e-4, "{name}: cached logits differ by {d}");
    }
}

/// What `--show-config` and a merged folder's config.json say reads back to the same model.
#[test]
fn each_familys_config_round_trips_through_config_json() {
    for (name, _) in FAMILIES {
        let m = Decoder::load(&dir(name)).unwrap();
        let json = m.config.to_hf_json();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        std::fs::write(&p, serde_json::to_string(&json).unwrap()).unwrap();
        let back = deltatune_models::decoder::HfDecoderConfig::read(&p)
            .unwrap()
            .into_config(&p)
            .unwrap();
        assert_eq!(back, m.config, "{name}: {json}");
    }
}

/// The named tensors a merged folder is written from equal the checkpoint's (Gemma's norms
/// back in `w` form).
#[test]
fn each_familys_named_tensors_are_its_checkpoint() {
    use deltatune_models::Backbone;
    for (name, _) in FAMILIES {
        let m = Decoder::load(&dir(name)).unwrap();
        let file = Weights::load(&dir(name).join("model.safetensors"), DType::F32).unwrap();
        let ours: BTreeMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
        for (k, t) in file.tensors() {
            let Some(o) = ours.get(k) else {
                panic!("{name}: {k} not among the named tensors");
            };
            let d: f32 = (o - t)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-6, "{name}: {k} differs by {d}");
        }
    }
}

/// What the decoder cannot run is refused by name from `config.json`, before any weight.
#[test]
fn unsupported_configs_are_refused_by_name() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("llama").join("config.json")).unwrap())
            .unwrap();
    let cases: [(&str, serde_json::Value, &str); 7] = [
        (
            "model_type",
            serde_json::json!("falcon"),
            "model_type `falcon`",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
            "rope type `yarn` is not supported",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
            "needs a number `low_freq_factor`",
        ),
        (
            "partial_rotary_factor",
            serde_json::json!(0.75),
            "partial rotary",
        ),
        ("mlp_bias", serde_json::json!(true), "mlp_bias"),
        ("hidden_act", serde_json::json!("relu"), "hidden_act `relu`"),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "layer_types lists 1",
        ),
    ];
    for (key, value, want) in cases {
        let mut cfg = base.clone();
        cfg[key] = value;
        if key == "layer_types" {
            cfg["sliding_window"] = serde_json::json!(4);
        }
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
        let err = deltatune_models::decoder::HfDecoderConfig::read(&p)
            .unwrap()
            .into_config(&p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want) && err.contains("config.json"),
            "{key}: {err}"
        );
    }
}
