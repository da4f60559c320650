//! Images as training examples: an [`ImageSet`] batched into pixel tensors for any backbone
//! that reads pixels (the ViT), decoded by worker threads while the previous batch trains.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::Tensor;
use deltatune_data::images::{Batcher, ImageSet, PrefetchOptions, Prefetcher, Preprocess};
use deltatune_models::Backbone;

use crate::trainer::{Examples, Labelled};
use crate::{Result, TrainError};

/// Labelled images, preprocessed on demand. With prefetching, the batches the trainer
/// announced for the epoch ([`Examples::begin_epoch`]) are prepared ahead in order; any other
/// request (evaluation, a changed plan) is prepared on the spot.
pub struct ImageExamples {
    batcher: Batcher,
    prefetch: Option<PrefetchOptions>,
    epoch: Cell<u64>,
    /// The prefetcher of the epoch and the batches it will yield, in order.
    ahead: RefCell<Option<(Prefetcher, VecDeque<Vec<usize>>)>>,
}

impl ImageExamples {
    /// `pre` fixes the size, normalisation and augmentation; `prefetch` the worker threads
    /// (`None`: decode on the training thread).
    pub fn new(
        set: Arc<ImageSet>,
        pre: Preprocess,
        prefetch: Option<PrefetchOptions>,
    ) -> Result<Self> {
        Ok(Self {
            batcher: Batcher::new(set, pre).map_err(|e| TrainError::Data(e.to_string()))?,
            prefetch,
            epoch: Cell::new(0),
            ahead: RefCell::new(None),
        })
    }

    /// The image set.
    pub fn set(&self) -> &ImageSet {
        self.batcher.set()
    }

    fn pixels(&self, idx: &[usize]) -> Result<Tensor> {
        let mut ahead = self.ahead.borrow_mut();
        if let Some((pf, plan)) = ahead.as_mut() {
            if plan.front().is_some_and(|p| p.as_slice() == idx) {
                plan.pop_front();
                if let Some(b) = pf.next() {
                    let b = b.map_err(|e| TrainError::Data(e.to_string()))?;
                    return Ok(b.pixels);
                }
            }
        }
        let b = self
            .batcher
            .batch(idx, self.epoch.get())
            .map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(b.pixels)
    }
}

impl<M: Backbone<Batch = Tensor>> Examples<M> for ImageExamples {
    fn count(&self) -> usize {
        self.batcher.set().len()
    }

    fn example_len(&self, _i: usize) -> usize {
        1
    }

    fn batch(&self, model: &M, idx: &[usize]) -> Result<Tensor> {
        Ok(self.pixels(idx)?.to_device(model.device())?)
    }

    fn begin_epoch(&self, epoch: usize, batches: &[Vec<usize>]) {
        self.epoch.set(epoch as u64);
        *self.ahead.borrow_mut() = None;
        let Some(opts) = self.prefetch else { return };
        let Some(bs) = batches.first().map(|b| b.len()) else {
            return;
        };
        // The prefetcher cuts one order into equal batches: only a plan of that shape.
        let n = batches.len();
        if bs == 0 || batches[..n - 1].iter().any(|b| b.len() != bs) || batches[n - 1].len() > bs {
            return;
        }
        let order: Vec<usize> = batches.iter().flatten().copied().collect();
        let pf = self.batcher.prefetch(order, bs, epoch as u64, opts);
        *self.ahead.borrow_mut() = Some((pf, batches.iter().cloned().collect()));
    }
}

impl<M: Backbone<Batch = Tensor>> Labelled<M> for ImageExamples {
    fn label(&self, i: usize) -> u32 {
        self.batcher.set().examples[i].label as u32
    }
}
