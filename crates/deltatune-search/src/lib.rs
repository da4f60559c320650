//! deltatune-search: hyperparameter search over delta methods and their settings.
//!
//! - [`space`]: search spaces in TOML (method choice, conditional per-method parameters,
//!   shared training parameters);
//! - [`sampler`]: random and TPE samplers, reproducible from a seed;
//! - [`pruner`]: median and ASHA pruners fed by intermediate dev metrics;
//! - [`storage`]: studies in SQLite (default) or PostgreSQL behind one trait, with atomic
//!   claims, heartbeats, and retries of trials whose worker died;
//! - [`worker`]: the loop every worker runs.

pub mod auto;
pub mod pruner;
pub mod sampler;
pub mod space;
pub mod storage;
pub mod worker;

/// Errors of the search, each naming what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("search space: {0}")]
    Space(String),
    #[error("study store: {0}")]
    Store(String),
    #[error("{0}")]
    Objective(String),
}

pub type Result<T> = std::result::Result<T, Error>;
