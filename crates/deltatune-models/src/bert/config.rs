//! BERT-family configuration: [`BertConfigFile`] mirrors `config.json`; [`BertConfig`] is the
//! checked, plain struct the model uses.

use std::path::Path;

use deltatune_core::{Error, Result};
use serde::Deserialize;

/// `config.json` of a BERT / MiniLM / RoBERTa checkpoint, as Hugging Face writes it. Fields the
/// model does not need are ignored; missing optional fields take the transformers defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfigFile {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

/// The encoder family, which fixes the checkpoint prefix and position-id rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT and MiniLM: positions 0..T.
    Bert,
    /// RoBERTa: positions start after the padding id and skip padding.
    Roberta,
}

impl Family {
    /// The module prefix of the encoder inside a sequence-classification model.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
        }
    }
}

/// Checked configuration the model is built from.
#[derive(Debug, Clone)]
pub struct BertConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub classifier_dropout: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub initializer_range: f64,
}

impl BertConfigFile {
    /// Reads and parses `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.to_path_buf(),
                    hint: "a model folder needs config.json, model.safetensors and tokenizer.json \
                           (run `deltatune fetch` for the default model)"
                        .into(),
                }
            } else {
                Error::io("reading", path, e)
            }
        })?;
        serde_json::from_str(&text).map_err(|e| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Validates the values and builds the model's config.
    pub fn into_config(self, path: &Path) -> Result<BertConfig> {
        let bad = |msg: String| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg,
        };
        let family = match self.model_type.as_str() {
            "bert" | "minilm" => Family::Bert,
            "roberta" | "xlm-roberta" => Family::Roberta,
            other => {
                return Err(bad(format!(
                    "model_type `{other}` is not a BERT-family encoder (supported: bert, roberta, xlm-roberta)"
                )))
            }
        };
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (supported: gelu)",
                self.hidden_act
            )));
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return Err(bad(format!(
                    "position_embedding_type `{p}` is not supported (supported: absolute)"
                )));
            }
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0; it must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(BertConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_dropout: self.hidden_dropout_prob,
            attention_dropout: self.attention_probs_dropout_prob,
            classifier_dropout: self.classifier_dropout.unwrap_or(self.hidden_dropout_prob),
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(if family == Family::Roberta {
                1
            } else {
                0
            }),
            initializer_range: self.initializer_range,
        })
    }
}
