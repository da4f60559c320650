//! Study storage: SQLite (one file, nothing to start; the default) or PostgreSQL (workers on
//! many machines). Both speak the same SQL ([`sql`]); [`StudyStore`] is the one trait the
//! search uses.

pub mod sql;

use std::path::PathBuf;

use postgres::types::{IsNull, ToSql, Type};
use rusqlite::TransactionBehavior;

pub use sql::{Claim, StudyRow, TrialRow, TrialState, SCHEMA_VERSION};
use sql::{Dialect, SqlValue, Tx};

use crate::sampler::Observation;
use crate::space::Params;
use crate::{Error, Result};

/// Everything a search needs from a store.
pub trait StudyStore {
    /// Where the store is (for messages).
    fn describe(&self) -> String;
    fn create_or_resume(&mut self, study: &StudyRow) -> Result<(StudyRow, bool)>;
    fn study(&mut self, name: &str) -> Result<Option<StudyRow>>;
    fn studies(&mut self) -> Result<Vec<StudyRow>>;
    fn trials(&mut self, study: i64) -> Result<Vec<TrialRow>>;
    fn claim(
        &mut self,
        study: &StudyRow,
        worker: &str,
        stale_timeout: f64,
        max_attempts: i64,
        sample: &mut dyn FnMut(&[Observation], i64) -> Params,
    ) -> Result<Claim>;
    fn heartbeat(&mut self, trial: i64, worker: &str) -> Result<bool>;
    /// Records a finished trial without a claim.
    fn record(
        &mut self,
        study: i64,
        params: &Params,
        value: f64,
        intermediate: &[(usize, f64)],
    ) -> Result<()>;
    fn report(&mut self, trial: i64, worker: &str, step: usize, value: f64) -> Result<bool>;
    fn finish(
        &mut self,
        trial: i64,
        worker: &str,
        state: TrialState,
        value: Option<f64>,
        message: Option<&str>,
    ) -> Result<bool>;
}

/// An open store.
pub enum Store {
    Sqlite {
        conn: rusqlite::Connection,
        path: PathBuf,
    },
    Postgres {
        client: Box<postgres::Client>,
        url: String,
    },
}

/// Opens `url`: `postgres://...` / `postgresql://...`, `sqlite://PATH`, or a plain file path
/// (SQLite). Creates the tables on first use and refuses a store with a newer schema.
pub fn open(url: &str) -> Result<Store> {
    let mut store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let client = postgres::Client::connect(url, postgres::NoTls).map_err(|e| {
            Error::Store(format!(
                "cannot connect to the PostgreSQL study store {}: {e} (is the server running and \
                 the database created?)",
                redact(url)
            ))
        })?;
        Store::Postgres {
            client: Box::new(client),
            url: url.to_string(),
        }
    } else {
        let path = PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Store(format!(
                    "creating {} for the study store: {e}",
                    dir.display()
                ))
            })?;
        }
        let conn = rusqlite::Connection::open(&path).map_err(|e| {
            Error::Store(format!(
                "opening SQLite study store {}: {e}",
                path.display()
            ))
        })?;
        // Switching a new file to WAL while other workers open it can fail with SQLITE_BUSY at
        // once: SQLite does not call the busy handler where waiting could deadlock. Several
        // workers starting together on a fresh store hit this (seen in the multi-worker kill
        // test), so the set-up is retried for as long as the busy timeout.
        let setup = || {
            conn.busy_timeout(std::time::Duration::from_secs(60))
                .and_then(|_| conn.pragma_update(None, "journal_mode", "WAL"))
                .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
        };
        let started = std::time::Instant::now();
        let mut wait_ms = 5;
        loop {
            match setup() {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && started.elapsed() < std::time::Duration::from_secs(60) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                    wait_ms = (wait_ms * 2).min(200);
                }
                Err(e) => return Err(Error::Store(format!("{}: {e}", path.display()))),
            }
        }
        Store::Sqlite { conn, path }
    };
    let what = store.describe();
    store.tx_with(true, |tx| sql::init(tx, &what))?;
    Ok(store)
}

/// The URL without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Store {
    /// Runs `f` in one exclusive transaction (SQLite `BEGIN IMMEDIATE`; PostgreSQL takes a
    /// transaction-scoped advisory lock), committed when `f` succeeds.
    fn tx<T>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.tx_with(false, f)
    }

    /// As [`Store::tx`]; with `serialise`, PostgreSQL transactions also take the study lock.
    fn tx_with<T>(
        &mut self,
        serialise: bool,
        f: impl FnOnce(&mut dyn Tx) -> Result<T>,
    ) -> Result<T> {
        match self {
            Store::Sqlite { conn, path } => {
                let what = path.display().to_string();
                let t = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| Error::Store(format!("{what}: {e}")))?;
                let mut w = SqliteTx(t);
                let out = f(&mut w)?;
                w.0.commit()
                    .map_err(|e| Error::Store(format!("{what}: {e}")))?;
                Ok(out)
            }
            Store::Postgres { client, url } => {
                let what = redact(url);
                let mut t = client
                    .transaction()
                    .map_err(|e| Error::Store(format!("{what}: {e}")))?;
                // One lock for all claims of this database: claims are short, and this makes
                // numbering, the trial budget and retries race-free across machines.
                if serialise {
                    t.execute("SELECT pg_advisory_xact_lock(7310221)", &[])
                        .map_err(|e| Error::Store(format!("{what}: {e}")))?;
                }
                let mut w = PgTx(t);
                let out = f(&mut w)?;
                w.0.commit()
                    .map_err(|e| Error::Store(format!("{what}: {e}")))?;
                Ok(out)
            }
        }
    }
}

impl StudyStore for Store {
    fn describe(&self) -> String {
        match self {
            Store::Sqlite { path, .. } => format!("SQLite store {}", path.display()),
            Store::Postgres { url, .. } => format!("PostgreSQL store {}", redact(url)),
        }
    }
    fn create_or_resume(&mut self, study: &StudyRow) -> Result<(StudyRow, bool)> {
        self.tx_with(true, |tx| sql::create_or_resume(tx, study))
    }
    fn study(&mut self, name: &str) -> Result<Option<StudyRow>> {
        self.tx(|tx| sql::get_study(tx, name))
    }
    fn studies(&mut self) -> Result<Vec<StudyRow>> {
        self.tx(sql::list_studies)
    }
    fn trials(&mut self, study: i64) -> Result<Vec<TrialRow>> {
        self.tx(|tx| sql::trials(tx, study))
    }
    fn claim(
        &mut self,
        study: &StudyRow,
        worker: &str,
        stale_timeout: f64,
        max_attempts: i64,
        sample: &mut dyn FnMut(&[Observation], i64) -> Params,
    ) -> Result<Claim> {
        self.tx_with(true, |tx| {
            sql::claim(tx, study, worker, stale_timeout, max_attempts, sample)
        })
    }
    fn heartbeat(&mut self, trial: i64, worker: &str) -> Result<bool> {
        self.tx(|tx| sql::heartbeat(tx, trial, worker))
    }
    fn record(
        &mut self,
        study: i64,
        params: &Params,
        value: f64,
        intermediate: &[(usize, f64)],
    ) -> Result<()> {
        self.tx_with(true, |tx| {
            sql::record(tx, study, params, value, intermediate)
        })
    }
    fn report(&mut self, trial: i64, worker: &str, step: usize, value: f64) -> Result<bool> {
        self.tx(|tx| sql::report(tx, trial, worker, step, value))
    }
    fn finish(
        &mut self,
        trial: i64,
        worker: &str,
        state: TrialState,
        value: Option<f64>,
        message: Option<&str>,
    ) -> Result<bool> {
        self.tx(|tx| sql::finish(tx, trial, worker, state, value, message))
    }
}

/// `$1` placeholders become SQLite's `?1`.
fn sqlite_placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

struct SqliteTx<'a>(rusqlite::Transaction<'a>);

fn to_sqlite(v: &SqlValue) -> rusqlite::types::Value {
    match v {
        SqlValue::Null => rusqlite::types::Value::Null,
        SqlValue::Int(i) => rusqlite::types::Value::Integer(*i),
        SqlValue::Real(f) => rusqlite::types::Value::Real(*f),
        SqlValue::Text(s) => rusqlite::types::Value::Text(s.clone()),
    }
}

impl Tx for SqliteTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn exec(&mut self, sql: &str, args: &[SqlValue]) -> Result<u64> {
        let q = sqlite_placeholders(sql);
        self.0
            .execute(&q, rusqlite::params_from_iter(args.iter().map(to_sqlite)))
            .map(|n| n as u64)
            .map_err(|e| Error::Store(format!("SQLite: {e} in `{q}`")))
    }
    fn query(&mut self, sql: &str, args: &[SqlValue]) -> Result<Vec<Vec<SqlValue>>> {
        let q = sqlite_placeholders(sql);
        let err = |e: rusqlite::Error| Error::Store(format!("SQLite: {e} in `{q}`"));
        let mut stmt = self.0.prepare(&q).map_err(err)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(
                rusqlite::params_from_iter(args.iter().map(to_sqlite)),
                |r| {
                    (0..n)
                        .map(|i| {
                            Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                                rusqlite::types::Value::Null => SqlValue::Null,
                                rusqlite::types::Value::Integer(i) => SqlValue::Int(i),
                                rusqlite::types::Value::Real(f) => SqlValue::Real(f),
                                rusqlite::types::Value::Text(s) => SqlValue::Text(s),
                                rusqlite::types::Value::Blob(_) => SqlValue::Null,
                            })
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()
                },
            )
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        Ok(rows)
    }
}

struct PgTx<'a>(postgres::Transaction<'a>);

impl ToSql for SqlValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Int(i) if *ty == Type::INT4 => (*i as i32).to_sql(ty, out),
            SqlValue::Int(i) if *ty == Type::FLOAT8 => (*i as f64).to_sql(ty, out),
            SqlValue::Int(i) => i.to_sql(ty, out),
            SqlValue::Real(f) => f.to_sql(ty, out),
            SqlValue::Text(s) => s.to_sql(ty, out),
        }
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    postgres::types::to_sql_checked!();
}

impl PgTx<'_> {
    fn args(args: &[SqlValue]) -> Vec<&(dyn ToSql + Sync)> {
        args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
    }
}

impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn exec(&mut self, sql: &str, args: &[SqlValue]) -> Result<u64> {
        self.0
            .execute(sql, &Self::args(args))
            .map_err(|e| Error::Store(format!("PostgreSQL: {e} in `{sql}`")))
    }
    fn query(&mut self, sql: &str, args: &[SqlValue]) -> Result<Vec<Vec<SqlValue>>> {
        let rows = self
            .0
            .query(sql, &Self::args(args))
            .map_err(|e| Error::Store(format!("PostgreSQL: {e} in `{sql}`")))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        let ty = r.columns()[i].type_().clone();
                        let e = |e: postgres::Error| Error::Store(format!("PostgreSQL: {e}"));
                        Ok(if ty == Type::INT8 {
                            r.try_get::<_, Option<i64>>(i)
                                .map_err(e)?
                                .map_or(SqlValue::Null, SqlValue::Int)
                        } else if ty == Type::INT4 {
                            r.try_get::<_, Option<i32>>(i)
                                .map_err(e)?
                                .map_or(SqlValue::Null, |v| SqlValue::Int(v.into()))
                        } else if ty == Type::FLOAT8 {
                            r.try_get::<_, Option<f64>>(i)
                                .map_err(e)?
                                .map_or(SqlValue::Null, SqlValue::Real)
                        } else {
                            r.try_get::<_, Option<String>>(i)
                                .map_err(e)?
                                .map_or(SqlValue::Null, SqlValue::Text)
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://me:secret@host:5432/db"),
            "postgres://me:***@host:5432/db"
        );
        assert_eq!(super::redact("study.db"), "study.db");
    }
}
