//! Loading text-classification examples and mapping labels to class ids.
//!
//! Supported formats, chosen by file extension (case-insensitive):
//! * `.csv`: comma separated, header line, RFC 4180 quoting (fields may span lines);
//! * `.tsv`: tab separated, header line, **no** quoting (quotes are literal text);
//! * `.jsonl`: one JSON object per line; blank lines are skipped; the label may be
//!   a string, an integer/number or a boolean and is converted to a string.
//!
//! A UTF-8 byte order mark at the start of the file is ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::list_names;
use crate::{DataError, Result};

/// One labelled example. Labels are kept as strings; see [`LabelMap`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Example {
    /// The input text (never empty or all-whitespace).
    pub text: String,
    /// The label as written in the file (trimmed).
    pub label: String,
}

/// Reads all examples of `path`, taking the text from column/key `text_col`
/// and the label from `label_col`. See the module docs for the formats.
pub fn load_examples(path: &Path, text_col: &str, label_col: &str) -> Result<Vec<Example>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let format = match ext.as_str() {
        "csv" => Format::Delimited {
            delim: b',',
            quoting: true,
        },
        "tsv" => Format::Delimited {
            delim: b'\t',
            quoting: false,
        },
        "jsonl" => Format::JsonLines,
        _ => {
            return Err(DataError::UnsupportedFormat {
                path: path.to_path_buf(),
                ext,
            })
        }
    };
    let bytes = read_input(path)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    match format {
        Format::Delimited { delim, quoting } => {
            load_delimited(path, bytes, delim, quoting, text_col, label_col)
        }
        Format::JsonLines => load_jsonl(path, bytes, text_col, label_col),
    }
}

enum Format {
    Delimited { delim: u8, quoting: bool },
    JsonLines,
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::FileNotFound {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(DataError::io("read", path, e)),
    }
}

fn empty_file(path: &Path, detail: &str) -> DataError {
    DataError::EmptyFile {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// 1-based line of a record starting at `pos`. Computed from the byte offset
/// because the csv crate's own line counter is off by one for CRLF files.
fn line_at(bytes: &[u8], pos: Option<&csv::Position>) -> u64 {
    let Some(pos) = pos else { return 0 };
    let mut b = (pos.byte() as usize).min(bytes.len());
    while b < bytes.len() && matches!(bytes[b], b'\r' | b'\n') {
        b += 1;
    }
    1 + bytes[..b].iter().filter(|&&c| c == b'\n').count() as u64
}

fn csv_error(path: &Path, bytes: &[u8], e: csv::Error) -> DataError {
    let line = line_at(bytes, e.position());
    DataError::Csv {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

fn utf8_field<'a>(
    path: &Path,
    line: u64,
    column: Option<&str>,
    bytes: &'a [u8],
) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| DataError::NonUtf8 {
        path: path.to_path_buf(),
        line,
        column_note: column.map(|c| format!(" column `{c}`")).unwrap_or_default(),
        detail: format!("{e} in this field"),
    })
}

/// Parses CSV (or TSV) text already in memory.
fn load_delimited(
    path: &Path,
    bytes: &[u8],
    delim: u8,
    quoting: bool,
    text_col: &str,
    label_col: &str,
) -> Result<Vec<Example>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delim)
        .quoting(quoting)
        .from_reader(bytes);
    let headers = rdr
        .byte_headers()
        .map_err(|e| csv_error(path, bytes, e))?
        .clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].is_empty()) {
        return Err(empty_file(path, ""));
    }
    let names = headers
        .iter()
        .map(|h| utf8_field(path, 1, None, h).map(|s| s.trim().to_string()))
        .collect::<Result<Vec<_>>>()?;
    let text_idx = find_column(path, None, &names, "text", text_col)?;
    let label_idx = find_column(path, None, &names, "label", label_col)?;

    let mut out = Vec::new();
    let mut rec = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, bytes, e)),
        }
        let line = line_at(bytes, rec.position());
        // An all-empty line at the very end (e.g. trailing "\r\n\r\n") is not a record.
        if rec.len() == 1 && rec[0].is_empty() {
            continue;
        }
        let text = utf8_field(path, line, Some(text_col), &rec[text_idx])?;
        let label = utf8_field(path, line, Some(label_col), &rec[label_idx])?;
        out.push(make_example(path, line, text_col, label_col, text, label)?);
    }
    if out.is_empty() {
        return Err(empty_file(path, " (only a header line)"));
    }
    Ok(out)
}

fn find_column(
    path: &Path,
    line: Option<u64>,
    names: &[String],
    role: &'static str,
    column: &str,
) -> Result<usize> {
    names
        .iter()
        .position(|n| n == column)
        .ok_or_else(|| DataError::MissingColumn {
            location: match line {
                Some(l) => format!("`{}` line {l}", path.display()),
                None => format!("`{}`", path.display()),
            },
            role,
            column: column.to_string(),
            available: list_names(names),
        })
}

fn make_example(
    path: &Path,
    line: u64,
    text_col: &str,
    label_col: &str,
    text: &str,
    label: &str,
) -> Result<Example> {
    if text.trim().is_empty() {
        return Err(DataError::EmptyText {
            path: path.to_path_buf(),
            line,
            column: text_col.to_string(),
        });
    }
    let label = label.trim();
    if label.is_empty() {
        return Err(DataError::EmptyLabel {
            path: path.to_path_buf(),
            line,
            column: label_col.to_string(),
        });
    }
    Ok(Example {
        text: text.to_string(),
        label: label.to_string(),
    })
}

fn load_jsonl(path: &Path, bytes: &[u8], text_col: &str, label_col: &str) -> Result<Vec<Example>> {
    let json_err = |line: u64, message: String| DataError::Json {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let s = std::str::from_utf8(raw).map_err(|e| DataError::NonUtf8 {
            path: path.to_path_buf(),
            line,
            column_note: String::new(),
            detail: e.to_string(),
        })?;
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(s).map_err(|e| json_err(line, format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| {
            json_err(
                line,
                format!("expected a JSON object, found {}", json_kind(&value)),
            )
        })?;
        let missing = |role: &'static str, column: &str| DataError::MissingColumn {
            location: format!("`{}` line {line}", path.display()),
            role,
            column: column.to_string(),
            available: list_names(&obj.keys().collect::<Vec<_>>()),
        };
        let text = match obj.get(text_col) {
            None => return Err(missing("text", text_col)),
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(json_err(
                    line,
                    format!(
                        "key `{text_col}` (the text) must be a string, found {}",
                        json_kind(other)
                    ),
                ))
            }
        };
        let label = match obj.get(label_col) {
            None => return Err(missing("label", label_col)),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(serde_json::Value::Bool(b)) => b.to_string(),
            Some(other) => {
                return Err(json_err(
                    line,
                    format!(
                    "key `{label_col}` (the label) must be a string, number or boolean, found {}",
                    json_kind(other)
                ),
                ))
            }
        };
        out.push(make_example(path, line, text_col, label_col, text, &label)?);
    }
    if out.is_empty() {
        return Err(empty_file(path, ""));
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Bijection between label strings and class ids `0..len`.
///
/// Serialized as `{"labels": ["0", "1"]}`; the id of a label is its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LabelMapFile", into = "LabelMapFile")]
pub struct LabelMap {
    labels: Vec<String>,
    index: std::collections::HashMap<String, u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelMapFile {
    labels: Vec<String>,
}

impl TryFrom<LabelMapFile> for LabelMap {
    type Error = String;
    fn try_from(f: LabelMapFile) -> std::result::Result<Self, String> {
        LabelMap::build(f.labels)
    }
}

impl From<LabelMap> for LabelMapFile {
    fn from(m: LabelMap) -> Self {
        LabelMapFile { labels: m.labels }
    }
}

impl LabelMap {
    fn build(labels: Vec<String>) -> std::result::Result<Self, String> {
        if labels.is_empty() {
            return Err("the label list is empty".to_string());
        }
        let mut index = std::collections::HashMap::with_capacity(labels.len());
        for (i, l) in labels.iter().enumerate() {
            if index.insert(l.clone(), i as u32).is_some() {
                return Err(format!("label `{l}` appears twice"));
            }
        }
        Ok(LabelMap { labels, index })
    }

    /// Builds the map from the training examples: the distinct labels sorted
    /// numerically if every label parses as an integer, else lexicographically.
    pub fn from_train(examples: &[Example]) -> Self {
        let set: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let mut labels: Vec<String> = set.into_iter().map(str::to_string).collect();
        let numeric: Option<Vec<i128>> = labels.iter().map(|l| l.parse::<i128>().ok()).collect();
        if let Some(nums) = numeric {
            let mut pairs: Vec<(i128, String)> = nums.into_iter().zip(labels).collect();
            pairs.sort();
            labels = pairs.into_iter().map(|(_, l)| l).collect();
        }
        let mut index = std::collections::HashMap::with_capacity(labels.len());
        for (i, l) in labels.iter().enumerate() {
            index.insert(l.clone(), i as u32);
        }
        LabelMap { labels, index }
    }

    /// Builds the map from an explicit, ordered label list (must be non-empty
    /// and without duplicates).
    pub fn from_labels(labels: Vec<String>) -> Result<Self> {
        Self::build(labels).map_err(|message| DataError::LabelMap {
            path: PathBuf::from("<labels>"),
            message,
        })
    }

    /// The class id of `label`; errors if it was not seen in training.
    pub fn id(&self, label: &str) -> Result<u32> {
        self.lookup(label, || "(at prediction or evaluation time)".to_string())
    }

    /// Like [`LabelMap::id`], naming the split (e.g. `dev`) in the error.
    pub fn id_in(&self, label: &str, split: &str) -> Result<u32> {
        self.lookup(label, || format!("in split `{split}`"))
    }

    /// Class ids of all `examples`; the error names `split` and the 1-based row.
    pub fn encode(&self, examples: &[Example], split: &str) -> Result<Vec<u32>> {
        examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.lookup(&e.label, || {
                    format!("in split `{split}` (example {})", i + 1)
                })
            })
            .collect()
    }

    fn lookup(&self, label: &str, where_: impl FnOnce() -> String) -> Result<u32> {
        self.index
            .get(label)
            .copied()
            .ok_or_else(|| DataError::UnknownLabel {
                label: label.to_string(),
                where_: where_(),
                known: list_names(&self.labels),
            })
    }

    /// The label string of class `id`.
    pub fn label(&self, id: u32) -> Option<&str> {
        self.labels.get(id as usize).map(String::as_str)
    }

    /// All labels, in id order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True if there are no classes (only possible via `from_train(&[])`).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Saves as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("label map serializes");
        bytes.push(b'\n');
        crate::write_atomic(path, &bytes).map_err(|e| DataError::io("write", path, e))
    }

    /// Loads a map written by [`LabelMap::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::LabelMap {
                    path: path.to_path_buf(),
                    message: "file does not exist".to_string(),
                })
            }
            Err(e) => return Err(DataError::io("read", path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| DataError::LabelMap {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn ex(text: &str, label: &str) -> Example {
        Example {
            text: text.into(),
            label: label.into(),
        }
    }

    #[test]
    fn csv_basic_with_quotes_multiline_and_bom() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.csv",
            b"\xEF\xBB\xBFid,text,label\n1,\"hello, world\",pos\n2,\"two\nlines \"\"q\"\"\", neg \n",
        );
        let v = load_examples(&p, "text", "label").unwrap();
        assert_eq!(
            v,
            vec![ex("hello, world", "pos"), ex("two\nlines \"q\"", "neg")]
        );
    }

    #[test]
    fn tsv_has_no_quoting_and_crlf_ok() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.TSV", b"sentence\tlabel\r\na\tb\tc\r\n");
        let err = load_examples(&p, "sentence", "label").unwrap_err();
        // The tab inside the text makes a 3-field record: a structural error with a line.
        assert!(matches!(err, DataError::Csv { line: 2, .. }), "{err}");
        let p = write(
            d.path(),
            "b.tsv",
            b"sentence\tlabel\r\n\"hi\" he said\t1\r\nok\t0\r\n",
        );
        let v = load_examples(&p, "sentence", "label").unwrap();
        assert_eq!(v, vec![ex("\"hi\" he said", "1"), ex("ok", "0")]);
        let p = write(d.path(), "c.tsv", b"sentence\tlabel\r\nok\t1\r\n\t0\r\n");
        let e = load_examples(&p, "sentence", "label").unwrap_err();
        assert!(matches!(e, DataError::EmptyText { line: 3, .. }), "{e}");
    }

    #[test]
    fn jsonl_label_types() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            br#"{"text": "a", "label": "pos"}

{"text": "b", "label": 3, "extra": null}
{"text": "c", "label": true}
"#,
        );
        let v = load_examples(&p, "text", "label").unwrap();
        assert_eq!(v, vec![ex("a", "pos"), ex("b", "3"), ex("c", "true")]);
    }

    #[test]
    fn jsonl_errors_name_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n[1]\n",
        );
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::Json { line: 2, .. }), "{e}");
        let p = write(d.path(), "b.jsonl", b"{\"text\": \"a\", \"label\": null}\n");
        let e = load_examples(&p, "text", "label").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("null"), "{e}");
        let p = write(d.path(), "c.jsonl", b"{\"txt\": \"a\", \"label\": 1}\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        match &e {
            DataError::MissingColumn {
                location,
                available,
                ..
            } => {
                assert!(location.contains("line 1"));
                assert!(available.contains("`txt`") && available.contains("`label`"));
            }
            _ => panic!("{e}"),
        }
        let p = write(d.path(), "d.jsonl", b"{\"text\": 5, \"label\": 1}\n");
        let e = load_examples(&p, "text", "label").unwrap_err().to_string();
        assert!(e.contains("must be a string"), "{e}");
    }

    #[test]
    fn missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope.csv");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::FileNotFound { .. }));
        assert!(e.to_string().contains("nope.csv"), "{e}");
    }

    #[test]
    fn unsupported_extension() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "x.txt", b"text,label\na,1\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::UnsupportedFormat { .. }));
        assert!(e.to_string().contains(".jsonl"), "{e}");
    }

    #[test]
    fn empty_files() {
        let d = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("a.csv", &b""[..]),
            ("b.csv", b"text,label\n"),
            ("c.tsv", b"text\tlabel"),
            ("d.jsonl", b""),
            ("e.jsonl", b"\n  \n"),
        ] {
            let p = write(d.path(), name, bytes);
            let e = load_examples(&p, "text", "label").unwrap_err();
            assert!(matches!(e, DataError::EmptyFile { .. }), "{name}: {e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn missing_columns_list_available() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.csv", b"sentence,label\nx,1\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, DataError::MissingColumn { role: "text", .. }));
        assert!(
            s.contains("`text`") && s.contains("`sentence`, `label`"),
            "{s}"
        );
        let e = load_examples(&p, "sentence", "y").unwrap_err();
        assert!(
            matches!(e, DataError::MissingColumn { role: "label", .. }),
            "{e}"
        );
    }

    #[test]
    fn non_utf8_names_line_and_column() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.csv", b"text,label\nok,1\ncaf\xe9,0\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { line: 3, .. }), "{e}");
        let s = e.to_string();
        assert!(
            s.contains("a.csv") && s.contains("line 3") && s.contains("`text`"),
            "{s}"
        );
        let p = write(
            d.path(),
            "b.jsonl",
            b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"\xff\",\"label\":1}\n",
        );
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { line: 2, .. }), "{e}");
        let p = write(d.path(), "c.csv", b"te\xffxt,label\na,1\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { line: 1, .. }), "{e}");
    }

    #[test]
    fn empty_text_and_label() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.csv", b"text,label\nok,1\n  ,0\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::EmptyText { line: 3, .. }), "{e}");
        assert!(e.to_string().contains("line 3"));
        let p = write(d.path(), "b.jsonl", b"{\"text\":\"\",\"label\":1}\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::EmptyText { line: 1, .. }), "{e}");
        let p = write(d.path(), "c.csv", b"text,label\nok,\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::EmptyLabel { line: 2, .. }), "{e}");
    }

    #[test]
    fn ragged_csv_names_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.csv", b"text,label\nok,1\nbad\n");
        let e = load_examples(&p, "text", "label").unwrap_err();
        assert!(matches!(e, DataError::Csv { line: 3, .. }), "{e}");
    }

    #[test]
    fn label_map_order_and_lookup() {
        let m = LabelMap::from_train(&[ex("a", "10"), ex("b", "2"), ex("c", "-1"), ex("d", "2")]);
        assert_eq!(m.labels(), ["-1", "2", "10"]);
        assert_eq!(m.id("10").unwrap(), 2);
        assert_eq!(m.label(1), Some("2"));
        let m = LabelMap::from_train(&[ex("a", "pos"), ex("b", "neg"), ex("c", "10")]);
        assert_eq!(m.labels(), ["10", "neg", "pos"]);
        assert_eq!(m.len(), 3);
        let e = m.id_in("neutral", "dev").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("`neutral`") && s.contains("`dev`") && s.contains("`neg`, `pos`"),
            "{s}"
        );
        let e = m
            .encode(&[ex("x", "pos"), ex("y", "meh")], "test")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`meh`") && e.contains("`test` (example 2)"),
            "{e}"
        );
        assert_eq!(
            m.encode(&[ex("x", "pos"), ex("y", "10")], "dev").unwrap(),
            [2, 0]
        );
    }

    #[test]
    fn label_map_save_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("labels.json");
        let m = LabelMap::from_train(&[ex("a", "1"), ex("b", "0")]);
        m.save(&p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"labels": ["0", "1"]}));
        assert_eq!(LabelMap::load(&p).unwrap(), m);
        std::fs::write(&p, br#"{"labels": ["a", "a"]}"#).unwrap();
        let e = LabelMap::load(&p).unwrap_err().to_string();
        assert!(e.contains("twice") && e.contains("labels.json"), "{e}");
        let e = LabelMap::load(&d.path().join("none.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("none.json") && e.contains("does not exist"),
            "{e}"
        );
        assert!(LabelMap::from_labels(vec![]).is_err());
    }
}
