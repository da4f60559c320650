//! `deltatune search`: runs or resumes a study; each trial is a `deltatune train` run (or the
//! fast synthetic objective), several workers claim trials from one store.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use deltatune_search::pruner::{AshaPruner, MedianPruner, NoPruner, Pruner};
use deltatune_search::sampler::{RandomSampler, Sampler, TpeSampler};
use deltatune_search::space::{Dist, Space, METHOD_KEY};
use deltatune_search::storage::{self, StudyRow, StudyStore, TrialRow};
use deltatune_search::worker::{run_worker, Objective, Verdict, WorkerConfig};

/// `deltatune search` arguments, resolved.
#[derive(Debug, Clone)]
pub struct SearchArgs {
    pub space: PathBuf,
    pub study: String,
    pub storage: String,
    pub trials: usize,
    pub workers: usize,
    pub sampler: String,
    pub pruner: String,
    pub seed: u64,
    pub objective: String,
    pub runs: PathBuf,
    pub heartbeat: f64,
    pub stale_timeout: f64,
    /// Extra `--set KEY=VALUE` for every trial's `train`.
    pub set: Vec<String>,
    /// Intermediate values every this many optimiser steps instead of every epoch.
    pub report_every_steps: Option<usize>,
    /// Internal: run one worker in this process (the parent spawned us).
    pub worker_only: bool,
}

pub fn sampler(name: &str) -> Result<Box<dyn Sampler>> {
    Ok(match name {
        "tpe" => Box::new(TpeSampler::default()),
        "random" => Box::new(RandomSampler),
        o => bail!("unknown sampler `{o}` (available: tpe, random)"),
    })
}

/// A pruner from its spec: `median`, `median:W` (no pruning before intermediate value W),
/// `asha`, `asha:R` (first rung at intermediate value R, then R*3, R*9, ...) or `none`. The
/// spec is stored with the study, so resumed and remote workers prune alike.
pub fn pruner(spec: &str) -> Result<Box<dyn Pruner>> {
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => {
            let v: usize = a.parse().with_context(|| {
                format!("pruner `{spec}`: `{a}` is not a whole number (e.g. asha:3)")
            })?;
            (n, Some(v))
        }
        None => (spec, None),
    };
    Ok(match (name, arg) {
        ("median", w) => Box::new(MedianPruner {
            n_warmup: w.unwrap_or(MedianPruner::default().n_warmup),
            ..MedianPruner::default()
        }),
        ("asha", Some(0)) => bail!("pruner `{spec}`: the first rung must be at least 1"),
        ("asha", r) => Box::new(AshaPruner {
            min_resource: r.unwrap_or(AshaPruner::default().min_resource),
            ..AshaPruner::default()
        }),
        ("none", None) => Box::new(NoPruner),
        _ => bail!(
            "unknown pruner `{spec}` (available: median, median:WARMUP, asha, asha:FIRST_RUNG, none)"
        ),
    })
}

/// Each trial is `deltatune train` in a child process; its per-epoch dev accuracy (from
/// `metrics.jsonl`) is the intermediate value, its final dev accuracy the objective. With
/// `every_steps` = N, the trial evaluates every N optimiser steps instead and the k-th of those
/// evaluations is intermediate value k.
struct TrainObjective {
    exe: PathBuf,
    dir: PathBuf,
    set: Vec<String>,
    every_steps: Option<usize>,
}

/// The intermediate value in a metrics line: (index, dev accuracy), where the index is the
/// epoch of an epoch-end line or k of a `train.eval_every_steps` line, whichever `by_steps`
/// selects; other lines give None.
fn intermediate(line: &str, by_steps: bool) -> Option<(usize, f64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let acc = v["dev_accuracy"]
        .as_f64()
        .or(v["dev"]["accuracy"].as_f64())?;
    let index = if by_steps {
        v["eval"].as_u64()?
    } else if v.get("eval").is_some() {
        return None;
    } else {
        v["epoch"].as_u64()?
    };
    Some((index as usize, acc))
}

impl TrainObjective {
    fn args(&self, t: &TrialRow, out: &Path) -> Vec<String> {
        let mut a = vec![
            "train".to_string(),
            "--no-progress".into(),
            // The trial's own folder in the study's runs folder (a retried trial replaces an
            // attempt that finished but was not recorded); a folder holding anything else is
            // still refused.
            "--overwrite".into(),
            "--output".into(),
            out.display().to_string(),
        ];
        for s in &self.set {
            a.push("--set".into());
            a.push(s.clone());
        }
        if let Some(n) = self.every_steps {
            a.push("--set".into());
            a.push(format!("train.eval_every_steps={n}"));
        }
        for (k, v) in &t.params {
            a.push("--set".into());
            a.push(format!("{k}={}", set_value(v)));
        }
        a
    }
}

impl Objective for TrainObjective {
    fn run(
        &self,
        t: &TrialRow,
        report: &mut dyn FnMut(usize, f64) -> deltatune_search::Result<Verdict>,
    ) -> deltatune_search::Result<f64> {
        let err = |m: String| deltatune_search::Error::Objective(m);
        let out = self.dir.join(format!("trial-{:04}", t.number));
        let log_path = self.dir.join(format!("trial-{:04}.log", t.number));
        std::fs::create_dir_all(&self.dir).map_err(|e| err(e.to_string()))?;
        let ck = super::resume::checkpoint_dir(&out);
        // A retry of a trial whose worker died continues from that attempt's checkpoints.
        let resumed = match t.retry_of {
            Some(prev) => {
                adopt_checkpoints(&self.dir, prev, &ck).map_err(|e| err(e.to_string()))?
            }
            None => false,
        };
        std::fs::create_dir_all(&ck).map_err(|e| err(format!("{}: {e}", ck.display())))?;
        deltatune_core::write_atomic(&ck.join(ATTEMPT_FILE), t.id.to_string().as_bytes())
            .map_err(|e| err(e.to_string()))?;
        let args = if resumed {
            vec![
                "train".to_string(),
                "--no-progress".into(),
                "--resume".into(),
                out.display().to_string(),
            ]
        } else {
            self.args(t, &out)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| err(e.to_string()))?;
        let mut cmd = Command::new(&self.exe);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; it runs in the child before exec. When the
            // worker dies (even by SIGKILL), its trial gets SIGTERM: it writes a checkpoint and
            // stops, instead of training on as an orphan beside the retry.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let mut child: Child = cmd
            .args(args)
            .stdout(Stdio::from(
                log.try_clone().map_err(|e| err(e.to_string()))?,
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", self.exe.display())))?;
        // The staging folder holds metrics.jsonl while the run trains.
        let mut seen = 0usize;
        loop {
            let status = child.try_wait().map_err(|e| err(e.to_string()))?;
            let metrics = find_metrics(&out);
            if let Some(m) = metrics {
                if let Ok(f) = std::fs::File::open(&m) {
                    let lines: Vec<String> =
                        BufReader::new(f).lines().map_while(|l| l.ok()).collect();
                    // Only whole lines count: the last one may still be being written.
                    let complete = lines
                        .iter()
                        .take_while(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                        .count();
                    for line in lines.iter().take(complete).skip(seen) {
                        seen += 1;
                        if let Some((index, acc)) = intermediate(line, self.every_steps.is_some()) {
                            if report(index, acc)? == Verdict::Stop {
                                let _ = child.kill();
                                let _ = child.wait();
                                // A pruned trial never resumes.
                                let _ = std::fs::remove_dir_all(&ck);
                                return Err(err("stopped".into()));
                            }
                        }
                    }
                }
            }
            if let Some(s) = status {
                if !s.success() {
                    // A run stopped by a signal (exit 130) keeps its checkpoints for the retry;
                    // a failed one would fail again.
                    if s.code() != Some(130) {
                        let _ = std::fs::remove_dir_all(&ck);
                    }
                    return Err(err(format!(
                        "deltatune train failed ({s}); see {}",
                        log_path.display()
                    )));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let res: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("results.json")).map_err(|e| err(e.to_string()))?,
        )
        .map_err(|e| err(e.to_string()))?;
        res["dev"]["accuracy"]
            .as_f64()
            .ok_or_else(|| err("results.json has no dev accuracy".into()))
    }
}

/// The file in a trial's checkpoint folder naming the attempt (trial id) that wrote it.
const ATTEMPT_FILE: &str = "attempt";

/// Moves the checkpoint folder written by attempt `prev` (a trial id) to `ck`, when one exists
/// in `dir` and holds a run to resume; true when it did.
fn adopt_checkpoints(dir: &Path, prev: i64, ck: &Path) -> std::io::Result<bool> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        let is_ck = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".checkpoints"));
        if !is_ck || p == ck {
            continue;
        }
        let owner = std::fs::read_to_string(p.join(ATTEMPT_FILE)).unwrap_or_default();
        if owner.trim() == prev.to_string() && p.join(super::resume::SETTINGS_FILE).exists() {
            if ck.exists() {
                std::fs::remove_dir_all(ck)?;
            }
            std::fs::rename(&p, ck)?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// `metrics.jsonl` of a run in progress (in its checkpoint folder) or finished.
fn find_metrics(out: &Path) -> Option<PathBuf> {
    let done = out.join("metrics.jsonl");
    if done.exists() {
        return Some(done);
    }
    let live = super::resume::checkpoint_dir(out).join("metrics.jsonl");
    if live.exists() {
        return Some(live);
    }
    let parent = out.parent()?;
    let name = out.file_name()?.to_string_lossy().to_string();
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(&format!(".{name}.partial")))
                .unwrap_or(false)
        })
        .map(|p| p.join("metrics.jsonl"))
}

/// A fast objective for trying stores and workers: a smooth function of the parameters with a
/// maximum of 1, reported over 3 steps, sleeping `DELTATUNE_SYNTHETIC_SLEEP` seconds (default
/// 0.2) per step.
struct SyntheticObjective {
    space: Space,
}

impl Objective for SyntheticObjective {
    fn run(
        &self,
        t: &TrialRow,
        report: &mut dyn FnMut(usize, f64) -> deltatune_search::Result<Verdict>,
    ) -> deltatune_search::Result<f64> {
        let sleep: f64 = std::env::var("DELTATUNE_SYNTHETIC_SLEEP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.2);
        let method = t
            .params
            .get(METHOD_KEY)
            .and_then(|m| m.as_str())
            .unwrap_or("");
        let mut penalty = 0.0;
        for p in self.space.params_for(method) {
            if let (Some(v), Dist::Float { .. } | Dist::Int { .. }) =
                (t.params.get(&p.name), &p.dist)
            {
                let (lo, hi) = p.dist.internal_range();
                let x = p.dist.to_internal(v).unwrap_or(lo);
                let u = (x - lo) / (hi - lo).max(1e-12);
                penalty += (u - 0.3).powi(2);
            }
        }
        let final_value = 1.0 - penalty;
        let mut v = 0.0;
        for step in 1..=3 {
            std::thread::sleep(Duration::from_secs_f64(sleep));
            v = final_value - 0.1 * (3 - step) as f64;
            if report(step, v)? == Verdict::Stop {
                return Ok(v);
            }
        }
        Ok(v)
    }
}

/// A trial's parameter as `train --set` takes it.
fn set_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    }
}

/// Before any trial runs: every method of the space must be a `train --method`, and every
/// parameter a setting that takes both ends of its range (or every choice), resolved exactly
/// as the trials will resolve them. Otherwise every trial would fail the same way.
fn check_space_settings(space: &Space, path: &Path, set: &[String]) -> Result<()> {
    let mut extra = Vec::new();
    for kv in set {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--set `{kv}`: expected KEY=VALUE");
        };
        extra.push((k.to_string(), v.to_string()));
    }
    for method in space.method_names() {
        let params = space.params_for(method);
        let ends = |d: &Dist| -> Vec<serde_json::Value> {
            match d {
                Dist::Choice(c) => c.clone(),
                d => {
                    let (lo, hi) = d.internal_range();
                    vec![d.from_internal(lo), d.from_internal(hi)]
                }
            }
        };
        // The method alone, then each parameter's values in turn with the others at their
        // low end.
        let alone = vec![(METHOD_KEY.to_string(), method.to_string())];
        let mut probes = vec![alone.clone()];
        for (i, p) in params.iter().enumerate() {
            for v in ends(&p.dist) {
                let mut probe = alone.clone();
                probe.extend(params.iter().enumerate().map(|(j, q)| {
                    let x = if i == j {
                        v.clone()
                    } else {
                        ends(&q.dist)[0].clone()
                    };
                    (q.name.clone(), set_value(&x))
                }));
                probes.push(probe);
            }
        }
        for probe in probes {
            let flags: Vec<(String, String)> = extra.iter().cloned().chain(probe.clone()).collect();
            if let Err(e) = crate::settings::resolve(None, &|_| None, &flags) {
                let values: Vec<String> = probe
                    .iter()
                    .filter(|(k, _)| k != METHOD_KEY)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                bail!(
                    "search space {}: [methods.{method}]{}: {e:#}",
                    path.display(),
                    if values.is_empty() {
                        String::new()
                    } else {
                        format!(" with {}", values.join(", "))
                    }
                );
            }
        }
    }
    Ok(())
}

/// `deltatune search`.
pub fn search(a: &SearchArgs) -> Result<()> {
    let space = Space::load(&a.space)?;
    let sampler = sampler(&a.sampler)?;
    pruner(&a.pruner)?; // validates the spec before the study stores it
    if a.objective != "train" && a.objective != "synthetic" {
        bail!(
            "unknown objective `{}` (available: train, synthetic)",
            a.objective
        );
    }
    if a.trials == 0 || a.workers == 0 {
        bail!("--trials and --workers must be at least 1");
    }
    if a.objective == "train" {
        check_space_settings(&space, &a.space, &a.set)?;
    }
    if a.objective == "train" {
        super::check_writable(&a.runs, "the trials' folder (--runs)", true)?;
    }
    let mut store = storage::open(&a.storage)?;
    let (study, created) = store.create_or_resume(&StudyRow {
        id: 0,
        name: a.study.clone(),
        direction: space.direction,
        space: space.source.clone(),
        n_trials: a.trials,
        sampler: sampler.name().into(),
        pruner: a.pruner.clone(),
        seed: a.seed,
    })?;
    if !a.worker_only {
        eprintln!(
            "study `{}` {} in {} ({} trials, sampler {}, pruner {}, {} worker{})",
            study.name,
            if created { "created" } else { "resumed" },
            store.describe(),
            study.n_trials,
            study.sampler,
            study.pruner,
            a.workers,
            if a.workers == 1 { "" } else { "s" }
        );
    }
    // Samplers and pruners come from the study, so resumed and remote workers agree.
    let sampler = self::sampler(&study.sampler)?;
    let pruner = self::pruner(&study.pruner)?;
    let exe = std::env::current_exe().context("finding the deltatune binary")?;
    let mut children = Vec::new();
    if a.workers > 1 && !a.worker_only {
        for _ in 1..a.workers {
            let mut args: Vec<String> = std::env::args().skip(1).collect();
            args.push("--worker-only".into());
            let child = Command::new(&exe)
                .args(&args)
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a worker process")?;
            children.push(child);
        }
    }
    let mut cfg = WorkerConfig::new(&a.storage);
    cfg.heartbeat = a.heartbeat;
    cfg.stale_timeout = a.stale_timeout;
    let objective: Box<dyn Objective> = if a.objective == "synthetic" {
        Box::new(SyntheticObjective {
            space: space.clone(),
        })
    } else {
        Box::new(TrainObjective {
            exe: exe.clone(),
            dir: a.runs.join(&study.name),
            set: a.set.clone(),
            every_steps: a.report_every_steps,
        })
    };
    let id = cfg.worker_id.clone();
    let summary = run_worker(
        &cfg,
        &study,
        &space,
        sampler.as_ref(),
        pruner.as_ref(),
        objective.as_ref(),
        &mut |m| eprintln!("[{id}] {m}"),
    )?;
    for mut c in children {
        let s = c.wait()?;
        if !s.success() {
            eprintln!("a worker process ended with {s}");
        }
    }
    if !a.worker_only {
        eprintln!(
            "this worker: {} complete, {} pruned, {} failed",
            summary.complete, summary.pruned, summary.failed
        );
        super::study::show(&a.storage, &study.name, 10)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pruner_specs_parse_with_their_argument() {
        use deltatune_search::pruner::Curve;
        use deltatune_search::space::Direction;
        let others: Vec<Curve> = (0..6)
            .map(|_| Curve {
                values: (1..=9).map(|k| (k, 0.9)).collect(),
                complete: true,
            })
            .collect();
        let max = Direction::Maximize;
        // A bad trial is stopped at the first rung: intermediate value 1, or 3 with `asha:3`.
        let asha = super::pruner("asha").unwrap();
        assert!(asha.prune(max, 1, 0.1, &others));
        let late = super::pruner("asha:3").unwrap();
        assert!(!late.prune(max, 1, 0.1, &others) && late.prune(max, 3, 0.1, &others));
        // Median: no pruning before the warm-up.
        assert!(super::pruner("median").unwrap().prune(max, 1, 0.1, &others));
        let warm = super::pruner("median:2").unwrap();
        assert!(!warm.prune(max, 1, 0.1, &others) && warm.prune(max, 2, 0.1, &others));
        for (bad, needle) in [
            ("asha:0", "at least 1"),
            ("asha:x", "not a whole number"),
            ("none:2", "unknown pruner"),
            ("hyperband", "asha:FIRST_RUNG"),
        ] {
            let Err(e) = super::pruner(bad) else {
                panic!("{bad} was accepted");
            };
            let e = e.to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    use super::intermediate;

    #[test]
    fn intermediate_values_come_from_the_selected_lines() {
        let epoch = r#"{"epoch":2,"step":630,"train_loss":0.4,"dev_accuracy":0.8,"dev_macro_f1":0.79,"train_seconds":1.0,"examples_per_second":1.0,"lr":0.0}"#;
        let within = r#"{"eval":3,"step":300,"epoch":1,"dev_accuracy":0.75,"dev_macro_f1":0.7}"#;
        assert_eq!(intermediate(epoch, false), Some((2, 0.8)));
        assert_eq!(intermediate(within, false), None);
        assert_eq!(intermediate(within, true), Some((3, 0.75)));
        assert_eq!(intermediate(epoch, true), None);
        assert_eq!(intermediate("{\"epoch\":", false), None);
    }
}
