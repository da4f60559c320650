//! Automatic choice of the delta method: task features, a documented rule set that turns them
//! into a prior over methods with starting settings, and the plan of successive halving that
//! spends the budget on measured dev metrics.

use serde::{Deserialize, Serialize};

/// What is known about the task before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskFeatures {
    pub train_examples: usize,
    pub labels: usize,
    pub mean_tokens: f64,
    pub max_tokens: usize,
    /// Share of the rarest label in the training set (1/labels when balanced).
    pub min_label_share: f64,
    pub model_params: usize,
    pub model_layers: usize,
    pub hidden: usize,
}

/// A method with its prior score, starting settings (`train --set` pairs) and the rules that
/// produced them.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub method: String,
    pub score: f64,
    pub settings: Vec<(String, String)>,
    pub reasons: Vec<String>,
}

/// The rule set (version 1). Each rule adds to a method's score and says why; a method's
/// starting learning rate is its single-method rate on MiniLM / Rotten Tomatoes
/// (docs/methods.md).
///
/// - Base scores from the measured table: LoRA 1.0, IA3 0.9, adapter 0.9, BitFit 0.8,
///   prefix 0.8, prompt tuning 0.6 (prompt and prefix are the least accurate at this scale).
/// - Few examples (< 1,000): +0.3 to the methods with the fewest parameters (IA3, BitFit,
///   prompt), -0.2 to the larger ones (adapter, LoRA r 8 stays but r becomes 4): fewer
///   parameters overfit less.
/// - Many examples (> 20,000): +0.2 to LoRA and adapters, which have capacity to use them.
/// - Long inputs (mean > 128 tokens): -0.3 to prompt and prefix tuning (their extra tokens
///   cost attention time, and their gain is smallest on long inputs).
/// - Many labels (> 10): +0.1 to LoRA and adapters; the head alone carries less.
/// - Imbalanced labels (rarest < half its balanced share): no method change, but the report
///   warns that accuracy hides the rare class (macro-F1 is printed beside it).
/// - Small models (< 50M parameters): prompt tuning -0.2 (it needs scale: Lester et al. 2021).
pub fn prior(f: &TaskFeatures) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = [
        ("lora", 1.0, "5e-4"),
        ("ia3", 0.9, "3e-3"),
        ("adapter", 0.9, "1e-3"),
        ("bitfit", 0.8, "1e-3"),
        ("prefix", 0.8, "1e-2"),
        ("prompt", 0.6, "3e-2"),
    ]
    .iter()
    .map(|(m, s, lr)| Candidate {
        method: m.to_string(),
        score: *s,
        settings: vec![("train.lr".into(), lr.to_string())],
        reasons: vec![format!("base score {s} from the measured method table")],
    })
    .collect();
    let mut adjust = |methods: &[&str], delta: f64, why: &str| {
        for x in c
            .iter_mut()
            .filter(|x| methods.contains(&x.method.as_str()))
        {
            x.score += delta;
            x.reasons.push(format!("{delta:+.1}: {why}"));
        }
    };
    if f.train_examples < 1000 {
        adjust(
            &["ia3", "bitfit", "prompt"],
            0.3,
            &format!(
                "few examples ({}): few parameters overfit less",
                f.train_examples
            ),
        );
        adjust(&["adapter"], -0.2, "few examples: many parameters overfit");
    }
    if f.train_examples > 20_000 {
        adjust(
            &["lora", "adapter"],
            0.2,
            &format!("many examples ({}): capacity pays", f.train_examples),
        );
    }
    if f.mean_tokens > 128.0 {
        adjust(
            &["prompt", "prefix"],
            -0.3,
            &format!(
                "long inputs (mean {:.0} tokens): virtual tokens cost and help least",
                f.mean_tokens
            ),
        );
    }
    if f.labels > 10 {
        adjust(
            &["lora", "adapter"],
            0.1,
            &format!("{} labels: the head alone carries less", f.labels),
        );
    }
    if f.model_params < 50_000_000 {
        adjust(
            &["prompt"],
            -0.2,
            &format!(
                "small model ({:.1}M parameters): prompt tuning needs scale",
                f.model_params as f64 / 1e6
            ),
        );
    }
    if f.train_examples < 1000 {
        for x in c.iter_mut().filter(|x| x.method == "lora") {
            x.settings.push(("lora.r".into(), "4".into()));
            x.reasons.push("few examples: rank 4".into());
        }
    }
    c.sort_by(|a, b| b.score.total_cmp(&a.score));
    c
}

/// The sampler name under which `deltatune auto` records its studies.
pub const AUTO_SAMPLER: &str = "auto-halving";

/// One method's result in a finished auto study: (study, method, dev accuracy at the rung
/// everyone reached, i.e. the first), with the features of that study's task when recorded.
#[derive(Debug, Clone)]
pub struct PastResult {
    pub study: String,
    pub method: String,
    pub value: f64,
    pub features: Option<TaskFeatures>,
}

impl TaskFeatures {
    /// The coordinates in which tasks are compared: log10 of the training-set size, log2 of
    /// the number of labels and of the mean length in tokens, the label balance (rarest share
    /// times the number of labels: 1 when balanced) and log10 of the model size. One unit is
    /// 10x the data, 2x the labels or the length, a fully skewed label set, or a 10x model.
    fn coords(&self) -> [f64; 5] {
        [
            (self.train_examples.max(1) as f64).log10(),
            (self.labels.max(1) as f64).log2(),
            self.mean_tokens.max(1.0).log2(),
            self.min_label_share * self.labels as f64,
            (self.model_params.max(1) as f64).log10(),
        ]
    }

    /// How much a past task's results speak for this one: exp(-d^2 / 2) with d the Euclidean
    /// distance of [`TaskFeatures::coords`]; 1 for the same task, about 0.6 one unit away.
    pub fn similarity(&self, other: &TaskFeatures) -> f64 {
        let (a, b) = (self.coords(), other.coords());
        let d2: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        (-d2 / 2.0).exp()
    }
}

/// Weight of a past study whose task features were not recorded.
const UNKNOWN_TASK_WEIGHT: f64 = 0.3;

/// Refines the prior with finished auto studies, a model fitted on the store: within each past
/// study the first-rung values are standardised (z-scores); each study is weighted by how
/// similar its task is to this one ([`TaskFeatures::similarity`]); a method's bonus is
/// 0.3 x (weighted mean z) x W / (W + 1), W the total weight of the studies where it ran (so
/// little or distant evidence moves the prior little), clamped to [-0.5, 0.5], once at least 2
/// past studies exist. A per-method offset that depends on the task through the weights: the
/// methods that won on similar tasks gain, those that won on very different tasks barely count.
pub fn refine(candidates: &mut [Candidate], past: &[PastResult], task: &TaskFeatures) {
    let mut studies: Vec<&str> = past.iter().map(|p| p.study.as_str()).collect();
    studies.sort();
    studies.dedup();
    if studies.len() < 2 {
        return;
    }
    // method -> [(z, weight)]
    let mut z: std::collections::BTreeMap<&str, Vec<(f64, f64)>> = Default::default();
    for s in &studies {
        let rows: Vec<&PastResult> = past.iter().filter(|p| p.study == *s).collect();
        let n = rows.len() as f64;
        if n < 2.0 {
            continue;
        }
        let w = rows[0]
            .features
            .as_ref()
            .map_or(UNKNOWN_TASK_WEIGHT, |f| task.similarity(f));
        let mean = rows.iter().map(|r| r.value).sum::<f64>() / n;
        let sd = (rows.iter().map(|r| (r.value - mean).powi(2)).sum::<f64>() / n).sqrt();
        for r in rows {
            let zr = if sd > 1e-12 {
                (r.value - mean) / sd
            } else {
                0.0
            };
            z.entry(r.method.as_str()).or_default().push((zr, w));
        }
    }
    for c in candidates.iter_mut() {
        if let Some(v) = z.get(c.method.as_str()) {
            let w: f64 = v.iter().map(|x| x.1).sum();
            if w < 1e-9 {
                continue;
            }
            let mean = v.iter().map(|x| x.0 * x.1).sum::<f64>() / w;
            let bonus = (0.3 * mean * w / (w + 1.0)).clamp(-0.5, 0.5);
            c.score += bonus;
            c.reasons.push(format!(
                "{bonus:+.2}: {} past auto studies in the store (similarity-weighted mean \
                 standardised score {mean:+.2}, total similarity {w:.2})",
                v.len(),
            ));
        }
    }
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
}

/// The successive-halving schedule: rung `k` trains the survivors for `base_steps * eta^k`
/// optimiser steps; the best `1/eta` (at least one) go on; the winner is then trained to the
/// end.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub candidates: usize,
    pub rungs: Vec<(usize, usize)>,
    pub eta: usize,
}

impl Plan {
    /// Fits the schedule into `seconds` for the halving (the final training is budgeted
    /// separately) given one step's cost `step_seconds`: starts from `n` candidates, `eta` 2,
    /// and the largest base that fits, at least `min_steps`.
    pub fn fit(
        n: usize,
        seconds: f64,
        step_seconds: f64,
        min_steps: usize,
        max_steps: usize,
    ) -> Self {
        let eta = 2;
        let mut rungs_n = Vec::new();
        let mut k = n;
        while k > 1 {
            rungs_n.push(k);
            k = k.div_ceil(eta);
        }
        rungs_n.push(1.max(k));
        // Rung i costs rungs_n[i] * base * eta^i steps; the last rung (1 survivor) is the
        // winner's final training, budgeted separately, so it is dropped here.
        rungs_n.pop();
        let units: f64 = rungs_n
            .iter()
            .enumerate()
            .map(|(i, &m)| m as f64 * (eta as f64).powi(i as i32))
            .sum();
        let base = ((seconds / step_seconds.max(1e-6)) / units.max(1.0)).floor() as usize;
        let base = base.clamp(min_steps, max_steps.max(min_steps));
        Self {
            candidates: n,
            rungs: rungs_n
                .iter()
                .enumerate()
                .map(|(i, &m)| (m, base * eta.pow(i as u32)))
                .collect(),
            eta,
        }
    }

    /// The steps this plan trains in all.
    pub fn total_steps(&self) -> usize {
        self.rungs.iter().map(|(m, s)| m * s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize, tokens: f64) -> TaskFeatures {
        TaskFeatures {
            train_examples: n,
            labels: 2,
            mean_tokens: tokens,
            max_tokens: 80,
            min_label_share: 0.45,
            model_params: 22_700_000,
            model_layers: 6,
            hidden: 384,
        }
    }

    #[test]
    fn rules_move_the_prior_as_documented() {
        let big = prior(&features(10_000, 27.0));
        assert_eq!(big[0].method, "lora");
        let small = prior(&features(300, 27.0));
        let pos = |c: &[Candidate], m: &str| c.iter().position(|x| x.method == m).unwrap();
        assert!(pos(&small, "bitfit") < pos(&big, "bitfit"));
        assert!(small
            .iter()
            .any(|c| c.settings.contains(&("lora.r".into(), "4".into()))));
        let long = prior(&features(10_000, 300.0));
        let score = |c: &[Candidate], m: &str| c.iter().find(|x| x.method == m).unwrap().score;
        assert!(score(&long, "prefix") < score(&big, "prefix"));
        assert!(long
            .iter()
            .find(|x| x.method == "prefix")
            .unwrap()
            .reasons
            .iter()
            .any(|r| r.contains("long inputs")));
    }

    #[test]
    fn past_studies_refine_the_prior() {
        let mut c = prior(&features(10_000, 27.0));
        let before = c.iter().find(|x| x.method == "prompt").unwrap().score;
        let task = features(10_000, 27.0);
        let past_on = |f: TaskFeatures| -> Vec<PastResult> {
            ["s1", "s2", "s3"]
                .iter()
                .flat_map(|s| {
                    [("lora", 0.70), ("prompt", 0.80), ("bitfit", 0.60)].map(|(m, v)| PastResult {
                        study: s.to_string(),
                        method: m.into(),
                        value: v,
                        features: Some(f.clone()),
                    })
                })
                .collect()
        };
        let same = past_on(task.clone());
        let mut c1 = c.clone();
        refine(&mut c1, &same[..3], &task);
        assert_eq!(
            c1.iter().find(|x| x.method == "prompt").unwrap().score,
            before,
            "one study is not enough"
        );
        refine(&mut c, &same, &task);
        let after = c.iter().find(|x| x.method == "prompt").unwrap();
        assert!(after.score > before + 0.25, "{after:?}");
        assert!(after.reasons.last().unwrap().contains("past auto studies"));
        // The same results on a very different task (100x less data, 8x longer inputs) barely
        // move the prior.
        let far = past_on(features(100, 216.0));
        let mut c2 = prior(&task);
        refine(&mut c2, &far, &task);
        let moved = c2.iter().find(|x| x.method == "prompt").unwrap().score - before;
        assert!(moved.abs() < 0.01, "{moved}");
        assert!(task.similarity(&task) > 0.999);
    }

    #[test]
    fn plan_fits_the_budget_and_halves() {
        let p = Plan::fit(6, 600.0, 0.5, 10, 10_000);
        let ms: Vec<usize> = p.rungs.iter().map(|r| r.0).collect();
        assert_eq!(ms, [6, 3, 2]);
        assert_eq!(p.rungs[1].1, 2 * p.rungs[0].1);
        assert!(p.total_steps() as f64 * 0.5 <= 600.0 + 1e-9);
        // A tiny budget still trains the minimum.
        let p = Plan::fit(4, 1.0, 1.0, 5, 100);
        assert_eq!(p.rungs[0].1, 5);
    }
}
