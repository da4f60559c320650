//! One function per subcommand.

pub mod auto;
mod bench;
pub mod experiment;
mod fetch;
mod inspect;
pub mod lm;
mod merge;
mod predict;
pub mod resume;
pub mod search;
pub mod study;
pub mod subspace;
mod train;

pub use bench::{bench, bench_decoder};
pub use fetch::fetch;
pub use inspect::inspect;
pub use merge::merge;
pub use predict::{eval, predict};
pub use train::train;

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
