//! The worker loop: claim a trial, run the objective while a heartbeat thread keeps the claim
//! alive, report intermediate values to the pruner, record the result; until the study has its
//! trials. Any number of workers, in one process or on many machines, can run one study.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deltatune_core::Rng;

use crate::pruner::{Curve, Pruner};
use crate::sampler::Sampler;
use crate::space::{Params, Space};
use crate::storage::{self, Claim, StudyRow, StudyStore, TrialRow, TrialState};
use crate::{Error, Result};

/// What the objective is told after each intermediate value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Stop: the pruner says so, or the trial was taken away (its worker was presumed dead).
    Stop,
}

/// Something to optimise: runs one trial, calling `report(step, value)` with intermediate
/// values, and returns the final value.
pub trait Objective {
    fn run(
        &self,
        trial: &TrialRow,
        report: &mut dyn FnMut(usize, f64) -> Result<Verdict>,
    ) -> Result<f64>;
}

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The store URL (each worker thread opens its own connection).
    pub storage: String,
    pub worker_id: String,
    /// Seconds between heartbeats.
    pub heartbeat: f64,
    /// A running trial without a heartbeat for this long is failed and retried.
    pub stale_timeout: f64,
    /// Attempts per configuration (the first run and its retries).
    pub max_attempts: i64,
    /// Seconds to wait before asking again while other trials run.
    pub poll: f64,
    /// This worker stops with an error after this many of its trials failed in a row (a
    /// broken setting fails every trial; retrying forever would hide it).
    pub max_consecutive_failures: usize,
}

impl WorkerConfig {
    pub fn new(storage: &str) -> Self {
        Self {
            storage: storage.to_string(),
            worker_id: format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
                std::process::id()
            ),
            heartbeat: 2.0,
            stale_timeout: 30.0,
            max_attempts: 3,
            poll: 1.0,
            max_consecutive_failures: 5,
        }
    }
}

/// What one worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerSummary {
    pub complete: usize,
    pub pruned: usize,
    pub failed: usize,
    /// Trials taken away while running (this worker was presumed dead).
    pub lost: usize,
}

/// Runs trials of `study` until it has its trials.
pub fn run_worker(
    cfg: &WorkerConfig,
    study: &StudyRow,
    space: &Space,
    sampler: &dyn Sampler,
    pruner: &dyn Pruner,
    objective: &dyn Objective,
    on_event: &mut dyn FnMut(&str),
) -> Result<WorkerSummary> {
    let mut store = storage::open(&cfg.storage)?;
    let mut summary = WorkerSummary::default();
    let mut failures_in_a_row = 0usize;
    loop {
        let root = Rng::new(study.seed);
        let mut sample = |hist: &[crate::sampler::Observation], number: i64| -> Params {
            sampler.sample(space, hist, &mut root.derive(&format!("trial-{number}")))
        };
        let claim = store.claim(
            study,
            &cfg.worker_id,
            cfg.stale_timeout,
            cfg.max_attempts,
            &mut sample,
        )?;
        let trial = match claim {
            Claim::Done => return Ok(summary),
            Claim::Wait => {
                std::thread::sleep(Duration::from_secs_f64(cfg.poll));
                continue;
            }
            Claim::Trial(t) => t,
        };
        on_event(&format!(
            "trial {} started{}: {}",
            trial.number,
            trial
                .retry_of
                .map_or(String::new(), |_| format!(" (attempt {})", trial.attempt)),
            serde_json::to_string(&trial.params).unwrap_or_default()
        ));
        let lost = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let hb = {
            let (lost, done) = (lost.clone(), done.clone());
            let (url, worker, id, every) = (
                cfg.storage.clone(),
                cfg.worker_id.clone(),
                trial.id,
                cfg.heartbeat,
            );
            std::thread::spawn(move || -> Result<()> {
                let mut s = storage::open(&url)?;
                let step = Duration::from_millis(50);
                let mut waited = 0.0;
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(step);
                    waited += step.as_secs_f64();
                    if waited >= every {
                        waited = 0.0;
                        if !s.heartbeat(id, &worker)? {
                            lost.store(true, Ordering::SeqCst);
                            return Ok(());
                        }
                    }
                }
                Ok(())
            })
        };
        let mut pruned = false;
        let mut report = |step: usize, value: f64| -> Result<Verdict> {
            if lost.load(Ordering::SeqCst)
                || !store.report(trial.id, &cfg.worker_id, step, value)?
            {
                lost.store(true, Ordering::SeqCst);
                return Ok(Verdict::Stop);
            }
            let others: Vec<Curve> = store
                .trials(study.id)?
                .iter()
                .filter(|t| t.id != trial.id)
                .map(|t| Curve {
                    values: t.intermediate.clone(),
                    complete: t.state == TrialState::Complete,
                })
                .collect();
            if pruner.prune(study.direction, step, value, &others) {
                pruned = true;
                return Ok(Verdict::Stop);
            }
            Ok(Verdict::Continue)
        };
        let result = objective.run(&trial, &mut report);
        done.store(true, Ordering::SeqCst);
        let hb_result = hb
            .join()
            .map_err(|_| Error::Store("the heartbeat thread panicked".into()))?;
        if lost.load(Ordering::SeqCst) {
            summary.lost += 1;
            on_event(&format!(
                "trial {} was taken away (no heartbeat within {} s); dropping it",
                trial.number, cfg.stale_timeout
            ));
            continue;
        }
        hb_result?;
        let last = trial_last_value(&mut store, study.id, trial.id)?;
        let (state, value, msg) = match result {
            Ok(v) if pruned => (TrialState::Pruned, last.or(Some(v)), None),
            Ok(v) if v.is_finite() => (TrialState::Complete, Some(v), None),
            Ok(v) => (
                TrialState::Failed,
                None,
                Some(format!("objective returned {v}")),
            ),
            Err(_) if pruned => (TrialState::Pruned, last, None),
            Err(e) => (TrialState::Failed, None, Some(e.to_string())),
        };
        if store.finish(trial.id, &cfg.worker_id, state, value, msg.as_deref())? {
            match state {
                TrialState::Complete => summary.complete += 1,
                TrialState::Pruned => summary.pruned += 1,
                _ => summary.failed += 1,
            }
            on_event(&format!(
                "trial {} {}{}{}",
                trial.number,
                state.as_str().to_lowercase(),
                value.map_or(String::new(), |v| format!(": {v:.4}")),
                msg.as_ref().map_or(String::new(), |m| format!(" ({m})"))
            ));
            if state == TrialState::Failed {
                failures_in_a_row += 1;
                if failures_in_a_row >= cfg.max_consecutive_failures.max(1) {
                    return Err(Error::Objective(format!(
                        "{failures_in_a_row} trials in a row failed, so this worker stops; \
                         the last one: {}",
                        msg.unwrap_or_default()
                    )));
                }
            } else {
                failures_in_a_row = 0;
            }
        } else {
            summary.lost += 1;
        }
    }
}

fn trial_last_value(store: &mut dyn StudyStore, study: i64, trial: i64) -> Result<Option<f64>> {
    Ok(store
        .trials(study)?
        .into_iter()
        .find(|t| t.id == trial)
        .and_then(|t| t.intermediate.last().map(|x| x.1)))
}
