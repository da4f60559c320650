//! Adapter arithmetic against PEFT's `add_weighted_adapter` (fixtures written by
//! scripts/gen_combine_fixtures.py on LoRA adapters of the tiny Llama): every combination gives
//! PEFT's tensors to 1e-5 and, loaded on the model, PEFT's logits; DARE replays PEFT's masks.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::{fixtures, load_map, max_abs};
use deltatune_core::{Ctx, Rng};
use deltatune_methods::lora::combine::{
    combine, Combination, CombineOptions, KeepMasks, MajoritySign, SeededMasks, Side, Source,
};
use deltatune_methods::{load_state_dict, DeltaConfig, LoraConfig};
use deltatune_models::Decoder;

fn dir() -> std::path::PathBuf {
    fixtures().join("tiny-llama-combine")
}

fn source(name: &str) -> Source {
    let d = dir().join(name);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap();
    Source {
        name: name.into(),
        config: serde_json::from_value::<LoraConfig>(v).unwrap(),
        tensors: load_map(&d.join("adapter_model.safetensors")),
    }
}

/// PEFT's recorded Bernoulli masks of one case.
struct FixtureMasks<'a> {
    case: String,
    names: Vec<String>,
    expected: &'a BTreeMap<String, Tensor>,
    used: usize,
}

impl KeepMasks for FixtureMasks<'_> {
    fn keep(
        &mut self,
        module: &str,
        side: Side,
        adapter: usize,
        n: usize,
        _density: f64,
    ) -> deltatune_core::Result<Vec<bool>> {
        let key = format!(
            "{}/mask/{module}.lora_{side:?}.{}",
            self.case, self.names[adapter]
        );
        let m = self
            .expected
            .get(&key)
            .unwrap_or_else(|| panic!("no mask {key} in the fixture"));
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.len(), n, "{key}");
        self.used += 1;
        Ok(v.into_iter().map(|x| x != 0.0).collect())
    }
}

fn tiny_llama_logits(
    c: &deltatune_methods::lora::combine::Combined,
    exp: &BTreeMap<String, Tensor>,
) -> Tensor {
    let cfg = DeltaConfig::Lora(c.config.clone());
    let mut m = Decoder::load(&fixtures().join("tiny-llama")).unwrap();
    let tr = cfg.attach_saved(&mut m, &Rng::new(0)).unwrap();
    load_state_dict(&tr, &c.tensors, std::path::Path::new("combined")).unwrap();
    let rows = |t: &Tensor| -> Vec<Vec<u32>> { t.to_dtype(DType::U32).unwrap().to_vec2().unwrap() };
    m.forward(
        &rows(&exp["input_ids"]),
        &rows(&exp["attention_mask"]),
        None,
        &Ctx::eval(),
    )
    .unwrap()
}

#[test]
fn every_combination_matches_peft() {
    let exp = load_map(&dir().join("expected.safetensors"));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 9);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let names: Vec<String> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let sources: Vec<Source> = names.iter().map(|n| source(n)).collect();
        let weights: Vec<f64> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let opts = CombineOptions {
            combination: Combination::parse(case["combination"].as_str().unwrap()).unwrap(),
            density: case["density"].as_f64(),
            majority_sign: case["majority_sign_method"]
                .as_str()
                .map_or(MajoritySign::Total, |s| MajoritySign::parse(s).unwrap()),
        };
        let mut masks = FixtureMasks {
            case: name.into(),
            names: names.clone(),
            expected: &exp,
            used: 0,
        };
        let c = combine(&sources, &weights, &opts, &mut masks).unwrap();
        let n_masks = exp
            .keys()
            .filter(|k| k.starts_with(&format!("{name}/mask/")))
            .count();
        assert_eq!(masks.used, n_masks, "{name}: every PEFT mask replayed");
        assert_eq!(c.config.r as u64, case["r"].as_u64().unwrap(), "{name}");
        assert_eq!(
            c.config.lora_alpha,
            case["lora_alpha"].as_f64().unwrap(),
            "{name}"
        );
        let want_targets: Vec<String> =
            serde_json::from_value(case["target_modules"].clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&c.config.target_modules).unwrap(),
            serde_json::to_value(&want_targets).unwrap(),
            "{name}"
        );
        let keys: Vec<&str> = case["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            c.tensors.keys().map(String::as_str).collect::<Vec<_>>(),
            keys,
            "{name}"
        );
        for k in keys {
            let d = max_abs(&c.tensors[k], &exp[&format!("{name}/{k}")]);
            assert!(d < 1e-5, "{name}: {k} differs from PEFT's by {d}");
        }
        let d = max_abs(
            &tiny_llama_logits(&c, &exp),
            &exp[&format!("{name}/logits")],
        );
        assert!(d < 1e-4, "{name}: logits differ from PEFT's by {d}");
    }
}

/// PEFT's LoRA folders load and give PEFT's logits, including `rank_pattern` (a per-module
/// rank, first matching key wins) and `alpha_pattern`, and rsLoRA.
#[test]
fn peft_sources_with_rank_and_alpha_patterns_give_peft_logits() {
    let exp = load_map(&dir().join("expected.safetensors"));
    for name in ["a", "b", "c", "d", "e"] {
        let s = source(name);
        let c = deltatune_methods::lora::combine::Combined {
            config: s.config,
            tensors: s.tensors,
        };
        let d = max_abs(
            &tiny_llama_logits(&c, &exp),
            &exp[&format!("source/{name}/logits")],
        );
        assert!(d < 1e-4, "{name}: logits differ from PEFT's by {d}");
    }
    let e = source("e").config;
    assert_eq!(e.rank_for("model.layers.0.self_attn.v_proj").unwrap(), 2);
    assert_eq!(e.rank_for("model.layers.1.self_attn.q_proj").unwrap(), 6);
    assert_eq!(e.rank_for("model.layers.0.self_attn.q_proj").unwrap(), 4);
    assert_eq!(
        e.scale_for("model.layers.0.mlp.down_proj").unwrap(),
        3.0 / 4.0
    );
    assert_eq!(e.max_rank(), 6);
}

/// `cat` is exact: the combined adapter's weight change is the weighted sum of the sources'.
#[test]
fn cat_is_the_weighted_sum_of_the_updates() {
    let sources: Vec<Source> = ["a", "b", "d"].iter().map(|n| source(n)).collect();
    let w = [0.6, -1.5, 2.0];
    let opts = CombineOptions {
        combination: Combination::Cat,
        density: None,
        majority_sign: MajoritySign::Total,
    };
    let c = combine(&sources, &w, &opts, &mut SeededMasks(0)).unwrap();
    let module = "base_model.model.model.layers.1.self_attn.v_proj";
    let delta = |t: &BTreeMap<String, Tensor>, scale: f64| {
        let a = &t[&format!("{module}.lora_A.weight")];
        let b = &t[&format!("{module}.lora_B.weight")];
        (b.matmul(a).unwrap() * scale).unwrap()
    };
    let mut want = (delta(&sources[0].tensors, sources[0].config.scale()) * w[0]).unwrap();
    for (s, w) in sources.iter().zip(w).skip(1) {
        want = (want + (delta(&s.tensors, s.config.scale()) * w).unwrap()).unwrap();
    }
    let got = delta(&c.tensors, c.config.scale());
    assert!(max_abs(&got, &want) < 1e-5);
}

/// DARE with seeded masks: deterministic, keeps about `density` of the values, and a density of
/// 1 is `linear`.
#[test]
fn seeded_dare_is_deterministic_and_keeps_the_density() {
    let sources: Vec<Source> = ["a", "c"].iter().map(|n| source(n)).collect();
    let w = [0.5, 0.5];
    let opts = |d| CombineOptions {
        combination: Combination::DareLinear,
        density: Some(d),
        majority_sign: MajoritySign::Total,
    };
    let one = combine(&sources, &w, &opts(0.3), &mut SeededMasks(7)).unwrap();
    let two = combine(&sources, &w, &opts(0.3), &mut SeededMasks(7)).unwrap();
    let other = combine(&sources, &w, &opts(0.3), &mut SeededMasks(8)).unwrap();
    let (mut zeros, mut total, mut differs) = (0usize, 0usize, false);
    for (k, t) in &one.tensors {
        assert_eq!(max_abs(t, &two.tensors[k]), 0.0, "{k}");
        differs |= max_abs(t, &other.tensors[k]) > 0.0;
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        zeros += v.iter().filter(|x| **x == 0.0).count();
        total += v.len();
    }
    assert!(differs, "another seed draws other masks");
    // An element is zero when both sources dropped it: (1 - 0.3)^2 = 0.49.
    let frac = zeros as f64 / total as f64;
    assert!((frac - 0.49).abs() < 0.05, "{frac}");
    let full = combine(&sources, &w, &opts(1.0), &mut SeededMasks(7)).unwrap();
    let lin = combine(
        &sources,
        &w,
        &CombineOptions {
            combination: Combination::Linear,
            density: None,
            majority_sign: MajoritySign::Total,
        },
        &mut SeededMasks(7),
    )
    .unwrap();
    for (k, t) in &full.tensors {
        assert_eq!(max_abs(t, &lin.tensors[k]), 0.0, "{k}");
    }
}

#[test]
fn bad_combinations_are_refused_by_name() {
    let s = |n: &str| source(n);
    let opts = |c| CombineOptions {
        combination: c,
        density: None,
        majority_sign: MajoritySign::Total,
    };
    let err = |r: deltatune_core::Result<_>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(combine(
        &[s("a"), s("d")],
        &[1.0, 1.0],
        &opts(Combination::Linear),
        &mut SeededMasks(0),
    ));
    assert!(e.contains("a r 4, d r 2") && e.contains("cat"), "{e}");
    let e = err(combine(
        &[s("a"), s("b")],
        &[1.0, 1.0],
        &opts(Combination::Ties),
        &mut SeededMasks(0),
    ));
    assert!(e.contains("needs a density"), "{e}");
    // A density outside (0, 1] is refused (2 acted as `linear`, 0 wrote an all-zero adapter),
    // and so is a density that the combination would ignore.
    for (c, d, want) in [
        (Combination::Ties, 2.0, "outside (0, 1]"),
        (Combination::DareLinear, 0.0, "outside (0, 1]"),
        (Combination::MagnitudePrune, -0.5, "outside (0, 1]"),
        (Combination::DareTies, f64::NAN, "outside (0, 1]"),
        (Combination::Linear, 0.5, "does not use a density"),
        (Combination::Cat, 0.5, "does not use a density"),
    ] {
        let e = err(combine(
            &[s("a"), s("b")],
            &[1.0, 1.0],
            &CombineOptions {
                combination: c,
                density: Some(d),
                majority_sign: MajoritySign::Total,
            },
            &mut SeededMasks(0),
        ));
        assert!(e.contains(want) && e.contains("density"), "{c:?} {d}: {e}");
    }
    let e = err(combine(
        &[s("a"), s("b")],
        &[1.0],
        &opts(Combination::Linear),
        &mut SeededMasks(0),
    ));
    assert!(e.contains("1 weights for 2 adapters"), "{e}");
    let e = Combination::parse("ties_svd").unwrap_err().to_string();
    assert!(e.contains("SVD variants"), "{e}");
    // Adapters of different bases: shapes disagree, named.
    let mut other = s("b");
    for t in other.tensors.values_mut() {
        let (r, c) = t.dims2().unwrap();
        *t = Tensor::zeros((r, c + 1), DType::F32, &candle_core::Device::Cpu).unwrap();
    }
    let e = err(combine(
        &[s("a"), other],
        &[1.0, 1.0],
        &opts(Combination::Cat),
        &mut SeededMasks(0),
    ));
    assert!(
        e.contains("not of one base model") && e.contains("module `"),
        "{e}"
    );
}
