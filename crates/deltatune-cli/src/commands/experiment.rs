//! `deltatune experiment methods`: trains every delta method on the same data with its preset
//! settings, each in its own process (so peak memory is per method), and writes a results table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Preset per method: extra `train` arguments (learning rates as in `shared/reference`'s PEFT
/// runs where PEFT has the method).
pub const PRESETS: &[(&str, &str, &[&str])] = &[
    (
        "lora",
        "r 8, alpha 16, dropout 0.1, query+value, lr 5e-4",
        &["--lr", "5e-4"],
    ),
    (
        "ia3",
        "key, value, output.dense (feed-forward: output.dense), lr 3e-3",
        &["--lr", "3e-3"],
    ),
    (
        "bitfit",
        "all biases (linear + LayerNorm) + head, lr 1e-3",
        &["--lr", "1e-3"],
    ),
    (
        "prompt",
        "20 virtual tokens after CLS, random init, lr 3e-2",
        &["--lr", "3e-2"],
    ),
    (
        "prefix",
        "20 virtual tokens, no projection, lr 1e-2",
        &["--lr", "1e-2"],
    ),
    (
        "adapter",
        "Houlsby, reduction factor 16, relu, lr 1e-3",
        &["--lr", "1e-3"],
    ),
    (
        "intrinsic",
        "z of d = 32 through a dense random subspace, 20 tokens, lr 5e-2",
        &["--lr", "5e-2"],
    ),
];

/// Runs the listed methods (all when empty) and writes `table` (Markdown) and a JSON beside it.
pub fn methods(only: &[String], epochs: Option<usize>, runs: &Path, table: &Path) -> Result<()> {
    for m in only {
        if !PRESETS.iter().any(|(n, _, _)| n == m) {
            bail!(
                "unknown method `{m}` (available: {})",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let exe = std::env::current_exe().context("finding the deltatune binary")?;
    let mut rows = Vec::new();
    for (name, settings, args) in PRESETS {
        if !only.is_empty() && !only.iter().any(|m| m == name) {
            continue;
        }
        let out = runs.join(name);
        eprintln!("== {name}: {settings}");
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .arg("--method")
            .arg(name)
            .arg("--output")
            .arg(&out)
            .args(*args);
        if let Some(e) = epochs {
            cmd.arg("--epochs").arg(e.to_string());
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            bail!("training {name} failed ({status})");
        }
        let res: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("results.json"))
                .with_context(|| format!("reading {}", out.display()))?,
        )?;
        rows.push((name.to_string(), settings.to_string(), res));
    }
    write_table(&rows, epochs, table)
}

fn write_table(
    rows: &[(String, String, serde_json::Value)],
    epochs: Option<usize>,
    table: &Path,
) -> Result<()> {
    let mut md = String::new();
    md.push_str(
        "| method | settings | trainable params | % of model | dev acc | test acc | s / epoch | peak RSS |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (name, settings, r) in rows {
        let tp = r["trainable_params"].as_u64().unwrap_or(0);
        let base = r["base_params"].as_u64().unwrap_or(1).max(1);
        md.push_str(&format!(
            "| {name} | {settings} | {tp} | {:.3}% | {:.3} | {:.3} | {:.0} | {:.2} GB |\n",
            100.0 * tp as f64 / base as f64,
            r["dev"]["accuracy"].as_f64().unwrap_or(f64::NAN),
            r["test"]["accuracy"].as_f64().unwrap_or(f64::NAN),
            r["mean_train_seconds_per_epoch"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["peak_rss_mib"].as_f64().unwrap_or(f64::NAN) * 1.048_576 / 1000.0,
        ));
    }
    md.push_str(&format!(
        "\nall-MiniLM-L6-v2 on Rotten Tomatoes (train 10,081 / dev 1,328 / test 1,343), batch 32, {} epochs, \
         linear decay with 6% warm-up, seed 42, 2 threads; written by `deltatune experiment methods`.\n",
        epochs.map_or("3".to_string(), |e| e.to_string())
    ));
    if let Some(dir) = table.parent() {
        std::fs::create_dir_all(dir)?;
    }
    deltatune_core::write_atomic(table, md.as_bytes())?;
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|(n, s, r)| serde_json::json!({"method": n, "settings": s, "results": r}))
        .collect();
    deltatune_core::write_atomic(
        &table.with_extension("json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    println!("{md}");
    println!("table written to {}", table.display());
    Ok(())
}

/// Default locations.
pub fn default_paths() -> (PathBuf, PathBuf) {
    (
        PathBuf::from("runs/experiment-methods"),
        PathBuf::from("docs/methods.md"),
    )
}
