//! Loading `tokenizer.json` with padding off (batches are padded by the model to their longest
//! sequence) and truncation at a chosen length.

use std::path::Path;

use deltatune_core::{Error, Result};
use tokenizers::{Tokenizer, TruncationParams};

/// A Hugging Face tokenizer set up for deltatune's batching.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextTokenizer")
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, turns its built-in padding off and truncates at `max_length`.
    pub fn load(path: &Path, max_length: usize) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "a model folder needs config.json, model.safetensors and tokenizer.json \
                       (run `deltatune fetch` for the default model)"
                    .into(),
            });
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Msg(format!("setting truncation on {}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Token ids (with special tokens) of each text.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }
}
