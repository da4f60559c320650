//! A trained classifier loaded from its adapter folder and asked for predictions.

use std::path::Path;

use anyhow::Result;

use crate::session::{self, Classifier};

/// A trained text classifier: an adapter folder `deltatune train` wrote (or PEFT's
/// `save_pretrained` for sequence classification), loaded on its base model, an encoder or a
/// decoder.
///
/// ```no_run
/// let clf = deltatune::Adapter::load("runs/default")?;
/// for p in clf.predict(&["a gorgeous, witty film", "a dull mess"])? {
///     println!("{} {:.3}", p.label, p.probability);
/// }
/// # Ok::<(), anyhow::Error>(())
/// ```
pub struct Adapter {
    clf: Classifier,
}

/// One text's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The most probable class's name.
    pub label: String,
    /// Its probability.
    pub probability: f32,
    /// Every class's probability, in the order of [`Adapter::labels`].
    pub probabilities: Vec<f32>,
}

impl Adapter {
    /// Loads the adapter folder `dir` on the base model it names.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self {
            clf: session::load_classifier(dir.as_ref(), None)?,
        })
    }

    /// Loads the adapter folder `dir` on `base` (a model folder, a GGUF file or a short name)
    /// instead of the base it names (PEFT's folders often name a hub id).
    pub fn load_on(dir: impl AsRef<Path>, base: &str) -> Result<Self> {
        Ok(Self {
            clf: session::load_classifier(dir.as_ref(), Some(base))?,
        })
    }

    /// The class names.
    pub fn labels(&self) -> &[String] {
        self.clf.labels().labels()
    }

    /// The loaded classifier (its model and the run that trained it).
    pub fn classifier(&self) -> &Classifier {
        &self.clf
    }

    /// Class probabilities of `texts`, and the most probable class of each.
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<Prediction>> {
        let probs = self.clf.predict(texts, 64)?;
        Ok(probs
            .into_iter()
            .map(|p| {
                let (best, probability) =
                    p.iter()
                        .enumerate()
                        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                Prediction {
                    label: self
                        .clf
                        .labels()
                        .label(best as u32)
                        .unwrap_or("?")
                        .to_string(),
                    probability,
                    probabilities: p,
                }
            })
            .collect())
    }
}
