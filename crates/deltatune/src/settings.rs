//! Resolved settings of a run, with a stated precedence: flag > environment > TOML config file >
//! default. Every setting has a dotted key (`train.epochs`, `lora.r`), an environment variable
//! (`DELTATUNE_TRAIN_EPOCHS`, `DELTATUNE_LORA_R`) and, for the common ones, a flag.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use deltatune_methods::adapter::BottleneckConfig;
use deltatune_methods::adapter::{AdapterSite, Placement};
use deltatune_methods::bitfit::BitFitConfig;
use deltatune_methods::compose::ComposeConfig;
use deltatune_methods::full::{FullFinetuneConfig, LinearProbeConfig};
use deltatune_methods::ia3::IA3Config;
use deltatune_methods::intrinsic::IntrinsicPromptConfig;
use deltatune_methods::prefix::PrefixTuningConfig;
use deltatune_methods::prompt::PromptTuningConfig;
use deltatune_methods::vpt::VptConfig;
use deltatune_methods::{DeltaConfig, LoraConfig, METHODS};
use deltatune_models::Pooling;
use deltatune_train::TrainConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where the data comes from and how it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// Training file (CSV, TSV or JSONL). Default: the prepared Rotten Tomatoes train split.
    pub train: Option<PathBuf>,
    /// Development file, evaluated after each epoch. Default: Rotten Tomatoes dev.
    pub dev: Option<PathBuf>,
    /// Test file, evaluated once at the end. Default: Rotten Tomatoes test (only with the
    /// default train file).
    pub test: Option<PathBuf>,
    /// Column (or JSON field) holding the text (default `text`).
    pub text_column: String,
    /// Column (or JSON field) holding the label (default `label`).
    pub label_column: String,
    /// Sequences are truncated to this many tokens (default 128).
    pub max_length: usize,
    /// Train on one shard of the training file: `"i/k"` keeps the examples whose index is
    /// i modulo k (default empty: all). Used to train several prompts on disjoint data, e.g.
    /// as sources for `deltatune subspace fit`.
    pub train_shard: String,
    /// Generation tasks: the JSONL field holding the prompt (default `prompt`); lines may
    /// instead hold chat `messages` (the last assistant message is the completion).
    pub prompt_field: String,
    /// Generation tasks: the JSONL field holding the completion (default `completion`).
    pub completion_field: String,
    /// Generation tasks: the text the model sees for a prompt field, `{prompt}` standing for
    /// it (default `{prompt}`: the field as it is), e.g. `"### Question: {prompt}\n### Answer:"`.
    /// Chat lines use the model's chat template instead.
    pub prompt_template: String,
    /// Train on a seeded random subset of this many examples (0: all; default 0). The
    /// generation task's default G2P data sets 8000.
    pub train_limit: usize,
    /// Evaluate on this many dev examples (0: all). Default 0; G2P sets 500 (dev is evaluated
    /// by generation every epoch).
    pub dev_limit: usize,
    /// Test on this many examples (0: all). Default 0; G2P sets 2000.
    pub test_limit: usize,
    /// Image tasks: images are resized (shorter side) and centre-cropped to this square side
    /// in pixels (default 224; the Fashion-MNIST job sets 112).
    pub image_size: usize,
    /// Image tasks: random horizontal flips and resized crops of training images (default
    /// false).
    pub augment: bool,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            train: None,
            dev: None,
            test: None,
            text_column: "text".into(),
            label_column: "label".into(),
            max_length: 128,
            train_shard: String::new(),
            prompt_field: "prompt".into(),
            completion_field: "completion".into(),
            prompt_template: "{prompt}".into(),
            train_limit: 0,
            dev_limit: 0,
            test_limit: 0,
            image_size: 224,
            augment: false,
        }
    }
}

/// Decoding settings of generation tasks (dev/test evaluation and `generate`'s defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationSettings {
    /// New tokens at most per example (default 32).
    pub max_new_tokens: usize,
    /// Generation of an example stops at these strings (default a newline: one-line answers).
    pub stop: Vec<String>,
    /// Round the activations to 8 bits in the products by a quantized (GGUF) base, as llama.cpp
    /// does (default true; `false`: f32 activations). See `GenerateConfig::int8_activations`.
    pub int8_activations: bool,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            stop: vec!["\n".into()],
            int8_activations: true,
        }
    }
}

/// What a run trains for.
pub const TASKS: [&str; 3] = ["classify", "generate", "image"];

/// Defaults that differ for image classification (`task = "image"`), applied to every setting
/// still at its default: the DINOv2 ViT-S/14 backbone and Fashion-MNIST at 112 x 112 pixels
/// on a seeded subset sized so that an epoch fits in 15 minutes on two cores, LoRA on the
/// attention's query and value.
pub fn image_defaults() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    vec![
        ("model", json!(deltatune_data::assets::VISION_NAME)),
        ("output", json!("runs/lora-fashion-mnist")),
        ("data.image_size", json!(112)),
        ("data.train_limit", json!(8000)),
        ("data.dev_limit", json!(1000)),
        ("data.test_limit", json!(2000)),
        ("ia3.target_modules", json!(["key", "value", "mlp.fc2"])),
        ("ia3.feedforward_modules", json!(["mlp.fc2"])),
        ("train.epochs", json!(1)),
        ("train.batch_size", json!(32)),
        ("train.lr", json!(2e-3)),
    ]
}

/// Defaults that differ for generation tasks (`task = "generate"`), applied to every setting
/// still at its default: the default decoder and data (G2P from the CMU dictionary), PEFT's
/// Llama module names, no classification head, and a learning rate, batch and epoch count
/// sized for the decoder on two cores.
pub fn generate_defaults() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    vec![
        ("model", json!(deltatune_data::assets::DECODER_NAME)),
        ("output", json!("runs/lora-g2p")),
        ("data.max_length", json!(256)),
        ("data.train_limit", json!(8000)),
        ("data.dev_limit", json!(500)),
        ("data.test_limit", json!(2000)),
        ("lora.target_modules", json!(["q_proj", "v_proj"])),
        ("lora.lora_dropout", json!(0.05)),
        (
            "ia3.target_modules",
            json!(["k_proj", "v_proj", "down_proj"]),
        ),
        ("ia3.feedforward_modules", json!(["down_proj"])),
        ("train.epochs", json!(1)),
        ("train.batch_size", json!(16)),
        ("train.lr", json!(1e-3)),
        // Batches of similar lengths cost accuracy on the default G2P job: train loss 1.6833
        // against 1.6045, test exact match 0.043 against 0.051, PER 0.571 against 0.554 (one
        // run each, seed 42; docs/speed.md). Its examples are short and close in length, so
        // there is little padding to save.
        ("train.group_by_length", json!(false)),
    ]
}

/// `--method compose` (and the presets `unipelt`, `mam`): which methods go on the model together;
/// each member's settings are its own section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComposeSettings {
    /// Members for `compose`, in order (default `["lora", "prefix", "adapter"]`); any of lora,
    /// ia3, bitfit, prompt, prefix, adapter, intrinsic, each at most once.
    pub methods: Vec<String>,
    /// UniPELT gates on LoRA, adapter and prefix members (default true for `compose` and
    /// `unipelt`; `mam` is never gated).
    pub gates: bool,
    /// Learning-rate multiplier per member (default: lora 1, adapter 2, prefix 20, others 1:
    /// with the default `train.lr` 5e-4 that is each method's single-method rate).
    pub lr_scale: std::collections::BTreeMap<String, f64>,
}

impl Default for ComposeSettings {
    fn default() -> Self {
        Self {
            methods: vec!["lora".into(), "prefix".into(), "adapter".into()],
            gates: true,
            lr_scale: [("adapter".to_string(), 2.0), ("prefix".to_string(), 20.0)]
                .into_iter()
                .collect(),
        }
    }
}

/// Everything a run needs, after resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `classify` (sequence classification with an encoder; default) or `generate` (a decoder
    /// trained on prompt/completion pairs; defaults to SmolLM2 on G2P).
    pub task: String,
    /// A model folder (config.json + model.safetensors + tokenizer.json), a Hugging Face hub id
    /// found in the local HF cache, or `all-MiniLM-L6-v2` from deltatune's cache (default).
    pub model: String,
    /// deltatune's asset cache (default `$HOME/.cache/deltatune`).
    pub cache: PathBuf,
    /// The output (adapter) folder (default `runs/lora-rotten-tomatoes`).
    pub output: PathBuf,
    /// The delta method: lora, ia3, bitfit, prompt, prefix, adapter or intrinsic (default
    /// `lora`); its settings are the section of the same name.
    pub method: String,
    /// Sequence pooling for the head: `cls` (pooler) or `mean` (default `cls`).
    pub pooling: Pooling,
    /// Show progress bars (default true).
    pub progress: bool,
    pub data: DataSettings,
    pub lora: LoraConfig,
    pub ia3: IA3Config,
    pub bitfit: BitFitConfig,
    pub prompt: PromptTuningConfig,
    pub prefix: PrefixTuningConfig,
    pub adapter: BottleneckConfig,
    pub intrinsic: IntrinsicPromptConfig,
    /// Visual prompt tuning (`--method vpt`; `vpt.deep = true` for deep prompts).
    pub vpt: VptConfig,
    /// The linear probe (`--method probe`: only the head trains).
    pub probe: LinearProbeConfig,
    /// Full fine-tuning (`--method full`: every base tensor trains; image models).
    pub full: FullFinetuneConfig,
    pub compose: ComposeSettings,
    pub generation: GenerationSettings,
    pub train: TrainConfig,
    /// `--overwrite`: replace an output folder an earlier deltatune run completed. Not a
    /// setting of the run (not saved, not shown): a resumed run is told again.
    #[serde(skip)]
    pub overwrite: bool,
}

impl Settings {
    /// The configuration of the selected method.
    pub fn delta(&self) -> DeltaConfig {
        self.member(&self.method)
    }

    fn member(&self, method: &str) -> DeltaConfig {
        let composed = |members: Vec<DeltaConfig>, gates: bool| {
            let mut c = ComposeConfig::new(members, gates);
            let names: Vec<&str> = c.deltas.iter().map(|d| d.name()).collect();
            c.lr_scale = self
                .compose
                .lr_scale
                .iter()
                .filter(|(k, _)| names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            DeltaConfig::Compose(c)
        };
        match method {
            "compose" => composed(
                self.compose
                    .methods
                    .iter()
                    .map(|m| self.member(m))
                    .collect(),
                self.compose.gates,
            ),
            "unipelt" => {
                let mut adapter = self.adapter.clone();
                adapter.placement = Placement::Pfeiffer;
                composed(
                    vec![
                        DeltaConfig::Lora(self.lora.clone()),
                        DeltaConfig::Prefix(self.prefix.clone()),
                        DeltaConfig::Adapter(adapter),
                    ],
                    self.compose.gates,
                )
            }
            "mam" => {
                let mut adapter = self.adapter.clone();
                adapter.placement = Placement::Parallel;
                adapter.parallel_sites = vec![AdapterSite::FeedForward];
                composed(
                    vec![
                        DeltaConfig::Prefix(self.prefix.clone()),
                        DeltaConfig::Adapter(adapter),
                    ],
                    false,
                )
            }
            "ia3" => DeltaConfig::Ia3(self.ia3.clone()),
            "bitfit" => DeltaConfig::BitFit(self.bitfit.clone()),
            "prompt" => DeltaConfig::Prompt(self.prompt.clone()),
            "prefix" => DeltaConfig::Prefix(self.prefix.clone()),
            "adapter" => DeltaConfig::Adapter(self.adapter.clone()),
            "intrinsic" => DeltaConfig::Intrinsic(self.intrinsic.clone()),
            "vpt" => DeltaConfig::Vpt(self.vpt.clone()),
            "probe" => DeltaConfig::Probe(self.probe.clone()),
            "full" => DeltaConfig::Full(self.full.clone()),
            _ => DeltaConfig::Lora(self.lora.clone()),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            task: "classify".into(),
            model: "all-MiniLM-L6-v2".into(),
            cache: home_cache_dir(),
            output: PathBuf::from("runs/lora-rotten-tomatoes"),
            method: "lora".into(),
            pooling: Pooling::Cls,
            progress: true,
            data: DataSettings::default(),
            lora: LoraConfig::default(),
            ia3: IA3Config::default(),
            bitfit: BitFitConfig::default(),
            prompt: PromptTuningConfig::default(),
            prefix: PrefixTuningConfig::default(),
            adapter: BottleneckConfig::default(),
            intrinsic: IntrinsicPromptConfig::default(),
            vpt: VptConfig::default(),
            probe: LinearProbeConfig::default(),
            full: FullFinetuneConfig::default(),
            compose: ComposeSettings::default(),
            generation: GenerationSettings::default(),
            train: TrainConfig::default(),
            overwrite: false,
        }
    }
}

/// `$HOME/.cache/deltatune` (the env var `DELTATUNE_CACHE` is applied as a layer on top).
pub fn home_cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("deltatune")
}

/// Where each setting came from, for `--show-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// The env var of a dotted key: `train.epochs` -> `DELTATUNE_TRAIN_EPOCHS`.
pub fn env_name(key: &str) -> String {
    format!("DELTATUNE_{}", key.to_uppercase().replace('.', "_"))
}

fn leaf_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if matches!(child, Value::Object(_)) && !child.as_object().unwrap().is_empty() {
                leaf_keys(child, &key, out);
            } else {
                out.push(key);
            }
        }
    }
}

fn get_mut<'a>(root: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    let mut cur = root;
    for part in key.split('.') {
        cur = cur.as_object_mut()?.get_mut(part)?;
    }
    Some(cur)
}

/// Parses a string from the environment or a flag into a value shaped like `like`: strings stay
/// strings, a list default takes `a,b,c` (or JSON: `["a"]`, or `".*regex"` for one string), other
/// values parse as JSON.
fn parse_like(raw: &str, like: &Value) -> Value {
    match like {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Array(_) if !raw.trim_start().starts_with(['[', '"']) => Value::Array(
            raw.split(',')
                .map(|s| Value::String(s.trim().to_string()))
                .filter(|v| v.as_str() != Some(""))
                .collect(),
        ),
        _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
    }
}

/// The largest config file read (bounds the TOML parser's memory).
pub const MAX_CONFIG_BYTES: usize = 256 << 10;

/// Resolves settings: defaults, then `config_file`, then the environment, then `flags`
/// (dotted key, raw value). Returns the settings and the source of every leaf key.
pub fn resolve(
    config_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[(String, String)],
) -> Result<(Settings, Vec<(String, Source)>)> {
    let mut root = serde_json::to_value(Settings::default())?;
    let mut keys = Vec::new();
    leaf_keys(&root, "", &mut keys);
    let mut sources: Vec<(String, Source)> =
        keys.iter().map(|k| (k.clone(), Source::Default)).collect();
    let all_keys = keys.clone();
    let mut set = |root: &mut Value, key: &str, v: Value, src: Source| -> Result<()> {
        let Some(slot) = get_mut(root, key) else {
            bail!(
                "unknown setting `{key}` (nearest: {}; see --show-config)",
                deltatune_core::error::nearest_names(key, all_keys.iter().map(|s| s.as_str()), 4)
            );
        };
        *slot = v;
        if let Some(s) = sources.iter_mut().find(|(k, _)| k == key) {
            s.1 = src;
        } else {
            sources.push((key.to_string(), src));
        }
        Ok(())
    };

    if let Some(path) = config_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        // The TOML parser holds ~75 bytes per byte of a file of nested arrays (found by
        // deltatune-fuzz: 277 MiB for a 3.7 MB file); `--show-config` prints about 3 KiB.
        if text.len() > MAX_CONFIG_BYTES {
            bail!(
                "config file {} is {} bytes; a settings file is a short hand-written TOML file \
                 (at most {} KiB, see --show-config): is this the right file?",
                path.display(),
                text.len(),
                MAX_CONFIG_BYTES >> 10
            );
        }
        let table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
        let file_val = serde_json::to_value(table)?;
        let mut file_keys = Vec::new();
        leaf_keys(&file_val, "", &mut file_keys);
        for k in file_keys {
            let v = get_mut(&mut file_val.clone(), &k)
                .cloned()
                .unwrap_or(Value::Null);
            if get_mut(&mut root, &k).is_none() {
                bail!(
                    "config file {}: unknown setting `{k}` (known: {})",
                    path.display(),
                    deltatune_core::error::nearest_names(&k, keys.iter().map(|s| s.as_str()), 4)
                );
            }
            set(&mut root, &k, v, Source::File)?;
        }
    }
    for k in &keys {
        if let Some(raw) = env(&env_name(k)) {
            let like = get_mut(&mut root, k).cloned().unwrap_or(Value::Null);
            set(&mut root, k, parse_like(&raw, &like), Source::Env)?;
        }
    }
    for (k, raw) in flags {
        let like = get_mut(&mut root, k).cloned().unwrap_or(Value::Null);
        set(&mut root, k, parse_like(raw, &like), Source::Flag)?;
    }
    let task = root["task"].as_str().unwrap_or("").to_string();
    if !TASKS.contains(&task.as_str()) {
        bail!("unknown task `{task}` (available: {})", TASKS.join(", "));
    }
    if task == "generate" {
        // Modules no decoder has: the classifier head (every method's modules_to_save).
        for k in &keys {
            if k.ends_with(".modules_to_save")
                && sources
                    .iter()
                    .any(|(s, src)| s == k && *src == Source::Default)
            {
                if let Some(slot) = get_mut(&mut root, k) {
                    *slot = Value::Null;
                }
            }
        }
        for (k, v) in generate_defaults() {
            let at_default = sources
                .iter()
                .find(|(s, _)| s == k)
                .is_none_or(|(_, src)| *src == Source::Default);
            if at_default {
                if let Some(slot) = get_mut(&mut root, k) {
                    *slot = v;
                }
            }
        }
    }
    if task == "image" {
        for (k, v) in image_defaults() {
            let at_default = sources
                .iter()
                .find(|(s, _)| s == k)
                .is_none_or(|(_, src)| *src == Source::Default);
            if at_default {
                if let Some(slot) = get_mut(&mut root, k) {
                    *slot = v;
                }
            }
        }
    }
    let settings: Settings = deserialize_sections(&root)?;
    if !METHODS.contains(&settings.method.as_str()) {
        bail!(
            "unknown method `{}` (available: {})",
            settings.method,
            METHODS.join(", ")
        );
    }
    settings.train.validate()?;
    if settings.method == "compose" {
        for m in &settings.compose.methods {
            if !METHODS[..7].contains(&m.as_str()) {
                bail!(
                    "`compose.methods` lists `{m}`: members can be {}",
                    METHODS[..7].join(", ")
                );
            }
        }
    }
    settings.delta().validate()?;
    Ok((settings, sources))
}

/// Deserialises section by section so an error names the section.
fn deserialize_sections(root: &Value) -> Result<Settings> {
    let obj: &Map<String, Value> = root.as_object().expect("settings are an object");
    for section in [
        "data",
        "lora",
        "ia3",
        "bitfit",
        "prompt",
        "prefix",
        "adapter",
        "intrinsic",
        "vpt",
        "probe",
        "full",
        "compose",
        "generation",
        "train",
    ] {
        let v = obj.get(section).cloned().unwrap_or(Value::Null);
        let r = match section {
            "data" => serde_json::from_value::<DataSettings>(v).map(|_| ()),
            "lora" => serde_json::from_value::<LoraConfig>(v).map(|_| ()),
            "ia3" => serde_json::from_value::<IA3Config>(v).map(|_| ()),
            "bitfit" => serde_json::from_value::<BitFitConfig>(v).map(|_| ()),
            "prompt" => serde_json::from_value::<PromptTuningConfig>(v).map(|_| ()),
            "prefix" => serde_json::from_value::<PrefixTuningConfig>(v).map(|_| ()),
            "adapter" => serde_json::from_value::<BottleneckConfig>(v).map(|_| ()),
            "intrinsic" => serde_json::from_value::<IntrinsicPromptConfig>(v).map(|_| ()),
            "vpt" => serde_json::from_value::<VptConfig>(v).map(|_| ()),
            "probe" => serde_json::from_value::<LinearProbeConfig>(v).map(|_| ()),
            "full" => serde_json::from_value::<FullFinetuneConfig>(v).map(|_| ()),
            "compose" => serde_json::from_value::<ComposeSettings>(v).map(|_| ()),
            "generation" => serde_json::from_value::<GenerationSettings>(v).map(|_| ()),
            _ => serde_json::from_value::<TrainConfig>(v).map(|_| ()),
        };
        if let Err(e) = r {
            if let Some(msg) = culprit(section, obj.get(section)) {
                bail!(msg);
            }
            return Err(e).with_context(|| format!("invalid setting in [{section}]"));
        }
    }
    serde_json::from_value(root.clone()).or_else(|e| {
        // Name the top-level key at fault (`pooling`, `progress`, ...): each one alone on the
        // defaults.
        let defaults = serde_json::to_value(Settings::default())?;
        for (k, v) in obj {
            let mut one = defaults.clone();
            one[k.as_str()] = v.clone();
            if let Err(e) = serde_json::from_value::<Settings>(one) {
                bail!("invalid setting `{k}` = {v}: {e}");
            }
        }
        Err(e).context("invalid setting")
    })
}

/// The key of `section` at fault, tried one at a time on the defaults, as a message
/// (`invalid setting `train.epochs` = "many": ...`).
fn culprit(section: &str, v: Option<&Value>) -> Option<String> {
    let defaults = serde_json::to_value(Settings::default()).ok()?;
    let Value::Object(m) = v? else { return None };
    if !defaults[section].is_object() {
        return None;
    }
    for (k, x) in m {
        let mut one = defaults.clone();
        one[section][k.as_str()] = x.clone();
        if let Err(e) = serde_json::from_value::<Settings>(one) {
            return Some(format!("invalid setting `{section}.{k}` = {x}: {e}"));
        }
    }
    None
}

/// The resolved settings as TOML, each line annotated with its source.
pub fn show(settings: &Settings, sources: &[(String, Source)]) -> Result<String> {
    let mut keys = Vec::new();
    let root = serde_json::to_value(settings)?;
    leaf_keys(&root, "", &mut keys);
    let mut out = String::new();
    for k in keys {
        let v = get_mut(&mut root.clone(), &k)
            .cloned()
            .unwrap_or(Value::Null);
        if v.is_null() {
            continue;
        }
        let src = sources
            .iter()
            .find(|(s, _)| *s == k)
            .map_or(Source::Default, |s| s.1);
        let src = serde_json::to_value(src)?;
        out.push_str(&format!("{k} = {v}    # {}\n", src.as_str().unwrap_or("")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("dt-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(
            &file,
            "[train]\nepochs = 5\nlr = 0.001\nbatch_size = 8\n[lora]\nr = 4\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "DELTATUNE_TRAIN_LR" => Some("0.002".to_string()),
            "DELTATUNE_TRAIN_BATCH_SIZE" => Some("16".to_string()),
            _ => None,
        };
        let flags = [("train.batch_size".to_string(), "64".to_string())];
        let (s, src) = resolve(Some(&file), &env, &flags).unwrap();
        assert_eq!(s.train.epochs, 5); // file
        assert_eq!(s.train.lr, 0.002); // env over file
        assert_eq!(s.train.batch_size, 64); // flag over env over file
        assert_eq!(s.lora.r, 4);
        assert_eq!(s.train.seed, 42); // default
        let find = |k: &str| src.iter().find(|(s, _)| s == k).unwrap().1;
        assert_eq!(find("train.epochs"), Source::File);
        assert_eq!(find("train.lr"), Source::Env);
        assert_eq!(find("train.batch_size"), Source::Flag);
        assert_eq!(find("train.seed"), Source::Default);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let dir = std::env::temp_dir().join(format!("dt-settings-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "[train]\nepochz = 5\n").unwrap();
        let err = resolve(Some(&file), &|_| None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.epochz") && err.contains("train.epochs"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by deltatune-fuzz: 3.7 MB of `a = [a = [...` made the TOML parser hold 277 MiB
    /// before it failed; files past the cap are refused before parsing.
    #[test]
    fn settings_file_past_the_size_cap_is_refused_before_parsing() {
        let dir = std::env::temp_dir().join(format!("dt-settings-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(&file, "a = [".repeat(MAX_CONFIG_BYTES / 5 + 1)).unwrap();
        let err = resolve(Some(&file), &|_| None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run.toml") && err.contains("is this the right file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn list_flags_split_on_commas_and_rank_zero_is_rejected() {
        let (s, _) = resolve(
            None,
            &|_| None,
            &[("lora.target_modules".into(), "query,key".into())],
        )
        .unwrap();
        assert_eq!(
            s.lora.target_modules,
            deltatune_core::TargetModules::Suffixes(vec!["query".into(), "key".into()])
        );
        let err = resolve(None, &|_| None, &[("lora.r".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`r`"), "{err}");
    }
}
