//! Decoder tasks: training a delta on prompt/completion pairs (`train --task generate`) and
//! generating text with or without an adapter (`generate`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deltatune_core::{HasSites, Rng};
use deltatune_data::generation::{load_generation_jsonl, ChatMessage, GenExample};
use deltatune_methods::{load_state_dict, Trainable};
use deltatune_models::decoder::{GenerateConfig, Generator, LoadedDecoder};
use deltatune_train::adapter_folder::config_task_type;
use deltatune_train::artifact::{Staging, ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG};
use deltatune_train::{
    generate_texts, generation_metrics, AdapterFolder, AdapterTask, CausalLmTask, LmExample,
};
use serde_json::json;

use crate::settings::Settings;

pub use deltatune::decoder::{
    attach, decoder_path, decoder_targets, encode_for_classifier, is_decoder_folder,
    is_decoder_spec, load, targets_summary,
};

/// Renders `messages` with the model's chat template, ending with the assistant's turn.
pub fn apply_chat_template(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    deltatune_data::generation::apply_chat_template(template, messages, add_generation_prompt)
        .map_err(anyhow::Error::msg)
}

/// Token ids of prompt and completion (the completion ends with the end-of-sequence id).
fn tokenize(
    d: &LoadedDecoder,
    ex: &GenExample,
    template: &str,
    max_length: usize,
    eos: u32,
) -> Result<LmExample> {
    let (prompt, completion) = match ex {
        GenExample::PromptCompletion { prompt, completion } => {
            (template.replace("{prompt}", prompt), completion.clone())
        }
        GenExample::Chat { messages } => {
            let (last, ctx) = messages.split_last().expect("a chat has messages");
            (
                apply_chat_template(d.chat_template.as_deref(), ctx, true)?,
                last.content.clone(),
            )
        }
    };
    let p = d.encode(&prompt, true)?;
    let mut c = d.encode(&completion, false)?;
    c.push(eos);
    if p.len() + c.len() > max_length {
        bail!(
            "an example has {} prompt and {} completion tokens, more than data.max_length {max_length}: \
             raise data.max_length or shorten it (prompt starts {:?})",
            p.len(),
            c.len(),
            prompt.chars().take(40).collect::<String>()
        );
    }
    Ok(LmExample {
        prompt: p,
        completion: c,
    })
}

/// The reference text of an example (its completion).
fn reference(ex: &GenExample) -> String {
    match ex {
        GenExample::PromptCompletion { completion, .. } => completion.trim().to_string(),
        GenExample::Chat { messages } => messages
            .last()
            .map_or(String::new(), |m| m.content.trim().to_string()),
    }
}

/// Train/dev/test files of a generation run: the settings' or the G2P splits.
fn data_files(s: &Settings) -> Result<(PathBuf, PathBuf, Option<PathBuf>)> {
    use deltatune_data::assets;
    let d = &s.data;
    if !d.prompt_template.contains("{prompt}") {
        bail!(
            "data.prompt_template {:?} has no `{{prompt}}` placeholder for the prompt field",
            d.prompt_template
        );
    }
    Ok(match (&d.train, &d.dev) {
        (None, None) => {
            let dir = match assets::g2p_dir(&s.cache) {
                Ok(dir) => dir,
                Err(_) => {
                    eprintln!(
                        "the CMU dictionary is not in {} yet: fetching it",
                        s.cache.display()
                    );
                    assets::fetch_cmudict(&s.cache, &assets::FetchOptions::from_env(), &mut |m| {
                        eprintln!("  {m}")
                    })?;
                    assets::g2p_dir(&s.cache)?
                }
            };
            (
                dir.join("train.jsonl"),
                dir.join("dev.jsonl"),
                Some(d.test.clone().unwrap_or(dir.join("test.jsonl"))),
            )
        }
        (Some(t), Some(v)) => (t.clone(), v.clone(), d.test.clone()),
        (Some(_), None) => bail!("a training file needs a development file too: add --dev-file"),
        (None, Some(_)) => bail!("a development file needs a training file too: add --train-file"),
    })
}

fn limited(v: Vec<GenExample>, limit: usize, seed: u64, what: &str) -> Vec<GenExample> {
    if limit == 0 || limit >= v.len() {
        return v;
    }
    let out = deltatune_data::g2p::subset(&v, limit, Rng::new(seed).derive(what).next_u64());
    eprintln!("{what}: a seeded subset of {limit} of {} examples", v.len());
    out
}

/// The task features `auto` reads for a generation run, and its train/dev files.
pub fn task_features(
    s: &Settings,
) -> Result<(
    deltatune_search::auto::TaskFeatures,
    std::collections::BTreeMap<String, PathBuf>,
)> {
    let (train_file, dev_file, _) = data_files(s)?;
    let train = limited(
        load_generation_jsonl(&train_file, &s.data.prompt_field, &s.data.completion_field)?,
        s.data.train_limit,
        s.train.seed,
        "train",
    );
    let d = load(&s.model, &s.cache)?;
    let eos = d.model.config.eos_token_ids.first().copied().unwrap_or(0);
    let mut lens = Vec::with_capacity(train.len());
    let mut out_tokens = 0usize;
    for e in &train {
        let ex = tokenize(&d, e, &s.data.prompt_template, s.data.max_length, eos)?;
        out_tokens += ex.completion.len();
        lens.push(ex.len());
    }
    let n = train.len();
    let features = deltatune_search::auto::TaskFeatures {
        task: "generate".into(),
        mean_output_tokens: out_tokens as f64 / n.max(1) as f64,
        train_examples: n,
        labels: 0,
        mean_tokens: lens.iter().sum::<usize>() as f64 / n.max(1) as f64,
        max_tokens: lens.iter().copied().max().unwrap_or(0),
        min_label_share: 0.0,
        model_params: d.model.param_count(),
        model_layers: d.model.num_layers(),
        hidden: d.model.hidden_size(),
    };
    let files = [
        ("train".to_string(), train_file),
        ("dev".to_string(), dev_file),
    ]
    .into_iter()
    .collect();
    Ok((features, files))
}

/// `deltatune train --task generate`.
pub fn train(s: &Settings, resume: bool) -> Result<()> {
    let staging = Staging::create(&s.output, &super::run_output_rules(s))?;
    let ckpt = super::resume::RunCheckpoints::prepare(s, resume)?;
    let (train_file, dev_file, test_file) = data_files(s)?;
    let mut prints = vec![
        super::resume::DataPrint::file("train", &train_file)?,
        super::resume::DataPrint::file("dev", &dev_file)?,
    ];
    if let Some(t) = &test_file {
        prints.push(super::resume::DataPrint::file("test", t)?);
    }
    ckpt.check_data(&prints)?;
    let read = |p: &Path| -> Result<Vec<GenExample>> {
        Ok(load_generation_jsonl(
            p,
            &s.data.prompt_field,
            &s.data.completion_field,
        )?)
    };
    let seed = s.train.seed;
    let train_ex = limited(read(&train_file)?, s.data.train_limit, seed, "train");
    let dev_ex = limited(read(&dev_file)?, s.data.dev_limit, seed, "dev");
    let test_ex = match &test_file {
        Some(p) => Some(limited(read(p)?, s.data.test_limit, seed, "test")),
        None => None,
    };
    let mut d = load(&s.model, &s.cache)?;
    let eos = *d
        .model
        .config
        .eos_token_ids
        .first()
        .context("the model names no end-of-sequence token; it cannot learn where to stop")?;
    let tok = |v: &[GenExample]| -> Result<Vec<LmExample>> {
        v.iter()
            .map(|e| tokenize(&d, e, &s.data.prompt_template, s.data.max_length, eos))
            .collect()
    };
    let t_tok = Instant::now();
    let train = tok(&train_ex)?;
    let dev = tok(&dev_ex)?;
    let test = match &test_ex {
        Some(t) => Some(tok(t)?),
        None => None,
    };
    let tok_secs = t_tok.elapsed().as_secs_f64();
    let (trainables, attached) = attach(&mut d, s)?;
    let optimised: Vec<Trainable> = trainables
        .iter()
        .filter(|t| !s.train.freeze.iter().any(|f| t.key.contains(f.as_str())))
        .cloned()
        .collect();
    let n_train: usize = optimised.iter().map(|t| t.var.elem_count()).sum();
    let n_base = d.model.param_count();
    eprintln!(
        "delta {}: {} trainable parameters ({:.3}% of the model)",
        s.method,
        n_train,
        100.0 * n_train as f64 / n_base as f64
    );
    let tokens: usize = train.iter().map(|e| e.len()).sum();
    eprintln!(
        "data: train {} / dev {} / test {} examples ({} training tokens, tokenised in {:.1} s)",
        train.len(),
        dev.len(),
        test.as_ref().map_or(0, |t| t.len()),
        tokens,
        tok_secs
    );
    // The exact examples used, so a reference run (scripts/peft_g2p.py) sees the same data.
    let write_split = |name: &str, v: &[GenExample]| -> Result<()> {
        let mut bytes = Vec::new();
        for e in v {
            serde_json::to_writer(&mut bytes, e)?;
            bytes.push(b'\n');
        }
        Ok(staging.write(name, &bytes)?)
    };
    write_split("train.jsonl", &train_ex)?;
    write_split("dev.jsonl", &dev_ex)?;
    if let Some(t) = &test_ex {
        write_split("test.jsonl", t)?;
    }
    let model_source = d.source.canonicalize().unwrap_or(d.source.clone());
    staging.write_json(
        RUN_CONFIG,
        &json!({
            "deltatune_version": env!("CARGO_PKG_VERSION"),
            "settings": s,
            "model_dir": model_source,
            "data_files": {"train": train_file, "dev": dev_file, "test": test_file},
            "base_params": n_base,
            "trainable_params": n_train,
        }),
    )?;
    let refs = |v: &[GenExample]| v.iter().map(reference).collect::<Vec<_>>();
    let dev_refs = refs(&dev_ex);
    let decode = |ids: &[u32]| d.decode(ids);
    let task = CausalLmTask {
        model: &d.model,
        train: &train,
        dev: &dev,
        dev_references: &dev_refs,
        decode: &decode,
        max_new_tokens: s.generation.max_new_tokens,
        stop: s.generation.stop.clone(),
        int8_activations: s.generation.int8_activations,
        show_progress: s.progress,
    };
    let report = deltatune_train::train_task_with(
        &task,
        &optimised,
        &s.train,
        &deltatune_train::TrainOptions {
            metrics_log: Some(&ckpt.metrics_log()),
            show_progress: s.progress,
            checkpoints: Some(&ckpt.checkpointing),
        },
    )?;
    ckpt.copy_metrics(&staging)?;
    let t_eval = Instant::now();
    let test_m = match (&test, &test_ex) {
        (Some(t), Some(te)) => {
            let prompts: Vec<Vec<u32>> = t.iter().map(|e| e.prompt.clone()).collect();
            let refs = refs(te);
            let progress = s.progress.then_some("test");
            let (em, er, texts) =
                generate_and_score(&d, &prompts, &refs, s, s.train.eval_batch_size, progress)?;
            staging.write("test_generations.jsonl", &generations_jsonl(&refs, &texts)?)?;
            Some(json!({"accuracy": em, "exact_match": em, "error_rate": er, "examples": t.len()}))
        }
        _ => None,
    };
    let eval_secs = t_eval.elapsed().as_secs_f64();
    let best = report.epochs.iter().find(|e| e.epoch == report.best_epoch);
    // `accuracy` is the exact match too: what search, auto and the experiment tables rank by.
    let dev_m = json!({
        "accuracy": best.map(|e| e.dev_accuracy),
        "exact_match": best.map(|e| e.dev_accuracy),
        "error_rate": best.and_then(|e| e.dev_error_rate),
        "examples": dev.len(),
    });
    // The attached delta: Phi-3's `q_proj`/`v_proj` saved as the `qkv_proj` they went on.
    let mut delta = attached.for_saving(&model_source.display().to_string());
    if let Some(slot) = delta.subspace_mut() {
        if let Some(src) = slot.clone() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading the subspace {src}"))?;
            staging.write(crate::session::SUBSPACE_FILE, &bytes)?;
            *slot = Some(crate::session::SUBSPACE_FILE.to_string());
        }
    }
    let mut cfg = delta.to_json(&d.model);
    cfg["task_type"] = json!("CAUSAL_LM");
    staging.write_json(ADAPTER_CONFIG, &cfg)?;
    let tensors = delta.export(&trainables)?;
    staging.write(
        ADAPTER_WEIGHTS,
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    let secs: Vec<f64> = report.epochs.iter().map(|e| e.train_seconds).collect();
    let mean_secs = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
    let results = json!({
        "task": "generate",
        "best_epoch": report.best_epoch,
        "dev": dev_m,
        "test": test_m,
        "train_examples": train.len(),
        "train_tokens": tokens,
        "train_seconds_per_epoch": secs,
        "mean_train_seconds_per_epoch": mean_secs,
        "test_eval_seconds": eval_secs,
        "peak_rss_mib": super::peak_rss_mib(),
        "base_bytes": d.model.base_bytes(),
        "trainable_params": n_train,
        "base_params": n_base,
    });
    staging.write_json("results.json", &results)?;
    let out = staging.commit()?;
    ckpt.finish();
    println!(
        "dev exact match:  {:.4} (error rate {:.4}, best epoch {})",
        dev_m["exact_match"].as_f64().unwrap_or(f64::NAN),
        dev_m["error_rate"].as_f64().unwrap_or(f64::NAN),
        report.best_epoch
    );
    if let Some(t) = &test_m {
        println!(
            "test exact match: {:.4} (error rate {:.4}, {} examples)",
            t["exact_match"].as_f64().unwrap_or(f64::NAN),
            t["error_rate"].as_f64().unwrap_or(f64::NAN),
            t["examples"]
        );
    }
    println!(
        "seconds per epoch: {mean_secs:.1}; peak memory {:.0} MiB",
        super::peak_rss_mib().unwrap_or(0.0)
    );
    println!("adapter saved to {}", out.display());
    Ok(())
}

/// Greedy generations of `prompts` with the run's generation settings in batches of `batch`,
/// and their exact match and error rate against `refs`.
fn generate_and_score(
    d: &LoadedDecoder,
    prompts: &[Vec<u32>],
    refs: &[String],
    s: &Settings,
    batch: usize,
    progress: Option<&str>,
) -> Result<(f64, f64, Vec<String>)> {
    let decode = |ids: &[u32]| d.decode(ids);
    let texts = generate_texts(
        &d.model,
        prompts,
        &decode,
        s.generation.max_new_tokens,
        &s.generation.stop,
        batch,
        s.generation.int8_activations,
        progress,
    )?;
    let (em, er) = generation_metrics(&texts, refs);
    Ok((em, er, texts))
}

/// `{"reference", "generated"}` JSON lines (`test_generations.jsonl`, `eval --output`).
fn generations_jsonl(refs: &[String], texts: &[String]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for (r, g) in refs.iter().zip(texts) {
        serde_json::to_writer(&mut bytes, &json!({"reference": r, "generated": g}))?;
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// Whether `dir` holds a decoder's adapter (`task_type` CAUSAL_LM).
pub fn is_decoder_adapter(dir: &Path) -> bool {
    config_task_type(dir).as_deref() == Some("CAUSAL_LM")
}

/// `deltatune eval --adapter DIR` for a decoder's adapter: greedy generations of the run's test
/// examples (its `test.jsonl`, the exact examples training scored) or of `data`, scored by
/// exact match and error rate with the run's generation settings, in batches of `batch_size`
/// (default: the run's `train.eval_batch_size`, so the texts equal `test_generations.jsonl`);
/// `output` gets the generations as JSON lines.
pub fn eval(
    adapter: &Path,
    data: Option<&Path>,
    batch_size: Option<usize>,
    output: Option<&Path>,
) -> Result<()> {
    let run_config = adapter.join(RUN_CONFIG);
    let s: Settings = match std::fs::read_to_string(&run_config) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", run_config.display()))?;
            serde_json::from_value(v["settings"].clone()).with_context(|| {
                format!(
                    "the settings in {} do not parse: was it written by another deltatune version?",
                    run_config.display()
                )
            })?
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot read {}", run_config.display()))
        }
        Err(_) if data.is_some() => Settings::default(),
        Err(_) => bail!(
            "{} has no {RUN_CONFIG} (a folder PEFT wrote?), so no test examples of its own: \
             give a prompt/completion JSONL file with --data",
            adapter.display()
        ),
    };
    let (path, examples) = match data {
        Some(p) => (
            p.to_path_buf(),
            load_generation_jsonl(p, &s.data.prompt_field, &s.data.completion_field)?,
        ),
        None => {
            let p = adapter.join("test.jsonl");
            if !p.exists() {
                bail!(
                    "{} is missing: the run had no test file; give one with --data",
                    p.display()
                );
            }
            let ex = load_generation_jsonl(&p, "prompt", "completion")?;
            (p, ex)
        }
    };
    // `--batch-size 0` is refused by the caller; the run's own value was validated in training.
    let batch = batch_size.unwrap_or(s.train.eval_batch_size);
    let d = load_with_adapter(adapter, None, &s.cache)?;
    let eos = d.model.config.eos_token_ids.first().copied().unwrap_or(0);
    let prompts = examples
        .iter()
        .map(|e| Ok(tokenize(&d, e, &s.data.prompt_template, s.data.max_length, eos)?.prompt))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<String> = examples.iter().map(reference).collect();
    let (em, er, texts) = generate_and_score(&d, &prompts, &refs, &s, batch, Some("eval"))?;
    if let Some(out) = output {
        deltatune_core::write_atomic(out, &generations_jsonl(&refs, &texts)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    println!(
        "{}: {} examples, exact match {em:.4}, error rate {er:.4}",
        path.display(),
        examples.len()
    );
    Ok(())
}

/// `deltatune generate` arguments.
#[derive(Debug, Clone, Default)]
pub struct GenerateArgs {
    pub adapter: Option<PathBuf>,
    pub model: Option<String>,
    pub cache: Option<PathBuf>,
    pub file: Option<PathBuf>,
    pub texts: Vec<String>,
    pub chat: bool,
    pub config: GenerateConfig,
    pub dump_logits: Option<PathBuf>,
}

/// Loads a decoder with the adapter in `dir` attached (PEFT's or deltatune's folder), on
/// `model` or the base the folder names.
pub fn load_with_adapter(dir: &Path, model: Option<&str>, cache: &Path) -> Result<LoadedDecoder> {
    let wrong_kind = |t: &str| {
        anyhow::anyhow!(
            "{} is a {t} adapter, not a decoder's (task_type CAUSAL_LM): use `deltatune predict` \
             for classification adapters",
            dir.join(ADAPTER_CONFIG).display(),
        )
    };
    if let Some(t) = config_task_type(dir).filter(|t| t != "CAUSAL_LM") {
        return Err(wrong_kind(&t));
    }
    let folder = AdapterFolder::read("adapter", dir, None)
        .with_context(|| format!("reading the adapter folder {}", dir.display()))?;
    if folder.task != AdapterTask::Generate {
        return Err(wrong_kind("classifier's"));
    }
    let base = match model {
        Some(m) => m.to_string(),
        None => folder.base.clone().with_context(|| {
            format!(
                "{} names no base model (base_model_name_or_path); pass --model",
                dir.join(ADAPTER_CONFIG).display()
            )
        })?,
    };
    let mut d = load(&base, cache)?;
    let tr = folder.delta.attach_saved(&mut d.model, &Rng::new(0))?;
    load_state_dict(&tr, &folder.tensors, &dir.join(ADAPTER_WEIGHTS)).with_context(|| {
        format!(
            "the adapter in {} does not fit the base model {base}",
            dir.display()
        )
    })?;
    Ok(d)
}

/// `deltatune generate`.
pub fn generate(a: &GenerateArgs) -> Result<()> {
    // Bad sampling settings are refused before the model loads.
    a.config.validate()?;
    let cache = a
        .cache
        .clone()
        .unwrap_or_else(deltatune_data::assets::default_cache_dir);
    let d = match &a.adapter {
        Some(dir) => load_with_adapter(dir, a.model.as_deref(), &cache)?,
        None => load(
            a.model
                .as_deref()
                .unwrap_or(deltatune_data::assets::DECODER_NAME),
            &cache,
        )?,
    };
    let mut texts = a.texts.clone();
    if let Some(f) = &a.file {
        let body =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.extend(
            body.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        bail!("nothing to generate from: give a text or --file");
    }
    for text in &texts {
        let prompt = if a.chat {
            let msgs = [ChatMessage {
                role: "user".into(),
                content: text.clone(),
            }];
            apply_chat_template(d.chat_template.as_deref(), &msgs, true)?
        } else {
            text.clone()
        };
        let ids = d.encode(&prompt, true)?;
        if let Some(out) = &a.dump_logits {
            let n = ids.len();
            let logits = d.model.forward(
                std::slice::from_ref(&ids),
                &[vec![1; n]],
                None,
                &deltatune_core::Ctx::eval(),
            )?;
            let t = logits.dim(1)?;
            let logits = logits.narrow(1, t - n, n)?.squeeze(0)?;
            let idt = candle_core::Tensor::from_vec(
                ids.iter().map(|&i| i as i64).collect::<Vec<i64>>(),
                n,
                &candle_core::Device::Cpu,
            )?;
            let map = [
                ("logits".to_string(), logits),
                ("input_ids".to_string(), idt),
            ]
            .into_iter()
            .collect();
            deltatune_core::write_atomic(out, &deltatune_core::to_safetensors_bytes(&map)?)?;
            eprintln!("wrote the prompt's logits to {}", out.display());
        }
        let g = Generator {
            model: &d.model,
            decode: Some(&|ids: &[u32]| d.decode(ids)),
        };
        let mut so_far: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let mut out = std::io::stdout().lock();
        let stops = &a.config.stop;
        let res = g.generate(&[ids], &a.config, &mut |_, tok| {
            so_far.push(tok);
            let text = d.decode(&so_far);
            // Print only complete characters, never a stop string or what follows it, and
            // hold back an end that may be the start of one; the rest waits for the next token.
            let end = printable_end(&text, stops, false);
            if end > printed && text.is_char_boundary(printed) && !text[..end].ends_with('\u{FFFD}')
            {
                let _ = write!(out, "{}", &text[printed..end]);
                let _ = out.flush();
                printed = end;
            }
            true
        })?;
        let text = d.decode(&res[0].ids);
        let end = printable_end(&text, stops, true);
        if end > printed && text.is_char_boundary(printed) {
            write!(out, "{}", &text[printed..end])?;
        }
        writeln!(out)?;
        eprintln!("[{} tokens, stopped: {:?}]", res[0].ids.len(), res[0].stop);
    }
    Ok(())
}

/// How much of a streamed `text` may be shown: up to the first stop string (which is not
/// shown, as OpenAI's `stop` works), and, while the text may still grow (`done` false), short
/// of an end that could be the beginning of a stop string. Always a character boundary.
fn printable_end(text: &str, stops: &[String], done: bool) -> usize {
    let first_stop = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    let mut end = match first_stop {
        Some(at) => at,
        None if done => text.len(),
        None => {
            // The longest end of `text` that begins some stop string is held back.
            let held = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(move |&k| s.is_char_boundary(k))
                        .map(move |k| &s[..k])
                })
                .filter(|p| text.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            text.len() - held
        }
    };
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streamed answer never shows its stop string or what follows it, and a partial stop
    /// string waits until it is known not to be one.
    #[test]
    fn streamed_text_stops_before_the_stop_string() {
        let stops = vec!["\n".to_string(), "</s>".to_string()];
        assert_eq!(printable_end(" AE0 K\n\n /a/", &stops, false), 6);
        assert_eq!(printable_end(" AE0 K\n\n /a/", &stops, true), 6);
        assert_eq!(printable_end("word </", &stops, false), 5);
        assert_eq!(printable_end("word </", &stops, true), 7);
        assert_eq!(printable_end("word <b", &stops, false), 7);
        assert_eq!(printable_end("no stops", &[], false), 8);
        assert_eq!(printable_end("é\n", &stops, false), "é".len());
    }

    /// The GGUF's chat template rendered here equals transformers' rendering (fixture).
    #[test]
    fn chat_template_renders_as_transformers_does() {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/chat.json");
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let msgs: Vec<ChatMessage> = serde_json::from_value(fx["messages"].clone()).unwrap();
        let got = apply_chat_template(fx["chat_template"].as_str(), &msgs, true).unwrap();
        assert_eq!(got, fx["rendered"].as_str().unwrap());
        let err = apply_chat_template(None, &msgs, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no chat template"), "{err}");
    }
}
