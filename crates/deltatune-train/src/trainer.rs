//! The training loop: AdamW, linear warm-up then decay, clipping, accumulation, evaluation on
//! dev each epoch, best checkpoint kept, early stopping, a JSONL metrics log and a progress bar.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Rng};
use deltatune_methods::Trainable;
use deltatune_models::{SequenceClassifier, TextBackbone};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpointing, TrainState};
use crate::metrics::{classification_metrics, ClassificationMetrics};
use crate::optim::{collect_grads, global_norm, linear_schedule, AdamW};
use crate::{Result, TrainError};

/// Training settings. Defaults are those of the PEFT reference run (`shared/reference`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set (default 3).
    pub epochs: usize,
    /// Examples per optimiser step before accumulation (default 32).
    pub batch_size: usize,
    /// Examples per evaluation batch (default 64).
    pub eval_batch_size: usize,
    /// Peak learning rate (default 5e-4).
    pub lr: f64,
    /// Fraction of all steps spent warming up, `ceil(ratio * total)` (default 0.06).
    pub warmup_ratio: f64,
    /// AdamW weight decay, never applied to biases and norms (default 0.0).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off (default 1.0).
    pub max_grad_norm: f64,
    /// Micro-batches per optimiser step (default 1).
    pub grad_accum: usize,
    /// Seed of shuffling, initialisation and dropout (default 42).
    pub seed: u64,
    /// Stop after this many epochs without a better dev accuracy (default: never).
    pub early_stopping_patience: Option<usize>,
    /// Shuffle within buckets of similar length, which pads less (default true: the default
    /// Rotten Tomatoes job's epoch takes 0.56x as long, test accuracy 0.825 against 0.827;
    /// docs/speed.md).
    pub group_by_length: bool,
    /// Training steps multiply by the frozen weights in bf16: rounded operands, f32 sums (a
    /// GGUF decoder's quantized weights through a bf16 copy made once, 4 bytes per weight;
    /// generation keeps the blocks);
    /// the deltas, norms, softmax, attention and optimizer stay f32, and so do evaluations, so
    /// the accuracy a run reports is what `predict` and `eval` give. Only where the CPU has
    /// AVX-512 BF16 and it measures faster than f32 (`ops::bf16_pays`); elsewhere f32 anyway (default true: an epoch of the default Rotten Tomatoes
    /// job takes 64.2 s against 75.3 s, test accuracy 0.8250 both; docs/speed.md).
    pub bf16: bool,
    /// Stop after this many optimiser steps (smoke tests; default: no limit).
    pub max_steps: Option<usize>,
    /// Delta parameters held at their initial value: a trainable whose key contains any of
    /// these strings is left out of the optimiser but still saved (default none). For
    /// baselines, e.g. `["intrinsic_z"]` keeps an intrinsic prompt at its random base prompt.
    pub freeze: Vec<String>,
    /// Also evaluate on dev every this many optimiser steps and log it (a metrics line with
    /// `eval` = k at step k * N), for pruners that want reports within an epoch (default: only
    /// after each epoch). These evaluations are reported only; the best epoch is still chosen
    /// from the epoch-end evaluations.
    pub eval_every_steps: Option<usize>,
    /// Write a checkpoint every this many optimiser steps, besides each epoch's end (default
    /// 100; unset: at epoch ends only). `deltatune train --resume OUTPUT` continues from the
    /// newest.
    pub checkpoint_every: Option<usize>,
    /// How many of the newest checkpoints to keep (default 2, at least 1).
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            eval_batch_size: 64,
            lr: 5e-4,
            warmup_ratio: 0.06,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            seed: 42,
            early_stopping_patience: None,
            group_by_length: true,
            bf16: true,
            max_steps: None,
            freeze: Vec::new(),
            eval_every_steps: None,
            checkpoint_every: Some(100),
            keep_checkpoints: 2,
        }
    }
}

impl TrainConfig {
    /// Rejects values outside their range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| Err(TrainError::Config(format!("`{field}` {msg}")));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if self.checkpoint_every == Some(0) {
            return bad(
                "checkpoint_every",
                "must be at least 1 (or unset: checkpoint at epoch ends only)",
            );
        }
        if self.max_steps == Some(0) {
            return bad(
                "max_steps",
                "must be at least 1 (or unset: train every epoch); 0 would train nothing",
            );
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints", "must be at least 1");
        }
        if self.eval_every_steps == Some(0) {
            return bad(
                "eval_every_steps",
                "must be at least 1 (or unset: evaluate after each epoch only)",
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Tokenised examples with label ids.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A task's dev metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DevScore {
    /// The share of examples predicted exactly: the label (classification) or the whole
    /// completion (generation: exact match). The trainer keeps the epoch where it is highest;
    /// search and `auto` maximise it.
    pub accuracy: f64,
    /// Macro-averaged F1 over the labels (classification only).
    pub macro_f1: Option<f64>,
    /// Edit distance between generated and reference completions over their
    /// whitespace-separated units, divided by the reference length (generation only; for G2P
    /// the phoneme error rate).
    pub error_rate: Option<f64>,
}

impl DevScore {
    /// `dev accuracy 0.8123, dev macro-F1 0.8012` or `dev exact match ..., dev error rate ...`.
    pub fn describe(&self) -> String {
        match (self.macro_f1, self.error_rate) {
            (Some(f1), _) => format!("dev accuracy {:.4}, dev macro-F1 {f1:.4}", self.accuracy),
            (None, Some(er)) => format!(
                "dev exact match {:.4}, dev error rate {er:.4}",
                self.accuracy
            ),
            (None, None) => format!("dev accuracy {:.4}", self.accuracy),
        }
    }
}

/// What the trainer needs from a task: batches of training examples turned into a loss, and a
/// dev evaluation. The model, the data and the loss all live behind it, so one loop trains
/// every family and task kind.
pub trait Task {
    /// Number of training examples.
    fn train_len(&self) -> usize;
    /// Length in tokens of training example `i` (batches of similar lengths pad less).
    fn train_example_len(&self, i: usize) -> usize;
    /// The mean loss over the training examples `idx` (a scalar in the autograd graph).
    fn loss(&self, idx: &[usize], ctx: &Ctx) -> Result<Tensor>;
    /// Metrics on the dev set.
    fn evaluate_dev(&self, batch_size: usize) -> Result<DevScore>;
    /// The batches the trainer will ask [`Task::loss`] for in (the rest of) epoch `epoch`.
    fn begin_epoch(&self, _epoch: usize, _batches: &[Vec<usize>]) {}
}

/// Examples a model reads in batches: tokenised texts for a text backbone, images for a vision
/// one. `idx` picks the examples of a batch.
pub trait Examples<M: deltatune_models::Backbone + ?Sized> {
    /// Number of examples.
    fn count(&self) -> usize;
    /// The cost of example `i` in positions (batches of similar lengths pad less).
    fn example_len(&self, i: usize) -> usize;
    /// The batch of examples `idx`.
    fn batch(&self, model: &M, idx: &[usize]) -> Result<M::Batch>;
    /// The trainer's plan for (the rest of) an epoch: the batches it will ask for, in order
    /// (data that is slow to prepare starts on them now; augmentation reads the epoch).
    fn begin_epoch(&self, _epoch: usize, _batches: &[Vec<usize>]) {}
}

/// Examples with a class label each.
pub trait Labelled<M: deltatune_models::Backbone + ?Sized>: Examples<M> {
    /// The class of example `i`.
    fn label(&self, i: usize) -> u32;
}

impl<M: TextBackbone + ?Sized> Examples<M> for [Vec<u32>] {
    fn count(&self) -> usize {
        self.len()
    }

    fn example_len(&self, i: usize) -> usize {
        self[i].len()
    }

    fn batch(&self, model: &M, idx: &[usize]) -> Result<M::Batch> {
        let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| self[i].clone()).collect();
        Ok(model.token_batch(&seqs)?)
    }
}

impl<M: TextBackbone + ?Sized> Examples<M> for Vec<Vec<u32>> {
    fn count(&self) -> usize {
        self.len()
    }

    fn example_len(&self, i: usize) -> usize {
        self[i].len()
    }

    fn batch(&self, model: &M, idx: &[usize]) -> Result<M::Batch> {
        self.as_slice().batch(model, idx)
    }
}

impl<M: TextBackbone + ?Sized> Examples<M> for Encoded {
    fn count(&self) -> usize {
        self.len()
    }

    fn example_len(&self, i: usize) -> usize {
        self.ids[i].len()
    }

    fn batch(&self, model: &M, idx: &[usize]) -> Result<M::Batch> {
        self.ids.as_slice().batch(model, idx)
    }
}

impl<M: TextBackbone + ?Sized> Labelled<M> for Encoded {
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
}

/// Sequence classification with any classifier (the BERT-family encoder today): cross-entropy
/// on the labels; dev scored by accuracy and macro-F1.
pub struct ClassificationTask<'a, M: SequenceClassifier, D: Labelled<M>> {
    pub model: &'a M,
    pub train: &'a D,
    pub dev: &'a D,
}

impl<M: SequenceClassifier, D: Labelled<M>> Task for ClassificationTask<'_, M, D> {
    fn train_len(&self) -> usize {
        self.train.count()
    }

    fn train_example_len(&self, i: usize) -> usize {
        self.train.example_len(i)
    }

    fn loss(&self, idx: &[usize], ctx: &Ctx) -> Result<Tensor> {
        let labels: Vec<u32> = idx.iter().map(|&i| self.train.label(i)).collect();
        let batch = self.train.batch(self.model, idx)?;
        let logits = self.model.classify(&batch, ctx)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits,
            &labels_tensor(&labels, self.model.device())?,
        )?)
    }

    fn begin_epoch(&self, epoch: usize, batches: &[Vec<usize>]) {
        self.train.begin_epoch(epoch, batches);
    }

    fn evaluate_dev(&self, batch_size: usize) -> Result<DevScore> {
        let (m, _) = evaluate(self.model, self.dev, batch_size)?;
        Ok(DevScore {
            accuracy: m.accuracy,
            macro_f1: Some(m.macro_f1),
            error_rate: None,
        })
    }
}

/// One line of the metrics log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    /// See [`DevScore::accuracy`] (exact match for generation).
    pub dev_accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_macro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_error_rate: Option<f64>,
    pub train_seconds: f64,
    pub examples_per_second: f64,
    pub lr: f64,
}

/// A metrics line of an evaluation within an epoch (`train.eval_every_steps`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepEval {
    /// k for the k-th such evaluation, made after k * eval_every_steps optimiser steps.
    pub eval: usize,
    pub step: usize,
    pub epoch: usize,
    pub dev_accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_macro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_error_rate: Option<f64>,
}

/// What a training run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best_dev_accuracy: f64,
    pub stopped_early: bool,
}

/// Batches of indices for one epoch.
fn epoch_batches(task: &dyn Task, cfg: &TrainConfig, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(cfg.seed).derive(&format!("shuffle/{epoch}"));
    let mut order: Vec<usize> = (0..task.train_len()).collect();
    rng.shuffle(&mut order);
    let mut batches: Vec<Vec<usize>> = if cfg.group_by_length {
        // Sort within mega-batches of 50 batches by length, then shuffle the batches.
        let mega = cfg.batch_size * 50;
        let mut out = Vec::new();
        for chunk in order.chunks(mega) {
            let mut c = chunk.to_vec();
            c.sort_by_key(|&i| std::cmp::Reverse(task.train_example_len(i)));
            out.extend(c.chunks(cfg.batch_size).map(|b| b.to_vec()));
        }
        rng.shuffle(&mut out);
        out
    } else {
        order.chunks(cfg.batch_size).map(|b| b.to_vec()).collect()
    };
    batches.retain(|b| !b.is_empty());
    batches
}

fn labels_tensor(labels: &[u32], device: &candle_core::Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(labels, labels.len(), device)
}

/// Trains `trainables` (already attached to `model`) on `train`, evaluating on `dev` after each
/// epoch. The best epoch's values are restored at the end. Each epoch's record is appended to
/// `metrics_log` as one JSON line.
pub fn train<M: SequenceClassifier, D: Labelled<M>>(
    model: &M,
    trainables: &[Trainable],
    train: &D,
    dev: &D,
    cfg: &TrainConfig,
    metrics_log: Option<&Path>,
    show_progress: bool,
) -> Result<TrainReport> {
    let task = ClassificationTask { model, train, dev };
    train_task(&task, trainables, cfg, metrics_log, show_progress)
}

/// Trains `trainables` (already attached to the task's model) on the task's training set,
/// evaluating on dev after each epoch; the best epoch's values are restored at the end. Each
/// epoch's record is appended to `metrics_log` as one JSON line.
pub fn train_task(
    task: &dyn Task,
    trainables: &[Trainable],
    cfg: &TrainConfig,
    metrics_log: Option<&Path>,
    show_progress: bool,
) -> Result<TrainReport> {
    train_task_with(
        task,
        trainables,
        cfg,
        &TrainOptions {
            metrics_log,
            show_progress,
            checkpoints: None,
        },
    )
}

/// How a run reports and checkpoints.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions<'a> {
    /// Each epoch's record (and step evaluations) appended as JSON lines.
    pub metrics_log: Option<&'a Path>,
    /// Progress bars on the terminal.
    pub show_progress: bool,
    /// Checkpoint (and resume from the newest checkpoint in the folder, if any).
    pub checkpoints: Option<&'a Checkpointing>,
}

/// The running sums of the epoch in progress.
#[derive(Debug, Clone, Copy, Default)]
struct EpochSums {
    loss_sum: f64,
    n_loss: usize,
    seen: usize,
    seconds_before: f64,
}

/// [`train_task`] with checkpoints: when `opts.checkpoints` names a folder that holds one, the
/// run continues from the newest (delta, optimiser, counters, metrics log restored exactly);
/// it writes one at each epoch end and every `every_steps` optimiser steps, and on a stop
/// request writes one and returns [`TrainError::Interrupted`].
pub fn train_task_with(
    task: &dyn Task,
    trainables: &[Trainable],
    cfg: &TrainConfig,
    opts: &TrainOptions,
) -> Result<TrainReport> {
    cfg.validate()?;
    if task.train_len() == 0 {
        return Err(TrainError::Data("the training set is empty".into()));
    }
    if trainables.is_empty() {
        return Err(TrainError::Config(
            "the delta has no trainable parameters".into(),
        ));
    }
    let vars: Vec<_> = trainables.iter().map(|t| t.var.clone()).collect();
    let keys: Vec<String> = trainables.iter().map(|t| t.key.clone()).collect();
    let mut opt = AdamW::new(
        trainables
            .iter()
            .map(|t| (t.var.clone(), t.decay))
            .collect(),
        cfg.weight_decay,
    )?;
    opt.set_lr_scales(trainables.iter().map(|t| t.lr_scale).collect());
    let micro_per_epoch = task.train_len().div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_ratio * total_steps as f64).ceil() as usize;

    let mut records = Vec::new();
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut since_best = 0;
    let mut step = 0usize;
    let mut stopped_early = false;
    let (mut start_epoch, mut start_batch) = (1usize, 0usize);
    let mut resumed_sums = EpochSums::default();
    let mut log_len = None;
    if let Some(ck) = opts
        .checkpoints
        .and_then(|c| checkpoint::latest(&c.dir).transpose())
    {
        let ck = ck?;
        let st = &ck.state;
        if st.keys != keys {
            return Err(TrainError::Config(format!(
                "checkpoint {} holds the delta tensors [{}], this run has [{}]: it was written \
                 by another method or model (delete the checkpoint folder to start over)",
                ck.path.display(),
                st.keys.join(", "),
                keys.join(", ")
            )));
        }
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (var, k) in vars.iter().zip(&keys) {
            var.set(&ck.tensor("delta", k)?)?;
            m.push(ck.tensor("adam_m", k)?);
            v.push(ck.tensor("adam_v", k)?);
        }
        opt.set_state(st.adam_step, m, v)?;
        if let Some((acc, epoch)) = st.best {
            let snap = keys
                .iter()
                .map(|k| ck.tensor("best", k))
                .collect::<Result<Vec<_>>>()?;
            best = Some((acc, epoch, snap));
        }
        records = st.records.clone();
        since_best = st.since_best;
        step = st.step;
        (start_epoch, start_batch) = (st.epoch, st.batch);
        resumed_sums = EpochSums {
            loss_sum: st.loss_sum,
            n_loss: st.n_loss,
            seen: st.seen,
            seconds_before: st.epoch_seconds,
        };
        log_len = st.metrics_log_bytes;
        eprintln!(
            "resuming from {} (epoch {}, batch {}, step {step})",
            ck.path.display(),
            st.epoch,
            st.batch
        );
    }

    let mut log = match opts.metrics_log {
        Some(p) => {
            if let Some(n) = log_len {
                // Lines written after the checkpoint are written again by the resumed run.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
                    .map_err(|e| TrainError::Io(format!("opening {}: {e}", p.display())))?;
                f.set_len(n)
                    .map_err(|e| TrainError::Io(format!("truncating {}: {e}", p.display())))?;
            }
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| TrainError::Io(format!("opening {}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let stop_requested = || {
        opts.checkpoints
            .and_then(|c| c.stop.as_ref())
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    };
    // Writes a checkpoint of the state at a batch boundary.
    let save = |epoch: usize,
                batch: usize,
                step: usize,
                sums: EpochSums,
                records: &Vec<EpochRecord>,
                best: &Option<(f64, usize, Vec<Tensor>)>,
                since_best: usize,
                opt: &AdamW,
                log: &mut Option<std::fs::File>|
     -> Result<Option<PathBuf>> {
        let Some(ck) = opts.checkpoints else {
            return Ok(None);
        };
        let log_bytes = match log.as_mut() {
            Some(f) => {
                f.flush()
                    .map_err(|e| TrainError::Io(format!("writing metrics log: {e}")))?;
                Some(
                    f.metadata()
                        .map_err(|e| TrainError::Io(format!("metrics log: {e}")))?
                        .len(),
                )
            }
            None => None,
        };
        let (adam_step, m, v) = opt.state();
        let mut tensors = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            tensors.insert(format!("delta/{k}"), vars[i].as_tensor().detach());
            tensors.insert(format!("adam_m/{k}"), m[i].clone());
            tensors.insert(format!("adam_v/{k}"), v[i].clone());
            if let Some((_, _, snap)) = best {
                tensors.insert(format!("best/{k}"), snap[i].clone());
            }
        }
        let state = TrainState {
            format: checkpoint::FORMAT,
            epoch,
            batch,
            step,
            loss_sum: sums.loss_sum,
            n_loss: sums.n_loss,
            seen: sums.seen,
            epoch_seconds: sums.seconds_before,
            records: records.clone(),
            best: best.as_ref().map(|(a, e, _)| (*a, *e)),
            since_best,
            adam_step,
            metrics_log_bytes: log_bytes,
            keys: keys.clone(),
        };
        Ok(Some(checkpoint::write(ck, &state, &tensors)?))
    };
    let every = opts.checkpoints.and_then(|c| c.every_steps);
    'epochs: for epoch in start_epoch..=cfg.epochs {
        if cfg.max_steps.is_some_and(|m| step >= m) {
            break;
        }
        let batches = epoch_batches(task, cfg, epoch);
        let first = if epoch == start_epoch { start_batch } else { 0 };
        let sums0 = if epoch == start_epoch {
            resumed_sums
        } else {
            EpochSums::default()
        };
        task.begin_epoch(epoch, &batches[first.min(batches.len())..]);
        let bar = progress_bar(batches.len() as u64, epoch, cfg.epochs, opts.show_progress);
        bar.set_position(first as u64);
        let t0 = Instant::now();
        let (mut loss_sum, mut n_loss, mut seen) = (sums0.loss_sum, sums0.n_loss, sums0.seen);
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut micro = 0usize;
        for (bi, idx) in batches.iter().enumerate().skip(first) {
            let ctx = Ctx::train(Rng::new(cfg.seed).derive(&format!("dropout/{epoch}/{bi}")));
            let loss = task.loss(idx, &ctx)?;
            let loss_v = loss.to_scalar::<f32>()? as f64;
            if !loss_v.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "the loss became {loss_v} at epoch {epoch}, step {step}, batch {bi} \
                     (learning rate {:.3e}); lower the learning rate or check the data",
                    linear_schedule(step, warmup, total_steps, cfg.lr)
                )));
            }
            let grads = collect_grads(&loss.backward()?, &vars);
            for (a, g) in acc.iter_mut().zip(grads) {
                *a = match (a.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
            micro += 1;
            loss_sum += loss_v;
            n_loss += 1;
            seen += idx.len();
            if micro == cfg.grad_accum || bi + 1 == batches.len() {
                let scale = 1.0 / micro as f64;
                let mut clip = 1.0;
                if cfg.max_grad_norm > 0.0 {
                    let norm = global_norm(&acc)? * scale;
                    if !norm.is_finite() {
                        return Err(TrainError::NonFinite(format!(
                            "the gradient norm became {norm} at epoch {epoch}, step {step}; lower the learning rate"
                        )));
                    }
                    if norm > cfg.max_grad_norm {
                        clip = cfg.max_grad_norm / (norm + 1e-6);
                    }
                }
                let lr = linear_schedule(step, warmup, total_steps, cfg.lr);
                opt.step(&acc, lr, scale * clip)?;
                acc = vec![None; vars.len()];
                micro = 0;
                step += 1;
                if let Some(n) = cfg.eval_every_steps.filter(|&n| step.is_multiple_of(n)) {
                    let m = task.evaluate_dev(cfg.eval_batch_size)?;
                    let rec = StepEval {
                        eval: step / n,
                        step,
                        epoch,
                        dev_accuracy: m.accuracy,
                        dev_macro_f1: m.macro_f1,
                        dev_error_rate: m.error_rate,
                    };
                    let msg = format!("step {step}: {}", m.describe());
                    if bar.is_hidden() {
                        eprintln!("{msg}");
                    } else {
                        bar.println(msg);
                    }
                    if let Some(f) = log.as_mut() {
                        let line = serde_json::to_string(&rec).expect("record serialises");
                        writeln!(f, "{line}")
                            .map_err(|e| TrainError::Io(format!("writing metrics log: {e}")))?;
                    }
                }
                let stop = stop_requested();
                if stop || every.is_some_and(|n| step.is_multiple_of(n)) {
                    let sums = EpochSums {
                        loss_sum,
                        n_loss,
                        seen,
                        seconds_before: sums0.seconds_before + t0.elapsed().as_secs_f64(),
                    };
                    let path = save(
                        epoch,
                        bi + 1,
                        step,
                        sums,
                        &records,
                        &best,
                        since_best,
                        &opt,
                        &mut log,
                    )?;
                    if stop {
                        bar.finish_and_clear();
                        return Err(TrainError::Interrupted { checkpoint: path });
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4} | {:.1} ex/s",
                loss_sum / n_loss.max(1) as f64,
                (seen - sums0.seen) as f64 / secs.max(1e-9)
            ));
            bar.inc(1);
            if cfg.max_steps.is_some_and(|m| step >= m) {
                break;
            }
        }
        bar.finish_and_clear();
        let train_seconds = sums0.seconds_before + t0.elapsed().as_secs_f64();
        let m = task.evaluate_dev(cfg.eval_batch_size)?;
        let rec = EpochRecord {
            epoch,
            step,
            train_loss: loss_sum / n_loss.max(1) as f64,
            dev_accuracy: m.accuracy,
            dev_macro_f1: m.macro_f1,
            dev_error_rate: m.error_rate,
            train_seconds,
            examples_per_second: seen as f64 / train_seconds.max(1e-9),
            lr: linear_schedule(step, warmup, total_steps, cfg.lr),
        };
        {
            eprintln!(
                "epoch {epoch}/{}: train loss {:.4}, {}, {:.0} s ({:.1} ex/s)",
                cfg.epochs,
                rec.train_loss,
                m.describe(),
                train_seconds,
                rec.examples_per_second
            );
        }
        if let Some(f) = log.as_mut() {
            let line = serde_json::to_string(&rec).expect("record serialises");
            writeln!(f, "{line}")
                .map_err(|e| TrainError::Io(format!("writing metrics log: {e}")))?;
        }
        records.push(rec);
        if best.as_ref().is_none_or(|(acc, _, _)| m.accuracy > *acc) {
            let snapshot = vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            best = Some((m.accuracy, epoch, snapshot));
            since_best = 0;
        } else {
            since_best += 1;
            if cfg.early_stopping_patience.is_some_and(|p| since_best >= p) {
                stopped_early = true;
                break 'epochs;
            }
        }
        {
            // Also after the last epoch: a run that fails while testing or saving resumes
            // straight to that.
            let path = save(
                epoch + 1,
                0,
                step,
                EpochSums::default(),
                &records,
                &best,
                since_best,
                &opt,
                &mut log,
            )?;
            if stop_requested() {
                return Err(TrainError::Interrupted { checkpoint: path });
            }
        }
        if cfg.max_steps.is_some_and(|m| step >= m) {
            break;
        }
    }
    let (best_acc, best_epoch, snapshot) = best.ok_or_else(|| {
        TrainError::Config(format!(
            "nothing left to train: the checkpoint is past the last of {} epochs",
            cfg.epochs
        ))
    })?;
    for (v, t) in vars.iter().zip(&snapshot) {
        v.set(t)?;
    }
    Ok(TrainReport {
        epochs: records,
        best_epoch,
        best_dev_accuracy: best_acc,
        stopped_early,
    })
}

fn progress_bar(len: u64, epoch: usize, epochs: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} steps | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// Class probabilities of every example, batched by similar length.
pub fn predict_proba<M: SequenceClassifier, D: Examples<M> + ?Sized>(
    model: &M,
    data: &D,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..data.count()).collect();
    order.sort_by_key(|&i| data.example_len(i));
    let mut out = vec![Vec::new(); data.count()];
    let ctx = Ctx::inference();
    for chunk in order.chunks(batch_size.max(1)) {
        let logits = model.classify(&data.batch(model, chunk)?, &ctx)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
        for (&i, p) in chunk.iter().zip(probs) {
            out[i] = p;
        }
    }
    Ok(out)
}

/// Accuracy and macro-F1 on `data`, and the predicted label of each example.
pub fn evaluate<M: SequenceClassifier, D: Labelled<M> + ?Sized>(
    model: &M,
    data: &D,
    batch_size: usize,
) -> Result<(ClassificationMetrics, Vec<u32>)> {
    let probs = predict_proba(model, data, batch_size)?;
    let pred: Vec<u32> = probs
        .iter()
        .map(|p| {
            p.iter()
                .enumerate()
                .fold(
                    (0usize, f32::MIN),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32
        })
        .collect();
    let labels: Vec<u32> = (0..data.count()).map(|i| data.label(i)).collect();
    Ok((
        classification_metrics(&pred, &labels, model.num_labels()),
        pred,
    ))
}
