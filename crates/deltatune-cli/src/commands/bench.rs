use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use deltatune_core::{Ctx, Rng};
use deltatune_train::optim::{collect_grads, AdamW};

use crate::session;
use crate::settings::Settings;

const BATCH: usize = 16;
const SEQ: usize = 128;
const WARMUP: usize = 3;

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
    let vars: Vec<_> = trainables.iter().map(|t| t.var.clone()).collect();
    let mut opt = AdamW::new(
        trainables
            .iter()
            .map(|t| (t.var.clone(), t.decay))
            .collect(),
        0.0,
    )?;
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
