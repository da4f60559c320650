//! Serving many adapters on one frozen base model.
//!
//! - [`folder`]: an adapter folder as deltatune or PEFT writes it, read once (config, tensors,
//!   labels), checked against a base.
//! - [`decoder`]: the generation engine: requests for any mix of LoRA adapters share each pass
//!   through the base (each row adds its own adapter's low-rank term), and batch continuously:
//!   a request joins between decoding steps, a finished one leaves. Adapters of other kinds
//!   (prompt, prefix, IA3, bottleneck) run in a batch of their own.
//! - [`encoder`]: the classification engine, batched the same way.
//! - [`http`]: `deltatune serve`'s API (OpenAI's completions and chat shapes, classification,
//!   adapter loading at run time, health, Prometheus metrics), with its limits.
//! - [`loadgen`]: a bounded, loopback-only load generator for measuring a server.

pub mod decoder;
pub mod encoder;
pub mod engine;
pub mod folder;
pub mod http;
pub mod loadgen;
pub mod metrics;

pub use folder::{AdapterFolder, AdapterTask};

/// What the serving layer reports: a message meant for the client, and the request field it is
/// about.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServeError {
    pub message: String,
    /// The request field at fault (`model`, `prompt`, `max_tokens`...), when one is.
    pub param: Option<String>,
}

impl ServeError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: None,
        }
    }

    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

impl From<deltatune_core::Error> for ServeError {
    fn from(e: deltatune_core::Error) -> Self {
        ServeError::new(e.to_string())
    }
}

impl From<candle_core::Error> for ServeError {
    fn from(e: candle_core::Error) -> Self {
        ServeError::new(e.to_string())
    }
}

pub type Result<T, E = ServeError> = std::result::Result<T, E>;
