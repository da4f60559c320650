//! The generation engine: one thread owns the base decoder and every adapter, and runs
//! continuous batches.
//!
//! Requests for the base and for LoRA adapters share one batch through one model carrying all
//! the LoRA adapters at once ([`attach_multi`]; each row adds only its own adapter's low-rank
//! term). Adapters of other kinds (prompt, prefix, IA3, bottleneck...) each have a batch of their
//! own on a copy of the base that shares its weights. Between decoding steps, waiting requests
//! are prefilled and join their batch (their KV cache rows appended); finished, stopped or
//! abandoned rows leave it.

use std::collections::BTreeMap;
use std::sync::Arc;

use deltatune_core::{Ctx, Rng};
use deltatune_methods::lora::multi::attach_multi;
use deltatune_methods::LoraConfig;
use deltatune_models::decoder::generate::sample;
use deltatune_models::decoder::{GenerateConfig, LoadedDecoder, StopReason};
use deltatune_models::{Decoder, KvCache};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{self, unknown_adapter, Handle};
pub use crate::engine::{AdapterInfo, EngineOptions, SubmitError};
use crate::folder::{AdapterFolder, AdapterTask};
use crate::metrics::Metrics;
use crate::{Result, ServeError};

/// What a generation request receives, in order: text pieces, then one `Done` (or one `Error`).
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done(Finish),
    Error(ServeError),
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub reason: StopReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A generation request (its prompt already tokenized).
#[derive(Debug)]
pub struct GenRequest {
    /// The adapter's name; `None` for the base alone.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub config: GenerateConfig,
    pub events: UnboundedSender<GenEvent>,
}

/// The generation engine's handle, with what the HTTP side needs to prepare prompts.
#[derive(Clone)]
pub struct DecoderEngine {
    pub handle: Handle<GenRequest>,
    pub tokenizer: Arc<Tokenizer>,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<Arc<str>>,
    /// The model's context in tokens.
    pub context: usize,
}

impl std::ops::Deref for DecoderEngine {
    type Target = Handle<GenRequest>;
    fn deref(&self) -> &Handle<GenRequest> {
        &self.handle
    }
}

/// Starts the generation engine on `base` with `adapters`.
pub fn start(
    base: LoadedDecoder,
    adapters: Vec<AdapterFolder>,
    opts: &EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<DecoderEngine> {
    let context = base.model.config.max_position_embeddings;
    let tokenizer = Arc::new(base.tokenizer.clone());
    let chat_template = base.chat_template.map(Arc::from);
    let core = Core::new(base.model, base.tokenizer, metrics.clone());
    Ok(DecoderEngine {
        handle: engine::start(core, adapters, opts, metrics)?,
        tokenizer,
        chat_template,
        context,
    })
}

/// Rows joining a batch, with their prompts.
type Joining = (Vec<Row>, Vec<Vec<u32>>);
/// Slot -> the adapter's index in the shared model.
type Route = BTreeMap<usize, u32>;

/// One sequence in a batch.
struct Row {
    slot: Option<usize>,
    cfg: GenerateConfig,
    rng: Rng,
    prompt_len: usize,
    ids: Vec<u32>,
    /// The token to feed next.
    last: u32,
    /// The text of the tokens up to `read` (complete characters only).
    text: String,
    /// Incremental detokenization (as in TGI): the next tokens are decoded in the window
    /// `ids[prefix..]` and compared with `ids[prefix..read]`, so a token costs a decode of a
    /// few tokens, not of the whole sequence.
    prefix: usize,
    read: usize,
    /// Bytes of text sent so far.
    sent: usize,
    budget: usize,
    events: UnboundedSender<GenEvent>,
    done: bool,
    metric_name: String,
}

/// A batch running on one model.
struct Group {
    model: Decoder,
    rows: Vec<Row>,
    cache: KvCache,
}

struct Slot {
    folder: AdapterFolder,
    /// Unloaded: no new requests; freed when its last row finishes.
    removing: bool,
}

struct Core {
    base: Decoder,
    tokenizer: Tokenizer,
    metrics: Arc<Metrics>,
    slots: Vec<Option<Slot>>,
    names: BTreeMap<String, usize>,
    /// The base with every LoRA adapter (rows routed per adapter), and its rows.
    shared: Group,
    /// slot -> index in the shared model's adapters.
    route: BTreeMap<usize, u32>,
    /// Adapters of other kinds: a group each, by slot.
    own: BTreeMap<usize, Group>,
}

/// How much of `text`'s end could still grow into a stop string (held back while streaming).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len()).rev() {
            if k > hold && s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

impl Row {
    /// Takes the sampled token: sends the text it completes; returns whether the row is done.
    fn push(&mut self, tok: u32, eos: &[u32], tokenizer: &Tokenizer) {
        let mut reason = None;
        if eos.contains(&tok) {
            reason = Some(StopReason::Eos);
        } else {
            self.ids.push(tok);
            self.last = tok;
        }
        // The text the new tokens complete. A token that ends inside a character decodes to a
        // replacement character at the end: wait for the next one (or take it as it is when the
        // row ends here).
        let before = tokenizer
            .decode(&self.ids[self.prefix..self.read], true)
            .unwrap_or_default();
        let after = tokenizer
            .decode(&self.ids[self.prefix..], true)
            .unwrap_or_default();
        let mut pending = "";
        if after.len() > before.len() && after.is_char_boundary(before.len()) {
            if after.ends_with('\u{FFFD}') {
                pending = &after[before.len()..];
            } else {
                self.text.push_str(&after[before.len()..]);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        // Stop strings: only text from the last `longest stop` bytes before what was sent can
        // hold a new one.
        let longest = self.cfg.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let cut = self
            .cfg
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(cut) = cut {
            self.text.truncate(cut);
            reason = Some(StopReason::StopString);
        }
        if reason.is_none() && self.ids.len() >= self.budget {
            reason = Some(StopReason::Length);
        }
        if reason.is_some() && cut.is_none() {
            // The row ends here: an unfinished character goes out as it decodes.
            self.text.push_str(pending);
        }
        // While running, hold back what may become a stop string (`text` never ends inside a
        // character then: such tokens stay pending).
        let text = &self.text;
        let mut end = text.len();
        if reason.is_none() {
            end -= held_back(text, &self.cfg.stop);
        }
        if end > self.sent && text.is_char_boundary(self.sent) && text.is_char_boundary(end) {
            let piece = text[self.sent..end].to_string();
            self.sent = end;
            if self.events.send(GenEvent::Text(piece)).is_err() {
                // The client went away: stop working for it.
                self.done = true;
                return;
            }
        }
        if let Some(reason) = reason {
            self.done = true;
            let _ = self.events.send(GenEvent::Done(Finish {
                reason,
                prompt_tokens: self.prompt_len,
                completion_tokens: self.ids.len(),
            }));
        } else if self.events.is_closed() {
            self.done = true;
        }
    }
}

impl Core {
    fn new(base: Decoder, tokenizer: Tokenizer, metrics: Arc<Metrics>) -> Self {
        Self {
            shared: Group {
                model: base.clone(),
                rows: Vec::new(),
                cache: KvCache::default(),
            },
            base,
            tokenizer,
            metrics,
            slots: Vec::new(),
            names: BTreeMap::new(),
            route: BTreeMap::new(),
            own: BTreeMap::new(),
        }
    }

    /// Rebuilds the shared model with the live LoRA adapters (rows keep their slots).
    fn rebuild_shared(&mut self) -> Result<()> {
        let mut model = self.base.clone();
        let mut list: Vec<(LoraConfig, BTreeMap<String, candle_core::Tensor>)> = Vec::new();
        let mut route = BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if let Some(c) = s.folder.lora() {
                    route.insert(i, list.len() as u32);
                    list.push((c.clone(), s.folder.tensors.clone()));
                }
            }
        }
        if !list.is_empty() {
            attach_multi(&mut model, &list)?;
        }
        self.shared.model = model;
        self.route = route;
        Ok(())
    }

    /// Checks `folder` against the base and adds it.
    fn load(&mut self, folder: AdapterFolder) -> Result<AdapterInfo> {
        let name = folder.name.clone();
        let fit = engine::admit(&self.names, &folder, AdapterTask::Generate)?;
        let shared = folder.lora().is_some();
        let slot = self.slots.len();
        if let Some(c) = folder.lora() {
            // Checked alone first, so the error names this adapter's key and shapes.
            let mut probe = self.base.clone();
            attach_multi(&mut probe, &[(c.clone(), folder.tensors.clone())])
                .map_err(|e| fit(e.into()))?;
        } else {
            let mut model = self.base.clone();
            engine::attach_own(&mut model, &folder, &fit)?;
            self.own.insert(
                slot,
                Group {
                    model,
                    rows: Vec::new(),
                    cache: KvCache::default(),
                },
            );
        }
        let info = AdapterInfo {
            name: name.clone(),
            method: folder.method(),
            task: folder.task,
            shared_batch: shared,
            labels: Vec::new(),
        };
        self.slots.push(Some(Slot {
            folder,
            removing: false,
        }));
        self.names.insert(name, slot);
        if shared {
            if let Err(e) = self.rebuild_shared() {
                self.slots[slot] = None;
                self.names.remove(&info.name);
                return Err(fit(e));
            }
        }
        Ok(info)
    }

    fn unload(&mut self, name: &str) -> Result<()> {
        let Some(slot) = self.names.remove(name) else {
            return Err(unknown_adapter(name));
        };
        if let Some(s) = self.slots[slot].as_mut() {
            s.removing = true;
        }
        self.free_unused()
    }

    /// Frees unloaded adapters no row uses any more.
    fn free_unused(&mut self) -> Result<()> {
        let mut changed = false;
        for i in 0..self.slots.len() {
            let removing = self.slots[i].as_ref().is_some_and(|s| s.removing);
            if !removing {
                continue;
            }
            let in_use = self.shared.rows.iter().any(|r| r.slot == Some(i))
                || self.own.get(&i).is_some_and(|g| !g.rows.is_empty());
            if !in_use {
                let lora = self.slots[i]
                    .as_ref()
                    .is_some_and(|s| s.folder.lora().is_some());
                self.slots[i] = None;
                self.own.remove(&i);
                changed |= lora;
            }
        }
        if changed {
            self.rebuild_shared()?;
        }
        Ok(())
    }

    fn rows(&self) -> usize {
        self.shared.rows.len() + self.own.values().map(|g| g.rows.len()).sum::<usize>()
    }

    /// Prefills the joining requests, then runs one decoding step of every batch; a failed
    /// pass fails the rows of its batch (not the server).
    fn pass(&mut self, joining: Vec<(Option<usize>, GenRequest)>) -> Result<()> {
        let ctx_len = self.base.config.max_position_embeddings;
        let mut by_group: BTreeMap<Option<usize>, Joining> = BTreeMap::new();
        for (slot, req) in joining {
            if let Err(e) = req.config.validate() {
                let _ = req.events.send(GenEvent::Error(e.into()));
                continue;
            }
            let n = req.prompt.len();
            if n == 0 || n >= ctx_len {
                let _ = req.events.send(GenEvent::Error(ServeError::field(
                    "prompt",
                    format!(
                        "a prompt of {n} tokens: the model takes 1 to {} tokens",
                        ctx_len - 1
                    ),
                )));
                continue;
            }
            let key = slot.filter(|s| self.own.contains_key(s));
            let metric_name = slot.map_or_else(|| "base".to_string(), |s| self.slot_name(s));
            let e = by_group.entry(key).or_default();
            e.0.push(Row {
                slot,
                rng: Rng::new(req.config.seed).derive("generate/0"),
                budget: req.config.max_new_tokens.min(ctx_len - n),
                cfg: req.config,
                prompt_len: n,
                ids: Vec::new(),
                last: 0,
                text: String::new(),
                prefix: 0,
                read: 0,
                sent: 0,
                events: req.events,
                done: false,
                metric_name,
            });
            e.1.push(req.prompt);
        }
        let env = Env {
            eos: &self.base.config.eos_token_ids,
            pad: self
                .base
                .config
                .pad_token_id
                .or_else(|| self.base.config.eos_token_ids.first().copied())
                .unwrap_or(0),
            tokenizer: &self.tokenizer,
            metrics: &self.metrics,
        };
        let mut own_keys: Vec<Option<usize>> = vec![None];
        own_keys.extend(self.own.keys().map(|&k| Some(k)));
        let mut jobs: Vec<(&mut Group, Option<&Route>, &'static str)> =
            vec![(&mut self.shared, Some(&self.route), "decoder")];
        for g in self.own.values_mut() {
            jobs.push((g, None, "decoder-own"));
        }
        for ((group, route, engine), key) in jobs.into_iter().zip(own_keys) {
            let joining = by_group.remove(&key);
            if joining.is_none() && group.rows.is_empty() {
                continue;
            }
            let r = (|| -> Result<()> {
                if let Some((rows, prompts)) = joining {
                    env.prefill(group, rows, prompts, route)?;
                    env.retire(group)?;
                }
                env.decode(group, route, engine)?;
                env.retire(group)
            })();
            if let Err(e) = r {
                for row in group.rows.drain(..) {
                    let _ = row.events.send(GenEvent::Error(ServeError::new(format!(
                        "generation failed: {e}"
                    ))));
                }
                group.cache = KvCache::default();
                eprintln!("deltatune serve: a generation pass failed: {e}");
            }
        }
        Ok(())
    }

    fn slot_name(&self, slot: usize) -> String {
        self.slots[slot]
            .as_ref()
            .map_or_else(|| format!("#{slot}"), |s| s.folder.name.clone())
    }
}

/// What a pass needs besides its batch.
struct Env<'a> {
    eos: &'a [u32],
    pad: u32,
    tokenizer: &'a Tokenizer,
    metrics: &'a Metrics,
}

/// The context of a pass over `rows`: each row's adapter in the shared model (`u32::MAX`: the
/// base), or none for a batch of its own. The rows share one pass, so 8-bit activations
/// ([`GenerateConfig::int8_activations`]) are used only when every row allows them.
fn ctx_for(rows: &[Row], route: Option<&BTreeMap<usize, u32>>) -> Ctx {
    let ctx = match route {
        Some(r) => Ctx::inference().with_adapter_rows(
            rows.iter()
                .map(|row| {
                    row.slot
                        .and_then(|s| r.get(&s).copied())
                        .unwrap_or(u32::MAX)
                })
                .collect(),
        ),
        None => Ctx::inference(),
    };
    ctx.with_int8(rows.iter().all(|row| row.cfg.int8_activations))
}

impl Env<'_> {
    /// Runs the prompts of joining rows (left-padded, a cache of their own), samples each
    /// one's first token and appends their cache rows to the batch's.
    fn prefill(
        &self,
        group: &mut Group,
        mut rows: Vec<Row>,
        prompts: Vec<Vec<u32>>,
        route: Option<&BTreeMap<usize, u32>>,
    ) -> Result<()> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len());
        let mut mask = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let n = longest - p.len();
            let mut r = vec![self.pad; n];
            r.extend_from_slice(p);
            ids.push(r);
            let mut m = vec![0u32; n];
            m.extend(std::iter::repeat_n(1u32, p.len()));
            mask.push(m);
        }
        let ctx = ctx_for(&rows, route);
        let mut cache = KvCache::default();
        self.metrics.batch("prefill", rows.len());
        let pass = (|| -> Result<Vec<Vec<f32>>> {
            let hidden = group
                .model
                .forward_hidden(&ids, &mask, Some(&mut cache), &ctx)?;
            let t = hidden.dim(1)?;
            let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
            Ok(group.model.logits(&last, &ctx)?.to_vec2()?)
        })();
        let logits = match pass {
            Ok(l) => l,
            Err(e) => {
                // Only the joining rows fail; the running batch goes on.
                for row in rows {
                    let _ = row.events.send(GenEvent::Error(ServeError::new(format!(
                        "generation failed: {e}"
                    ))));
                }
                return Ok(());
            }
        };
        for (row, l) in rows.iter_mut().zip(&logits) {
            let tok = sample(l, &row.cfg, &mut row.rng);
            row.push(tok, self.eos, self.tokenizer);
        }
        group.cache.append(cache)?;
        group.rows.extend(rows);
        Ok(())
    }

    /// One decoding step of every row of the batch.
    fn decode(
        &self,
        group: &mut Group,
        route: Option<&BTreeMap<usize, u32>>,
        engine: &str,
    ) -> Result<()> {
        if group.rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<u32>> = group.rows.iter().map(|r| vec![r.last]).collect();
        let mask = vec![vec![1u32]; ids.len()];
        let ctx = ctx_for(&group.rows, route);
        self.metrics.batch(engine, ids.len());
        let hidden = group
            .model
            .forward_hidden(&ids, &mask, Some(&mut group.cache), &ctx)?;
        let last = hidden.squeeze(1)?;
        let logits: Vec<Vec<f32>> = group.model.logits(&last, &ctx)?.to_vec2()?;
        for (row, l) in group.rows.iter_mut().zip(&logits) {
            let tok = sample(l, &row.cfg, &mut row.rng);
            row.push(tok, self.eos, self.tokenizer);
        }
        Ok(())
    }

    /// Drops the finished rows from the batch and its cache.
    fn retire(&self, group: &mut Group) -> Result<()> {
        if group.rows.iter().all(|r| !r.done) {
            return Ok(());
        }
        let keep: Vec<usize> = (0..group.rows.len())
            .filter(|&i| !group.rows[i].done)
            .collect();
        group.cache.keep_rows(&keep)?;
        for r in group.rows.iter().filter(|r| r.done) {
            self.metrics
                .tokens(&r.metric_name, r.prompt_len, r.ids.len());
        }
        group.rows.retain(|r| !r.done);
        Ok(())
    }
}

impl engine::Core for Core {
    type Req = GenRequest;

    fn load(&mut self, folder: AdapterFolder) -> Result<AdapterInfo> {
        Core::load(self, folder)
    }

    fn unload(&mut self, name: &str) -> Result<()> {
        Core::unload(self, name)
    }

    fn running(&self) -> usize {
        self.rows()
    }

    fn rows_of(_: &GenRequest) -> usize {
        1
    }

    fn name(&self) -> &'static str {
        "decoder"
    }

    fn step(&mut self, new: Vec<GenRequest>) {
        let mut joining = Vec::with_capacity(new.len());
        for req in new {
            match &req.adapter {
                None => joining.push((None, req)),
                Some(n) => match self.names.get(n) {
                    Some(&s) => joining.push((Some(s), req)),
                    None => {
                        let _ = req.events.send(GenEvent::Error(unknown_adapter(n)));
                    }
                },
            }
        }
        if let Err(e) = self.pass(joining) {
            eprintln!("deltatune serve: a generation step failed: {e}");
        }
        if let Err(e) = self.free_unused() {
            eprintln!("deltatune serve: freeing unloaded adapters: {e}");
        }
    }
}
