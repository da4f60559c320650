//! Automatic choice of the delta method: task features, a documented rule set that turns them
//! into a prior over methods with starting settings, and the plan of successive halving that
//! spends the budget on measured dev metrics.

use serde::{Deserialize, Serialize};

/// What is known about the task before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskFeatures {
    /// `classify` or `generate` (studies recorded before this field are classification).
    #[serde(default = "classify")]
    pub task: String,
    /// Generation: mean completion length in tokens (0 for classification).
    #[serde(default)]
    pub mean_output_tokens: f64,
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
/// - Base scores from the measured table (docs/methods.md, test accuracy on Rotten Tomatoes):
///   adapter 1.0 (0.834), LoRA 1.0 (0.827), IA3 0.9 (0.807), BitFit 0.8 (0.795, two seeds),
///   prefix 0.8 (0.794), prompt tuning 0.6 (0.757): prompt and prefix are the least accurate
///   at this scale. Ties keep this order.
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
fn classify() -> String {
    "classify".into()
}

/// The prior of a generation task on a decoder: base scores and learning rates from the
/// decoder's method table (docs/methods-decoder.md: SmolLM2-135M on G2P); BitFit is left out
/// (Llama-family decoders have no biases).
fn decoder_prior(f: &TaskFeatures) -> Vec<Candidate> {
    // Measured (docs/methods-decoder.md, test exact match on 1,000 words after one epoch on
    // 2,000): adapter 0.062, LoRA on every linear layer 0.050, IA3 0.020, prompt 0.009,
    // prefix 0.002.
    let mut c: Vec<Candidate> = [
        ("adapter", 1.0, "1e-3"),
        ("lora", 1.0, "1e-3"),
        ("ia3", 0.8, "1e-2"),
        ("prompt", 0.5, "3e-2"),
        ("prefix", 0.5, "1e-2"),
    ]
    .iter()
    .map(|(m, s, lr)| {
        let mut settings = vec![("train.lr".to_string(), lr.to_string())];
        if *m == "lora" {
            // LoRA on q/v only reached 0.011 in the same table.
            settings.push(("lora.target_modules".into(), "all-linear".into()));
        }
        Candidate {
            method: m.to_string(),
            score: *s,
            settings,
            reasons: vec![format!("base score {s} from the decoder's method table")],
        }
    })
    .collect();
    if f.mean_output_tokens > 8.0 {
        for x in c
            .iter_mut()
            .filter(|x| x.method == "prompt" || x.method == "prefix")
        {
            x.score -= 0.2;
            x.reasons.push(format!(
                "-0.2: long completions (mean {:.0} tokens): the output needs more than a steer",
                f.mean_output_tokens
            ));
        }
    }
    c.sort_by(|a, b| b.score.total_cmp(&a.score));
    c
}

pub fn prior(f: &TaskFeatures) -> Vec<Candidate> {
    if f.task == "generate" {
        return decoder_prior(f);
    }
    let mut c: Vec<Candidate> = [
        ("adapter", 1.0, "1e-3"),
        ("lora", 1.0, "5e-4"),
        ("ia3", 0.9, "3e-3"),
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
    fn coords(&self) -> [f64; 6] {
        [
            // A different kind of task is far away.
            if self.task == "generate" { 3.0 } else { 0.0 },
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

/// Methods whose prior score is within this margin of the best one contend in the halving.
pub const CONTENDER_MARGIN: f64 = 0.15;
/// The halving tries at most this many methods (more would starve the first rung).
pub const MAX_CONTENDERS: usize = 4;

/// How many of the prior's candidates (sorted best first) contend: those within
/// [`CONTENDER_MARGIN`] of the best score, at least 2 (a halving needs a choice) and at most
/// [`MAX_CONTENDERS`]; `cap` (a user's `--candidates`) overrides the margin. The plan may drop
/// more when the budget cannot give each an informative first rung ([`Plan::fit`]).
pub fn contenders(candidates: &[Candidate], cap: Option<usize>) -> usize {
    let n = match cap {
        Some(k) => k,
        None => {
            let best = candidates.first().map_or(0.0, |c| c.score);
            candidates
                .iter()
                .filter(|c| c.score >= best - CONTENDER_MARGIN - 1e-9)
                .count()
                .clamp(2, MAX_CONTENDERS)
        }
    };
    n.clamp(1, candidates.len().max(1))
}

/// The successive-halving schedule: rung `k` trains the survivors for `base_steps * eta^k`
/// optimiser steps; the best `1/eta` (at least one) go on; the winner is then trained to the
/// end (budgeted separately).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub candidates: usize,
    pub rungs: Vec<(usize, usize)>,
    pub eta: usize,
}

impl Plan {
    /// The rungs for `n` candidates with first-rung length `base`, no rung longer than `max`
    /// steps: survivors halve (rounding up) until one is left; that last one is the winner's
    /// final training, not a rung.
    fn schedule(n: usize, base: usize, eta: usize, max: usize) -> Vec<(usize, usize)> {
        let mut rungs = Vec::new();
        let mut k = n;
        let mut steps = base;
        while k > 1 {
            rungs.push((k, steps.min(max)));
            k = k.div_ceil(eta);
            steps *= eta;
        }
        rungs
    }

    /// Fits the schedule into `seconds` given one step's cost `step_seconds` and each run's
    /// fixed cost `run_seconds` (loading, evaluation): `eta` 2, the largest first rung that
    /// fits (at most `max_steps`), and as many of the first `max_candidates` as can each get a
    /// first rung of at least `min_steps`: a rung too short to move any method off the
    /// majority class tells them apart by nothing. With no room even for two, two run
    /// `min_steps` (the budget is overspent rather than the choice made blind).
    pub fn fit(
        max_candidates: usize,
        seconds: f64,
        step_seconds: f64,
        run_seconds: f64,
        min_steps: usize,
        max_steps: usize,
    ) -> Self {
        let eta = 2;
        let min_steps = min_steps.min(max_steps).max(1);
        let base_for = |n: usize| -> usize {
            let unit = Self::schedule(n, 1, eta, usize::MAX);
            let units: usize = unit.iter().map(|(m, s)| m * s).sum();
            let runs: usize = unit.iter().map(|(m, _)| m).sum();
            let left = seconds - runs as f64 * run_seconds;
            if left <= 0.0 || units == 0 {
                return 0;
            }
            ((left / step_seconds.max(1e-6)) / units as f64).floor() as usize
        };
        let n = (2..=max_candidates)
            .rev()
            .find(|&n| base_for(n) >= min_steps)
            .unwrap_or(max_candidates.min(2));
        let base = base_for(n).clamp(min_steps, max_steps.max(min_steps));
        Self {
            candidates: n,
            rungs: Self::schedule(n, base, eta, max_steps.max(min_steps)),
            eta,
        }
    }

    /// The steps this plan trains in all.
    pub fn total_steps(&self) -> usize {
        self.rungs.iter().map(|(m, s)| m * s).sum()
    }

    /// The training runs this plan starts.
    pub fn runs(&self) -> usize {
        self.rungs.iter().map(|(m, _)| m).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize, tokens: f64) -> TaskFeatures {
        TaskFeatures {
            task: "classify".into(),
            mean_output_tokens: 0.0,
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
    fn a_generation_task_gets_the_decoder_prior_without_bitfit() {
        let mut f = features(8_000, 22.0);
        f.task = "generate".into();
        f.mean_output_tokens = 12.0;
        let p = prior(&f);
        assert!(p[0].method == "adapter" || p[0].method == "lora");
        assert!(p.iter().all(|c| c.method != "bitfit"));
        let prompt = p.iter().find(|c| c.method == "prompt").unwrap();
        assert!(prompt
            .reasons
            .iter()
            .any(|r| r.contains("long completions")));
        // A classification study says little about a generation task.
        assert!(f.similarity(&features(8_000, 22.0)) < 0.05);
    }

    #[test]
    fn rules_move_the_prior_as_documented() {
        let big = prior(&features(10_000, 27.0));
        assert_eq!(big[0].method, "adapter");
        assert_eq!(big[1].method, "lora");
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
        let p = Plan::fit(6, 600.0, 0.5, 0.0, 10, 10_000);
        let ms: Vec<usize> = p.rungs.iter().map(|r| r.0).collect();
        assert_eq!(ms, [6, 3, 2]);
        assert_eq!(p.rungs[1].1, 2 * p.rungs[0].1);
        assert_eq!(p.rungs[2].1, 4 * p.rungs[0].1);
        assert!(p.total_steps() as f64 * 0.5 <= 600.0 + 1e-9);
        // The fixed cost of each run comes out of the budget too.
        let q = Plan::fit(6, 600.0, 0.5, 10.0, 10, 10_000);
        assert!(q.total_steps() as f64 * 0.5 + q.runs() as f64 * 10.0 <= 600.0 + 1e-9);
        assert!(q.rungs[0].1 < p.rungs[0].1);
        // No rung is longer than the whole training.
        let capped = Plan::fit(3, 1e9, 0.1, 0.0, 5, 100);
        assert_eq!(capped.rungs, [(3, 100), (2, 100)]);
        // A tiny budget still trains the minimum, with two candidates.
        let p = Plan::fit(4, 1.0, 1.0, 0.0, 5, 100);
        assert_eq!(p.rungs, [(2, 5)]);
        // Rotten Tomatoes on 2 cores: 316 steps an epoch at 0.63 s, 20 s a run, 1,000 s for
        // the halving. Six methods would get 46-step first rungs (the majority class for all of
        // them in a measured run); the plan keeps the first rung at half an epoch or more by
        // trying fewer.
        let rt = Plan::fit(6, 1000.0, 0.63, 20.0, 158, 948);
        assert!(rt.candidates < 6 && rt.candidates >= 2, "{rt:?}");
        assert!(rt.rungs[0].1 >= 158, "{rt:?}");
        assert!(rt.total_steps() as f64 * 0.63 + rt.runs() as f64 * 20.0 <= 1000.0);
        assert_eq!(
            Plan::fit(3, 1000.0, 0.63, 20.0, 158, 948).rungs,
            [(3, 204), (2, 408)]
        );
    }

    #[test]
    fn contenders_are_the_close_ones() {
        let c = prior(&features(10_000, 27.0));
        // adapter 1.0, lora 1.0, ia3 0.9 are within the margin; bitfit and prefix (0.8) not.
        assert_eq!(contenders(&c, None), 3);
        let names: Vec<&str> = c[..3].iter().map(|x| x.method.as_str()).collect();
        assert_eq!(names, ["adapter", "lora", "ia3"]);
        assert_eq!(contenders(&c, Some(6)), 6);
        assert_eq!(contenders(&c, Some(60)), c.len());
        // A prior with one clear favourite still compares two.
        let mut one = c.clone();
        one[0].score = 5.0;
        assert_eq!(contenders(&one, None), 2);
    }
}
