//! deltatune-train: the training loop, optimiser and schedule, metrics, and the adapter folder.

pub mod adapter_folder;
pub mod artifact;
pub mod causal_lm;
pub mod checkpoint;
pub mod image;
pub mod metrics;
pub mod optim;
pub mod trainer;

pub use adapter_folder::{AdapterFolder, AdapterTask};
pub use causal_lm::{generate_texts, generation_metrics, CausalLmTask, LmExample};
pub use checkpoint::Checkpointing;
pub use metrics::{classification_metrics, ClassificationMetrics};
pub use trainer::{
    evaluate, predict_proba, train, train_task, train_task_with, ClassificationTask, DevScore,
    Encoded, EpochRecord, Examples, Labelled, StepEval, Task, TrainConfig, TrainOptions,
    TrainReport,
};

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error(transparent)]
    Core(#[from] deltatune_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid training setting: {0}")]
    Config(String),
    #[error("data: {0}")]
    Data(String),
    #[error("{0}")]
    NonFinite(String),
    #[error("{0}")]
    Io(String),
    /// A stop was requested (SIGINT/SIGTERM); the run's state is in `checkpoint`.
    #[error("training stopped on request{}", match .checkpoint { Some(p) => format!("; its state is saved in {}", p.display()), None => String::new() })]
    Interrupted {
        checkpoint: Option<std::path::PathBuf>,
    },
}

/// The result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
