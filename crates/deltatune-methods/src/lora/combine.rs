//! Adapter arithmetic: several LoRA adapters of one base combined into a new LoRA adapter, with
//! the semantics of PEFT's `add_weighted_adapter` (combination types `linear`, `cat`, `ties`,
//! `dare_linear`, `dare_ties`, `magnitude_prune`).
//!
//! For adapter `i` with weight `w_i` and scaling `s_i` (`alpha / r`, or `alpha / sqrt(r)` with
//! rsLoRA), at every module some adapter targets (adapters without the module are left out
//! there):
//! - `cat`: `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]` (rows), `B = [B_1, B_2, ...]` (columns): exactly
//!   `sum_i w_i s_i B_i A_i`, rank the sum of the ranks (zero rows where an adapter lacks the
//!   module).
//! - the others combine the `A`s and the `B`s separately (an approximation of the weighted sum
//!   of the products: cross terms appear) with weights `sign(w_i) sqrt(|w_i s_i|)` for `A` and
//!   `sqrt(|w_i s_i|)` for `B`; every adapter needs the same rank:
//!   - `linear`: the weighted sum;
//!   - `magnitude_prune`: each tensor keeps its `floor(density * n)` largest magnitudes, then the
//!     weighted sum;
//!   - `ties` (Yadav et al. 2023): magnitude pruning, then per element the majority sign of the
//!     pruned tensors (`total`: the sign of their sum; `frequency`: of the sum of their signs;
//!     ties count as positive), then the mean of the weighted entries that carry that sign;
//!   - `dare_linear` / `dare_ties` (Yu et al. 2023): each element kept with probability
//!     `density` and divided by it, then the weighted sum / the TIES merge.
//!
//! Scalings and ranks are per module (`rank_pattern`, `alpha_pattern`). The combined adapter
//! has `r` = the rank (for `cat`, the sum of the adapters' largest ranks) and `lora_alpha = r`
//! (scaling 1: the `s_i` are inside the tensors), the union of the target modules, and no
//! rsLoRA; modules of another rank get `rank_pattern`/`alpha_pattern` entries (scaling 1).
//! (PEFT copies the first adapter's `use_rslora`, which scales the result by `sqrt(r)` when
//! that adapter is rsLoRA; deltatune keeps the sum exact.)

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use deltatune_core::{Error, Result, Rng, TargetModules};

use super::config::Patterns;
use super::{LoraBias, LoraConfig};
use crate::delta::PEFT_PREFIX;

/// How the adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

impl Combination {
    /// Every combination, in PEFT's spelling.
    pub const ALL: [(&'static str, Combination); 6] = [
        ("linear", Combination::Linear),
        ("cat", Combination::Cat),
        ("ties", Combination::Ties),
        ("dare_linear", Combination::DareLinear),
        ("dare_ties", Combination::DareTies),
        ("magnitude_prune", Combination::MagnitudePrune),
    ];

    /// PEFT's name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, c)| *c == self)
            .map(|(n, _)| *n)
            .expect("every combination is listed")
    }

    /// Parses PEFT's name; the error lists the names.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, c)| *c)
            .map_or_else(
                || {
                    let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                    let svd = if s.ends_with("svd") {
                        " (the SVD variants are not implemented: `cat` is the exact combination)"
                    } else {
                        ""
                    };
                    bad(
                        "combination",
                        format!(
                            "unknown combination `{s}`{svd}; use one of {}",
                            names.join(", ")
                        ),
                    )
                },
                Ok,
            )
    }

    /// Whether `density` is used (and required).
    pub fn prunes(self) -> bool {
        !matches!(self, Combination::Linear | Combination::Cat)
    }

    fn random(self) -> bool {
        matches!(self, Combination::DareLinear | Combination::DareTies)
    }

    fn ties(self) -> bool {
        matches!(self, Combination::Ties | Combination::DareTies)
    }
}

/// How TIES picks each element's sign (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the values (default).
    #[default]
    Total,
    /// The sign held by more tensors.
    Frequency,
}

impl MajoritySign {
    /// Parses `total` or `frequency`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => bad(
                "majority_sign_method",
                format!("`{s}`; use total or frequency"),
            ),
        }
    }
}

/// Which LoRA matrix a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn leaf(self) -> &'static str {
        match self {
            Side::A => "lora_A.weight",
            Side::B => "lora_B.weight",
        }
    }
}

/// Where DARE's keep-masks come from: `keep(module, side, adapter, n, density)` gives `n`
/// booleans (`adapter` indexes the sources).
pub trait KeepMasks {
    fn keep(
        &mut self,
        module: &str,
        side: Side,
        adapter: usize,
        n: usize,
        density: f64,
    ) -> Result<Vec<bool>>;
}

/// Keep-masks drawn from a seed: each (module, side, adapter) has its own stream, so the result
/// does not depend on the order modules are visited.
pub struct SeededMasks(pub u64);

impl KeepMasks for SeededMasks {
    fn keep(
        &mut self,
        module: &str,
        side: Side,
        adapter: usize,
        n: usize,
        density: f64,
    ) -> Result<Vec<bool>> {
        let mut r = Rng::new(self.0).derive(&format!("dare/{module}/{side:?}/{adapter}"));
        Ok((0..n).map(|_| r.uniform() < density).collect())
    }
}

/// One adapter to combine: a name for messages, its configuration and its tensors under PEFT's
/// keys (`base_model.model.<module>.lora_A.weight`, ...).
pub struct Source {
    pub name: String,
    pub config: LoraConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

/// The combination's settings.
#[derive(Debug, Clone, Copy)]
pub struct CombineOptions {
    pub combination: Combination,
    /// Fraction of values kept, in [0, 1], for the pruning combinations (1 or more: no
    /// pruning, as PEFT).
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
}

/// The combined adapter: its configuration and tensors (PEFT's keys).
pub struct Combined {
    pub config: LoraConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

fn bad<T>(field: &str, msg: String) -> Result<T> {
    Err(Error::InvalidConfig {
        field: field.into(),
        msg,
    })
}

/// A LoRA tensor as (rows, cols, values).
struct Mat {
    rows: usize,
    cols: usize,
    v: Vec<f32>,
}

impl Mat {
    fn of(t: &Tensor, key: &str, source: &str) -> Result<Mat> {
        let (rows, cols) = t.dims2().map_err(|_| {
            Error::Msg(format!(
                "`{key}` of adapter {source} has shape {:?}; LoRA matrices are 2-D",
                t.dims()
            ))
        })?;
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Mat { rows, cols, v })
    }

    fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.v.clone(),
            (self.rows, self.cols),
            &Device::Cpu,
        )?)
    }
}

/// Keeps the `floor(density * n)` largest magnitudes (ties broken by position).
fn magnitude_prune(v: &mut [f32], density: f64) {
    let k = (density * v.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
    for &i in &idx[k..] {
        v[i] = 0.0;
    }
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Combines `tensors` (same length) with `weights` as `opts` says; `keep` gives DARE's masks
/// for tensor `i`.
fn merge_values(
    mut tensors: Vec<Vec<f32>>,
    weights: &[f32],
    opts: &CombineOptions,
    keep: &mut dyn FnMut(usize, usize) -> Result<Vec<bool>>,
) -> Result<Vec<f32>> {
    let n = tensors[0].len();
    let density = opts.density.unwrap_or(1.0);
    if opts.combination.prunes() && density < 1.0 {
        for (i, t) in tensors.iter_mut().enumerate() {
            if opts.combination.random() {
                let mask = keep(i, n)?;
                for (x, k) in t.iter_mut().zip(mask) {
                    *x = if k { *x / density as f32 } else { 0.0 };
                }
            } else {
                magnitude_prune(t, density);
            }
        }
    }
    let mut out = vec![0f32; n];
    if !opts.combination.ties() {
        for (t, &w) in tensors.iter().zip(weights) {
            for (o, &x) in out.iter_mut().zip(t) {
                *o += x * w;
            }
        }
        return Ok(out);
    }
    for (j, o) in out.iter_mut().enumerate() {
        let magnitude: f32 = match opts.majority_sign {
            MajoritySign::Total => tensors.iter().map(|t| t[j]).sum(),
            MajoritySign::Frequency => tensors.iter().map(|t| sign(t[j])).sum(),
        };
        let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0f32, 0f32);
        for (t, &w) in tensors.iter().zip(weights) {
            if sign(t[j]) == majority {
                sum += t[j] * w;
                count += 1.0;
            }
        }
        *o = sum / count.max(1.0);
    }
    Ok(out)
}

/// The modules an adapter has LoRA tensors for, from its keys.
fn modules(src: &Source) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for key in src.tensors.keys() {
        let Some(rest) = key.strip_prefix(PEFT_PREFIX) else {
            continue;
        };
        if let Some(m) = rest
            .strip_suffix(".lora_A.weight")
            .or_else(|| rest.strip_suffix(".lora_B.weight"))
        {
            out.insert(m.to_string());
        }
    }
    if out.is_empty() {
        return Err(Error::Msg(format!(
            "adapter {} has no LoRA tensors (keys `{PEFT_PREFIX}<module>.lora_A.weight`)",
            src.name
        )));
    }
    Ok(out)
}

/// The union of the sources' target modules (PEFT: a set union of lists, `(a)|(b)` of
/// regexes); with `layers_to_transform` in any source, the exact module paths instead.
fn union_targets(sources: &[Source], all: &BTreeSet<String>) -> Result<TargetModules> {
    if sources
        .iter()
        .any(|s| s.config.layers_to_transform.is_some())
    {
        return Ok(TargetModules::Suffixes(all.iter().cloned().collect()));
    }
    let first_is_list = matches!(sources[0].config.target_modules, TargetModules::Suffixes(_));
    let mut set = BTreeSet::new();
    let mut parts = Vec::new();
    for s in sources {
        match &s.config.target_modules {
            TargetModules::Suffixes(l) if first_is_list => set.extend(l.iter().cloned()),
            TargetModules::Regex(r) if !first_is_list => parts.push(format!("({r})")),
            _ => {
                let (this, first) = if first_is_list {
                    ("a regex", "a list")
                } else {
                    ("a list", "a regex")
                };
                return bad(
                    "target_modules",
                    format!(
                        "adapter {} has {this} and {} {first}: combining the two kinds is not \
                         supported (as in PEFT); write both as lists",
                        s.name, sources[0].name
                    ),
                );
            }
        }
    }
    Ok(if first_is_list {
        TargetModules::Suffixes(set.into_iter().collect())
    } else {
        TargetModules::Regex(parts.join("|"))
    })
}

/// Combines `sources` with `weights` (one per source; negative subtracts). A single source is
/// always combined `linear` (as PEFT). `masks` gives DARE's keep-masks.
pub fn combine(
    sources: &[Source],
    weights: &[f64],
    opts: &CombineOptions,
    masks: &mut dyn KeepMasks,
) -> Result<Combined> {
    if sources.is_empty() {
        return bad("adapters", "no adapter to combine".into());
    }
    if weights.len() != sources.len() {
        return bad(
            "weights",
            format!(
                "{} weights for {} adapters; give one weight per adapter",
                weights.len(),
                sources.len()
            ),
        );
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return bad("weights", format!("{w} is not a finite number"));
    }
    let mut opts = *opts;
    if let Some(d) = opts.density {
        if !opts.combination.prunes() {
            return bad(
                "density",
                format!(
                    "`{}` keeps every value and does not use a density ({d}); drop --density \
                     or choose ties, dare_linear, dare_ties or magnitude_prune",
                    opts.combination.name()
                ),
            );
        }
        if !(d > 0.0 && d <= 1.0) {
            return bad(
                "density",
                format!(
                    "{d} is outside (0, 1]: it is the fraction of values kept (e.g. 0.5; 1 \
                     keeps all)"
                ),
            );
        }
    }
    if sources.len() == 1 {
        opts.combination = Combination::Linear;
    }
    let c = opts.combination;
    if c.prunes() && opts.density.is_none() {
        return bad(
            "density",
            format!(
                "`{}` needs a density (the fraction of values kept, e.g. 0.5)",
                c.name()
            ),
        );
    }
    for s in sources {
        s.config.validate()?;
        if s.config.bias != LoraBias::None {
            return bad(
                "bias",
                format!(
                    "adapter {} trains biases (bias = {:?}); only the LoRA matrices can be \
                     combined: use adapters trained with bias = none",
                    s.name, s.config.bias
                ),
            );
        }
    }
    let mods: Vec<BTreeSet<String>> = sources.iter().map(modules).collect::<Result<_>>()?;
    let all: BTreeSet<String> = mods.iter().flatten().cloned().collect();
    // As PEFT: an adapter's rank is its largest (`r` or a `rank_pattern` value).
    let ranks: Vec<usize> = sources.iter().map(|s| s.config.max_rank()).collect();
    let new_rank = if c == Combination::Cat {
        ranks.iter().sum()
    } else {
        if ranks.iter().any(|&r| r != ranks[0]) {
            let list: Vec<String> = sources
                .iter()
                .map(|s| format!("{} r {}", s.name, s.config.max_rank()))
                .collect();
            return bad(
                "r",
                format!(
                    "`{}` needs adapters of one rank, got {}; use `cat` (exact, rank = sum of \
                     the ranks)",
                    c.name(),
                    list.join(", ")
                ),
            );
        }
        ranks[0]
    };
    // modules_to_save tensors (heads): from at most one source.
    let mut saved: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut saved_from: Option<&str> = None;
    for s in sources {
        let extra: Vec<(&String, &Tensor)> = s
            .tensors
            .iter()
            .filter(|(k, _)| !k.contains(".lora_A.") && !k.contains(".lora_B."))
            .collect();
        if extra.is_empty() {
            continue;
        }
        if let Some(other) = saved_from {
            return bad(
                "modules_to_save",
                format!(
                    "adapters {other} and {} both carry trained modules ({}), which cannot be \
                     added (PEFT refuses this too); combine adapters whose heads are not trained, \
                     or keep one head by combining it with adapters that have none",
                    s.name,
                    extra
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        saved_from = Some(&s.name);
        saved.extend(extra.into_iter().map(|(k, t)| (k.clone(), t.clone())));
    }

    let mut tensors = saved;
    // Modules whose combined rank is not `new_rank` (non-`cat` combinations of adapters with a
    // rank_pattern): they get their own rank and alpha (scaling 1) in the new config.
    let mut odd_ranks: Vec<(String, usize)> = Vec::new();
    for module in &all {
        let present: Vec<usize> = (0..sources.len())
            .filter(|&i| mods[i].contains(module))
            .collect();
        let key = |side: Side| format!("{PEFT_PREFIX}{module}.{}", side.leaf());
        let get = |i: usize, side: Side| -> Result<Mat> {
            let k = key(side);
            let t = sources[i].tensors.get(&k).ok_or_else(|| {
                Error::Msg(format!(
                    "adapter {} has `{}` but not `{k}`",
                    sources[i].name,
                    key(if side == Side::A { Side::B } else { Side::A })
                ))
            })?;
            Mat::of(t, &k, &sources[i].name)
        };
        let a: Vec<Mat> = present
            .iter()
            .map(|&i| get(i, Side::A))
            .collect::<Result<_>>()?;
        let b: Vec<Mat> = present
            .iter()
            .map(|&i| get(i, Side::B))
            .collect::<Result<_>>()?;
        let (fan_in, fan_out) = (a[0].cols, b[0].rows);
        for (j, &i) in present.iter().enumerate() {
            if a[j].cols != fan_in || b[j].rows != fan_out || a[j].rows != b[j].cols {
                return Err(Error::Msg(format!(
                    "module `{module}`: adapter {} has A {:?} and B {:?}, adapter {} A [_, \
                     {fan_in}] and B [{fan_out}, _]; the adapters are not of one base model",
                    sources[i].name,
                    [a[j].rows, a[j].cols],
                    [b[j].rows, b[j].cols],
                    sources[present[0]].name
                )));
            }
        }
        let ws: Vec<f64> = present
            .iter()
            .map(|&i| Ok(weights[i] * sources[i].config.scale_for(module)?))
            .collect::<Result<_>>()?;
        if c != Combination::Cat {
            if let Some(j) = (1..present.len()).find(|&j| a[j].rows != a[0].rows) {
                return bad(
                    "r",
                    format!(
                        "module `{module}` has rank {} in adapter {} and {} in {}; `{}` needs one \
                         rank per module: use `cat`",
                        a[0].rows,
                        sources[present[0]].name,
                        a[j].rows,
                        sources[present[j]].name,
                        c.name()
                    ),
                );
            }
            if a[0].rows != new_rank {
                odd_ranks.push((regex::escape(module), a[0].rows));
            }
        }
        let (new_a, new_b) = if c == Combination::Cat {
            let mut na = Mat {
                rows: new_rank,
                cols: fan_in,
                v: vec![0.0; new_rank * fan_in],
            };
            let mut nb = Mat {
                rows: fan_out,
                cols: new_rank,
                v: vec![0.0; fan_out * new_rank],
            };
            let mut at = 0;
            for (j, w) in ws.iter().enumerate() {
                let r = a[j].rows;
                for (dst, src) in na.v[at * fan_in..(at + r) * fan_in].iter_mut().zip(&a[j].v) {
                    *dst = src * *w as f32;
                }
                for row in 0..fan_out {
                    nb.v[row * new_rank + at..row * new_rank + at + r]
                        .copy_from_slice(&b[j].v[row * r..(row + 1) * r]);
                }
                at += r;
            }
            (na, nb)
        } else {
            let wa: Vec<f32> = ws
                .iter()
                .map(|w| (w.abs().sqrt() * if *w >= 0.0 { 1.0 } else { -1.0 }) as f32)
                .collect();
            let wb: Vec<f32> = ws.iter().map(|w| w.abs().sqrt() as f32).collect();
            let mut side_merge = |side: Side, mats: &[Mat], w: &[f32]| -> Result<Mat> {
                let vals = merge_values(
                    mats.iter().map(|m| m.v.clone()).collect(),
                    w,
                    &opts,
                    &mut |j, n| {
                        masks.keep(module, side, present[j], n, opts.density.unwrap_or(1.0))
                    },
                )?;
                Ok(Mat {
                    rows: mats[0].rows,
                    cols: mats[0].cols,
                    v: vals,
                })
            };
            (side_merge(Side::A, &a, &wa)?, side_merge(Side::B, &b, &wb)?)
        };
        tensors.insert(key(Side::A), new_a.tensor()?);
        tensors.insert(key(Side::B), new_b.tensor()?);
    }

    let mut config = sources[0].config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.use_rslora = false;
    config.alpha_pattern = Patterns(
        odd_ranks
            .iter()
            .map(|(k, r)| (k.clone(), *r as f64))
            .collect(),
    );
    config.rank_pattern = Patterns(odd_ranks);
    config.target_modules = union_targets(sources, &all)?;
    config.layers_to_transform = None;
    if saved_from.is_none() {
        config.common.modules_to_save = None;
    } else if let Some(s) = sources.iter().find(|s| Some(s.name.as_str()) == saved_from) {
        config.common.modules_to_save = s.config.common.modules_to_save.clone();
    }
    Ok(Combined { config, tensors })
}
