//! deltatune as a library: delta tuning of frozen pretrained models (BERT-style encoders,
//! decoders of seven families from GGUF files or Hugging Face folders, DINOv2 ViTs) with LoRA,
//! IA3, bottleneck adapters, prefix and prompt tuning, BitFit and intrinsic prompt tuning,
//! writing adapter folders that Hugging Face PEFT loads.
//!
//! The pipelines move here from the `deltatune` command-line program, which becomes a thin
//! shell over this crate (issue 29). Done so far:
//! - [`settings`]: every setting of a run, with its defaults and the resolution order of the
//!   command line (flags, `--set`, environment, config file);
//! - [`session`]: models, data and saved adapters loaded from settings or adapter folders;
//! - [`decoder`]: decoders found by name, file or folder;
//! - [`Adapter`]: a trained classifier (ours or PEFT's) loaded and asked for predictions.
//!
//! The workspace crates are re-exported: [`core`] (tensors, sites, custom ops), [`models`],
//! [`methods`] (the delta methods), [`data`], [`train`].

pub mod decoder;
pub mod session;
pub mod settings;

mod adapter;

pub use adapter::{Adapter, Prediction};
pub use deltatune_core as core;
pub use deltatune_data as data;
pub use deltatune_methods as methods;
pub use deltatune_models as models;
pub use deltatune_train as train;
