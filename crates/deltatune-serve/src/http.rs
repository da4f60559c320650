//! `deltatune serve`'s HTTP API.
//!
//! - `GET /v1/models`: the base and every adapter.
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's shapes (`model` = an adapter's
//!   name or the base's), `stream: true` as server-sent events.
//! - `POST /v1/classify {model, inputs}`: class probabilities (encoder bases).
//! - `POST /v1/adapters {name, path}`, `DELETE /v1/adapters/{name}`: loading at run time, with
//!   `Authorization: Bearer <token>`, only from the adapter directory.
//! - `GET /health`, `GET /metrics` (Prometheus text).
//!
//! Every refusal is a 4xx (or 503 when the queue is full) with
//! `{"error": {"message", "type", "param", "code"}}`, `param` naming the request field at fault;
//! a method an endpoint does not take gets 405 with an `Allow` header, and a body that stops
//! arriving before its end gets 408 after `body_timeout` without a byte, then the connection
//! closes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use deltatune_data::generation::{apply_chat_template, ChatMessage};
use deltatune_models::decoder::{GenerateConfig, StopReason};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::decoder::{DecoderEngine, GenEvent, GenRequest};
use crate::encoder::{ClassifyRequest, EncoderEngine};
use crate::engine::{AdapterInfo, SubmitError};
use crate::folder::resolve_in;
use crate::metrics::Metrics;
use crate::ServeError;

/// The engine behind the server.
#[derive(Clone)]
pub enum Backend {
    Decoder(DecoderEngine),
    Encoder(EncoderEngine),
}

/// Server limits and settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The base model's name in `model` fields and `/v1/models`.
    pub base_name: String,
    /// The base's folder (labels of PEFT classifiers loaded at run time).
    pub base_dir: Option<PathBuf>,
    /// Where `POST /v1/adapters` may load from (none: loading at run time is off).
    pub adapter_dir: Option<PathBuf>,
    /// The bearer token for loading and unloading (none: off).
    pub admin_token: Option<String>,
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
    /// Prompt plus completion tokens of one request at most.
    pub max_tokens: usize,
    /// Texts in one classification request at most.
    pub max_inputs: usize,
    /// A request not answered in this time is abandoned (504).
    pub timeout: Duration,
    /// A request body with no new byte for this long is abandoned (408, then the connection
    /// closes); a slow body that keeps arriving is read to its end.
    pub body_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            base_name: "base".into(),
            base_dir: None,
            adapter_dir: None,
            admin_token: None,
            max_body_bytes: 1 << 20,
            max_tokens: 2048,
            max_inputs: 64,
            timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(30),
        }
    }
}

struct AppState {
    backend: Backend,
    opts: ServerOptions,
    metrics: Arc<Metrics>,
    ids: AtomicU64,
}

type St = State<Arc<AppState>>;

/// A refusal: HTTP status and the error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    err: ServeError,
    retry_after: Option<u64>,
    /// Answer with `Connection: close` (the request's body was not read to its end).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, err: ServeError) -> Self {
        Self {
            status,
            err,
            retry_after: None,
            close: false,
        }
    }

    fn bad(param: &str, msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ServeError::field(param, msg))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 | 503 => "overloaded_error",
            408 | 504 => "timeout_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.err.message,
            "type": kind,
            "param": self.err.param,
            "code": self.status.as_u16(),
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// The API's router over `backend`.
pub fn router(backend: Backend, opts: ServerOptions, metrics: Arc<Metrics>) -> Router {
    let state = Arc::new(AppState {
        backend,
        opts,
        metrics,
        ids: AtomicU64::new(0),
    });
    let api = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/classify", post(classify))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ServeError::new(
                    "no such endpoint: see /v1/models, /v1/completions, /v1/chat/completions, /v1/classify, /v1/adapters, /health, /metrics",
                ),
            )
        })
        .with_state(state);
    // Around the whole router, so that axum's 405 carries its `Allow` header when it is seen.
    Router::new()
        .fallback_service(api)
        .layer(middleware::from_fn(method_not_allowed))
}

/// A method an endpoint does not take: axum's 405 (with its `Allow` header) gets the JSON error
/// body every other refusal has.
async fn method_not_allowed(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    if r.status() != StatusCode::METHOD_NOT_ALLOWED {
        return r;
    }
    let allow = r.headers().get(header::ALLOW).cloned();
    let takes = allow
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').map(str::trim).collect::<Vec<_>>().join(" or "))
        .unwrap_or_default();
    let msg = if takes.is_empty() {
        format!("{path} does not take {method}")
    } else {
        format!("{path} does not take {method}: send {takes} (see the Allow header)")
    };
    let mut out =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, ServeError::new(msg)).into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    out
}

/// Serves `app` on `listener` until `shutdown` resolves, then finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("deltatune serve: shutting down after the requests in flight");
}

impl AppState {
    fn adapters(&self) -> Vec<AdapterInfo> {
        match &self.backend {
            Backend::Decoder(e) => e.adapters(),
            Backend::Encoder(e) => e.adapters(),
        }
    }

    fn adapter(&self, name: &str) -> Option<AdapterInfo> {
        match &self.backend {
            Backend::Decoder(e) => e.adapter(name),
            Backend::Encoder(e) => e.adapter(name),
        }
    }

    fn queued(&self) -> usize {
        match &self.backend {
            Backend::Decoder(e) => e.queued(),
            Backend::Encoder(e) => e.queued(),
        }
    }

    fn request_id(&self, headers: &HeaderMap, prefix: &str) -> String {
        headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(String::from)
            .unwrap_or_else(|| format!("{prefix}-{}", self.ids.fetch_add(1, Ordering::Relaxed)))
    }

    /// `model` of a request: `None` for the base, else a loaded adapter's name.
    fn resolve_model(&self, model: &str) -> Result<Option<String>, ApiError> {
        if model == self.opts.base_name || model == "base" {
            return Ok(None);
        }
        if self.adapter(model).is_none() {
            let known: Vec<String> = self.adapters().into_iter().map(|a| a.name).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ServeError::field(
                    "model",
                    format!(
                        "no model `{model}`: the base is `{}`; adapters: {}",
                        self.opts.base_name,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ),
            ));
        }
        Ok(Some(model.to_string()))
    }
}

fn busy(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Busy => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ServeError::new("the server's queue is full: retry after a moment"),
            )
        },
        SubmitError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ServeError::new("the engine has stopped"),
        ),
    }
}

/// Reads the body (at most `max_body_bytes`) as a JSON object. A body with no new byte for
/// `body_timeout` (a client that sent less than its Content-Length and waits) is abandoned:
/// 408, and the connection closes.
async fn read_json(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    let limit = s.opts.max_body_bytes;
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::field(
                "body",
                format!("the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)"),
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let wait = s.opts.body_timeout;
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0));
    loop {
        match tokio::time::timeout(wait, chunks.next()).await {
            Err(_) => {
                let of = declared.map_or(String::new(), |n| {
                    format!(" of the {n} its Content-Length announced")
                });
                return Err(ApiError {
                    close: true,
                    ..ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        ServeError::field(
                            "body",
                            format!(
                                "the request body stopped arriving: {} bytes{of} came, then nothing for {} s (--body-timeout)",
                                bytes.len(),
                                wait.as_secs_f64()
                            ),
                        ),
                    )
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError {
                    close: true,
                    ..ApiError::bad("body", format!("reading the request body: {e}"))
                })
            }
            Ok(Some(Ok(c))) => {
                if bytes.len() + c.len() > limit {
                    return Err(too_big());
                }
                bytes.extend_from_slice(&c);
            }
        }
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad("body", format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad(
            "body",
            "the request body must be a JSON object",
        )),
    }
}

/// Typed access to a request's fields, each error naming its field.
struct Fields(Map<String, Value>);

impl Fields {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> Result<Option<String>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad(k, format!("`{k}` must be a string"))),
        }
    }

    fn required(&self, k: &str) -> Result<String, ApiError> {
        self.string(k)?
            .ok_or_else(|| ApiError::bad(k, format!("`{k}` is required")))
    }

    fn uint(&self, k: &str) -> Result<Option<usize>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| ApiError::bad(k, format!("`{k}` must be a non-negative integer"))),
        }
    }

    fn float(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::bad(k, format!("`{k}` must be a number"))),
        }
    }

    fn flag(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad(k, format!("`{k}` must be true or false"))),
        }
    }

    /// A string or a list of strings.
    fn strings(&self, k: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad(k, format!("`{k}` must be a string or a list of strings"))
                }),
            Some(_) => Err(ApiError::bad(
                k,
                format!("`{k}` must be a string or a list of strings"),
            )),
        }
    }

    /// Decoding settings (OpenAI's names; `top_k` as vLLM has it).
    fn generate_config(&self, max_tokens_key: &str) -> Result<GenerateConfig, ApiError> {
        if self.uint("n")?.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
        let d = GenerateConfig::default();
        // The field the client gave (chat takes `max_completion_tokens` or `max_tokens`).
        let (max_tokens_key, max_tokens) = match self.uint(max_tokens_key)? {
            Some(n) => (max_tokens_key, Some(n)),
            None => ("max_tokens", self.uint("max_tokens")?),
        };
        let cfg = GenerateConfig {
            max_new_tokens: max_tokens.unwrap_or(16),
            temperature: self.float("temperature")?.unwrap_or(1.0),
            top_k: self.uint("top_k")?,
            top_p: self.float("top_p")?,
            seed: self.uint("seed")?.map_or(d.seed, |s| s as u64),
            stop: self.strings("stop")?.unwrap_or_default(),
            int8_activations: d.int8_activations,
        };
        if cfg.stop.len() > 4 || cfg.stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad(
                "stop",
                "give at most 4 non-empty stop strings",
            ));
        }
        cfg.validate().map_err(|e| match e {
            deltatune_core::Error::InvalidConfig { field, msg } => {
                let f = if field == "max_new_tokens" {
                    max_tokens_key.to_string()
                } else {
                    field
                };
                ApiError::bad(&f, format!("`{f}` {msg}"))
            }
            e => ApiError::bad("body", e.to_string()),
        })?;
        Ok(cfg)
    }
}

async fn health(State(s): St) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": s.opts.base_name,
        "adapters": s.adapters().len(),
        "queued": s.queued(),
    }))
    .into_response()
}

async fn metrics_text(State(s): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): St) -> Response {
    let task = match s.backend {
        Backend::Decoder(_) => "generate",
        Backend::Encoder(_) => "classify",
    };
    let mut data = vec![json!({
        "id": s.opts.base_name, "object": "model", "created": 0, "owned_by": "deltatune",
        "task": task, "method": null,
    })];
    for a in s.adapters() {
        data.push(json!({
            "id": a.name, "object": "model", "created": 0, "owned_by": "deltatune",
            "parent": s.opts.base_name, "task": a.task, "method": a.method,
            "shared_batch": a.shared_batch, "labels": a.labels,
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Runs `f`, then records the request's status and time.
async fn timed<F: Future<Output = Result<Response, ApiError>>>(
    s: &AppState,
    endpoint: &str,
    model: &str,
    f: F,
) -> Response {
    let t = Instant::now();
    let r = match f.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // Streams record themselves when they end.
    if r.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("text/event-stream")
    {
        s.metrics.request(
            endpoint,
            model,
            r.status().as_u16(),
            t.elapsed().as_secs_f64(),
        );
    }
    r
}

fn model_label(m: &Map<String, Value>) -> String {
    m.get("model")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .chars()
        .take(64)
        .collect()
}

async fn classify(State(s): St, headers: HeaderMap, body: Body) -> Response {
    let t = Instant::now();
    let m = match read_json(&s, &headers, body).await {
        Ok(m) => m,
        Err(e) => return timed(&s, "classify", "", async { Err(e) }).await,
    };
    let label = model_label(&m);
    let _ = t;
    timed(
        &s,
        "classify",
        &label.clone(),
        classify_inner(&s, &headers, Fields(m)),
    )
    .await
}

async fn classify_inner(
    s: &AppState,
    headers: &HeaderMap,
    f: Fields,
) -> Result<Response, ApiError> {
    let model = f.required("model")?;
    let Backend::Encoder(engine) = &s.backend else {
        return Err(ApiError::bad(
            "model",
            format!(
                "this server runs the decoder `{}`: it generates text (POST /v1/completions or /v1/chat/completions) and does not classify",
                s.opts.base_name
            ),
        ));
    };
    if f.flag("stream")? {
        return Err(ApiError::bad(
            "stream",
            "classification answers in one response: `stream` must be false or absent",
        ));
    }
    if f.uint("n")?.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            "n",
            "classification gives one answer per input: `n` must be 1 or absent",
        ));
    }
    let inputs = f
        .strings("inputs")?
        .or(f.strings("input")?)
        .ok_or_else(|| {
            ApiError::bad(
                "inputs",
                "`inputs` is required: a string or a list of strings",
            )
        })?;
    if inputs.is_empty() || inputs.len() > s.opts.max_inputs {
        return Err(ApiError::bad(
            "inputs",
            format!(
                "give 1 to {} inputs (got {})",
                s.opts.max_inputs,
                inputs.len()
            ),
        ));
    }
    let Some(name) = s.resolve_model(&model)? else {
        return Err(ApiError::bad(
            "model",
            "the base has no trained classification head: name an adapter",
        ));
    };
    let info = s
        .adapter(&name)
        .ok_or_else(|| ApiError::bad("model", "unloaded"))?;
    let id = s.request_id(headers, "cls");
    let (tx, rx) = oneshot::channel();
    let n = inputs.len();
    engine
        .submit(ClassifyRequest {
            adapter: name.clone(),
            texts: inputs,
            reply: tx,
        })
        .map_err(busy)?;
    let probs = match tokio::time::timeout(s.opts.timeout, rx).await {
        Err(_) => return Err(timeout(s)),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ServeError::new("the engine dropped the request"),
            ))
        }
        Ok(Ok(Err(e))) => return Err(engine_error(e)),
        Ok(Ok(Ok(p))) => p,
    };
    let data: Vec<Value> = probs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let best = deltatune_models::decoder::generate::argmax(p) as usize;
            json!({
                "index": i,
                "label": info.labels.get(best),
                "score": p[best],
                "probabilities": p,
            })
        })
        .collect();
    s.metrics.tokens(&name, n, 0);
    let mut r = axum::Json(json!({
        "id": id, "object": "classification", "created": now(), "model": name,
        "labels": info.labels, "data": data,
    }))
    .into_response();
    set_id(&mut r, &id);
    Ok(r)
}

fn set_id(r: &mut Response, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-request-id", v);
    }
}

fn timeout(s: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        ServeError::new(format!(
            "the request was not answered within {} s (--timeout)",
            s.opts.timeout.as_secs()
        )),
    )
}

fn engine_error(e: ServeError) -> ApiError {
    if e.param.is_some() {
        let status = if e.param.as_deref() == Some("model") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, e)
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
    }
}

/// OpenAI's `finish_reason`.
fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::Length => "length",
    }
}

/// Which OpenAI shape a generation answers in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Completion,
    Chat,
}

async fn completions(State(s): St, headers: HeaderMap, body: Body) -> Response {
    generation(s, headers, body, Shape::Completion).await
}

async fn chat(State(s): St, headers: HeaderMap, body: Body) -> Response {
    generation(s, headers, body, Shape::Chat).await
}

async fn generation(s: Arc<AppState>, headers: HeaderMap, body: Body, shape: Shape) -> Response {
    let endpoint = match shape {
        Shape::Completion => "completions",
        Shape::Chat => "chat_completions",
    };
    let m = match read_json(&s, &headers, body).await {
        Ok(m) => m,
        Err(e) => return timed(&s, endpoint, "", async { Err(e) }).await,
    };
    let label = model_label(&m);
    let s2 = s.clone();
    timed(&s, endpoint, &label.clone(), async move {
        generation_inner(s2, &headers, Fields(m), shape, endpoint, label).await
    })
    .await
}

async fn generation_inner(
    s: Arc<AppState>,
    headers: &HeaderMap,
    f: Fields,
    shape: Shape,
    endpoint: &'static str,
    label: String,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = f.required("model")?;
    let Backend::Decoder(engine) = &s.backend else {
        return Err(ApiError::bad(
            "model",
            format!(
                "this server runs the encoder classifier `{}`: it classifies (POST /v1/classify) and does not generate",
                s.opts.base_name
            ),
        ));
    };
    let adapter = s.resolve_model(&model)?;
    let (text, prompt_field) = match shape {
        Shape::Completion => {
            let p = f
                .strings("prompt")?
                .ok_or_else(|| ApiError::bad("prompt", "`prompt` is required"))?;
            if p.len() != 1 {
                return Err(ApiError::bad("prompt", "give one prompt per request"));
            }
            (p.into_iter().next().unwrap_or_default(), "prompt")
        }
        Shape::Chat => {
            let msgs = f
                .get("messages")
                .ok_or_else(|| ApiError::bad("messages", "`messages` is required"))?;
            let msgs: Vec<ChatMessage> = serde_json::from_value(msgs.clone()).map_err(|e| {
                ApiError::bad(
                    "messages",
                    format!("`messages` must be a list of {{role, content}} objects: {e}"),
                )
            })?;
            if msgs.is_empty() {
                return Err(ApiError::bad("messages", "`messages` is empty"));
            }
            let t = apply_chat_template(engine.chat_template.as_deref(), &msgs, true)
                .map_err(|e| ApiError::bad("messages", e))?;
            (t, "messages")
        }
    };
    let cfg = f.generate_config(match shape {
        Shape::Completion => "max_tokens",
        Shape::Chat => "max_completion_tokens",
    })?;
    let stream = f.flag("stream")?;
    // Chat prompts too get the tokenizer's BOS (Gemma, Llama 3): the template renders
    // `bos_token` empty, as `generate --chat` and training encode it.
    let prompt = engine
        .tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| ApiError::bad(prompt_field, format!("tokenizing: {e}")))?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        return Err(ApiError::bad(
            prompt_field,
            format!("`{prompt_field}` has no tokens"),
        ));
    }
    let total = prompt.len() + cfg.max_new_tokens;
    if total > s.opts.max_tokens {
        return Err(ApiError::bad(
            if prompt.len() >= s.opts.max_tokens { prompt_field } else { "max_tokens" },
            format!(
                "{} prompt tokens + max_tokens {} = {total} is more than this server's {} tokens per request (--max-tokens)",
                prompt.len(),
                cfg.max_new_tokens,
                s.opts.max_tokens
            ),
        ));
    }
    if prompt.len() >= engine.context {
        return Err(ApiError::bad(
            prompt_field,
            format!(
                "the prompt has {} tokens; the model's context is {} tokens",
                prompt.len(),
                engine.context
            ),
        ));
    }
    let id = s.request_id(
        headers,
        if shape == Shape::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
    );
    let (tx, rx) = mpsc::unbounded_channel();
    engine
        .submit(GenRequest {
            adapter,
            prompt,
            config: cfg,
            events: tx,
        })
        .map_err(busy)?;
    let out = Out {
        id: id.clone(),
        model,
        created: now(),
        shape,
    };
    if stream {
        let mut r = sse(s.clone(), rx, out, endpoint, label, started).into_response();
        set_id(&mut r, &id);
        return Ok(r);
    }
    let deadline = tokio::time::Instant::now() + s.opts.timeout;
    let mut rx = rx;
    let mut text = String::new();
    let finish = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(timeout(&s)),
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ServeError::new("the engine dropped the request"),
                ))
            }
            Ok(Some(GenEvent::Text(t))) => text.push_str(&t),
            Ok(Some(GenEvent::Error(e))) => return Err(engine_error(e)),
            Ok(Some(GenEvent::Done(f))) => break f,
        }
    };
    let usage = json!({
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    });
    let choice = match shape {
        Shape::Completion => json!({
            "index": 0, "text": text, "logprobs": null,
            "finish_reason": finish_reason(finish.reason),
        }),
        Shape::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": finish_reason(finish.reason),
        }),
    };
    let mut r = axum::Json(json!({
        "id": id, "object": out.object(false), "created": out.created, "model": out.model,
        "choices": [choice], "usage": usage,
    }))
    .into_response();
    set_id(&mut r, &id);
    Ok(r)
}

/// What each streamed chunk repeats.
struct Out {
    id: String,
    model: String,
    created: u64,
    shape: Shape,
}

impl Out {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Completion, _) => "text_completion",
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
        }
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.shape {
            Shape::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Shape::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }
}

/// The events of a generation as server-sent events, ending with `data: [DONE]`. When the
/// client goes away the stream is dropped, and with it the receiver: the engine stops that row.
fn sse(
    s: Arc<AppState>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    out: Out,
    endpoint: &'static str,
    label: String,
    started: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let deadline = tokio::time::Instant::now() + s.opts.timeout;
    let out = Arc::new(out);
    struct St {
        rx: mpsc::UnboundedReceiver<GenEvent>,
        first: bool,
        /// The last event was sent: `[DONE]` follows.
        ended: bool,
        closed: bool,
    }
    let state = St {
        rx,
        first: true,
        ended: false,
        closed: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut st| {
        let s = s.clone();
        let label = label.clone();
        let out = out.clone();
        let out_chunk = move |t: Option<&str>, f: Option<&str>, first: bool| out.chunk(t, f, first);
        let ev = if st.closed {
            None
        } else if st.ended {
            st.closed = true;
            return futures_util::future::Either::Left(std::future::ready(Some((
                Ok(Event::default().data("[DONE]")),
                st,
            ))));
        } else {
            Some(async move {
                let (event, status) = match tokio::time::timeout_at(deadline, st.rx.recv()).await {
                    Ok(Some(GenEvent::Text(t))) => {
                        let v = out_chunk(Some(&t), None, st.first);
                        st.first = false;
                        (Event::default().data(v.to_string()), None)
                    }
                    Ok(Some(GenEvent::Done(f))) => {
                        st.ended = true;
                        let mut v = out_chunk(None, Some(finish_reason(f.reason)), st.first);
                        v["usage"] = json!({
                            "prompt_tokens": f.prompt_tokens,
                            "completion_tokens": f.completion_tokens,
                            "total_tokens": f.prompt_tokens + f.completion_tokens,
                        });
                        (Event::default().data(v.to_string()), Some(200))
                    }
                    Ok(Some(GenEvent::Error(e))) => {
                        st.ended = true;
                        let v = json!({"error": {"message": e.message, "param": e.param}});
                        (Event::default().data(v.to_string()), Some(500))
                    }
                    Ok(None) => {
                        st.ended = true;
                        let v = json!({"error": {"message": "the engine dropped the request"}});
                        (Event::default().data(v.to_string()), Some(500))
                    }
                    Err(_) => {
                        st.ended = true;
                        let v = json!({"error": {"message": "the request timed out (--timeout)"}});
                        (Event::default().data(v.to_string()), Some(504))
                    }
                };
                if let Some(code) = status {
                    s.metrics
                        .request(endpoint, &label, code, started.elapsed().as_secs_f64());
                }
                (Ok(event), st)
            })
        };
        futures_util::future::Either::Right(async move {
            match ev {
                Some(f) => Some(f.await),
                None => None,
            }
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn check_token(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &s.opts.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ServeError::field(
                "authorization",
                "loading adapters at run time is off: start the server with DELTATUNE_ADMIN_TOKEN set",
            ),
        ));
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time.
    let ok = got.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ServeError::field(
                "authorization",
                "a missing or wrong bearer token (Authorization: Bearer <DELTATUNE_ADMIN_TOKEN>)",
            ),
        ));
    }
    Ok(())
}

async fn load_adapter(State(s): St, headers: HeaderMap, body: Body) -> Response {
    let s2 = s.clone();
    timed(&s, "adapters", "", async move {
        check_token(&s2, &headers)?;
        let f = Fields(read_json(&s2, &headers, body).await?);
        let name = f.required("name")?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && name != s2.opts.base_name
            && name != "base";
        if !valid {
            return Err(ApiError::bad(
                "name",
                "`name` must be 1 to 64 letters, digits, `.`, `_` or `-`, and not the base's name",
            ));
        }
        let Some(root) = s2.opts.adapter_dir.clone() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ServeError::field("path", "the server has no adapter directory (--adapter-dir): it loads nothing at run time"),
            ));
        };
        let rel = f.string("path")?.unwrap_or_else(|| name.clone());
        let dir = resolve_in(&root, &rel).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
        let base_dir = s2.opts.base_dir.clone();
        let n2 = name.clone();
        let folder = tokio::task::spawn_blocking(move || {
            crate::folder::read(&n2, &dir, base_dir.as_deref())
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ServeError::new(e.to_string())))?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
        let r = match &s2.backend {
            Backend::Decoder(e) => e.load(folder).await,
            Backend::Encoder(e) => e.load(folder).await,
        };
        let info = r.map_err(|e| {
            let status = if e.param.as_deref() == Some("name") { StatusCode::CONFLICT } else { StatusCode::BAD_REQUEST };
            ApiError::new(status, e)
        })?;
        Ok((StatusCode::CREATED, axum::Json(json!({"loaded": info}))).into_response())
    })
    .await
}

async fn unload_adapter(
    State(s): St,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let s2 = s.clone();
    timed(&s, "adapters", "", async move {
        check_token(&s2, &headers)?;
        let r = match &s2.backend {
            Backend::Decoder(e) => e.unload(&name).await,
            Backend::Encoder(e) => e.unload(&name).await,
        };
        r.map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e))?;
        Ok(axum::Json(json!({"unloaded": name})).into_response())
    })
    .await
}

/// Counts of a finished request per model, for tests and the load generator.
pub type Counts = BTreeMap<String, u64>;
