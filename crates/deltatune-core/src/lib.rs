//! deltatune-core: the error type, the ops layer (custom candle ops with backward), named sites
//! where deltas attach, a seeded random generator, safetensors reading/writing and GGUF and
//! ONNX readers.

pub mod device;
pub mod error;
pub mod finite;
pub mod gguf;
pub mod hooks;
pub mod onnx;
pub mod ops;
pub mod quant;
pub mod rng;
pub mod sites;
pub mod weights;

pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use onnx::OnnxModel;
pub use quant::QuantMatrix;
pub use rng::Rng;
pub use sites::{Ctx, HasSites, Linear, LinearDelta, SiteInfo, SiteKind, TargetModules};
pub use weights::{to_safetensors_bytes, write_atomic, Weights};
