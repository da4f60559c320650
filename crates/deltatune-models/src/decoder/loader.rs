//! A decoder with its tokenizer and chat template, from a GGUF file (everything inside it) or a
//! Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`, and the chat
//! template of `tokenizer_config.json` when present).

use std::path::{Path, PathBuf};

use deltatune_core::{Error, Result};
use tokenizers::Tokenizer;

use super::model::Decoder;

/// The weights of a Hugging Face folder: `model.safetensors`, or the shards a
/// `model.safetensors.index.json` lists (f32, f16 or bf16; read as f32).
pub fn read_safetensors(dir: &Path) -> Result<deltatune_core::Weights> {
    use candle_core::DType;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() || !index.exists() {
        return deltatune_core::Weights::load(&single, DType::F32);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io("reading", &index, e))?;
    let bad = |msg: String| Error::MalformedConfig {
        path: index.clone(),
        msg,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no `weight_map` object".into()));
    };
    let mut shards: Vec<&str> = Vec::new();
    for (key, file) in map {
        let Some(f) = file.as_str() else {
            return Err(bad(format!("weight_map[{key}] is not a file name")));
        };
        // A shard is a file name in the folder, never a path out of it.
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(format!(
                "weight_map[{key}] = `{f}`: shards must be file names in the folder"
            )));
        }
        if !shards.contains(&f) {
            shards.push(f);
        }
    }
    let mut tensors = std::collections::HashMap::new();
    for f in shards {
        let w = deltatune_core::Weights::load(&dir.join(f), DType::F32)?;
        for (k, t) in w.tensors() {
            tensors.insert(k.to_string(), t.clone());
        }
    }
    Ok(deltatune_core::Weights::from_map(&index, tensors))
}

/// A loaded decoder.
pub struct LoadedDecoder {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<String>,
    /// The file or folder it came from.
    pub source: PathBuf,
}

/// Loads the decoder at `path` (a `.gguf` file or a Hugging Face folder).
pub fn load_decoder(path: &Path) -> Result<LoadedDecoder> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let mut g = super::gguf::load_gguf(path)?;
        let tokenizer = std::mem::replace(
            &mut g.tokenizer,
            Tokenizer::new(tokenizers::models::bpe::BPE::default()),
        );
        let chat_template = g.chat_template.take();
        let model = Decoder::from_gguf(g, path)?;
        return Ok(LoadedDecoder {
            model,
            tokenizer,
            chat_template,
            source: path.to_path_buf(),
        });
    }
    let model = Decoder::load(path)?;
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
