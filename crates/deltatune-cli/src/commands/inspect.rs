use anyhow::Result;
use deltatune_core::HasSites;

use crate::session;
use crate::settings::Settings;

/// `deltatune inspect`: the module tree with parameter counts, and where the delta attaches.
pub fn inspect(s: &Settings) -> Result<()> {
    let dir = session::model_dir(&s.model, &s.cache)?;
    let mut loaded = session::load_model(&dir, 2, s.pooling, s.data.max_length, s.train.seed)?;
    let sites = loaded.model.sites();
    let trainables = session::attach(&mut loaded, s)?;
    println!("model {} ({})", dir.display(), loaded.model.param_count());
    println!("{:<58} {:<16} {:>10}  delta", "site", "kind", "params");
    for site in &sites {
        let mut attached: Vec<String> = trainables
            .iter()
            .filter(|t| {
                t.key
                    .strip_prefix(deltatune_methods::PEFT_PREFIX)
                    .and_then(|k| k.strip_prefix(site.path.as_str()))
                    .is_some_and(|rest| rest.starts_with('.') && rest[1..].split('.').count() <= 2)
            })
            .map(|t| {
                format!(
                    "{} {:?}",
                    t.key
                        .rsplit('.')
                        .take(2)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("."),
                    t.var.dims()
                )
            })
            .collect();
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
    let n_train: usize = trainables.iter().map(|t| t.var.elem_count()).sum();
    let n_base: usize = loaded.model.param_count();
    // Trainable tensors that replace base parameters (head, biases) are not frozen.
    let base_trainable: usize = trainables
        .iter()
        .filter(|t| !t.key.contains(".lora_"))
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
