//! Image classification with a Vision Transformer: `train --task image` (DINOv2 ViT-S/14 on
//! Fashion-MNIST by default, or any image folder), and `predict --image` with a saved adapter.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deltatune_core::{HasSites, Rng};
use deltatune_data::images::{
    load_image_folder, Augment, ImageExample, ImageSet, ImageSplits, PrefetchOptions, Preprocess,
};
use deltatune_data::text::LabelMap;
use deltatune_models::VitClassifier;
use deltatune_train::artifact::{Staging, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, RUN_CONFIG};
use deltatune_train::image::ImageExamples;
use deltatune_train::{evaluate, train_task_with, ClassificationTask, TrainOptions};
use serde_json::json;

use super::resume::RunCheckpoints;
use crate::settings::Settings;

/// The folder of an image model: a path, or the short name of the default backbone in the
/// cache (fetched by `deltatune fetch`).
pub fn model_dir(spec: &str, cache: &Path) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    if spec == deltatune_data::assets::VISION_NAME {
        return Ok(deltatune_data::assets::vision_folder(cache)?);
    }
    bail!(
        "image model `{spec}`: not a folder (config.json + model.safetensors of a Dinov2 or ViT \
         model) nor `{}` (run `deltatune fetch` for it)",
        deltatune_data::assets::VISION_NAME
    )
}

/// The train/dev/test images: an image folder (`data.train` = a root with `train/<class>/`,
/// optionally `dev/` and `test/`), or Fashion-MNIST from the cache.
pub fn load_splits(s: &Settings) -> Result<ImageSplits> {
    match &s.data.train {
        Some(root) => Ok(load_image_folder(root)?),
        None => {
            let dir = deltatune_data::fashion_mnist::fashion_mnist_ready_dir(&s.cache)?;
            Ok(deltatune_data::fashion_mnist::load_fashion_mnist(&dir)?)
        }
    }
}

/// A seeded subset of `limit` examples (all when 0 or larger), in the set's order.
fn subset(set: &ImageSet, limit: usize, seed: u64, what: &str) -> ImageSet {
    if limit == 0 || limit >= set.len() {
        return set.clone();
    }
    let mut idx: Vec<usize> = (0..set.len()).collect();
    Rng::new(seed)
        .derive(&format!("subset/{what}"))
        .shuffle(&mut idx);
    idx.truncate(limit);
    idx.sort_unstable();
    let examples: Vec<ImageExample> = idx.iter().map(|&i| set.examples[i].clone()).collect();
    ImageSet {
        examples,
        ..set.clone()
    }
}

/// The preprocessing of a model: its `preprocessor_config.json` when the folder has one, else
/// ImageNet's normalisation; at `size` pixels.
fn preprocess(model_dir: &Path, channels: usize, size: usize) -> Result<Preprocess> {
    let hf = model_dir.join("preprocessor_config.json");
    let pre = if hf.exists() {
        Preprocess::from_hf_config(&hf, channels)?
    } else {
        Preprocess::for_model(channels)?
    };
    Ok(pre.with_size(size))
}

/// `deltatune train --task image`.
pub fn train(s: &Settings, resume: bool) -> Result<()> {
    let staging = Staging::create(&s.output)?;
    let ckpt = RunCheckpoints::prepare(s, resume)?;
    let dir = model_dir(&s.model, &s.cache)?;
    let splits = load_splits(s)?;
    let seed = s.train.seed;
    let train_set = subset(&splits.train, s.data.train_limit, seed, "train");
    let dev_full = splits.dev.clone().context(
        "the image data has no dev split: add a dev/ folder beside train/ (dev accuracy picks \
         the best epoch)",
    )?;
    let dev_set = subset(&dev_full, s.data.dev_limit, seed, "dev");
    let test_set = splits
        .test
        .as_ref()
        .map(|t| subset(t, s.data.test_limit, seed, "test"));
    let labels = LabelMap::from_labels(splits.classes.to_vec())?;
    let mut model = VitClassifier::load(&dir, labels.len(), &mut Rng::new(seed).derive("head"))
        .with_context(|| format!("loading the image model in {}", dir.display()))?;
    let delta = s.delta();
    let trainables = delta.attach(&mut model, &Rng::new(seed).derive(delta.name()), None)?;
    let n_train: usize = trainables.iter().map(|t| t.var.elem_count()).sum();
    let n_base = model.param_count();
    eprintln!(
        "model {} ({} parameters, frozen); delta {}: {} trainable parameters ({:.3}% of the \
         model)",
        dir.display(),
        n_base,
        s.method,
        n_train,
        100.0 * n_train as f64 / n_base as f64
    );
    eprintln!(
        "images: train {} / dev {} / test {}, {} classes, {} x {} pixels",
        train_set.len(),
        dev_set.len(),
        test_set.as_ref().map_or(0, |t| t.len()),
        labels.len(),
        s.data.image_size,
        s.data.image_size
    );
    let channels = model.config.num_channels;
    let pre = preprocess(&dir, channels, s.data.image_size)?;
    let train_pre = pre
        .clone()
        .with_augment(s.data.augment.then(Augment::default), seed);
    let prefetch = Some(PrefetchOptions::default());
    let train_ex = ImageExamples::new(Arc::new(train_set), train_pre, prefetch)?;
    let dev_ex = ImageExamples::new(Arc::new(dev_set), pre.clone(), None)?;
    let run = json!({
        "deltatune_version": env!("CARGO_PKG_VERSION"),
        "task": "image",
        "settings": s,
        "model_dir": dir.canonicalize().unwrap_or(dir.clone()),
        "image_size": s.data.image_size,
        "num_labels": labels.len(),
        "base_params": n_base,
        "trainable_params": n_train,
    });
    staging.write_json(RUN_CONFIG, &run)?;
    labels.save(&staging.file(LABELS))?;
    let task = ClassificationTask {
        model: &model,
        train: &train_ex,
        dev: &dev_ex,
    };
    let report = train_task_with(
        &task,
        &trainables,
        &s.train,
        &TrainOptions {
            metrics_log: Some(&ckpt.metrics_log()),
            show_progress: s.progress,
            checkpoints: Some(&ckpt.checkpointing),
        },
    )?;
    ckpt.copy_metrics(&staging)?;
    let t_eval = Instant::now();
    let (dev_m, _) = evaluate(&model, &dev_ex, s.train.eval_batch_size)?;
    let test_m = match test_set {
        Some(t) => {
            let ex = ImageExamples::new(Arc::new(t), pre, None)?;
            Some(evaluate(&model, &ex, s.train.eval_batch_size)?.0)
        }
        None => None,
    };
    let eval_secs = t_eval.elapsed().as_secs_f64();
    let saved = delta.for_saving(&dir.display().to_string());
    staging.write_json(ADAPTER_CONFIG, &saved.to_json(&model))?;
    staging.write(
        ADAPTER_WEIGHTS,
        &deltatune_core::to_safetensors_bytes(&saved.export(&trainables)?)?,
    )?;
    let secs: Vec<f64> = report.epochs.iter().map(|e| e.train_seconds).collect();
    let results = json!({
        "best_epoch": report.best_epoch,
        "dev": dev_m,
        "test": test_m,
        "train_seconds_per_epoch": secs,
        "mean_train_seconds_per_epoch": secs.iter().sum::<f64>() / secs.len().max(1) as f64,
        "eval_seconds": eval_secs,
        "peak_rss_mib": super::peak_rss_mib(),
        "trainable_params": n_train,
        "base_params": n_base,
        "image_size": s.data.image_size,
    });
    staging.write_json("results.json", &results)?;
    let out = staging.commit()?;
    ckpt.finish();
    println!(
        "dev accuracy:  {:.4} (macro-F1 {:.4}, best epoch {})",
        dev_m.accuracy, dev_m.macro_f1, report.best_epoch
    );
    if let Some(t) = test_m {
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
    Ok(())
}
