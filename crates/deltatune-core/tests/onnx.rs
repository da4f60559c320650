//! The ONNX reader against files written by the `onnx` package (`scripts/gen_vit_fixtures.py`):
//! every storage form of a tensor, nodes, attributes and graph inputs; and against hostile
//! bytes: truncations, huge lengths, bad wire types, lying dims and a seeded mutation loop, all
//! of which must give errors, never panics.

use std::path::{Path, PathBuf};

use deltatune_core::onnx::{data_type, AttrValue, OnnxDim, OnnxModel};
use deltatune_core::{Error, Rng};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn small() -> (OnnxModel, serde_json::Value) {
    let dir = fixtures().join("onnx");
    let m = OnnxModel::open(&dir.join("small.onnx")).unwrap();
    let json = std::fs::read_to_string(dir.join("small.json")).unwrap();
    (m, serde_json::from_str(&json).unwrap())
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn small_model_tensors_equal_what_onnx_wrote() {
    let (m, exp) = small();
    assert_eq!(
        m.initializer_names().collect::<Vec<_>>(),
        [
            "w_raw",
            "b_floats",
            "h_raw",
            "d_doubles",
            "i64_ints",
            "i64_raw",
            "i32_ints",
            "scalar",
            "empty"
        ]
    );
    for name in ["w_raw", "b_floats", "h_raw", "d_doubles", "scalar", "empty"] {
        let e = &exp[name];
        let dims: Vec<usize> = e["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let t = m.tensor(name).unwrap();
        assert_eq!(t.dims(), dims.as_slice(), "{name}");
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, floats(&e["values"]), "{name}");
    }
    for name in ["i64_ints", "i64_raw", "i32_ints"] {
        let info = m.initializer(name).unwrap();
        let want: Vec<i64> = exp[name]["ints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(m.i64_values(info).unwrap(), want, "{name}");
    }
    // Integer tensors are not silently read as floats.
    let e = m.tensor("i64_raw").unwrap_err().to_string();
    assert!(e.contains("floating-point") && e.contains("i64_raw"), "{e}");
    let e = m.tensor("w_rav").unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { nearest, .. } if nearest.contains("w_raw")),
        "{e}"
    );
}

#[test]
fn small_model_graph_nodes_attributes_and_inputs() {
    let (m, exp) = small();
    assert_eq!(m.ir_version(), 7);
    assert_eq!(m.opset(""), Some(14));
    assert_eq!(m.opset("ai.onnx"), Some(14));
    assert_eq!(m.producer(), "gen_vit_fixtures");
    assert_eq!(m.graph_name(), "small");
    let nodes: Vec<serde_json::Value> = m
        .nodes()
        .iter()
        .map(|n| serde_json::json!([n.op_type, n.name, n.inputs, n.outputs]))
        .collect();
    assert_eq!(serde_json::Value::Array(nodes), exp["nodes"]);
    // The Constant node's tensor, through `constant`.
    let c = m.constant("c_out").unwrap();
    assert_eq!(c.data_type, data_type::INT64);
    assert_eq!(m.i64_values(c).unwrap(), [6, 64]);
    assert_eq!(m.constant("w_raw").unwrap().dims, [3, 4]);
    assert!(m.constant("y").is_none());
    let n = &m.nodes()[3];
    assert_eq!(n.attribute("alpha"), Some(&AttrValue::Float(0.25)));
    assert_eq!(n.attribute("count"), Some(&AttrValue::Int(-5)));
    assert_eq!(
        n.attribute("mode"),
        Some(&AttrValue::String(b"cubic".to_vec()))
    );
    assert_eq!(n.attribute("sizes"), Some(&AttrValue::Ints(vec![1, 2, 3])));
    assert_eq!(
        n.attribute("scales"),
        Some(&AttrValue::Floats(vec![0.5, 1.5]))
    );
    assert_eq!(
        n.attribute("names"),
        Some(&AttrValue::Strings(vec![b"a".to_vec(), b"bc".to_vec()]))
    );
    let x = &m.inputs()[0];
    assert_eq!(x.name, "x");
    assert_eq!(x.elem_type, Some(data_type::FLOAT));
    assert_eq!(
        x.shape.as_deref(),
        Some(&[OnnxDim::Param("batch".into()), OnnxDim::Value(3)][..])
    );
    assert_eq!(m.outputs()[0].name, "z");
}

#[test]
fn external_data_is_refused_by_name() {
    let m = OnnxModel::open(&fixtures().join("onnx/external.onnx")).unwrap();
    let e = m.tensor("w_external").unwrap_err().to_string();
    assert!(
        e.contains("w_external") && e.contains("external") && e.contains("external.onnx"),
        "{e}"
    );
}

#[test]
fn a_real_export_reads_every_initializer() {
    let m = OnnxModel::open(&fixtures().join("tiny-dinov2/model.onnx")).unwrap();
    assert!(m.producer().starts_with("pytorch"), "{}", m.producer());
    let mut n = 0;
    for info in m.initializers() {
        let t = m.tensor(&info.name).unwrap();
        assert_eq!(t.dims(), info.shape().as_slice());
        n += 1;
    }
    assert!(n > 20, "{n} initializers");
    assert!(m.nodes().iter().any(|n| n.op_type == "MatMul"));
}

// ------------------------------------------------------------------------------------------
// Hostile bytes.

/// Protobuf encoding helpers for building messages by hand.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
    varint(field << 3 | wire, out);
}

fn len_field(field: u64, payload: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

fn int_field(field: u64, v: u64, out: &mut Vec<u8>) {
    key(field, 0, out);
    varint(v, out);
}

/// A model with one FLOAT initializer `w` of `dims` and `raw` as raw_data.
fn model_with(dims: &[i64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        int_field(1, d as u64, &mut t);
    }
    int_field(2, 1, &mut t);
    len_field(8, b"w", &mut t);
    len_field(9, raw, &mut t);
    let mut g = Vec::new();
    len_field(5, &t, &mut g);
    let mut m = Vec::new();
    int_field(1, 7, &mut m);
    len_field(7, &g, &mut m);
    m
}

fn parse_err(bytes: Vec<u8>) -> String {
    OnnxModel::from_bytes("hostile.onnx", bytes)
        .unwrap_err()
        .to_string()
}

fn tensor_err(bytes: Vec<u8>) -> String {
    let m = OnnxModel::from_bytes("hostile.onnx", bytes).unwrap();
    m.tensor("w").unwrap_err().to_string()
}

#[test]
fn hand_built_model_reads() {
    let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let m = OnnxModel::from_bytes("ok.onnx", model_with(&[2, 3], &raw)).unwrap();
    let t = m.tensor("w").unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    );
}

#[test]
fn non_finite_initializers_are_refused_naming_the_tensor() {
    for (bad, what) in [(f32::NAN, "1 NaN"), (f32::NEG_INFINITY, "1 infinite")] {
        let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, bad, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            tensor_err(model_with(&[2, 3], &raw)),
            format!(
                "tensor `w` in hostile.onnx holds {what} among its 6 values (the first at index \
                 4): the model file is damaged: fetch it again (`deltatune fetch` for the \
                 default models) or download it again from its source"
            )
        );
    }
}

#[test]
fn hostile_headers_are_errors_naming_the_file() {
    for (bytes, want) in [
        (Vec::new(), "no graph"),
        (b"hello world, not onnx".to_vec(), "hostile.onnx"),
        // graph: length 2^40.
        (vec![0x3a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20], "claims"),
        // A varint longer than 10 bytes.
        (
            vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            "64 bits",
        ),
        (vec![0x08, 0xff, 0xff], "varint runs past"),
        // Wire types 3 (group), 7 (invalid), field number 0.
        (vec![0x0b], "group"),
        (vec![0x0f], "invalid wire type"),
        (vec![0x02, 0x00], "invalid field number"),
        // graph as a varint.
        (vec![0x38, 0x01], "length-delimited"),
        // fixed32 cut short.
        (vec![0x0d, 0x01, 0x02], "4-byte value"),
        // Two graphs.
        (vec![0x3a, 0x00, 0x3a, 0x00], "two graphs"),
    ] {
        let e = parse_err(bytes.clone());
        assert!(
            e.contains(want) && e.contains("hostile.onnx"),
            "{bytes:?}: {e}"
        );
    }
    // A node field whose inner length overruns its message (but not the file).
    let mut node = Vec::new();
    key(3, 2, &mut node);
    varint(50, &mut node);
    node.extend_from_slice(b"abc");
    let mut g = Vec::new();
    len_field(1, &node, &mut g);
    let mut m = Vec::new();
    len_field(7, &g, &mut m);
    len_field(20, &[0u8; 64], &mut m); // an unknown field: the file goes on
    let e = parse_err(m);
    assert!(e.contains("claims 50 bytes"), "{e}");
}

#[test]
fn lying_dims_are_errors_without_huge_allocations() {
    let raw = [0u8; 8];
    // Dims far larger than the data: refused before allocating.
    let e = tensor_err(model_with(&[1 << 40, 1 << 20], &raw));
    assert!(e.contains("raw_data has 8 bytes"), "{e}");
    let e = tensor_err(model_with(&[i64::MAX, 4], &raw));
    assert!(e.contains("overflow"), "{e}");
    let e = tensor_err(model_with(&[-2, -1], &raw));
    assert!(e.contains("negative dimension"), "{e}");
    let e = tensor_err(model_with(&[3], &raw));
    assert!(
        e.contains("raw_data has 8 bytes but the dims need 12"),
        "{e}"
    );
    // float_data with the wrong count.
    let mut t = Vec::new();
    int_field(1, 3, &mut t);
    int_field(2, 1, &mut t);
    len_field(8, b"w", &mut t);
    len_field(4, &1.0f32.to_le_bytes(), &mut t);
    let mut g = Vec::new();
    len_field(5, &t, &mut g);
    let mut m = Vec::new();
    len_field(7, &g, &mut m);
    let e = tensor_err(m);
    assert!(e.contains("holds 1 elements but the dims need 3"), "{e}");
    // data_location = EXTERNAL.
    let mut t = Vec::new();
    int_field(2, 1, &mut t);
    len_field(8, b"w", &mut t);
    int_field(14, 1, &mut t);
    let mut g = Vec::new();
    len_field(5, &t, &mut g);
    let mut m = Vec::new();
    len_field(7, &g, &mut m);
    assert!(tensor_err(m).contains("external file"));
}

#[test]
fn every_truncation_of_a_real_model_is_handled() {
    let bytes = std::fs::read(fixtures().join("onnx/small.onnx")).unwrap();
    for cut in 0..bytes.len() {
        exercise(bytes[..cut].to_vec());
    }
}

/// Parses `bytes` and, when that works, reads every tensor and constant; errors are fine,
/// panics are not.
fn exercise(bytes: Vec<u8>) -> bool {
    let Ok(m) = OnnxModel::from_bytes("mutant.onnx", bytes) else {
        return false;
    };
    for info in m.initializers() {
        let _ = m.f32_values(info);
        let _ = m.i64_values(info);
        let _ = m.tensor(&info.name);
    }
    for n in m.nodes() {
        for o in &n.outputs {
            if let Some(t) = m.constant(o) {
                let _ = m.f32_values(t);
                let _ = m.i64_values(t);
            }
        }
    }
    true
}

#[test]
fn seeded_mutations_never_panic() {
    let bytes = std::fs::read(fixtures().join("onnx/small.onnx")).unwrap();
    let mut rng = Rng::new(20_251_201);
    let mut parsed = 0;
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len().max(1));
            match rng.below(6) {
                0 if !b.is_empty() => b[i] ^= 1 << rng.below(8),
                1 if !b.is_empty() => b[i] = rng.below(256) as u8,
                2 => b.insert(i.min(b.len()), rng.below(256) as u8),
                3 if !b.is_empty() => {
                    b.remove(i);
                }
                // A length or varint made huge.
                4 if !b.is_empty() => b[i] |= 0x80,
                _ => b.truncate(i),
            }
        }
        parsed += usize::from(exercise(b));
    }
    // Some mutants still parse (a flipped value byte), most do not.
    assert!(parsed > 100 && parsed < 20_000, "{parsed} of 20000 parsed");
}
