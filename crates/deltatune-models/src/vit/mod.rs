//! Vision Transformers (DINOv2, ViT) for image classification, and reading a DINOv2 backbone
//! out of an ONNX export ([`onnx::dinov2_from_onnx`]) under Hugging Face `Dinov2Model` names.

mod config;
mod model;
pub mod onnx;

pub use config::{VitConfig, VitConfigFile, VitFamily};
pub use model::{bicubic_matrix, VitClassifier};
pub use onnx::{convert_dinov2_onnx, dinov2_from_onnx, Dinov2OnnxConfig};
