use std::path::Path;

use anyhow::{bail, Context, Result};
use deltatune_data::text::load_examples;

use crate::session;

/// `deltatune predict`.
pub fn predict(
    adapter: &Path,
    model: Option<&str>,
    file: Option<&Path>,
    texts: &[String],
    json: bool,
) -> Result<()> {
    let mut all: Vec<String> = texts.to_vec();
    if let Some(f) = file {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not valid UTF-8 (byte {}); convert it to UTF-8",
                f.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        all.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if all.is_empty() {
        bail!("no texts to predict: give them as arguments or with --file (one per line)");
    }
    let clf = match model {
        Some(m) => deltatune::Adapter::load_on(adapter, m)?,
        None => deltatune::Adapter::load(adapter)?,
    };
    let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    for (text, p) in all.iter().zip(clf.predict(&refs)?) {
        if json {
            println!(
                "{}",
                serde_json::json!({"text": text, "label": p.label, "probability": p.probability, "probabilities": p.probabilities})
            );
        } else {
            println!("{}\t{:.4}\t{text}", p.label, p.probability);
        }
    }
    Ok(())
}

/// `deltatune eval`.
pub fn eval(adapter: &Path, data: Option<&Path>, batch_size: usize) -> Result<()> {
    let clf = session::load_classifier(adapter, None)?;
    let path = match data {
        Some(p) => p.to_path_buf(),
        None => clf
            .run()
            .data_files
            .get("test")
            .cloned()
            .context("the run had no test file: give one with --data")?,
    };
    let d = &clf.run().settings.data;
    let examples = load_examples(&path, &d.text_column, &d.label_column)?;
    let m = clf.evaluate(&examples, batch_size)?;
    println!(
        "{}: {} examples, accuracy {:.4}, macro-F1 {:.4}",
        path.display(),
        m.n,
        m.accuracy,
        m.macro_f1
    );
    Ok(())
}
