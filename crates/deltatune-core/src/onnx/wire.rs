//! The protobuf wire format (varints, length-delimited fields, fixed 32/64-bit values) and the
//! ONNX messages read from it. Every length is checked against the enclosing message, so the
//! walk never reads outside the buffer; offsets are absolute in the file.

use std::ops::Range;

use super::{
    AttrValue, Chunks, OnnxAttribute, OnnxDim, OnnxNode, OnnxTensorInfo, OnnxValueInfo, TensorData,
};

/// A problem at a byte offset; turned into [`crate::Error::Weights`] with the file's path.
#[derive(Debug)]
pub(super) struct WireError {
    pub(super) at: usize,
    pub(super) msg: String,
}

pub(super) type Wire<T> = std::result::Result<T, WireError>;

pub(super) fn wire_err<T>(at: usize, msg: impl Into<String>) -> Wire<T> {
    Err(WireError {
        at,
        msg: msg.into(),
    })
}

/// A field's payload.
#[derive(Debug, Clone)]
enum Value {
    Varint(u64),
    /// Eight bytes (read through their range where needed).
    Fixed64,
    /// Length-delimited: the absolute byte range of the payload.
    Bytes(Range<usize>),
    Fixed32(u32),
}

impl Value {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => 0,
            Value::Fixed64 => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
        }
    }
}

/// A cursor over `buf[pos..end]`; offsets are absolute in `buf`.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) end: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8], range: Range<usize>) -> Self {
        debug_assert!(range.start <= range.end && range.end <= buf.len());
        Cursor {
            buf,
            pos: range.start,
            end: range.end,
        }
    }

    pub(super) fn varint(&mut self) -> Wire<u64> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            if self.pos >= self.end {
                return wire_err(
                    start,
                    format!(
                        "a varint runs past the end of its message (byte {})",
                        self.end
                    ),
                );
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            if i == 9 && b > 1 {
                return wire_err(start, "a varint is longer than 64 bits");
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        wire_err(start, "a varint is longer than 10 bytes")
    }

    fn fixed<const N: usize>(&mut self) -> Wire<[u8; N]> {
        if self.end - self.pos < N {
            return wire_err(
                self.pos,
                format!(
                    "a {}-byte value runs past the end of its message (byte {})",
                    N, self.end
                ),
            );
        }
        let mut b = [0u8; N];
        b.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(b)
    }

    /// The next field of the message, or `None` at its end.
    fn field(&mut self) -> Wire<Option<(u32, Value)>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return wire_err(at, format!("invalid field number {number}"));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.fixed::<8>()?;
                Value::Fixed64
            }
            2 => {
                let len_at = self.pos;
                let len = self.varint()?;
                let left = (self.end - self.pos) as u64;
                if len > left {
                    return wire_err(
                        len_at,
                        format!(
                            "field {number} claims {len} bytes but only {left} remain in its \
                             message"
                        ),
                    );
                }
                let start = self.pos;
                self.pos += len as usize;
                Value::Bytes(start..self.pos)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.fixed::<4>()?)),
            3 | 4 => {
                return wire_err(
                    at,
                    format!(
                        "field {number} uses the deprecated group wire type (not used by ONNX)"
                    ),
                )
            }
            w => return wire_err(at, format!("field {number} has invalid wire type {w}")),
        };
        Ok(Some((number as u32, value)))
    }
}

/// The payload range of a length-delimited field, or an error naming `what`.
fn bytes_of(v: &Value, at: usize, what: &str) -> Wire<Range<usize>> {
    match v {
        Value::Bytes(r) => Ok(r.clone()),
        other => wire_err(
            at,
            format!(
                "{what} should be length-delimited (wire type 2) but has wire type {}",
                other.wire_type()
            ),
        ),
    }
}

fn varint_of(v: &Value, at: usize, what: &str) -> Wire<u64> {
    match v {
        Value::Varint(x) => Ok(*x),
        other => wire_err(
            at,
            format!(
                "{what} should be a varint (wire type 0) but has wire type {}",
                other.wire_type()
            ),
        ),
    }
}

fn string_of(buf: &[u8], v: &Value, at: usize, what: &str) -> Wire<String> {
    let r = bytes_of(v, at, what)?;
    Ok(String::from_utf8_lossy(&buf[r]).into_owned())
}

/// Appends the int64 values of a repeated varint field (packed or not).
fn push_varints(buf: &[u8], v: &Value, at: usize, what: &str, out: &mut Vec<i64>) -> Wire<()> {
    match v {
        Value::Varint(x) => out.push(*x as i64),
        Value::Bytes(r) => {
            let mut c = Cursor::new(buf, r.clone());
            while c.pos < c.end {
                out.push(c.varint()? as i64);
            }
        }
        other => {
            return wire_err(
                at,
                format!(
                    "{what} should be varints but has wire type {}",
                    other.wire_type()
                ),
            )
        }
    }
    Ok(())
}

/// Appends the values of a repeated float field (packed or not).
fn push_floats(buf: &[u8], v: &Value, at: usize, what: &str, out: &mut Vec<f32>) -> Wire<()> {
    match v {
        Value::Fixed32(x) => out.push(f32::from_bits(*x)),
        Value::Bytes(r) => {
            if !r.len().is_multiple_of(4) {
                return wire_err(
                    r.start,
                    format!(
                        "{what} is {} bytes, not a multiple of 4 (packed floats)",
                        r.len()
                    ),
                );
            }
            out.extend(
                buf[r.clone()]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        other => {
            return wire_err(
                at,
                format!(
                    "{what} should be floats but has wire type {}",
                    other.wire_type()
                ),
            )
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The messages.

fn parse_tensor(buf: &[u8], range: Range<usize>) -> Wire<OnnxTensorInfo> {
    let offset = range.start;
    let mut t = OnnxTensorInfo {
        name: String::new(),
        dims: Vec::new(),
        data_type: 0,
        data: TensorData::None,
        external: false,
        offset,
    };
    let mut c = Cursor::new(buf, range);
    let mut typed: Option<(u32, Chunks)> = None;
    let mut raw: Option<Range<usize>> = None;
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        match field {
            1 => push_varints(buf, &v, at, "TensorProto.dims", &mut t.dims)?,
            2 => {
                let dt = varint_of(&v, at, "TensorProto.data_type")?;
                t.data_type = i32::try_from(dt as i64).unwrap_or(-1);
            }
            3 => {
                return wire_err(
                    at,
                    "segmented tensors (TensorProto.segment) are not supported",
                )
            }
            4 | 5 | 7 | 10 | 11 => {
                let chunk = match &v {
                    Value::Bytes(r) => (2, r.clone()),
                    Value::Varint(_) | Value::Fixed32(_) | Value::Fixed64 => {
                        // A single unpacked element: remember where its bytes are.
                        (v.wire_type(), at..c.pos)
                    }
                };
                match &mut typed {
                    Some((f, chunks)) if *f == field => chunks.push(chunk),
                    Some((f, _)) => {
                        return wire_err(at, format!("tensor data in two fields ({f} and {field})"))
                    }
                    None => typed = Some((field, vec![chunk])),
                }
            }
            8 => t.name = string_of(buf, &v, at, "TensorProto.name")?,
            9 => raw = Some(bytes_of(&v, at, "TensorProto.raw_data")?),
            13 => {
                bytes_of(&v, at, "TensorProto.external_data")?;
                t.external = true;
            }
            14 => t.external |= varint_of(&v, at, "TensorProto.data_location")? == 1,
            _ => {}
        }
    }
    t.data = match (raw, typed) {
        (Some(_), Some((f, _))) => {
            return wire_err(
                offset,
                format!(
                    "tensor `{}` has both raw_data and typed data (field {f})",
                    t.name
                ),
            )
        }
        (Some(r), None) => TensorData::Raw(r),
        (None, Some((field, chunks))) => TensorData::Typed { field, chunks },
        (None, None) => TensorData::None,
    };
    Ok(t)
}

fn parse_attribute(buf: &[u8], range: Range<usize>) -> Wire<OnnxAttribute> {
    let mut c = Cursor::new(buf, range);
    let mut name = String::new();
    let mut kind: Option<i64> = None;
    let (mut f, mut i, mut s, mut t) = (None, None, None, None);
    let (mut floats, mut ints, mut strings) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        match field {
            1 => name = string_of(buf, &v, at, "AttributeProto.name")?,
            2 => match v {
                Value::Fixed32(x) => f = Some(f32::from_bits(x)),
                _ => return wire_err(at, "AttributeProto.f should be a 32-bit float"),
            },
            3 => i = Some(varint_of(&v, at, "AttributeProto.i")? as i64),
            4 => s = Some(buf[bytes_of(&v, at, "AttributeProto.s")?].to_vec()),
            5 => t = Some(parse_tensor(buf, bytes_of(&v, at, "AttributeProto.t")?)?),
            7 => push_floats(buf, &v, at, "AttributeProto.floats", &mut floats)?,
            8 => push_varints(buf, &v, at, "AttributeProto.ints", &mut ints)?,
            9 => strings.push(buf[bytes_of(&v, at, "AttributeProto.strings")?].to_vec()),
            20 => kind = Some(varint_of(&v, at, "AttributeProto.type")? as i64),
            _ => {}
        }
    }
    // AttributeProto.type: FLOAT 1, INT 2, STRING 3, TENSOR 4, GRAPH 5, FLOATS 6, INTS 7,
    // STRINGS 8; older files may omit it, then the one field present decides.
    let value = match kind {
        Some(1) => AttrValue::Float(f.unwrap_or(0.0)),
        Some(2) => AttrValue::Int(i.unwrap_or(0)),
        Some(3) => AttrValue::String(s.unwrap_or_default()),
        Some(4) => match t {
            Some(t) => AttrValue::Tensor(t),
            None => AttrValue::Other(4),
        },
        Some(6) => AttrValue::Floats(floats),
        Some(7) => AttrValue::Ints(ints),
        Some(8) => AttrValue::Strings(strings),
        Some(k) => AttrValue::Other(k),
        None => {
            if let Some(t) = t {
                AttrValue::Tensor(t)
            } else if let Some(f) = f {
                AttrValue::Float(f)
            } else if let Some(i) = i {
                AttrValue::Int(i)
            } else if let Some(s) = s {
                AttrValue::String(s)
            } else if !floats.is_empty() {
                AttrValue::Floats(floats)
            } else if !ints.is_empty() {
                AttrValue::Ints(ints)
            } else if !strings.is_empty() {
                AttrValue::Strings(strings)
            } else {
                AttrValue::Other(0)
            }
        }
    };
    Ok(OnnxAttribute { name, value })
}

fn parse_node(buf: &[u8], range: Range<usize>) -> Wire<OnnxNode> {
    let mut n = OnnxNode {
        name: String::new(),
        op_type: String::new(),
        domain: String::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        attributes: Vec::new(),
    };
    let mut c = Cursor::new(buf, range);
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        match field {
            1 => n.inputs.push(string_of(buf, &v, at, "NodeProto.input")?),
            2 => n.outputs.push(string_of(buf, &v, at, "NodeProto.output")?),
            3 => n.name = string_of(buf, &v, at, "NodeProto.name")?,
            4 => n.op_type = string_of(buf, &v, at, "NodeProto.op_type")?,
            5 => n.attributes.push(parse_attribute(
                buf,
                bytes_of(&v, at, "NodeProto.attribute")?,
            )?),
            7 => n.domain = string_of(buf, &v, at, "NodeProto.domain")?,
            _ => {}
        }
    }
    Ok(n)
}

/// `ValueInfoProto { name 1, type 2: TypeProto { tensor_type 1: { elem_type 1, shape 2 } } }`.
fn parse_value_info(buf: &[u8], range: Range<usize>) -> Wire<OnnxValueInfo> {
    let mut info = OnnxValueInfo {
        name: String::new(),
        elem_type: None,
        shape: None,
    };
    let mut c = Cursor::new(buf, range);
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        match field {
            1 => info.name = string_of(buf, &v, at, "ValueInfoProto.name")?,
            2 => {
                let mut ty = Cursor::new(buf, bytes_of(&v, at, "ValueInfoProto.type")?);
                loop {
                    let at = ty.pos;
                    let Some((field, v)) = ty.field()? else { break };
                    if field != 1 {
                        continue; // sequences, maps, optionals: not read
                    }
                    let mut tt = Cursor::new(buf, bytes_of(&v, at, "TypeProto.tensor_type")?);
                    loop {
                        let at = tt.pos;
                        let Some((field, v)) = tt.field()? else { break };
                        match field {
                            1 => {
                                let e = varint_of(&v, at, "TypeProto.Tensor.elem_type")?;
                                info.elem_type = Some(i32::try_from(e as i64).unwrap_or(-1));
                            }
                            2 => {
                                info.shape = Some(parse_shape(
                                    buf,
                                    bytes_of(&v, at, "TypeProto.Tensor.shape")?,
                                )?)
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// `TensorShapeProto { dim 1: { dim_value 1 | dim_param 2 } }`.
fn parse_shape(buf: &[u8], range: Range<usize>) -> Wire<Vec<OnnxDim>> {
    let mut dims = Vec::new();
    let mut c = Cursor::new(buf, range);
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        if field != 1 {
            continue;
        }
        let mut d = Cursor::new(buf, bytes_of(&v, at, "TensorShapeProto.dim")?);
        let mut dim = OnnxDim::Unknown;
        loop {
            let at = d.pos;
            let Some((field, v)) = d.field()? else { break };
            match field {
                1 => dim = OnnxDim::Value(varint_of(&v, at, "Dimension.dim_value")? as i64),
                2 => dim = OnnxDim::Param(string_of(buf, &v, at, "Dimension.dim_param")?),
                _ => {}
            }
        }
        dims.push(dim);
    }
    Ok(dims)
}

/// Everything read from `ModelProto`.
pub(super) struct Parsed {
    pub(super) ir_version: i64,
    pub(super) producer: String,
    pub(super) opsets: Vec<(String, i64)>,
    pub(super) graph_name: String,
    pub(super) nodes: Vec<OnnxNode>,
    pub(super) inputs: Vec<OnnxValueInfo>,
    pub(super) outputs: Vec<OnnxValueInfo>,
    pub(super) initializers: Vec<OnnxTensorInfo>,
}

pub(super) fn parse_model(buf: &[u8]) -> Wire<Parsed> {
    let mut p = Parsed {
        ir_version: 0,
        producer: String::new(),
        opsets: Vec::new(),
        graph_name: String::new(),
        nodes: Vec::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        initializers: Vec::new(),
    };
    let (mut producer_name, mut producer_version) = (String::new(), String::new());
    let mut graph: Option<Range<usize>> = None;
    let mut c = Cursor::new(buf, 0..buf.len());
    loop {
        let at = c.pos;
        let Some((field, v)) = c.field()? else { break };
        match field {
            1 => p.ir_version = varint_of(&v, at, "ModelProto.ir_version")? as i64,
            2 => producer_name = string_of(buf, &v, at, "ModelProto.producer_name")?,
            3 => producer_version = string_of(buf, &v, at, "ModelProto.producer_version")?,
            7 => {
                if graph.is_some() {
                    return wire_err(at, "the model has two graphs (ModelProto.graph twice)");
                }
                graph = Some(bytes_of(&v, at, "ModelProto.graph")?);
            }
            8 => {
                let mut o = Cursor::new(buf, bytes_of(&v, at, "ModelProto.opset_import")?);
                let (mut domain, mut version) = (String::new(), 0);
                loop {
                    let at = o.pos;
                    let Some((field, v)) = o.field()? else { break };
                    match field {
                        1 => domain = string_of(buf, &v, at, "OperatorSetIdProto.domain")?,
                        2 => version = varint_of(&v, at, "OperatorSetIdProto.version")? as i64,
                        _ => {}
                    }
                }
                p.opsets.push((domain, version));
            }
            _ => {}
        }
    }
    p.producer = format!("{producer_name} {producer_version}")
        .trim()
        .to_string();
    let Some(graph) = graph else {
        return wire_err(
            0,
            "no graph (ModelProto field 7): this is not an ONNX model, or it is empty",
        );
    };
    let mut g = Cursor::new(buf, graph);
    loop {
        let at = g.pos;
        let Some((field, v)) = g.field()? else { break };
        match field {
            1 => p
                .nodes
                .push(parse_node(buf, bytes_of(&v, at, "GraphProto.node")?)?),
            2 => p.graph_name = string_of(buf, &v, at, "GraphProto.name")?,
            5 => p.initializers.push(parse_tensor(
                buf,
                bytes_of(&v, at, "GraphProto.initializer")?,
            )?),
            11 => p.inputs.push(parse_value_info(
                buf,
                bytes_of(&v, at, "GraphProto.input")?,
            )?),
            12 => p.outputs.push(parse_value_info(
                buf,
                bytes_of(&v, at, "GraphProto.output")?,
            )?),
            _ => {}
        }
    }
    Ok(p)
}
