//! Prompt tuning (Lester et al. 2021): trainable vectors inserted into the input embeddings,
//! PEFT-compatible (`adapter_model.safetensors` holds `prompt_embeddings` [P, hidden]).

mod config;

use std::sync::Arc;

use candle_core::{Tensor, Var};
use deltatune_core::hooks::SiteDelta;
use deltatune_core::{Ctx, HasSites, Result, Rng};

pub(crate) use config::bad;
pub use config::{PromptPosition, PromptTuningConfig, PromptTuningInit};

use crate::delta::{train_modules, Trainable};
use crate::method::{method_basics, unmergeable, Method, ToFields};

/// The key of the soft prompt in `adapter_model.safetensors` (PEFT's).
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// A fixed or trainable prompt `[P, hidden]` returned at the embedding site.
#[derive(Debug, Clone)]
pub struct PromptDelta {
    /// The prompt; when it is a [`Var`]'s tensor, it trains and later `Var::set` calls show.
    pub prompt: Tensor,
    /// Before the first token (PEFT's placement) instead of after it.
    pub at_start: bool,
}

impl PromptDelta {
    pub fn new(prompt: Tensor) -> Self {
        Self {
            prompt,
            at_start: false,
        }
    }
}

impl SiteDelta for PromptDelta {
    fn prompt(&self, _ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.prompt.clone()))
    }

    fn prompt_at_start(&self) -> bool {
        self.at_start
    }
}

/// Root-mean-square entry of a matrix (the scale of the model's word embeddings).
pub(crate) fn rms(t: &Tensor) -> Result<f64> {
    let ms: f32 = t.sqr()?.mean_all()?.to_scalar()?;
    Ok(f64::from(ms).sqrt())
}

/// `n` rows of the word-embedding matrix at ids drawn uniformly from the vocabulary.
///
/// # Shapes
/// `words`: [vocab, hidden] -> [n, hidden]
pub(crate) fn sample_vocab(words: &Tensor, n: usize, rng: &mut Rng) -> Result<Tensor> {
    let vocab = words.dim(0)?;
    let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let ids = Tensor::new(ids.as_slice(), words.device())?;
    Ok(words.index_select(&ids, 0)?.detach().copy()?)
}

/// The initial prompt `[P, hidden]` for `cfg` (see [`PromptTuningInit`]).
pub fn initial_prompt(
    model: &dyn HasSites,
    cfg: &PromptTuningConfig,
    rng: &Rng,
    init_text_ids: Option<&[u32]>,
) -> Result<Tensor> {
    let words = &model.word_embeddings();
    let (vocab, hidden) = words.dims2()?;
    let p = cfg.num_virtual_tokens;
    let mut r = rng.derive(PROMPT_KEY);
    let t = match cfg.prompt_tuning_init {
        PromptTuningInit::Random => r
            .normal_tensor((p, hidden), rms(words)?)?
            .to_dtype(words.dtype())?,
        PromptTuningInit::SampleVocab => sample_vocab(words, p, &mut r)?,
        PromptTuningInit::Text => {
            let ids =
                match init_text_ids {
                    Some(ids) if !ids.is_empty() => ids,
                    _ => return bad(
                        "prompt_tuning_init_text",
                        "prompt_tuning_init TEXT needs the token ids of prompt_tuning_init_text; \
                         tokenise the text and pass its ids to prompt::attach"
                            .into(),
                    ),
                };
            if let Some(bad_id) = ids.iter().find(|&&i| i as usize >= vocab) {
                return bad(
                    "prompt_tuning_init_text",
                    format!(
                        "token id {bad_id} is outside the vocabulary (ids 0..{vocab}); was the \
                         text tokenised with this model's tokenizer?"
                    ),
                );
            }
            // PEFT: repeat the ids until there are enough, then keep the first P.
            let ids: Vec<u32> = ids.iter().copied().cycle().take(p).collect();
            let ids = Tensor::new(ids.as_slice(), words.device())?;
            words.index_select(&ids, 0)?.detach().copy()?
        }
    };
    Ok(t)
}

/// Attaches a soft prompt of `cfg.num_virtual_tokens` vectors and makes `modules_to_save`
/// trainable. `init_text_ids` are the token ids of `prompt_tuning_init_text` (needed only with
/// `TEXT`; tokenising is the caller's job). The prompt trains under the key
/// [`PROMPT_KEY`], without weight decay.
pub fn attach(
    model: &mut dyn HasSites,
    cfg: &PromptTuningConfig,
    rng: &Rng,
    init_text_ids: Option<&[u32]>,
) -> Result<Vec<Trainable>> {
    cfg.validate()?;
    let hidden = model.hidden_size();
    if let Some(td) = cfg.token_dim {
        if td != hidden {
            return bad(
                "token_dim",
                format!("{td} differs from the model's hidden size {hidden}; use {hidden}"),
            );
        }
    }
    let init = initial_prompt(model, cfg, rng, init_text_ids)?;
    let var = Var::from_tensor(&init)?;
    let mut out = vec![Trainable::new(PROMPT_KEY.into(), var.clone(), false)];
    out.extend(train_modules(
        model,
        &cfg.common.modules_to_save.clone().unwrap_or_default(),
    )?);
    model.attach_site_delta(Arc::new(PromptDelta {
        prompt: var.as_tensor().clone(),
        at_start: cfg.prompt_position == PromptPosition::Start,
    }));
    Ok(out)
}

impl Method for PromptTuningConfig {
    method_basics!("prompt", "PROMPT_TUNING");

    fn fields_json(&self, model: &dyn HasSites) -> serde_json::Value {
        self.completed(model).to_fields()
    }

    fn attach(
        &self,
        model: &mut dyn HasSites,
        rng: &Rng,
        init_text_ids: Option<&[u32]>,
    ) -> Result<Vec<Trainable>> {
        attach(model, self, rng, init_text_ids)
    }

    fn merge_blocker(&self) -> Option<String> {
        unmergeable("prompt tuning adds input vectors (the sequence gets longer); no weight change reproduces them")
    }

    fn init_text(&self) -> Option<&str> {
        self.prompt_tuning_init_text.as_deref()
    }
}
