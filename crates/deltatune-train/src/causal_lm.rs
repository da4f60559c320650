//! Causal language modelling: the loss on completion tokens only, and dev metrics from greedy
//! generation (exact match and a unit error rate).

use candle_core::{DType, Tensor};
use deltatune_core::Ctx;
use deltatune_models::decoder::{GenerateConfig, Generator};
use deltatune_models::Decoder;

use crate::trainer::{DevScore, Task};
use crate::{Result, TrainError};

/// One tokenised example: the prompt's ids and the completion's (ending with the
/// end-of-sequence id, so the model learns to stop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl LmExample {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Levenshtein distance between two sequences.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(x != y);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Exact match and unit error rate of generated texts against references, comparing the
/// whitespace-separated units (phonemes for G2P, words otherwise).
pub fn generation_metrics(generated: &[String], references: &[String]) -> (f64, f64) {
    let (mut exact, mut dist, mut total) = (0usize, 0usize, 0usize);
    for (g, r) in generated.iter().zip(references) {
        let gu: Vec<&str> = g.split_whitespace().collect();
        let ru: Vec<&str> = r.split_whitespace().collect();
        exact += usize::from(gu == ru);
        dist += edit_distance(&gu, &ru);
        total += ru.len().max(1);
    }
    let n = references.len().max(1) as f64;
    (exact as f64 / n, dist as f64 / total.max(1) as f64)
}

/// Causal-LM fine-tuning of a decoder: cross-entropy of the completion tokens given the
/// prompt (prompt tokens carry no loss, as PEFT's examples mask them with -100), averaged over
/// the batch's completion tokens.
pub struct CausalLmTask<'a> {
    pub model: &'a Decoder,
    pub train: &'a [LmExample],
    /// Dev examples with their reference completion texts.
    pub dev: &'a [LmExample],
    pub dev_references: &'a [String],
    /// Decodes generated ids to text for the dev metrics.
    pub decode: &'a dyn Fn(&[u32]) -> String,
    /// Tokens generated at most per dev example.
    pub max_new_tokens: usize,
    /// Generation stops at these strings too (e.g. a newline for one-line answers).
    pub stop: Vec<String>,
    /// 8-bit activations in the products by a quantized base (`GenerateConfig::int8_activations`).
    pub int8_activations: bool,
    /// A progress bar while the dev examples are generated.
    pub show_progress: bool,
}

/// Greedy completions of `prompts`, decoded, in batches of `batch_size` (similar lengths
/// together). `progress`: a bar on stderr with this label (examples done, rate, time left).
#[allow(clippy::too_many_arguments)]
pub fn generate_texts(
    model: &Decoder,
    prompts: &[Vec<u32>],
    decode: &dyn Fn(&[u32]) -> String,
    max_new_tokens: usize,
    stop: &[String],
    batch_size: usize,
    int8_activations: bool,
    progress: Option<&str>,
) -> Result<Vec<String>> {
    let bar = match progress {
        Some(label) => {
            let bar = indicatif::ProgressBar::new(prompts.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} examples | {per_sec} | {elapsed_precise} < {eta_precise}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        }
        None => indicatif::ProgressBar::hidden(),
    };
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let cfg = GenerateConfig {
        max_new_tokens,
        stop: stop.to_vec(),
        int8_activations,
        ..Default::default()
    };
    let g = Generator {
        model,
        decode: Some(decode),
    };
    let mut out = vec![String::new(); prompts.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let res = g.generate(&batch, &cfg, &mut |_, _| true)?;
        for (&i, r) in chunk.iter().zip(res) {
            let mut text = decode(&r.ids);
            for s in stop {
                if let Some(at) = text.find(s.as_str()) {
                    text.truncate(at);
                }
            }
            out[i] = text.trim().to_string();
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A right-padded training batch and its loss targets.
struct LmBatch {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    /// Flat indices in `[B * T]` of the positions whose next token is a completion token.
    at: Vec<u32>,
    /// Those next tokens.
    targets: Vec<u32>,
    /// The padded length T.
    t: usize,
}

impl CausalLmTask<'_> {
    /// Padded ids, mask and the loss targets of a batch.
    fn batch(&self, idx: &[usize]) -> LmBatch {
        let t = idx.iter().map(|&i| self.train[i].len()).max().unwrap_or(1);
        let pad = self.model.config.pad_token_id.unwrap_or(0);
        let (mut ids, mut mask, mut at, mut targets) = (vec![], vec![], vec![], vec![]);
        for (r, &i) in idx.iter().enumerate() {
            let ex = &self.train[i];
            let mut row = ex.prompt.clone();
            row.extend_from_slice(&ex.completion);
            let n = row.len();
            for j in ex.prompt.len().max(1)..n {
                at.push((r * t + j - 1) as u32);
                targets.push(row[j]);
            }
            row.resize(t, pad);
            let mut m = vec![1u32; n];
            m.resize(t, 0);
            ids.push(row);
            mask.push(m);
        }
        LmBatch {
            ids,
            mask,
            at,
            targets,
            t,
        }
    }
}

impl Task for CausalLmTask<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn train_example_len(&self, i: usize) -> usize {
        self.train[i].len()
    }

    fn loss(&self, idx: &[usize], ctx: &Ctx) -> Result<Tensor> {
        let LmBatch {
            ids,
            mask,
            at,
            targets,
            t,
        } = self.batch(idx);
        if targets.is_empty() {
            return Err(TrainError::Data(
                "a batch has no completion tokens to learn from".into(),
            ));
        }
        let hidden = self.model.forward_hidden(&ids, &mask, None, ctx)?;
        let (b, tt, h) = hidden.dims3()?;
        // Prompt vectors of a prompt-tuning delta come first: skip them.
        let hidden = hidden
            .narrow(1, tt - t, t)?
            .contiguous()?
            .reshape((b * t, h))?;
        let dev = hidden.device().clone();
        let rows = hidden.index_select(&Tensor::from_vec(at.clone(), at.len(), &dev)?, 0)?;
        let logits = self.model.logits(&rows, ctx)?.to_dtype(DType::F32)?;
        // One fused op: the vocabulary-wide log-softmax keeps no intermediates.
        Ok(deltatune_core::ops::cross_entropy(&logits, &targets)?)
    }

    fn evaluate_dev(&self, batch_size: usize) -> Result<DevScore> {
        let prompts: Vec<Vec<u32>> = self.dev.iter().map(|e| e.prompt.clone()).collect();
        let texts = generate_texts(
            self.model,
            &prompts,
            self.decode,
            self.max_new_tokens,
            &self.stop,
            batch_size,
            self.int8_activations,
            self.show_progress.then_some("dev"),
        )?;
        let (em, er) = generation_metrics(&texts, self.dev_references);
        Ok(DevScore {
            accuracy: em,
            macro_f1: None,
            error_rate: Some(er),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 3]), 1);
        assert_eq!(edit_distance(&[1, 2], &[3, 1, 2]), 1);
        assert_eq!(edit_distance(&[1, 2, 3], &[4, 5, 6]), 3);
        assert_eq!(edit_distance::<u8>(&[], &[1, 2]), 2);
    }

    #[test]
    fn generation_metrics_are_exact_match_and_unit_error_rate() {
        let g = vec!["K AE1 T".to_string(), "D AO1 G Z".to_string()];
        let r = vec!["K AE1 T".to_string(), "D AO1 G".to_string()];
        let (em, er) = generation_metrics(&g, &r);
        assert_eq!(em, 0.5);
        assert!((er - 1.0 / 6.0).abs() < 1e-12);
    }
}
