//! `deltatune`: delta tuning of pretrained transformers from the command line.

mod commands;
use deltatune::session;
use deltatune::settings;

/// mimalloc instead of glibc's malloc: see [`keep_freed_memory`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Adapt a pretrained transformer by training a small delta (LoRA, ...) while its weights stay
/// frozen. Settings resolve as: flag > environment (DELTATUNE_*) > --config TOML file > default.
#[derive(Debug, Parser)]
#[command(name = "deltatune", version, about)]
struct Cli {
    /// Where the model and its deltas live: `cpu` (default), `cuda` (the first GPU) or
    /// `cuda:N`. A GPU needs a build with `--features cuda` (docs/gpu.md).
    #[arg(long, global = true, env = "DELTATUNE_DEVICE", default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

/// `deltatune experiment WHICH`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExperimentKind {
    /// Every delta method with its preset, one row each.
    Methods,
}

/// The task of `deltatune experiment methods --task`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExperimentTask {
    Classify,
    Generate,
    Image,
}

impl ExperimentTask {
    fn name(self) -> &'static str {
        match self {
            Self::Classify => "classify",
            Self::Generate => "generate",
            Self::Image => "image",
        }
    }
}

/// `deltatune subspace ACTION`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SubspaceAction {
    /// PCA of trained prompts.
    Fit,
    /// A random subspace around --origin.
    Random,
}

/// `deltatune study ACTION`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StudyAction {
    /// The studies in the store.
    List,
    /// A study's trials.
    Show,
    /// A study's best trial and its settings.
    Best,
    /// A study's trials as CSV or JSON.
    Export,
    /// A self-contained HTML report with plots.
    Report,
    /// Two studies, trial by trial on parameters (--against).
    Compare,
}

impl StudyAction {
    fn name(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Show => "show",
            Self::Best => "best",
            Self::Export => "export",
            Self::Report => "report",
            Self::Compare => "compare",
        }
    }
}

/// `deltatune study export --format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    Csv,
    Json,
}

impl ExportFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Json => "json",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download the default model (all-MiniLM-L6-v2) and data (Rotten Tomatoes) into the cache.
    Fetch {
        /// Cache folder (default $DELTATUNE_CACHE or ~/.cache/deltatune).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Convert a DINOv2 backbone exported to ONNX into a Hugging Face folder (config.json,
    /// model.safetensors) that transformers' Dinov2Model loads.
    Convert {
        /// The ONNX file.
        #[arg(long)]
        onnx: PathBuf,
        /// The folder to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Replace the output when an earlier deltatune command wrote it (a folder holding
        /// anything deltatune did not write is never replaced).
        #[arg(long)]
        overwrite: bool,
    },
    /// Train a delta; prints dev and test accuracy and where the adapter was saved.
    Train(RunArgs),
    /// Evaluate a saved adapter on a labelled file (default: the run's test file).
    Eval {
        /// The adapter folder written by `train`.
        #[arg(long)]
        adapter: PathBuf,
        /// A labelled CSV/TSV/JSONL file (a decoder's: prompt/completion JSONL; an image
        /// adapter's: a dataset root with train/ and test/ (or dev/), each holding one folder
        /// per class; its test/ split is evaluated, dev/ when there is no test/).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Examples per batch (default: 64 for classifiers, 32 for images, the run's
        /// `train.eval_batch_size` for decoders, which is what `test_generations.jsonl` used).
        #[arg(long)]
        batch_size: Option<usize>,
        /// A decoder's adapter: also write its generations here as JSON lines
        /// (`{"reference", "generated"}`, as `test_generations.jsonl`).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Predict labels of texts given as arguments or in a file (one per line).
    Predict {
        #[arg(long)]
        adapter: PathBuf,
        /// A file with one text per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Image files to classify (with an adapter from `train --task image`).
        #[arg(long, num_args = 1..)]
        image: Vec<PathBuf>,
        /// The base model (default: the adapter's; for a PEFT folder, its
        /// base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
        texts: Vec<String>,
    },
    /// Fold a mergeable adapter (LoRA, IA3, BitFit) into the base weights and write a plain
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer).
    ///
    /// With `--adapters A,B,...`: combine LoRA adapters of one base into a new LoRA adapter
    /// (PEFT's `add_weighted_adapter`).
    Merge {
        /// The adapter folder written by `train`.
        #[arg(
            long,
            required_unless_present = "adapters",
            conflicts_with = "adapters"
        )]
        adapter: Option<PathBuf>,
        /// LoRA adapter folders to combine (comma-separated; deltatune's or PEFT's).
        #[arg(long, value_delimiter = ',')]
        adapters: Vec<PathBuf>,
        /// One weight per adapter (comma-separated; negative subtracts; default 1 each).
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        weights: Vec<f64>,
        /// linear, cat (exact; rank = sum of ranks), ties, dare_linear, dare_ties or
        /// magnitude_prune.
        #[arg(long, default_value = "cat")]
        combination: String,
        /// Fraction of values kept by ties, dare_* and magnitude_prune (e.g. 0.5).
        #[arg(long)]
        density: Option<f64>,
        /// TIES' majority sign: total (sign of the sum) or frequency (most common sign).
        #[arg(long, default_value = "total")]
        majority_sign: String,
        /// Seed of DARE's random masks.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The model folder (or, with --adapters, the adapter folder) to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Replace the output folder when an earlier deltatune command wrote it (a folder
        /// holding anything else is never replaced).
        #[arg(long)]
        overwrite: bool,
    },
    /// Generate text with a decoder (default SmolLM2-135M-Instruct), with or without an
    /// adapter trained by `train --task generate` or saved by PEFT; streams to the terminal.
    Generate {
        /// An adapter folder (deltatune's or PEFT's save_pretrained output).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The base decoder: a .gguf file, a decoder folder, SmolLM2-135M-Instruct or gemma-3-270m (default: the
        /// adapter's base, else SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        cache: Option<PathBuf>,
        /// A file with one prompt per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Wrap each prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// New tokens at most.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Softmax temperature; 0 is greedy.
        // A negative value is read as a (bad) number for the sampling check to refuse by
        // name, not as a flag (clap's `-- -1` tip).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f64,
        #[arg(long, allow_negative_numbers = true)]
        top_k: Option<i64>,
        #[arg(long, allow_negative_numbers = true)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Stop when the continuation contains this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Round the activations to 8 bits in the products by a quantized (GGUF) base and use
        /// integer dot products, as llama.cpp does: 2-4x faster products on CPUs with AVX-512
        /// VNNI. `false`: f32 activations, the numbers `eval` computes.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        int8_activations: bool,
        /// Also write the prompt's logits ([T, vocab], with its input_ids) to this safetensors
        /// file (for comparisons with PEFT: scripts/check_peft_decoder.py).
        #[arg(long)]
        dump_logits: Option<PathBuf>,
        texts: Vec<String>,
    },
    /// Show the model's module tree with parameter counts and where the delta would attach.
    Inspect(RunArgs),
    /// Experiments: `methods` trains every delta method with its preset and writes a table.
    Experiment {
        /// Which experiment.
        which: ExperimentKind,
        /// Only these methods (comma-separated).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Epochs per run (default: the train default, 3).
        #[arg(long)]
        epochs: Option<usize>,
        /// Markdown table to write (a .json with the full results is written beside it).
        #[arg(long)]
        table: Option<PathBuf>,
        /// `classify`: MiniLM on Rotten Tomatoes into docs/methods.md; `generate`: SmolLM2 on
        /// G2P into docs/methods-decoder.md; `image`: DINOv2 ViT-S/14 on Fashion-MNIST into
        /// docs/methods-image.md.
        #[arg(long, value_enum, default_value_t = ExperimentTask::Classify)]
        task: ExperimentTask,
        /// The model, where the task has an experiment on another model than its default:
        /// `--task generate --model gemma-3-270m` (Gemma 3 270M on G2P into
        /// docs/methods-gemma3.md).
        #[arg(long)]
        model: Option<String>,
        /// Folder for the runs' adapter folders.
        #[arg(long)]
        runs: Option<PathBuf>,
        /// Replace the output when an earlier deltatune command wrote it (a folder holding
        /// anything deltatune did not write is never replaced).
        #[arg(long)]
        overwrite: bool,
    },
    /// Learned intrinsic subspaces: `fit` runs PCA over several trained prompt-tuning adapters
    /// and writes the decoder (P0 and basis) for `--method intrinsic --set intrinsic.subspace=`.
    Subspace {
        /// fit (PCA of trained prompts) or random (a random subspace around --origin).
        action: SubspaceAction,
        /// Prompt-tuning adapter folders (at least 2).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        adapters: Vec<PathBuf>,
        /// Subspace dimension d (1 to the number of adapters minus one; with --origin, 1 to the
        /// number of adapters).
        #[arg(long)]
        dim: usize,
        /// A prompt-tuning adapter whose prompt all sources started from (e.g. one trained with
        /// `--set train.freeze=prompt_embeddings`): the subspace is fitted to the sources'
        /// displacements from it, not centred, and z = 0 decodes to it.
        #[arg(long)]
        origin: Option<PathBuf>,
        /// random: seed of the Gaussian basis.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The artifact to write (safetensors).
        #[arg(long, short)]
        output: PathBuf,
        /// Replace the output when an earlier deltatune command wrote it (a folder holding
        /// anything deltatune did not write is never replaced).
        #[arg(long)]
        overwrite: bool,
    },
    /// Choose the delta method for the task within a time budget: task features and a rule
    /// prior, successive halving across methods on dev accuracy, the winner trained to the end,
    /// and a report (auto-report.html) that explains the choice.
    Auto {
        #[command(flatten)]
        run: RunArgs,
        /// Wall-clock budget, e.g. 30m, 90s, 1h30m.
        #[arg(long, default_value = "30m")]
        budget: String,
        /// Where to write the HTML report (default OUTPUT/auto-report.html).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Study store: the rungs are recorded there, and past auto runs refine the prior.
        #[arg(long, env = "DELTATUNE_STORAGE", default_value = "runs/studies.db")]
        storage: String,
        /// Try at most this many methods, best prior first (default: those within 0.15 of
        /// the best prior score, 2 to 4; fewer when the budget is short).
        #[arg(long)]
        candidates: Option<usize>,
    },
    /// Hyperparameter search: run or resume a study over delta methods and their settings.
    /// Every trial is a `deltatune train` run; several workers (here or on other machines
    /// sharing a PostgreSQL store) claim trials from one study.
    Search(SearchCli),
    /// What a study store holds: `list`, `show NAME`, `best NAME`, `export NAME`, `report NAME`.
    Study {
        /// What to do.
        action: StudyAction,
        /// The study (all actions but list).
        name: Option<String>,
        /// compare: the other study, matched trial by trial on parameters.
        #[arg(long)]
        against: Option<String>,
        /// Study store: a SQLite file (default runs/studies.db) or postgres://...
        #[arg(long, env = "DELTATUNE_STORAGE", default_value = "runs/studies.db")]
        storage: String,
        /// export: the file format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// export/report: the file to write (export prints to stdout without it).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replace the output when an earlier deltatune command wrote it (a folder holding
        /// anything deltatune did not write is never replaced).
        #[arg(long)]
        overwrite: bool,
    },
    /// Time one LoRA training step and forward-only inference (batch 16 x 128) on the model.
    Bench {
        #[command(flatten)]
        run: RunArgs,
        /// Timed repetitions after 3 warm-up steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// JSON files of reference timings to print beside (repeatable): PyTorch + PEFT
        /// (scripts/bench_peft.py; for `--task generate` scripts/bench_peft_decoder.py) and
        /// llama.cpp (scripts/bench_llamacpp.py). `bash scripts/bench_all.sh` runs them all.
        #[arg(long)]
        reference: Vec<PathBuf>,
    },
    /// Serve one base model and many adapters over HTTP (OpenAI-shaped completions and chat,
    /// classification, adapters loaded at run time with DELTATUNE_ADMIN_TOKEN).
    Serve(commands::serve::ServeArgs),
    /// Load a running server (loopback only) with concurrent clients over several adapters, for
    /// a bounded time: throughput, p50/p99 latency, errors, lost or duplicated answers.
    Loadgen(commands::serve::LoadgenArgs),
}

/// `deltatune search` flags.
#[derive(Debug, Args, Clone)]
pub struct SearchCli {
    /// The search space (TOML): [methods.NAME] tables and shared [train] ranges.
    #[arg(long)]
    space: PathBuf,
    /// Study name; an existing study of that name (same space) is resumed.
    #[arg(long)]
    study: String,
    /// Study store: a SQLite file, or postgres://user@host/db for workers on many machines.
    #[arg(long, env = "DELTATUNE_STORAGE", default_value = "runs/studies.db")]
    storage: String,
    /// Trials in the study (complete + pruned; failed ones are retried or replaced).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Worker processes to run on this machine.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// tpe or random (fixed when the study is created).
    #[arg(long, default_value = "tpe")]
    sampler: String,
    /// median, asha or none (fixed when the study is created); `asha:R` puts the first rung at
    /// intermediate value R (a grace period), `median:W` does not prune before value W.
    #[arg(long, default_value = "median")]
    pruner: String,
    /// Seed of the sampler: the same seed and history give the same suggestions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// train (each trial trains a delta; objective: dev accuracy) or synthetic (a fast test
    /// function, for trying a store and workers).
    #[arg(long, default_value = "train")]
    objective: String,
    /// Folder for the trials' adapter folders and logs.
    #[arg(long, default_value = "runs/search")]
    runs: PathBuf,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 2.0)]
    heartbeat: f64,
    /// A running trial without a heartbeat for this many seconds is failed and retried.
    #[arg(long, default_value_t = 30.0)]
    stale_timeout: f64,
    /// Report to the pruner every this many optimiser steps (each trial evaluates on dev that
    /// often) instead of after each epoch.
    #[arg(long)]
    report_every_steps: Option<usize>,
    /// A setting for every trial's `train` (repeatable), e.g. --set train.max_steps=100.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long, hide = true)]
    worker_only: bool,
}

/// Settings shared by `train`, `inspect` and `bench`; each flag overrides its env var and the
/// config file.
#[derive(Debug, Args, Clone, Default)]
// `--lr -0.1` is a (bad) learning rate for the settings check to reject, not a flag `-0`.
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    /// A TOML settings file (sections [data], [lora], [train]; see --show-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved settings with their sources and exit.
    #[arg(long)]
    show_config: bool,
    /// classify (default) or generate (a decoder trained on prompt/completion pairs; defaults
    /// to SmolLM2-135M-Instruct on English spelling to pronunciation).
    #[arg(long)]
    task: Option<String>,
    /// Model folder, HF hub id in the local HF cache, or all-MiniLM-L6-v2; for `--task
    /// generate` a .gguf file, a decoder folder, SmolLM2-135M-Instruct or gemma-3-270m.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Output adapter folder.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the output folder when an earlier deltatune run completed it (a folder holding
    /// anything deltatune did not write is never replaced).
    #[arg(long)]
    overwrite: bool,
    /// Delta method (lora).
    #[arg(long)]
    method: Option<String>,
    /// cls or mean.
    #[arg(long)]
    pooling: Option<String>,
    /// Hide progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Training data (CSV/TSV/JSONL with text and label columns).
    #[arg(long, visible_alias = "data")]
    train_file: Option<PathBuf>,
    /// Dev data (model selection, pruning, auto's rungs).
    #[arg(long, visible_alias = "dev")]
    dev_file: Option<PathBuf>,
    /// Test data (reported once at the end).
    #[arg(long, visible_alias = "test")]
    test_file: Option<PathBuf>,
    #[arg(long)]
    text_column: Option<String>,
    #[arg(long)]
    label_column: Option<String>,
    #[arg(long)]
    max_length: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    #[arg(long)]
    use_rslora: Option<bool>,
    /// Comma-separated module-name suffixes.
    #[arg(long)]
    target_modules: Option<String>,
    /// A regular expression that must match whole module paths (instead of --target-modules).
    #[arg(long)]
    target_regex: Option<String>,
    /// none, all or lora_only.
    #[arg(long)]
    bias: Option<String>,
    #[arg(long)]
    modules_to_save: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Early-stopping patience in epochs.
    #[arg(long)]
    patience: Option<usize>,
    /// Batch examples of similar length together (less padding, faster).
    #[arg(long)]
    group_by_length: Option<bool>,
    /// Multiply by the frozen weights in bf16 where this CPU does that faster than f32 (AVX-512
    /// BF16 on Zen 4: about twice as fast).
    #[arg(long)]
    bf16: Option<bool>,
    /// Stop after this many optimiser steps (smoke runs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Continue the interrupted run that writes this output folder from its newest checkpoint,
    /// with its saved settings (`train` only; only settings such as --epochs may change).
    #[arg(long, value_name = "OUTPUT")]
    resume: Option<PathBuf>,
    /// Any setting by its dotted key, e.g. `--set prompt.num_virtual_tokens=40` (repeatable;
    /// see --show-config for the keys). Applied after the other flags.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl RunArgs {
    /// The flags given, as (dotted key, raw value).
    fn flags(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut f: Vec<(String, String)> = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                f.push((k.to_string(), v));
            }
        };
        let p = |x: &Option<PathBuf>| x.as_ref().map(|p| p.display().to_string());
        let s = |x: &Option<String>| x.clone();
        let n = |x: Option<usize>| x.map(|v| v.to_string());
        let fl = |x: Option<f64>| x.map(|v| v.to_string());
        put("task", s(&self.task));
        put("model", s(&self.model));
        put("cache", p(&self.cache));
        put("output", p(&self.output));
        put("method", s(&self.method));
        put("pooling", s(&self.pooling));
        put("progress", self.no_progress.then(|| "false".into()));
        put("data.train", p(&self.train_file));
        put("data.dev", p(&self.dev_file));
        put("data.test", p(&self.test_file));
        put("data.text_column", s(&self.text_column));
        put("data.label_column", s(&self.label_column));
        put("data.max_length", n(self.max_length));
        put("lora.r", n(self.r));
        put("lora.lora_alpha", fl(self.lora_alpha));
        put("lora.lora_dropout", fl(self.lora_dropout));
        put("lora.use_rslora", self.use_rslora.map(|b| b.to_string()));
        put("lora.target_modules", s(&self.target_modules));
        put(
            "lora.target_modules",
            self.target_regex
                .as_ref()
                .map(|r| serde_json::Value::String(r.clone()).to_string()),
        );
        put("lora.bias", s(&self.bias));
        put("lora.modules_to_save", s(&self.modules_to_save));
        put("train.epochs", n(self.epochs));
        put("train.batch_size", n(self.batch_size));
        put("train.lr", fl(self.lr));
        put("train.warmup_ratio", fl(self.warmup_ratio));
        put("train.weight_decay", fl(self.weight_decay));
        put("train.max_grad_norm", fl(self.max_grad_norm));
        put("train.grad_accum", n(self.grad_accum));
        put("train.seed", self.seed.map(|v| v.to_string()));
        put("train.early_stopping_patience", n(self.patience));
        put(
            "train.group_by_length",
            self.group_by_length.map(|b| b.to_string()),
        );
        put("train.bf16", self.bf16.map(|b| b.to_string()));
        put("train.max_steps", n(self.max_steps));
        for kv in &self.set {
            let Some((k, v)) = kv.split_once('=') else {
                anyhow::bail!("--set {kv}: expected KEY=VALUE, e.g. --set lora.r=16");
            };
            f.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(f)
    }

    /// The data and model flags as arguments for child `train` runs (method, output and
    /// training lengths are chosen by the caller).
    fn passthrough(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(c) = &self.config {
            v.push("--config".into());
            v.push(c.display().to_string());
        }
        for (k, val) in self.flags().unwrap_or_default() {
            if k == "method" || k == "output" || k == "progress" {
                continue;
            }
            v.push("--set".into());
            v.push(format!("{k}={val}"));
        }
        v
    }

    /// Resolves settings; with `--show-config`, prints them and returns `None`.
    fn resolve(&self) -> anyhow::Result<Option<settings::Settings>> {
        if let Some(out) = &self.resume {
            anyhow::bail!(
                "--resume is for `deltatune train` (to continue {}); search studies and auto \
                 runs resume by running the same command again",
                out.display()
            );
        }
        let env = |k: &str| std::env::var(k).ok();
        let (mut s, sources) = settings::resolve(self.config.as_deref(), &env, &self.flags()?)?;
        s.overwrite = self.overwrite;
        if self.show_config {
            print!("{}", settings::show(&s, &sources)?);
            return Ok(None);
        }
        Ok(Some(s))
    }
}

/// `deltatune train [--resume OUTPUT]`; a run stopped by a signal says how to resume it.
fn train(a: &RunArgs) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let (given, sources) = settings::resolve(a.config.as_deref(), &env, &a.flags()?)?;
    let (mut s, resume) = match &a.resume {
        Some(out) => (
            commands::resume::resumed_settings(out, &given, &sources)?,
            true,
        ),
        None => (given, false),
    };
    s.overwrite = a.overwrite;
    if a.show_config {
        print!("{}", settings::show(&s, &sources)?);
        return Ok(());
    }
    match commands::train(&s, resume) {
        Err(e)
            if matches!(
                e.downcast_ref::<deltatune_train::TrainError>(),
                Some(deltatune_train::TrainError::Interrupted { .. })
            ) =>
        {
            eprintln!("{}", commands::resume::resume_hint(&s.output));
            std::process::exit(130);
        }
        // A message that already says how to resume (the refusal to start over an interrupted
        // run) is not told it twice.
        Err(e) if format!("{e:#}").contains("deltatune train --resume") => Err(e),
        Err(e) => match commands::resume::after_failure(&s.output) {
            Some(kept) => Err(anyhow::anyhow!("{e:#}; {kept}")),
            None => Err(e),
        },
        r => r,
    }
}

/// Keeps freed memory in the process: training allocates and frees the same large activation
/// buffers every step, and glibc's default (large blocks via mmap, returned to the kernel on
/// free) turns each step's allocations into page faults and kernel page clearing. 32 MiB is the
/// largest mmap threshold glibc accepts on 64-bit (a larger value is silently refused).
/// Keeps memory the process frees for its next allocations instead of handing it back to the
/// system. A training step frees and allocates the same few hundred MiB of activations and
/// gradients each time; returned pages come back as page faults that the kernel zero-fills
/// (`clear_page_erms`: 6% of a decoder step's samples). glibc's malloc gives every block over
/// 32 MiB (the most `M_MMAP_THRESHOLD` allows: the decoder's logits are 75 MiB) straight back
/// to the system. With mimalloc told never to purge, `deltatune bench --task generate --steps 2`
/// took 1,846 page faults against 1,332,698 with glibc (`perf stat -e page-faults`). The price
/// is peak memory: freed blocks stay with the size class that freed them, so the decoder's
/// quantized-base step peaked at 1,072 MiB against 967 with mimalloc's default purge (10 ms;
/// 3.0 M page faults), 1,018 with a 1 s delay (355 K faults) and 914 with glibc. The server
/// (`serve`, `loadgen`) keeps the default; `MIMALLOC_PURGE_DELAY` (milliseconds) overrides
/// this.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc 3's `mi_option_t`.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // mimalloc's own variable, when set, wins (its value in milliseconds; -1 never purges).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets an allocator option; called once, before this process starts threads.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Fixes the thread count candle's CPU matmul asks for: without `RAYON_NUM_THREADS` it counts
/// the physical cores by reading /proc/cpuinfo in every product (about 60 reads per decoded
/// token; 10% of a decoding step went to the kernel formatting that file). Set once here, to the
/// size of rayon's pool (which the variable also sets), before any thread exists.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY (edition 2021: safe): no other thread exists yet.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle's elementwise ops run on its own thread pool, whose worker spins 25,000 `pause`s
    // after each op before it sleeps (candle-core 0.11's DEFAULT_BARRIER_POOL_SPIN_LIMIT),
    // taking a core from rayon's workers that run our kernels. With 2,000 the decoder's
    // training step (quantized base) took 4-16% less time and batch-1 decoding 11-24% less
    // (two alternating runs each of `deltatune bench --task generate` on a 2-core Xeon;
    // batch 8 moved +5% and -14%; docs/speed.md).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

fn main() -> ExitCode {
    pin_thread_count();
    let cli = Cli::parse();
    if let Err(e) = choose_device(&cli) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Commands that compute on this thread run on a worker of rayon's pool instead: a parallel
    // op started from outside the pool parks this thread until a worker finishes and wakes it
    // (a futex sleep and wake per op, hundreds per decoded token), where a worker joins the
    // work and carries on. Commands that block on threads of their own (serving, load
    // generation, search workers) stay here, so no worker of the pool sits waiting.
    let on_pool = matches!(
        cli.command,
        Command::Train(_)
            | Command::Eval { .. }
            | Command::Predict { .. }
            | Command::Generate { .. }
            | Command::Merge { .. }
            | Command::Bench { .. }
    );
    if !matches!(cli.command, Command::Serve(_) | Command::Loadgen(_)) {
        keep_freed_memory();
    }
    let res = if on_pool {
        rayon::scope(move |_| run(cli))
    } else {
        run(cli)
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Puts what the command loads on `--device`, and passes the choice to the processes it starts
/// (search workers, experiment runs).
fn choose_device(cli: &Cli) -> anyhow::Result<()> {
    let device = deltatune_core::device::parse(&cli.device)?;
    if !device.is_cpu() {
        if matches!(cli.command, Command::Serve(_)) {
            anyhow::bail!(
                "`serve` runs on the CPU for now (its batched multi-adapter products are CPU \
                 kernels): drop `--device {}`",
                cli.device
            );
        }
        eprintln!("device: {}", deltatune_core::device::name(&device));
    }
    std::env::set_var("DELTATUNE_DEVICE", cli.device.trim());
    deltatune_core::device::set(device);
    Ok(())
}

/// Runs one command.
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fetch { cache } => commands::fetch(cache),
        Command::Convert {
            onnx,
            output,
            overwrite,
        } => commands::convert(&onnx, &output, overwrite),
        Command::Train(a) => train(&a),
        Command::Generate {
            adapter,
            model,
            cache,
            file,
            chat,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            int8_activations,
            dump_logits,
            texts,
        } => {
            let top_k = match top_k {
                Some(k) if k < 1 => {
                    anyhow::bail!("--top-k {k}: must be at least 1 (or leave it out: every token)")
                }
                k => k.map(|k| k as usize),
            };
            commands::lm::generate(&commands::lm::GenerateArgs {
                adapter,
                model,
                cache,
                file,
                texts,
                chat,
                config: deltatune_models::decoder::GenerateConfig {
                    max_new_tokens,
                    temperature,
                    top_k,
                    top_p,
                    seed,
                    stop,
                    int8_activations,
                },
                dump_logits,
            })
        }
        Command::Eval {
            adapter,
            data,
            batch_size,
            output,
        } => {
            if batch_size == Some(0) {
                Err(anyhow::anyhow!("--batch-size must be at least 1"))
            } else if commands::lm::is_decoder_adapter(&adapter) {
                commands::lm::eval(&adapter, data.as_deref(), batch_size, output.as_deref())
            } else if output.is_some() {
                Err(anyhow::anyhow!(
                    "--output writes a decoder's generations; {} is a classifier's adapter",
                    adapter.display()
                ))
            } else if commands::image::is_image_adapter(&adapter) {
                commands::image::eval(&adapter, data.as_deref(), batch_size.unwrap_or(32))
            } else {
                commands::eval(&adapter, data.as_deref(), batch_size.unwrap_or(64))
            }
        }
        Command::Predict {
            adapter,
            file,
            json,
            image,
            model,
            texts,
        } => {
            if !image.is_empty() || commands::image::is_image_adapter(&adapter) {
                if image.is_empty() {
                    Err(anyhow::anyhow!(
                        "{} is an image classifier's adapter: give images with --image FILE...",
                        adapter.display()
                    ))
                } else if !texts.is_empty() || file.is_some() {
                    Err(anyhow::anyhow!(
                        "give either texts (a text classifier's adapter) or --image files (an \
                         image classifier's), not both"
                    ))
                } else {
                    commands::image::predict(&adapter, &image, json)
                }
            } else {
                commands::predict(&adapter, model.as_deref(), file.as_deref(), &texts, json)
            }
        }
        Command::Merge {
            adapter,
            adapters,
            weights,
            combination,
            density,
            majority_sign,
            seed,
            output,
            overwrite,
        } => match adapter {
            Some(_) if !weights.is_empty() || density.is_some() => Err(anyhow::anyhow!(
                "--weights and --density combine adapters: use them with --adapters A,B,..."
            )),
            Some(adapter) => commands::merge(&adapter, &output, overwrite),
            None => commands::merge::combine_adapters(
                &adapters,
                &weights,
                &combination,
                density,
                &majority_sign,
                seed,
                &output,
                overwrite,
            ),
        },
        Command::Inspect(a) => a
            .resolve()
            .and_then(|s| s.map_or(Ok(()), |s| commands::inspect(&s))),
        Command::Experiment {
            which,
            methods,
            epochs,
            table,
            task,
            model,
            runs,
            overwrite,
        } => {
            let ExperimentKind::Methods = which;
            commands::experiment::experiment(task.name(), model.as_deref()).and_then(|exp| {
                let (r, t) = exp.default_paths();
                commands::experiment::methods(
                    exp,
                    &methods,
                    epochs,
                    &runs.unwrap_or(r),
                    &table.unwrap_or(t),
                    overwrite,
                )
            })
        }
        Command::Subspace {
            action,
            adapters,
            dim,
            origin,
            seed,
            output,
            overwrite,
        } => match action {
            SubspaceAction::Fit => {
                commands::subspace::fit(&adapters, dim, origin.as_deref(), &output, overwrite)
            }
            SubspaceAction::Random => match &origin {
                Some(o) => commands::subspace::random(o, dim, seed, &output, overwrite),
                None => Err(anyhow::anyhow!(
                    "`subspace random` needs --origin (a prompt-tuning adapter whose prompt is P0)"
                )),
            },
        },
        Command::Auto {
            run,
            budget,
            report,
            storage,
            candidates,
        } => commands::auto::parse_budget(&budget).and_then(|b| {
            let base = run.passthrough();
            run.resolve().and_then(|s| {
                s.map_or(Ok(()), |s| {
                    commands::auto::auto(&s, &base, b, report.as_deref(), &storage, candidates)
                })
            })
        }),
        Command::Search(a) => commands::search::search(&commands::search::SearchArgs {
            space: a.space,
            study: a.study,
            storage: a.storage,
            trials: a.trials,
            workers: a.workers,
            sampler: a.sampler,
            pruner: a.pruner,
            seed: a.seed,
            objective: a.objective,
            runs: a.runs,
            heartbeat: a.heartbeat,
            stale_timeout: a.stale_timeout,
            set: a.set,
            report_every_steps: a.report_every_steps,
            worker_only: a.worker_only,
        }),
        Command::Study {
            action,
            name,
            against,
            storage,
            format,
            output,
            overwrite,
        } => {
            let need = || {
                name.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "`study {}` needs the study name (see `study list`)",
                        action.name()
                    )
                })
            };
            match action {
                StudyAction::List => commands::study::list(&storage),
                StudyAction::Show => need().and_then(|n| commands::study::show(&storage, &n, 0)),
                StudyAction::Best => need().and_then(|n| commands::study::best_cmd(&storage, &n)),
                StudyAction::Export => need().and_then(|n| {
                    commands::study::export(
                        &storage,
                        &n,
                        format.name(),
                        output.as_deref(),
                        overwrite,
                    )
                }),
                StudyAction::Report => need().and_then(|n| {
                    let out = output
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(format!("runs/{n}-report.html")));
                    commands::study::report(&storage, &n, &out, overwrite)
                }),
                StudyAction::Compare => need().and_then(|n| {
                    let b = against.clone().ok_or_else(|| {
                        anyhow::anyhow!("`study compare A --against B` needs --against")
                    })?;
                    commands::study::compare(&storage, &n, &b)
                }),
            }
        }
        Command::Serve(a) => commands::serve::serve(&a),
        Command::Loadgen(a) => commands::serve::loadgen(&a),
        Command::Bench {
            run,
            steps,
            reference,
        } => run.resolve().and_then(|s| {
            s.map_or(Ok(()), |s| {
                if s.task == "generate" {
                    commands::bench_decoder(&s, steps, &reference)
                } else {
                    commands::bench(&s, steps, &reference)
                }
            })
        }),
    }
}
