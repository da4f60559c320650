//! One function per subcommand.

pub mod auto;
mod bench;
mod convert;
pub mod experiment;
mod fetch;
pub mod image;
mod inspect;
pub mod lm;
pub mod merge;
mod predict;
pub mod resume;
pub mod search;
pub mod serve;
pub mod study;
pub mod subspace;
mod train;

pub use bench::{bench, bench_decoder};
pub use convert::convert;
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

/// The output rules of a run writing `s.output`: its data files, model folder (when given as a
/// path) and subspace are inputs.
pub fn run_output_rules(s: &crate::settings::Settings) -> deltatune_train::artifact::OutputRules {
    let model = std::path::Path::new(&s.model);
    let mut rules = deltatune_train::artifact::OutputRules::new("--output", s.overwrite);
    for (what, p) in [
        ("data.train", &s.data.train),
        ("data.dev", &s.data.dev),
        ("data.test", &s.data.test),
    ] {
        if let Some(p) = p {
            rules = rules.input(what, p);
        }
    }
    if model.exists() {
        rules = rules.input("the model", model);
    }
    if let Some(sub) = &s.intrinsic.subspace {
        rules = rules.input("intrinsic.subspace", sub);
    }
    rules
}

/// Checks, before any long work, that `path` can be written later: a folder (`folder`) that
/// exists or can be created, or a file whose folder can be created and is writable, and that is
/// not a folder itself. `what` names it in the error (`--report`, `the output folder`).
pub fn check_writable(path: &std::path::Path, what: &str, folder: bool) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let dir = if folder {
        if path.exists() && !path.is_dir() {
            bail!("{what} {} exists and is not a folder", path.display());
        }
        path.to_path_buf()
    } else {
        if path.is_dir() {
            bail!(
                "{what} {} is a folder; give a file name (e.g. {}/report.html)",
                path.display(),
                path.display()
            );
        }
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf()
    };
    if dir.exists() && !dir.is_dir() {
        bail!("{what}: {} is a file, not a folder", dir.display());
    }
    let existed = dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "{what}: cannot create the folder {}; choose a writable path",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".deltatune-write-probe-{}", std::process::id()));
    let res = std::fs::write(&probe, b"");
    let _ = std::fs::remove_file(&probe);
    if !existed {
        // Leave no empty folder behind: the command creates it again when it writes.
        let _ = std::fs::remove_dir(&dir);
    }
    res.with_context(|| format!("{what}: {} is not writable", dir.display()))
}
