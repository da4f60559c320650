//! Delta methods on every decoder family (tests/fixtures/decoders, tiny random checkpoints
//! with each family's quirks): PEFT's CAUSAL_LM LoRA adapters load and give PEFT's logits,
//! merged and unmerged (Phi-3's fused `qkv_proj` / `gate_up_proj` included); every method's
//! trainable parameters receive a gradient and the frozen base none; BitFit trains Qwen2's
//! q/k/v biases and is refused by name where there are none.

mod common;

use candle_core::{DType, Tensor};
use common::{abs_sum, load_map, max_abs, randomise};
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_methods::{load_state_dict, DeltaConfig};
use deltatune_models::Decoder;

const FAMILIES: [&str; 7] = [
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
];

fn dir(name: &str) -> std::path::PathBuf {
    common::fixtures().join("decoders").join(name)
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

/// Attaches the adapter folder `d` (config and weights) to `m`.
fn attach_folder(m: &mut Decoder, d: &std::path::Path) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap();
    let cfg = DeltaConfig::from_json(v).unwrap();
    let tr = cfg.attach_saved(m, &Rng::new(0)).unwrap();
    let path = d.join("adapter_model.safetensors");
    load_state_dict(&tr, &load_map(&path), &path)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
}

/// The fixture batch's logits at real positions (row 1 is right-padded), flattened.
fn real_positions(t: &Tensor, mask: &[Vec<u32>]) -> Tensor {
    let n1 = mask[1].iter().sum::<u32>() as usize;
    Tensor::cat(
        &[
            t.narrow(0, 0, 1).unwrap().flatten_all().unwrap(),
            t.narrow(0, 1, 1)
                .unwrap()
                .narrow(1, 0, n1)
                .unwrap()
                .flatten_all()
                .unwrap(),
        ],
        0,
    )
    .unwrap()
}

/// LoRA adapters deltatune trained and wrote (`<family>-ours`, every linear layer, Phi-3's
/// fused projections included), loaded by PEFT on transformers' model: our logits, from the
/// folder and from the GGUF file, are PEFT's (scripts/gen_decoder_fixtures.py --ours checked
/// that every tensor of the file became PEFT's parameter). The GGUF file is compared where it
/// carries the family's whole configuration (llama.cpp's files drop Mistral's window and Gemma's
/// soft-caps / query scalar: their base fixtures hold `logits_gguf`).
#[test]
fn peft_loads_our_lora_on_every_family_and_gives_our_logits() {
    for fam in FAMILIES {
        let d = dir(&format!("{fam}-ours"));
        let exp = load_map(&d.join("expected.safetensors"));
        let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
        let gguf_differs =
            load_map(&dir(fam).join("expected.safetensors")).contains_key("logits_gguf");
        let mut bases = vec![dir(fam)];
        if !gguf_differs {
            bases.push(dir(fam).join("model.gguf"));
        }
        for base in bases {
            let mut m = Decoder::load(&base).unwrap();
            attach_folder(&mut m, &d);
            let logits = m.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
            let diff = max_abs(
                &real_positions(&logits, &mask),
                &real_positions(&exp["logits"], &mask),
            );
            assert!(
                diff < 1e-4,
                "{fam} ({}): logits differ from PEFT's by {diff}",
                base.display()
            );
        }
    }
}

#[test]
fn peft_lora_on_every_family_gives_peft_logits_merged_and_not() {
    for fam in FAMILIES {
        let d = dir(&format!("{fam}-lora"));
        let mut m = Decoder::load(&dir(fam)).unwrap();
        attach_folder(&mut m, &d);
        let exp = load_map(&d.join("expected.safetensors"));
        let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
        let logits = m.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
        let real = |t: &Tensor| real_positions(t, &mask);
        let d1 = max_abs(&real(&logits), &real(&exp["logits"]));
        assert!(d1 < 1e-4, "{fam}: logits differ from PEFT's by {d1}");
        for l in m.linears_mut() {
            l.merge().unwrap();
        }
        let merged = m.forward(&ids, &mask, None, &Ctx::eval()).unwrap();
        let d2 = max_abs(&real(&merged), &real(&exp["logits_merged"]));
        assert!(d2 < 1e-4, "{fam}: merged logits differ from PEFT's by {d2}");
    }
}

/// Each method as a decoder run configures it (Phi-3's targets renamed to its fused
/// projections, as `deltatune train` does).
fn methods(fused: bool) -> Vec<(&'static str, DeltaConfig)> {
    use serde_json::json;
    let (ia3_t, ia3_ff) = if fused {
        (json!(["qkv_proj", "down_proj"]), json!(["down_proj"]))
    } else {
        (
            json!(["k_proj", "v_proj", "down_proj"]),
            json!(["down_proj"]),
        )
    };
    [
        (
            "lora",
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                   "target_modules": "all-linear", "modules_to_save": null}),
        ),
        (
            "ia3",
            json!({"peft_type": "IA3", "target_modules": ia3_t,
                   "feedforward_modules": ia3_ff, "modules_to_save": null}),
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
    .into_iter()
    .map(|(n, v)| (n, DeltaConfig::from_json(v).unwrap()))
    .collect()
}

/// Next-token cross-entropy on the family's fixture batch.
fn lm_loss(m: &Decoder, fam: &str) -> Tensor {
    let exp = load_map(&dir(fam).join("expected.safetensors"));
    let ids = rows(&exp["input_ids"]);
    let mask = vec![vec![1u32; ids[0].len()]; ids.len()];
    let logits = m
        .forward(&ids, &mask, None, &Ctx::train(Rng::new(3)))
        .unwrap();
    let t = logits.dim(1).unwrap();
    let (b, n, v) = (ids.len(), ids[0].len(), logits.dim(2).unwrap());
    let logits = logits
        .narrow(1, t - n, n - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b * (n - 1), v))
        .unwrap();
    let targets: Vec<u32> = ids.iter().flat_map(|r| r[1..].to_vec()).collect();
    let targets = Tensor::from_vec(targets, b * (n - 1), logits.device()).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

#[test]
fn every_method_trains_every_parameter_on_every_family() {
    for fam in FAMILIES {
        let base = Decoder::load(&dir(fam)).unwrap();
        let fused = base.config.family.fused_projections();
        let mut all = methods(fused);
        if fam == "qwen2" {
            all.push((
                "bitfit",
                DeltaConfig::from_json(
                    serde_json::json!({"peft_type": "BITFIT", "modules_to_save": null}),
                )
                .unwrap(),
            ));
        }
        for (name, cfg) in all {
            let mut m = base.clone();
            let tr = cfg
                .attach(&mut m, &Rng::new(1), None)
                .unwrap_or_else(|e| panic!("{fam} {name}: {e}"));
            assert!(!tr.is_empty(), "{fam} {name}: nothing to train");
            for part in ["lora_B", "up", "gate"] {
                randomise(&tr, part, 7, 0.1);
            }
            let grads = lm_loss(&m, fam).backward().unwrap();
            for t in &tr {
                let g = grads
                    .get(t.var.as_tensor())
                    .unwrap_or_else(|| panic!("{fam} {name}: no gradient for {}", t.key));
                assert!(
                    abs_sum(g) > 0.0,
                    "{fam} {name}: zero gradient for {}",
                    t.key
                );
            }
            for l in m.linears() {
                assert!(
                    grads.get(&l.weight).is_none(),
                    "{fam} {name}: frozen {} received a gradient",
                    l.path
                );
            }
        }
    }
}

#[test]
fn bitfit_is_refused_by_name_on_families_without_biases() {
    for fam in ["llama", "gemma3", "phi3"] {
        let cfg = DeltaConfig::from_json(serde_json::json!({"peft_type": "BITFIT"})).unwrap();
        let mut m = Decoder::load(&dir(fam)).unwrap();
        let err = cfg
            .attach(&mut m, &Rng::new(0), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no bias"), "{fam}: {err}");
    }
}

/// PEFT SEQ_CLS LoRA folders on decoders (`...ForSequenceClassification`, head `score`,
/// pooled at the last real token of right-padded rows) give PEFT's class logits.
#[test]
fn peft_seq_cls_lora_on_decoders_gives_peft_logits() {
    use deltatune_models::decoder::TokenRows;
    use deltatune_models::DecoderClassifier;
    for fam in ["qwen2", "llama"] {
        let d = dir(&format!("{fam}-seqcls-lora"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap();
        let cfg = DeltaConfig::from_json(v).unwrap();
        let mut m = DecoderClassifier::load(&dir(fam), 3, &mut Rng::new(0))
            .unwrap_or_else(|e| panic!("{e}"));
        let tr = cfg.attach_saved(&mut m, &Rng::new(0)).unwrap();
        assert!(
            tr.iter().any(|t| t.key.contains("score")),
            "{fam}: head not trained"
        );
        let path = d.join("adapter_model.safetensors");
        load_state_dict(&tr, &load_map(&path), &path).unwrap_or_else(|e| panic!("{fam}: {e}"));
        let exp = load_map(&d.join("expected.safetensors"));
        let batch = TokenRows {
            ids: rows(&exp["input_ids"]),
            mask: rows(&exp["attention_mask"]),
        };
        let logits = m.forward(&batch, &Ctx::eval()).unwrap();
        let diff = max_abs(&logits, &exp["logits"]);
        assert!(
            diff < 1e-4,
            "{fam}: class logits differ from PEFT's by {diff}"
        );
    }
}
