//! Vision Transformers (DINOv2, ViT) for image classification.

mod config;
mod model;

pub use config::{VitConfig, VitConfigFile, VitFamily};
pub use model::{bicubic_matrix, VitClassifier};
