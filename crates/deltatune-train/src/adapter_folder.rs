//! Adapter folders (as `deltatune train` or PEFT's `save_pretrained` writes them), read once and
//! kept in memory: config, tensors, labels, pooling, the base they name, and what kind of task
//! they serve. The CLI (`predict`, `generate`) and the server read folders through this.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use deltatune_methods::{DeltaConfig, LoraConfig};
use deltatune_models::Pooling;
use serde_json::Value;

use crate::artifact::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS, RUN_CONFIG};
use crate::{Result, TrainError};

fn err(msg: impl Into<String>) -> TrainError {
    TrainError::Data(msg.into())
}

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
    /// `task_type` of adapter_config.json, as written.
    pub task_type: Option<String>,
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
            .map_err(|e| err(e.to_string()))?;
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

/// `task_type` of the folder's adapter_config.json, read alone (to refuse a folder of the
/// wrong kind before its tensors are read).
pub fn config_task_type(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["task_type"].as_str().map(String::from)
}

impl AdapterFolder {
    /// Reads the adapter folder `dir` under `name`; `base_dir` (the served base's folder) gives
    /// a PEFT classifier's label names.
    pub fn read(name: &str, dir: &Path, base_dir: Option<&Path>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(err(format!(
                    "adapter folder {} does not exist or is not a folder (it should hold {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                    dir.display()
                ),
            ));
        }
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| err(format!("reading {}: {e}", cfg_path.display())))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .map_err(|e| err(format!("{} is not valid JSON: {e}", cfg_path.display())))?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let weights = deltatune_core::Weights::load(&wpath, DType::F32)?;
        let tensors: BTreeMap<String, Tensor> = weights
            .tensors()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        let run: Option<Value> = std::fs::read_to_string(dir.join(RUN_CONFIG))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let head = head_rows(&tensors);
        let task_type = cfg["task_type"].as_str().map(String::from);
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
        let mut delta =
            DeltaConfig::from_json(cfg).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
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
                        err(format!(
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
            task_type,
        })
    }

    /// Names the classes from the base's `id2label` (in `base_dir`) when the folder has no
    /// labels.json (PEFT's folders), once the base is known.
    pub fn with_base_labels(&mut self, base_dir: &Path) -> Result<()> {
        if self.task == AdapterTask::Classify && !self.dir.join(LABELS).exists() {
            self.labels = labels_for(&self.dir, Some(base_dir), self.labels.len())?;
        }
        Ok(())
    }

    /// Whether the folder was written by PEFT (no run_config.json).
    pub fn is_peft_folder(&self) -> bool {
        !self.dir.join(RUN_CONFIG).exists()
    }

    /// The LoRA config, when the adapter is a LoRA adapter that shares a batch: one that trains
    /// no bias (an adapter with trained biases, PEFT's `bias` `all` or `lora_only`, replaces
    /// the base's biases, so it runs on its own copy of the model).
    pub fn lora(&self) -> Option<&LoraConfig> {
        match &self.delta {
            DeltaConfig::Lora(c) if c.bias == deltatune_methods::lora::LoraBias::None => Some(c),
            _ => None,
        }
    }

    /// The method's name (`lora`, `ia3`, `prefix`...).
    pub fn method(&self) -> &'static str {
        self.delta.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_adapter_with_a_nan_is_refused_naming_the_file_and_tensor() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(ADAPTER_CONFIG),
            r#"{"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4,
                "target_modules": ["query"]}"#,
        )
        .unwrap();
        let t = BTreeMap::from([(
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight".to_string(),
            Tensor::new(&[[0f32, 1.0], [f32::NAN, 2.0]], &Device::Cpu).unwrap(),
        )]);
        let w = d.path().join(ADAPTER_WEIGHTS);
        std::fs::write(&w, deltatune_core::to_safetensors_bytes(&t).unwrap()).unwrap();
        let e = AdapterFolder::read("a", d.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "tensor `base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight` \
                 in {} holds 1 NaN among its 4 values (the first at index 2): the adapter is \
                 damaged",
                w.display()
            )),
            "{e}"
        );
    }
}
