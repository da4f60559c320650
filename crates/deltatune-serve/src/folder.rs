//! Adapter folders (as `deltatune train` or PEFT's `save_pretrained` writes them), read once and
//! kept in memory: config, tensors, labels, and what kind of task they serve.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_methods::{DeltaConfig, LoraConfig};
use deltatune_models::Pooling;
use deltatune_train::artifact::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, RUN_CONFIG};
use serde_json::Value;

use crate::{Result, ServeError};

/// What an adapter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterTask {
    /// A decoder's adapter (`task_type` CAUSAL_LM).
    Generate,
    /// A sequence classifier's adapter (a trained head, `task_type` SEQ_CLS).
    Classify,
}

/// An adapter folder read into memory.
#[derive(Debug, Clone)]
pub struct AdapterFolder {
    pub name: String,
    pub dir: PathBuf,
    pub delta: DeltaConfig,
    /// The tensors under the keys of the file (PEFT's).
    pub tensors: BTreeMap<String, Tensor>,
    pub task: AdapterTask,
    /// Class names in id order (classification adapters).
    pub labels: Vec<String>,
    /// How the encoder's hidden states are pooled (deltatune's run_config; PEFT's default CLS).
    pub pooling: Pooling,
    /// Longest input in tokens the adapter was trained with (run_config), if known.
    pub max_length: Option<usize>,
    /// The base the folder names (run_config's model_dir or `base_model_name_or_path`).
    pub base: Option<String>,
}

/// The number of classes of a saved head (`...classifier.weight` or `...score.weight` rows).
pub fn head_rows(tensors: &BTreeMap<String, Tensor>) -> Option<usize> {
    tensors
        .iter()
        .find(|(k, _)| k.ends_with("classifier.weight") || k.ends_with("score.weight"))
        .and_then(|(_, t)| t.dims().first().copied())
}

/// The labels of a classifier's adapter: labels.json if there is one, else the base's
/// `id2label` when it has `n` entries, else `LABEL_0`...
pub fn labels_for(dir: &Path, base_dir: Option<&Path>, n: usize) -> Result<Vec<String>> {
    if dir.join(LABELS).exists() {
        let m = deltatune_data::text::LabelMap::load(&dir.join(LABELS))
            .map_err(|e| ServeError::new(e.to_string()))?;
        return Ok(m.labels().to_vec());
    }
    let cfg: Option<Value> = base_dir
        .and_then(|b| std::fs::read_to_string(b.join("config.json")).ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    let from_base: Option<Vec<String>> = cfg.as_ref().and_then(|c| {
        let m = c["id2label"].as_object()?;
        (0..n)
            .map(|i| m.get(&i.to_string())?.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .filter(|_| m.len() == n)
    });
    Ok(from_base.unwrap_or_else(|| (0..n).map(|i| format!("LABEL_{i}")).collect()))
}

impl AdapterFolder {
    /// Reads the adapter folder `dir` under `name`; `base_dir` (the served base's folder) gives
    /// a PEFT classifier's label names.
    pub fn read(name: &str, dir: &Path, base_dir: Option<&Path>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ServeError::field(
                "path",
                format!(
                    "adapter folder {} does not exist or is not a folder (it should hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                    dir.display()
                ),
            ));
        }
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            ServeError::field("path", format!("reading {}: {e}", cfg_path.display()))
        })?;
        let mut cfg: Value = serde_json::from_str(&text).map_err(|e| {
            ServeError::field(
                "path",
                format!("{} is not valid JSON: {e}", cfg_path.display()),
            )
        })?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let weights = deltatune_core::Weights::load(&wpath, DType::F32)
            .map_err(|e| ServeError::field("path", e.to_string()))?;
        let tensors: BTreeMap<String, Tensor> = weights
            .tensors()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        let run: Option<Value> = std::fs::read_to_string(dir.join(RUN_CONFIG))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let head = head_rows(&tensors);
        let task = match cfg["task_type"].as_str() {
            Some("CAUSAL_LM") => AdapterTask::Generate,
            Some("SEQ_CLS") => AdapterTask::Classify,
            _ if head.is_some() => AdapterTask::Classify,
            _ if run.as_ref().is_some_and(|r| r["num_labels"].is_u64()) => AdapterTask::Classify,
            _ => AdapterTask::Generate,
        };
        let peft_folder = run.is_none();
        if peft_folder
            && task == AdapterTask::Classify
            && cfg["peft_type"] == "PROMPT_TUNING"
            && cfg.get("prompt_position").is_none()
        {
            // PEFT puts an encoder's prompt before CLS.
            cfg["prompt_position"] = "start".into();
        }
        let base = run
            .as_ref()
            .and_then(|r| r["model_dir"].as_str().map(String::from))
            .or_else(|| cfg["base_model_name_or_path"].as_str().map(String::from));
        let mut delta = DeltaConfig::from_json(cfg)
            .map_err(|e| ServeError::field("path", format!("{}: {e}", cfg_path.display())))?;
        if let Some(Some(p)) = delta.subspace_mut() {
            if Path::new(p.as_str()).is_relative() {
                *p = dir.join(p.as_str()).display().to_string();
            }
        }
        let labels = match task {
            AdapterTask::Generate => Vec::new(),
            AdapterTask::Classify => {
                let n = head
                    .or_else(|| {
                        run.as_ref()
                            .and_then(|r| r["num_labels"].as_u64())
                            .map(|n| n as usize)
                    })
                    .ok_or_else(|| {
                        ServeError::field(
                            "path",
                            format!(
                                "{} has no trained head (classifier.weight) and no run_config.json to tell the number of classes",
                                dir.display()
                            ),
                        )
                    })?;
                labels_for(dir, base_dir, n)?
            }
        };
        let settings = run.as_ref().map(|r| &r["settings"]);
        let pooling = settings
            .and_then(|s| serde_json::from_value(s["pooling"].clone()).ok())
            .unwrap_or(Pooling::Cls);
        let max_length = settings
            .and_then(|s| s["data"]["max_length"].as_u64())
            .map(|n| n as usize);
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            delta,
            tensors,
            task,
            labels,
            pooling,
            max_length,
            base,
        })
    }

    /// The LoRA config, when the adapter is a LoRA adapter (these share a batch).
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.delta {
            DeltaConfig::Lora(c) => Some(c),
            _ => None,
        }
    }

    /// The method's name (`lora`, `ia3`, `prefix`...).
    pub fn method(&self) -> &'static str {
        self.delta.name()
    }
}

/// The folder an adapter named by a client resolves to inside the configured adapter
/// directory: a relative path of plain components only (no `..`, no root), and after resolving
/// links still inside the directory.
pub fn resolve_in(root: &Path, rel: &str) -> Result<PathBuf> {
    let outside = || {
        ServeError::field(
            "path",
            format!(
                "`{rel}` is not a folder inside the adapter directory {}: give a name relative to it (no `..`, no absolute path)",
                root.display()
            ),
        )
    };
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let root_c = root
        .canonicalize()
        .map_err(|e| ServeError::new(format!("the adapter directory {}: {e}", root.display())))?;
    let full = root_c.join(p);
    let full_c = full.canonicalize().map_err(|_| {
        ServeError::field(
            "path",
            format!("no adapter folder `{rel}` in {}", root.display()),
        )
    })?;
    if !full_c.starts_with(&root_c) {
        return Err(outside());
    }
    Ok(full_c)
}

/// The adapter folders directly under `root` (those holding an adapter_config.json), by name.
pub fn scan(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| {
        ServeError::new(format!(
            "reading the adapter directory {}: {e}",
            root.display()
        ))
    })?;
    for entry in rd.flatten() {
        let p = entry.path();
        if p.join(ADAPTER_CONFIG).is_file() {
            if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                out.push((n.to_string(), p));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_paths_outside_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        assert!(resolve_in(d.path(), "a").is_ok());
        for bad in ["../a", "/etc", "a/../../x", "", "./a/.."] {
            let e = resolve_in(d.path(), bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("path"), "{bad}");
        }
        // A link inside pointing outside is refused after resolving it.
        let out = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(out.path(), d.path().join("link")).unwrap();
            let e = resolve_in(d.path(), "link").unwrap_err();
            assert!(e.message.contains("not a folder inside"), "{}", e.message);
        }
        assert!(resolve_in(d.path(), "missing")
            .unwrap_err()
            .message
            .contains("no adapter folder"));
    }
}
