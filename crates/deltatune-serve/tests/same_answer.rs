//! The same request, the same answer (issue 27): a sequence's numbers, and so its greedy text,
//! do not depend on the batch it rides in. For every method (LoRA, IA3, prefix, prompt,
//! bottleneck adapter) and the base:
//!
//! * bit for bit, each row's logits at every step of a batch run the way the server runs it
//!   (left-padded prompts of different lengths, LoRA adapters and the base mixed in one batch,
//!   a second group prefilled on its own and joining with its cache padded, a row leaving)
//!   equal the logits of the row alone in the model `generate` builds (the adapter attached on
//!   its own);
//! * the generation engine's greedy texts, one request at a time and under mixed concurrent
//!   load (several adapters and the base at once, joining running batches), equal what
//!   `generate` gives each request alone.
//!
//! On the tiny Llama of the fixtures always, and on the fetched SmolLM2 GGUF (8-bit activations,
//! quantized products) when it is there (skipped with a message otherwise; required under
//! `DELTATUNE_REQUIRE_ASSETS=1`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use common::{fixtures, folder, tiny, tokenizer, CHAT_TEMPLATE};
use deltatune_core::{Ctx, Rng};
use deltatune_methods::lora::multi::attach_multi;
use deltatune_methods::{load_state_dict, DeltaConfig};
use deltatune_models::decoder::{GenerateConfig, Generator, LoadedDecoder};
use deltatune_models::{Decoder, KvCache};
use deltatune_serve::decoder::{self, GenEvent, GenRequest};
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::metrics::Metrics;
use deltatune_serve::AdapterFolder;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

/// `model` with `folder`'s adapter attached on its own, as `deltatune generate` builds it.
fn with_adapter(model: &Decoder, folder: Option<&AdapterFolder>) -> Decoder {
    let mut m = model.clone();
    if let Some(f) = folder {
        let tr = f.delta.attach_saved(&mut m, &Rng::new(0)).unwrap();
        load_state_dict(&tr, &f.tensors, Path::new("x")).unwrap();
    }
    m
}

/// `model` with every LoRA folder of `folders` attached for per-row routing, as the server's
/// shared batch has them (row value `i` = `folders[i]`).
fn shared(model: &Decoder, folders: &[&AdapterFolder]) -> Decoder {
    let mut m = model.clone();
    let list: Vec<_> = folders
        .iter()
        .map(|f| (f.lora().unwrap().clone(), f.tensors.clone()))
        .collect();
    attach_multi(&mut m, &list).unwrap();
    m
}

/// The token fed to row `r` at its decoding step `s` (the same alone and in the batch).
fn fed(r: usize, s: usize) -> u32 {
    (3 + (r * 13 + s * 7) % 90) as u32
}

fn ctx(routes: Option<Vec<u32>>) -> Ctx {
    match routes {
        Some(r) => Ctx::inference().with_adapter_rows(r),
        None => Ctx::inference(),
    }
    .with_int8(true)
}

/// The next-token logits of each row of a pass over `ids` (left-padded to one length).
fn pass(
    model: &Decoder,
    ids: &[Vec<u32>],
    mask: &[Vec<u32>],
    cache: &mut KvCache,
    ctx: &Ctx,
) -> Vec<Vec<f32>> {
    let h = model.forward_hidden(ids, mask, Some(cache), ctx).unwrap();
    let t = h.dim(1).unwrap();
    let last = h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
    model.logits(&last, ctx).unwrap().to_vec2().unwrap()
}

fn left_padded(prompts: &[&Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let n = prompts.iter().map(|p| p.len()).max().unwrap();
    let ids = prompts
        .iter()
        .map(|p| {
            let mut r = vec![0; n - p.len()];
            r.extend_from_slice(p);
            r
        })
        .collect();
    let mask = prompts
        .iter()
        .map(|p| {
            let mut r = vec![0; n - p.len()];
            r.extend(std::iter::repeat_n(1, p.len()));
            r
        })
        .collect();
    (ids, mask)
}

/// Each row's logits at each of its steps in a batch run as the server runs one: the rows
/// before `split` prefilled together (left-padded) and decoded 2 steps; the others prefilled
/// on their own and appended (their cache padded to the batch's); 3 steps of all; row 0 leaves;
/// 1 more step. `routes`: each row's adapter in a shared model.
fn batch_run(
    model: &Decoder,
    prompts: &[Vec<u32>],
    routes: Option<&[u32]>,
    split: usize,
) -> Vec<Vec<Vec<f32>>> {
    let n = prompts.len();
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); n];
    let route = |rows: &[usize]| routes.map(|r| rows.iter().map(|&i| r[i]).collect());
    let mut live: Vec<usize> = (0..split).collect();
    let (ids, mask) = left_padded(&prompts[..split].iter().collect::<Vec<_>>());
    let mut cache = KvCache::default();
    for (r, l) in pass(model, &ids, &mask, &mut cache, &ctx(route(&live)))
        .into_iter()
        .enumerate()
    {
        out[r].push(l);
    }
    let step = |live: &[usize], cache: &mut KvCache, out: &mut Vec<Vec<Vec<f32>>>| {
        let ids: Vec<Vec<u32>> = live.iter().map(|&r| vec![fed(r, out[r].len())]).collect();
        let mask = vec![vec![1u32]; live.len()];
        let logits = pass(model, &ids, &mask, cache, &ctx(route(live)));
        for (&r, l) in live.iter().zip(logits) {
            out[r].push(l);
        }
    };
    for _ in 0..2 {
        step(&live, &mut cache, &mut out);
    }
    let joining: Vec<usize> = (split..n).collect();
    let (ids, mask) = left_padded(&prompts[split..].iter().collect::<Vec<_>>());
    let mut other = KvCache::default();
    for (&r, l) in joining
        .iter()
        .zip(pass(model, &ids, &mask, &mut other, &ctx(route(&joining))))
    {
        out[r].push(l);
    }
    cache.append(other).unwrap();
    live.extend(joining);
    for _ in 0..3 {
        step(&live, &mut cache, &mut out);
    }
    cache
        .keep_rows(&(1..live.len()).collect::<Vec<_>>())
        .unwrap();
    live.remove(0);
    step(&live, &mut cache, &mut out);
    out
}

/// Row `r`'s logits alone: its prompt, then `steps - 1` fed tokens.
fn alone_run(model: &Decoder, prompt: &[u32], r: usize, steps: usize) -> Vec<Vec<f32>> {
    let mut cache = KvCache::default();
    let c = ctx(None);
    let mut out = pass(
        model,
        &[prompt.to_vec()],
        &[vec![1; prompt.len()]],
        &mut cache,
        &c,
    );
    while out.len() < steps {
        let s = out.len();
        out.extend(pass(model, &[vec![fed(r, s)]], &[vec![1]], &mut cache, &c));
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts that every row of [`batch_run`] got the bits of its row alone in `alone_model(r)`.
fn assert_rows_alone(
    what: &str,
    batch: &[Vec<Vec<f32>>],
    prompts: &[Vec<u32>],
    alone_model: impl Fn(usize) -> Decoder,
) {
    for (r, steps) in batch.iter().enumerate() {
        let alone = alone_run(&alone_model(r), &prompts[r], r, steps.len());
        for (s, (got, want)) in steps.iter().zip(&alone).enumerate() {
            if bits(got) != bits(want) {
                let d = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                panic!("{what}: row {r} step {s}: logits differ from the row alone by up to {d:e}");
            }
        }
    }
}

/// Prompts of different lengths (so batches pad), ids in `3..96`.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..(2 + (i * 5) % 9))
                .map(|j| (3 + (i * 11 + j * 7) % 90) as u32)
                .collect()
        })
        .collect()
}

/// Writes an adapter of `cfg` (an `adapter_config.json` value) for `model` into `dir` with
/// random weights (LoRA's B, prompts, prefixes and bottlenecks `N(0, std²)`, IA3 vectors
/// `1 + N(0, 0.3²)`, LoRA's A as initialised) and reads it back.
fn random_folder(
    model: &Decoder,
    name: &str,
    mut cfg: serde_json::Value,
    dir: &Path,
    seed: u64,
    std: f64,
) -> AdapterFolder {
    cfg["task_type"] = "CAUSAL_LM".into();
    cfg["modules_to_save"] = serde_json::Value::Null;
    let delta = DeltaConfig::from_json(cfg).unwrap();
    let mut m = model.clone();
    let tr = delta.attach_saved(&mut m, &Rng::new(seed)).unwrap();
    let mut rng = Rng::new(seed + 1);
    let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
    for t in &tr {
        let v = t.var.as_tensor();
        let value = if t.key.contains("lora_A") {
            v.clone()
        } else if t.key.contains("ia3_l") {
            (rng.normal_tensor(v.dims(), 0.3).unwrap() + 1.0).unwrap()
        } else {
            rng.normal_tensor(v.dims(), std).unwrap()
        };
        map.insert(t.key.clone(), value);
    }
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut json = delta.to_json(&m);
    json["task_type"] = "CAUSAL_LM".into();
    std::fs::write(
        d.join("adapter_config.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.join("adapter_model.safetensors"),
        deltatune_core::to_safetensors_bytes(&map).unwrap(),
    )
    .unwrap();
    AdapterFolder::read(name, &d, None).unwrap()
}

fn bottleneck_cfg() -> serde_json::Value {
    serde_json::json!({"peft_type": "BOTTLENECK_ADAPTER", "bottleneck_size": 8})
}

/// The tiny Llama's adapters: three LoRA adapters (ranks and alphas by pattern), the fixtures'
/// prompt, prefix and IA3 adapters and a random bottleneck adapter.
fn tiny_folders(dir: &Path) -> Vec<AdapterFolder> {
    let mut v: Vec<AdapterFolder> = ["a", "e", "c", "prompt", "prefix", "ia3"]
        .iter()
        .map(|n| folder(n))
        .collect();
    v.push(random_folder(
        &tiny(),
        "adapter",
        bottleneck_cfg(),
        dir,
        7,
        0.5,
    ));
    v
}

/// Bit-for-bit logits of every method, batched as the server batches them, against the row
/// alone with its adapter attached on its own.
fn check_logits(base: &Decoder, folders: &[AdapterFolder], prompts: &[Vec<u32>]) {
    let lora: Vec<&AdapterFolder> = folders.iter().filter(|f| f.lora().is_some()).collect();
    let model = shared(base, &lora);
    // Rows: each LoRA adapter and the base, mixed.
    let k = lora.len() as u32;
    let routes: Vec<u32> = (0..prompts.len() as u32)
        .map(|i| {
            if i % (k + 1) == k {
                u32::MAX
            } else {
                i % (k + 1)
            }
        })
        .collect();
    let batch = batch_run(&model, prompts, Some(&routes), prompts.len() / 2);
    assert_rows_alone(
        "LoRA adapters and the base in one batch",
        &batch,
        prompts,
        |r| {
            let f = (routes[r] != u32::MAX).then(|| lora[routes[r] as usize]);
            with_adapter(base, f)
        },
    );
    for f in folders.iter().filter(|f| f.lora().is_none()) {
        let m = with_adapter(base, Some(f));
        let batch = batch_run(&m, prompts, None, prompts.len() / 2);
        assert_rows_alone(f.method(), &batch, prompts, |_| m.clone());
    }
}

#[test]
fn every_row_gets_the_logits_it_gets_alone_tiny_llama() {
    let dir = tempfile::tempdir().unwrap();
    check_logits(&tiny(), &tiny_folders(dir.path()), &prompts(7));
}

/// The text of a generation request's events.
fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> String {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("an event") {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Done(_) => return text,
            GenEvent::Error(e) => panic!("{e}"),
        }
    }
}

/// Greedy texts of every (adapter or base, prompt) pair from `generate` (each alone), from the
/// engine one request at a time, and from the engine with every request sent at once from
/// several threads (batches mixing adapters and the base, rows joining running batches): all
/// three equal.
fn check_engine(dec: LoadedDecoder, folders: Vec<AdapterFolder>, prompts: &[Vec<u32>], n: usize) {
    let cfg = GenerateConfig {
        max_new_tokens: n,
        ..GenerateConfig::default()
    };
    let names: Vec<Option<String>> = std::iter::once(None)
        .chain(folders.iter().map(|f| Some(f.name.clone())))
        .collect();
    let mut jobs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            // Not every pair: enough to mix every adapter with every other.
            if (i + j) % 2 == 0 {
                jobs.push((name.clone(), p.clone()));
            }
        }
    }
    let tok = dec.tokenizer.clone();
    let models: BTreeMap<Option<String>, Decoder> = names
        .iter()
        .map(|n| {
            let f = n
                .as_ref()
                .map(|n| folders.iter().find(|f| &f.name == n).unwrap());
            (n.clone(), with_adapter(&dec.model, f))
        })
        .collect();
    let generate: Vec<String> = jobs
        .iter()
        .map(|(name, p)| {
            let g = Generator {
                model: &models[name],
                decode: None,
            };
            let ids = g
                .generate(std::slice::from_ref(p), &cfg, &mut |_, _| true)
                .unwrap()
                .remove(0)
                .ids;
            tok.decode(&ids, true).unwrap()
        })
        .collect();
    let opts = EngineOptions {
        max_batch: 6,
        max_queue: 256,
    };
    let eng = decoder::start(dec, folders, &opts, Arc::new(Metrics::default())).unwrap();
    let submit = |(name, p): &(Option<String>, Vec<u32>)| {
        let (tx, rx) = mpsc::unbounded_channel();
        eng.submit(GenRequest {
            adapter: name.clone(),
            prompt: p.clone(),
            config: cfg.clone(),
            events: tx,
        })
        .unwrap();
        rx
    };
    for (job, want) in jobs.iter().zip(&generate) {
        let got = collect(&mut submit(job));
        assert_eq!(&got, want, "the server alone: {:?} on {:?}", job.0, job.1);
    }
    // Under load: four client threads, each sending its share at once in its own order.
    let texts: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                let jobs = &jobs;
                let submit = &submit;
                s.spawn(move || {
                    let mine: Vec<usize> = (0..jobs.len()).rev().filter(|i| i % 4 == c).collect();
                    let rxs: Vec<_> = mine.iter().map(|&i| (i, submit(&jobs[i]))).collect();
                    rxs.into_iter()
                        .map(|(i, mut rx)| (i, collect(&mut rx)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(texts.len(), jobs.len());
    for (i, got) in texts {
        assert_eq!(
            got, generate[i],
            "the server under mixed load: {:?} on {:?}",
            jobs[i].0, jobs[i].1
        );
    }
}

#[test]
fn the_server_alone_and_under_mixed_load_answers_as_generate_does_tiny_llama() {
    let dir = tempfile::tempdir().unwrap();
    let dec = LoadedDecoder {
        model: tiny(),
        tokenizer: tokenizer(),
        chat_template: Some(CHAT_TEMPLATE.into()),
        source: fixtures().join("tiny-llama"),
    };
    check_engine(dec, tiny_folders(dir.path()), &prompts(8), 10);
}

/// The fetched SmolLM2 GGUF, or `None` (with a message) when absent and not required.
fn smollm2() -> Option<PathBuf> {
    let cache = std::env::var_os("DELTATUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/deltatune"));
    let p = cache.join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("DELTATUNE_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{} missing: run `deltatune fetch`",
        p.display()
    );
    eprintln!(
        "NOTE: skipping: {} not found (run `deltatune fetch`)",
        p.display()
    );
    None
}

/// Random adapters of every method on SmolLM2: two LoRA adapters (different targets and
/// ranks), IA3, prefix, prompt and a bottleneck adapter.
fn smollm2_folders(base: &Decoder, dir: &Path) -> Vec<AdapterFolder> {
    let cfgs = [
        (
            "lora-qv",
            serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"]}),
            0.02,
        ),
        (
            "lora-all",
            serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}),
            0.02,
        ),
        (
            "ia3",
            serde_json::json!({"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"]}),
            0.0,
        ),
        (
            "prefix",
            serde_json::json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}),
            0.3,
        ),
        (
            "prompt",
            serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}),
            0.02,
        ),
        ("adapter", bottleneck_cfg(), 0.02),
    ];
    cfgs.into_iter()
        .enumerate()
        .map(|(i, (name, cfg, std))| random_folder(base, name, cfg, dir, 100 + i as u64, std))
        .collect()
}

/// Short prompts of the real tokenizer.
fn smollm2_prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    [
        "cat",
        "The capital of France is",
        "Spell the word graph:",
        "1, 2, 3,",
        "Translate to German: good morning",
        "A list of colours:",
    ]
    .iter()
    .map(|t| tok.encode(*t, true).unwrap().get_ids().to_vec())
    .collect()
}

#[test]
fn every_row_gets_the_logits_it_gets_alone_smollm2() {
    let Some(p) = smollm2() else { return };
    let dec = deltatune_models::decoder::load_decoder(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folders = smollm2_folders(&dec.model, dir.path());
    check_logits(&dec.model, &folders, &smollm2_prompts(&dec.tokenizer));
}

#[test]
fn the_server_alone_and_under_mixed_load_answers_as_generate_does_smollm2() {
    let Some(p) = smollm2() else { return };
    let dec = deltatune_models::decoder::load_decoder(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folders = smollm2_folders(&dec.model, dir.path());
    let prompts = smollm2_prompts(&dec.tokenizer);
    check_engine(dec, folders, &prompts, 12);
}

/// Time decoding on SmolLM2 with the row-invariant kernels (`Ctx::inference`, what generation
/// and the server use) against the batch-shaped ones (`Ctx::eval`, what they used before):
/// `cargo test --release -p deltatune-serve --test same_answer bench_row_invariant_decoding
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_row_invariant_decoding() {
    let Some(p) = smollm2() else { return };
    let dec = deltatune_models::decoder::load_decoder(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folders = smollm2_folders(&dec.model, dir.path());
    let lora: Vec<&AdapterFolder> = folders.iter().filter(|f| f.lora().is_some()).collect();
    let models = [
        ("base", dec.model.clone()),
        ("2 LoRA", shared(&dec.model, &lora)),
    ];
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            (0..16)
                .map(|j| 100 + ((i * 31 + j * 17) % 4000) as u32)
                .collect()
        })
        .collect();
    for (what, m) in &models {
        for b in [1usize, 8] {
            for int8 in [true, false] {
                let mut line = format!("{what}, batch {b}, int8 {int8}:");
                for (name, base_ctx) in [("before", Ctx::eval()), ("rows", Ctx::inference())] {
                    let routes: Vec<u32> = (0..b as u32)
                        .map(|i| i % 3)
                        .map(|r| if r == 2 { u32::MAX } else { r })
                        .collect();
                    let mk = || {
                        base_ctx_clone(&base_ctx)
                            .with_adapter_rows(routes.clone())
                            .with_int8(int8)
                    };
                    let mut times = Vec::new();
                    for rep in 0..4 {
                        let c = mk();
                        let t = std::time::Instant::now();
                        let mut cache = KvCache::default();
                        let (ids, mask) = left_padded(&prompts[..b].iter().collect::<Vec<_>>());
                        pass(m, &ids, &mask, &mut cache, &c);
                        for s in 0..32 {
                            let ids: Vec<Vec<u32>> = (0..b).map(|r| vec![fed(r, s)]).collect();
                            pass(m, &ids, &vec![vec![1]; b], &mut cache, &c);
                        }
                        if rep > 0 {
                            times.push(t.elapsed().as_secs_f64() * 1e3 / (33 * b) as f64);
                        }
                    }
                    times.sort_by(f64::total_cmp);
                    line += &format!(" {name} {:.2} ms/token", times[times.len() / 2]);
                }
                eprintln!("{line}");
            }
        }
    }
}

fn base_ctx_clone(c: &Ctx) -> Ctx {
    if c.no_grad {
        Ctx::inference()
    } else {
        Ctx::eval()
    }
}
