//! Throughput of the image pipeline (decode + preprocess + batch into a tensor).
//!
//! ```text
//! cargo run --release -p deltatune-data --example image_pipeline_bench -- [N] [SIZE] [BATCH]
//! ```
//! Uses Fashion-MNIST from the deltatune cache (`deltatune fetch`) when present, else
//! synthetic 28x28 grey images; prints images per second for the plain batcher on the
//! calling thread and for the prefetcher with 1 and 2 workers, with and without augmentation.

use std::sync::Arc;
use std::time::Instant;

use deltatune_data::images::{
    epoch_order, Augment, Batcher, ImageExample, ImageSet, ImageSource, PrefetchOptions, Preprocess,
};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: N SIZE BATCH"))
        .collect();
    let n = args.first().copied().unwrap_or(2048);
    let size = args.get(1).copied().unwrap_or(224);
    let batch = args.get(2).copied().unwrap_or(32);
    let cache = deltatune_data::assets::default_cache_dir();
    let set = match deltatune_data::fashion_mnist::fashion_mnist_ready_dir(&cache)
        .and_then(|d| deltatune_data::fashion_mnist::load_fashion_mnist(&d))
    {
        Ok(s) => {
            println!("data: Fashion-MNIST train ({} images)", s.train.len());
            s.train
        }
        Err(_) => {
            println!("data: synthetic 28x28 grey images");
            let px: Arc<[u8]> = (0..n * 784)
                .map(|i| (i * 31 % 256) as u8)
                .collect::<Vec<_>>()
                .into();
            ImageSet {
                split: "train".into(),
                origin: "<synthetic>".into(),
                classes: vec!["a".to_string(), "b".into()].into(),
                channels: 1,
                examples: (0..n)
                    .map(|i| ImageExample {
                        source: ImageSource::Memory {
                            pixels: px.clone(),
                            offset: i * 784,
                            width: 28,
                            height: 28,
                        },
                        label: i % 2,
                    })
                    .collect(),
            }
        }
    };
    let set = Arc::new(set);
    let order: Vec<usize> = epoch_order(set.len(), 1, 0).into_iter().take(n).collect();
    println!("{n} images, {size}x{size}, 3 channels, batch {batch}");
    for augment in [None, Some(Augment::default())] {
        let pre = Preprocess::for_model(3)
            .unwrap()
            .with_size(size)
            .with_augment(augment, 1);
        let b = Batcher::new(set.clone(), pre).unwrap();
        let tag = if augment.is_some() {
            "augmented"
        } else {
            "plain"
        };
        let t = Instant::now();
        let k: usize = b
            .batches(&order, batch, 0)
            .map(|r| r.unwrap().indices.len())
            .sum();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{tag:9} calling thread: {:8.0} images/s ({k} images)",
            n as f64 / s
        );
        for workers in [1, 2] {
            let t = Instant::now();
            let k = b
                .prefetch(
                    order.clone(),
                    batch,
                    0,
                    PrefetchOptions { workers, depth: 2 },
                )
                .map(|r| r.unwrap().indices.len())
                .sum::<usize>();
            let s = t.elapsed().as_secs_f64();
            println!(
                "{tag:9} prefetch, {workers} worker(s): {:8.0} images/s ({k} images)",
                n as f64 / s
            );
        }
    }
}
