//! Classification metrics.

use serde::Serialize;

/// Accuracy and macro-averaged F1 of predictions against gold labels.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub n: usize,
}

/// Computes accuracy and macro-F1 over `num_labels` classes (a class absent from both gold and
/// predictions is left out of the macro average, as scikit-learn does with `labels=None`).
pub fn classification_metrics(
    pred: &[u32],
    gold: &[u32],
    num_labels: usize,
) -> ClassificationMetrics {
    assert_eq!(pred.len(), gold.len());
    let n = gold.len();
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    let mut f1s = Vec::new();
    for c in 0..num_labels as u32 {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g == c)
            .count() as f64;
        let fp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g != c)
            .count() as f64;
        let fn_ = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p != c && **g == c)
            .count() as f64;
        if tp + fp + fn_ == 0.0 {
            continue;
        }
        f1s.push(if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fn_)
        });
    }
    ClassificationMetrics {
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        macro_f1: if f1s.is_empty() {
            0.0
        } else {
            f1s.iter().sum::<f64>() / f1s.len() as f64
        },
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_sklearn() {
        // sklearn.metrics.f1_score([0,0,1,1,2,2], [0,1,1,1,2,0], average="macro") = (0.5 + 0.8 + 2/3) / 3
        let m = classification_metrics(&[0, 1, 1, 1, 2, 0], &[0, 0, 1, 1, 2, 2], 3);
        assert!(
            (m.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-9,
            "{m:?}"
        );
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
    }
}
