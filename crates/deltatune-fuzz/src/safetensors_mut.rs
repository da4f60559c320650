//! Structure-aware mutations of safetensors files: the JSON header is parsed and its dtypes,
//! shapes and data offsets rewritten, entries dropped, duplicated or multiplied, then the file
//! is put back together with a correct, inflated or deflated length prefix.

use deltatune_core::Rng;
use serde_json::{Map, Value};

use crate::mutate::{binary_case, hostile_json, pick, stack_depth, INTERESTING_U64};

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32", "", "XYZ",
];

/// The header (as a JSON object) and the data section of a safetensors file.
pub fn split(bytes: &[u8]) -> Option<(Map<String, Value>, &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let v: Value = serde_json::from_slice(header).ok()?;
    Some((v.as_object()?.clone(), &bytes[8 + n..]))
}

fn hostile_u64(rng: &mut Rng, data_len: u64) -> Value {
    match rng.below(4) {
        0 => Value::from(*pick(rng, INTERESTING_U64)),
        1 => Value::from(data_len + rng.below(9) as u64),
        2 => Value::from(data_len.saturating_sub(rng.below(9) as u64)),
        _ => hostile_json(rng),
    }
}

fn tensor_names(h: &Map<String, Value>) -> Vec<String> {
    h.keys()
        .filter(|k| k.as_str() != "__metadata__")
        .cloned()
        .collect()
}

/// Sets `field` of entry `name`, turning a non-object entry into an object first.
fn set(h: &mut Map<String, Value>, name: &str, field: &str, v: Value) {
    let e = h
        .entry(name.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !e.is_object() {
        *e = Value::Object(Map::new());
    }
    e.as_object_mut().unwrap().insert(field.to_string(), v);
}

fn mutate_header(rng: &mut Rng, h: &mut Map<String, Value>, data_len: u64) {
    let names = tensor_names(h);
    if names.is_empty() {
        h.insert(
            "t".into(),
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
        );
        return;
    }
    let name = pick(rng, &names).clone();
    match rng.below(14) {
        0 => {
            let d = *pick(rng, DTYPES);
            set(h, &name, "dtype", Value::from(d));
        }
        1 => {
            // Shape: an extra dim, a huge dim, zero, negative, float, string, product-preserving
            // reshape.
            let shape = h[&name]["shape"].as_array().cloned().unwrap_or_default();
            let mut s: Vec<Value> = shape;
            match rng.below(7) {
                0 => s.push(Value::from(1 + rng.below(3))),
                1 if !s.is_empty() => {
                    let i = rng.below(s.len());
                    s[i] = Value::from(*pick(rng, INTERESTING_U64));
                }
                2 => s = vec![Value::from(0)],
                3 => s = vec![],
                4 if !s.is_empty() => {
                    let i = rng.below(s.len());
                    s[i] = hostile_json(rng);
                }
                5 => {
                    // [a*b] -> [a, b] and back: same element count, different rank.
                    let n: u64 = s.iter().filter_map(Value::as_u64).product();
                    s = if n.is_multiple_of(2) && n > 0 {
                        vec![Value::from(2), Value::from(n / 2)]
                    } else {
                        vec![Value::from(n)]
                    };
                }
                _ => {
                    // Dims whose product overflows u64.
                    s = vec![Value::from(1u64 << 32); 3];
                }
            }
            set(h, &name, "shape", Value::Array(s));
        }
        2 => {
            let offs = h[&name]["data_offsets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut o = offs;
            match rng.below(6) {
                0 if o.len() == 2 => o.swap(0, 1),
                1 if o.len() == 2 => {
                    let i = rng.below(2);
                    o[i] = hostile_u64(rng, data_len);
                }
                2 => o.truncate(1),
                3 => o.push(Value::from(0)),
                4 => o = vec![Value::from(0), Value::from(data_len)],
                _ => o = vec![hostile_u64(rng, data_len), hostile_u64(rng, data_len)],
            }
            set(h, &name, "data_offsets", Value::Array(o));
        }
        3 => {
            h.remove(&name);
        }
        4 => {
            // Another entry pointing at the same bytes.
            let e = h[&name].clone();
            h.insert(format!("{name}.alias{}", rng.below(10)), e);
        }
        5 => {
            // Overlap: point at another tensor's range.
            let other = pick(rng, &names).clone();
            let o = h[&other]["data_offsets"].clone();
            set(h, &name, "data_offsets", o);
        }
        6 => {
            // Many empty tensors: a header that is large relative to the data.
            let n = 1 + rng.below(20_000);
            for i in 0..n {
                h.insert(
                    format!("e{i}"),
                    serde_json::json!({"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
                );
            }
        }
        7 => {
            let meta = match rng.below(5) {
                0 => serde_json::json!({"format": "pt"}),
                1 => serde_json::json!({"format": 5}),
                2 => serde_json::json!(["a"]),
                3 => serde_json::json!({"nested": {"a": 1}}),
                _ => hostile_json(rng),
            };
            h.insert("__metadata__".into(), meta);
        }
        8 => {
            let e = h.remove(&name).unwrap();
            let n = match rng.below(4) {
                0 => String::new(),
                1 => "k".repeat(1 << rng.below(17)),
                2 => "\u{0}".into(),
                _ => format!("{name}\u{fffd}"),
            };
            h.insert(n, e);
        }
        9 => {
            h[&name] = hostile_json(rng);
        }
        10 => {
            if let Some(m) = h[&name].as_object_mut() {
                let keys: Vec<String> = m.keys().cloned().collect();
                if !keys.is_empty() {
                    m.remove(pick(rng, &keys).as_str());
                }
            }
        }
        11 => {
            if let Some(m) = h[&name].as_object_mut() {
                m.insert("extra".into(), hostile_json(rng));
            }
        }
        12 => {
            // Consistent lie: a 1 TB tensor whose offsets claim the same.
            h[&name] = serde_json::json!({
                "dtype": "F32",
                "shape": [1u64 << 38],
                "data_offsets": [0, 1u64 << 40],
            });
        }
        _ => {
            // dtype change with offsets kept: element size no longer matches.
            let d = *pick(rng, &["F16", "F64", "U8", "I64"]);
            set(h, &name, "dtype", Value::from(d));
        }
    }
}

/// One structured case: header edits, then the file rebuilt (length prefix sometimes wrong,
/// data sometimes cut or padded), then sometimes a few byte edits on top.
pub fn case(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let Some((mut h, data)) = split(seed) else {
        return binary_case(rng, seeds, 4096);
    };
    let mut data = data.to_vec();
    for _ in 0..stack_depth(rng) {
        mutate_header(rng, &mut h, data.len() as u64);
    }
    let mut header = serde_json::to_vec(&Value::Object(h)).unwrap_or_default();
    // safetensors pads the header with spaces to 8 bytes.
    while !header.len().is_multiple_of(8) && rng.below(2) == 0 {
        header.push(b' ');
    }
    let real = header.len() as u64;
    let prefix = match rng.below(10) {
        0 => *pick(rng, INTERESTING_U64),
        1 => real + 1 + rng.below(16) as u64,
        2 => real.saturating_sub(1 + rng.below(16) as u64),
        3 => real + data.len() as u64 + rng.below(3) as u64,
        _ => real,
    };
    match rng.below(8) {
        0 => data.truncate(rng.below(data.len() + 1)),
        1 => data.extend(std::iter::repeat_n(0u8, rng.below(4096))),
        _ => {}
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&prefix.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    if rng.below(4) == 0 {
        let hl = 8 + header.len();
        for _ in 0..stack_depth(rng) {
            crate::mutate::bytes_once(rng, &mut out, seeds, hl);
        }
    }
    out
}
