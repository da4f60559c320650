//! A decoder with its tokenizer and chat template, from a GGUF file (everything inside it) or a
//! Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`, and the chat
//! template of `tokenizer_config.json` when present).

use std::path::{Path, PathBuf};

use deltatune_core::{Error, Result};
use tokenizers::Tokenizer;

use super::model::LlamaModel;

/// A loaded decoder.
pub struct LoadedDecoder {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<String>,
    /// The file or folder it came from.
    pub source: PathBuf,
}

/// Loads the decoder at `path` (a `.gguf` file or a Hugging Face folder).
pub fn load_decoder(path: &Path) -> Result<LoadedDecoder> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let mut g = super::gguf::load_llama_gguf(path)?;
        let tokenizer = std::mem::replace(
            &mut g.tokenizer,
            Tokenizer::new(tokenizers::models::bpe::BPE::default()),
        );
        let chat_template = g.chat_template.take();
        let model = LlamaModel::from_gguf(g, path)?;
        return Ok(LoadedDecoder {
            model,
            tokenizer,
            chat_template,
            source: path.to_path_buf(),
        });
    }
    let model = LlamaModel::load(path)?;
    let tok_path = path.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::MissingFile {
            path: tok_path,
            hint: "a decoder folder needs tokenizer.json beside config.json and model.safetensors"
                .into(),
        });
    }
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::MalformedConfig {
        path: tok_path.clone(),
        msg: e.to_string(),
    })?;
    let chat_template = std::fs::read_to_string(path.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(|c| c.as_str())
                .map(String::from)
        });
    Ok(LoadedDecoder {
        model,
        tokenizer,
        chat_template,
        source: path.to_path_buf(),
    })
}

impl LoadedDecoder {
    /// Token ids of `text` (with the tokenizer's own special tokens, e.g. a BOS if it adds one).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
