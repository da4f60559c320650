//! What every delta method hands back: its trainable tensors under PEFT's key names, and the
//! adapter file's key layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{Tensor, Var};
use deltatune_core::{Error, HasSites, Result};

/// The prefix PEFT puts before module paths in `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `base_model.model.<path>.<leaf>`.
pub fn peft_key(path: &str, leaf: &str) -> String {
    format!("{PEFT_PREFIX}{path}.{leaf}")
}

/// One trainable tensor.
#[derive(Debug, Clone)]
pub struct Trainable {
    /// Its key in `adapter_model.safetensors`.
    pub key: String,
    pub var: Var,
    /// Whether AdamW's weight decay applies (false for biases and norms).
    pub decay: bool,
    /// Multiplier of the run's learning rate for this tensor (1 unless a composition gives
    /// its methods their own rates).
    pub lr_scale: f64,
}

impl Trainable {
    pub fn new(key: String, var: Var, decay: bool) -> Self {
        Self {
            key,
            var,
            decay,
            lr_scale: 1.0,
        }
    }
}

/// Makes the linear modules named in `modules` (PEFT's `modules_to_save`: a module matches when
/// its path equals a name or ends with `.` + name) train in full, weight and bias. Names the model
/// lacks are ignored, as PEFT does (it lists `score` for every classifier); a non-empty list of
/// which nothing matches is an error.
pub fn train_modules(model: &mut dyn HasSites, modules: &[String]) -> Result<Vec<Trainable>> {
    let is_saved = |p: &str| {
        modules
            .iter()
            .any(|m| p == m || p.ends_with(&format!(".{m}")))
    };
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    if !modules.is_empty() && !paths.iter().any(|p| is_saved(p)) {
        return Err(Error::NoMatch {
            pattern: format!("modules_to_save: {}", modules.join(", ")),
            nearest: deltatune_core::error::nearest_names(
                &modules[0],
                paths.iter().map(|s| s.as_str()),
                5,
            ),
        });
    }
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        if is_saved(&lin.path) {
            let path = lin.path.clone();
            out.push(Trainable::new(
                peft_key(&path, "weight"),
                lin.make_weight_trainable()?,
                true,
            ));
            if lin.bias.is_some() {
                out.push(Trainable::new(
                    peft_key(&path, "bias"),
                    lin.make_bias_trainable()?,
                    false,
                ));
            }
        }
    }
    Ok(out)
}

/// The trainable tensors as a map, for saving.
pub fn state_dict(trainables: &[Trainable]) -> BTreeMap<String, Tensor> {
    trainables
        .iter()
        .map(|t| (t.key.clone(), t.var.as_tensor().detach()))
        .collect()
}

/// The module wrappers under which PEFT's `bias="all"` also saves a `modules_to_save` head's
/// bias: `<head>.modules_to_save.bias` (a second copy of `<head>.bias`, which PEFT's own loader
/// skips) and `<head>.original_module.bias` (the untrained head, unused once the trained one is
/// loaded).
const HEAD_BIAS_COPIES: &[&str] = &[".modules_to_save.bias", ".original_module.bias"];

/// `tensors` under the keys `expected` holds where a file names a tensor another way, or `None`
/// when nothing needs renaming:
/// - a LoRA-targeted layer's bias under `<path>.bias` (deltatune's files before it wrote PEFT's
///   `<path>.base_layer.bias`) is taken as `<path>.base_layer.bias`;
/// - the copies PEFT's `bias="all"` writes of a trained head's bias ([`HEAD_BIAS_COPIES`]) are
///   dropped when `<head>.bias` itself is expected, as PEFT's loader does.
///
/// Any other key is left as it is (and refused by name when nothing expects it).
fn peft_aliases(
    expected: &BTreeSet<&str>,
    tensors: &BTreeMap<String, Tensor>,
) -> Option<BTreeMap<String, Tensor>> {
    let alias = |k: &str| -> Option<Option<String>> {
        if expected.contains(k) {
            return None;
        }
        for copy in HEAD_BIAS_COPIES {
            if let Some(head) = k.strip_suffix(copy) {
                if expected.contains(format!("{head}.bias").as_str()) {
                    return Some(None);
                }
            }
        }
        let stem = k.strip_suffix(".bias")?;
        let wrapped = format!("{stem}.{}", crate::lora::BASE_LAYER_BIAS);
        (expected.contains(wrapped.as_str()) && !tensors.contains_key(&wrapped))
            .then_some(Some(wrapped))
    };
    if !tensors.keys().any(|k| alias(k).is_some()) {
        return None;
    }
    Some(
        tensors
            .iter()
            .filter_map(|(k, t)| match alias(k) {
                None => Some((k.clone(), t.clone())),
                Some(None) => None,
                Some(Some(new)) => Some((new, t.clone())),
            })
            .collect(),
    )
}

/// Sets every trainable from `tensors`; an error on any missing, unexpected or misshapen tensor.
/// Keys PEFT writes another way are taken under deltatune's (prompt-learning heads under
/// `base_model.<module>`; a LoRA-targeted layer's bias under `<layer>.bias`, as deltatune wrote
/// it before; the copies of a head's bias PEFT's `bias="all"` writes are skipped).
pub fn load_state_dict(
    trainables: &[Trainable],
    tensors: &BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let expected: BTreeSet<&str> = trainables.iter().map(|t| t.key.as_str()).collect();
    // PEFT saves the trained modules of prompt-learning methods (prompt, prefix) under
    // `base_model.<module>` (their model is not wrapped twice); ours are
    // `base_model.model.<module>`.
    let short = "base_model.";
    let renamed: BTreeMap<String, Tensor>;
    let tensors = if tensors.keys().any(|k| {
        !expected.contains(k.as_str())
            && k.starts_with(short)
            && !k.starts_with(PEFT_PREFIX)
            && expected.contains(format!("{PEFT_PREFIX}{}", &k[short.len()..]).as_str())
    }) {
        renamed = tensors
            .iter()
            .map(|(k, t)| {
                let long = format!("{PEFT_PREFIX}{}", k.strip_prefix(short).unwrap_or(k));
                if !expected.contains(k.as_str()) && expected.contains(long.as_str()) {
                    (long, t.clone())
                } else {
                    (k.clone(), t.clone())
                }
            })
            .collect();
        &renamed
    } else {
        tensors
    };
    let aliased = peft_aliases(&expected, tensors);
    let tensors = aliased.as_ref().unwrap_or(tensors);
    let unused: Vec<&str> = tensors
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !expected.contains(k))
        .collect();
    if !unused.is_empty() {
        return Err(Error::Weights {
            path: file.to_path_buf(),
            msg: format!(
                "tensors the adapter config does not explain: {} (was it saved with another \
                 adapter_config.json or another base model?)",
                unused.join(", ")
            ),
        });
    }
    for t in trainables {
        let v = tensors.get(&t.key).ok_or_else(|| Error::MissingTensor {
            key: t.key.clone(),
            path: file.to_path_buf(),
            nearest: deltatune_core::error::nearest_names(
                &t.key,
                tensors.keys().map(|k| k.as_str()),
                3,
            ),
        })?;
        if v.dims() != t.var.dims() {
            return Err(Error::ShapeMismatch {
                key: t.key.clone(),
                path: file.to_path_buf(),
                expected: t.var.dims().to_vec(),
                actual: v.dims().to_vec(),
                hint: " (the adapter was trained with another rank or base model)".into(),
            });
        }
        t.var.set(&v.to_dtype(t.var.dtype())?)?;
    }
    Ok(())
}
