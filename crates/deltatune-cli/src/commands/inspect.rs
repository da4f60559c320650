use std::collections::BTreeMap;

use anyhow::Result;
use deltatune_core::HasSites;
use deltatune_methods::{DeltaConfig, Trainable, PEFT_PREFIX};

use crate::session;
use crate::settings::Settings;

/// The member a trainable belongs to and its key without the member's namespace.
fn member_of<'a>(t: &'a Trainable, delta: &DeltaConfig) -> (String, &'a str) {
    if delta.members().is_empty() {
        return (delta.name().to_string(), &t.key);
    }
    if let Some(rest) = t.key.strip_prefix("gates.") {
        let m = rest.split('.').next().unwrap_or("");
        return (format!("gate({m})"), &t.key);
    }
    for d in delta.members() {
        if let Some(rest) = t
            .key
            .strip_prefix(d.name())
            .and_then(|r| r.strip_prefix('.'))
        {
            return (d.name().to_string(), rest);
        }
    }
    ("head".to_string(), &t.key)
}

/// `deltatune inspect`: the module tree with parameter counts, and where each delta attaches.
pub fn inspect(s: &Settings) -> Result<()> {
    if s.task == "generate" {
        let mut d = super::lm::load(&s.model, &s.cache)?;
        let sites = d.model.sites();
        let (trainables, _) = super::lm::attach(&mut d, s)?;
        return report(
            s,
            &d.source.display().to_string(),
            &d.model,
            &sites,
            &trainables,
        );
    }
    if s.task == "image" {
        let dir = super::image::model_dir(&s.model, &s.cache)?;
        let mut model =
            deltatune_models::VitClassifier::load(&dir, 10, &mut deltatune_core::Rng::new(0))?;
        let sites = model.sites();
        let delta = s.delta();
        let trainables = delta.attach(
            &mut model,
            &deltatune_core::Rng::new(s.train.seed).derive(delta.name()),
            None,
        )?;
        return report(s, &dir.display().to_string(), &model, &sites, &trainables);
    }
    let dir = session::model_dir(&s.model, &s.cache)?;
    let mut loaded = session::load_model(&dir, 2, s.pooling, s.data.max_length, s.train.seed)?;
    let sites = loaded.model.sites();
    let trainables = session::attach(&mut loaded, s)?;
    report(
        s,
        &dir.display().to_string(),
        &loaded.model,
        &sites,
        &trainables,
    )
}

/// Prints the sites of `model` with what `trainables` attach there, and the counts.
fn report(
    s: &Settings,
    source: &str,
    model: &dyn HasSites,
    sites: &[deltatune_core::SiteInfo],
    trainables: &[Trainable],
) -> Result<()> {
    let delta = s.delta();
    println!("model {source} ({})", model.param_count());
    println!("{:<58} {:<16} {:>10}  delta", "site", "kind", "params");
    let mut placed = vec![false; trainables.len()];
    for site in sites {
        let mut attached: Vec<String> = Vec::new();
        // A sub-layer output site (`...output.LayerNorm`) holds the adapters of that sub-layer
        // (`...output.adapter.*`).
        // A decoder's sub-layer site (`model.layers.3.mlp`) holds its adapter directly.
        let adapter_base = if site.kind == deltatune_core::SiteKind::SublayerOutput {
            Some(site.path.strip_suffix(".LayerNorm").unwrap_or(&site.path))
        } else {
            None
        };
        for (i, t) in trainables.iter().enumerate() {
            let (member, key) = member_of(t, &delta);
            let Some(k) = key.strip_prefix(PEFT_PREFIX) else {
                continue;
            };
            let rest = match k.strip_prefix(site.path.as_str()) {
                Some(r) if r.starts_with('.') && r[1..].split('.').count() <= 2 => Some(&r[1..]),
                _ => adapter_base
                    .and_then(|b| k.strip_prefix(b))
                    .filter(|r| r.starts_with(".adapter."))
                    .map(|r| &r[1..]),
            };
            if let Some(rest) = rest {
                placed[i] = true;
                attached.push(format!("{member}:{rest} {:?}", t.var.dims()));
            }
        }
        attached.sort();
        let kind = serde_json::to_value(site.kind)?;
        println!(
            "{:<58} {:<16} {:>10}  {}",
            site.path,
            kind.as_str().unwrap_or(""),
            site.params,
            attached.join(", ")
        );
    }
    let others: Vec<String> = trainables
        .iter()
        .zip(&placed)
        .filter(|(_, p)| !**p)
        .map(|(t, _)| {
            let (member, key) = member_of(t, &delta);
            format!("  {member}: {key} {:?}", t.var.dims())
        })
        .collect();
    if !others.is_empty() {
        println!("\nnot tied to one site (prompts, prefix tables, adapters, gates):");
        for o in others {
            println!("{o}");
        }
    }
    let mut per_member: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in trainables {
        let e = per_member.entry(member_of(t, &delta).0).or_default();
        e.0 += t.var.elem_count();
        e.1 += 1;
    }
    let n_train: usize = trainables.iter().map(|t| t.var.elem_count()).sum();
    let n_base: usize = model.param_count();
    println!("\ntrainable parameters by delta:");
    for (m, (n, k)) in &per_member {
        println!("  {m:<16} {n:>10} in {k} tensors");
    }
    if let Some(why) = delta.merge_blocker() {
        println!("merge: not possible ({why})");
    } else {
        println!("merge: possible (`deltatune merge` folds the delta into the weights)");
    }
    // Trainable tensors that replace base parameters (head, biases) are not frozen.
    let base_trainable: usize = trainables
        .iter()
        .filter(|t| {
            let (m, k) = member_of(t, &delta);
            m == "head"
                || (m == "bitfit")
                || k.ends_with("classifier.weight")
                || k.ends_with("classifier.bias")
        })
        .map(|t| t.var.elem_count())
        .sum();
    println!(
        "\ndelta `{}`: {} trainable parameters ({:.3}% of {}), {} frozen",
        s.method,
        n_train,
        100.0 * n_train as f64 / n_base as f64,
        n_base,
        n_base - base_trainable.min(n_base)
    );
    Ok(())
}
