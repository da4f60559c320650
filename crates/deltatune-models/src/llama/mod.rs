//! The Llama-architecture decoder: config, GGUF and Hugging Face loading, the model with its
//! named sites, and generation.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod loader;
pub mod model;

pub use config::{LlamaConfig, LlamaConfigFile};
pub use generate::{GenerateConfig, Generated, Generator, StopReason};
pub use gguf::{load_llama_gguf, GgufTensor, LlamaGguf};
pub use loader::{load_decoder, LoadedDecoder};
pub use model::{KvCache, LlamaModel, TokenRows};
