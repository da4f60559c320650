//! Reading ONNX models: the graph (nodes, inputs, outputs) and the initializer tensors, with a
//! protobuf wire-format reader of our own (no protobuf crate, no generated code).
//!
//! [`OnnxModel::open`] reads the file once and walks `ModelProto -> GraphProto` keeping only what
//! a weight converter needs: every node's name, op type, inputs, outputs and attributes, the
//! graph's inputs and outputs with their shapes, and for every initializer its name, dims, data
//! type and *where* its data lies in the file (nothing is copied until [`OnnxModel::tensor`]
//! asks for it). Every length, count and offset is checked against the buffer, so a truncated or
//! hostile file gives an [`Error::Weights`] naming the file, the byte and what is wrong, never
//! a panic and never an allocation larger than the file. Tensors stored outside the file
//! (`data_location = EXTERNAL`, models over 2 GB) are refused by name.
//!
//! ```
//! use deltatune_core::onnx::OnnxModel;
//! // ModelProto { graph: GraphProto { initializer: [TensorProto { dims: [2], data_type: FLOAT,
//! //   name: "w", raw_data: [1.5f32, -2.0f32] }] } }
//! let mut bytes = vec![0x3a, 19, 0x2a, 17, 0x08, 2, 0x10, 1, 0x42, 1, b'w', 0x4a, 8];
//! bytes.extend(1.5f32.to_le_bytes());
//! bytes.extend((-2.0f32).to_le_bytes());
//! let m = OnnxModel::from_bytes("tiny.onnx", bytes).unwrap();
//! assert_eq!(m.initializer_names().collect::<Vec<_>>(), ["w"]);
//! let w = m.tensor("w").unwrap();
//! assert_eq!(w.dims(), [2]);
//! assert_eq!(w.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
//! ```
//!
//! Field numbers are those of `onnx.proto` (ONNX 1.x): ModelProto `ir_version` 1,
//! `producer_name` 2, `producer_version` 3, `graph` 7, `opset_import` 8; GraphProto `node` 1,
//! `name` 2, `initializer` 5, `input` 11, `output` 12; NodeProto `input` 1, `output` 2, `name` 3,
//! `op_type` 4, `attribute` 5, `domain` 7; TensorProto `dims` 1, `data_type` 2, `segment` 3,
//! `float_data` 4, `int32_data` 5, `string_data` 6, `int64_data` 7, `name` 8, `raw_data` 9,
//! `double_data` 10, `uint64_data` 11, `external_data` 13, `data_location` 14.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::nearest_names;
use crate::{Error, Result};

mod wire;
use wire::{parse_model, wire_err, Cursor};

/// ONNX `TensorProto.DataType` values this reader knows by name.
pub mod data_type {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const UINT16: i32 = 4;
    pub const INT16: i32 = 5;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const STRING: i32 = 8;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const UINT32: i32 = 12;
    pub const UINT64: i32 = 13;
    pub const BFLOAT16: i32 = 16;

    /// ONNX's name of a data type, for messages.
    pub fn name(t: i32) -> String {
        match t {
            0 => "UNDEFINED".into(),
            FLOAT => "FLOAT".into(),
            UINT8 => "UINT8".into(),
            INT8 => "INT8".into(),
            UINT16 => "UINT16".into(),
            INT16 => "INT16".into(),
            INT32 => "INT32".into(),
            INT64 => "INT64".into(),
            STRING => "STRING".into(),
            BOOL => "BOOL".into(),
            FLOAT16 => "FLOAT16".into(),
            DOUBLE => "DOUBLE".into(),
            UINT32 => "UINT32".into(),
            UINT64 => "UINT64".into(),
            14 => "COMPLEX64".into(),
            15 => "COMPLEX128".into(),
            BFLOAT16 => "BFLOAT16".into(),
            t => format!("data type {t}"),
        }
    }
}

/// One operator of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxNode {
    /// The node's name (may be empty).
    pub name: String,
    /// The operator, e.g. `MatMul`.
    pub op_type: String,
    /// The operator set domain (empty for the default `ai.onnx`).
    pub domain: String,
    /// Names of the values read; an empty name is an omitted optional input.
    pub inputs: Vec<String>,
    /// Names of the values written.
    pub outputs: Vec<String>,
    pub attributes: Vec<OnnxAttribute>,
}

impl OnnxNode {
    /// The attribute `name`, if the node has it.
    pub fn attribute(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxAttribute {
    pub name: String,
    pub value: AttrValue,
}

/// The value of an attribute. Graphs, sparse tensors and type protos are not read.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    /// A tensor (a `Constant` node's `value`); read it with [`OnnxModel::f32_values`] or
    /// [`OnnxModel::i64_values`].
    Tensor(OnnxTensorInfo),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    /// A kind this reader does not decode (graph, sparse tensor, type proto), by its
    /// `AttributeProto.type` number.
    Other(i64),
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxValueInfo {
    pub name: String,
    /// The tensor element type (`data_type::FLOAT`, ...), when the value is a typed tensor.
    pub elem_type: Option<i32>,
    /// The dimensions, when the shape is given.
    pub shape: Option<Vec<OnnxDim>>,
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxDim {
    Value(i64),
    /// A symbolic dimension such as `batch_size`.
    Param(String),
    Unknown,
}

/// Occurrences of a repeated field: wire type and byte range of each.
type Chunks = Vec<(u8, Range<usize>)>;

/// Where a tensor's elements are: `raw_data` or one of the typed repeated fields.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TensorData {
    /// Nothing stored (an empty tensor, or only `string_data`, which is not read).
    None,
    /// `raw_data`: little-endian elements.
    Raw(Range<usize>),
    /// A typed repeated field: its field number and each occurrence (packed chunks or single
    /// unpacked values) with its wire type.
    Typed { field: u32, chunks: Chunks },
}

/// A tensor's description and the place of its data in the file; no element is read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxTensorInfo {
    pub name: String,
    /// ONNX dims (non-negative, checked when read).
    pub dims: Vec<i64>,
    /// `TensorProto.DataType` (see [`data_type`]).
    pub data_type: i32,
    data: TensorData,
    external: bool,
    /// Offset of the TensorProto in the file, for messages.
    offset: usize,
}

impl OnnxTensorInfo {
    /// The dims as `usize` (ONNX stores them as signed integers).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().map(|&d| d.max(0) as usize).collect()
    }
}

/// An ONNX model: the file's bytes, the graph, and the initializers by name.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    bytes: Vec<u8>,
    ir_version: i64,
    producer: String,
    opsets: Vec<(String, i64)>,
    graph_name: String,
    nodes: Vec<OnnxNode>,
    inputs: Vec<OnnxValueInfo>,
    outputs: Vec<OnnxValueInfo>,
    initializers: Vec<OnnxTensorInfo>,
    by_name: HashMap<String, usize>,
}

// ------------------------------------------------------------------------------------------
// The model.

impl OnnxModel {
    /// Reads and parses an ONNX file (see the module docs for what is checked).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "expected an ONNX model file (.onnx)".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Parses ONNX bytes; `path` names them in errors.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.into();
        let p = parse_model(&bytes).map_err(|e| Error::Weights {
            path: path.clone(),
            msg: format!(
                "not a readable ONNX model: at byte {} of {}: {} (the file is truncated, \
                 corrupt or not ONNX)",
                e.at,
                bytes.len(),
                e.msg
            ),
        })?;
        let mut by_name = HashMap::with_capacity(p.initializers.len());
        for (i, t) in p.initializers.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::Weights {
                    path,
                    msg: format!("two initializers are named `{}`", t.name),
                });
            }
        }
        Ok(Self {
            path,
            bytes,
            ir_version: p.ir_version,
            producer: p.producer,
            opsets: p.opsets,
            graph_name: p.graph_name,
            nodes: p.nodes,
            inputs: p.inputs,
            outputs: p.outputs,
            initializers: p.initializers,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ModelProto.ir_version`.
    pub fn ir_version(&self) -> i64 {
        self.ir_version
    }

    /// `producer_name producer_version`, e.g. `pytorch 2.7.0`.
    pub fn producer(&self) -> &str {
        &self.producer
    }

    /// The opset version imported for `domain` (`""` is the default `ai.onnx` domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let norm = |d: &str| if d == "ai.onnx" { "" } else { d }.to_string();
        self.opsets
            .iter()
            .find(|(d, _)| norm(d) == norm(domain))
            .map(|(_, v)| *v)
    }

    pub fn graph_name(&self) -> &str {
        &self.graph_name
    }

    /// The nodes, in the file's (topological) order.
    pub fn nodes(&self) -> &[OnnxNode] {
        &self.nodes
    }

    /// The graph inputs (in older files these include the initializers).
    pub fn inputs(&self) -> &[OnnxValueInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[OnnxValueInfo] {
        &self.outputs
    }

    /// Initializer names in file order.
    pub fn initializer_names(&self) -> impl Iterator<Item = &str> {
        self.initializers.iter().map(|t| t.name.as_str())
    }

    /// Every initializer's description, in file order.
    pub fn initializers(&self) -> &[OnnxTensorInfo] {
        &self.initializers
    }

    /// The initializer `name`, if there is one.
    pub fn initializer(&self, name: &str) -> Option<&OnnxTensorInfo> {
        self.by_name.get(name).map(|&i| &self.initializers[i])
    }

    /// The constant tensor behind the value `name`: an initializer, or the `value` of the
    /// `Constant` node writing it.
    pub fn constant(&self, name: &str) -> Option<&OnnxTensorInfo> {
        if let Some(t) = self.initializer(name) {
            return Some(t);
        }
        self.nodes
            .iter()
            .find(|n| n.op_type == "Constant" && n.outputs.iter().any(|o| o == name))
            .and_then(|n| match n.attribute("value") {
                Some(AttrValue::Tensor(t)) => Some(t),
                _ => None,
            })
    }

    /// The initializer `name` as an f32 tensor on the CPU (FLOAT, FLOAT16, BFLOAT16 and DOUBLE
    /// are read; integer types are refused: see [`OnnxModel::i64_values`]).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.initializer(name).ok_or_else(|| Error::MissingTensor {
            key: name.to_string(),
            path: self.path.clone(),
            nearest: nearest_names(name, self.initializer_names(), 3),
        })?;
        let values = self.weight_values(info)?;
        Ok(Tensor::from_vec(values, info.shape(), &Device::Cpu)?)
    }

    /// [`OnnxModel::f32_values`] of a tensor that holds weights: a NaN or an infinity is
    /// refused, naming the tensor (graph constants such as attention masks may hold -inf, so
    /// `f32_values` itself does not check).
    pub fn weight_values(&self, t: &OnnxTensorInfo) -> Result<Vec<f32>> {
        let values = self.f32_values(t)?;
        crate::finite::check_f32(&self.path, &t.name, &values)?;
        Ok(values)
    }

    fn tensor_err(&self, t: &OnnxTensorInfo, msg: String) -> Error {
        Error::Weights {
            path: self.path.clone(),
            msg: format!(
                "tensor `{}` (at byte {}, {} {:?}): {msg}",
                t.name,
                t.offset,
                data_type::name(t.data_type),
                t.dims
            ),
        }
    }

    /// The element count implied by the dims, checked.
    fn numel(&self, t: &OnnxTensorInfo) -> Result<usize> {
        let mut n: usize = 1;
        for &d in &t.dims {
            let d = usize::try_from(d)
                .map_err(|_| self.tensor_err(t, format!("negative dimension {d}")))?;
            n = n
                .checked_mul(d)
                .ok_or_else(|| self.tensor_err(t, "the dims overflow".into()))?;
        }
        Ok(n)
    }

    fn check_local(&self, t: &OnnxTensorInfo) -> Result<()> {
        if t.external {
            return Err(self.tensor_err(
                t,
                "its data is stored in an external file (data_location = EXTERNAL), which \
                 this reader does not follow; save the model with its weights inside \
                 (onnx.save_model(m, path, save_as_external_data=False))"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Raw little-endian bytes of exactly `n` elements of `size` bytes.
    fn raw<'a>(
        &'a self,
        t: &OnnxTensorInfo,
        r: &Range<usize>,
        n: usize,
        size: usize,
    ) -> Result<&'a [u8]> {
        let want = n.checked_mul(size);
        if want != Some(r.len()) {
            return Err(self.tensor_err(
                t,
                format!(
                    "raw_data has {} bytes but the dims need {} ({n} elements of {size} bytes)",
                    r.len(),
                    want.map_or("more than addressable".to_string(), |w| w.to_string())
                ),
            ));
        }
        Ok(&self.bytes[r.clone()])
    }

    fn count_err(&self, t: &OnnxTensorInfo, got: usize, n: usize) -> Error {
        self.tensor_err(t, format!("holds {got} elements but the dims need {n}"))
    }

    /// The elements of a floating-point tensor (FLOAT, FLOAT16, BFLOAT16, DOUBLE) as f32.
    pub fn f32_values(&self, t: &OnnxTensorInfo) -> Result<Vec<f32>> {
        use data_type::*;
        self.check_local(t)?;
        let n = self.numel(t)?;
        let unsupported = || {
            self.tensor_err(
                t,
                "expected a floating-point tensor (FLOAT, FLOAT16, BFLOAT16 or DOUBLE)".into(),
            )
        };
        match (&t.data, t.data_type) {
            (TensorData::None, FLOAT | FLOAT16 | BFLOAT16 | DOUBLE) if n == 0 => Ok(Vec::new()),
            (TensorData::None, FLOAT | FLOAT16 | BFLOAT16 | DOUBLE) => Err(self.count_err(t, 0, n)),
            (TensorData::Raw(r), FLOAT) => Ok(self
                .raw(t, r, n, 4)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            (TensorData::Raw(r), FLOAT16) => Ok(self
                .raw(t, r, n, 2)?
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            (TensorData::Raw(r), BFLOAT16) => Ok(self
                .raw(t, r, n, 2)?
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            (TensorData::Raw(r), DOUBLE) => Ok(self
                .raw(t, r, n, 8)?
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect()),
            (TensorData::Typed { field: 4, chunks }, FLOAT) => {
                let mut out = Vec::new();
                for (wire, r) in chunks {
                    self.typed_chunk(t, *wire, r, 4, &mut |b| {
                        out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    })?;
                }
                if out.len() != n {
                    return Err(self.count_err(t, out.len(), n));
                }
                Ok(out)
            }
            (TensorData::Typed { field: 10, chunks }, DOUBLE) => {
                let mut out = Vec::new();
                for (wire, r) in chunks {
                    self.typed_chunk(t, *wire, r, 8, &mut |b| {
                        out.push(f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    })?;
                }
                if out.len() != n {
                    return Err(self.count_err(t, out.len(), n));
                }
                Ok(out)
            }
            (TensorData::Typed { field: 5, .. }, FLOAT16 | BFLOAT16) => {
                let bits = self.varints(t, n)?;
                Ok(bits
                    .into_iter()
                    .map(|b| {
                        let b = b as u16;
                        if t.data_type == FLOAT16 {
                            half::f16::from_bits(b).to_f32()
                        } else {
                            half::bf16::from_bits(b).to_f32()
                        }
                    })
                    .collect())
            }
            (TensorData::Typed { field, .. }, FLOAT | FLOAT16 | BFLOAT16 | DOUBLE) => Err(self
                .tensor_err(
                    t,
                    format!("its data is in field {field}, which does not fit the type"),
                )),
            _ => Err(unsupported()),
        }
    }

    /// Calls `f` on each `size`-byte element of a fixed-width typed chunk.
    fn typed_chunk(
        &self,
        t: &OnnxTensorInfo,
        wire: u8,
        r: &Range<usize>,
        size: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        let data = &self.bytes[r.clone()];
        match wire {
            2 if data.len().is_multiple_of(size) => data.chunks_exact(size).for_each(f),
            2 => {
                return Err(self.tensor_err(
                    t,
                    format!(
                        "a packed chunk of {} bytes is not a multiple of {size}",
                        data.len()
                    ),
                ))
            }
            // An unpacked element: the range covers key + value; the value is the tail.
            1 if size == 8 && data.len() >= 8 => f(&data[data.len() - 8..]),
            5 if size == 4 && data.len() >= 4 => f(&data[data.len() - 4..]),
            w => {
                return Err(self.tensor_err(
                    t,
                    format!("an element has wire type {w}, not {size} bytes wide"),
                ))
            }
        }
        Ok(())
    }

    /// The values of a varint-typed field (int32_data, int64_data, uint64_data), exactly `n`.
    fn varints(&self, t: &OnnxTensorInfo, n: usize) -> Result<Vec<u64>> {
        let TensorData::Typed { chunks, .. } = &t.data else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (wire, r) in chunks {
            let mut c = Cursor::new(&self.bytes, r.clone());
            let res = match wire {
                2 => (|| {
                    while c.pos < c.end {
                        out.push(c.varint()?);
                    }
                    Ok(())
                })(),
                // An unpacked element: skip the key, read the value.
                0 => c.varint().and_then(|_| c.varint()).map(|v| out.push(v)),
                w => wire_err(
                    r.start,
                    format!("an element has wire type {w}, not a varint"),
                ),
            };
            res.map_err(|e| self.tensor_err(t, format!("at byte {}: {}", e.at, e.msg)))?;
        }
        if out.len() != n {
            return Err(self.count_err(t, out.len(), n));
        }
        Ok(out)
    }

    /// The elements of an integer or boolean tensor (INT8..INT64, UINT8..UINT64, BOOL) as i64
    /// (UINT64 values above `i64::MAX` wrap).
    pub fn i64_values(&self, t: &OnnxTensorInfo) -> Result<Vec<i64>> {
        use data_type::*;
        self.check_local(t)?;
        let n = self.numel(t)?;
        let (size, signed) = match t.data_type {
            INT8 => (1, true),
            UINT8 | BOOL => (1, false),
            INT16 => (2, true),
            UINT16 => (2, false),
            INT32 => (4, true),
            UINT32 => (4, false),
            INT64 => (8, true),
            UINT64 => (8, false),
            _ => return Err(self.tensor_err(t, "expected an integer or boolean tensor".into())),
        };
        match &t.data {
            TensorData::None if n == 0 => Ok(Vec::new()),
            TensorData::None => Err(self.count_err(t, 0, n)),
            TensorData::Raw(r) => Ok(self
                .raw(t, r, n, size)?
                .chunks_exact(size)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b[..size].copy_from_slice(c);
                    if signed && c[size - 1] & 0x80 != 0 {
                        b[size..].fill(0xff);
                    }
                    i64::from_le_bytes(b)
                })
                .collect()),
            TensorData::Typed { field, .. } => {
                // int32_data (5) holds INT8/16/32, UINT8/16, BOOL; int64_data (7) INT64;
                // uint64_data (11) UINT32/64.
                let expected = match t.data_type {
                    INT64 => 7,
                    UINT32 | UINT64 => 11,
                    _ => 5,
                };
                if *field != expected {
                    return Err(self.tensor_err(
                        t,
                        format!("its data is in field {field}, expected field {expected}"),
                    ));
                }
                let v = self.varints(t, n)?;
                Ok(v.into_iter()
                    .map(|x| {
                        if *field == 5 {
                            x as i64 as i32 as i64
                        } else {
                            x as i64
                        }
                    })
                    .collect())
            }
        }
    }
}
