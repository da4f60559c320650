//! Loading `tokenizer.json` with padding off (batches are padded by the model to their longest
//! sequence) and truncation at a chosen length.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use deltatune_core::{Error, Result};
use tokenizers::{Tokenizer, TruncationParams};

/// Added tokens longer than this are refused: building the matcher over them is quadratic in
/// their length (a 32,768-byte token took 28 s, found by deltatune-fuzz), and real ones are
/// markers such as `[CLS]` or `<|im_end|>`.
const MAX_ADDED_TOKEN_BYTES: usize = 1024;

/// Rejects a tokenizer.json whose `added_tokens` hold an absurdly long token.
fn check_added_tokens(path: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(()); // the tokenizers library reports unreadable files itself
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(()); // and syntax errors, with their position
    };
    let tokens = v.get("added_tokens").and_then(|a| a.as_array());
    for (i, t) in tokens.into_iter().flatten().enumerate() {
        let content = t.get("content").and_then(|c| c.as_str()).unwrap_or("");
        if content.len() > MAX_ADDED_TOKEN_BYTES {
            let head: String = content.chars().take(40).collect();
            return Err(Error::MalformedConfig {
                path: path.to_path_buf(),
                msg: format!(
                    "added_tokens[{i}] is {} bytes long (starting {head:?}); added tokens are \
                     markers such as [CLS] or <|im_end|> (at most {MAX_ADDED_TOKEN_BYTES} bytes \
                     here): a corrupt tokenizer.json",
                    content.len()
                ),
            });
        }
    }
    Ok(())
}

/// The text of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

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
        // The tokenizers crate panics on some malformed files (an undeserialisable decoder; a
        // post-processor template naming a special token it does not define, on first use):
        // both become an error naming the file, the second found by a probe encoding.
        let malformed = |msg: String| Error::MalformedConfig {
            path: path.to_path_buf(),
            msg,
        };
        check_added_tokens(path)?;
        let mut inner = match catch_unwind(AssertUnwindSafe(|| Tokenizer::from_file(path))) {
            Ok(r) => r.map_err(|e| malformed(e.to_string()))?,
            Err(p) => {
                return Err(malformed(format!(
                    "the tokenizers library could not read it ({}): a malformed tokenizer.json",
                    panic_text(&*p)
                )))
            }
        };
        match catch_unwind(AssertUnwindSafe(|| inner.encode("a", true))) {
            Ok(_) => {}
            Err(p) => {
                return Err(malformed(format!(
                    "encoding a test text failed inside the tokenizers library ({}): check \
                     its post_processor (every special token a template names must be \
                     listed in its special_tokens)",
                    panic_text(&*p)
                )))
            }
        }
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
