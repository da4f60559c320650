//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint is a folder `e{epoch}-b{batch}` (zero-padded, so names sort in training order)
//! inside the run's checkpoint folder. It holds `state.json` (counters, metrics so far, the
//! best epoch), `tensors.safetensors` (the delta, AdamW's moments, the best epoch's delta) and
//! `manifest.json` (each file's size and SHA-256).
//! It is written under a temporary name and renamed when complete, so a kill at any moment
//! leaves only complete checkpoints under final names. The newest `keep` are kept.
//!
//! Reading one verifies the manifest and refuses NaN or infinity in its tensors; a damaged
//! newest checkpoint is set aside (renamed `damaged-*`) and the run resumes from the one
//! before, saying so. A checkpoint without a manifest (written before deltatune kept one) is
//! read with a note; its tensors are still checked.
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
/// The checksums of a checkpoint's files.
pub const MANIFEST_FILE: &str = "manifest.json";
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
    /// Whether its files were verified against a manifest (false: an older checkpoint
    /// without one).
    pub verified: bool,
}

/// One file's size and SHA-256 in a checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`: the checksums of a checkpoint's other files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub files: BTreeMap<String, FileSum>,
}

impl FileSum {
    fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            sha256: deltatune_data::sha256_bytes(bytes),
        }
    }
}

/// Why a checkpoint cannot be used: the file and what is wrong with it.
#[derive(Debug)]
pub struct Damage {
    pub file: PathBuf,
    pub why: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.why)
    }
}

/// Reading a checkpoint failed: it is damaged (another may be used), or something else is
/// wrong (an error for the run).
#[derive(Debug)]
pub enum ReadError {
    Damaged(Damage),
    Other(TrainError),
}

impl From<TrainError> for ReadError {
    fn from(e: TrainError) -> Self {
        ReadError::Other(e)
    }
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
/// Whether a folder name is a checkpoint's (`e0001-b0000012`).
pub fn is_checkpoint_name(name: &str) -> bool {
    name.starts_with('e') && name.contains("-b")
}

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
                    .is_some_and(is_checkpoint_name)
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
        let manifest = Manifest {
            format: FORMAT,
            files: BTreeMap::from([
                (STATE_FILE.to_string(), FileSum::of(s.as_bytes())),
                (TENSORS_FILE.to_string(), FileSum::of(&bytes)),
            ]),
        };
        let mut m = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        m.push('\n');
        deltatune_core::write_atomic(&tmp.join(MANIFEST_FILE), m.as_bytes())?;
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
        // Renamed out of the checkpoints' names first, so a process killed while removing it
        // never leaves a half-removed folder that looks like a checkpoint (the next run removes
        // the `.tmp-` folder).
        let gone = ck.dir.join(format!(
            ".tmp-removing-{}-{}",
            old.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        match std::fs::rename(old, &gone) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&gone);
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(old);
            }
        }
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

/// Reads one checkpoint folder: its manifest verified (when it has one), its tensors free of
/// NaN and infinity.
pub fn read(path: &Path) -> Result<Checkpoint> {
    read_checked(path).map_err(|e| match e {
        ReadError::Damaged(d) => {
            TrainError::Io(format!("checkpoint {} is damaged: {d}", path.display()))
        }
        ReadError::Other(e) => e,
    })
}

/// The file at `p`, read; a missing or unreadable file makes the checkpoint damaged.
fn read_file(p: &Path) -> std::result::Result<Vec<u8>, ReadError> {
    std::fs::read(p).map_err(|e| {
        ReadError::Damaged(Damage {
            file: p.to_path_buf(),
            why: if e.kind() == std::io::ErrorKind::NotFound {
                "missing".into()
            } else {
                format!("cannot be read ({e})")
            },
        })
    })
}

/// [`read`], telling a damaged checkpoint from other errors.
pub fn read_checked(path: &Path) -> std::result::Result<Checkpoint, ReadError> {
    let damaged = |file: &Path, why: String| {
        ReadError::Damaged(Damage {
            file: file.to_path_buf(),
            why,
        })
    };
    let sp = path.join(STATE_FILE);
    let tp = path.join(TENSORS_FILE);
    let mp = path.join(MANIFEST_FILE);
    let state_bytes = read_file(&sp)?;
    let tensor_bytes = read_file(&tp)?;
    let verified = mp.exists();
    if verified {
        let text = read_file(&mp)?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| damaged(&mp, format!("not a checkpoint manifest ({e})")))?;
        for (name, bytes) in [(STATE_FILE, &state_bytes), (TENSORS_FILE, &tensor_bytes)] {
            let file = path.join(name);
            let Some(want) = manifest.files.get(name) else {
                return Err(damaged(&mp, format!("it does not list {name}")));
            };
            let got = FileSum::of(bytes);
            if got.bytes != want.bytes {
                return Err(damaged(
                    &file,
                    format!(
                        "{} bytes, but the manifest says {} (the file was cut short or \
                         changed)",
                        got.bytes, want.bytes
                    ),
                ));
            }
            if got.sha256 != want.sha256 {
                return Err(damaged(
                    &file,
                    format!(
                        "its SHA-256 is {}, but the manifest says {} (its bytes changed after \
                         it was written)",
                        got.sha256, want.sha256
                    ),
                ));
            }
        }
    }
    let state: TrainState = serde_json::from_slice(&state_bytes)
        .map_err(|e| damaged(&sp, format!("not the state of a checkpoint ({e})")))?;
    if state.format != FORMAT {
        return Err(ReadError::Other(TrainError::Data(format!(
            "{} is checkpoint format {}, this deltatune reads format {FORMAT}",
            sp.display(),
            state.format
        ))));
    }
    let w = match deltatune_core::Weights::load(&tp, DType::F32) {
        Ok(w) => w,
        Err(deltatune_core::Error::NonFinite { key, found, .. }) => {
            return Err(damaged(&tp, format!("tensor `{key}` holds {found}")))
        }
        Err(deltatune_core::Error::Weights { msg, .. }) => return Err(damaged(&tp, msg)),
        Err(e) => return Err(ReadError::Other(e.into())),
    };
    let tensors = w
        .tensors()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        state,
        tensors,
        verified,
    })
}

/// The newest intact checkpoint in `dir`, if any. A damaged one is renamed `damaged-NAME`
/// (out of the way of pruning and of later resumes) and the one before it is used, with a
/// message saying so; when every checkpoint is damaged, an error names each and what to do.
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let all = list(dir)?;
    let mut damaged: Vec<(PathBuf, Damage)> = Vec::new();
    for p in all.iter().rev() {
        match read_checked(p) {
            Ok(ck) => {
                for (was, d) in &damaged {
                    // Set aside, so that pruning and later resumes pass it by.
                    let name = was.file_name().map(|n| n.to_string_lossy().to_string());
                    let aside = dir.join(format!("damaged-{}", name.unwrap_or_default()));
                    let _ = std::fs::remove_dir_all(&aside);
                    let kept = match std::fs::rename(was, &aside) {
                        Ok(()) => format!("; it is set aside as {}", aside.display()),
                        Err(_) => String::new(),
                    };
                    eprintln!("checkpoint {} is damaged ({d}){kept}", was.display());
                }
                if !damaged.is_empty() {
                    eprintln!(
                        "resuming from the newest intact checkpoint instead: {}",
                        p.display()
                    );
                }
                if !ck.verified {
                    eprintln!(
                        "note: checkpoint {} has no {MANIFEST_FILE} (written by an older \
                         deltatune): its files cannot be verified against checksums; its \
                         tensors were checked for NaN and infinity",
                        p.display()
                    );
                }
                return Ok(Some(ck));
            }
            Err(ReadError::Damaged(d)) => damaged.push((p.clone(), d)),
            Err(ReadError::Other(e)) => return Err(e),
        }
    }
    if damaged.is_empty() {
        return Ok(None);
    }
    let each: Vec<String> = damaged
        .iter()
        .map(|(was, d)| format!("{} ({d})", was.display()))
        .collect();
    Err(TrainError::Io(format!(
        "no intact checkpoint to resume from in {}: {} {} damaged. The run cannot continue: \
         start it over by deleting {} and running the same `deltatune train` command again",
        dir.display(),
        each.join("; "),
        if each.len() == 1 { "is" } else { "are" },
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn state(batch: usize) -> TrainState {
        TrainState {
            format: FORMAT,
            epoch: 1,
            batch,
            step: batch,
            loss_sum: 0.5 * batch as f64,
            n_loss: batch,
            seen: 4 * batch,
            epoch_seconds: 1.0,
            records: Vec::new(),
            best: None,
            since_best: 0,
            adam_step: batch,
            metrics_log_bytes: None,
            keys: vec!["w".into()],
        }
    }

    fn tensors(v: f32) -> BTreeMap<String, Tensor> {
        ["delta/w", "adam_m/w", "adam_v/w"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    Tensor::new(&[v, v + 1.0, v + 2.0], &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    /// A checkpoint folder with checkpoints at batches 1 and 2.
    fn two(dir: &Path) -> (PathBuf, PathBuf) {
        let ck = Checkpointing::new(dir);
        let a = write(&ck, &state(1), &tensors(1.0)).unwrap();
        let b = write(&ck, &state(2), &tensors(2.0)).unwrap();
        (a, b)
    }

    #[test]
    fn a_checkpoint_carries_a_manifest_and_reads_back_verified() {
        let d = tempfile::tempdir().unwrap();
        let (_, b) = two(d.path());
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(b.join(MANIFEST_FILE)).unwrap()).unwrap();
        let bytes = std::fs::read(b.join(TENSORS_FILE)).unwrap();
        assert_eq!(m.files[TENSORS_FILE], FileSum::of(&bytes));
        let ck = latest(d.path()).unwrap().unwrap();
        assert_eq!((ck.path, ck.state, ck.verified), (b, state(2), true));
        assert_eq!(
            ck.tensors["delta/w"].to_vec1::<f32>().unwrap(),
            [2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = two(d.path());
        // A same-size change of one byte of the tensor data (the last value's low byte).
        let tp = b.join(TENSORS_FILE);
        let mut bytes = std::fs::read(&tp).unwrap();
        let n = bytes.len();
        bytes[n - 4] ^= 1;
        std::fs::write(&tp, &bytes).unwrap();
        let e = read(&b).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "checkpoint {} is damaged: {}: its SHA-256 is ",
                b.display(),
                tp.display()
            )) && e.ends_with("(its bytes changed after it was written)"),
            "{e}"
        );
        let ck = latest(d.path()).unwrap().unwrap();
        assert_eq!((&ck.path, ck.state.batch), (&a, 1));
        // The damaged one is set aside: not listed, not pruned in place of a good one.
        let aside = d.path().join(format!("damaged-{}", name(1, 2)));
        assert!(aside.join(TENSORS_FILE).exists());
        assert_eq!(list(d.path()).unwrap(), std::slice::from_ref(&a));

        // Cut short: the size names it.
        let ck = Checkpointing::new(d.path());
        let b = write(&ck, &state(2), &tensors(2.0)).unwrap();
        let tp = b.join(TENSORS_FILE);
        let full = std::fs::read(&tp).unwrap();
        std::fs::write(&tp, &full[..full.len() - 10]).unwrap();
        let e = read(&b).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: {} bytes, but the manifest says {} (the file was cut short or changed)",
                tp.display(),
                full.len() - 10,
                full.len()
            )),
            "{e}"
        );
        // Both damaged: an error naming each and what to do.
        std::fs::write(a.join(STATE_FILE), b"{").unwrap();
        let e = latest(d.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "no intact checkpoint to resume from in {}: {} ({}: ",
                d.path().display(),
                b.display(),
                tp.display()
            )) && e.contains(&format!(
                "; {} ({}: ",
                a.display(),
                a.join(STATE_FILE).display()
            )) && e.ends_with(&format!(
                "are damaged. The run cannot continue: start it over by deleting {} and \
                     running the same `deltatune train` command again",
                d.path().display()
            )),
            "{e}"
        );
        // Nothing is moved when there is nothing to fall back to.
        assert_eq!(list(d.path()).unwrap(), [a, b]);
    }

    #[test]
    fn an_older_checkpoint_without_a_manifest_is_read_and_still_checked_for_nan() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = two(d.path());
        for p in [&a, &b] {
            std::fs::remove_file(p.join(MANIFEST_FILE)).unwrap();
        }
        let ck = read(&b).unwrap();
        assert!(!ck.verified);
        // NaN in the newest (no checksum to catch it): refused by the non-finite check.
        let tp = b.join(TENSORS_FILE);
        let mut t = tensors(2.0);
        t.insert(
            "adam_v/w".into(),
            Tensor::new(&[1f32, f32::NAN, 2.0], &Device::Cpu).unwrap(),
        );
        std::fs::write(&tp, deltatune_core::to_safetensors_bytes(&t).unwrap()).unwrap();
        assert_eq!(
            read(&b).unwrap_err().to_string(),
            format!(
                "checkpoint {} is damaged: {}: tensor `adam_v/w` holds 1 NaN among its 3 values \
                 (the first at index 1)",
                b.display(),
                tp.display()
            )
        );
        let ck = latest(d.path()).unwrap().unwrap();
        assert_eq!((ck.path, ck.verified), (a, false));
    }
}
