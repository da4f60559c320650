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

use super::resume::{DataPrint, RunCheckpoints};
use crate::settings::Settings;

/// The folder of an image model: a path, or the short name of the default backbone in the
/// cache (fetched by `deltatune fetch`).
pub fn model_dir(spec: &str, cache: &Path) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    if spec == deltatune_data::assets::VISION_NAME {
        if let Ok(d) = deltatune_data::assets::vision_folder(cache) {
            return Ok(d);
        }
        // Not fetched yet: fetch it (verified, idempotent) as `deltatune fetch` would.
        let convert = |onnx: &Path, dir: &Path| {
            deltatune_models::vit::convert_dinov2_onnx(onnx, dir)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        return Ok(deltatune_data::assets::fetch_vision(
            cache,
            &deltatune_data::assets::FetchOptions::from_env(),
            &convert,
            &mut |m| eprintln!("{m}"),
        )?);
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
            let dir = match deltatune_data::fashion_mnist::fashion_mnist_ready_dir(&s.cache) {
                Ok(d) => d,
                Err(_) => deltatune_data::fashion_mnist::fetch_fashion_mnist(
                    &s.cache,
                    &deltatune_data::assets::FetchOptions::from_env(),
                    &mut |m| eprintln!("{m}"),
                )?,
            };
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

/// The file in an image run's output naming the images of each split (see
/// [`ImageSet::manifest`]).
pub const DATA_MANIFEST: &str = "data.json";

/// The record of an image run's data: an image folder's images (relative path, size and
/// SHA-256 of each), or Fashion-MNIST's four IDX files.
fn data_prints(s: &Settings, splits: &ImageSplits) -> Result<Vec<DataPrint>> {
    match &s.data.train {
        Some(root) => {
            let files = [
                Some(&splits.train),
                splits.dev.as_ref(),
                splits.test.as_ref(),
            ]
            .into_iter()
            .flatten()
            .flat_map(|set| set.examples.iter().filter_map(|e| e.source.path()));
            Ok(vec![DataPrint::image_folder("image folder", root, files)?])
        }
        None => {
            use deltatune_data::fashion_mnist::{
                fashion_mnist_ready_dir, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
            };
            let dir = fashion_mnist_ready_dir(&s.cache)?;
            [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
                .iter()
                .map(|f| DataPrint::file(f, &dir.join(f)))
                .collect()
        }
    }
}

/// A training split of one class would train to loss 0 and report accuracy 1.0: refused,
/// naming the folder and the class.
fn refuse_one_class(full: &ImageSet, train: &ImageSet, limit: usize) -> Result<()> {
    let counts = train.class_counts();
    let mut present = counts.iter().enumerate().filter(|(_, &n)| n > 0);
    let (Some((c, &n)), None) = (present.next(), present.next()) else {
        return Ok(());
    };
    let class = &train.classes[c];
    if full.classes.len() == 1 {
        bail!(
            "the training split has one class: {} holds one class folder, `{class}` ({n} \
             images). A classifier learns nothing from one class (it would report loss 0 and \
             accuracy 1.0): add a folder of images for each other class beside it",
            full.origin.display()
        );
    }
    bail!(
        "the training split has one class: the {n} images data.train_limit = {limit} draws from \
         {} are all of class `{class}`. A classifier learns nothing from one class (it would \
         report loss 0 and accuracy 1.0): raise data.train_limit (0 takes every image)",
        full.origin.display()
    )
}

/// `deltatune train --task image`.
pub fn train(s: &Settings, resume: bool) -> Result<()> {
    let staging = Staging::create(&s.output, &super::run_output_rules(s))?;
    let ckpt = RunCheckpoints::prepare(s, resume)?;
    let dir = model_dir(&s.model, &s.cache)?;
    let splits = load_splits(s)?;
    ckpt.check_data(&data_prints(s, &splits)?)?;
    let seed = s.train.seed;
    let train_set = subset(&splits.train, s.data.train_limit, seed, "train");
    refuse_one_class(&splits.train, &train_set, s.data.train_limit)?;
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
    // The exact images of each split, so a reference run sees the same data
    // (scripts/peft_vit.py reads this file).
    staging.write_json(
        DATA_MANIFEST,
        &json!({
            "classes": splits.classes.to_vec(),
            "image_size": s.data.image_size,
            "train": train_set.manifest(),
            "dev": dev_set.manifest(),
            "test": test_set.as_ref().map(ImageSet::manifest),
        }),
    )?;
    let mut model = VitClassifier::load(&dir, labels.len(), &mut Rng::new(seed).derive("head"))
        .with_context(|| format!("loading the image model in {}", dir.display()))?;
    let delta = s.delta();
    let trainables = delta.attach(&mut model, &Rng::new(seed).derive(delta.name()), None)?;
    let bf16_layers = deltatune_core::sites::use_bf16_where_faster(&mut model, s.train.bf16)?;
    crate::session::report_products(s.train.bf16, bf16_layers);
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
    super::train::print_summary(&dev_m, test_m.as_ref(), report.best_epoch, &results, &out);
    Ok(())
}

/// Whether the adapter folder `dir` was trained by `train --task image`.
pub fn is_image_adapter(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(RUN_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["task"] == "image" || v["settings"]["task"] == "image")
}

/// A saved image adapter on its base model, with its labels, settings and preprocessing.
pub struct ImageRun {
    pub model: VitClassifier,
    /// The base model's folder.
    pub model_dir: PathBuf,
    pub labels: LabelMap,
    pub settings: Settings,
    pub preprocess: Preprocess,
}

/// Loads an adapter folder written by `train --task image`.
pub fn load_image_adapter(dir: &Path) -> Result<ImageRun> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    let run: serde_json::Value = serde_json::from_str(&read(RUN_CONFIG)?)
        .with_context(|| format!("parsing {}", dir.join(RUN_CONFIG).display()))?;
    // The task is recorded in the run's settings (older runs also at the top level).
    let task = run["task"]
        .as_str()
        .or(run["settings"]["task"].as_str())
        .unwrap_or("classify");
    if task != "image" {
        let how = if task == "generate" {
            format!(
                "generate text with it (`deltatune generate --adapter {} PROMPT`)",
                dir.display()
            )
        } else {
            format!(
                "predict texts with it (`deltatune predict --adapter {} TEXT`)",
                dir.display()
            )
        };
        bail!(
            "{} is not an image classifier's adapter (its run_config.json has task `{task}`): \
             {how}",
            dir.display(),
        );
    }
    let settings: Settings = serde_json::from_value(run["settings"].clone())
        .with_context(|| format!("settings in {}", dir.join(RUN_CONFIG).display()))?;
    let model_dir = PathBuf::from(run["model_dir"].as_str().unwrap_or_default());
    let labels = LabelMap::load(&dir.join(LABELS))?;
    let mut model = VitClassifier::load(&model_dir, labels.len(), &mut Rng::new(0))
        .with_context(|| format!("loading the image model in {}", model_dir.display()))?;
    let delta =
        deltatune_methods::DeltaConfig::from_json(serde_json::from_str(&read(ADAPTER_CONFIG)?)?)
            .with_context(|| format!("reading {}", dir.join(ADAPTER_CONFIG).display()))?;
    let trainables = delta.attach_saved(&mut model, &Rng::new(0))?;
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let weights = deltatune_core::Weights::load(&wpath, candle_core::DType::F32)?;
    let map = weights
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    deltatune_methods::load_state_dict(&trainables, &map, &wpath)?;
    let preprocess = preprocess(
        &model_dir,
        model.config.num_channels,
        settings.data.image_size,
    )?;
    Ok(ImageRun {
        model,
        model_dir,
        labels,
        settings,
        preprocess,
    })
}

/// `deltatune predict --adapter DIR --image FILE...`: label and probability per image.
pub fn predict(adapter: &Path, images: &[PathBuf], json_out: bool) -> Result<()> {
    let run = load_image_adapter(adapter)?;
    let set = ImageSet {
        split: "predict".into(),
        origin: PathBuf::from("--image"),
        classes: run.labels_arc(),
        channels: 3,
        examples: images
            .iter()
            .map(|p| ImageExample {
                source: deltatune_data::images::ImageSource::File(p.clone()),
                label: 0,
            })
            .collect(),
    };
    let ex = ImageExamples::new(Arc::new(set), run.preprocess.clone(), None)?;
    let probs = deltatune_train::predict_proba(&run.model, &ex, 32)?;
    for (path, p) in images.iter().zip(probs) {
        let (best, prob) =
            p.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let label = run.labels.label(best as u32).unwrap_or("?");
        if json_out {
            println!(
                "{}",
                json!({"image": path, "label": label, "probability": prob, "probabilities": p})
            );
        } else {
            println!("{label}\t{prob:.4}\t{}", path.display());
        }
    }
    Ok(())
}

/// `deltatune eval --adapter DIR [--data FOLDER]` for an image adapter: accuracy on the
/// folder's test split (else dev), or on the run's own test images.
pub fn eval(adapter: &Path, data: Option<&Path>, batch_size: usize) -> Result<()> {
    let run = load_image_adapter(adapter)?;
    let (set, what) = match data {
        Some(root) => {
            let splits = load_image_folder(root)?;
            let set = splits
                .test
                .or(splits.dev)
                .context("the folder has no test/ or dev/ split to evaluate")?;
            (set, root.display().to_string())
        }
        None => {
            let s = &run.settings;
            let splits = load_splits(s)?;
            let t = splits
                .test
                .context("the run's data has no test split: give --data")?;
            let set = subset(&t, s.data.test_limit, s.train.seed, "test");
            (set, "the run's test images".to_string())
        }
    };
    if set.classes.as_ref() != run.labels_arc().as_ref() {
        bail!(
            "{what} has the classes [{}], the adapter was trained on [{}]",
            set.classes.join(", "),
            run.labels_arc().join(", ")
        );
    }
    let ex = ImageExamples::new(Arc::new(set), run.preprocess.clone(), None)?;
    let (m, _) = evaluate(&run.model, &ex, batch_size)?;
    println!(
        "{what}: {} images, accuracy {:.4}, macro-F1 {:.4}",
        m.n, m.accuracy, m.macro_f1
    );
    Ok(())
}

impl ImageRun {
    /// The class names, in id order.
    pub fn labels_arc(&self) -> Arc<[String]> {
        (0..self.labels.len())
            .map(|i| self.labels.label(i as u32).unwrap_or("?").to_string())
            .collect()
    }
}
