//! The error type of the library crates: every variant carries the evidence (file, key, shape)
//! and, where there is one, the fix.

use std::path::PathBuf;

/// Errors raised while loading models, attaching deltas and running the ops layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The disk filled up while writing `path`; whatever was there before is unchanged.
    #[error(
        "no space left on the device writing {path} ({bytes} bytes needed, {free} free); \
         the previous file is intact: free some space (or point the output elsewhere) and run again"
    )]
    DiskFull {
        path: PathBuf,
        bytes: u64,
        free: String,
    },

    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A required file is missing.
    #[error("missing file {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },

    /// A configuration file could not be parsed or is inconsistent.
    #[error("malformed config {path}: {msg}")]
    MalformedConfig { path: PathBuf, msg: String },

    /// A weights file is unreadable (truncated, corrupt header, ...).
    #[error("cannot read weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// A tensor holds NaN or infinite values (see [`crate::finite`]).
    #[error("tensor `{key}` in {path} holds {found}: {hint}")]
    NonFinite {
        path: PathBuf,
        key: String,
        found: String,
        hint: String,
    },

    /// A tensor the model needs is not in the weights file.
    #[error("tensor `{key}` not found in {path} (closest keys: {nearest})")]
    MissingTensor {
        key: String,
        path: PathBuf,
        nearest: String,
    },

    /// A tensor has another shape than the config implies.
    #[error(
        "tensor `{key}` in {path} has shape {actual:?} but the config implies {expected:?}{hint}"
    )]
    ShapeMismatch {
        key: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
        hint: String,
    },

    /// A target pattern selected no module.
    #[error("target `{pattern}` matches no module of the model; closest module names: {nearest}")]
    NoMatch { pattern: String, nearest: String },

    /// A configuration value is outside its allowed range.
    #[error("invalid value for `{field}`: {msg}")]
    InvalidConfig { field: String, msg: String },

    /// Anything else, with its explanation.
    #[error("{0}")]
    Msg(String),
}

/// The result alias of the library crates.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Returns early with an [`Error::Msg`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Msg(format!($($arg)*)))
    };
}

/// The `n` names of `candidates` closest to `target` (by edit distance), comma separated.
pub fn nearest_names<'a>(
    target: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    n: usize,
) -> String {
    // Edit distance is quadratic: a 65,000-character key from a corrupt file took seconds
    // (found by deltatune-fuzz). A name that long is no typo of a real one; its first 256
    // characters rank the candidates just as well.
    let target = match target.char_indices().nth(256) {
        Some((cut, _)) => &target[..cut],
        None => target,
    };
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (edit_distance(target, c).min(suffix_distance(target, c)), c))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    let names: Vec<&str> = scored.into_iter().take(n).map(|(_, c)| c).collect();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// Distance between `target` and the last dotted components of `candidate` with as many parts.
fn suffix_distance(target: &str, candidate: &str) -> usize {
    let parts = target.split('.').count();
    let cparts: Vec<&str> = candidate.split('.').collect();
    let start = cparts.len().saturating_sub(parts);
    edit_distance(target, &cparts[start..].join("."))
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}
