//! The SQL both stores share: written once against [`Tx`], a transaction of either database.

use serde_json::Value;

use crate::sampler::Observation;
use crate::space::{Direction, Params};
use crate::{Error, Result};

/// A value bound to or read from SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl SqlValue {
    pub fn int(&self) -> Option<i64> {
        match self {
            SqlValue::Int(i) => Some(*i),
            SqlValue::Real(f) => Some(*f as i64),
            _ => None,
        }
    }
    pub fn real(&self) -> Option<f64> {
        match self {
            SqlValue::Real(f) => Some(*f),
            SqlValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn text(&self) -> Option<&str> {
        match self {
            SqlValue::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// Which database: the few places where SQL differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The database clock in seconds since the epoch (all times come from the database, so
    /// workers on machines with skewed clocks agree on heartbeats).
    pub fn now(self) -> &'static str {
        match self {
            Dialect::Sqlite => "((julianday('now') - 2440587.5) * 86400.0)",
            Dialect::Postgres => "(extract(epoch from clock_timestamp())::float8)",
        }
    }

    fn serial(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER PRIMARY KEY",
            Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
        }
    }
}

/// One open transaction.
pub trait Tx {
    fn dialect(&self) -> Dialect;
    /// Runs a statement with `$1, $2, ...` placeholders; returns the rows changed.
    fn exec(&mut self, sql: &str, args: &[SqlValue]) -> Result<u64>;
    fn query(&mut self, sql: &str, args: &[SqlValue]) -> Result<Vec<Vec<SqlValue>>>;
}

/// The schema this build writes. A store with a higher version is refused.
pub const SCHEMA_VERSION: i64 = 1;

/// Creates the tables if needed and checks the schema version.
pub fn init(tx: &mut dyn Tx, what: &str) -> Result<()> {
    let d = tx.dialect();
    let serial = d.serial();
    for stmt in [
        "CREATE TABLE IF NOT EXISTS deltatune_schema (version BIGINT NOT NULL)".to_string(),
        format!(
            "CREATE TABLE IF NOT EXISTS studies (id {serial}, name TEXT NOT NULL UNIQUE, \
             direction TEXT NOT NULL, space TEXT NOT NULL, n_trials BIGINT NOT NULL, \
             sampler TEXT NOT NULL, pruner TEXT NOT NULL, seed BIGINT NOT NULL, \
             created DOUBLE PRECISION NOT NULL)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS trials (id {serial}, study_id BIGINT NOT NULL, \
             number BIGINT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL, \
             value DOUBLE PRECISION, worker TEXT, heartbeat DOUBLE PRECISION, \
             started DOUBLE PRECISION, finished DOUBLE PRECISION, retry_of BIGINT, \
             attempt BIGINT NOT NULL, message TEXT, UNIQUE (study_id, number))"
        ),
        "CREATE TABLE IF NOT EXISTS intermediate (trial_id BIGINT NOT NULL, step BIGINT NOT NULL, \
         value DOUBLE PRECISION NOT NULL, PRIMARY KEY (trial_id, step))"
            .to_string(),
    ] {
        tx.exec(&stmt, &[])?;
    }
    let rows = tx.query("SELECT version FROM deltatune_schema", &[])?;
    match rows.first().and_then(|r| r[0].int()) {
        None => {
            tx.exec(
                "INSERT INTO deltatune_schema (version) VALUES ($1)",
                &[SqlValue::Int(SCHEMA_VERSION)],
            )?;
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(Error::Store(format!(
                "{what} has study schema version {v}, newer than this deltatune's \
                 {SCHEMA_VERSION}: use a newer deltatune with this store (or another store)"
            )))
        }
        Some(_) => {}
    }
    Ok(())
}

/// A study's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StudyRow {
    pub id: i64,
    pub name: String,
    pub direction: Direction,
    pub space: String,
    pub n_trials: usize,
    pub sampler: String,
    pub pruner: String,
    pub seed: u64,
}

/// The states of a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrialState {
    /// A configuration waiting for a worker (a retry of a trial whose worker died).
    Waiting,
    Running,
    Complete,
    Pruned,
    Failed,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Waiting => "WAITING",
            TrialState::Running => "RUNNING",
            TrialState::Complete => "COMPLETE",
            TrialState::Pruned => "PRUNED",
            TrialState::Failed => "FAILED",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "WAITING" => TrialState::Waiting,
            "RUNNING" => TrialState::Running,
            "COMPLETE" => TrialState::Complete,
            "PRUNED" => TrialState::Pruned,
            _ => TrialState::Failed,
        }
    }
}

/// A trial's row with its intermediate values.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrialRow {
    pub id: i64,
    pub number: i64,
    pub state: TrialState,
    pub params: Params,
    pub value: Option<f64>,
    pub worker: Option<String>,
    pub started: Option<f64>,
    pub finished: Option<f64>,
    pub retry_of: Option<i64>,
    pub attempt: i64,
    pub message: Option<String>,
    pub intermediate: Vec<(usize, f64)>,
}

impl TrialRow {
    /// As samplers see it: complete trials with their value, pruned ones with their last
    /// intermediate value.
    pub fn observation(&self) -> Option<Observation> {
        let value = match self.state {
            TrialState::Complete => self.value?,
            TrialState::Pruned => self.intermediate.last()?.1,
            _ => return None,
        };
        Some(Observation {
            params: self.params.clone(),
            value,
        })
    }
}

fn study_from(r: &[SqlValue]) -> Result<StudyRow> {
    let t = |i: usize| r[i].text().unwrap_or_default().to_string();
    Ok(StudyRow {
        id: r[0].int().unwrap_or(0),
        name: t(1),
        direction: if t(2) == "minimize" {
            Direction::Minimize
        } else {
            Direction::Maximize
        },
        space: t(3),
        n_trials: r[4].int().unwrap_or(0) as usize,
        sampler: t(5),
        pruner: t(6),
        seed: r[7].int().unwrap_or(0) as u64,
    })
}

const STUDY_COLS: &str = "id, name, direction, space, n_trials, sampler, pruner, seed";

pub fn get_study(tx: &mut dyn Tx, name: &str) -> Result<Option<StudyRow>> {
    let rows = tx.query(
        &format!("SELECT {STUDY_COLS} FROM studies WHERE name = $1"),
        &[SqlValue::Text(name.into())],
    )?;
    rows.first().map(|r| study_from(r)).transpose()
}

pub fn list_studies(tx: &mut dyn Tx) -> Result<Vec<StudyRow>> {
    tx.query(
        &format!("SELECT {STUDY_COLS} FROM studies ORDER BY id"),
        &[],
    )?
    .iter()
    .map(|r| study_from(r))
    .collect()
}

/// Creates the study, or returns the existing one of that name when its search space is the
/// same (a resume); a different space under the same name is an error.
pub fn create_or_resume(tx: &mut dyn Tx, new: &StudyRow) -> Result<(StudyRow, bool)> {
    if let Some(s) = get_study(tx, &new.name)? {
        if s.space.trim() != new.space.trim() {
            return Err(Error::Store(format!(
                "study `{}` exists with a different search space; resume it with the same space \
                 file, or choose another --study name",
                new.name
            )));
        }
        return Ok((s, false));
    }
    let now = tx.dialect().now();
    tx.exec(
        &format!(
            "INSERT INTO studies (name, direction, space, n_trials, sampler, pruner, seed, created) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {now})"
        ),
        &[
            SqlValue::Text(new.name.clone()),
            SqlValue::Text(new.direction.as_str().into()),
            SqlValue::Text(new.space.clone()),
            SqlValue::Int(new.n_trials as i64),
            SqlValue::Text(new.sampler.clone()),
            SqlValue::Text(new.pruner.clone()),
            SqlValue::Int(new.seed as i64),
        ],
    )?;
    let s = get_study(tx, &new.name)?
        .ok_or_else(|| Error::Store("the study vanished after insert".into()))?;
    Ok((s, true))
}

const TRIAL_COLS: &str =
    "id, number, state, params, value, worker, started, finished, retry_of, attempt, message";

pub fn trials(tx: &mut dyn Tx, study: i64) -> Result<Vec<TrialRow>> {
    let rows = tx.query(
        &format!("SELECT {TRIAL_COLS} FROM trials WHERE study_id = $1 ORDER BY number"),
        &[SqlValue::Int(study)],
    )?;
    let inter = tx.query(
        "SELECT i.trial_id, i.step, i.value FROM intermediate i JOIN trials t ON t.id = i.trial_id \
         WHERE t.study_id = $1 ORDER BY i.trial_id, i.step",
        &[SqlValue::Int(study)],
    )?;
    rows.iter()
        .map(|r| {
            let id = r[0].int().unwrap_or(0);
            Ok(TrialRow {
                id,
                number: r[1].int().unwrap_or(0),
                state: TrialState::parse(r[2].text().unwrap_or("")),
                params: serde_json::from_str(r[3].text().unwrap_or("{}"))
                    .map_err(|e| Error::Store(format!("trial {id}: bad params JSON: {e}")))?,
                value: r[4].real(),
                worker: r[5].text().map(str::to_string),
                started: r[6].real(),
                finished: r[7].real(),
                retry_of: r[8].int(),
                attempt: r[9].int().unwrap_or(0),
                message: r[10].text().map(str::to_string),
                intermediate: inter
                    .iter()
                    .filter(|i| i[0].int() == Some(id))
                    .map(|i| {
                        (
                            i[1].int().unwrap_or(0) as usize,
                            i[2].real().unwrap_or(f64::NAN),
                        )
                    })
                    .collect(),
            })
        })
        .collect()
}

/// What a worker gets when it asks for work.
#[derive(Debug, Clone)]
pub enum Claim {
    /// Run this trial.
    Trial(TrialRow),
    /// Nothing to start now, but trials are running (one may die and be retried): ask again.
    Wait,
    /// The study has its trials.
    Done,
}

/// Marks running trials whose heartbeat is older than `timeout` seconds as failed, and queues
/// their configuration again (up to `max_attempts` attempts). Returns how many were reaped.
pub fn reap_stale(tx: &mut dyn Tx, study: i64, timeout: f64, max_attempts: i64) -> Result<usize> {
    let now = tx.dialect().now();
    let stale = tx.query(
        &format!(
            "SELECT id, params, attempt FROM trials WHERE study_id = $1 AND state = 'RUNNING' \
             AND heartbeat < {now} - $2 ORDER BY number"
        ),
        &[SqlValue::Int(study), SqlValue::Real(timeout)],
    )?;
    for r in &stale {
        let id = r[0].int().unwrap_or(0);
        tx.exec(
            &format!(
                "UPDATE trials SET state = 'FAILED', finished = {now}, \
                 message = 'worker stopped sending heartbeats' WHERE id = $1"
            ),
            &[SqlValue::Int(id)],
        )?;
        let attempt = r[2].int().unwrap_or(1);
        if attempt < max_attempts {
            let next = next_number(tx, study)?;
            tx.exec(
                "INSERT INTO trials (study_id, number, state, params, retry_of, attempt) \
                 VALUES ($1, $2, 'WAITING', $3, $4, $5)",
                &[
                    SqlValue::Int(study),
                    SqlValue::Int(next),
                    r[1].clone(),
                    SqlValue::Int(id),
                    SqlValue::Int(attempt + 1),
                ],
            )?;
        }
    }
    Ok(stale.len())
}

fn next_number(tx: &mut dyn Tx, study: i64) -> Result<i64> {
    let r = tx.query(
        "SELECT MAX(number) FROM trials WHERE study_id = $1",
        &[SqlValue::Int(study)],
    )?;
    Ok(r.first().and_then(|r| r[0].int()).map_or(0, |n| n + 1))
}

/// Hands the next trial to `worker`, atomically (the caller holds an exclusive transaction
/// that serialises claims on the study): a queued retry first, else a new trial with
/// parameters from `sample(history, number)` while the study has fewer than `n_trials` live
/// (not failed) trials.
pub fn claim(
    tx: &mut dyn Tx,
    study: &StudyRow,
    worker: &str,
    stale_timeout: f64,
    max_attempts: i64,
    sample: &mut dyn FnMut(&[Observation], i64) -> Params,
) -> Result<Claim> {
    reap_stale(tx, study.id, stale_timeout, max_attempts)?;
    let now = tx.dialect().now();
    let waiting = tx.query(
        "SELECT id FROM trials WHERE study_id = $1 AND state = 'WAITING' ORDER BY number LIMIT 1",
        &[SqlValue::Int(study.id)],
    )?;
    let id = if let Some(w) = waiting.first() {
        let id = w[0].int().unwrap_or(0);
        tx.exec(
            &format!(
                "UPDATE trials SET state = 'RUNNING', worker = $1, heartbeat = {now}, \
                 started = {now} WHERE id = $2"
            ),
            &[SqlValue::Text(worker.into()), SqlValue::Int(id)],
        )?;
        id
    } else {
        let live = tx.query(
            "SELECT COUNT(*) FROM trials WHERE study_id = $1 AND state <> 'FAILED'",
            &[SqlValue::Int(study.id)],
        )?;
        let live = live.first().and_then(|r| r[0].int()).unwrap_or(0);
        if live as usize >= study.n_trials {
            let running = tx.query(
                "SELECT COUNT(*) FROM trials WHERE study_id = $1 AND state = 'RUNNING'",
                &[SqlValue::Int(study.id)],
            )?;
            let running = running.first().and_then(|r| r[0].int()).unwrap_or(0);
            return Ok(if running > 0 {
                Claim::Wait
            } else {
                Claim::Done
            });
        }
        let history: Vec<Observation> = trials(tx, study.id)?
            .iter()
            .filter_map(|t| t.observation())
            .collect();
        let number = next_number(tx, study.id)?;
        let params = sample(&history, number);
        tx.exec(
            &format!(
                "INSERT INTO trials (study_id, number, state, params, worker, heartbeat, started, \
                 attempt) VALUES ($1, $2, 'RUNNING', $3, $4, {now}, {now}, 1)"
            ),
            &[
                SqlValue::Int(study.id),
                SqlValue::Int(number),
                SqlValue::Text(Value::Object(params.into_iter().collect()).to_string()),
                SqlValue::Text(worker.into()),
            ],
        )?;
        let r = tx.query(
            "SELECT id FROM trials WHERE study_id = $1 AND number = $2",
            &[SqlValue::Int(study.id), SqlValue::Int(number)],
        )?;
        r.first().and_then(|r| r[0].int()).unwrap_or(0)
    };
    let row = trials(tx, study.id)?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Error::Store(format!("claimed trial {id} not found")))?;
    Ok(Claim::Trial(row))
}

/// Refreshes the heartbeat; false when the trial is no longer this worker's running trial
/// (it was reaped), so the worker must stop it.
pub fn heartbeat(tx: &mut dyn Tx, trial: i64, worker: &str) -> Result<bool> {
    let now = tx.dialect().now();
    Ok(tx.exec(
        &format!(
            "UPDATE trials SET heartbeat = {now} WHERE id = $1 AND worker = $2 AND state = 'RUNNING'"
        ),
        &[SqlValue::Int(trial), SqlValue::Text(worker.into())],
    )? == 1)
}

/// Records an intermediate value; false when the trial is no longer this worker's.
pub fn report(tx: &mut dyn Tx, trial: i64, worker: &str, step: usize, value: f64) -> Result<bool> {
    if !heartbeat(tx, trial, worker)? {
        return Ok(false);
    }
    tx.exec(
        "DELETE FROM intermediate WHERE trial_id = $1 AND step = $2",
        &[SqlValue::Int(trial), SqlValue::Int(step as i64)],
    )?;
    tx.exec(
        "INSERT INTO intermediate (trial_id, step, value) VALUES ($1, $2, $3)",
        &[
            SqlValue::Int(trial),
            SqlValue::Int(step as i64),
            SqlValue::Real(value),
        ],
    )?;
    Ok(true)
}

/// Ends a trial; false when it was no longer this worker's (reaped meanwhile), in which case
/// nothing changes.
pub fn finish(
    tx: &mut dyn Tx,
    trial: i64,
    worker: &str,
    state: TrialState,
    value: Option<f64>,
    message: Option<&str>,
) -> Result<bool> {
    let now = tx.dialect().now();
    Ok(tx.exec(
        &format!(
            "UPDATE trials SET state = $1, value = $2, message = $3, finished = {now} \
             WHERE id = $4 AND worker = $5 AND state = 'RUNNING'"
        ),
        &[
            SqlValue::Text(state.as_str().into()),
            value.map_or(SqlValue::Null, SqlValue::Real),
            message.map_or(SqlValue::Null, |m| SqlValue::Text(m.into())),
            SqlValue::Int(trial),
            SqlValue::Text(worker.into()),
        ],
    )? == 1)
}

/// Records a finished trial directly (no claim): used by `deltatune auto` to keep its rungs in
/// the store, where later runs learn from them.
pub fn record(
    tx: &mut dyn Tx,
    study: i64,
    params: &Params,
    value: f64,
    intermediate: &[(usize, f64)],
) -> Result<()> {
    let now = tx.dialect().now();
    let number = next_number(tx, study)?;
    tx.exec(
        &format!(
            "INSERT INTO trials (study_id, number, state, params, value, worker, heartbeat, started, \
             finished, attempt) VALUES ($1, $2, 'COMPLETE', $3, $4, 'auto', {now}, {now}, {now}, 1)"
        ),
        &[
            SqlValue::Int(study),
            SqlValue::Int(number),
            SqlValue::Text(Value::Object(params.clone().into_iter().collect()).to_string()),
            SqlValue::Real(value),
        ],
    )?;
    let id = tx
        .query(
            "SELECT id FROM trials WHERE study_id = $1 AND number = $2",
            &[SqlValue::Int(study), SqlValue::Int(number)],
        )?
        .first()
        .and_then(|r| r[0].int())
        .unwrap_or(0);
    for (step, v) in intermediate {
        tx.exec(
            "INSERT INTO intermediate (trial_id, step, value) VALUES ($1, $2, $3)",
            &[
                SqlValue::Int(id),
                SqlValue::Int(*step as i64),
                SqlValue::Real(*v),
            ],
        )?;
    }
    Ok(())
}
