//! `deltatune auto`: chooses the delta method for a task within a time budget: task features,
//! a prior from the documented rules (deltatune_search::auto), successive halving across the
//! methods on measured dev accuracy, then the winner trained to the end; a report explains it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deltatune_core::HasSites;
use deltatune_data::text::LabelMap;
use deltatune_search::auto::{
    contenders, prior, refine, Candidate, PastResult, Plan, TaskFeatures, AUTO_SAMPLER,
    CONTENDER_MARGIN,
};
use deltatune_search::space::Direction;
use deltatune_search::storage::{self, StudyRow, StudyStore};
use serde::Serialize;

use crate::session;
use crate::settings::Settings;

/// Parses `90s`, `30m`, `1h`, `1h30m` or plain seconds.
pub fn parse_budget(s: &str) -> Result<f64> {
    let mut total = 0.0;
    let mut num = String::new();
    for ch in s.trim().chars() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let v: f64 = num
            .parse()
            .with_context(|| format!("budget `{s}`: expected e.g. 30m, 90s, 1h30m"))?;
        total += v * match ch {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            _ => bail!("budget `{s}`: unknown unit `{ch}` (use s, m or h)"),
        };
        num.clear();
    }
    if !num.is_empty() {
        total += num
            .parse::<f64>()
            .with_context(|| format!("budget `{s}`: expected e.g. 30m, 90s, 1h30m"))?;
    }
    if total <= 0.0 {
        bail!("budget `{s}` must be positive");
    }
    Ok(total)
}

#[derive(Debug, Clone, Serialize)]
struct RungResult {
    rung: usize,
    method: String,
    steps: usize,
    dev_accuracy: f64,
    dev_macro_f1: f64,
    seconds: f64,
}

fn train_run(
    exe: &Path,
    base: &[String],
    c: &Candidate,
    out: &Path,
    extra: &[(String, String)],
    overwrite: bool,
) -> Result<(serde_json::Value, f64)> {
    let t = Instant::now();
    let command = |resume: bool| {
        let mut cmd = Command::new(exe);
        cmd.arg("train").args(base).arg("--no-progress");
        if resume {
            cmd.arg("--resume").arg(out);
        } else {
            cmd.arg("--output").arg(out);
        }
        if overwrite {
            cmd.arg("--overwrite");
        }
        cmd.arg("--method").arg(&c.method);
        for (k, v) in c.settings.iter().chain(extra) {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        cmd
    };
    let ck = super::resume::checkpoint_dir(out);
    let mut o = None;
    if ck.join(super::resume::SETTINGS_FILE).exists() {
        // An earlier auto run was stopped during this rung: continue it when its settings are
        // the same (a resumed run refuses any other), else start it over.
        let r = command(true)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if r.status.success() {
            o = Some(r);
        } else {
            let _ = std::fs::remove_dir_all(&ck);
        }
    }
    let o = match o {
        Some(o) => o,
        None => command(false)
            .output()
            .with_context(|| format!("running {}", exe.display()))?,
    };
    if !o.status.success() {
        bail!(
            "training {} failed:\n{}",
            c.method,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let res: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json"))
            .with_context(|| format!("reading {}", out.join("results.json").display()))?,
    )?;
    Ok((res, t.elapsed().as_secs_f64()))
}

/// The task features of a classification run, and its data files.
fn classification_features(
    s: &Settings,
) -> Result<(TaskFeatures, std::collections::BTreeMap<String, PathBuf>)> {
    let model_dir = session::model_dir(&s.model, &s.cache)?;
    let splits = session::load_splits(s)?;
    let labels = LabelMap::from_train(&splits.train);
    let loaded = session::load_model(
        &model_dir,
        labels.len(),
        s.pooling,
        s.data.max_length,
        s.train.seed,
    )?;
    let texts: Vec<&str> = splits.train.iter().map(|e| e.text.as_str()).collect();
    let ids = loaded.tokenizer.encode_batch(&texts)?;
    let lens: Vec<usize> = ids.iter().map(|x| x.len()).collect();
    let mut per_label = std::collections::BTreeMap::<&str, usize>::new();
    for e in &splits.train {
        *per_label.entry(e.label.as_str()).or_default() += 1;
    }
    let n = splits.train.len();
    let features = TaskFeatures {
        task: "classify".into(),
        mean_output_tokens: 0.0,
        train_examples: n,
        labels: labels.len(),
        mean_tokens: lens.iter().sum::<usize>() as f64 / n.max(1) as f64,
        max_tokens: lens.iter().copied().max().unwrap_or(0),
        min_label_share: per_label.values().copied().min().unwrap_or(0) as f64 / n.max(1) as f64,
        model_params: loaded.model.param_count(),
        model_layers: loaded.model.num_layers(),
        hidden: loaded.model.hidden_size(),
    };
    drop(loaded);
    Ok((features, splits.files))
}

/// `deltatune auto`. `base` are the flags given for data and model (passed to every run).
pub fn auto(
    s: &Settings,
    base: &[String],
    budget: f64,
    report: Option<&Path>,
    storage_url: &str,
    max_candidates: Option<usize>,
) -> Result<()> {
    let started = Instant::now();
    if max_candidates == Some(0) {
        bail!("--candidates 0: auto needs at least one method to train (e.g. --candidates 3)");
    }
    // Every path auto writes, checked before the budget is spent.
    let report_path = report
        .map(Path::to_path_buf)
        .unwrap_or_else(|| s.output.join("auto-report.html"));
    let rules = super::run_output_rules(s);
    if report.is_some() {
        let report_rules = deltatune_train::artifact::OutputRules {
            flag: "--report".into(),
            ..rules.clone()
        };
        deltatune_train::artifact::check_output_file(&report_path, &report_rules, true)?;
    }
    deltatune_train::artifact::check_output_folder(&s.output, &rules)?;
    super::check_writable(&report_path, "the report (--report)", false)?;
    super::check_writable(
        &s.output.with_extension("auto-runs"),
        "the rungs' folder",
        true,
    )?;
    let exe = std::env::current_exe().context("finding the deltatune binary")?;
    let (features, data_files) = if s.task == "generate" {
        super::lm::task_features(s)?
    } else {
        classification_features(s)?
    };
    let n = features.train_examples;
    let mut candidates = prior(&features);
    // Past auto runs in the store refine the prior.
    let mut store = storage::open(storage_url)?;
    let mut past = Vec::new();
    for st in store
        .studies()?
        .into_iter()
        .filter(|st| st.sampler == AUTO_SAMPLER)
    {
        // auto records the task's features as the study's space.
        let past_features: Option<TaskFeatures> = serde_json::from_str(&st.space).ok();
        for t in store.trials(st.id)? {
            if t.params.get("rung") == Some(&serde_json::Value::from(0)) {
                if let (Some(m), Some(v)) =
                    (t.params.get("method").and_then(|m| m.as_str()), t.value)
                {
                    past.push(PastResult {
                        study: st.name.clone(),
                        method: m.to_string(),
                        value: v,
                        features: past_features.clone(),
                    });
                }
            }
        }
    }
    refine(&mut candidates, &past, &features);
    let (study, _) = store.create_or_resume(&StudyRow {
        id: 0,
        name: format!(
            "auto-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ),
        direction: Direction::Maximize,
        space: serde_json::to_string(&features)?,
        n_trials: 0,
        sampler: AUTO_SAMPLER.into(),
        pruner: "successive-halving".into(),
        seed: s.train.seed,
    })?;
    let mut record =
        |c: &Candidate, rung: serde_json::Value, steps: usize, value: f64| -> Result<()> {
            let mut p: deltatune_search::space::Params = c
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                .collect();
            p.insert("method".into(), c.method.clone().into());
            p.insert("rung".into(), rung);
            p.insert("steps".into(), steps.into());
            Ok(store.record(study.id, &p, value, &[])?)
        };
    eprintln!(
        "task: {} training examples, {} labels, {:.0} tokens on average (max {}), rarest label {:.0}%; \
         model {:.1}M parameters, {} layers",
        features.train_examples,
        features.labels,
        features.mean_tokens,
        features.max_tokens,
        100.0 * features.min_label_share,
        features.model_params as f64 / 1e6,
        features.model_layers
    );
    for c in &candidates {
        eprintln!(
            "  prior {:<8} {:.2}  ({})",
            c.method,
            c.score,
            c.reasons.join("; ")
        );
    }
    let work = s.output.with_extension("auto-runs");
    let steps_per_epoch = n.div_ceil(s.train.batch_size);
    let full_steps = s.train.epochs * steps_per_epoch;
    // Rungs select on dev only: with the default data they are given the train and dev files
    // explicitly, so they skip the Rotten Tomatoes test set (evaluated by the final run only).
    let mut rung_data = Vec::new();
    if s.data.train.is_none() && s.data.test.is_none() {
        for split in ["train", "dev"] {
            if let Some(f) = data_files.get(split) {
                rung_data.push((format!("data.{split}"), f.display().to_string()));
            }
        }
    }
    // Calibration: a few steps of the top candidate give the cost of a step and of a run's
    // fixed part (loading, evaluation). The first steps of a run are the slowest (buffers
    // grow), so it takes 16 (measured on Rotten Tomatoes in one session: 1.01 s a step over 4
    // steps, 0.80 over 16, 0.78 over a whole epoch); the estimate stays on the safe side.
    let calib_steps = 16.min(steps_per_epoch).max(1);
    let mut calib = rung_data.clone();
    calib.push(("train.max_steps".into(), calib_steps.to_string()));
    calib.push(("train.epochs".into(), "1".into()));
    let (res, secs) = train_run(
        &exe,
        base,
        &candidates[0],
        &work.join("calibration"),
        &calib,
        true,
    )?;
    let train_secs = res["mean_train_seconds_per_epoch"].as_f64().unwrap_or(secs);
    let step_seconds = (train_secs / calib_steps as f64).max(1e-3);
    let fixed = (secs - train_secs).max(0.0);
    let remaining = budget - started.elapsed().as_secs_f64();
    // The winner's full training (train.epochs, a dev evaluation each epoch) is reserved
    // first, with 10% to spare; the halving gets the rest.
    let final_cost = |step: f64| full_steps as f64 * step + fixed * (1 + s.train.epochs) as f64;
    // A finished rung's cost per step, its fixed part taken off.
    let step_cost = |r: &RungResult| (r.seconds - fixed).max(0.0) / r.steps as f64;
    let final_reserve = 1.1 * final_cost(step_seconds);
    let halving_secs = (remaining - final_reserve).max(0.0);
    let max_n = contenders(&candidates, max_candidates);
    // A first rung shorter than half an epoch measured nothing on Rotten Tomatoes (49 steps:
    // every method still at the majority class), so the plan tries fewer methods instead.
    let min_steps = (steps_per_epoch / 2).max(10);
    let plan = Plan::fit(
        max_n,
        halving_secs,
        step_seconds,
        fixed,
        min_steps,
        full_steps,
    );
    let not_tried: Vec<serde_json::Value> = candidates
        .iter()
        .enumerate()
        .skip(plan.candidates)
        .map(|(i, c)| {
            let reason = if i >= max_n {
                match max_candidates {
                    Some(k) => format!("--candidates {k}"),
                    None => format!(
                        "prior {:.2}, more than {CONTENDER_MARGIN} below the best ({:.2})",
                        c.score, candidates[0].score
                    ),
                }
            } else {
                format!(
                    "the budget gives {} methods first rungs of at least {min_steps} steps \
                     (half an epoch), not {}",
                    plan.candidates, max_n
                )
            };
            serde_json::json!({"method": c.method, "score": c.score, "reason": reason})
        })
        .collect();
    eprintln!(
        "budget {:.0} s: a step costs {:.2} s, a run's fixed part {:.0} s; {:.0} s kept for the \
         winner's {} epochs; halving rungs {:?} (methods, steps)",
        budget, step_seconds, fixed, final_reserve, s.train.epochs, plan.rungs
    );
    for x in &not_tried {
        eprintln!(
            "  not tried: {} ({})",
            x["method"].as_str().unwrap_or(""),
            x["reason"].as_str().unwrap_or("")
        );
    }
    let mut alive: Vec<Candidate> = candidates[..plan.candidates].to_vec();
    let mut results: Vec<RungResult> = Vec::new();
    let mut stopped_early = None;
    for (k, &(m, steps)) in plan.rungs.iter().enumerate() {
        if k > 0 {
            // Re-plan with the step cost the rungs measured: a rung that would eat into the
            // winner's full training is not run, and the best so far wins.
            let measured = results.iter().map(step_cost).sum::<f64>() / results.len() as f64;
            let need = m as f64 * (steps as f64 * measured + fixed) + final_cost(measured);
            let left = budget - started.elapsed().as_secs_f64();
            if need > left {
                let why = format!(
                    "rung {k} ({m} methods x {steps} steps) and the winner's training need \
                     {need:.0} s at the measured {measured:.2} s a step; {left:.0} s are left"
                );
                eprintln!("  halving stops: {why}");
                stopped_early = Some(why);
                break;
            }
        }
        alive.truncate(m);
        let mut scored = Vec::new();
        for c in &alive {
            // A rung is the first `steps` of the run the winner will get (same schedule).
            let mut extra = rung_data.clone();
            extra.push(("train.max_steps".into(), steps.to_string()));
            extra.push(("train.epochs".into(), s.train.epochs.to_string()));
            let (res, secs) = train_run(
                &exe,
                base,
                c,
                &work.join(format!("rung{k}-{}", c.method)),
                &extra,
                true,
            )?;
            let r = RungResult {
                rung: k,
                method: c.method.clone(),
                steps,
                dev_accuracy: res["dev"]["accuracy"].as_f64().unwrap_or(f64::NAN),
                dev_macro_f1: res["dev"]["macro_f1"].as_f64().unwrap_or(f64::NAN),
                seconds: secs,
            };
            eprintln!(
                "  rung {k}: {:<8} {:>5} steps  dev accuracy {:.4}  ({:.0} s)",
                r.method, r.steps, r.dev_accuracy, r.seconds
            );
            record(c, k.into(), steps, r.dev_accuracy)?;
            scored.push((r.dev_accuracy, c.clone()));
            results.push(r);
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        alive = scored.into_iter().map(|(_, c)| c).collect();
    }
    let winner = alive[0].clone();
    // The winner's own step cost, measured in its longest rung.
    let winner_step = results
        .iter()
        .filter(|r| r.method == winner.method)
        .max_by_key(|r| r.steps)
        .map_or(step_seconds, |r| step_cost(r).max(1e-3));
    let left = budget - started.elapsed().as_secs_f64() - fixed;
    let epochs = ((left / (winner_step * steps_per_epoch as f64 + fixed)).floor() as usize)
        .clamp(1, s.train.epochs);
    eprintln!(
        "winner: {}; training it for {epochs} epoch(s)",
        winner.method
    );
    let (final_res, final_secs) = train_run(
        &exe,
        base,
        &winner,
        &s.output,
        &[("train.epochs".into(), epochs.to_string())],
        s.overwrite,
    )?;
    record(
        &winner,
        "final".into(),
        epochs * steps_per_epoch,
        final_res["dev"]["accuracy"].as_f64().unwrap_or(f64::NAN),
    )?;
    let total = started.elapsed().as_secs_f64();
    let last = results.iter().map(|r| r.rung).max();
    let mut last_rung: Vec<&RungResult> = results.iter().filter(|r| Some(r.rung) == last).collect();
    last_rung.sort_by(|a, b| b.dev_accuracy.total_cmp(&a.dev_accuracy));
    let why = match last_rung.as_slice() {
        [a, b, ..] if a.dev_accuracy == b.dev_accuracy => format!(
            "{} and {} tied at the last rung ({} steps, dev accuracy {:.4}); the prior ranked {} higher",
            a.method, b.method, a.steps, a.dev_accuracy, winner.method
        ),
        [a, b, ..] => format!(
            "{} had the best dev accuracy at the last rung ({} steps): {:.4} against {:.4} for {}",
            a.method, a.steps, a.dev_accuracy, b.dev_accuracy, b.method
        ),
        [a] => format!("{} was the only method left", a.method),
        [] => format!(
            "{} was the prior's first choice and the only candidate; no rung ran",
            winner.method
        ),
    };
    let summary = serde_json::json!({
        "features": features,
        "prior": candidates,
        "plan": plan,
        "not_tried": not_tried,
        "stopped_early": stopped_early,
        "rungs": results,
        "winner": winner,
        "why": why,
        "final": final_res,
        "final_seconds": final_secs,
        "total_seconds": total,
        "budget_seconds": budget,
        "adapter": s.output,
        "study": study.name,
        "past_auto_results": past.len(),
    });
    let json_path = s.output.join("auto.json");
    deltatune_core::write_atomic(
        &json_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    write_report(&report_path, &summary)?;
    println!(
        "chosen: {} (dev accuracy {:.4}{}); {}",
        winner.method,
        final_res["dev"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        final_res["test"]["accuracy"]
            .as_f64()
            .map_or(String::new(), |t| format!(", test {t:.4}")),
        why
    );
    println!(
        "cost: {:.0} s of a {:.0} s budget; adapter in {}; report {}",
        total,
        budget,
        s.output.display(),
        report_path.display()
    );
    Ok(())
}

fn write_report(path: &Path, v: &serde_json::Value) -> Result<()> {
    let e = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
    let mut h = String::from(
        "<!doctype html><!-- written by deltatune --><html><head><meta charset=\"utf-8\"><title>deltatune auto</title><style>\
         body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{border:1px solid #ccc;\
         padding:2px 8px}table{border-collapse:collapse}</style></head><body><h1>deltatune auto</h1>",
    );
    write!(
        h,
        "<p><b>Chosen: {}</b>. {}.</p><p>Cost {:.0} s of a {:.0} s budget.</p><h2>Task</h2>\
         <table>",
        e(v["winner"]["method"].as_str().unwrap_or("")),
        e(v["why"].as_str().unwrap_or("")),
        v["total_seconds"].as_f64().unwrap_or(0.0),
        v["budget_seconds"].as_f64().unwrap_or(0.0),
    )?;
    let f = &v["features"];
    let share = f["min_label_share"].as_f64().unwrap_or(0.0);
    for (name, value) in [
        ("training examples", f["train_examples"].to_string()),
        ("labels", f["labels"].to_string()),
        (
            "tokens per example",
            format!(
                "{:.1} on average, {} at most",
                f["mean_tokens"].as_f64().unwrap_or(0.0),
                f["max_tokens"]
            ),
        ),
        (
            "rarest label",
            format!("{:.1}% of the examples", 100.0 * share),
        ),
        (
            "base model",
            format!(
                "{:.1}M parameters, {} layers, width {}",
                f["model_params"].as_f64().unwrap_or(0.0) / 1e6,
                f["model_layers"],
                f["hidden"]
            ),
        ),
    ] {
        write!(h, "<tr><th>{name}</th><td>{}</td></tr>", e(&value))?;
    }
    h.push_str("</table>");
    h.push_str("<h2>Prior (rule set v1)</h2><table><tr><th>method</th><th>score</th><th>start</th><th>why</th></tr>");
    for c in v["prior"].as_array().into_iter().flatten() {
        write!(
            h,
            "<tr><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
            e(c["method"].as_str().unwrap_or("")),
            c["score"].as_f64().unwrap_or(0.0),
            e(&c["settings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|kv| format!(
                    "{}={}",
                    kv[0].as_str().unwrap_or(""),
                    kv[1].as_str().unwrap_or("")
                ))
                .collect::<Vec<_>>()
                .join(", ")),
            e(&c["reasons"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("; "))
        )?;
    }
    h.push_str("</table><h2>Successive halving</h2>");
    let tried: Vec<String> = v["rungs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["rung"] == 0)
        .filter_map(|r| r["method"].as_str().map(e))
        .collect();
    write!(
        h,
        "<p>Tried: {} (rungs as methods x steps: {}).</p>",
        tried.join(", "),
        e(&v["plan"]["rungs"].to_string())
    )?;
    let skipped = v["not_tried"].as_array().cloned().unwrap_or_default();
    if !skipped.is_empty() {
        h.push_str("<p>Not tried:</p><ul>");
        for x in &skipped {
            write!(
                h,
                "<li>{}: {}</li>",
                e(x["method"].as_str().unwrap_or("")),
                e(x["reason"].as_str().unwrap_or(""))
            )?;
        }
        h.push_str("</ul>");
    }
    if let Some(why) = v["stopped_early"].as_str() {
        write!(h, "<p>The halving stopped early: {}.</p>", e(why))?;
    }
    h.push_str("<table><tr><th>rung</th><th>method</th><th>steps</th><th>dev accuracy</th><th>dev macro-F1</th><th>seconds</th></tr>");
    let rungs = v["rungs"].as_array().cloned().unwrap_or_default();
    let best = rungs
        .iter()
        .filter_map(|r| r["dev_accuracy"].as_f64())
        .fold(0.0f64, f64::max);
    for r in &rungs {
        let acc = r["dev_accuracy"].as_f64().unwrap_or(f64::NAN);
        write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><span style=\"display:inline-block;background:#4a90d9;height:10px;width:{:.0}px\"></span> {:.4}</td><td>{:.4}</td><td>{:.0}</td></tr>",
            r["rung"],
            e(r["method"].as_str().unwrap_or("")),
            r["steps"],
            200.0 * acc / best.max(1e-9),
            acc,
            r["dev_macro_f1"].as_f64().unwrap_or(f64::NAN),
            r["seconds"].as_f64().unwrap_or(0.0)
        )?;
    }
    let f = &v["final"];
    let metric = |split: &str, m: &str| {
        f[split][m]
            .as_f64()
            .map_or("-".to_string(), |x| format!("{x:.4}"))
    };
    write!(
        h,
        "</table><h2>Final training</h2><p>{} trained for {} epoch(s) in {:.0} s.</p>\
         <table><tr><th></th><th>accuracy</th><th>macro-F1</th></tr>\
         <tr><td>dev</td><td>{}</td><td>{}</td></tr><tr><td>test</td><td>{}</td><td>{}</td></tr>\
         </table><details><summary>results.json</summary><pre>{}</pre></details>",
        e(v["winner"]["method"].as_str().unwrap_or("")),
        f["train_seconds_per_epoch"]
            .as_array()
            .map_or(0, |a| a.len()),
        v["final_seconds"].as_f64().unwrap_or(0.0),
        metric("dev", "accuracy"),
        metric("dev", "macro_f1"),
        metric("test", "accuracy"),
        metric("test", "macro_f1"),
        e(&serde_json::to_string_pretty(f)?)
    )?;
    writeln!(h, "</body></html>")?;
    deltatune_core::write_atomic(path, h.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn budgets_parse_with_units() {
        assert_eq!(super::parse_budget("30m").unwrap(), 1800.0);
        assert_eq!(super::parse_budget("1h30m").unwrap(), 5400.0);
        assert_eq!(super::parse_budget("90").unwrap(), 90.0);
        assert!(super::parse_budget("10x")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(super::parse_budget("0s").is_err());
    }
}
