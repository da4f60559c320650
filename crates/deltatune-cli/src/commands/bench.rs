use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use deltatune_core::{Ctx, HasSites, Rng};
use deltatune_models::Backbone as _;
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

/// The reference JSON files merged into one object (a key in a later file wins).
fn load_references(paths: &[PathBuf]) -> Result<Option<serde_json::Value>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut all = serde_json::Map::new();
    for p in paths {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| {
            format!(
                "{} is not the JSON of scripts/bench_peft.py, bench_peft_decoder.py or \
                 bench_llamacpp.py",
                p.display()
            )
        })?;
        let serde_json::Value::Object(m) = v else {
            anyhow::bail!("{}: expected a JSON object of timings", p.display());
        };
        all.extend(m);
    }
    Ok(Some(serde_json::Value::Object(all)))
}

/// `(median, min, max)` of a reference entry `{median_ms, min_ms, max_ms}`.
fn ref_ms(reference: Option<&serde_json::Value>, key: &str) -> Option<(f64, f64, f64)> {
    let r = &reference?[key];
    Some((
        r["median_ms"].as_f64()?,
        r["min_ms"].as_f64()?,
        r["max_ms"].as_f64()?,
    ))
}

fn stats(ms: &mut [f64]) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

/// `deltatune bench`: one LoRA training step (forward + backward + AdamW) and forward-only
/// inference on a batch of 16 x 128 random tokens, as `scripts/bench_peft.py` times PyTorch +
/// PEFT, each with the frozen weights' products in f32 and in bf16 (where the CPU has AVX-512
/// BF16 and `train.bf16` is not turned off: `--bf16 false` times the f32 rows only; PyTorch's
/// side is `autocast(bfloat16)`).
pub fn bench(s: &Settings, steps: usize, reference: &[PathBuf]) -> Result<()> {
    let dir = session::model_dir(&s.model, &s.cache)?;
    let mut loaded = session::load_model(&dir, 2, s.pooling, SEQ, s.train.seed)?;
    let trainables = session::attach(&mut loaded, s)?;
    let mut rng = Rng::new(0);
    let vocab = loaded.model.config.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| {
            (0..SEQ)
                .map(|_| (1000 + rng.below(vocab - 1000)) as u32)
                .collect()
        })
        .collect();
    let labels: Vec<u32> = (0..BATCH).map(|_| rng.below(2) as u32).collect();
    let inputs = loaded.model.inputs(&seqs)?;
    let labels_t = Tensor::from_slice(&labels, BATCH, loaded.model.device())?;
    let (vars, mut opt) = optimiser(&trainables)?;
    // (workload, reference key, median, min, max)
    let mut rows: Vec<(String, String, f64, f64, f64)> = Vec::new();
    let precisions: &[bool] = if deltatune_core::ops::has_bf16() && s.train.bf16 {
        &[false, true]
    } else {
        &[false]
    };
    // The precisions take turns step by step, so drift in the machine (clock, memory) falls
    // on both alike.
    let mut train_ms = vec![Vec::new(); precisions.len()];
    let mut infer_ms = vec![Vec::new(); precisions.len()];
    for i in 0..WARMUP + steps {
        for (pi, &bf16) in precisions.iter().enumerate() {
            deltatune_core::sites::use_bf16(&mut loaded.model, bf16)?;
            let t = Instant::now();
            let ctx = Ctx::train(Rng::new(i as u64));
            let logits = loaded.model.forward(&inputs, &ctx)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels_t)?;
            let grads = collect_grads(&loss.backward()?, &vars);
            opt.step(&grads, 5e-4, 1.0)?;
            if i >= WARMUP {
                train_ms[pi].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let ctx = Ctx::eval().with_bf16(true);
    for i in 0..WARMUP + steps {
        for (pi, &bf16) in precisions.iter().enumerate() {
            deltatune_core::sites::use_bf16(&mut loaded.model, bf16)?;
            let t = Instant::now();
            let logits = loaded.model.forward(&inputs, &ctx)?;
            logits.sum_all()?.to_scalar::<f32>()?;
            if i >= WARMUP {
                infer_ms[pi].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for (pi, &bf16) in precisions.iter().enumerate() {
        let p = if bf16 { "bf16" } else { "f32" };
        let (tm, tmin, tmax) = stats(&mut train_ms[pi]);
        let (im, imin, imax) = stats(&mut infer_ms[pi]);
        rows.push((
            format!("train step (fwd + bwd + AdamW), {p}"),
            format!("train_{p}"),
            tm,
            tmin,
            tmax,
        ));
        rows.push((
            format!("forward only (inference), {p}"),
            format!("infer_{p}"),
            im,
            imin,
            imax,
        ));
    }
    rows.sort_by_key(|r| !r.1.starts_with("train"));
    let reference = load_references(reference)?;
    let refv = |k: &str| ref_ms(reference.as_ref(), k);
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "MiniLM-L6 ({}), LoRA r={} alpha={} on {:?}, batch {BATCH} x {SEQ}, {WARMUP} warm-up + {steps} timed, {threads} threads",
        dir.display(),
        s.lora.r,
        s.lora.lora_alpha,
        s.lora.target_modules
    );
    println!("{}", bf16_line());
    println!(
        "| workload | deltatune median ms (min-max) | PyTorch + PEFT median ms (min-max) | ratio | ratio to PyTorch f32 |"
    );
    println!("|---|---|---|---|---|");
    for (name, key, med, lo, hi) in &rows {
        let fmt = |r: Option<(f64, f64, f64)>| {
            r.map_or("-".to_string(), |(m, a, b)| {
                format!("{m:.0} ({a:.0}-{b:.0})")
            })
        };
        let ratio = |r: Option<(f64, f64, f64)>| {
            r.map_or("-".to_string(), |(m, _, _)| format!("{:.2}x", med / m))
        };
        let r = refv(key);
        let f32_key = key.replace("bf16", "f32");
        println!(
            "| {name} | {med:.0} ({lo:.0}-{hi:.0}) | {} | {} | {} |",
            fmt(r),
            ratio(r),
            ratio(refv(&f32_key))
        );
    }
    println!(
        "peak memory: {:.0} MiB",
        super::peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

/// Whether training uses bf16 products on this CPU by default, and why.
fn bf16_line() -> String {
    let default = if deltatune_core::ops::bf16_pays() {
        "bf16"
    } else {
        "f32"
    };
    format!(
        "training multiplies in {default} by default ({})",
        crate::session::bf16_measurement()
    )
}

/// `deltatune bench --task generate`: the decoder's LoRA training step on a G2P-sized batch
/// (16 examples, 10 prompt + 14 completion tokens) with the base kept quantized and with an f32
/// copy of it, each in f32 and bf16 (time, loss on the same batch, peak memory), and greedy generation at batch 1 and 8,
/// beside llama.cpp's on the same file when `reference` (scripts/bench_llamacpp.py's JSON) is
/// given.
pub fn bench_decoder(s: &Settings, steps: usize, reference: &[PathBuf]) -> Result<()> {
    let reference = load_references(reference)?;
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
    // The quantized base first (dequantizing is one way): f32 products from the blocks, then
    // bf16 products from a copy made from them (the default where the CPU has AVX-512 BF16).
    let bf16 = deltatune_core::ops::has_bf16() && s.train.bf16;
    let mut variants = vec![("quantized (GGUF blocks)", false)];
    if bf16 {
        variants.push(("quantized, bf16 products", true));
    }
    variants.push(("f32 (dequantized copy)", false));
    if bf16 {
        variants.push(("dequantized copy, bf16 products", true));
    }
    for (base, bf16) in variants {
        if !base.starts_with("quantized") {
            d.model.dequantize_base()?;
        }
        let (trainables, _) = super::lm::attach(&mut d, s)?;
        deltatune_core::sites::use_bf16(&mut d.model, bf16)?;
        let (vars, mut opt) = optimiser(&trainables)?;
        let task = CausalLmTask {
            model: &d.model,
            train: &examples,
            dev: &[],
            dev_references: &[],
            decode: &decode,
            max_new_tokens: 1,
            stop: Vec::new(),
            int8_activations: true,
            show_progress: false,
        };
        let loss0 = task
            .loss(&idx, &Ctx::eval().with_bf16(true))?
            .to_scalar::<f32>()?;
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
        // PyTorch + PEFT trains on the f32 (dequantized) model, in f32 or under bf16 autocast.
        let key = if bf16 {
            "decoder_train_bf16"
        } else {
            "decoder_train_f32"
        };
        let (rm, rtok, ratio) = match ref_ms(reference.as_ref(), key) {
            Some((rm, rlo, rhi)) => (
                format!("{rm:.0} ({rlo:.0}-{rhi:.0})"),
                format!("{:.0}", tokens / (rm / 1e3)),
                format!("{:.2}x", m / rm),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        rows.push(format!(
            "| train step, base {base} | {m:.0} ({lo:.0}-{hi:.0}) | {:.0} | {rm} | {rtok} | {ratio} | {loss0:.6} | {:.0} |",
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
    println!("{}", bf16_line());
    println!("| workload | deltatune median ms (min-max) | tokens/s | PyTorch + PEFT median ms (min-max) | tokens/s | deltatune's time | loss on the batch (before training) | peak RSS so far MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    // Generation on the f32 base is not the default; reload the quantized one.
    let d = super::lm::load(&s.model, &s.cache)?;
    println!("| generation | deltatune median ms per token (min-max) | tokens/s | llama.cpp median ms per token (min-max) | tokens/s | deltatune's time | | |");
    // 8-bit activations (the default, as llama.cpp) and f32 activations, each after one
    // untimed run (the first 8-bit run repacks the weights).
    for (b, int8) in [(1usize, true), (1, false), (8, true), (8, false)] {
        let g = deltatune_models::decoder::Generator {
            model: &d.model,
            decode: None,
        };
        let cfg = deltatune_models::decoder::GenerateConfig {
            max_new_tokens: 64,
            int8_activations: int8,
            ..Default::default()
        };
        g.generate(&prompts[..b], &cfg, &mut |_, _| true)?;
        let mut per_token = Vec::new();
        for _ in 0..steps.max(3) {
            let t = Instant::now();
            let out = g.generate(&prompts[..b], &cfg, &mut |_, _| true)?;
            let n: usize = out.iter().map(|o| o.ids.len()).sum::<usize>().max(1);
            per_token.push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
        }
        let (m, lo, hi) = stats(&mut per_token);
        let (rm, rtok, ratio) = match reference.as_ref().map(|r| &r[format!("batch{b}")]) {
            Some(r) if r["ms_per_token"].as_f64().is_some() => {
                let rm = r["ms_per_token"].as_f64().unwrap_or(f64::NAN);
                (
                    format!(
                        "{rm:.2} ({:.2}-{:.2})",
                        r["min"].as_f64().unwrap_or(f64::NAN),
                        r["max"].as_f64().unwrap_or(f64::NAN)
                    ),
                    format!("{:.0}", 1e3 / rm),
                    format!("{:.2}x", m / rm),
                )
            }
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let acts = if int8 {
            "8-bit activations (default)"
        } else {
            "f32 activations"
        };
        println!(
            "| greedy generation, batch {b}, 16-token prompt, 64 new, {acts} | {m:.2} ({lo:.2}-{hi:.2}) | {:.0} | {rm} | {rtok} | {ratio} | | |",
            1e3 / m
        );
    }
    Ok(())
}
