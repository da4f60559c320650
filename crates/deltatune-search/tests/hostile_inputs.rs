//! Search spaces found by `deltatune-fuzz` (crates/deltatune-fuzz) that once panicked; each
//! test is named after the bug it pins.

use deltatune_core::Rng;
use deltatune_search::sampler::{Observation, RandomSampler, Sampler, TpeSampler};
use deltatune_search::space::{Dist, Space};

/// `int = [i64::MIN, i64::MAX]`: `high - low` overflowed i64, the grid's last index came out
/// negative and `clamp(0, -1)` panicked in every sampler.
#[test]
fn space_int_range_wider_than_i64_samples_without_panic() {
    let space = Space::parse(
        "[methods.lora]\nx = { int = [-9223372036854775808, 9223372036854775807] }\n\
         y = { int = [-5, 9223372036854775807], step = 3 }\n",
    )
    .unwrap();
    let mut rng = Rng::new(1);
    let mut history = Vec::new();
    for i in 0..20 {
        let p = RandomSampler.sample(&space, &history, &mut rng);
        let y = p["lora.y"].as_i64().unwrap();
        assert!(y >= -5 && (y + 5) % 3 == 0, "{y}");
        assert!(p["lora.x"].is_i64());
        history.push(Observation {
            params: p,
            value: i as f64,
        });
    }
    let tpe = TpeSampler {
        n_startup: 2,
        ..TpeSampler::default()
    };
    let p = tpe.sample(&space, &history, &mut rng);
    assert!(p["lora.x"].is_i64());
    // Both ends of the grid are reachable.
    let d = &space.params_for("lora")[0].dist;
    assert_eq!(d.from_internal(-1e300), i64::MIN);
    assert_eq!(d.from_internal(1e300), i64::MAX);
}

/// Integer bounds above 2^53 were read through f64 and rounded.
#[test]
fn space_int_bounds_keep_their_exact_value() {
    let space =
        Space::parse("[methods.lora]\nx = { int = [9007199254740993, 9007199254740995] }\n")
            .unwrap();
    match &space.params_for("lora")[0].dist {
        Dist::Int { low, high, .. } => {
            assert_eq!((*low, *high), (9007199254740993, 9007199254740995))
        }
        d => panic!("{d:?}"),
    }
}

/// Found by deltatune-fuzz: 4 MB of nested arrays made the TOML parser hold 190 MiB before it
/// failed; a space past the size cap is refused before parsing, and one at the cap parses.
#[test]
fn space_file_past_the_size_cap_is_refused_before_parsing() {
    use deltatune_search::space::MAX_SPACE_BYTES;
    let big = "a = [".repeat(MAX_SPACE_BYTES / 5 + 1);
    let err = Space::parse(&big).unwrap_err().to_string();
    assert!(err.contains("is this the right file"), "{err}");
    let mut ok = String::from("[methods.lora]\n");
    ok.push_str(&"#".repeat(MAX_SPACE_BYTES - ok.len()));
    Space::parse(&ok).unwrap();
}
