//! Reading and writing safetensors files with errors that name the file, the key and the shape.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::error::{nearest_names, Error, Result};

/// All tensors of one safetensors file, plus a record of which keys were used.
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
}

impl Weights {
    /// Reads a whole safetensors file; tensors are converted to `dtype` and placed on
    /// [`crate::device::current`].
    pub fn load(path: &Path, dtype: DType) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "a model folder needs config.json, model.safetensors and tokenizer.json \
                       (run `deltatune fetch` for the default model)"
                    .into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            Error::Weights {
                path: path.to_path_buf(),
                msg: format!(
                    "{e} (the file is truncated or not a safetensors file; fetch it again)"
                ),
            }
        })?;
        let device = crate::device::current();
        let mut tensors = HashMap::with_capacity(raw.len());
        for (k, t) in raw {
            let t = if t.dtype() == dtype || t.dtype().is_int() {
                t
            } else {
                t.to_dtype(dtype)?
            };
            let t = if device.is_cpu() {
                t
            } else {
                t.to_device(&device)?
            };
            tensors.insert(k, t);
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            used: Mutex::new(HashSet::new()),
        })
    }

    /// Wraps tensors already in memory (tests, adapters).
    pub fn from_map(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: path.to_path_buf(),
            tensors,
            used: Mutex::new(HashSet::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Every tensor with its key (unordered); does not count as use.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, t)| (k.as_str(), t))
    }

    /// The tensor `key`, which must have `shape`; `hint` names the config field that implies it.
    pub fn get(&self, key: &str, shape: &[usize], hint: &str) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            path: self.path.clone(),
            nearest: nearest_names(key, self.keys(), 3),
        })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                path: self.path.clone(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
                hint: if hint.is_empty() {
                    String::new()
                } else {
                    format!(" ({hint}); config.json and the weights disagree")
                },
            });
        }
        self.used.lock().unwrap().insert(key.to_string());
        Ok(t.clone())
    }

    /// Like [`Weights::get`] but `None` when the key is absent.
    pub fn get_opt(&self, key: &str, shape: &[usize], hint: &str) -> Result<Option<Tensor>> {
        if self.contains(key) {
            self.get(key, shape, hint).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Keys never fetched with [`Weights::get`], sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Serialises named tensors to safetensors bytes (keys sorted, contiguous f32 data).
pub fn to_safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        // Tensors on a GPU are copied back first (a no-op on the CPU).
        owned.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    safetensors::tensor::serialize(owned, None)
        .map_err(|e| Error::Msg(format!("serialising tensors: {e}")))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        if is_disk_full(&e) {
            return Err(Error::DiskFull {
                path: path.to_path_buf(),
                bytes: bytes.len() as u64,
                free: free_bytes(dir).map_or("unknown".into(), |b| b.to_string()),
            });
        }
        return Err(Error::io("writing", path, e));
    }
    Ok(())
}

/// Whether `e` says the device is full (ENOSPC) or the quota is exhausted (EDQUOT).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Bytes free for an unprivileged writer on the file system holding `dir` (`df`'s "Avail").
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .args(["-P", "-B1"])
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}
