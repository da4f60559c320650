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
                    "{e} (the file is truncated or not a safetensors file; {})",
                    truncated_hint(path)
                ),
            }
        })?;
        let device = crate::device::current();
        let mut tensors = HashMap::with_capacity(raw.len());
        for (k, t) in raw {
            // Every tensor read passes the non-finite check, as stored and as converted (a
            // large f32 turns infinite in f16).
            crate::finite::check_tensor(path, &k, &t)?;
            let t = if t.dtype() == dtype || t.dtype().is_int() {
                t
            } else {
                let converted = t.to_dtype(dtype)?;
                crate::finite::check_tensor(path, &k, &converted)?;
                converted
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

/// What to do about a safetensors file that cannot be parsed, by the kind of file it is.
fn truncated_hint(path: &Path) -> &'static str {
    match path.file_name().and_then(|n| n.to_str()).unwrap_or("") {
        "adapter_model.safetensors" => {
            "the adapter is damaged: copy it again from where it came from, or train it again"
        }
        "tensors.safetensors" => "a damaged checkpoint",
        "subspace.safetensors" => {
            "the subspace artifact is damaged: compute it again with `deltatune subspace`"
        }
        _ => "fetch it again",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        std::fs::write(path, to_safetensors_bytes(&map).unwrap()).unwrap();
    }

    #[test]
    fn non_finite_tensors_are_refused_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ok = Tensor::new(&[[0.5f32, -1.0], [2.0, 3.0]], &Device::Cpu).unwrap();
        let bad = Tensor::new(&[[0.5f32, f32::NAN], [f32::INFINITY, 3.0]], &Device::Cpu).unwrap();
        let adapter = dir.path().join("adapter_model.safetensors");
        write(
            &adapter,
            &[
                ("a.lora_A.weight", ok.clone()),
                ("a.lora_B.weight", bad.clone()),
            ],
        );
        assert_eq!(
            Weights::load(&adapter, DType::F32).unwrap_err().to_string(),
            format!(
                "tensor `a.lora_B.weight` in {} holds 1 NaN and 1 infinite among its 4 values \
                 (the first at index 1): the adapter is damaged, or the run that trained it \
                 diverged: copy it again from where it came from, or train it again (a run \
                 whose loss turns NaN stops with an error, so a finished deltatune run never \
                 saves one)",
                adapter.display()
            )
        );
        // A base model's file, stored in f16: read as stored.
        let model = dir.path().join("model.safetensors");
        write(&model, &[("w", bad.to_dtype(DType::F16).unwrap())]);
        let e = Weights::load(&model, DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::NonFinite { key, .. } if key == "w"),
            "{e}"
        );
        assert!(
            e.to_string().ends_with(
                "fetch it again (`deltatune fetch` for the default \
                 models) or download it again from its source"
            ),
            "{e}"
        );
        // Finite as stored, infinite once converted (f32 beyond f16's range).
        let big = Tensor::new(&[1e6f32], &Device::Cpu).unwrap();
        write(&model, &[("big", big)]);
        Weights::load(&model, DType::F32).unwrap();
        let e = Weights::load(&model, DType::F16).unwrap_err().to_string();
        assert!(
            e.contains("tensor `big`") && e.contains("1 infinite"),
            "{e}"
        );
        // Finite tensors and integer tensors load.
        write(
            &model,
            &[
                ("w", ok),
                ("ids", Tensor::new(&[1i64, 2], &Device::Cpu).unwrap()),
            ],
        );
        assert_eq!(Weights::load(&model, DType::F32).unwrap().keys().count(), 2);
    }

    #[test]
    fn an_unreadable_file_gets_advice_for_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        for (name, hint) in [
            ("model.safetensors", "fetch it again"),
            (
                "adapter_model.safetensors",
                "the adapter is damaged: copy it again from where it came from, or train it again",
            ),
            ("tensors.safetensors", "a damaged checkpoint"),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"\x10\x00\x00").unwrap();
            let e = Weights::load(&p, DType::F32).unwrap_err().to_string();
            assert!(
                e.ends_with(&format!(
                    "(the file is truncated or not a safetensors file; {hint})"
                )),
                "{e}"
            );
        }
    }
}
