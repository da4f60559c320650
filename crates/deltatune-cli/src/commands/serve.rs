//! `deltatune serve` and `deltatune loadgen`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use deltatune_core::Rng;
use deltatune_models::{BertClassifier, Pooling};
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::http::{self, Backend, ServerOptions};
use deltatune_serve::loadgen::{self, Endpoint, LoadOptions};
use deltatune_serve::metrics::Metrics;
use deltatune_serve::{decoder, encoder, folder, AdapterFolder};

/// `deltatune serve` flags.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// The base: a decoder (.gguf file, decoder folder, SmolLM2-135M-Instruct, gemma-3-270m) or an encoder
    /// classifier's folder (all-MiniLM-L6-v2, a BERT folder). Default: the first adapter's base,
    /// else SmolLM2-135M-Instruct.
    #[arg(long)]
    pub model: Option<String>,
    /// An adapter to serve, as NAME=DIR (repeatable; deltatune's or PEFT's folders).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Serve every adapter folder in DIR under its folder name; `POST /v1/adapters` loads only
    /// from here.
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    /// The address to listen on (loopback unless told).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free port, written to --port-file).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Write the port listened on to this file once listening.
    #[arg(long)]
    pub port_file: Option<PathBuf>,
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Batch rows at most (requests running together).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests waiting at most; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Request bodies larger than this are refused (413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Prompt plus completion tokens of one request at most.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Seconds before an unanswered request is abandoned (504).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Seconds a request body may go without a new byte (a client that sends less than its
    /// Content-Length) before it is abandoned with 408 and the connection closed.
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// The bearer token of `POST/DELETE /v1/adapters` (off without it).
    #[arg(long, env = "DELTATUNE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// Whether `path` holds a decoder (a GGUF file, or a folder whose config is a causal LM's).
fn is_decoder(spec: &str, cache: &Path) -> bool {
    if spec.ends_with(".gguf") || super::lm::is_decoder_spec(spec) {
        return true;
    }
    let dir = deltatune_data::assets::resolve_model_dir(spec, cache)
        .unwrap_or_else(|_| PathBuf::from(spec));
    if super::lm::is_decoder_folder(&dir) {
        return true;
    }
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    cfg.is_some_and(|c| {
        c["architectures"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str().is_some_and(|x| x.ends_with("ForCausalLM")))
        })
    })
}

/// The longest `--timeout` and `--body-timeout`: a day.
const MAX_WAIT_S: u64 = 86_400;

/// Refuses limits under which the server would refuse (or abandon) every request.
fn check_limits(a: &ServeArgs) -> Result<()> {
    let zero = [
        (
            a.max_queue == 0,
            "--max-queue",
            "requests waiting at most: 0 refuses every request",
        ),
        (
            a.max_batch == 0,
            "--max-batch",
            "requests running together at most: 0 runs none",
        ),
        (
            a.max_body_bytes == 0,
            "--max-body-bytes",
            "the largest request body: 0 refuses every request",
        ),
        (
            a.max_tokens == 0,
            "--max-tokens",
            "prompt plus completion tokens of a request at most: 0 refuses every generation",
        ),
        (
            a.timeout == 0,
            "--timeout",
            "seconds to answer a request: 0 abandons every request",
        ),
        (
            a.body_timeout == 0,
            "--body-timeout",
            "seconds a request body may pause: 0 abandons every request with a body",
        ),
    ];
    for (is_zero, flag, what) in zero {
        if is_zero {
            bail!(
                "{flag} 0: it is {what}; give at least 1 (or leave the flag out for its default)"
            );
        }
    }
    for (v, flag) in [(a.timeout, "--timeout"), (a.body_timeout, "--body-timeout")] {
        if v > MAX_WAIT_S {
            bail!("{flag} {v}: give at most {MAX_WAIT_S} seconds (a day)");
        }
    }
    Ok(())
}

/// The adapters to serve at start-up, by name: each `--adapter NAME=DIR`, then the folders of
/// `--adapter-dir`. A name given twice is refused, naming both folders.
fn parse_adapters(a: &ServeArgs) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for spec in &a.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: give NAME=DIR (e.g. --adapter sentiment=runs/lora)");
        };
        if name.is_empty() || dir.is_empty() {
            bail!("--adapter {spec}: give NAME=DIR with both parts");
        }
        if let Some((_, first)) = out.iter().find(|(m, _)| m == name) {
            bail!(
                "two adapters are named `{name}`: --adapter {name}={} and --adapter {spec}; give each --adapter a name of its own",
                first.display()
            );
        }
        out.push((name.to_string(), PathBuf::from(dir)));
    }
    if let Some(root) = &a.adapter_dir {
        for (n, d) in folder::scan(root).map_err(anyhow::Error::msg)? {
            if let Some((_, first)) = out.iter().find(|(m, _)| *m == n) {
                bail!(
                    "two adapters are named `{n}`: --adapter {n}={} and {} in --adapter-dir; give the --adapter another name (or rename the folder)",
                    first.display(),
                    d.display()
                );
            }
            out.push((n, d));
        }
    }
    Ok(out)
}

/// `deltatune serve`.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let cache = a
        .cache
        .clone()
        .unwrap_or_else(deltatune_data::assets::default_cache_dir);
    check_limits(a)?;
    let named = parse_adapters(a)?;
    // The first adapter's base when no --model is given.
    let spec = match &a.model {
        Some(m) => m.clone(),
        None => match named.first() {
            Some((n, d)) => AdapterFolder::read(n, d, None)
                .map_err(anyhow::Error::msg)?
                .base
                .with_context(|| {
                    format!(
                        "the adapter {} names no base model: pass --model",
                        d.display()
                    )
                })?,
            None => deltatune_data::assets::DECODER_NAME.to_string(),
        },
    };
    let metrics = Arc::new(Metrics::default());
    let opts = EngineOptions {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
    };
    let (backend, base_dir) = if is_decoder(&spec, &cache) {
        let d = super::lm::load(&spec, &cache)?;
        let folders = named
            .iter()
            .map(|(n, dir)| AdapterFolder::read(n, dir, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let source = d.source.clone();
        let e = decoder::start(d, folders, &opts, metrics.clone()).map_err(anyhow::Error::msg)?;
        (Backend::Decoder(e), source)
    } else {
        let dir = crate::session::model_dir(&spec, &cache)?;
        let model = BertClassifier::load(&dir, 2, Pooling::Cls, &mut Rng::new(0))
            .with_context(|| format!("loading the encoder in {}", dir.display()))?;
        let folders = named
            .iter()
            .map(|(n, d)| AdapterFolder::read(n, d, Some(&dir)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let e = encoder::start(
            model,
            dir.join("tokenizer.json"),
            folders,
            &opts,
            metrics.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        (Backend::Encoder(e), dir)
    };
    let base_name = Path::new(&spec)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&spec)
        .to_string();
    let n = named.len();
    let sopts = ServerOptions {
        base_name: base_name.clone(),
        base_dir: Some(base_dir),
        adapter_dir: a.adapter_dir.clone(),
        admin_token: a.admin_token.clone().filter(|t| !t.is_empty()),
        max_body_bytes: a.max_body_bytes,
        max_tokens: a.max_tokens,
        max_inputs: 64,
        timeout: Duration::from_secs(a.timeout),
        body_timeout: Duration::from_secs(a.body_timeout),
    };
    let app = http::router(backend, sopts, metrics);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        if let Some(p) = &a.port_file {
            deltatune_core::weights::write_atomic(p, addr.port().to_string().as_bytes())?;
        }
        eprintln!(
            "deltatune serve: {base_name} with {n} adapter{} on http://{addr} (GET /v1/models)",
            if n == 1 { "" } else { "s" }
        );
        http::serve(listener, app, http::shutdown_signal())
            .await
            .context("serving")
    })
}

/// What `deltatune loadgen` sends.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LoadEndpoint {
    Completions,
    Classify,
}

/// `deltatune loadgen` flags.
#[derive(Debug, Args, Clone)]
pub struct LoadgenArgs {
    /// The server (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Models to spread requests over, comma-separated; MODEL@URL sends that model's requests
    /// to another server (one process per adapter).
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    #[arg(long, value_enum, default_value_t = LoadEndpoint::Completions)]
    pub endpoint: LoadEndpoint,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Requests in all at most.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_requests: usize,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Texts to send, one per line (default: a few built in).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `deltatune loadgen`.
pub fn loadgen(a: &LoadgenArgs) -> Result<()> {
    let targets = a
        .models
        .iter()
        .map(|m| match m.split_once('@') {
            Some((m, u)) => (m.to_string(), u.to_string()),
            None => (m.clone(), a.url.clone()),
        })
        .collect();
    let texts = match &a.file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => [
            "The movie was a delight from start to finish",
            "Write one sentence about the sea.",
            "a dull, overlong and predictable thriller",
            "List three colours:",
            "What is the capital of France?",
            "an unexpectedly moving portrait of a family",
        ]
        .map(String::from)
        .to_vec(),
    };
    let opts = LoadOptions {
        targets,
        endpoint: match a.endpoint {
            LoadEndpoint::Completions => Endpoint::Completions,
            LoadEndpoint::Classify => Endpoint::Classify,
        },
        clients: a.clients,
        duration: Duration::from_secs(a.duration),
        max_requests: a.max_requests,
        max_tokens: a.max_tokens,
        texts,
        timeout: Duration::from_secs(300),
    };
    eprintln!(
        "loadgen: {} clients over {} model(s) for at most {} s",
        a.clients,
        a.models.len(),
        a.duration
    );
    let r = loadgen::run(&opts).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "requests {} · ok {} · errors {} · lost {} · duplicated {} · {:.1} s\n\
             throughput {:.2} req/s, {:.1} tokens/s · latency p50 {:.0} ms, p99 {:.0} ms",
            r.requests,
            r.ok,
            r.errors,
            r.lost,
            r.duplicated,
            r.seconds,
            r.requests_per_s,
            r.tokens_per_s,
            r.p50_ms,
            r.p99_ms
        );
        for (m, n) in &r.per_model {
            println!("  {m}: {n}");
        }
        for e in &r.error_samples {
            println!("  error: {e}");
        }
    }
    if r.errors + r.lost + r.duplicated > 0 {
        bail!(
            "{} errors, {} lost, {} duplicated answers",
            r.errors,
            r.lost,
            r.duplicated
        );
    }
    Ok(())
}
