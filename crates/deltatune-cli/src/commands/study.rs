//! `deltatune study list|show|best|export|report`: what a study store holds.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use deltatune_search::space::{Direction, Dist, METHOD_KEY};
use deltatune_search::storage::{self, StudyRow, StudyStore, TrialRow, TrialState};
use deltatune_train::artifact::{check_output_file, OutputRules};

fn load(storage: &str, name: &str) -> Result<(StudyRow, Vec<TrialRow>)> {
    let mut store = storage::open(storage)?;
    let Some(study) = store.study(name)? else {
        let names: Vec<String> = store.studies()?.into_iter().map(|s| s.name).collect();
        bail!(
            "no study `{name}` in {} (studies there: {})",
            store.describe(),
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        );
    };
    let trials = store.trials(study.id)?;
    Ok((study, trials))
}

fn best(study: &StudyRow, trials: &[TrialRow]) -> Option<TrialRow> {
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && t.value.is_some())
        .fold(None::<&TrialRow>, |b, t| match b {
            Some(b) if !study.direction.better(t.value.unwrap(), b.value.unwrap()) => Some(b),
            _ => Some(t),
        })
        .cloned()
}

fn params_text(t: &TrialRow) -> String {
    t.params
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            o => format!("{k}={o}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn counts(trials: &[TrialRow]) -> String {
    let n = |s: TrialState| trials.iter().filter(|t| t.state == s).count();
    format!(
        "{} complete, {} pruned, {} running, {} waiting, {} failed",
        n(TrialState::Complete),
        n(TrialState::Pruned),
        n(TrialState::Running),
        n(TrialState::Waiting),
        n(TrialState::Failed)
    )
}

/// `study list`.
pub fn list(storage: &str) -> Result<()> {
    let mut store = storage::open(storage)?;
    println!(
        "{:<24} {:>7} {:<9} {:<7} {:<7}  trials",
        "study", "budget", "direction", "sampler", "pruner"
    );
    for s in store.studies()? {
        let t = store.trials(s.id)?;
        println!(
            "{:<24} {:>7} {:<9} {:<7} {:<7}  {}",
            s.name,
            s.n_trials,
            s.direction.as_str(),
            s.sampler,
            s.pruner,
            counts(&t)
        );
    }
    Ok(())
}

/// `study show`: the trials in order (the last `limit` when not zero).
pub fn show(storage: &str, name: &str, limit: usize) -> Result<()> {
    let (study, trials) = load(storage, name)?;
    println!("study `{}`: {}", study.name, counts(&trials));
    println!(
        "{:>5} {:<9} {:>8} {:>7}  params",
        "trial", "state", "value", "attempt"
    );
    let skip = if limit > 0 {
        trials.len().saturating_sub(limit)
    } else {
        0
    };
    for t in trials.iter().skip(skip) {
        println!(
            "{:>5} {:<9} {:>8} {:>7}  {}",
            t.number,
            t.state.as_str(),
            t.value.map_or("-".into(), |v| format!("{v:.4}")),
            t.attempt,
            params_text(t)
        );
    }
    if let Some(b) = best(&study, &trials) {
        println!(
            "best: trial {} with {:.4}: {}",
            b.number,
            b.value.unwrap_or(f64::NAN),
            params_text(&b)
        );
    }
    Ok(())
}

fn seconds(t: &TrialRow) -> Option<f64> {
    Some(t.finished? - t.started?)
}

/// `study compare A --against B`: the trials of two studies matched by their parameters (e.g.
/// a pruned study and the same sampler seed run without a pruner), side by side with the time
/// each took, and the totals over the trials pruned in A: what they cost there and what the
/// same configurations cost in B.
pub fn compare(storage: &str, a: &str, b: &str) -> Result<()> {
    let (_, ta) = load(storage, a)?;
    let (_, tb) = load(storage, b)?;
    let ended = |t: &&TrialRow| {
        matches!(t.state, TrialState::Complete | TrialState::Pruned) && seconds(t).is_some()
    };
    println!(
        "{:>5} {:<9} {:>8} {:>8}   {:<9} {:>8} {:>8}  params",
        "trial", "A state", "A value", "A s", "B state", "B value", "B s"
    );
    let (mut matched, mut sa, mut sb, mut pa, mut pb, mut npruned) = (0, 0.0, 0.0, 0.0, 0.0, 0);
    for x in ta.iter().filter(ended) {
        let Some(y) = tb.iter().filter(ended).find(|y| y.params == x.params) else {
            continue;
        };
        let (dx, dy) = (seconds(x).unwrap_or(0.0), seconds(y).unwrap_or(0.0));
        let v = |t: &TrialRow| match t.state {
            TrialState::Pruned => t
                .intermediate
                .last()
                .map_or("-".into(), |p| format!("({:.4})", p.1)),
            _ => t.value.map_or("-".into(), |v| format!("{v:.4}")),
        };
        println!(
            "{:>5} {:<9} {:>8} {:>8.1}   {:<9} {:>8} {:>8.1}  {}",
            x.number,
            x.state.as_str(),
            v(x),
            dx,
            y.state.as_str(),
            v(y),
            dy,
            params_text(x)
        );
        matched += 1;
        sa += dx;
        sb += dy;
        if x.state == TrialState::Pruned {
            npruned += 1;
            pa += dx;
            pb += dy;
        }
    }
    if matched == 0 {
        bail!(
            "no trial of `{a}` has the same parameters as an ended trial of `{b}`; compare \
             studies run with the same space, sampler and seed (e.g. --sampler random --seed S, \
             once with a pruner and once with --pruner none)"
        );
    }
    println!("{matched} trials with the same parameters: {sa:.1} s in `{a}`, {sb:.1} s in `{b}`");
    if npruned > 0 {
        println!(
            "the {npruned} trials pruned in `{a}` took {pa:.1} s there; run to completion in `{b}` \
             they took {pb:.1} s ({:.0}% saved)",
            100.0 * (1.0 - pa / pb.max(1e-9))
        );
    } else {
        println!("no trial of `{a}` was pruned");
    }
    Ok(())
}

/// `study best`: the best trial's value and the `train` flags that reproduce it.
pub fn best_cmd(storage: &str, name: &str) -> Result<()> {
    let (study, trials) = load(storage, name)?;
    let b = best(&study, &trials)
        .with_context(|| format!("study `{name}` has no complete trial yet"))?;
    println!(
        "trial {} value {:.6}",
        b.number,
        b.value.unwrap_or(f64::NAN)
    );
    let flags: Vec<String> = b
        .params
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("--set {k}={s}"),
            o => format!("--set {k}={o}"),
        })
        .collect();
    println!("deltatune train {}", flags.join(" "));
    Ok(())
}

/// `study export`: every trial as CSV or JSON.
pub fn export(
    storage: &str,
    name: &str,
    format: &str,
    out: Option<&Path>,
    overwrite: bool,
) -> Result<()> {
    if let Some(p) = out {
        check_output_file(p, &OutputRules::new("--output", overwrite), false)?;
    }
    let (study, trials) = load(storage, name)?;
    let text = match format {
        "json" => serde_json::to_string_pretty(&serde_json::json!({
            "study": study,
            "trials": trials,
        }))?,
        "csv" => {
            let keys: std::collections::BTreeSet<&String> =
                trials.iter().flat_map(|t| t.params.keys()).collect();
            let mut s = String::from("number,state,value,attempt,retry_of,worker,started,finished");
            for k in &keys {
                write!(s, ",{k}").unwrap();
            }
            s.push('\n');
            for t in &trials {
                write!(
                    s,
                    "{},{},{},{},{},{},{},{}",
                    t.number,
                    t.state.as_str(),
                    t.value.map_or(String::new(), |v| v.to_string()),
                    t.attempt,
                    t.retry_of.map_or(String::new(), |v| v.to_string()),
                    t.worker.clone().unwrap_or_default(),
                    t.started.map_or(String::new(), |v| format!("{v:.3}")),
                    t.finished.map_or(String::new(), |v| format!("{v:.3}")),
                )
                .unwrap();
                for k in &keys {
                    let v = t.params.get(*k).map_or(String::new(), |v| match v {
                        serde_json::Value::String(s) => s.clone(),
                        o => o.to_string(),
                    });
                    write!(s, ",{v}").unwrap();
                }
                s.push('\n');
            }
            s
        }
        o => bail!("unknown export format `{o}` (available: csv, json)"),
    };
    match out {
        Some(p) => {
            deltatune_core::write_atomic(p, text.as_bytes())?;
            eprintln!("{} trials written to {}", trials.len(), p.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// A plot series: label, colour, points, and whether to join them with a line.
type Series<'a> = (String, &'a str, Vec<(f64, f64)>, bool);

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG scatter/line plot: `series` of (label, colour, points, connect).
/// How the x values of a plot are drawn: numbers (as given), log10 of the values (the points'
/// x are already log10; the end labels show the values), or categories (x is the index).
enum XAxis {
    Linear,
    Log,
    Categories(Vec<String>),
}

fn svg_plot(title: &str, xlabel: &str, series: &[Series]) -> String {
    svg_plot_axis(title, xlabel, series, &XAxis::Linear)
}

fn svg_plot_axis(title: &str, xlabel: &str, series: &[Series], axis: &XAxis) -> String {
    let (w, h, m) = (520.0, 300.0, 48.0);
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        return format!("<p>{}: no data yet</p>", esc(title));
    }
    if let XAxis::Categories(c) = axis {
        // Every category gets a slot, with half a slot of margin at both ends.
        x0 = -0.5;
        x1 = c.len() as f64 - 0.5;
    }
    if x1 - x0 < 1e-12 {
        x0 -= 0.5;
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1e-3;
    }
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg width=\"{w}\" height=\"{h}\" \
         xmlns=\"http://www.w3.org/2000/svg\" font-size=\"11\">\
         <rect x=\"{m}\" y=\"{m}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"{m}\" y=\"{}\">{y0:.4}</text><text x=\"{m}\" y=\"{}\">{y1:.4}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        esc(title),
        w - 2.0 * m,
        h - 2.0 * m,
        h - m + 12.0,
        m - 4.0,
        w / 2.0,
        h - 8.0,
        esc(xlabel),
    );
    let tick = |s: &mut String, x: f64, label: &str, anchor: &str| {
        write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            x,
            h - m + 24.0,
            esc(label)
        )
        .unwrap();
    };
    match axis {
        XAxis::Linear => {
            tick(&mut s, m, &format!("{x0:.3}"), "start");
            tick(&mut s, w - m, &format!("{x1:.3}"), "end");
        }
        XAxis::Log => {
            tick(&mut s, m, &format!("{:.3e}", 10f64.powf(x0)), "start");
            tick(&mut s, w - m, &format!("{:.3e}", 10f64.powf(x1)), "end");
            tick(&mut s, w / 2.0, "(log scale)", "middle");
        }
        XAxis::Categories(c) => {
            for (i, name) in c.iter().enumerate() {
                tick(&mut s, sx(i as f64), name, "middle");
            }
        }
    }
    for (label, colour, p, connect) in series {
        if *connect && p.len() > 1 {
            let d: Vec<String> = p
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            write!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" points=\"{}\"><title>{}</title></polyline>",
                d.join(" "),
                esc(label)
            )
            .unwrap();
        } else {
            for &(x, y) in p {
                write!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{}: {x:.4}, {y:.4}</title></circle>",
                    sx(x),
                    sy(y),
                    esc(label)
                )
                .unwrap();
            }
        }
    }
    s.push_str("</svg></figure>\n");
    s
}

/// `study report`: one self-contained HTML file with the optimisation history, each parameter
/// against the objective, and the intermediate values of complete and pruned trials.
pub fn report(storage: &str, name: &str, out: &Path, overwrite: bool) -> Result<()> {
    check_output_file(out, &OutputRules::new("--output", overwrite), true)?;
    let (study, trials) = load(storage, name)?;
    let mut html = format!(
        "<!doctype html><!-- written by deltatune --><html><head><meta charset=\"utf-8\"><title>deltatune study {0}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}figure{{display:inline-block;margin:8px}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}</style></head><body>\
         <h1>Study {0}</h1><p>{1}; direction {2}; sampler {3}; pruner {4}; budget {5} trials.</p>\n",
        esc(&study.name),
        counts(&trials),
        study.direction.as_str(),
        study.sampler,
        study.pruner,
        study.n_trials
    );
    if let Some(b) = best(&study, &trials) {
        write!(
            html,
            "<p><b>Best:</b> trial {} with {:.4}: <code>{}</code></p>",
            b.number,
            b.value.unwrap_or(f64::NAN),
            esc(&params_text(&b))
        )
        .unwrap();
    }
    let done: Vec<&TrialRow> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .collect();
    let mut best_so_far = Vec::new();
    let mut cur: Option<f64> = None;
    for t in &done {
        let v = t.value.unwrap_or(f64::NAN);
        cur = Some(match cur {
            Some(c) if !study.direction.better(v, c) => c,
            _ => v,
        });
        best_so_far.push((t.number as f64, cur.unwrap()));
    }
    html.push_str(&svg_plot(
        "Optimisation history: objective of each complete trial, and the best so far",
        "trial",
        &[
            (
                "trial".into(),
                "#1f77b4",
                done.iter()
                    .map(|t| (t.number as f64, t.value.unwrap_or(f64::NAN)))
                    .collect(),
                false,
            ),
            ("best so far".into(), "#d62728", best_so_far, true),
        ],
    ));
    let space = deltatune_search::space::Space::parse(&study.space).ok();
    let keys: std::collections::BTreeSet<&String> =
        trials.iter().flat_map(|t| t.params.keys()).collect();
    for k in keys {
        let dist = space.as_ref().and_then(|sp| {
            sp.method_names()
                .into_iter()
                .flat_map(|m| sp.params_for(m))
                .find(|p| &p.name == k)
                .map(|p| p.dist.clone())
        });
        let values: Vec<(&serde_json::Value, f64)> = done
            .iter()
            .filter_map(|t| Some((t.params.get(k)?, t.value?)))
            .collect();
        let numeric = values.iter().all(|(v, _)| v.is_number());
        let log = matches!(
            dist,
            Some(Dist::Float { log: true, .. } | Dist::Int { log: true, .. })
        ) && values
            .iter()
            .all(|(v, _)| v.as_f64().is_some_and(|x| x > 0.0));
        let (axis, pts) = if numeric && !matches!(dist, Some(Dist::Choice(_))) {
            let f = |x: f64| if log { x.log10() } else { x };
            (
                if log { XAxis::Log } else { XAxis::Linear },
                values
                    .iter()
                    .map(|(v, y)| (f(v.as_f64().unwrap_or(f64::NAN)), *y))
                    .collect(),
            )
        } else {
            // Categories in the space's order (or sorted), each point at its category's slot.
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                o => o.to_string(),
            };
            let mut cats: Vec<String> = match &dist {
                Some(Dist::Choice(c)) => c.iter().map(text).collect(),
                _ if k == METHOD_KEY => space
                    .as_ref()
                    .map(|sp| sp.method_names().iter().map(|m| m.to_string()).collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            for (v, _) in &values {
                if !cats.contains(&text(v)) {
                    cats.push(text(v));
                }
            }
            let pts = values
                .iter()
                .map(|(v, y)| {
                    let i = cats.iter().position(|c| *c == text(v)).unwrap_or(0);
                    (i as f64, *y)
                })
                .collect();
            (XAxis::Categories(cats), pts)
        };
        html.push_str(&svg_plot_axis(
            &format!("{k} vs objective"),
            k,
            &[(k.clone(), "#2ca02c", pts, false)],
            &axis,
        ));
    }
    let curves: Vec<Series> = trials
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .map(|t| {
            (
                format!("trial {} ({})", t.number, t.state.as_str().to_lowercase()),
                if t.state == TrialState::Pruned {
                    "#ff7f0e"
                } else {
                    "#1f77b4"
                },
                t.intermediate.iter().map(|&(s, v)| (s as f64, v)).collect(),
                true,
            )
        })
        .collect();
    html.push_str(&svg_plot(
        "Intermediate values (blue: complete, orange: pruned)",
        "report: epoch, or k-th evaluation with --report-every-steps",
        &curves,
    ));
    html.push_str("<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>value</th><th>attempt</th><th>params</th></tr>");
    for t in &trials {
        write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            t.number,
            t.state.as_str(),
            t.value.map_or("-".into(), |v| format!("{v:.4}")),
            t.attempt,
            esc(&params_text(t))
        )
        .unwrap();
    }
    html.push_str("</table></body></html>\n");
    deltatune_core::write_atomic(out, html.as_bytes())?;
    let _ = Direction::Maximize;
    eprintln!("report written to {}", out.display());
    Ok(())
}
