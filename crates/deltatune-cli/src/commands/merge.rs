//! `deltatune merge`: folds a mergeable delta (LoRA, IA3, BitFit, or an ungated composition of
//! those) into the base weights and writes a plain Hugging Face model folder, as PEFT's
//! `merge_and_unload()` + `save_pretrained()` do. Other methods get an error saying why.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use deltatune_core::Ctx;
use deltatune_data::images::{ImageExample, ImageSet, ImageSource, Preprocess};
use deltatune_data::text::LabelMap;
use deltatune_models::vit::VitFamily;
use deltatune_models::{Backbone, BertClassifier, VitClassifier};
use deltatune_train::artifact::{check_output_folder, OutputRules, Staging};
use deltatune_train::image::ImageExamples;

use crate::session;

/// Texts used to check that the written model reproduces the adapter.
const CHECK_TEXTS: &[&str] = &[
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate cliches from start to finish.",
    "it is what it is.",
];

pub fn merge(adapter: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let rules = OutputRules::new("--output", overwrite).input("--adapter", adapter);
    check_output_folder(out, &rules)?;
    let cfg_text = std::fs::read_to_string(adapter.join(deltatune_train::artifact::ADAPTER_CONFIG))
        .with_context(|| format!("reading the adapter config in {}", adapter.display()))?;
    let delta = deltatune_methods::DeltaConfig::from_json(serde_json::from_str(&cfg_text)?)?;
    if let Some(why) = delta.merge_blocker() {
        bail!(
            "cannot merge the `{}` adapter in {}: {why}",
            delta.name(),
            adapter.display()
        );
    }
    let v: serde_json::Value = serde_json::from_str(&cfg_text)?;
    if v["task_type"].as_str() == Some("CAUSAL_LM") {
        return merge_decoder(adapter, out, delta.name(), &rules);
    }
    if super::image::is_image_adapter(adapter) {
        return merge_image(adapter, out, delta.name(), &rules);
    }
    let mut run = session::load_adapter(adapter)?;
    let refs: Vec<&str> = CHECK_TEXTS.to_vec();
    let ids = run.loaded.tokenizer.encode_batch(&refs)?;
    let before = deltatune_train::predict_proba(&run.loaded.model, &ids, 64)?;
    let tensors = fold_into_weights(&mut run.loaded.model)?;
    // config.json: the base model's, with the label set of the adapter.
    let base_dir = &run.run.model_dir;
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base_dir.join("config.json"))
            .with_context(|| format!("reading {}", base_dir.join("config.json").display()))?,
    )?;
    let n = run.labels.len();
    set_labels(&mut config, &run.labels, "BertForSequenceClassification");
    let staging = Staging::create(out, &rules.clone().input("the base model", base_dir))?;
    staging.write(
        "model.safetensors",
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    staging.write_json("config.json", &config)?;
    for extra in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        let src = base_dir.join(extra);
        if src.exists() {
            staging.write(extra, &std::fs::read(&src)?)?;
        }
    }
    run.labels
        .save(&staging.file(deltatune_train::artifact::LABELS))?;
    let dir = staging.commit()?;
    // Reload the written folder as a plain model and compare with the adapter.
    let plain = BertClassifier::load(
        &dir,
        n,
        run.run.settings.pooling,
        &mut deltatune_core::Rng::new(0),
    )?;
    let _ = Ctx::eval();
    let after = deltatune_train::predict_proba(&plain, &ids, 64)?;
    let diff = max_abs_diff(&before, &after);
    check_merged(&dir, diff, 1e-4, "probability")?;
    println!(
        "merged `{}` into the weights: {} written (max probability difference to the adapter \
         {diff:.1e} on {} check texts)",
        delta.name(),
        dir.display(),
        CHECK_TEXTS.len()
    );
    Ok(())
}

/// The label set of a classifier in its Hugging Face `config.json`: `id2label`, `label2id`,
/// `num_labels` and the head's class in `architectures`.
fn set_labels(config: &mut serde_json::Value, labels: &LabelMap, architecture: &str) {
    let n = labels.len();
    let name = |i: usize| labels.label(i as u32).unwrap_or("?").to_string();
    let id2label: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (i.to_string(), name(i).into())).collect();
    let label2id: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (name(i), i.into())).collect();
    config["id2label"] = id2label.into();
    config["label2id"] = label2id.into();
    config["num_labels"] = n.into();
    config["architectures"] = serde_json::json!([architecture]);
}

/// Deterministic 28 x 28 grey check images (stripes, a gradient, a checkerboard) for the
/// comparison of a merged image model with its adapter.
fn check_images(classes: Arc<[String]>) -> ImageSet {
    let (w, h) = (28, 28);
    let patterns: [fn(usize, usize) -> u8; 3] = [
        |x, _| if (x / 4) % 2 == 0 { 230 } else { 20 },
        |x, y| ((x + y) * 255 / 54) as u8,
        |x, y| if (x / 7 + y / 7) % 2 == 0 { 200 } else { 60 },
    ];
    let pixels: Vec<u8> = patterns
        .iter()
        .flat_map(|f| (0..h).flat_map(move |y| (0..w).map(move |x| f(x, y))))
        .collect();
    let pixels: Arc<[u8]> = pixels.into();
    ImageSet {
        split: "check".into(),
        origin: "merge check images".into(),
        classes,
        channels: 1,
        examples: (0..patterns.len())
            .map(|i| ImageExample {
                source: ImageSource::Memory {
                    pixels: pixels.clone(),
                    offset: i * w * h,
                    width: w,
                    height: h,
                },
                label: 0,
            })
            .collect(),
    }
}

/// Folds an image adapter (LoRA, IA3, BitFit, or the trained weights of the linear probe and
/// full fine-tuning) into the ViT and writes a Hugging Face `...ForImageClassification` folder
/// with the adapter's labels and a `preprocessor_config.json` of its preprocessing (image size
/// included); then reloads it and checks its probabilities against the adapter's.
fn merge_image(adapter: &Path, out: &Path, name: &str, rules: &OutputRules) -> Result<()> {
    let mut run = super::image::load_image_adapter(adapter)?;
    let set = Arc::new(check_images(run.labels_arc()));
    let ex = ImageExamples::new(set.clone(), run.preprocess.clone(), None)?;
    let before = deltatune_train::predict_proba(&run.model, &ex, 8)?;
    let tensors = fold_into_weights(&mut run.model)?;
    let base_dir = &run.model_dir;
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base_dir.join("config.json"))
            .with_context(|| format!("reading {}", base_dir.join("config.json").display()))?,
    )?;
    let architecture = match run.model.config.family {
        VitFamily::Dinov2 => "Dinov2ForImageClassification",
        VitFamily::Vit => "ViTForImageClassification",
    };
    set_labels(&mut config, &run.labels, architecture);
    let staging = Staging::create(out, &rules.clone().input("the base model", base_dir))?;
    staging.write(
        "model.safetensors",
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    staging.write_json("config.json", &config)?;
    staging.write_json("preprocessor_config.json", &run.preprocess.to_hf_json())?;
    run.labels
        .save(&staging.file(deltatune_train::artifact::LABELS))?;
    let dir = staging.commit()?;
    let plain = VitClassifier::load(&dir, run.labels.len(), &mut deltatune_core::Rng::new(0))?;
    let pre = Preprocess::from_hf_config(
        &dir.join("preprocessor_config.json"),
        plain.config.num_channels,
    )?;
    let set_len = set.len();
    let ex = ImageExamples::new(set, pre, None)?;
    let after = deltatune_train::predict_proba(&plain, &ex, 8)?;
    let diff = max_abs_diff(&before, &after);
    check_merged(&dir, diff, 1e-4, "probability")?;
    println!(
        "merged `{name}` into the weights: {} written ({architecture}, max probability \
         difference to the adapter {diff:.1e} on {} check images)",
        dir.display(),
        set_len
    );
    Ok(())
}

/// Folds a decoder adapter into its (dequantized) base and writes a Hugging Face folder of its family
/// (`config.json`, `model.safetensors` in f32, `tokenizer.json`), then reloads it and checks its
/// logits against the adapter's.
fn merge_decoder(adapter: &Path, out: &Path, name: &str, rules: &OutputRules) -> Result<()> {
    let cache = deltatune_data::assets::default_cache_dir();
    let mut d = super::lm::load_with_adapter(adapter, None, &cache)?;
    let prompt = "Pronounce: deltatune\nPhonemes:";
    let ids = d.encode(prompt, true)?;
    let mask = vec![vec![1u32; ids.len()]];
    let before = d
        .model
        .forward(std::slice::from_ref(&ids), &mask, None, &Ctx::eval())?;
    let tensors = fold_into_weights(&mut d.model)?;
    let mut config = d.model.config.to_hf_json();
    if !tensors.contains_key("lm_head.weight") {
        config["tie_word_embeddings"] = true.into();
    } else {
        config["tie_word_embeddings"] = false.into();
    }
    let staging = Staging::create(out, rules)?;
    staging.write(
        "model.safetensors",
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    staging.write_json("config.json", &config)?;
    let tok = d
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    staging.write("tokenizer.json", tok.as_bytes())?;
    if let Some(t) = &d.chat_template {
        staging.write_json(
            "tokenizer_config.json",
            &serde_json::json!({"chat_template": t}),
        )?;
    }
    let dir = staging.commit()?;
    let plain = deltatune_models::Decoder::load(&dir)?;
    let after = plain.forward(std::slice::from_ref(&ids), &mask, None, &Ctx::eval())?;
    let diff: f32 = (before - after)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    check_merged(&dir, diff, 1e-3, "logits")?;
    println!(
        "merged `{name}` into the dequantized weights: {} written (max logit difference to the \
         adapter {diff:.1e})",
        dir.display()
    );
    Ok(())
}

/// Folds every linear delta of `model` into its weights; returns the plain model's tensors
/// (contiguous, detached), ready to write.
fn fold_into_weights<M: Backbone>(model: &mut M) -> Result<BTreeMap<String, candle_core::Tensor>> {
    for lin in model.linears_mut() {
        lin.merge()?;
    }
    model
        .named_tensors()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().contiguous()?)))
        .collect()
}

/// The largest difference between two sets of probabilities.
fn max_abs_diff(before: &[Vec<f32>], after: &[Vec<f32>]) -> f32 {
    before
        .iter()
        .flatten()
        .zip(after.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

/// Fails when the written model in `dir` differs from the adapter by more than `limit`.
fn check_merged(dir: &Path, diff: f32, limit: f32, what: &str) -> Result<()> {
    if diff > limit {
        bail!(
            "the merged model in {} differs from the adapter by {diff:.2e} in {what}; please \
             report this",
            dir.display()
        );
    }
    Ok(())
}

/// `deltatune merge --adapters A,B,... [--weights ...] --combination C -o OUT`: combines LoRA
/// adapters of one base into a new LoRA adapter folder (PEFT's `add_weighted_adapter`; see
/// `deltatune_methods::lora::combine`). The first adapter's `run_config.json` and
/// `labels.json` are copied, so the result predicts or generates like it; `combination.json`
/// records the sources and settings.
pub fn combine_adapters(
    adapters: &[std::path::PathBuf],
    weights: &[f64],
    combination: &str,
    density: Option<f64>,
    majority_sign: &str,
    seed: u64,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    use deltatune_methods::lora::combine::{
        combine, Combination, CombineOptions, MajoritySign, SeededMasks, Source,
    };
    use deltatune_train::artifact::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, RUN_CONFIG};
    if adapters.is_empty() {
        bail!("--adapters needs at least one adapter folder");
    }
    let mut rules = OutputRules::new("--output", overwrite);
    for a in adapters {
        rules = rules.input("--adapters", a);
    }
    check_output_folder(out, &rules)?;
    let opts = CombineOptions {
        combination: Combination::parse(combination)?,
        density,
        majority_sign: MajoritySign::parse(majority_sign)?,
    };
    let weights: Vec<f64> = if weights.is_empty() {
        vec![1.0; adapters.len()]
    } else {
        weights.to_vec()
    };
    let mut sources = Vec::new();
    for dir in adapters {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "reading {} (is {} an adapter folder?)",
                cfg_path.display(),
                dir.display()
            )
        })?;
        let delta = deltatune_methods::DeltaConfig::from_json(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", cfg_path.display()))?,
        )
        .with_context(|| format!("reading {}", cfg_path.display()))?;
        let deltatune_methods::DeltaConfig::Lora(config) = delta else {
            bail!(
                "{} holds a `{}` adapter; only LoRA adapters can be combined",
                dir.display(),
                delta.name()
            );
        };
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let w = deltatune_core::Weights::load(&wpath, candle_core::DType::F32)?;
        sources.push(Source {
            name: dir.display().to_string(),
            config,
            tensors: w
                .tensors()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect(),
        });
    }
    let bases: Vec<(&str, &str)> = sources
        .iter()
        .filter_map(|s| {
            s.config
                .common
                .base_model_name_or_path
                .as_deref()
                .map(|b| (s.name.as_str(), b))
        })
        .collect();
    if let Some((n, b)) = bases.iter().find(|(_, b)| *b != bases[0].1) {
        bail!(
            "the adapters are for different base models: {} for `{}`, {n} for `{b}`; combine \
             adapters of one base",
            bases[0].0,
            bases[0].1
        );
    }
    let c = combine(&sources, &weights, &opts, &mut SeededMasks(seed))?;
    let mut cfg = serde_json::to_value(&c.config)?;
    cfg["peft_type"] = "LORA".into();
    let staging = Staging::create(out, &rules)?;
    staging.write_json(ADAPTER_CONFIG, &cfg)?;
    staging.write(
        ADAPTER_WEIGHTS,
        &deltatune_core::to_safetensors_bytes(&c.tensors)?,
    )?;
    for f in [RUN_CONFIG, LABELS] {
        let src = adapters[0].join(f);
        if src.exists() {
            staging.write(f, &std::fs::read(&src)?)?;
        }
    }
    staging.write_json(
        "combination.json",
        &serde_json::json!({
            "adapters": adapters,
            "weights": weights,
            "combination": opts.combination.name(),
            "density": density,
            "majority_sign_method": majority_sign,
            "seed": seed,
            "r": c.config.r,
        }),
    )?;
    let dir = staging.commit()?;
    println!(
        "combined {} adapters ({}, weights {:?}) into {}: LoRA r {}, {} tensors",
        sources.len(),
        opts.combination.name(),
        weights,
        dir.display(),
        c.config.r,
        c.tensors.len()
    );
    Ok(())
}
