use std::time::Instant;

use anyhow::Result;
use deltatune_data::text::LabelMap;
use deltatune_models::{DecoderClassifier, SequenceClassifier, TextBackbone};
use deltatune_train::artifact::{Staging, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, RUN_CONFIG};
use deltatune_train::{train_task_with, ClassificationTask, Encoded, TrainOptions};
use serde_json::json;

use super::resume::RunCheckpoints;
use crate::session::{self, RunConfig, SUBSPACE_FILE};
use crate::settings::Settings;

/// `deltatune train`; with `resume`, continues the run writing `s.output` from its newest
/// checkpoint.
pub fn train(s: &Settings, resume: bool) -> Result<()> {
    if s.task == "generate" {
        return super::lm::train(s, resume);
    }
    if s.task == "image" {
        return super::image::train(s, resume);
    }
    // Fail on an unwritable output or checkpoint folder before spending any time.
    let staging = Staging::create(&s.output, &super::run_output_rules(s))?;
    let ckpt = RunCheckpoints::prepare(s, resume)?;
    let splits = session::load_splits(s)?;
    ckpt.check_data(&super::resume::DataPrint::files(&splits.files)?)?;
    let labels = LabelMap::from_train(&splits.train);
    if super::lm::is_decoder_spec(&s.model) {
        return classify_on_decoder(s, staging, ckpt, splits, labels);
    }
    let model_dir = session::model_dir(&s.model, &s.cache)?;
    let mut loaded = session::load_model(
        &model_dir,
        labels.len(),
        s.pooling,
        s.data.max_length,
        s.train.seed,
    )?;
    let t_tok = Instant::now();
    let train = session::encode(&loaded, &splits.train, &labels, "train")?;
    let dev = session::encode(&loaded, &splits.dev, &labels, "dev")?;
    let test = match &splits.test {
        Some(t) => Some(session::encode(&loaded, t, &labels, "test")?),
        None => None,
    };
    let tok_secs = t_tok.elapsed().as_secs_f64();
    let trainables = session::attach(&mut loaded, s)?;
    let data = Data {
        splits: &splits,
        labels: &labels,
        train: &train,
        dev: &dev,
        test: test.as_ref(),
        tok_secs,
    };
    fit_and_save(
        s,
        staging,
        ckpt,
        &model_dir,
        &loaded.model,
        trainables,
        &s.delta(),
        data,
    )
}

/// A classification run's encoded data.
struct Data<'a> {
    splits: &'a session::Splits,
    labels: &'a LabelMap,
    train: &'a Encoded,
    dev: &'a Encoded,
    test: Option<&'a Encoded>,
    tok_secs: f64,
}

/// `train --task classify` on a decoder (`--model` a GGUF file, a decoder folder or a decoder's
/// short name): the decoder with a `score` head on each text's last token, as transformers'
/// `...ForSequenceClassification`; the head is saved under `modules_to_save: ["score"]`.
fn classify_on_decoder(
    s: &Settings,
    staging: Staging,
    ckpt: RunCheckpoints,
    splits: session::Splits,
    labels: LabelMap,
) -> Result<()> {
    let path = super::lm::decoder_path(&s.model, &s.cache)?;
    let d = super::lm::load(&s.model, &s.cache)?;
    let mut rng = deltatune_core::Rng::new(s.train.seed).derive("head");
    let mut model = DecoderClassifier::new(d.model.clone(), labels.len(), &mut rng)?;
    let t_tok = Instant::now();
    let encode = |examples: &[deltatune_data::text::Example], split: &str| {
        super::lm::encode_for_classifier(&d, s.data.max_length, examples, &labels, split)
    };
    let train = encode(&splits.train, "train")?;
    let dev = encode(&splits.dev, "dev")?;
    let test = match &splits.test {
        Some(t) => Some(encode(t, "test")?),
        None => None,
    };
    let tok_secs = t_tok.elapsed().as_secs_f64();
    let mut delta = s.delta();
    // The decoder's head is `score` (transformers' name), not BERT's `classifier`.
    if delta.modules_to_save() == Some(&["classifier".to_string()][..]) {
        delta = delta.with_modules_to_save(Some(vec!["score".into()]));
    }
    if super::lm::decoder_targets(&mut delta, model.decoder.config.family.fused_projections()) {
        eprintln!(
            "{}: the delta targets {}",
            model.decoder.config.family,
            super::lm::targets_summary(&delta)
        );
    }
    let rng = deltatune_core::Rng::new(s.train.seed).derive(delta.name());
    let trainables = delta.attach(&mut model, &rng, None)?;
    let layers = deltatune_core::sites::use_bf16_where_faster(&mut model, s.train.bf16)?;
    session::report_products(s.train.bf16, layers);
    let data = Data {
        splits: &splits,
        labels: &labels,
        train: &train,
        dev: &dev,
        test: test.as_ref(),
        tok_secs,
    };
    fit_and_save(s, staging, ckpt, &path, &model, trainables, &delta, data)
}

/// Trains the attached delta of `model`, evaluates it on dev and test and writes the adapter
/// folder.
#[allow(clippy::too_many_arguments)]
fn fit_and_save<M: SequenceClassifier + TextBackbone>(
    s: &Settings,
    staging: Staging,
    ckpt: RunCheckpoints,
    model_dir: &std::path::Path,
    model: &M,
    trainables: Vec<deltatune_methods::Trainable>,
    delta: &deltatune_methods::DeltaConfig,
    data: Data<'_>,
) -> Result<()> {
    let Data {
        splits,
        labels,
        train,
        dev,
        test,
        tok_secs,
    } = data;
    let model_dir = model_dir.to_path_buf();
    let optimised: Vec<_> = trainables
        .iter()
        .filter(|t| !s.train.freeze.iter().any(|f| t.key.contains(f.as_str())))
        .cloned()
        .collect();
    if optimised.len() < trainables.len() {
        eprintln!(
            "frozen by train.freeze: {}",
            trainables
                .iter()
                .filter(|t| !optimised.iter().any(|o| o.key == t.key))
                .map(|t| t.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if optimised.is_empty() {
        anyhow::bail!(
            "train.freeze {:?} freezes every trainable parameter: nothing would train",
            s.train.freeze
        );
    }
    let n_train: usize = optimised.iter().map(|t| t.var.elem_count()).sum();
    let n_base = model.param_count();
    eprintln!(
        "model {} ({} parameters, frozen); delta {}: {} trainable parameters ({:.3}% of the model)",
        model_dir.display(),
        n_base,
        s.method,
        n_train,
        100.0 * n_train as f64 / n_base as f64
    );
    eprintln!(
        "data: train {} / dev {} / test {} examples, {} labels (tokenised in {:.1} s)",
        train.len(),
        dev.len(),
        test.as_ref().map_or(0, |t| t.len()),
        labels.len(),
        tok_secs
    );
    let run = RunConfig {
        deltatune_version: env!("CARGO_PKG_VERSION").into(),
        settings: s.clone(),
        model_dir: model_dir.canonicalize().unwrap_or(model_dir.clone()),
        data_files: splits.files.clone(),
        num_labels: labels.len(),
        base_params: n_base,
        trainable_params: n_train,
    };
    staging.write_json(RUN_CONFIG, &run)?;
    labels.save(&staging.file(LABELS))?;
    let task = ClassificationTask { model, train, dev };
    let report = train_task_with(
        &task,
        &optimised,
        &s.train,
        &TrainOptions {
            metrics_log: Some(&ckpt.metrics_log()),
            show_progress: s.progress,
            checkpoints: Some(&ckpt.checkpointing),
        },
    )?;
    ckpt.copy_metrics(&staging)?;
    let (dev_m, _) = deltatune_train::evaluate(model, dev, s.train.eval_batch_size)?;
    let test_m = match test {
        Some(t) => Some(deltatune_train::evaluate(model, t, s.train.eval_batch_size)?.0),
        None => None,
    };
    let mut delta = delta.for_saving(&run.model_dir.display().to_string());
    // A learned subspace travels with the adapter, so the folder is complete on its own.
    if let Some(slot) = delta.subspace_mut() {
        if let Some(src) = slot.clone() {
            let bytes = std::fs::read(&src)
                .map_err(|e| anyhow::anyhow!("reading the subspace artifact {src}: {e}"))?;
            staging.write(SUBSPACE_FILE, &bytes)?;
            *slot = Some(SUBSPACE_FILE.to_string());
        }
    }
    staging.write_json(ADAPTER_CONFIG, &delta.to_json(model))?;
    let tensors = delta.export(&trainables)?;
    staging.write(
        ADAPTER_WEIGHTS,
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    let secs: Vec<f64> = report.epochs.iter().map(|e| e.train_seconds).collect();
    let results = json!({
        "best_epoch": report.best_epoch,
        "dev": dev_m,
        "test": test_m,
        "train_seconds_per_epoch": secs,
        "mean_train_seconds_per_epoch": secs.iter().sum::<f64>() / secs.len().max(1) as f64,
        "peak_rss_mib": super::peak_rss_mib(),
        "trainable_params": n_train,
        "base_params": n_base,
        "stopped_early": report.stopped_early,
    });
    staging.write_json("results.json", &results)?;
    let out = staging.commit()?;
    ckpt.finish();
    print_summary(&dev_m, test_m.as_ref(), report.best_epoch, &results, &out);
    Ok(())
}

/// The end of a classification run (text or image): dev and test metrics, seconds per epoch,
/// peak memory and where the adapter is.
pub fn print_summary(
    dev: &deltatune_train::ClassificationMetrics,
    test: Option<&deltatune_train::ClassificationMetrics>,
    best_epoch: usize,
    results: &serde_json::Value,
    out: &std::path::Path,
) {
    println!(
        "dev accuracy:  {:.4} (macro-F1 {:.4}, best epoch {best_epoch})",
        dev.accuracy, dev.macro_f1
    );
    if let Some(t) = test {
        println!(
            "test accuracy: {:.4} (macro-F1 {:.4})",
            t.accuracy, t.macro_f1
        );
    }
    println!(
        "seconds per epoch: {:.1}; peak memory {:.0} MiB",
        results["mean_train_seconds_per_epoch"]
            .as_f64()
            .unwrap_or(0.0),
        super::peak_rss_mib().unwrap_or(0.0)
    );
    println!("adapter saved to {}", out.display());
}
