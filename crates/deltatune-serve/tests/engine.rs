//! The engines without HTTP: requests for a mix of adapters, joining a running batch at
//! different steps, give what each adapter alone gives.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use deltatune_models::decoder::{GenerateConfig, StopReason};
use deltatune_serve::decoder::{self, GenEvent, GenRequest};
use deltatune_serve::engine::EngineOptions;
use deltatune_serve::metrics::Metrics;
use tokio::sync::mpsc;

struct Pending {
    name: Option<&'static str>,
    prompt: Vec<u32>,
    cfg: GenerateConfig,
    rx: mpsc::UnboundedReceiver<GenEvent>,
}

fn collect(rx: &mut mpsc::UnboundedReceiver<GenEvent>) -> (String, StopReason, usize) {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("an event") {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Done(f) => return (text, f.reason, f.completion_tokens),
            GenEvent::Error(e) => panic!("{e}"),
        }
    }
}

#[test]
fn continuous_mixed_batches_equal_each_adapter_alone() {
    let names = ["a", "e", "c", "prompt", "prefix", "ia3"];
    let adapters = names.iter().map(|n| folder(n)).collect();
    let opts = EngineOptions {
        max_batch: 6,
        max_queue: 64,
    };
    let metrics = Arc::new(Metrics::default());
    let eng = decoder::start(decoder(), adapters, &opts, metrics.clone()).unwrap();
    let models: [Option<&str>; 7] = [
        Some("a"),
        None,
        Some("e"),
        Some("prompt"),
        Some("c"),
        Some("prefix"),
        Some("ia3"),
    ];
    let mut pending = Vec::new();
    let submit = |i: usize, pending: &mut Vec<Pending>| {
        let name = models[i % models.len()];
        let prompt: Vec<u32> = (0..(2 + i % 5))
            .map(|j| (3 + (i * 11 + j * 7) % 90) as u32)
            .collect();
        // Greedy for most, seeded sampling for every third.
        let cfg = GenerateConfig {
            max_new_tokens: 6 + i % 7,
            temperature: if i % 3 == 2 { 0.9 } else { 0.0 },
            seed: 100 + i as u64,
            ..GenerateConfig::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        eng.submit(GenRequest {
            adapter: name.map(String::from),
            prompt: prompt.clone(),
            config: cfg.clone(),
            events: tx,
        })
        .unwrap();
        pending.push(Pending {
            name,
            prompt,
            cfg,
            rx,
        });
    };
    for i in 0..4 {
        submit(i, &mut pending);
    }
    // Once the first batch runs (a token arrived), add requests that join it between steps
    // (more than max_batch in all, so some wait for rows to free).
    let head = match pending[0].rx.blocking_recv().unwrap() {
        GenEvent::Text(t) => t,
        e => panic!("{e:?}"),
    };
    for i in 4..14 {
        submit(i, &mut pending);
        if i % 3 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for (i, mut p) in pending.into_iter().enumerate() {
        let (mut got, reason, n) = collect(&mut p.rx);
        if i == 0 {
            got.insert_str(0, &head);
        }
        let want = alone(p.name, &p.prompt, &p.cfg);
        assert_eq!(
            got,
            text(&want),
            "{:?} on {:?} ({:?})",
            p.name,
            p.prompt,
            p.cfg
        );
        assert_eq!(n, want.len());
        if n < p.cfg.max_new_tokens {
            assert_eq!(reason, StopReason::Eos);
        }
    }
    // Batches did mix: some decoding step ran more than one row.
    let m = metrics.render();
    let line = m
        .lines()
        .find(|l| l.starts_with("deltatune_batch_rows_bucket{engine=\"decoder\",le=\"1\"}"))
        .unwrap();
    let count = m
        .lines()
        .find(|l| l.starts_with("deltatune_batch_rows_count{engine=\"decoder\"}"))
        .unwrap();
    let ones: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let all: u64 = count.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(ones < all, "every step ran one row: {line} / {count}");
}

#[test]
fn a_client_that_goes_away_stops_its_generation() {
    let metrics = Arc::new(Metrics::default());
    let eng = decoder::start(
        decoder(),
        vec![folder("a")],
        &EngineOptions::default(),
        metrics.clone(),
    )
    .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    eng.submit(GenRequest {
        adapter: Some("a".into()),
        prompt: vec![5, 6, 7],
        config: GenerateConfig {
            max_new_tokens: 100,
            temperature: 0.9,
            ..GenerateConfig::default()
        },
        events: tx,
    })
    .unwrap();
    drop(rx);
    // The engine notices at its next token and frees the row: a later request runs alone.
    std::thread::sleep(Duration::from_millis(100));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cfg = GenerateConfig {
        max_new_tokens: 5,
        ..GenerateConfig::default()
    };
    eng.submit(GenRequest {
        adapter: None,
        prompt: vec![9, 10],
        config: cfg.clone(),
        events: tx,
    })
    .unwrap();
    let (got, _, _) = collect(&mut rx);
    assert_eq!(got, text(&alone(None, &[9, 10], &cfg)));
    let m = metrics.render();
    let done = m
        .lines()
        .find(|l| l.starts_with("deltatune_completion_tokens_total{model=\"a\"}"))
        .unwrap();
    let n: u64 = done.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n < 100, "the abandoned row ran to its budget: {done}");
}
