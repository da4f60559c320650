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
    let clf = session::load_classifier(adapter, model)?;
    let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    let probs = clf.predict(&refs, 64)?;
    for (text, p) in all.iter().zip(probs) {
        let (best, prob) =
            p.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let label = clf.labels().label(best as u32).unwrap_or("?");
        if json {
            println!(
                "{}",
                serde_json::json!({"text": text, "label": label, "probability": prob, "probabilities": p})
            );
        } else {
            println!("{label}\t{prob:.4}\t{text}");
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
