//! Several LoRA adapters on one base, chosen per batch row (the serving case): a batch mixing
//! adapters gives each row what its adapter alone gives (PEFT adapters of the tiny Llama,
//! fixtures of scripts/gen_combine_fixtures.py), and rows of the base get the base's output.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::{fixtures, load_map, max_abs};
use deltatune_core::{Ctx, Rng};
use deltatune_methods::lora::multi::attach_multi;
use deltatune_methods::{load_state_dict, DeltaConfig, LoraConfig};
use deltatune_models::Decoder;

fn source(name: &str) -> (LoraConfig, BTreeMap<String, Tensor>) {
    let d = fixtures().join("tiny-llama-combine").join(name);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap();
    (
        serde_json::from_value(v).unwrap(),
        load_map(&d.join("adapter_model.safetensors")),
    )
}

fn tiny() -> Decoder {
    Decoder::load(&fixtures().join("tiny-llama")).unwrap()
}

#[test]
fn mixed_adapter_batch_equals_each_adapter_alone() {
    let exp = load_map(&fixtures().join("tiny-llama-combine/expected.safetensors"));
    let rows = |t: &Tensor| -> Vec<Vec<u32>> { t.to_dtype(DType::U32).unwrap().to_vec2().unwrap() };
    let (ids, mask) = (rows(&exp["input_ids"]), rows(&exp["attention_mask"]));
    // Four rows: the two inputs under adapters a, e (rank and alpha patterns), the base, c.
    let names = ["a", "e", "c"];
    let batch_ids = vec![
        ids[0].clone(),
        ids[1].clone(),
        ids[0].clone(),
        ids[1].clone(),
    ];
    let batch_mask = vec![
        mask[0].clone(),
        mask[1].clone(),
        mask[0].clone(),
        mask[1].clone(),
    ];
    let route = vec![0u32, 1, u32::MAX, 2];
    let sources: Vec<_> = names.iter().map(|n| source(n)).collect();
    let mut multi = tiny();
    let sites = attach_multi(&mut multi, &sources).unwrap();
    assert_eq!(sites, 6, "q, v and down_proj of both layers");
    let ctx = Ctx::inference().with_adapter_rows(route.clone());
    let mixed = multi.forward(&batch_ids, &batch_mask, None, &ctx).unwrap();
    for (row, &k) in route.iter().enumerate() {
        let mut alone = tiny();
        if k != u32::MAX {
            let (cfg, tensors) = &sources[k as usize];
            let d = DeltaConfig::Lora(cfg.clone());
            let tr = d.attach_saved(&mut alone, &Rng::new(0)).unwrap();
            load_state_dict(&tr, tensors, std::path::Path::new("x")).unwrap();
        }
        let want = alone
            .forward(
                std::slice::from_ref(&batch_ids[row]),
                std::slice::from_ref(&batch_mask[row]),
                None,
                &Ctx::inference(),
            )
            .unwrap();
        let got = mixed.narrow(0, row, 1).unwrap();
        let d = max_abs(&got, &want);
        assert!(d < 1e-5, "row {row} (adapter {k}): {d}");
    }
    // The adapters do change the rows (a row is not just the base).
    let base = tiny()
        .forward(&batch_ids, &batch_mask, None, &Ctx::inference())
        .unwrap();
    assert!(
        max_abs(
            &mixed.narrow(0, 0, 1).unwrap(),
            &base.narrow(0, 0, 1).unwrap()
        ) > 1e-3
    );
    assert_eq!(
        max_abs(
            &mixed.narrow(0, 2, 1).unwrap(),
            &base.narrow(0, 2, 1).unwrap()
        ),
        0.0
    );
    // Without the routing the layer says what is missing.
    let e = multi
        .forward(&batch_ids, &batch_mask, None, &Ctx::inference())
        .unwrap_err()
        .to_string();
    assert!(e.contains("with_adapter_rows"), "{e}");
}

/// Greedy generation of a batch mixing adapters gives each prompt the tokens its adapter alone
/// gives.
#[test]
fn mixed_adapter_greedy_generation_equals_each_adapter_alone() {
    use deltatune_models::decoder::{GenerateConfig, Generator};
    let names = ["a", "b", "c", "e"];
    let sources: Vec<_> = names.iter().map(|n| source(n)).collect();
    let mut multi = tiny();
    attach_multi(&mut multi, &sources).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42, 9],
        vec![11, 3],
        vec![5, 17, 42, 9],
        vec![60, 61, 62, 63, 64],
        vec![7, 8, 9],
    ];
    let route = [0u32, 1, u32::MAX, 2, 3];
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        ..GenerateConfig::default()
    };
    let g = Generator {
        model: &multi,
        decode: None,
    };
    let mixed = g
        .generate_routed(&prompts, Some(&route), &cfg, &mut |_, _| true)
        .unwrap();
    let mut differs = false;
    for (i, &k) in route.iter().enumerate() {
        let mut alone = tiny();
        if k != u32::MAX {
            let (c, t) = &sources[k as usize];
            let tr = DeltaConfig::Lora(c.clone())
                .attach_saved(&mut alone, &Rng::new(0))
                .unwrap();
            load_state_dict(&tr, t, std::path::Path::new("x")).unwrap();
        }
        let g = Generator {
            model: &alone,
            decode: None,
        };
        let want = g
            .generate(std::slice::from_ref(&prompts[i]), &cfg, &mut |_, _| true)
            .unwrap();
        assert_eq!(mixed[i].ids, want[0].ids, "prompt {i} (adapter {k})");
        differs |= i == 0 && mixed[0].ids != mixed[2].ids;
    }
    assert!(
        differs,
        "adapter a changes the greedy continuation of prompt 0"
    );
}

/// Classifiers: LoRA adapters with their own trained heads (folders PEFT wrote for the tiny
/// BERT, scripts/gen_peft_folders.py) in one batch, each row with its adapter's LoRA and head,
/// give PEFT's probabilities for that adapter.
#[test]
fn mixed_classifier_batch_gives_each_adapters_peft_probabilities() {
    use deltatune_models::{BertClassifier, Inputs, Pooling, TextTokenizer};
    let dir = fixtures().join("peft-folders");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let texts: Vec<&str> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let names = [
        "lora",
        "lora-regex",
        "lora-rslora",
        "lora-patterns",
        "lora-layers",
    ];
    let sources: Vec<_> = names
        .iter()
        .map(|n| {
            let d = dir.join(n);
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(d.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            (
                serde_json::from_value::<LoraConfig>(v).unwrap(),
                load_map(&d.join("adapter_model.safetensors")),
            )
        })
        .collect();
    let base = dir.join("base");
    let mut model = BertClassifier::load(&base, 3, Pooling::Cls, &mut Rng::new(0)).unwrap();
    attach_multi(&mut model, &sources).unwrap();
    let tok = TextTokenizer::load(&base.join("tokenizer.json"), 64).unwrap();
    // Every (adapter, text) pair in one batch, shuffled so adapters interleave.
    let mut pairs: Vec<(usize, usize)> = (0..names.len())
        .flat_map(|k| (0..texts.len()).map(move |t| (k, t)))
        .collect();
    pairs.sort_by_key(|&(k, t)| (t * 7 + k * 3) % 11);
    let ids: Vec<Vec<u32>> = pairs
        .iter()
        .map(|&(_, t)| tok.encode_batch(&[texts[t]]).unwrap().remove(0))
        .collect();
    let inputs = Inputs::from_ids(&ids, 0).unwrap();
    let route: Vec<u32> = pairs.iter().map(|&(k, _)| k as u32).collect();
    // One adapter row short: the heads (and branches) refuse rather than misroute.
    let e = model
        .forward(
            &inputs,
            &Ctx::inference().with_adapter_rows(route[1..].to_vec()),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "{} adapter rows for a batch of {}",
            route.len() - 1,
            route.len()
        )),
        "{e}"
    );
    let logits = model
        .forward(&inputs, &Ctx::inference().with_adapter_rows(route))
        .unwrap();
    let probs: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (row, &(k, t)) in pairs.iter().enumerate() {
        let want = exp[names[k]][t].as_array().unwrap();
        for (g, w) in probs[row].iter().zip(want) {
            let d = (f64::from(*g) - w.as_f64().unwrap()).abs();
            assert!(
                d < 1e-5,
                "{} on text {t}: {:?} vs PEFT's {want:?}",
                names[k],
                probs[row]
            );
        }
    }
}
