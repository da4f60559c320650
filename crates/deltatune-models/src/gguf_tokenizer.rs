//! A Hugging Face [`Tokenizer`] rebuilt from the `tokenizer.ggml.*` metadata of a GGUF file,
//! so a single `.gguf` is enough to tokenize for its model.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE, the tokenizer of GPT-2, SmolLM,
//! StarCoder, ...) with the pre-tokenizers llama.cpp calls `smollm` (digits split one per
//! token, then GPT-2's byte-level regex: exactly SmolLM2's `tokenizer.json`) and
//! `gpt2`/`default` (byte-level regex only). The pieces:
//!
//! * model: BPE over `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges`
//!   (`"a b"` strings, by rank), no unknown token, no dropout;
//! * added tokens: control tokens (`token_type` 3, e.g. `<|im_start|>`) as special tokens and
//!   user-defined ones (4) as plain added tokens, with their vocabulary ids, so they are never
//!   split;
//! * decoder: byte level; post-processor: byte level (offsets only), plus BOS/EOS when
//!   `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (false for SmolLM2).

use deltatune_core::{Error, GgufFile, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const SUPPORTED_PRE: &str = "smollm, gpt2, default";

fn bad(file: &GgufFile, msg: String) -> Error {
    Error::MalformedConfig {
        path: file.path().to_path_buf(),
        msg,
    }
}

/// The pre-tokenizer llama.cpp names `pre` (`tokenizer.ggml.pre`).
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<PreTokenizerWrapper> {
    // add_prefix_space = false, trim_offsets = true, use_regex = true: GPT-2's settings.
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        "gpt2" | "default" => PreTokenizerWrapper::ByteLevel(byte_level),
        other => {
            return Err(bad(
                file,
                format!(
                    "tokenizer.ggml.pre is `{other}`, a pre-tokenizer deltatune cannot rebuild \
                     (supported: {SUPPORTED_PRE}); use the model's tokenizer.json instead"
                ),
            ))
        }
    })
}

/// Builds the tokenizer described by `file`'s `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.metadata_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        let kind = match model {
            "llama" => " (SentencePiece BPE)",
            "bert" => " (WordPiece)",
            "t5" => " (SentencePiece unigram)",
            _ => "",
        };
        return Err(bad(
            file,
            format!(
                "tokenizer.ggml.model is `{model}`{kind}; only `gpt2` (byte-level BPE) \
                 tokenizers can be rebuilt from GGUF metadata"
            ),
        ));
    }
    let pre_name = file
        .metadata_str_opt("tokenizer.ggml.pre")?
        .unwrap_or("default");
    let pre = pre_tokenizer(file, pre_name)?;

    let tokens = file.metadata_str_array("tokenizer.ggml.tokens")?;
    let types = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.metadata_i32_array("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(
            file,
            format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            ),
        ));
    }
    let merges = file
        .metadata_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    bad(
                        file,
                        format!("tokenizer.ggml.merges[{i}] is {m:?}, not two tokens `a b`"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;

    // Token -> id; a string listed twice keeps its first id.
    let mut vocab = Vocab::default();
    for (id, &t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            bad(
                file,
                format!("building the BPE model from tokenizer.ggml.*: {e}"),
            )
        })?;

    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let mut special = Vec::new();
    let mut user = Vec::new();
    for (&t, &ty) in tokens.iter().zip(&types) {
        match ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(t, true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(t, false).normalized(false)),
            _ => {}
        }
    }
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);

    let token_of = |key: &str| -> Result<Option<(String, u32)>> {
        match file.metadata_u32_opt(key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id as usize) {
                Some(t) => Ok(Some((t.to_string(), id))),
                None => Err(bad(
                    file,
                    format!("{key} is {id}, outside the vocabulary of {}", tokens.len()),
                )),
            },
        }
    };
    let add_bos = file
        .metadata_bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = file
        .metadata_bool_opt("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let byte_level_post = PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true));
    let required = |key: &str, on: bool| -> Result<Option<(String, u32)>> {
        if !on {
            return Ok(None);
        }
        token_of(key)?.map(Some).ok_or_else(|| {
            bad(
                file,
                format!("{key} is missing but the file asks for that token to be added"),
            )
        })
    };
    let bos = required("tokenizer.ggml.bos_token_id", add_bos)?;
    let eos = required("tokenizer.ggml.eos_token_id", add_eos)?;
    let post = if bos.is_some() || eos.is_some() {
        let seq = |body: &str, type_id: u32| {
            let mut parts = Vec::new();
            if let Some((t, _)) = &bos {
                parts.push(format!("{t}:{type_id}"));
            }
            parts.push(body.to_string());
            if let Some((t, _)) = &eos {
                parts.push(format!("{t}:{type_id}"));
            }
            parts.join(" ")
        };
        let single = seq("$A:0", 0);
        let pair = format!("{} {}", single, seq("$B:1", 1));
        let specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
        let template_err = |e: String| bad(file, format!("building the BOS/EOS template: {e}"));
        let template = TemplateProcessing::builder()
            .try_single(single.as_str())
            .map_err(|e| template_err(e.to_string()))?
            .try_pair(pair.as_str())
            .map_err(|e| template_err(e.to_string()))?
            .special_tokens(specials)
            .build()
            .map_err(|e| template_err(e.to_string()))?;
        PostProcessorWrapper::Sequence(tokenizers::processors::sequence::Sequence::new(vec![
            byte_level_post,
            PostProcessorWrapper::Template(template),
        ]))
    } else {
        byte_level_post
    };
    tok.with_post_processor(Some(post));
    Ok(tok)
}
