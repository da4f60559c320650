//! `deltatune subspace fit`: the learned intrinsic subspace (Qin et al. 2021) from several
//! trained prompt-tuning adapters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use deltatune_methods::intrinsic::fit_subspace;
use deltatune_methods::DeltaConfig;
use deltatune_train::artifact::{check_output_file, OutputRules};
use deltatune_train::artifact::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// The soft prompt [P, hidden] of a prompt-tuning adapter folder.
fn prompt_of(dir: &Path) -> Result<(Tensor, Option<String>)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {} (each source must be an adapter folder written by `deltatune train --method prompt`)",
            cfg_path.display()
        )
    })?;
    let cfg = DeltaConfig::from_json(serde_json::from_str(&text)?)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let DeltaConfig::Prompt(p) = cfg else {
        bail!(
            "{} is a `{}` adapter; a subspace is fitted from prompt-tuning adapters (--method prompt)",
            dir.display(),
            cfg.name()
        );
    };
    let wpath = dir.join(ADAPTER_WEIGHTS);
    let w = deltatune_core::Weights::load(&wpath, DType::F32)?;
    let t = w
        .tensors()
        .find(|(k, _)| *k == "prompt_embeddings")
        .map(|(_, t)| t.clone())
        .with_context(|| format!("{} has no `prompt_embeddings` tensor", wpath.display()))?;
    Ok((t, p.common.base_model_name_or_path))
}

/// Fits a `dim`-dimensional subspace (PCA) to the prompts of `adapters` and writes it to `out`;
/// with `origin` (a prompt-tuning adapter), around that adapter's prompt instead of the mean.
pub fn fit(
    adapters: &[PathBuf],
    dim: usize,
    origin: Option<&Path>,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let mut rules = OutputRules::new("--output", overwrite);
    for a in adapters.iter().map(PathBuf::as_path).chain(origin) {
        rules = rules.input("the adapter", a);
    }
    check_output_file(out, &rules, false)?;
    if adapters.len() < 2 {
        bail!(
            "`subspace fit` needs at least 2 prompt-tuning adapters (got {}); the subspace \
             dimension can be at most their number minus one",
            adapters.len()
        );
    }
    // The sources, then the origin if any: all must come from one base model.
    let mut prompts = Vec::new();
    let mut base: Option<String> = None;
    for dir in adapters.iter().map(PathBuf::as_path).chain(origin) {
        let (t, b) = prompt_of(dir)?;
        if let (Some(first), Some(this)) = (&base, &b) {
            if first != this {
                bail!(
                    "{} was trained on {this} but the first source on {first}: a subspace is \
                     fitted for one base model",
                    dir.display()
                );
            }
        }
        base = base.or(b);
        prompts.push(t);
    }
    let origin = if origin.is_some() {
        prompts.pop()
    } else {
        None
    };
    let s = fit_subspace(&prompts, dim, origin.as_ref())?;
    // How much of each prompt's deviation from p0 (the mean, or the origin) the subspace keeps.
    let mut kept = Vec::new();
    for p in &prompts {
        let dev = (p - &s.p0)?;
        let rec = (s.decode(&s.project(p)?)? - &s.p0)?;
        let num: f32 = (&dev - &rec)?.sqr()?.sum_all()?.to_scalar()?;
        let den: f32 = dev.sqr()?.sum_all()?.to_scalar()?;
        kept.push(1.0 - num / den.max(1e-30));
    }
    if let Some(dir) = out.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    s.save(out)?;
    println!(
        "subspace of dimension {dim} fitted to {} prompts of shape {:?}; share of each prompt's \
         deviation from {} kept: {}",
        prompts.len(),
        s.p0.dims(),
        if origin.is_some() {
            "the origin"
        } else {
            "the mean"
        },
        kept.iter()
            .map(|k| format!("{k:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "written to {} (train on it with --method intrinsic --set intrinsic.subspace={} --set \
         intrinsic.intrinsic_dim={dim} --set intrinsic.num_virtual_tokens={})",
        out.display(),
        out.display(),
        s.p0.dims()[0]
    );
    Ok(())
}

/// `subspace random`: a random dense subspace of dimension `dim` around the prompt of the
/// adapter `origin` (the random counterpart of a subspace fitted with `--origin`).
pub fn random(origin: &Path, dim: usize, seed: u64, out: &Path, overwrite: bool) -> Result<()> {
    check_output_file(
        out,
        &OutputRules::new("--output", overwrite).input("--origin", origin),
        false,
    )?;
    let (p, _) = prompt_of(origin)?;
    let s = deltatune_methods::intrinsic::Subspace::random_around(&p, dim, seed)?;
    if let Some(dir) = out.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    s.save(out)?;
    println!(
        "random subspace of dimension {dim} (seed {seed}) around the prompt of {} written to {}",
        origin.display(),
        out.display()
    );
    Ok(())
}
