//! The classification engine: one thread owns the base encoder and every classifier adapter.
//!
//! LoRA adapters with the same number of classes and pooling share one model carrying all of
//! them ([`attach_multi`]: each row adds its own adapter's low-rank terms and uses its own
//! trained head), so a batch mixing them is one pass through the base. Adapters of other kinds
//! run in a batch of their own on a copy of the base that shares its weights.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Linear};
use deltatune_methods::lora::multi::attach_multi;
use deltatune_models::{BertClassifier, TextTokenizer};
use tokio::sync::oneshot;

use crate::engine::{self, unknown_adapter, Handle};
pub use crate::engine::{AdapterInfo, EngineOptions, SubmitError};
use crate::folder::{head_rows, AdapterFolder, AdapterTask};
use crate::metrics::Metrics;
use crate::{Result, ServeError};

/// A classification request: texts for one adapter; the reply holds each text's class
/// probabilities (in the adapter's label order).
#[derive(Debug)]
pub struct ClassifyRequest {
    pub adapter: String,
    pub texts: Vec<String>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// The classification engine's handle.
pub type EncoderEngine = Handle<ClassifyRequest>;

/// Starts the classification engine on `base` (its `tokenizer.json` at `tokenizer`).
pub fn start(
    base: BertClassifier,
    tokenizer: PathBuf,
    adapters: Vec<AdapterFolder>,
    opts: &EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<EncoderEngine> {
    let default_len = base.config.max_position_embeddings.min(512);
    let core = Core {
        base,
        tokenizer,
        tokenizers: BTreeMap::new(),
        default_len,
        slots: Vec::new(),
        names: BTreeMap::new(),
        shared: BTreeMap::new(),
        own: BTreeMap::new(),
        metrics: metrics.clone(),
    };
    engine::start(core, adapters, opts, metrics)
}

/// LoRA adapters share a model when their heads and pooling agree.
type SharedKey = (usize, String);

struct Shared {
    model: BertClassifier,
    /// slot -> index in the model's adapters.
    route: BTreeMap<usize, u32>,
}

struct Core {
    base: BertClassifier,
    tokenizer: PathBuf,
    /// By longest input (the adapter's training max_length).
    tokenizers: BTreeMap<usize, TextTokenizer>,
    default_len: usize,
    slots: Vec<Option<AdapterFolder>>,
    names: BTreeMap<String, usize>,
    shared: BTreeMap<SharedKey, Shared>,
    own: BTreeMap<usize, BertClassifier>,
    metrics: Arc<Metrics>,
}

fn shared_key(f: &AdapterFolder) -> SharedKey {
    (f.labels.len(), format!("{:?}", f.pooling))
}

/// Softmax of each row.
fn softmax_rows(rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    rows.into_iter()
        .map(|r| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = r.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        })
        .collect()
}

impl Core {
    /// The base with a zero head of `n` classes and `folder`'s pooling.
    fn with_head(&self, folder: &AdapterFolder) -> Result<BertClassifier> {
        let mut m = self.base.clone();
        let n = folder.labels.len();
        let dev = m.classifier.weight.device().clone();
        let h = m.config.hidden_size;
        m.classifier = Linear::new(
            "classifier",
            Tensor::zeros((n, h), DType::F32, &dev)?,
            Some(Tensor::zeros(n, DType::F32, &dev)?),
        );
        m.num_labels = n;
        m.pooling = folder.pooling;
        Ok(m)
    }

    fn rebuild(&mut self, key: &SharedKey) -> Result<()> {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .as_ref()
                    .is_some_and(|f| f.lora().is_some() && &shared_key(f) == key)
            })
            .collect();
        let Some(&first) = live.first() else {
            self.shared.remove(key);
            return Ok(());
        };
        let mut model = self.with_head(self.slots[first].as_ref().expect("live"))?;
        let list: Vec<_> = live
            .iter()
            .map(|&i| {
                let f = self.slots[i].as_ref().expect("live");
                (f.lora().expect("lora").clone(), f.tensors.clone())
            })
            .collect();
        attach_multi(&mut model, &list)?;
        let route = live.iter().zip(0u32..).map(|(&s, k)| (s, k)).collect();
        self.shared.insert(key.clone(), Shared { model, route });
        Ok(())
    }

    fn tokenize(&mut self, max_len: usize, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        if !self.tokenizers.contains_key(&max_len) {
            let t = TextTokenizer::load(&self.tokenizer, max_len)?;
            self.tokenizers.insert(max_len, t);
        }
        Ok(self.tokenizers[&max_len].encode_batch(texts)?)
    }

    /// One batch on one model: each request's probabilities.
    fn classify(
        &mut self,
        model_key: Result<SharedKey, usize>,
        reqs: &[(usize, &ClassifyRequest)],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut seqs = Vec::new();
        let mut slots = Vec::new();
        for (slot, r) in reqs {
            let f = self.slots[*slot].as_ref().expect("live slot");
            let len = f
                .max_length
                .unwrap_or(self.default_len)
                .min(self.default_len);
            let texts: Vec<&str> = r.texts.iter().map(String::as_str).collect();
            let ids = self.tokenize(len, &texts)?;
            slots.extend(std::iter::repeat_n(*slot, ids.len()));
            seqs.extend(ids);
        }
        let (model, ctx) = match &model_key {
            Ok(key) => {
                let sh = &self.shared[key];
                let rows = slots.iter().map(|s| sh.route[s]).collect();
                (&sh.model, Ctx::inference().with_adapter_rows(rows))
            }
            Err(slot) => (&self.own[slot], Ctx::inference()),
        };
        self.metrics.batch("encoder", seqs.len());
        let inputs = model.inputs(&seqs)?;
        let logits: Vec<Vec<f32>> = model.forward(&inputs, &ctx)?.to_vec2()?;
        let mut probs = softmax_rows(logits).into_iter();
        Ok(reqs
            .iter()
            .map(|(_, r)| probs.by_ref().take(r.texts.len()).collect())
            .collect())
    }
}

impl engine::Core for Core {
    type Req = ClassifyRequest;

    fn load(&mut self, folder: AdapterFolder) -> Result<AdapterInfo> {
        let name = folder.name.clone();
        let fit = engine::admit(&self.names, &folder, AdapterTask::Classify)?;
        let slot = self.slots.len();
        let shared = folder.lora().is_some();
        if let Some(c) = folder.lora() {
            if head_rows(&folder.tensors).is_none() {
                return Err(ServeError::field(
                    "path",
                    format!(
                        "{} has no trained head (classifier in modules_to_save): it cannot classify",
                        folder.dir.display()
                    ),
                ));
            }
            let mut probe = self.with_head(&folder)?;
            attach_multi(&mut probe, &[(c.clone(), folder.tensors.clone())])
                .map_err(|e| fit(e.into()))?;
        } else {
            let mut model = self.with_head(&folder)?;
            engine::attach_own(&mut model, &folder, &fit)?;
            self.own.insert(slot, model);
        }
        let info = AdapterInfo {
            name: name.clone(),
            method: folder.method(),
            task: folder.task,
            shared_batch: shared,
            labels: folder.labels.clone(),
        };
        let key = shared_key(&folder);
        self.slots.push(Some(folder));
        self.names.insert(name.clone(), slot);
        if shared {
            if let Err(e) = self.rebuild(&key) {
                self.slots[slot] = None;
                self.names.remove(&name);
                return Err(fit(e));
            }
        }
        Ok(info)
    }

    fn unload(&mut self, name: &str) -> Result<()> {
        let Some(slot) = self.names.remove(name) else {
            return Err(unknown_adapter(name));
        };
        // Nothing runs between passes: free it now.
        let folder = self.slots[slot].take().expect("live slot");
        self.own.remove(&slot);
        if folder.lora().is_some() {
            self.rebuild(&shared_key(&folder))?;
        }
        Ok(())
    }

    fn running(&self) -> usize {
        0
    }

    fn rows_of(r: &ClassifyRequest) -> usize {
        r.texts.len()
    }

    fn name(&self) -> &'static str {
        "encoder"
    }

    fn step(&mut self, new: Vec<ClassifyRequest>) {
        // Group the requests by the model that runs them.
        let mut groups: BTreeMap<Result<SharedKey, usize>, Vec<(usize, ClassifyRequest)>> =
            BTreeMap::new();
        for r in new {
            let Some(&slot) = self.names.get(&r.adapter) else {
                let e = unknown_adapter(&r.adapter);
                let _ = r.reply.send(Err(e));
                continue;
            };
            let f = self.slots[slot].as_ref().expect("live slot");
            let key = if f.lora().is_some() {
                Ok(shared_key(f))
            } else {
                Err(slot)
            };
            groups.entry(key).or_default().push((slot, r));
        }
        for (key, reqs) in groups {
            let view: Vec<(usize, &ClassifyRequest)> = reqs.iter().map(|(s, r)| (*s, r)).collect();
            match self.classify(key, &view) {
                Ok(out) => {
                    for ((_, r), p) in reqs.into_iter().zip(out) {
                        let _ = r.reply.send(Ok(p));
                    }
                }
                Err(e) => {
                    for (_, r) in reqs {
                        let _ = r
                            .reply
                            .send(Err(ServeError::new(format!("classification failed: {e}"))));
                    }
                }
            }
        }
    }
}
