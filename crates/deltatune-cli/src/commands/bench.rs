use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_train::optim::{collect_grads, AdamW};

use crate::session;
use crate::settings::Settings;

const BATCH: usize = 16;
const SEQ: usize = 128;
const WARMUP: usize = 3;

/// The delta's variables and an AdamW over them (no weight decay).
fn optimiser(
    trainables: &[deltatune_methods::Trainable],
) -> Result<(Vec<candle_core::Var>, AdamW)> {
    let vars = trainables.iter().map(|t| t.var.clone()).collect();
    let opt = AdamW::new(
        trainables
            .iter()
            .map(|t| (t.var.clone(), t.decay))
            .collect(),
        0.0,
    )?;
    Ok((vars, opt))
}

fn stats(ms: &mut [f64]) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

/// `deltatune bench`: one LoRA training step (forward + backward + AdamW) and forward-only
/// inference on a batch of 16 x 128 random tokens, as `shared/reference/microbench_lora.py`
/// times PyTorch + PEFT.
pub fn bench(s: &Settings, steps: usize, reference: Option<&Path>) -> Result<()> {
    let dir = session::model_dir(&s.model, &s.cache)?;
    let mut loaded = session::load_model(&dir, 2, s.pooling, SEQ, s.train.seed)?;
    let trainables = session::attach(&mut loaded, s)?;
    let model = &loaded.model;
    let mut rng = Rng::new(0);
    let vocab = model.config.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| {
            (0..SEQ)
                .map(|_| (1000 + rng.below(vocab - 1000)) as u32)
                .collect()
        })
        .collect();
    let labels: Vec<u32> = (0..BATCH).map(|_| rng.below(2) as u32).collect();
    let inputs = model.inputs(&seqs)?;
    let labels_t = Tensor::from_slice(&labels, BATCH, &candle_core::Device::Cpu)?;
    let (vars, mut opt) = optimiser(&trainables)?;
    let mut step = |i: usize| -> Result<f64> {
        let t = Instant::now();
        let ctx = Ctx::train(Rng::new(i as u64));
        let logits = model.forward(&inputs, &ctx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels_t)?;
        let grads = collect_grads(&loss.backward()?, &vars);
        opt.step(&grads, 5e-4, 1.0)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for i in 0..WARMUP {
        step(i)?;
    }
    let mut train_ms: Vec<f64> = (0..steps)
        .map(|i| step(WARMUP + i))
        .collect::<Result<_>>()?;
    let ctx = Ctx::eval();
    let infer = || -> Result<f64> {
        let t = Instant::now();
        let logits = model.forward(&inputs, &ctx)?;
        logits.sum_all()?.to_scalar::<f32>()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..WARMUP {
        infer()?;
    }
    let mut infer_ms: Vec<f64> = (0..steps).map(|_| infer()).collect::<Result<_>>()?;
    let (tm, tmin, tmax) = stats(&mut train_ms);
    let (im, imin, imax) = stats(&mut infer_ms);
    let reference: Option<serde_json::Value> = match reference {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
        ),
        None => None,
    };
    let refv = |k: &str| {
        reference
            .as_ref()
            .and_then(|r| r[k]["median_ms"].as_f64())
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "MiniLM-L6 ({}), LoRA r={} alpha={} on {:?}, batch {BATCH} x {SEQ}, {WARMUP} warm-up + {steps} timed, {threads} threads",
        dir.display(),
        s.lora.r,
        s.lora.lora_alpha,
        s.lora.target_modules
    );
    println!("| workload | deltatune candle-cpu f32 median ms (min-max) | PyTorch + PEFT f32 median ms | ratio |");
    println!("|---|---|---|---|");
    for (name, key, med, lo, hi) in [
        (
            "train step (fwd + bwd + AdamW)",
            "train_f32",
            tm,
            tmin,
            tmax,
        ),
        ("forward only (inference)", "infer_f32", im, imin, imax),
    ] {
        let r = refv(key);
        let ratio = r
            .parse::<f64>()
            .map_or("-".to_string(), |v| format!("{:.2}x", med / v));
        println!("| {name} | {med:.0} ({lo:.0}-{hi:.0}) | {r} | {ratio} |");
    }
    println!(
        "peak memory: {:.0} MiB",
        super::peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

/// `deltatune bench --task generate`: the decoder's LoRA training step on a G2P-sized batch
/// (16 examples, 10 prompt + 14 completion tokens) with the base kept quantized and with an f32
/// copy of it (time, loss on the same batch, peak memory), and greedy generation at batch 1 and 8,
/// beside llama.cpp's on the same file when `reference` (scripts/bench_llamacpp.py's JSON) is
/// given.
pub fn bench_decoder(s: &Settings, steps: usize, reference: Option<&Path>) -> Result<()> {
    let reference: Option<serde_json::Value> = match reference {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| {
                format!(
                    "{} is not the JSON of scripts/bench_llamacpp.py",
                    p.display()
                )
            })?,
        ),
        None => None,
    };
    use deltatune_train::{CausalLmTask, LmExample, Task};
    let mut d = super::lm::load(&s.model, &s.cache)?;
    let mut rng = Rng::new(0);
    let vocab = d.model.config.vocab_size;
    let mut tok = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (100 + rng.below(vocab - 100)) as u32)
            .collect()
    };
    let examples: Vec<LmExample> = (0..BATCH)
        .map(|_| LmExample {
            prompt: tok(10),
            completion: tok(14),
        })
        .collect();
    let idx: Vec<usize> = (0..BATCH).collect();
    let prompts: Vec<Vec<u32>> = (0..8).map(|_| tok(16)).collect();
    let decode = |_: &[u32]| String::new();
    let mut rows = Vec::new();
    for base in ["quantized (GGUF blocks)", "f32 (dequantized copy)"] {
        if base.starts_with("f32") {
            d.model.dequantize_base()?;
        }
        let trainables = super::lm::attach(&mut d, s)?;
        let (vars, mut opt) = optimiser(&trainables)?;
        let task = CausalLmTask {
            model: &d.model,
            train: &examples,
            dev: &[],
            dev_references: &[],
            decode: &decode,
            max_new_tokens: 1,
            stop: Vec::new(),
        };
        let loss0 = task.loss(&idx, &Ctx::eval())?.to_scalar::<f32>()?;
        let mut step = |i: usize| -> Result<f64> {
            let t = Instant::now();
            let loss = task.loss(&idx, &Ctx::train(Rng::new(i as u64)))?;
            let grads = collect_grads(&loss.backward()?, &vars);
            opt.step(&grads, 1e-4, 1.0)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        for i in 0..WARMUP {
            step(i)?;
        }
        let mut ms: Vec<f64> = (0..steps)
            .map(|i| step(WARMUP + i))
            .collect::<Result<_>>()?;
        let (m, lo, hi) = stats(&mut ms);
        let tokens = (BATCH * 24) as f64;
        rows.push(format!(
            "| train step, base {base} | {m:.0} ({lo:.0}-{hi:.0}) | {:.0} | {loss0:.6} | {:.0} |",
            tokens / (m / 1e3),
            super::peak_rss_mib().unwrap_or(0.0)
        ));
        // Remove this pass's delta before the next base.
        d.model.site_deltas.clear();
        for lin in d.model.linears_mut() {
            lin.deltas.clear();
        }
    }
    println!(
        "decoder {} , LoRA r={} on {:?}, batch {BATCH} x 24 tokens (loss on 14 completion tokens each), {WARMUP} warm-up + {steps} timed",
        d.source.display(),
        s.lora.r,
        s.lora.target_modules
    );
    println!("| workload | median ms (min-max) | tokens/s | loss on the batch (before training) | peak RSS so far MiB |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    // Generation on the f32 base is not the default; reload the quantized one.
    let d = super::lm::load(&s.model, &s.cache)?;
    println!("| generation | median ms per token (min-max) | tokens/s | | |");
    for b in [1usize, 8] {
        let g = deltatune_models::llama::Generator {
            model: &d.model,
            decode: None,
        };
        let cfg = deltatune_models::llama::GenerateConfig {
            max_new_tokens: 64,
            ..Default::default()
        };
        let mut per_token = Vec::new();
        for _ in 0..3.max(steps / 3) {
            let t = Instant::now();
            let out = g.generate(&prompts[..b], &cfg, &mut |_, _| true)?;
            let n: usize = out.iter().map(|o| o.ids.len()).sum::<usize>().max(1);
            per_token.push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
        }
        let (m, lo, hi) = stats(&mut per_token);
        println!(
            "| greedy generation, batch {b}, 16-token prompt, 64 new | {m:.2} ({lo:.2}-{hi:.2}) | {:.0} | | |",
            1e3 / m
        );
        if let Some(r) = reference.as_ref().map(|r| &r[format!("batch{b}")]) {
            if let Some(rm) = r["ms_per_token"].as_f64() {
                println!(
                    "| llama.cpp ({} threads), batch {b}, same file and workload | {rm:.2} ({:.2}-{:.2}) | {:.0} | deltatune's time: {:.2}x | |",
                    reference.as_ref().map_or(0, |r| r["threads"].as_u64().unwrap_or(0)),
                    r["min"].as_f64().unwrap_or(f64::NAN),
                    r["max"].as_f64().unwrap_or(f64::NAN),
                    1e3 / rm,
                    m / rm
                );
            }
        }
    }
    Ok(())
}
