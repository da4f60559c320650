//! deltatune-methods: delta methods that attach to a model's named sites, selected by PEFT-style
//! patterns, without the model knowing the method.

pub mod adapter;
pub mod bitfit;
pub mod common;
pub mod compose;
pub mod delta;
pub mod full;
pub mod ia3;
pub mod intrinsic;
pub mod lora;
pub mod method;
pub mod prefix;
pub mod prompt;
pub mod registry;
pub mod vpt;

pub use common::PeftCommon;
pub use delta::{load_state_dict, peft_key, state_dict, train_modules, Trainable, PEFT_PREFIX};
pub use lora::LoraConfig;
pub use method::{GatePlacement, Method, ToFields};
pub use registry::{DeltaConfig, METHODS};
