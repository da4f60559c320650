//! Every delta method on the Llama decoder (tiny random Llama with grouped-query attention):
//! PEFT's CAUSAL_LM adapters load and give PEFT's logits (LoRA, IA3, prefix with per-key-head
//! prefixes, prompt tuning); every trainable parameter of each method receives a gradient
//! through the decoder's ops; zero-initialised deltas leave the output unchanged.

mod common;

use candle_core::{DType, Tensor};
use common::{abs_sum, fixtures, load_map, max_abs, randomise};
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_methods::compose::ComposeConfig;
use deltatune_methods::{load_state_dict, DeltaConfig, Trainable};
use deltatune_models::Decoder;

fn tiny_llama() -> Decoder {
    Decoder::load(&fixtures().join("tiny-llama")).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

/// Loads a PEFT adapter folder onto the tiny Llama.
fn with_peft(dir: &str) -> (Decoder, Vec<Trainable>) {
    let d = fixtures().join(dir);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap();
    let cfg = DeltaConfig::from_json(v).unwrap();
    let mut m = tiny_llama();
    let tr = cfg.attach_saved(&mut m, &Rng::new(0)).unwrap();
    let path = d.join("adapter_model.safetensors");
    load_state_dict(&tr, &load_map(&path), &path).unwrap();
    (m, tr)
}

#[test]
fn peft_causal_lm_adapters_give_peft_logits() {
    for (dir, ids_key, mask_key) in [
        ("tiny-llama-lora", "input_ids", "attention_mask"),
        ("tiny-llama-ia3", "input_ids", "attention_mask"),
        ("tiny-llama-prefix", "input_ids_both", "attention_mask_both"),
        ("tiny-llama-prompt", "input_ids", "attention_mask"),
    ] {
        let (m, _) = with_peft(dir);
        let exp = load_map(&fixtures().join(dir).join("expected.safetensors"));
        let (ids, mask) = (rows(&exp[ids_key]), rows(&exp[mask_key]));
        let want = exp.get("logits_both").unwrap_or(&exp["logits"]).clone();
        let logits = m.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
        let d = max_abs(&logits, &want);
        assert!(d < 1e-4, "{dir}: logits differ from PEFT's by {d}");
        if let Some(merged) = exp.get("logits_merged") {
            let mut m = m.clone();
            for l in m.linears_mut() {
                l.merge().unwrap();
            }
            let d = max_abs(&m.forward(&ids, &mask, None, &Ctx::eval()).unwrap(), merged);
            assert!(d < 1e-4, "{dir}: merged logits differ from PEFT's by {d}");
        }
    }
}

/// Each method's default settings (as `deltatune train` writes them for a decoder).
fn method_configs() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        (
            "lora",
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                   "target_modules": "all-linear", "modules_to_save": null}),
        ),
        (
            "ia3",
            json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                   "feedforward_modules": ["down_proj"], "modules_to_save": null}),
        ),
        (
            "prefix",
            json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3,
                   "prefix_projection": true, "encoder_hidden_size": 16, "modules_to_save": null}),
        ),
        (
            "prompt",
            json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "modules_to_save": null}),
        ),
        (
            "adapter",
            json!({"peft_type": "BOTTLENECK_ADAPTER", "reduction_factor": 8,
                   "modules_to_save": null}),
        ),
        (
            "intrinsic",
            json!({"peft_type": "INTRINSIC_PROMPT", "num_virtual_tokens": 3,
                   "intrinsic_dim": 4, "modules_to_save": null}),
        ),
    ]
}

/// UniPELT on the decoder: gated LoRA + prefix + Pfeiffer adapter.
fn unipelt() -> DeltaConfig {
    let members: Vec<DeltaConfig> = ["lora", "prefix", "adapter"]
        .iter()
        .map(|n| {
            let (_, v) = method_configs().into_iter().find(|(m, _)| m == n).unwrap();
            let mut v = v;
            if *n == "lora" {
                // Gates read the hidden states: LoRA on the attention inputs, as UniPELT does.
                v["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
            }
            DeltaConfig::from_json(v).unwrap()
        })
        .collect();
    let mut c = ComposeConfig::new(members, true);
    c.common.modules_to_save = None;
    c.common.task_type = Some("CAUSAL_LM".into());
    DeltaConfig::Compose(c)
}

/// Next-token cross-entropy on the fixture batch.
fn lm_loss(m: &Decoder) -> Tensor {
    let exp = load_map(&fixtures().join("tiny-llama/expected.safetensors"));
    let ids = rows(&exp["input_ids"]);
    let mask = rows(&exp["attention_mask"]);
    let logits = m
        .forward(&ids, &mask, None, &Ctx::train(Rng::new(3)))
        .unwrap();
    let t = logits.dim(1).unwrap();
    let (b, n) = (ids.len(), ids[0].len());
    // The last n positions are the tokens' (prompt vectors come first); predict token j + 1.
    let logits = logits
        .narrow(1, t - n, n - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b * (n - 1), 96))
        .unwrap();
    let targets: Vec<u32> = ids.iter().flat_map(|r| r[1..].to_vec()).collect();
    let targets = Tensor::from_vec(targets, b * (n - 1), logits.device()).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

#[test]
fn every_method_trains_every_parameter_on_the_decoder() {
    let base = tiny_llama();
    let exp = load_map(&fixtures().join("tiny-llama/expected.safetensors"));
    let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
    let base_logits = base.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
    let mut all: Vec<(&str, DeltaConfig)> = method_configs()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                DeltaConfig::from_json(v).unwrap_or_else(|e| panic!("{n}: {e}")),
            )
        })
        .collect();
    all.push(("unipelt", unipelt()));
    for (name, cfg) in all {
        let mut m = base.clone();
        let tr = cfg
            .attach(&mut m, &Rng::new(1), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!tr.is_empty(), "{name}: nothing to train");
        if name == "lora" || name == "adapter" {
            // Zero-initialised up-projections: the decoder's output is unchanged.
            let logits = m.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
            let d = max_abs(&logits, &base_logits);
            assert!(
                d < 1e-5,
                "{name}: zero-init delta changed the logits by {d}"
            );
        }
        // Make zero-initialised tensors non-zero so everything behind them gets a gradient.
        for part in ["lora_B", "up", "gate"] {
            randomise(&tr, part, 7, 0.1);
        }
        let grads = lm_loss(&m).backward().unwrap();
        for t in &tr {
            let g = grads
                .get(t.var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {}", t.key));
            assert!(abs_sum(g) > 0.0, "{name}: zero gradient for {}", t.key);
        }
        for l in m.linears() {
            assert!(
                grads.get(&l.weight).is_none(),
                "{name}: frozen {} received a gradient",
                l.path
            );
        }
    }
}

#[test]
fn bitfit_on_a_model_without_biases_is_refused_by_name() {
    let cfg = DeltaConfig::from_json(serde_json::json!({"peft_type": "BITFIT"})).unwrap();
    let mut m = tiny_llama();
    let err = cfg
        .attach(&mut m, &Rng::new(0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no bias"), "{err}");
}

/// Generation batches left-pad their prompts: with every method's delta attached (non-zero),
/// a prompt's last-position logits are the same alone and left-padded in a batch, in the full
/// forward and in the cached generation path (prefill, then one step).
#[test]
fn left_padding_leaves_each_methods_logits_unchanged() {
    let base = tiny_llama();
    let mut all: Vec<(&str, DeltaConfig)> = method_configs()
        .into_iter()
        .map(|(n, v)| (n, DeltaConfig::from_json(v).unwrap()))
        .collect();
    all.push(("unipelt", unipelt()));
    let short: Vec<u32> = vec![5, 17, 30];
    let long: Vec<u32> = vec![8, 9, 40, 41, 60, 61];
    let pad = (long.len() - short.len()) as u32;
    let last = |m: &Decoder, h: &Tensor, ctx: &Ctx| -> Vec<Vec<f32>> {
        let t = h.dim(1).unwrap();
        m.logits(&h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap(), ctx)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for (name, cfg) in all {
        let mut m = base.clone();
        let tr = cfg.attach(&mut m, &Rng::new(1), None).unwrap();
        for part in ["lora_B", "up", "gate"] {
            randomise(&tr, part, 7, 0.1);
        }
        for ctx in [Ctx::eval(), Ctx::inference()] {
            // Alone: prefill, then one step with token 3.
            let mut c1 = deltatune_models::KvCache::default();
            let h = m
                .forward_hidden(
                    std::slice::from_ref(&short),
                    &[vec![1; short.len()]],
                    Some(&mut c1),
                    &ctx,
                )
                .unwrap();
            let alone0 = last(&m, &h, &ctx).remove(0);
            let h = m
                .forward_hidden(&[vec![3]], &[vec![1]], Some(&mut c1), &ctx)
                .unwrap();
            let alone1 = last(&m, &h, &ctx).remove(0);
            // Left-padded beside a longer prompt.
            let mut padded = vec![0u32; pad as usize];
            padded.extend(&short);
            let mut mask = vec![0u32; pad as usize];
            mask.extend(vec![1u32; short.len()]);
            let mut c2 = deltatune_models::KvCache::default();
            let h = m
                .forward_hidden(
                    &[long.clone(), padded],
                    &[vec![1; long.len()], mask],
                    Some(&mut c2),
                    &ctx,
                )
                .unwrap();
            let b0 = last(&m, &h, &ctx).remove(1);
            let h = m
                .forward_hidden(
                    &[vec![4], vec![3]],
                    &[vec![1], vec![1]],
                    Some(&mut c2),
                    &ctx,
                )
                .unwrap();
            let b1 = last(&m, &h, &ctx).remove(1);
            let (d0, d1) = (diff(&alone0, &b0), diff(&alone1, &b1));
            assert!(
                d0 < 1e-4 && d1 < 1e-4,
                "{name}: left padding changed the logits by {d0} (prefill) and {d1} (next step)"
            );
        }
    }
}
