//! Search spaces (TOML): a choice of delta method, per-method parameters (present only when
//! that method is chosen) and shared training parameters.
//!
//! ```toml
//! direction = "maximize"          # or "minimize"; the objective is the dev metric
//!
//! [train]                         # shared: any `train.*` setting
//! lr = { float = [1e-4, 3e-2], log = true }
//! epochs = { int = [1, 3] }
//! batch_size = { choice = [16, 32] }
//!
//! [methods.lora]                  # one table per method; parameters are that section's keys
//! r = { int = [4, 16], step = 4 }
//! lora_alpha = { choice = [8, 16, 32] }
//!
//! [methods.prompt]
//! num_virtual_tokens = { int = [10, 40], step = 10 }
//! ```
//!
//! A trial's parameters are dotted setting keys (`method`, `train.lr`, `lora.r`), which is what
//! `deltatune train --set` takes.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Maximise or minimise the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Maximize,
    Minimize,
}

impl Direction {
    /// Whether `a` is better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Direction::Maximize => a > b,
            Direction::Minimize => a < b,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Maximize => "maximize",
            Direction::Minimize => "minimize",
        }
    }
}

/// One parameter's distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Uniform on [low, high], or log-uniform with `log`.
    Float { low: f64, high: f64, log: bool },
    /// Integers low, low + step, ..., <= high (log-uniform with `log`, then rounded).
    Int {
        low: i64,
        high: i64,
        step: i64,
        log: bool,
    },
    /// One of the listed values.
    Choice(Vec<Value>),
}

/// A named parameter (`train.lr`, `lora.r`).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub dist: Dist,
}

/// Parameter values of one trial, by dotted key.
pub type Params = BTreeMap<String, Value>;

/// The whole space.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    pub direction: Direction,
    /// Methods to choose from, each with its conditional parameters.
    pub methods: Vec<(String, Vec<Param>)>,
    /// Parameters every trial has.
    pub shared: Vec<Param>,
    /// The TOML text it was read from (stored with the study).
    pub source: String,
}

/// The largest search-space file read (bounds the parser's memory; real ones are < 1 KiB).
pub const MAX_SPACE_BYTES: usize = 256 << 10;

/// The key of the method choice in a trial's parameters.
pub const METHOD_KEY: &str = "method";

fn bad(what: &str, msg: String) -> Error {
    Error::Space(format!("{what}: {msg}"))
}

fn parse_dist(name: &str, v: &toml::Value) -> Result<Dist> {
    let t = v.as_table().ok_or_else(|| {
        bad(
            name,
            "expected a table like { float = [lo, hi] }, { int = [lo, hi] } or { choice = [...] }"
                .into(),
        )
    })?;
    let flag = |k: &str| -> Result<bool> {
        match t.get(k) {
            None => Ok(false),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(o) => Err(bad(name, format!("`{k}` must be true or false, got {o}"))),
        }
    };
    for k in t.keys() {
        if !["float", "int", "choice", "log", "step"].contains(&k.as_str()) {
            return Err(bad(
                name,
                format!("unknown key `{k}` (allowed: float, int, choice, log, step)"),
            ));
        }
    }
    let pair = |k: &str| -> Result<Option<(f64, f64, bool)>> {
        let Some(a) = t.get(k) else { return Ok(None) };
        let arr = a
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(name, format!("`{k}` must be [low, high]")))?;
        let num = |x: &toml::Value| {
            x.as_float()
                .or_else(|| x.as_integer().map(|i| i as f64))
                .ok_or_else(|| bad(name, format!("`{k}` bounds must be numbers")))
        };
        let ints = arr.iter().all(|x| x.is_integer());
        Ok(Some((num(&arr[0])?, num(&arr[1])?, ints)))
    };
    if let Some((lo, hi, _)) = pair("float")? {
        let log = flag("log")?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(bad(
                name,
                format!("float range [{lo}, {hi}] needs low <= high"),
            ));
        }
        if log && lo <= 0.0 {
            return Err(bad(name, format!("log range needs low > 0, got {lo}")));
        }
        return Ok(Dist::Float {
            low: lo,
            high: hi,
            log,
        });
    }
    if let Some((lo, hi, ints)) = pair("int")? {
        if !ints {
            return Err(bad(name, "`int` bounds must be integers".into()));
        }
        let step = match t.get("step") {
            None => 1,
            Some(s) => s
                .as_integer()
                .filter(|s| *s >= 1)
                .ok_or_else(|| bad(name, "`step` must be an integer >= 1".into()))?,
        };
        // The bounds as written (through f64 they would round above 2^53).
        let exact = |i: usize, f: f64| {
            t["int"]
                .as_array()
                .and_then(|a| a[i].as_integer())
                .unwrap_or(f as i64)
        };
        let (lo, hi) = (exact(0, lo), exact(1, hi));
        let log = flag("log")?;
        if lo > hi {
            return Err(bad(
                name,
                format!("int range [{lo}, {hi}] needs low <= high"),
            ));
        }
        if log && lo <= 0 {
            return Err(bad(name, format!("log range needs low > 0, got {lo}")));
        }
        return Ok(Dist::Int {
            low: lo,
            high: hi,
            step,
            log,
        });
    }
    if let Some(c) = t.get("choice") {
        let arr = c
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad(name, "`choice` must be a non-empty list".into()))?;
        let vals = arr
            .iter()
            .map(|x| serde_json::to_value(x).map_err(|e| bad(name, e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Dist::Choice(vals));
    }
    Err(bad(name, "needs one of `float`, `int` or `choice`".into()))
}

fn parse_params(section: &str, t: &toml::Table) -> Result<Vec<Param>> {
    t.iter()
        .map(|(k, v)| {
            let name = format!("{section}.{k}");
            Ok(Param {
                dist: parse_dist(&name, v)?,
                name,
            })
        })
        .collect()
}

impl Space {
    /// Parses a search space; errors name the parameter and what is wrong.
    pub fn parse(text: &str) -> Result<Self> {
        // The TOML parser holds ~75 bytes per byte of a file of nested arrays (found by
        // deltatune-fuzz: 190 MiB for a 4 MB file); a search space is a few hundred bytes.
        if text.len() > MAX_SPACE_BYTES {
            return Err(Error::Space(format!(
                "the file is {} bytes; a search space is a short hand-written TOML file (at \
                 most {} KiB): is this the right file?",
                text.len(),
                MAX_SPACE_BYTES >> 10
            )));
        }
        let root: toml::Table =
            toml::from_str(text).map_err(|e| Error::Space(format!("not valid TOML: {e}")))?;
        let mut direction = Direction::Maximize;
        let mut methods = Vec::new();
        let mut shared = Vec::new();
        for (k, v) in &root {
            match (k.as_str(), v) {
                ("direction", toml::Value::String(d)) => {
                    direction = match d.as_str() {
                        "maximize" => Direction::Maximize,
                        "minimize" => Direction::Minimize,
                        o => {
                            return Err(bad(
                                "direction",
                                format!("`{o}`: expected maximize or minimize"),
                            ))
                        }
                    }
                }
                ("methods", toml::Value::Table(t)) => {
                    for (m, body) in t {
                        let body = body.as_table().ok_or_else(|| {
                            bad(&format!("methods.{m}"), "must be a table".into())
                        })?;
                        methods.push((m.clone(), parse_params(m, body)?));
                    }
                }
                (section, toml::Value::Table(t)) => shared.extend(parse_params(section, t)?),
                (other, _) => return Err(bad(
                    other,
                    "unexpected top-level value (allowed: direction, [methods.NAME], [SECTION])"
                        .into(),
                )),
            }
        }
        if methods.is_empty() {
            return Err(bad(
                "methods",
                "no method to search: add at least one [methods.NAME] table (it may be empty)"
                    .into(),
            ));
        }
        Ok(Self {
            direction,
            methods,
            shared,
            source: text.to_string(),
        })
    }

    /// Reads and parses a space file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Space(format!("reading {}: {e}", path.display())))?;
        // The file name goes in front of the message, not of a second "search space:".
        Self::parse(&text).map_err(|e| match e {
            Error::Space(m) => Error::Space(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The method names, in file order.
    pub fn method_names(&self) -> Vec<&str> {
        self.methods.iter().map(|(m, _)| m.as_str()).collect()
    }

    /// The parameters a trial of `method` has: the shared ones, then the method's.
    pub fn params_for(&self, method: &str) -> Vec<&Param> {
        let own = self
            .methods
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, p)| p.iter().collect::<Vec<_>>())
            .unwrap_or_default();
        self.shared.iter().chain(own).collect()
    }
}

impl Dist {
    /// Maps a value to the sampler's internal number line (log for log ranges; choices by
    /// index), or `None` when it does not belong to the distribution.
    pub fn to_internal(&self, v: &Value) -> Option<f64> {
        match self {
            Dist::Float { log, .. } => v.as_f64().map(|x| if *log { x.ln() } else { x }),
            Dist::Int { log, .. } => v.as_f64().map(|x| if *log { x.ln() } else { x }),
            Dist::Choice(c) => c.iter().position(|x| x == v).map(|i| i as f64),
        }
    }

    /// The internal range (for numeric distributions).
    pub fn internal_range(&self) -> (f64, f64) {
        match self {
            Dist::Float { low, high, log } => {
                if *log {
                    (low.ln(), high.ln())
                } else {
                    (*low, *high)
                }
            }
            Dist::Int { low, high, log, .. } => {
                let (l, h) = (*low as f64 - 0.5, *high as f64 + 0.5);
                if *log {
                    (l.max(0.5).ln(), h.ln())
                } else {
                    (l, h)
                }
            }
            Dist::Choice(c) => (0.0, c.len() as f64),
        }
    }

    /// The value of an internal number (rounded to the grid for integers).
    pub fn from_internal(&self, x: f64) -> Value {
        match self {
            Dist::Float { low, high, log } => {
                let v = if *log { x.exp() } else { x };
                Value::from(v.clamp(*low, *high))
            }
            Dist::Int {
                low,
                high,
                step,
                log,
            } => {
                let v = if *log { x.exp() } else { x };
                // In i128: `high - low` overflows i64 for a range like [i64::MIN, i64::MAX]
                // (a negative `max_k` then made `clamp` panic).
                let k = ((v - *low as f64) / *step as f64).round() as i128;
                let max_k = (i128::from(*high) - i128::from(*low)) / i128::from(*step);
                let x = i128::from(*low) + k.clamp(0, max_k) * i128::from(*step);
                Value::from(x as i64)
            }
            Dist::Choice(c) => c[(x.max(0.0) as usize).min(c.len() - 1)].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: &str = r#"
direction = "maximize"
[train]
lr = { float = [1e-4, 1e-2], log = true }
batch_size = { choice = [16, 32] }
[methods.lora]
r = { int = [4, 16], step = 4 }
[methods.prompt]
"#;

    #[test]
    fn parses_shared_and_conditional_parameters() {
        let s = Space::parse(SPACE).unwrap();
        assert_eq!(s.method_names(), ["lora", "prompt"]);
        let names: Vec<&str> = s
            .params_for("lora")
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["train.batch_size", "train.lr", "lora.r"]);
        assert_eq!(s.params_for("prompt").len(), 2);
        assert_eq!(
            s.params_for("lora")[2].dist,
            Dist::Int {
                low: 4,
                high: 16,
                step: 4,
                log: false
            }
        );
    }

    #[test]
    fn int_grid_and_log_round_trip() {
        let d = Dist::Int {
            low: 4,
            high: 16,
            step: 4,
            log: false,
        };
        assert_eq!(d.from_internal(9.9), Value::from(8));
        assert_eq!(d.from_internal(100.0), Value::from(16));
        let f = Dist::Float {
            low: 1e-4,
            high: 1e-2,
            log: true,
        };
        let x = f.to_internal(&Value::from(1e-3)).unwrap();
        assert!((f.from_internal(x).as_f64().unwrap() - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn errors_name_the_parameter() {
        for (text, needles) in [
            (
                "[methods.lora]\nr = { int = [16, 4] }",
                vec!["lora.r", "low <= high"],
            ),
            (
                "[methods.lora]\nr = { float = [0, 1], log = true }",
                vec!["lora.r", "low > 0"],
            ),
            (
                "[methods.lora]\nr = { ints = [1, 2] }",
                vec!["lora.r", "unknown key `ints`"],
            ),
            (
                "[train]\nlr = { float = [1e-4, 1e-2] }",
                vec!["methods", "no method"],
            ),
            (
                "direction = \"up\"\n[methods.lora]",
                vec!["direction", "maximize"],
            ),
        ] {
            let e = Space::parse(text).unwrap_err().to_string();
            for n in needles {
                assert!(e.contains(n), "{text}: {e}");
            }
        }
    }
}
