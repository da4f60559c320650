//! Vision Transformer configuration: [`VitConfigFile`] mirrors the `config.json` of a Hugging
//! Face `Dinov2Model`/`ViTModel` (or their `...ForImageClassification`); [`VitConfig`] is the
//! checked, plain struct the model uses.

use std::path::Path;

use deltatune_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `config.json` of a DINOv2 or ViT checkpoint. Fields the model does not need are ignored;
/// missing optional fields take the transformers defaults of the model type.
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfigFile {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// ViT's MLP width.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// DINOv2's MLP width as a multiple of the hidden size (default 4).
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    pub patch_size: usize,
    /// The resolution the position embeddings were trained at (DINOv2: 518, a 37 x 37 grid).
    pub image_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Class names by id, when the checkpoint has a head.
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
}

fn three() -> usize {
    3
}
fn default_act() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}

/// The ViT variant, which fixes the module names and the classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VitFamily {
    /// DINOv2: `norm1`/`norm2`, `mlp.fc1`/`mlp.fc2`, layer scale; the head reads the CLS token
    /// and the mean of the patch tokens.
    Dinov2,
    /// ViT: `layernorm_before`/`layernorm_after`, `intermediate.dense`/`output.dense`; the head
    /// reads the CLS token.
    Vit,
}

impl VitFamily {
    /// The module prefix of the backbone inside an image-classification model.
    pub fn prefix(self) -> &'static str {
        match self {
            VitFamily::Dinov2 => "dinov2",
            VitFamily::Vit => "vit",
        }
    }
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub family: VitFamily,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
}

impl VitConfigFile {
    /// Reads `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
            field: path.display().to_string(),
            msg: format!("{e} (expected a Hugging Face Dinov2 or ViT config.json)"),
        })
    }

    /// Checks the values and fills the defaults of the model type.
    pub fn into_config(self, path: &Path) -> Result<VitConfig> {
        let bad = |field: &str, msg: String| Error::InvalidConfig {
            field: format!("{}: {field}", path.display()),
            msg,
        };
        let family = match self.model_type.as_str() {
            "dinov2" => VitFamily::Dinov2,
            "vit" => VitFamily::Vit,
            other => {
                return Err(bad(
                    "model_type",
                    format!("`{other}` is not a vision transformer deltatune reads (dinov2, vit)"),
                ))
            }
        };
        if self.use_swiglu_ffn {
            return Err(bad(
                "use_swiglu_ffn",
                "true (the giant DINOv2's SwiGLU MLP) is not supported".into(),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(bad(
                "hidden_act",
                format!("`{}` is not supported (gelu)", self.hidden_act),
            ));
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return Err(bad("hidden_size", "must be positive".into()));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(bad(
                "patch_size",
                format!(
                    "{} with image_size {}: need 0 < patch_size <= image_size",
                    self.patch_size, self.image_size
                ),
            ));
        }
        let intermediate_size = match (family, self.intermediate_size, self.mlp_ratio) {
            (VitFamily::Vit, Some(i), _) => i,
            (VitFamily::Vit, None, _) => 4 * self.hidden_size,
            (VitFamily::Dinov2, _, ratio) => {
                (self.hidden_size as f64 * ratio.unwrap_or(4.0)).round() as usize
            }
        };
        let eps = self.layer_norm_eps.unwrap_or(match family {
            VitFamily::Dinov2 => 1e-6,
            VitFamily::Vit => 1e-12,
        });
        Ok(VitConfig {
            family,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            intermediate_size,
            patch_size: self.patch_size,
            image_size: self.image_size,
            num_channels: self.num_channels,
            layer_norm_eps: eps,
            qkv_bias: self.qkv_bias,
            hidden_dropout: self.hidden_dropout_prob,
            attention_dropout: self.attention_probs_dropout_prob,
        })
    }
}

impl VitConfig {
    /// The side of the square grid the position embeddings were trained on.
    pub fn trained_grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}
