//! Decoders for the pipelines: finding and loading a decoder by name, file or folder, the token
//! ids a classifier on a decoder reads, and a delta's targets in a decoder's names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deltatune_core::{HasSites, Rng};
use deltatune_methods::{DeltaConfig, Trainable};
use deltatune_models::decoder::{load_decoder, LoadedDecoder};

use crate::settings::Settings;

/// The decoder file or folder for `spec`, fetching the default decoder on first use.
pub fn decoder_path(spec: &str, cache: &Path) -> Result<PathBuf> {
    use deltatune_data::assets;
    if spec.eq_ignore_ascii_case(assets::DECODER_NAME) && !assets::decoder_gguf_path(cache).exists()
    {
        eprintln!(
            "the default decoder is not in {} yet: fetching it",
            cache.display()
        );
        assets::fetch_decoder(cache, &assets::FetchOptions::from_env(), &mut |m| {
            eprintln!("  {m}")
        })?;
    }
    if spec.eq_ignore_ascii_case(assets::GEMMA3_NAME) && !assets::gemma3_gguf_path(cache).exists() {
        eprintln!(
            "{} is not in {} yet: fetching it",
            assets::GEMMA3_NAME,
            cache.display()
        );
        assets::fetch_gemma3(cache, &assets::FetchOptions::from_env(), &mut |m| {
            eprintln!("  {m}")
        })?;
    }
    Ok(assets::resolve_decoder(spec, cache)?)
}

/// Whether `spec` names a decoder: a `.gguf` file, a folder whose `config.json` has a decoder
/// family's `model_type`, or a decoder's short name.
pub fn is_decoder_spec(spec: &str) -> bool {
    use deltatune_data::assets;
    let p = Path::new(spec);
    if spec.eq_ignore_ascii_case(assets::DECODER_NAME)
        || spec.eq_ignore_ascii_case(assets::GEMMA3_NAME)
    {
        return true;
    }
    if p.is_file() {
        return p.extension().is_some_and(|e| e == "gguf");
    }
    is_decoder_folder(p)
}

/// Whether `dir/config.json` names a decoder family's `model_type`.
pub fn is_decoder_folder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(String::from))
        .is_some_and(|t| deltatune_models::decoder::Family::from_model_type(&t).is_some())
}

/// Loads the decoder of `spec`.
pub fn load(spec: &str, cache: &Path) -> Result<LoadedDecoder> {
    let path = decoder_path(spec, cache)?;
    let t = Instant::now();
    let d =
        load_decoder(&path).with_context(|| format!("loading the decoder {}", path.display()))?;
    eprintln!(
        "decoder {} ({} parameters, {:.0} MiB as stored) loaded in {:.1} s",
        path.display(),
        d.model.param_count(),
        d.model.base_bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(d)
}

/// Tokenises `examples` for a classifier on the decoder `d` (with the tokenizer's special
/// tokens, cut to `max_length` and the decoder's positions) and maps their labels.
pub fn encode_for_classifier(
    d: &LoadedDecoder,
    max_length: usize,
    examples: &[deltatune_data::text::Example],
    labels: &deltatune_data::text::LabelMap,
    split: &str,
) -> Result<deltatune_train::Encoded> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    Ok(deltatune_train::Encoded {
        ids: classifier_ids(d, max_length, &texts, split)?,
        labels: labels.encode(examples, split)?,
    })
}

/// Token ids of `texts` for a classifier on the decoder `d` (see [`encode_for_classifier`]).
pub fn classifier_ids(
    d: &LoadedDecoder,
    max_length: usize,
    texts: &[&str],
    split: &str,
) -> Result<Vec<Vec<u32>>> {
    let positions = d.model.config.max_position_embeddings.min(max_length);
    texts
        .iter()
        .map(|t| {
            let mut x = d.encode(t, true)?;
            if x.is_empty() {
                bail!("{split}: the text \"{t}\" has no tokens");
            }
            x.truncate(positions);
            Ok(x)
        })
        .collect()
}

/// The delta for a decoder: attached for training. Returns the trainable tensors and the
/// delta as attached (its targets in the decoder's names: what the adapter folder must say).
pub fn attach(d: &mut LoadedDecoder, s: &Settings) -> Result<(Vec<Trainable>, DeltaConfig)> {
    let mut delta = s.delta();
    if decoder_targets(&mut delta, d.model.config.family.fused_projections()) {
        eprintln!(
            "{}: the delta targets {}",
            d.model.config.family,
            targets_summary(&delta)
        );
    }
    let text_ids = match delta.init_text() {
        Some(t) => Some(d.encode(t, false)?),
        None => None,
    };
    let rng = Rng::new(s.train.seed).derive(delta.name());
    let trainables = delta.attach(&mut d.model, &rng, text_ids.as_deref())?;
    let bf16_layers = deltatune_core::sites::use_bf16_where_faster(&mut d.model, s.train.bf16)?;
    crate::session::report_products(s.train.bf16, bf16_layers);
    Ok((trainables, delta))
}

/// Puts `delta`'s target lists in a decoder's names: BERT's defaults (`query`, `key`,
/// `value`, `attention.output.dense`, `intermediate.dense`, `output.dense`) become `q_proj`,
/// `k_proj`, `v_proj`, `o_proj`, `up_proj`, `down_proj`, and with `fused` (Phi-3) `q_proj` /
/// `k_proj` / `v_proj` become `qkv_proj` and `gate_proj` / `up_proj` become `gate_up_proj`, as
/// PEFT's defaults for Phi-3 target them. Whether anything changed.
pub fn decoder_targets(delta: &mut DeltaConfig, fused: bool) -> bool {
    use deltatune_core::sites::TargetModules;
    let rename = |t: &mut TargetModules| -> bool {
        let TargetModules::Suffixes(list) = t else {
            return false;
        };
        let mut out: Vec<String> = Vec::new();
        for s in list.iter() {
            let d = match s.as_str() {
                "query" => "q_proj",
                "key" => "k_proj",
                "value" => "v_proj",
                "attention.output.dense" => "o_proj",
                "intermediate.dense" => "up_proj",
                "output.dense" => "down_proj",
                other => other,
            };
            let f = match d {
                "q_proj" | "k_proj" | "v_proj" if fused => "qkv_proj",
                "gate_proj" | "up_proj" if fused => "gate_up_proj",
                other => other,
            };
            if !out.iter().any(|o| o == f) {
                out.push(f.to_string());
            }
        }
        let changed = out != *list;
        *list = out;
        changed
    };
    match delta {
        DeltaConfig::Lora(c) => rename(&mut c.target_modules),
        DeltaConfig::Ia3(c) => {
            let a = rename(&mut c.target_modules);
            let b = c.feedforward_modules.as_mut().is_some_and(rename);
            a || b
        }
        DeltaConfig::Compose(c) => {
            // Every member is renamed (no short-circuit).
            let mut changed = false;
            for d in c.deltas.iter_mut() {
                changed |= decoder_targets(d, fused);
            }
            changed
        }
        _ => false,
    }
}

/// The target modules of `delta` (and its members), for a message.
pub fn targets_summary(delta: &DeltaConfig) -> String {
    use deltatune_core::sites::TargetModules;
    let show = |t: &TargetModules| match t {
        TargetModules::Suffixes(l) => l.join(", "),
        TargetModules::Regex(r) => r.clone(),
    };
    match delta {
        DeltaConfig::Lora(c) => show(&c.target_modules),
        DeltaConfig::Ia3(c) => show(&c.target_modules),
        DeltaConfig::Compose(c) => c
            .deltas
            .iter()
            .map(targets_summary)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::new(),
    }
}
