//! What the two engines share: a thread owning the model, fed by a bounded queue of requests
//! and of adapter loads and unloads, and the handle the HTTP side holds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::folder::{AdapterFolder, AdapterTask};
use crate::metrics::Metrics;
use crate::{Result, ServeError};

/// What the HTTP side knows of a loaded adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub method: &'static str,
    pub task: AdapterTask,
    /// Shares the base's batch (LoRA) or has a batch of its own.
    pub shared_batch: bool,
    /// Class names (classifiers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Rows in one batch at most (running and joining).
    pub max_batch: usize,
    /// Requests waiting at most; more are refused (503).
    pub max_queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
        }
    }
}

/// Why a request was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Busy,
    /// The engine has stopped.
    Stopped,
}

pub(crate) enum Msg<R> {
    Req(R),
    Load(Box<AdapterFolder>, oneshot::Sender<Result<AdapterInfo>>),
    Unload(String, oneshot::Sender<Result<()>>),
}

/// The model side of an engine, run on its own thread by [`start`].
pub(crate) trait Core: Send + 'static {
    type Req: Send + 'static;
    /// Checks an adapter against the base and adds it.
    fn load(&mut self, folder: AdapterFolder) -> Result<AdapterInfo>;
    /// Refuses new requests for `name` at once; frees it when unused.
    fn unload(&mut self, name: &str) -> Result<()>;
    /// Batch rows in flight.
    fn running(&self) -> usize;
    /// Batch rows a request needs.
    fn rows_of(req: &Self::Req) -> usize;
    /// Takes the new requests and runs one pass (a decoding step, or a classification batch).
    fn step(&mut self, new: Vec<Self::Req>);
    fn name(&self) -> &'static str;
}

/// The HTTP side's handle on an engine thread (cheap to clone).
pub struct Handle<R> {
    tx: Sender<Msg<R>>,
    queued: Arc<AtomicUsize>,
    adapters: Arc<RwLock<BTreeMap<String, AdapterInfo>>>,
    max_queue: usize,
    metrics: Arc<Metrics>,
    engine: &'static str,
}

impl<R> Clone for Handle<R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            adapters: self.adapters.clone(),
            max_queue: self.max_queue,
            metrics: self.metrics.clone(),
            engine: self.engine,
        }
    }
}

/// Loads `adapters` into `core` and starts its thread.
pub(crate) fn start<C: Core>(
    mut core: C,
    adapters: Vec<AdapterFolder>,
    opts: &EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<Handle<C::Req>> {
    let infos = Arc::new(RwLock::new(BTreeMap::new()));
    for a in adapters {
        let info = core.load(a)?;
        infos.write().unwrap().insert(info.name.clone(), info);
    }
    metrics.set_adapters(infos.read().unwrap().len());
    let (tx, rx) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let handle = Handle {
        tx,
        queued: queued.clone(),
        adapters: infos.clone(),
        max_queue: opts.max_queue,
        metrics: metrics.clone(),
        engine: core.name(),
    };
    let max_batch = opts.max_batch.max(1);
    std::thread::Builder::new()
        .name(format!("deltatune-{}", core.name()))
        .spawn(move || run(core, rx, queued, infos, metrics, max_batch))
        .map_err(|e| ServeError::new(format!("starting the engine thread: {e}")))?;
    Ok(handle)
}

fn run<C: Core>(
    mut core: C,
    rx: Receiver<Msg<C::Req>>,
    queued: Arc<AtomicUsize>,
    infos: Arc<RwLock<BTreeMap<String, AdapterInfo>>>,
    metrics: Arc<Metrics>,
    max_batch: usize,
) {
    loop {
        // Take what is waiting; block only when nothing runs.
        let mut msgs = Vec::new();
        if core.running() == 0 {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => msgs.push(m),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let mut new = Vec::new();
        let mut rows = core.running();
        loop {
            for m in msgs.drain(..) {
                match m {
                    Msg::Req(r) => {
                        queued.fetch_sub(1, Ordering::SeqCst);
                        rows += C::rows_of(&r);
                        new.push(r);
                    }
                    Msg::Load(folder, reply) => {
                        let r = core.load(*folder);
                        if let Ok(info) = &r {
                            infos
                                .write()
                                .unwrap()
                                .insert(info.name.clone(), info.clone());
                        }
                        metrics.set_adapters(infos.read().unwrap().len());
                        let _ = reply.send(r);
                    }
                    Msg::Unload(name, reply) => {
                        let r = core.unload(&name);
                        infos.write().unwrap().remove(&name);
                        metrics.set_adapters(infos.read().unwrap().len());
                        let _ = reply.send(r);
                    }
                }
            }
            if rows >= max_batch {
                break;
            }
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        metrics.set_queue(core.name(), queued.load(Ordering::SeqCst));
        // The step runs on a worker of rayon's pool: its parallel ops then split work with
        // the other workers directly, where from this thread each op would park it until a
        // worker finished (a futex sleep and wake per op, hundreds per decoding step).
        rayon::scope(|_| core.step(new));
    }
}

impl<R> Handle<R> {
    /// The adapters loaded now.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.adapters.read().unwrap().values().cloned().collect()
    }

    pub fn adapter(&self, name: &str) -> Option<AdapterInfo> {
        self.adapters.read().unwrap().get(name).cloned()
    }

    /// Requests waiting for the engine.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues a request.
    pub fn submit(&self, req: R) -> Result<(), SubmitError> {
        let n = self.queued.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Busy);
        }
        self.metrics.set_queue(self.engine, n + 1);
        self.tx.send(Msg::Req(req)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Loads an adapter at run time (checked against the base first).
    pub async fn load(&self, folder: AdapterFolder) -> Result<AdapterInfo> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Load(Box::new(folder), tx))
            .map_err(|_| ServeError::new("the engine has stopped"))?;
        rx.await
            .map_err(|_| ServeError::new("the engine has stopped"))?
    }

    /// Unloads an adapter: new requests for it are refused at once; it leaves memory when its
    /// requests in flight have finished.
    pub async fn unload(&self, name: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Unload(name.to_string(), tx))
            .map_err(|_| ServeError::new("the engine has stopped"))?;
        rx.await
            .map_err(|_| ServeError::new("the engine has stopped"))?
    }
}

/// Checks that `folder` may join an engine serving `task` whose loaded names are `names`;
/// returns the wrapper for errors of fitting it to the base (they name the folder).
pub(crate) fn admit<V>(
    names: &BTreeMap<String, V>,
    folder: &AdapterFolder,
    task: AdapterTask,
) -> Result<impl Fn(ServeError) -> ServeError + use<V>> {
    let name = &folder.name;
    if names.contains_key(name) {
        return Err(ServeError::field(
            "name",
            format!("an adapter named `{name}` is loaded already (unload it first)"),
        ));
    }
    if folder.task != task {
        let (is, runs) = match task {
            AdapterTask::Generate => (
                "a classifier's",
                "a decoder (serve it with an encoder base)",
            ),
            AdapterTask::Classify => ("a decoder's (task_type CAUSAL_LM)", "an encoder classifier"),
        };
        return Err(ServeError::field(
            "path",
            format!(
                "{} is {is} adapter; this server runs {runs}",
                folder.dir.display()
            ),
        ));
    }
    let dir = folder.dir.clone();
    Ok(move |e: ServeError| {
        ServeError::field(
            "path",
            format!(
                "the adapter in {} does not fit the base model: {}",
                dir.display(),
                e.message
            ),
        )
    })
}

/// Attaches a non-LoRA adapter (its own batch) to `model` and loads its tensors; errors go
/// through `fit`.
pub(crate) fn attach_own(
    model: &mut dyn deltatune_core::HasSites,
    folder: &AdapterFolder,
    fit: impl Fn(ServeError) -> ServeError,
) -> Result<()> {
    let tr = folder
        .delta
        .attach_saved(model, &deltatune_core::Rng::new(0))
        .map_err(|e| fit(e.into()))?;
    deltatune_methods::load_state_dict(
        &tr,
        &folder.tensors,
        &folder.dir.join(deltatune_train::artifact::ADAPTER_WEIGHTS),
    )
    .map_err(|e| fit(e.into()))
}

/// The error for a request naming an adapter that is not loaded.
pub(crate) fn unknown_adapter(name: &str) -> ServeError {
    ServeError::field("model", format!("no adapter named `{name}` is loaded"))
}
