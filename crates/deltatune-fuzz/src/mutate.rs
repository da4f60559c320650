//! Format-agnostic mutations (bytes, text lines) and structural ones for JSON and TOML.
//! Everything draws from a [`Rng`] seeded per case, so a case number reproduces its input.

use deltatune_core::Rng;
use serde_json::Value;

pub const INTERESTING_U8: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b'\n', b'\r', b'\t', b'#',
    b'=', b':', b'0', b'9', b'-', b'.', b' ', 0xc3, 0xed, 0xf0,
];
pub const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];
pub const INTERESTING_U64: &[u64] = &[
    0,
    1,
    8,
    32,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40, // a terabyte
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

/// Strings that break parsers or checks when dropped into text.
pub const INTERESTING_TEXT: &[&str] = &[
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "-1",
    "0",
    "-0",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "1e-400",
    "0x10",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "\\",
    "\\u0000",
    "\\ud800",
    "\u{0}",
    "\u{feff}",
    "\r\n",
    "\n\n",
    ",",
    "\t",
    "=",
    "[[a]]",
    "a.b.c = 1",
    "#",
    "é",
    "\u{10ffff}",
    "𝄞",
];

pub fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[rng.below(v.len())]
}

fn chance(rng: &mut Rng, p: f64) -> bool {
    rng.uniform() < p
}

/// A count of stacked mutations: mostly 1-2, sometimes up to 8.
pub fn stack_depth(rng: &mut Rng) -> usize {
    1 + (rng.uniform() * rng.uniform() * 8.0) as usize
}

/// A random length, biased to small values.
fn small_len(rng: &mut Rng, max: usize) -> usize {
    let max = max.max(1);
    let x = rng.uniform();
    ((x * x * x) * max as f64) as usize + 1
}

fn range(rng: &mut Rng, len: usize) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let a = rng.below(len);
    let n = small_len(rng, (len - a).min(4096));
    (a, (a + n).min(len))
}

/// One byte-level mutation. Integer overwrites hit 4/8-aligned offsets below `header`
/// (the part of a binary file holding counts, lengths and offsets).
pub fn bytes_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>], header: usize) {
    let len = data.len();
    let header = header.min(len).max(1);
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *pick(rng, INTERESTING_U8);
        }
        2 if len >= 4 => {
            let i = (rng.below(header) & !3).min(len - 4);
            let v = if chance(rng, 0.2) {
                len as u32 + rng.below(3) as u32
            } else {
                *pick(rng, INTERESTING_U32)
            };
            data[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        3 if len >= 8 => {
            let i = (rng.below(header) & !7).min(len - 8);
            let v = if chance(rng, 0.2) {
                len as u64 + rng.below(3) as u64
            } else {
                *pick(rng, INTERESTING_U64)
            };
            data[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        4 => {
            // Truncation, biased towards the header.
            let at = if chance(rng, 0.5) {
                rng.below(header + 1)
            } else {
                rng.below(len + 1)
            };
            data.truncate(at);
        }
        5 if len > 0 => {
            let (a, b) = range(rng, len);
            let chunk = data[a..b].to_vec();
            let at = rng.below(len + 1);
            let most = (MAX_LEN / (b - a + 1)).clamp(1, 64);
            let times = if chance(rng, 0.1) {
                1 + rng.below(most)
            } else {
                1
            };
            for _ in 0..times {
                data.splice(at..at, chunk.iter().copied());
            }
        }
        6 if len > 0 => {
            let (a, b) = range(rng, len);
            data.drain(a..b);
        }
        7 => {
            let at = rng.below(len + 1);
            let n = small_len(rng, 64);
            let junk: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            data.splice(at..at, junk);
        }
        8 if !seeds.is_empty() => {
            // Splice: our prefix, another seed's suffix.
            let other = pick(rng, seeds);
            let a = rng.below(len + 1);
            let b = rng.below(other.len() + 1);
            data.truncate(a);
            data.extend_from_slice(&other[b..]);
        }
        9 if !seeds.is_empty() && len > 0 => {
            let other = pick(rng, seeds);
            let (a, b) = range(rng, other.len());
            let at = rng.below(len);
            for (k, &byte) in other[a..b].iter().enumerate() {
                if at + k < data.len() {
                    data[at + k] = byte;
                }
            }
        }
        10 => {
            let n = small_len(rng, 256);
            data.extend((0..n).map(|_| rng.below(256) as u8));
        }
        11 if len >= 2 => {
            // Swap two bytes in the header.
            let i = rng.below(header.min(len));
            let j = rng.below(header.min(len));
            data.swap(i, j);
        }
        _ if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.below(256) as u8;
        }
        _ => data.push(rng.below(256) as u8),
    }
}

/// Text mutations: interesting tokens, invalid UTF-8, long strings, deep nesting, lines
/// duplicated, dropped, swapped.
pub fn text_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(10) {
        0 | 1 => {
            let at = rng.below(len + 1);
            let t = pick(rng, INTERESTING_TEXT).as_bytes().to_vec();
            if chance(rng, 0.5) && len > 0 {
                // Replace a token-ish run instead of inserting.
                let end = (at + 1 + rng.below(8)).min(len);
                data.splice(at.min(len)..end, t);
            } else {
                data.splice(at..at, t);
            }
        }
        2 => {
            // Invalid UTF-8 (lone continuation byte, overlong, surrogate, truncated sequence).
            let bad: &[&[u8]] = &[
                b"\x80",
                b"\xc0\xaf",
                b"\xed\xa0\x80",
                b"\xf0\x9f",
                b"\xff\xfe",
            ];
            let at = rng.below(len + 1);
            data.splice(at..at, pick(rng, bad).iter().copied());
        }
        3 => {
            // A very long run.
            let at = rng.below(len + 1);
            let n = 1 << (8 + rng.below(10)); // 256 B .. 128 KiB
            let c = *pick(rng, b"a0 \"\\,\t9[");
            data.splice(at..at, std::iter::repeat_n(c, n));
        }
        4 => {
            // Deep nesting.
            let at = rng.below(len + 1);
            let depth = 1 << (4 + rng.below(12)); // 16 .. 32768
            let (open, close): (&[u8], &[u8]) = *pick(
                rng,
                &[
                    (&b"["[..], &b"]"[..]),
                    (b"{\"a\":", b"}"),
                    (b"a = [", b"]"),
                    (b"{a=", b"}"),
                ],
            );
            let mut ins = Vec::new();
            for _ in 0..depth {
                ins.extend_from_slice(open);
            }
            ins.push(b'1');
            if chance(rng, 0.7) {
                for _ in 0..depth {
                    ins.extend_from_slice(close);
                }
            }
            data.splice(at..at, ins);
        }
        5..=7 => {
            let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let n = lines.len();
            match rng.below(5) {
                0 => {
                    let i = rng.below(n);
                    let l = lines[i].clone();
                    let most = (MAX_LEN / (l.len() + 1)).clamp(1, 2000);
                    let times = if chance(rng, 0.1) {
                        1 + rng.below(most)
                    } else {
                        1
                    };
                    for _ in 0..times {
                        lines.insert(i, l.clone());
                    }
                }
                1 if n > 1 => {
                    lines.remove(rng.below(n));
                }
                2 => {
                    let (i, j) = (rng.below(n), rng.below(n));
                    lines.swap(i, j);
                }
                3 if !seeds.is_empty() => {
                    let other = pick(rng, seeds);
                    let ol: Vec<&[u8]> = other.split(|&b| b == b'\n').collect();
                    let l = pick(rng, &ol).to_vec();
                    lines.insert(rng.below(n + 1), l);
                }
                _ => {
                    let i = rng.below(n);
                    let cut = rng.below(lines[i].len() + 1);
                    lines[i].truncate(cut);
                }
            }
            *data = lines.join(&b'\n');
            if chance(rng, 0.05) {
                // CRLF endings.
                let mut out = Vec::with_capacity(data.len() * 2);
                for &b in data.iter() {
                    if b == b'\n' {
                        out.push(b'\r');
                    }
                    out.push(b);
                }
                *data = out;
            }
        }
        8 => {
            if chance(rng, 0.5) {
                data.splice(0..0, *b"\xef\xbb\xbf");
            } else {
                data.clear();
            }
        }
        _ => bytes_once(rng, data, seeds, len),
    }
}

/// A JSON value chosen to upset a typed reader.
pub fn hostile_json(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => Value::Bool(chance(rng, 0.5)),
        2 => Value::from(-1),
        3 => Value::from(0),
        4 => Value::from(u64::MAX),
        5 => Value::from(i64::MIN),
        6 => serde_json::json!(1e308),
        7 => serde_json::json!(-1e-308),
        8 => Value::from("NaN"),
        9 => Value::from(""),
        10 => Value::from("x".repeat(1 << rng.below(16))),
        11 => serde_json::json!([]),
        12 => serde_json::json!({}),
        13 => {
            let mut v = Value::from(1);
            for _ in 0..(1 + rng.below(200)) {
                v = Value::Array(vec![v]);
            }
            v
        }
        14 => serde_json::json!(0.5),
        _ => serde_json::json!(["a", 1, null, {"k": []}]),
    }
}

/// Paths (object keys / array indices) to every node of `v`.
fn json_nodes(v: &Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(path.clone());
    match v {
        Value::Object(m) => {
            for k in m.keys() {
                path.push(Seg::Key(k.clone()));
                json_nodes(&m[k], path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(Seg::Idx(i));
                json_nodes(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Idx(usize),
}

fn json_at<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Idx(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A structural mutation of a JSON document: a node replaced by a hostile value, a key
/// dropped, renamed or added, an array element duplicated or dropped, a number scaled.
pub fn json_once(rng: &mut Rng, v: &mut Value, keys: &[&str]) {
    let mut nodes = Vec::new();
    json_nodes(v, &mut Vec::new(), &mut nodes);
    let path = pick(rng, &nodes).clone();
    let Some(node) = json_at(v, &path) else {
        return;
    };
    match rng.below(8) {
        0 | 1 => *node = hostile_json(rng),
        2 => match node {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
            }
            Value::Array(a) if !a.is_empty() => {
                a.remove(rng.below(a.len()));
            }
            _ => *node = hostile_json(rng),
        },
        3 => match node {
            Value::Object(m) => {
                let k = if !keys.is_empty() && chance(rng, 0.7) {
                    pick(rng, keys).to_string()
                } else {
                    format!("unknown_{}", rng.below(100))
                };
                m.insert(k, hostile_json(rng));
            }
            Value::Array(a) if !a.is_empty() => {
                let x = a[rng.below(a.len())].clone();
                // Bounded so stacked duplications stay within MAX_LEN once serialised.
                let size = serde_json::to_vec(&x).map_or(1, |v| v.len() + 1);
                let most = (MAX_LEN / 4 / size).clamp(1, 5000);
                let times = if chance(rng, 0.1) {
                    1 + rng.below(most)
                } else {
                    1
                };
                for _ in 0..times {
                    a.push(x.clone());
                }
            }
            _ => *node = hostile_json(rng),
        },
        4 => match node {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(1.0);
                *node = match rng.below(6) {
                    0 => serde_json::json!(-x),
                    1 => serde_json::json!(x * 1e9),
                    2 => serde_json::json!(x + 0.5),
                    3 => Value::from(n.as_i64().unwrap_or(0).wrapping_add(1)),
                    4 => Value::from(x.to_string()),
                    _ => Value::from(0),
                };
            }
            Value::String(s) => {
                *node = match rng.below(5) {
                    0 => Value::from(s.to_uppercase()),
                    1 => Value::from(format!("{s}{s}")),
                    2 => Value::from(""),
                    3 => Value::from(s.chars().rev().collect::<String>()),
                    _ => Value::Array(vec![Value::from(s.clone())]),
                };
            }
            _ => *node = hostile_json(rng),
        },
        5 => {
            // Wrap the node in an array or an object.
            let inner = node.take();
            *node = if chance(rng, 0.5) {
                Value::Array(vec![inner])
            } else {
                serde_json::json!({ "value": inner })
            };
        }
        6 => {
            if let Value::Object(m) = node {
                if let Some(k) = m.keys().next().cloned() {
                    let x = m.remove(&k).unwrap();
                    let nk = match rng.below(3) {
                        0 => k.to_uppercase(),
                        1 => format!("{k}_"),
                        _ => String::new(),
                    };
                    m.insert(nk, x);
                }
            }
        }
        _ => *node = Value::from(rng.next_u64() as i64),
    }
}

/// A mutated JSON document: structural edits on the parsed seed (when it parses), then
/// sometimes text edits (which also make duplicate keys and syntax errors).
pub fn json_case(rng: &mut Rng, seeds: &[Vec<u8>], keys: &[&str]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let mut out = match serde_json::from_slice::<Value>(seed) {
        Ok(mut v) if chance(rng, 0.8) => {
            for _ in 0..stack_depth(rng) {
                json_once(rng, &mut v, keys);
            }
            if chance(rng, 0.5) {
                serde_json::to_vec_pretty(&v).unwrap_or_default()
            } else {
                serde_json::to_vec(&v).unwrap_or_default()
            }
        }
        _ => seed.clone(),
    };
    if out.is_empty() || chance(rng, 0.35) {
        if out.is_empty() {
            out = seed.clone();
        }
        for _ in 0..stack_depth(rng) {
            text_once(rng, &mut out, seeds);
            out.truncate(MAX_LEN);
        }
    }
    out
}

/// A TOML value chosen to upset a typed reader.
fn hostile_toml(rng: &mut Rng) -> toml::Value {
    use toml::Value as T;
    match rng.below(14) {
        0 => T::Integer(i64::MAX),
        1 => T::Integer(i64::MIN),
        2 => T::Integer(-1),
        3 => T::Integer(0),
        4 => T::Float(f64::NAN),
        5 => T::Float(f64::INFINITY),
        6 => T::Float(-0.0),
        7 => T::String(String::new()),
        8 => T::String("y".repeat(1 << rng.below(16))),
        9 => T::Boolean(chance(rng, 0.5)),
        10 => T::Array(vec![]),
        11 => T::Table(toml::Table::new()),
        12 => T::Float(1e300),
        _ => {
            let mut v = T::Integer(1);
            for _ in 0..(1 + rng.below(100)) {
                v = T::Array(vec![v]);
            }
            v
        }
    }
}

fn toml_once(rng: &mut Rng, t: &mut toml::Table, keys: &[&str]) {
    // Walk to a random table.
    let mut cur = t;
    while chance(rng, 0.6) {
        let tables: Vec<String> = cur
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone())
            .collect();
        if tables.is_empty() {
            break;
        }
        let k = pick(rng, &tables).clone();
        cur = cur.get_mut(&k).unwrap().as_table_mut().unwrap();
    }
    let existing: Vec<String> = cur.keys().cloned().collect();
    match rng.below(6) {
        0 | 1 if !existing.is_empty() => {
            let k = pick(rng, &existing).clone();
            let v = cur.get_mut(&k).unwrap();
            match v {
                toml::Value::Array(a) if !a.is_empty() && chance(rng, 0.5) => {
                    let i = rng.below(a.len());
                    a[i] = hostile_toml(rng);
                }
                toml::Value::Table(tt) if !tt.is_empty() && chance(rng, 0.5) => {
                    let kk = tt.keys().next().unwrap().clone();
                    tt.insert(kk, hostile_toml(rng));
                }
                _ => *v = hostile_toml(rng),
            }
        }
        2 if !existing.is_empty() => {
            cur.remove(pick(rng, &existing).as_str());
        }
        3 => {
            let k = if !keys.is_empty() && chance(rng, 0.7) {
                pick(rng, keys).to_string()
            } else {
                format!("unknown_{}", rng.below(50))
            };
            cur.insert(k, hostile_toml(rng));
        }
        4 if !existing.is_empty() => {
            let k = pick(rng, &existing).clone();
            if let Some(toml::Value::Array(a)) = cur.get_mut(&k) {
                a.reverse();
                if a.len() >= 2 && chance(rng, 0.5) {
                    a.truncate(1);
                }
            } else if let Some(v) = cur.remove(&k) {
                // Rename (a typo'd key).
                cur.insert(format!("{k}s"), v);
            }
        }
        _ => {
            let k = format!("t{}", rng.below(10));
            let mut inner = toml::Table::new();
            inner.insert("x".into(), hostile_toml(rng));
            cur.insert(k, toml::Value::Table(inner));
        }
    }
}

/// A mutated TOML document: structural edits on the parsed seed, then sometimes text edits.
pub fn toml_case(rng: &mut Rng, seeds: &[Vec<u8>], keys: &[&str]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let parsed = std::str::from_utf8(seed)
        .ok()
        .and_then(|s| toml::from_str::<toml::Table>(s).ok());
    let mut out = match parsed {
        Some(mut t) if chance(rng, 0.75) => {
            for _ in 0..stack_depth(rng) {
                toml_once(rng, &mut t, keys);
            }
            toml::to_string(&t)
                .map(String::into_bytes)
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    if out.is_empty() || chance(rng, 0.35) {
        if out.is_empty() {
            out = seed.clone();
        }
        for _ in 0..stack_depth(rng) {
            text_once(rng, &mut out, seeds);
            out.truncate(MAX_LEN);
        }
    }
    out
}

/// A mutated line-oriented text file (CSV, TSV, JSONL, dictionaries).
pub fn text_case(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = pick(rng, seeds).clone();
    for _ in 0..stack_depth(rng) {
        text_once(rng, &mut out, seeds);
        out.truncate(MAX_LEN);
    }
    out
}

/// Inputs are cut here after each mutation (stacked duplications would otherwise reach
/// hundreds of MiB; every loader is linear in the length, so bigger adds time, not coverage).
pub const MAX_LEN: usize = 4 << 20;

/// A mutated binary file: byte mutations, integer overwrites within the first `header` bytes.
pub fn binary_case(rng: &mut Rng, seeds: &[Vec<u8>], header: usize) -> Vec<u8> {
    let mut out = pick(rng, seeds).clone();
    for _ in 0..stack_depth(rng) {
        bytes_once(rng, &mut out, seeds, header);
        out.truncate(MAX_LEN);
    }
    out
}
