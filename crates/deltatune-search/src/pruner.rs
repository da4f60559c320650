//! Pruners: stop unpromising trials early from the intermediate values (dev metric after each
//! epoch or N steps) that the trainer reports.

use crate::space::Direction;

/// Intermediate values of the other trials of the study.
#[derive(Debug, Clone)]
pub struct Curve {
    /// (step, value) in step order.
    pub values: Vec<(usize, f64)>,
    /// Whether the trial ran to the end.
    pub complete: bool,
}

impl Curve {
    fn at(&self, step: usize) -> Option<f64> {
        self.values
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, v)| *v)
    }
}

/// Decides, after a trial reported `value` at `step`, whether to stop it.
pub trait Pruner: Send + Sync {
    fn prune(&self, dir: Direction, step: usize, value: f64, others: &[Curve]) -> bool;
    fn name(&self) -> &'static str;
}

/// Never prunes.
#[derive(Debug, Clone, Default)]
pub struct NoPruner;

impl Pruner for NoPruner {
    fn prune(&self, _: Direction, _: usize, _: f64, _: &[Curve]) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "none"
    }
}

/// Median stopping (Golovin et al. 2017, Google Vizier): prune when the value at a step is
/// worse than the median of the values other trials reported at that step, once
/// `n_startup` trials are complete and after `n_warmup` steps.
#[derive(Debug, Clone)]
pub struct MedianPruner {
    pub n_startup: usize,
    pub n_warmup: usize,
}

impl Default for MedianPruner {
    fn default() -> Self {
        Self {
            n_startup: 5,
            n_warmup: 0,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

impl Pruner for MedianPruner {
    fn prune(&self, dir: Direction, step: usize, value: f64, others: &[Curve]) -> bool {
        if step < self.n_warmup || others.iter().filter(|c| c.complete).count() < self.n_startup {
            return false;
        }
        let at: Vec<f64> = others.iter().filter_map(|c| c.at(step)).collect();
        if at.is_empty() {
            return false;
        }
        dir.better(median(at), value)
    }
    fn name(&self) -> &'static str {
        "median"
    }
}

/// Asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel
/// Hyperparameter Tuning"): rungs at steps `min_resource * eta^k`; a trial reaching a rung
/// continues only if its value is in the best `1/eta` of the values recorded at that rung so
/// far (itself included). With fewer than `eta` values at a rung it continues.
#[derive(Debug, Clone)]
pub struct AshaPruner {
    pub min_resource: usize,
    pub eta: usize,
}

impl Default for AshaPruner {
    fn default() -> Self {
        Self {
            min_resource: 1,
            eta: 3,
        }
    }
}

impl AshaPruner {
    /// Whether `step` is a rung.
    pub fn is_rung(&self, step: usize) -> bool {
        let mut r = self.min_resource.max(1);
        while r < step {
            r *= self.eta.max(2);
        }
        r == step
    }
}

impl Pruner for AshaPruner {
    fn prune(&self, dir: Direction, step: usize, value: f64, others: &[Curve]) -> bool {
        if !self.is_rung(step) {
            return false;
        }
        let mut at: Vec<f64> = others.iter().filter_map(|c| c.at(step)).collect();
        at.push(value);
        let eta = self.eta.max(2);
        if at.len() < eta {
            return false;
        }
        let keep = at.len() / eta;
        // Rank of `value` among the values at this rung (0 = best).
        let rank = at.iter().filter(|v| dir.better(**v, value)).count();
        rank >= keep.max(1)
    }
    fn name(&self) -> &'static str {
        "asha"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(vals: &[f64], complete: bool) -> Curve {
        Curve {
            values: vals.iter().enumerate().map(|(i, v)| (i + 1, *v)).collect(),
            complete,
        }
    }

    #[test]
    fn median_prunes_below_the_median_after_startup() {
        let p = MedianPruner {
            n_startup: 3,
            n_warmup: 1,
        };
        let others = [
            curve(&[0.5, 0.6], true),
            curve(&[0.6, 0.7], true),
            curve(&[0.7, 0.8], true),
        ];
        let max = Direction::Maximize;
        assert!(p.prune(max, 1, 0.55, &others));
        assert!(!p.prune(max, 1, 0.65, &others));
        assert!(!p.prune(max, 0, 0.0, &others), "warm-up");
        assert!(!p.prune(max, 1, 0.1, &others[..2]), "startup");
        assert!(!p.prune(Direction::Minimize, 1, 0.55, &others));
    }

    #[test]
    fn asha_keeps_the_top_third_at_rungs_only() {
        let p = AshaPruner {
            min_resource: 1,
            eta: 3,
        };
        assert!(p.is_rung(1) && p.is_rung(3) && p.is_rung(9) && !p.is_rung(2));
        let others: Vec<Curve> = [0.1, 0.2, 0.3, 0.4, 0.5]
            .iter()
            .map(|v| curve(&[*v, *v, *v], false))
            .collect();
        let max = Direction::Maximize;
        // 6 values at rung 1: the best 2 continue.
        assert!(!p.prune(max, 1, 0.45, &others));
        assert!(p.prune(max, 1, 0.35, &others));
        assert!(!p.prune(max, 2, 0.0, &others), "not a rung");
        assert!(!p.prune(max, 1, 0.0, &others[..1]), "fewer than eta");
    }
}
