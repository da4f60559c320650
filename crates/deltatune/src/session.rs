//! Building a model, its delta and its data from resolved settings or from a saved adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use deltatune_core::Rng;
use deltatune_data::text::{load_examples, Example, LabelMap};
use deltatune_methods::Trainable;
use deltatune_models::decoder::LoadedDecoder;
use deltatune_models::{BertClassifier, DecoderClassifier, Pooling, TextTokenizer};
use deltatune_train::adapter_folder::config_task_type;
use deltatune_train::artifact::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG};
use deltatune_train::Encoded;
use deltatune_train::{AdapterFolder, AdapterTask};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// A model ready to run, with its tokenizer.
pub struct Loaded {
    pub model: BertClassifier,
    pub tokenizer: TextTokenizer,
}

/// Finds the model folder for `spec` (fetching the default model on first use).
pub fn model_dir(spec: &str, cache: &Path) -> Result<PathBuf> {
    if spec == "all-MiniLM-L6-v2" && deltatune_data::assets::resolve_model_dir(spec, cache).is_err()
    {
        eprintln!(
            "the default model is not in {} yet: fetching it",
            cache.display()
        );
        deltatune_data::assets::fetch_defaults(cache, &mut |m| eprintln!("  {m}"))?;
    }
    Ok(deltatune_data::assets::resolve_model_dir(spec, cache)?)
}

/// Loads the model in `dir` with a head of `num_labels`.
pub fn load_model(
    dir: &Path,
    num_labels: usize,
    pooling: Pooling,
    max_length: usize,
    seed: u64,
) -> Result<Loaded> {
    let mut rng = Rng::new(seed).derive("head");
    let model = BertClassifier::load(dir, num_labels, pooling, &mut rng)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), max_length)?;
    Ok(Loaded { model, tokenizer })
}

/// Attaches the configured delta for training; returns its trainable tensors.
pub fn attach(loaded: &mut Loaded, settings: &Settings) -> Result<Vec<Trainable>> {
    let delta = settings.delta();
    // A prompt initialised from text needs that text's token ids (without [CLS]/[SEP]).
    let text_ids = match delta.init_text() {
        Some(text) => {
            let ids = loaded.tokenizer.encode_batch(&[text])?.remove(0);
            Some(ids[1..ids.len().saturating_sub(1).max(1)].to_vec())
        }
        None => None,
    };
    let rng = Rng::new(settings.train.seed).derive(delta.name());
    let trainables = delta.attach(&mut loaded.model, &rng, text_ids.as_deref())?;
    let layers =
        deltatune_core::sites::use_bf16_where_faster(&mut loaded.model, settings.train.bf16)?;
    report_products(settings.train.bf16, layers);
    Ok(trainables)
}

/// Says once per process what the frozen weights' products run in, and why (bf16 is used only
/// where a start-up measurement finds it faster than f32).
pub fn report_products(bf16_setting: bool, bf16_layers: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let line = match (bf16_setting, bf16_layers) {
            (_, n) if n > 0 => format!(
                "frozen products: bf16 on {n} layers ({})",
                bf16_measurement()
            ),
            (false, _) => "frozen products: f32 (train.bf16 = false)".to_string(),
            (true, _) => format!("frozen products: f32 ({})", bf16_measurement()),
        };
        eprintln!("{line}");
    });
}

/// What the start-up measurement found ([`deltatune_core::ops::bf16_time_ratio`]), in words.
pub fn bf16_measurement() -> String {
    if deltatune_core::ops::bf16_decided().is_some() {
        return "as the run's first process decided (products.json in its checkpoint folder)"
            .to_string();
    }
    match deltatune_core::ops::bf16_time_ratio() {
        Some(r) => format!(
            "a bf16 product measured at {r:.2}x f32's time on this CPU; bf16 is used where at \
             most {}x",
            deltatune_core::ops::BF16_MAX_TIME_RATIO
        ),
        None => "this CPU has no AVX-512 BF16".to_string(),
    }
}

/// The labelled splits of a run.
pub struct Splits {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Option<Vec<Example>>,
    pub files: BTreeMap<String, PathBuf>,
}

/// Loads train/dev/test from the settings, defaulting to the prepared Rotten Tomatoes splits
/// (fetched on first use).
pub fn load_splits(settings: &Settings) -> Result<Splits> {
    let d = &settings.data;
    let (train, dev, test) = match (&d.train, &d.dev) {
        (None, None) => {
            let dir = settings.cache.join("data").join("rotten_tomatoes");
            if !dir.join("train.csv").exists() {
                eprintln!(
                    "Rotten Tomatoes is not in {} yet: fetching it",
                    settings.cache.display()
                );
                deltatune_data::assets::fetch_defaults(&settings.cache, &mut |m| {
                    eprintln!("  {m}")
                })?;
            }
            (
                dir.join("train.csv"),
                dir.join("dev.csv"),
                Some(d.test.clone().unwrap_or(dir.join("test.csv"))),
            )
        }
        (Some(t), Some(v)) => (t.clone(), v.clone(), d.test.clone()),
        (Some(_), None) => {
            bail!("a training file needs a development file too: add --dev-file (or data.dev)")
        }
        (None, Some(_)) => {
            bail!("a development file needs a training file too: add --train-file (or data.train)")
        }
    };
    let load =
        |p: &Path| load_examples(p, &d.text_column, &d.label_column).map_err(anyhow::Error::from);
    let mut files = BTreeMap::new();
    files.insert("train".to_string(), train.clone());
    files.insert("dev".to_string(), dev.clone());
    if let Some(t) = &test {
        files.insert("test".to_string(), t.clone());
    }
    let mut train_examples = load(&train)?;
    if !d.train_shard.is_empty() {
        let parsed = d.train_shard.split_once('/').and_then(|(i, k)| {
            Some((
                i.trim().parse::<usize>().ok()?,
                k.trim().parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((i, k)) if k > 0 && i < k => {
                train_examples = train_examples
                    .into_iter()
                    .enumerate()
                    .filter(|(n, _)| n % k == i)
                    .map(|(_, e)| e)
                    .collect();
            }
            _ => bail!(
                "`data.train_shard` is `{}`: expected `i/k` with 0 <= i < k, e.g. `0/4`",
                d.train_shard
            ),
        }
    }
    refuse_one_class(&train_examples, &train, d)?;
    Ok(Splits {
        train: train_examples,
        dev: load(&dev)?,
        test: test.as_deref().map(load).transpose()?,
        files,
    })
}

/// A training split whose examples all have one label would train to loss 0 and report
/// accuracy 1.0: refused, naming the file and the class.
fn refuse_one_class(
    train: &[Example],
    file: &Path,
    d: &crate::settings::DataSettings,
) -> Result<()> {
    let mut classes = train.iter().map(|e| e.label.as_str());
    let Some(first) = classes.next() else {
        return Ok(());
    };
    if classes.all(|c| c == first) {
        let shard = if d.train_shard.is_empty() {
            String::new()
        } else {
            format!(" (in its shard {}, data.train_shard)", d.train_shard)
        };
        bail!(
            "the training split has one class: all {} examples of {}{shard} are labelled `{first}` \
             (column `{}`). A classifier learns nothing from one class (it would report loss 0 and \
             accuracy 1.0): add examples of the other classes, or check data.label_column",
            train.len(),
            file.display(),
            d.label_column
        );
    }
    Ok(())
}

/// Tokenises examples and maps their labels.
pub fn encode(
    loaded: &Loaded,
    examples: &[Example],
    labels: &LabelMap,
    split: &str,
) -> Result<Encoded> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let ids = loaded.tokenizer.encode_batch(&texts)?;
    // An example longer than the model's positions would fail mid-run: named here instead.
    let positions = loaded.model.config.max_position_embeddings;
    if let Some((i, long)) = ids.iter().enumerate().find(|(_, x)| x.len() > positions) {
        let text = &examples[i].text;
        let shown: String = text.chars().take(60).collect();
        anyhow::bail!(
            "{split} example {} (\"{shown}{}\") is {} tokens long, more than the model's {positions} \
             positions (max_position_embeddings); set --max-length {positions} or less so longer \
             texts are cut",
            i + 1,
            if shown.len() < text.len() { "..." } else { "" },
            long.len()
        );
    }
    Ok(Encoded {
        ids,
        labels: labels.encode(examples, split)?,
    })
}

/// `run_config.json`: the resolved settings and what the run found, written before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub deltatune_version: String,
    pub settings: Settings,
    pub model_dir: PathBuf,
    pub data_files: BTreeMap<String, PathBuf>,
    pub num_labels: usize,
    pub base_params: usize,
    pub trainable_params: usize,
}

/// The learned-subspace artifact's name inside an adapter folder.
pub const SUBSPACE_FILE: &str = "subspace.safetensors";

/// A saved adapter, loaded onto its base model.
pub struct AdapterRun {
    pub loaded: Loaded,
    pub labels: LabelMap,
    pub run: RunConfig,
}

/// Loads `dir` (written by `train`): base model, delta and head, label map.
pub fn load_adapter(dir: &Path) -> Result<AdapterRun> {
    load_adapter_on(dir, None)
}

/// What `train` writes in run_config.json, for an adapter folder PEFT wrote (no
/// run_config.json): the base from `base` (`--model`) or the config's
/// `base_model_name_or_path`; default settings.
fn peft_run_config(
    dir: &Path,
    named_base: Option<&str>,
    base: Option<&str>,
    num_labels: usize,
) -> Result<RunConfig> {
    let spec = base.or(named_base).map(str::to_string).with_context(|| {
        format!(
            "{} has no run_config.json (a folder PEFT wrote?) and its adapter_config.json \
                 names no base model (base_model_name_or_path): pass the base with --model DIR",
            dir.display()
        )
    })?;
    let settings = Settings {
        model: spec.clone(),
        ..Settings::default()
    };
    let model_dir = base_path(&spec, &settings.cache).with_context(|| {
        format!(
            "finding the base model `{spec}` of the PEFT adapter in {} (from its \
             base_model_name_or_path; pass another with --model DIR)",
            dir.display()
        )
    })?;
    Ok(RunConfig {
        deltatune_version: env!("CARGO_PKG_VERSION").to_string(),
        settings,
        model_dir,
        data_files: BTreeMap::new(),
        num_labels,
        base_params: 0,
        trainable_params: 0,
    })
}

/// Reads the classifier adapter folder `dir` (written by `train`, or by PEFT's
/// `save_pretrained` for sequence classification) and what its run was, with the base `base`
/// when given.
fn read_classifier_folder(dir: &Path, base: Option<&str>) -> Result<(AdapterFolder, RunConfig)> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "--adapter {} is a file; pass the adapter folder `deltatune train --output` wrote \
             (it holds adapter_config.json and adapter_model.safetensors)",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!(
            "adapter folder {} does not exist (train one with `deltatune train --output ...`)",
            dir.display()
        );
    }
    if config_task_type(dir).as_deref() == Some("CAUSAL_LM") {
        bail!(
            "{} is a decoder's adapter (task_type CAUSAL_LM), not a classifier's: run it with \
             `deltatune generate --adapter {}`",
            dir.join(ADAPTER_CONFIG).display(),
            dir.display()
        );
    }
    let mut folder = AdapterFolder::read("adapter", dir, None)?;
    if folder.task == AdapterTask::Generate {
        bail!(
            "{} has no run_config.json and no trained head (classifier.weight) to tell the \
             number of classes",
            dir.display()
        );
    }
    let run = if folder.is_peft_folder() {
        let run = peft_run_config(dir, folder.base.as_deref(), base, folder.labels.len())?;
        folder.with_base_labels(&run.model_dir)?;
        run
    } else {
        let path = dir.join(RUN_CONFIG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut run: RunConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if let Some(b) = base {
            run.model_dir = base_path(b, &run.settings.cache)?;
        }
        run
    };
    Ok((folder, run))
}

/// The model file or folder of `spec`: a decoder's (GGUF file, decoder folder, short name) or
/// an encoder's.
fn base_path(spec: &str, cache: &Path) -> Result<PathBuf> {
    if crate::decoder::is_decoder_spec(spec) {
        crate::decoder::decoder_path(spec, cache)
    } else {
        model_dir(spec, cache)
    }
}

/// Whether the classifier of `run` sits on a decoder.
fn on_decoder(run: &RunConfig) -> bool {
    crate::decoder::is_decoder_spec(&run.model_dir.to_string_lossy())
}

/// Loads `dir` (written by `train`, or by PEFT's `save_pretrained` for sequence
/// classification) on its encoder base, or on `base` when given.
pub fn load_adapter_on(dir: &Path, base: Option<&str>) -> Result<AdapterRun> {
    let (folder, run) = read_classifier_folder(dir, base)?;
    if on_decoder(&run) {
        bail!(
            "{} is a classifier on the decoder {}: this command runs encoder classifiers only \
             (`deltatune predict` and `deltatune eval` run both)",
            dir.display(),
            run.model_dir.display()
        );
    }
    encoder_run(dir, folder, run)
}

/// The encoder classifier of `folder` on `run`'s base.
fn encoder_run(dir: &Path, folder: AdapterFolder, run: RunConfig) -> Result<AdapterRun> {
    let labels = LabelMap::from_labels(folder.labels.clone())?;
    let mut loaded = load_model(
        &run.model_dir,
        labels.len(),
        run.settings.pooling,
        run.settings.data.max_length,
        run.settings.train.seed,
    )?;
    let trainables = folder.delta.attach_saved(&mut loaded.model, &Rng::new(0))?;
    deltatune_methods::load_state_dict(&trainables, &folder.tensors, &dir.join(ADAPTER_WEIGHTS))?;
    Ok(AdapterRun {
        loaded,
        labels,
        run,
    })
}

/// A classifier adapter on a decoder, loaded: the decoder with its `score` head and delta, and
/// the decoder's tokenizer.
pub struct DecoderClassifierRun {
    pub model: DecoderClassifier,
    pub decoder: LoadedDecoder,
    pub labels: LabelMap,
    pub run: RunConfig,
}

/// A text classifier loaded from its adapter folder: on an encoder (BERT) or on a decoder.
pub enum Classifier {
    Encoder(Box<AdapterRun>),
    Decoder(Box<DecoderClassifierRun>),
}

/// Loads the classifier adapter in `dir` (ours or PEFT's SEQ_CLS folder) on its base, or on
/// `base` when given: an encoder or a decoder, as the base is.
pub fn load_classifier(dir: &Path, base: Option<&str>) -> Result<Classifier> {
    let (folder, run) = read_classifier_folder(dir, base)?;
    if !on_decoder(&run) {
        return Ok(Classifier::Encoder(Box::new(encoder_run(
            dir, folder, run,
        )?)));
    }
    let labels = LabelMap::from_labels(folder.labels.clone())?;
    let spec = run.model_dir.to_string_lossy().to_string();
    let decoder = crate::decoder::load(&spec, &run.settings.cache)?;
    let mut model = DecoderClassifier::new(decoder.model.clone(), labels.len(), &mut Rng::new(0))?;
    let trainables = folder.delta.attach_saved(&mut model, &Rng::new(0))?;
    deltatune_methods::load_state_dict(&trainables, &folder.tensors, &dir.join(ADAPTER_WEIGHTS))
        .with_context(|| {
            format!(
                "the adapter in {} does not fit the decoder {}",
                dir.display(),
                run.model_dir.display()
            )
        })?;
    Ok(Classifier::Decoder(Box::new(DecoderClassifierRun {
        model,
        decoder,
        labels,
        run,
    })))
}

impl Classifier {
    /// The class names.
    pub fn labels(&self) -> &LabelMap {
        match self {
            Self::Encoder(r) => &r.labels,
            Self::Decoder(r) => &r.labels,
        }
    }

    /// What the run was.
    pub fn run(&self) -> &RunConfig {
        match self {
            Self::Encoder(r) => &r.run,
            Self::Decoder(r) => &r.run,
        }
    }

    /// Class probabilities of `texts`, one row each.
    pub fn predict(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Encoder(r) => {
                let ids = r.loaded.tokenizer.encode_batch(texts)?;
                Ok(deltatune_train::predict_proba(
                    &r.loaded.model,
                    &ids,
                    batch_size,
                )?)
            }
            Self::Decoder(r) => {
                let ids = crate::decoder::classifier_ids(
                    &r.decoder,
                    r.run.settings.data.max_length,
                    texts,
                    "input",
                )?;
                Ok(deltatune_train::predict_proba(&r.model, &ids, batch_size)?)
            }
        }
    }

    /// Accuracy and macro-F1 on `examples`.
    pub fn evaluate(
        &self,
        examples: &[Example],
        batch_size: usize,
    ) -> Result<deltatune_train::ClassificationMetrics> {
        Ok(match self {
            Self::Encoder(r) => {
                let enc = encode(&r.loaded, examples, &r.labels, "eval")?;
                deltatune_train::evaluate(&r.loaded.model, &enc, batch_size)?.0
            }
            Self::Decoder(r) => {
                let enc = crate::decoder::encode_for_classifier(
                    &r.decoder,
                    r.run.settings.data.max_length,
                    examples,
                    &r.labels,
                    "eval",
                )?;
                deltatune_train::evaluate(&r.model, &enc, batch_size)?.0
            }
        })
    }
}
