//! Inputs found by `deltatune-fuzz` (crates/deltatune-fuzz); each test is named after the bug
//! it pins.

use std::time::Instant;

use deltatune_core::error::nearest_names;

/// A config file with a 65,000-character unknown key: ranking the known keys by edit
/// distance (quadratic) took seconds before the message came out. A million characters now
/// take a moment and still rank the real names.
#[test]
fn nearest_names_of_a_huge_unknown_key_is_quick() {
    let key = format!("train.l{}", "9".repeat(1_000_000));
    let known = ["train.lr", "train.epochs", "lora.r", "data.max_length"];
    let t = Instant::now();
    let near = nearest_names(&key, known.iter().copied(), 2);
    assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
    assert!(near.starts_with("train.lr"), "{near}");
    // Short names are ranked as before.
    assert_eq!(
        nearest_names("train.epoch", known.iter().copied(), 1),
        "train.epochs"
    );
}
