//! Vision transformers. For now: reading a DINOv2 backbone out of an ONNX export
//! ([`onnx::dinov2_from_onnx`]) under Hugging Face `Dinov2Model` names.

pub mod onnx;

pub use onnx::{convert_dinov2_onnx, dinov2_from_onnx, Dinov2OnnxConfig};
