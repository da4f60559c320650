//! The Llama-architecture decoder: config, GGUF and Hugging Face loading, the model with its
//! named sites, and generation.

pub mod classifier;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod loader;
pub mod model;

pub use classifier::DecoderClassifier;
pub use config::{Activation, DecoderConfig, Family, HfDecoderConfig, Rope, RopeScaling};
pub use generate::{GenerateConfig, Generated, Generator, StopReason};
pub use gguf::{load_gguf, DecoderGguf, GgufTensor};
pub use loader::{load_decoder, LoadedDecoder};
pub use model::{Decoder, KvCache, TokenRows};
