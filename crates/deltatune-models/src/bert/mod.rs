//! BERT-family encoders (BERT, MiniLM, RoBERTa) for sequence classification.

mod config;
mod model;

pub use config::{BertConfig, BertConfigFile, Family};
pub use model::{mean_pool, BertClassifier, Inputs, Pooling};
