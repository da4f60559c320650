//! Checkpoints of `train` runs and `train --resume OUTPUT`.
//!
//! A run with output `runs/x` keeps its checkpoints in `runs/x.checkpoints/`: the resolved
//! settings (`settings.json`, written before the first step), the metrics log so far, and the
//! newest checkpoint folders (see `deltatune_train::checkpoint`). A finished run removes the
//! folder once its output is in place. SIGINT or SIGTERM makes the trainer finish its step,
//! write a checkpoint and stop; `train --resume runs/x` continues from the newest checkpoint
//! with the saved settings.
//!
//! The run also records its data (`data.json`: each data file's size and SHA-256; for an image
//! folder each image's relative path, size and SHA-256) and a resume whose data differ is
//! refused, naming the file: a resumed run must train on what the run started with.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use deltatune_train::artifact::{Staging, METRICS};
use deltatune_train::Checkpointing;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::settings::{Settings, Source};

/// The resolved settings of the run, in its checkpoint folder.
pub const SETTINGS_FILE: &str = "settings.json";

/// The record of the run's data files, in its checkpoint folder.
pub const DATA_FILE: &str = "data.json";

/// The precision the run's frozen products use (`{"bf16": true}`), decided by its first
/// process and kept by a resumed one.
pub const PRODUCTS_FILE: &str = "products.json";

/// Settings a resumed run may change: they do not change what the finished steps computed.
pub const MAY_CHANGE: &[&str] = &[
    "train.epochs",
    "train.early_stopping_patience",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "train.max_steps",
    "progress",
    "cache",
];

/// The checkpoint folder of a run writing `output`: `output` with `.checkpoints` appended.
pub fn checkpoint_dir(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "run".into());
    name.push(".checkpoints");
    output.with_file_name(name)
}

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    if let Some(flag) = STOP.get() {
        if flag.swap(true, Ordering::SeqCst) {
            // A second signal: stop now (the newest checkpoint stays as it was).
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
}

/// The flag SIGINT and SIGTERM set (the handlers are installed on the first call).
fn stop_flag() -> Arc<AtomicBool> {
    STOP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        // SAFETY: the handler only touches an atomic through an initialised OnceLock, and
        // calls _exit; both are async-signal-safe.
        unsafe {
            let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
        flag
    })
    .clone()
}

/// A run's checkpointing: the folder, prepared before training starts.
pub struct RunCheckpoints {
    pub dir: PathBuf,
    pub checkpointing: Checkpointing,
    /// Whether this run continues an interrupted one.
    pub resume: bool,
}

impl RunCheckpoints {
    /// Prepares the checkpoint folder of `s.output`. A fresh run refuses a folder that holds an
    /// interrupted run (so it is never overwritten by accident) and records the settings; a
    /// resumed run needs the folder. Fails before any training when the folder is not writable.
    pub fn prepare(s: &Settings, resume: bool) -> Result<Self> {
        let dir = checkpoint_dir(&s.output);
        if dir.exists() && !dir.is_dir() {
            bail!(
                "{} exists and is not a folder; deltatune keeps the run's checkpoints there: \
                 move it away",
                dir.display()
            );
        }
        // A folder of that name that deltatune did not make is the user's: never written into
        // or removed. deltatune's holds its settings, metrics log, search attempt number or
        // checkpoint folders.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let ours = |n: &String| {
                [SETTINGS_FILE, METRICS, "attempt"].contains(&n.as_str())
                    || n.starts_with(".tmp-")
                    || deltatune_train::checkpoint::is_checkpoint_name(n)
            };
            if !names.is_empty() && !names.iter().any(ours) {
                bail!(
                    "{} holds files deltatune did not write ({}); deltatune keeps the run's \
                     checkpoints in a folder of that name and removes it when the run ends: \
                     move it away or choose another --output",
                    dir.display(),
                    deltatune_train::artifact::some_names(&names)
                );
            }
        }
        let held = deltatune_train::checkpoint::list(&dir)?;
        if !resume && !held.is_empty() {
            bail!(
                "{} holds an interrupted run (newest checkpoint {}); continue it with \
                 `deltatune train --resume {}`, or delete that folder to start over",
                dir.display(),
                held.last().unwrap().display(),
                s.output.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the checkpoint folder {}; choose a writable --output",
                dir.display()
            )
        })?;
        if !resume {
            let mut text = serde_json::to_string_pretty(s)?;
            text.push('\n');
            deltatune_core::write_atomic(&dir.join(SETTINGS_FILE), text.as_bytes())?;
            // A fresh run's log starts empty.
            let _ = std::fs::remove_file(dir.join(METRICS));
        }
        // The frozen products' precision is measured once, by the run's first process, and a
        // resumed run takes that decision (a measurement on a loaded machine could fall on the
        // other side of the threshold and change the adapter's bits half way).
        let products = dir.join(PRODUCTS_FILE);
        if s.train.bf16 {
            if resume {
                let recorded = std::fs::read(&products)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| v["bf16"].as_bool());
                if let Some(bf16) = recorded {
                    deltatune_core::ops::decide_bf16(bf16);
                }
            } else {
                let record = serde_json::json!({
                    "bf16": deltatune_core::ops::bf16_pays(),
                    "bf16_time_ratio": deltatune_core::ops::bf16_time_ratio(),
                });
                let mut text = serde_json::to_string_pretty(&record)?;
                text.push('\n');
                deltatune_core::write_atomic(&products, text.as_bytes())?;
            }
        }
        let checkpointing = Checkpointing {
            dir: dir.clone(),
            every_steps: s.train.checkpoint_every,
            keep: s.train.keep_checkpoints,
            stop: Some(stop_flag()),
        };
        Ok(Self {
            dir,
            checkpointing,
            resume,
        })
    }

    /// Records the run's data (a fresh run) or checks that they are what the run started with
    /// (a resumed run): a file whose size or contents differ is refused by name. A run started
    /// by an older deltatune has no record; it resumes with a note.
    pub fn check_data(&self, now: &[DataPrint]) -> Result<()> {
        let file = self.dir.join(DATA_FILE);
        if !self.resume {
            let mut text = serde_json::to_string_pretty(now)?;
            text.push('\n');
            deltatune_core::write_atomic(&file, text.as_bytes())?;
            return Ok(());
        }
        if !file.exists() {
            eprintln!(
                "note: this run has no record of its data files ({} is missing: it was started \
                 by an older deltatune), so they cannot be checked for changes",
                file.display()
            );
            return Ok(());
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let then: Vec<DataPrint> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not the data record of a run (delete it to resume without the check)",
                file.display()
            )
        })?;
        for old in &then {
            let Some(new) = now.iter().find(|n| n.split == old.split) else {
                bail!(
                    "the run started with {} data ({}), and this resume has none: a resumed run \
                     must train on the same data; start a new run with another --output",
                    old.split,
                    old.path.display()
                );
            };
            if let Some(why) = old.differs(new) {
                bail!(
                    "the data changed since the run started: {why}. A resumed run must train on \
                     the data it started with: put the original back, or start a new run (another \
                     --output, or delete {} to start this one over)",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Where the metrics log grows while the run trains.
    pub fn metrics_log(&self) -> PathBuf {
        self.dir.join(METRICS)
    }

    /// Copies the metrics log into the output being staged.
    pub fn copy_metrics(&self, staging: &Staging) -> Result<()> {
        let log = self.metrics_log();
        if log.exists() {
            let bytes =
                std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
            staging.write(METRICS, &bytes)?;
        }
        Ok(())
    }

    /// Removes the folder once the run's output is in place.
    pub fn finish(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The settings of the run writing `output`, with the given settings (`given`, each key with
/// its source) checked against them: a key given explicitly (not a default) with another
/// value is refused by name unless it is in [`MAY_CHANGE`], in which case it applies.
pub fn resumed_settings(
    output: &Path,
    given: &Settings,
    sources: &[(String, Source)],
) -> Result<Settings> {
    let dir = checkpoint_dir(output);
    let file = dir.join(SETTINGS_FILE);
    if !file.exists() {
        if output
            .join(deltatune_train::artifact::ADAPTER_CONFIG)
            .exists()
        {
            bail!(
                "{} is a finished run: there is nothing to resume (its checkpoints are removed \
                 when it completes)",
                output.display()
            );
        }
        bail!(
            "no run to resume at {}: {} is missing (start it with `deltatune train --output {}`)",
            output.display(),
            file.display(),
            output.display()
        );
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut saved: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the settings JSON of a run", file.display()))?;
    let now = serde_json::to_value(given)?;
    let mut refused = Vec::new();
    for (key, src) in sources {
        if *src == Source::Default || key == "output" {
            continue;
        }
        let (Some(a), Some(b)) = (lookup(&saved, key).cloned(), lookup(&now, key).cloned()) else {
            continue;
        };
        if a == b {
            continue;
        }
        if MAY_CHANGE.contains(&key.as_str()) {
            if let Some(slot) = lookup_mut(&mut saved, key) {
                *slot = b;
            }
        } else {
            refused.push(format!("`{key}` is {a} in the run and {b} here"));
        }
    }
    if !refused.is_empty() {
        bail!(
            "a resumed run keeps its settings, and these differ: {}. Drop them (only {} may \
             change), or start a new run with another --output",
            refused.join("; "),
            MAY_CHANGE.join(", ")
        );
    }
    let mut s: Settings = serde_json::from_value(saved)
        .with_context(|| format!("{} does not hold settings this build reads", file.display()))?;
    s.output = output.to_path_buf();
    Ok(s)
}

fn lookup<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(v, |v, k| v.get(k))
}

fn lookup_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    key.split('.').try_fold(v, |v, k| v.get_mut(k))
}

/// What to tell the user when a run stopped on a signal.
pub fn resume_hint(output: &Path) -> String {
    format!(
        "training stopped; its state is saved. Continue with:\n  deltatune train --resume {}",
        output.display()
    )
}

/// After a run failed: its checkpoint folder goes when it holds no checkpoint (only the
/// settings and log written before the first step), so a failed run leaves nothing behind; one
/// with checkpoints stays for `--resume`, and the message says so.
pub fn after_failure(output: &Path) -> Option<String> {
    let dir = checkpoint_dir(output);
    if !dir.join(SETTINGS_FILE).is_file() {
        return None;
    }
    match deltatune_train::checkpoint::list(&dir) {
        Ok(held) if held.is_empty() => {
            for f in [SETTINGS_FILE, METRICS, DATA_FILE, PRODUCTS_FILE] {
                let _ = std::fs::remove_file(dir.join(f));
            }
            // Only if that emptied it (a search worker's attempt file stays with its folder).
            let _ = std::fs::remove_dir(&dir);
            None
        }
        Ok(held) => Some(format!(
            "its checkpoints are kept in {} (newest {}); after fixing the cause, continue with \
             `deltatune train --resume {}`",
            dir.display(),
            held.last().unwrap().display(),
            output.display()
        )),
        Err(_) => None,
    }
}

/// One file of a run's data: its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The path (relative to the image folder for an image).
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

impl FileEntry {
    fn read(path: &Path, name: PathBuf) -> Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self {
            path: name,
            bytes: meta.len(),
            sha256: deltatune_data::sha256_file(path)
                .with_context(|| format!("reading {}", path.display()))?,
        })
    }
}

/// The fingerprint of one split's data: a file (size and SHA-256), or an image folder (each
/// image's relative path, size and SHA-256 of its contents, sorted by path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPrint {
    /// `train`, `dev`, `test`, or for data read as a whole (an image folder, Fashion-MNIST's
    /// files) what it is.
    pub split: String,
    /// The file or folder.
    pub path: PathBuf,
    /// The file's entry, or the folder's images.
    pub files: Vec<FileEntry>,
    /// Whether `path` is a folder.
    pub folder: bool,
}

impl DataPrint {
    /// A data file.
    pub fn file(split: &str, path: &Path) -> Result<Self> {
        Ok(Self {
            split: split.to_string(),
            path: path.to_path_buf(),
            files: vec![FileEntry::read(path, path.to_path_buf())?],
            folder: false,
        })
    }

    /// The data files of each split.
    pub fn files<'a>(
        splits: impl IntoIterator<Item = (&'a String, &'a PathBuf)>,
    ) -> Result<Vec<Self>> {
        splits
            .into_iter()
            .map(|(split, path)| Self::file(split, path))
            .collect()
    }

    /// The images `files` of the image folder `root` (its splits' images as the loader found
    /// them), by path relative to `root`, with their contents' SHA-256.
    pub fn image_folder<'a>(
        split: &str,
        root: &Path,
        files: impl IntoIterator<Item = &'a Path>,
    ) -> Result<Self> {
        let mut entries = Vec::new();
        for f in files {
            let rel = f.strip_prefix(root).unwrap_or(f).to_path_buf();
            entries.push(FileEntry::read(f, rel)?);
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Self {
            split: split.to_string(),
            path: root.to_path_buf(),
            files: entries,
            folder: true,
        })
    }

    /// How `now` differs from this record (the run's), naming the file; `None` when it does
    /// not.
    pub fn differs(&self, now: &DataPrint) -> Option<String> {
        let short = |h: &str| h.chars().take(16).collect::<String>();
        if !self.folder {
            let (a, b) = (self.files.first()?, now.files.first()?);
            if a.bytes != b.bytes {
                return Some(format!(
                    "{} ({} data) was {} bytes and is now {} bytes",
                    now.path.display(),
                    self.split,
                    a.bytes,
                    b.bytes
                ));
            }
            if a.sha256 != b.sha256 {
                return Some(format!(
                    "{} ({} data) has the same size ({} bytes) but other contents (SHA-256 {}… \
                     then, {}… now)",
                    now.path.display(),
                    self.split,
                    a.bytes,
                    short(&a.sha256),
                    short(&b.sha256)
                ));
            }
            return None;
        }
        let name = |e: &FileEntry| now.path.join(&e.path).display().to_string();
        let old: std::collections::BTreeMap<&Path, &FileEntry> =
            self.files.iter().map(|e| (e.path.as_path(), e)).collect();
        let new: std::collections::BTreeMap<&Path, &FileEntry> =
            now.files.iter().map(|e| (e.path.as_path(), e)).collect();
        for (p, a) in &old {
            match new.get(p) {
                None => {
                    return Some(format!(
                        "the image {} of the image folder {} is gone",
                        name(a),
                        now.path.display()
                    ))
                }
                Some(b) if a.bytes != b.bytes || a.sha256 != b.sha256 => {
                    return Some(format!(
                        "the image {} of the image folder {} has other contents ({} bytes then, \
                         {} now)",
                        name(a),
                        now.path.display(),
                        a.bytes,
                        b.bytes
                    ))
                }
                _ => {}
            }
        }
        if let Some((_, b)) = new.iter().find(|(p, _)| !old.contains_key(*p)) {
            return Some(format!(
                "the image {} is new in the image folder {} ({} images then, {} now)",
                name(b),
                now.path.display(),
                self.files.len(),
                now.files.len()
            ));
        }
        None
    }
}
