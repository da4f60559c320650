//! Text generation with a KV cache: greedy decoding or sampling (temperature, top-k, top-p,
//! seeded), stopping at an end-of-sequence id, a stop string or a token budget. Works with any
//! attached delta (prompt and prefix deltas included) or none.

use deltatune_core::{Ctx, Error, Result, Rng};
use serde::{Deserialize, Serialize};

use super::model::{Decoder, KvCache};

/// Decoding settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateConfig {
    /// New tokens at most (default 64); 0 is refused.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (default 0).
    pub temperature: f64,
    /// Sample only among the k most likely tokens (default: all).
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p (default 1).
    pub top_p: Option<f64>,
    /// Seed of sampling (default 42).
    pub seed: u64,
    /// Generation stops when the decoded continuation contains one of these (the stop string
    /// is cut from the text).
    pub stop: Vec<String>,
    /// Round the activations to 8 bits per block of 32 in the products by a quantized (GGUF
    /// every block type) base and multiply with integer dot products, as llama.cpp does (default
    /// true): 2-4x faster products where the CPU has AVX-512 VNNI, at the price of that
    /// rounding. `false`: f32 activations, the numbers evaluation computes.
    pub int8_activations: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
            stop: Vec::new(),
            int8_activations: true,
        }
    }
}

impl GenerateConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(Error::InvalidConfig {
                field: field.into(),
                msg: msg.into(),
            })
        };
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be 0 (greedy) or a positive number");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be at least 1 (or unset: every token)");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", "must be in (0, 1]");
            }
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence id (not included in the output).
    Eos,
    /// The continuation contains a stop string.
    StopString,
    /// `max_new_tokens` were produced.
    Length,
}

/// One finished sequence.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The new token ids (no prompt, no end-of-sequence id).
    pub ids: Vec<u32>,
    pub stop: StopReason,
}

/// Turns token ids into text.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> String;

/// Runs generation for a batch of prompts.
pub struct Generator<'a> {
    pub model: &'a Decoder,
    /// Decodes ids to text, for stop strings (required when `stop` is not empty).
    pub decode: Option<Decode<'a>>,
}

/// Index of the largest value (the first one among equals, as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws a token from `logits` with temperature, top-k and top-p (greedy at temperature 0).
pub fn sample(logits: &[f32], cfg: &GenerateConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let t = cfg.temperature as f32;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.max(1));
    }
    let m = logits[idx[0]] / t;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] / t - m) as f64).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= z);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (j, v) in p.iter().enumerate() {
            acc += v;
            if acc >= top_p {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= z);
    }
    let u = rng.uniform();
    let mut acc = 0.0;
    for (j, v) in p.iter().enumerate() {
        acc += v;
        if u < acc {
            return idx[j] as u32;
        }
    }
    idx[p.len() - 1] as u32
}

impl Generator<'_> {
    /// Generates a continuation of each prompt (batched, left-padded). `on_token(row, id)` is
    /// called for every new token as it is produced (streaming); returning `false` stops that
    /// row.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerateConfig,
        on_token: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Result<Vec<Generated>> {
        self.generate_routed(prompts, None, cfg, on_token)
    }

    /// [`Generator::generate`] for a batch mixing adapters: `adapter_rows[i]` is the adapter of
    /// prompt `i` in the model's multi-adapter deltas (see `Ctx::adapter_rows`; `u32::MAX`: the
    /// base alone).
    pub fn generate_routed(
        &self,
        prompts: &[Vec<u32>],
        adapter_rows: Option<&[u32]>,
        cfg: &GenerateConfig,
        on_token: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Result<Vec<Generated>> {
        cfg.validate()?;
        if let Some(r) = adapter_rows {
            if r.len() != prompts.len() {
                return Err(Error::Msg(format!(
                    "{} adapter rows for {} prompts",
                    r.len(),
                    prompts.len()
                )));
            }
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Msg(format!(
                "prompt {i} is empty: give at least one token"
            )));
        }
        if !cfg.stop.is_empty() && self.decode.is_none() {
            return Err(Error::Msg(
                "stop strings need a tokenizer to decode with".into(),
            ));
        }
        let model = self.model;
        let ctx_len = model.config.max_position_embeddings;
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if longest >= ctx_len {
            return Err(Error::Msg(format!(
                "a prompt of {longest} tokens does not fit the model's context of {ctx_len} tokens"
            )));
        }
        let pad = model
            .config
            .pad_token_id
            .or_else(|| model.config.eos_token_ids.first().copied())
            .unwrap_or(0);
        let b = prompts.len();
        let mut ids = Vec::with_capacity(b);
        let mut mask = Vec::with_capacity(b);
        for p in prompts {
            let n = longest - p.len();
            let mut r = vec![pad; n];
            r.extend_from_slice(p);
            ids.push(r);
            let mut m = vec![0u32; n];
            m.extend(std::iter::repeat_n(1u32, p.len()));
            mask.push(m);
        }
        let ctx = match adapter_rows {
            Some(r) => Ctx::inference().with_adapter_rows(r.to_vec()),
            None => Ctx::inference(),
        }
        .with_int8(cfg.int8_activations);
        let mut cache = KvCache::default();
        let mut rngs: Vec<Rng> = (0..b)
            .map(|i| Rng::new(cfg.seed).derive(&format!("generate/{i}")))
            .collect();
        let mut out: Vec<Generated> = (0..b)
            .map(|_| Generated {
                ids: Vec::new(),
                stop: StopReason::Length,
            })
            .collect();
        let mut done = vec![false; b];
        let eos = &model.config.eos_token_ids;
        let budget = cfg.max_new_tokens.min(ctx_len.saturating_sub(longest));
        for _ in 0..budget {
            let hidden = model.forward_hidden(&ids, &mask, Some(&mut cache), &ctx)?;
            let t = hidden.dim(1)?;
            let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
            let logits: Vec<Vec<f32>> = model.logits(&last, &ctx)?.to_vec2()?;
            let mut next = Vec::with_capacity(b);
            for r in 0..b {
                let tok = if done[r] {
                    pad
                } else {
                    sample(&logits[r], cfg, &mut rngs[r])
                };
                if !done[r] {
                    if eos.contains(&tok) {
                        done[r] = true;
                        out[r].stop = StopReason::Eos;
                    } else {
                        out[r].ids.push(tok);
                        if !on_token(r, tok) {
                            done[r] = true;
                        } else if let Some(decode) = self.decode.filter(|_| !cfg.stop.is_empty()) {
                            let text = decode(&out[r].ids);
                            if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
                                done[r] = true;
                                out[r].stop = StopReason::StopString;
                            }
                        }
                    }
                }
                next.push(vec![tok]);
            }
            if done.iter().all(|&d| d) {
                break;
            }
            ids = next;
            mask = vec![vec![1u32]; b];
        }
        Ok(out)
    }
}
