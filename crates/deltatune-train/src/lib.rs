//! deltatune-train: the training loop, optimiser and schedule, metrics, and the adapter folder.

pub mod artifact;
pub mod causal_lm;
pub mod metrics;
pub mod optim;
pub mod trainer;

pub use causal_lm::{generate_texts, generation_metrics, CausalLmTask, LmExample};
pub use metrics::{classification_metrics, ClassificationMetrics};
pub use trainer::{
    evaluate, predict_proba, train, train_task, ClassificationTask, DevScore, Encoded, EpochRecord,
    Examples, Labelled, StepEval, Task, TrainConfig, TrainReport,
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
}

/// The result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
