//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint is a folder `e{epoch}-b{batch}` (zero-padded, so names sort in training order)
//! inside the run's checkpoint folder. It holds `state.json` (counters, metrics so far, the
//! best epoch) and `tensors.safetensors` (the delta, AdamW's moments, the best epoch's delta).
//! It is written under a temporary name and renamed when complete, so a kill at any moment
//! leaves only complete checkpoints under final names. The newest `keep` are kept.
//!
//! Resuming restores the delta, the optimiser and the counters bit for bit. Shuffling and
//! dropout draw from streams derived from (seed, epoch, batch), so a resumed run takes the same
//! batches and dropout masks as the uninterrupted one and ends with the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::trainer::EpochRecord;
use crate::{Result, TrainError};

/// The state file of a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// The tensor file of a checkpoint.
pub const TENSORS_FILE: &str = "tensors.safetensors";
/// The version of the checkpoint layout this build writes and reads.
pub const FORMAT: u32 = 1;

/// Where and how often the trainer checkpoints.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The run's checkpoint folder (created if missing).
    pub dir: PathBuf,
    /// Also checkpoint every this many optimiser steps (default: only at epoch ends).
    pub every_steps: Option<usize>,
    /// How many of the newest checkpoints to keep (at least 1).
    pub keep: usize,
    /// Set (by a signal handler) to stop: the trainer finishes the step it is in, writes a
    /// checkpoint and returns [`TrainError::Interrupted`].
    pub stop: Option<Arc<AtomicBool>>,
}

impl Checkpointing {
    /// Checkpoints in `dir` at epoch ends only, keeping 2.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            every_steps: None,
            keep: 2,
            stop: None,
        }
    }
}

/// The counters and metrics of a run at a batch boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The epoch to continue (1-based).
    pub epoch: usize,
    /// The next batch of that epoch (0 at an epoch's start).
    pub batch: usize,
    /// Optimiser steps taken.
    pub step: usize,
    /// The epoch's running loss sum, loss count and examples seen so far.
    pub loss_sum: f64,
    pub n_loss: usize,
    pub seen: usize,
    /// Seconds the epoch has trained so far.
    pub epoch_seconds: f64,
    /// The finished epochs' records.
    pub records: Vec<EpochRecord>,
    /// The best dev score so far and its epoch; its delta is in the tensor file under `best/`.
    pub best: Option<(f64, usize)>,
    /// Epochs since the best one (early stopping).
    pub since_best: usize,
    /// AdamW's step count.
    pub adam_step: usize,
    /// The metrics log's length in bytes at this point (it is cut back to it on resume).
    pub metrics_log_bytes: Option<u64>,
    /// The trainable keys in optimiser order (a resumed run must have the same).
    pub keys: Vec<String>,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub state: TrainState,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// The tensor stored under `group/key` (`delta`, `adam_m`, `adam_v`, `best`).
    pub fn tensor(&self, group: &str, key: &str) -> Result<Tensor> {
        let k = format!("{group}/{key}");
        self.tensors.get(&k).cloned().ok_or_else(|| {
            TrainError::Data(format!(
                "checkpoint {} lacks tensor `{k}`; it was not written by this run (delete it to \
                 start over)",
                self.path.display()
            ))
        })
    }
}

/// The folder name of the checkpoint at (epoch, batch).
pub fn name(epoch: usize, batch: usize) -> String {
    format!("e{epoch:04}-b{batch:07}")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{what} {}: {e}", path.display()))
}

/// The complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io("reading the checkpoint folder", dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('e') && n.contains("-b"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Writes a checkpoint into `ck.dir` (temporary folder, then rename) and prunes all but the
/// newest `ck.keep`. Returns its path.
pub fn write(
    ck: &Checkpointing,
    state: &TrainState,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(&ck.dir).map_err(|e| io("creating", &ck.dir, e))?;
    remove_unfinished(&ck.dir);
    let final_path = ck.dir.join(name(state.epoch, state.batch));
    let tmp = ck.dir.join(format!(
        ".tmp-{}-{}",
        name(state.epoch, state.batch),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| io("creating", &tmp, e))?;
    let res = (|| -> Result<()> {
        let bytes = deltatune_core::to_safetensors_bytes(tensors)?;
        deltatune_core::write_atomic(&tmp.join(TENSORS_FILE), &bytes)?;
        let mut s = serde_json::to_string_pretty(state).expect("state serialises");
        s.push('\n');
        deltatune_core::write_atomic(&tmp.join(STATE_FILE), s.as_bytes())?;
        if final_path.exists() {
            std::fs::remove_dir_all(&final_path).map_err(|e| io("replacing", &final_path, e))?;
        }
        std::fs::rename(&tmp, &final_path).map_err(|e| io("renaming into", &final_path, e))?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        if let TrainError::Core(deltatune_core::Error::DiskFull { bytes, free, .. }) = &e {
            let newest = list(&ck.dir)?;
            return Err(TrainError::Io(format!(
                "no space left on the device writing checkpoint {} ({bytes} bytes needed for its \
                 tensors, {free} free); {}. Free some space and continue with `deltatune train \
                 --resume`",
                final_path.display(),
                match newest.last() {
                    Some(p) => format!("the newest complete checkpoint {} is intact", p.display()),
                    None => "no checkpoint was complete yet".into(),
                }
            )));
        }
        return Err(e);
    }
    // The rename is durable once the folder's entry is on disk.
    if let Ok(d) = std::fs::File::open(&ck.dir) {
        let _ = d.sync_all();
    }
    let all = list(&ck.dir)?;
    for old in all.iter().take(all.len().saturating_sub(ck.keep.max(1))) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_path)
}

/// Removes the temporary folders of checkpoints that were never completed (the writer was
/// killed); complete checkpoints are never named `.tmp-*`.
fn remove_unfinished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mine = format!("-{}", std::process::id());
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(".tmp-") && !n.ends_with(&mine) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Reads one checkpoint folder.
pub fn read(path: &Path) -> Result<Checkpoint> {
    let sp = path.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).map_err(|e| io("reading", &sp, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| {
        TrainError::Data(format!(
            "{}: {e} (a damaged checkpoint; delete its folder to resume from the one before)",
            sp.display()
        ))
    })?;
    if state.format != FORMAT {
        return Err(TrainError::Data(format!(
            "{} is checkpoint format {}, this deltatune reads format {FORMAT}",
            sp.display(),
            state.format
        )));
    }
    let tp = path.join(TENSORS_FILE);
    let w = deltatune_core::Weights::load(&tp, DType::F32)?;
    let tensors = w
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        state,
        tensors,
    })
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    match list(dir)?.last() {
        Some(p) => Ok(Some(read(p)?)),
        None => Ok(None),
    }
}
