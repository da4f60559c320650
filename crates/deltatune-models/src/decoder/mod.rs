//! The Llama-architecture decoder: config, GGUF and Hugging Face loading, the model with its
//! named sites, and generation.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod loader;
pub mod model;

pub use config::{DecoderConfig, HfDecoderConfig};
pub use generate::{GenerateConfig, Generated, Generator, StopReason};
pub use gguf::{load_gguf, GgufTensor, DecoderGguf};
pub use loader::{load_decoder, LoadedDecoder};
pub use model::{KvCache, Decoder, TokenRows};
