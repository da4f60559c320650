//! deltatune-models: model families written once, with module paths equal to the Hugging Face
//! checkpoint keys, exposing named sites where deltas attach.

pub mod backbone;
pub mod bert;
pub mod decoder;
pub mod gguf_tokenizer;
pub mod layers;
pub mod tokenizer;
pub mod vit;

pub use backbone::{Backbone, CausalLm, SequenceClassifier, TextBackbone};
pub use bert::{BertClassifier, Inputs, Pooling};
pub use decoder::{Decoder, DecoderClassifier, DecoderConfig, KvCache, TokenRows};
pub use tokenizer::TextTokenizer;
pub use vit::{VitClassifier, VitConfig};
