//! Reading GGUF files (llama.cpp's single-file checkpoints): metadata up front, tensors on
//! demand.
//!
//! [`GgufFile::open`] first walks the whole header itself — magic, version, every metadata
//! entry, every tensor description — checking each length against the file size, each
//! tensor's type against what candle can read and each tensor's data range against the end of
//! the file. Only a header that passes is handed to candle's
//! `gguf_file::Content::read`, so a truncated download, a file that is not GGUF, a tensor type
//! newer than candle or a corrupt offset gives an [`Error::Weights`] naming the file and the
//! key or tensor at fault instead of a panic, an enormous allocation or a bare "unknown dtype".
//! candle's reader additionally runs under `catch_unwind` as a last resort.
//!
//! The file stays open; [`GgufFile::tensor`] seeks to one tensor and reads just it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::nearest_names;
use crate::quant::{ggml_type_name, QuantMatrix};
use crate::{Error, Result};

/// The ggml tensor types candle's GGUF reader can load, by ggml type id.
fn loadable_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// ggml's name of a tensor type id, for the types candle cannot load.
fn other_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31..=33 => "Q4_0_4_4/Q4_0_4_8/Q4_0_8_8 (removed from ggml)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36..=38 => "IQ4_NL_4_4/IQ4_NL_4_8/IQ4_NL_8_8 (removed from ggml)",
        39 => "MXFP4",
        _ => return None,
    })
}

const LOADABLE_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, \
                              Q5_K, Q6_K";

// The limits of candle's reader: larger values are rejected here with the key named.
const MAX_STRING_LEN: u64 = 1 << 30;
const MAX_ARRAY_LEN: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;
const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The GGUF metadata value types, by id: `(name, fixed size in bytes)`, size 0 when variable.
fn value_type(id: u32) -> Option<(&'static str, u64)> {
    Some(match id {
        0 => ("u8", 1),
        1 => ("i8", 1),
        2 => ("u16", 2),
        3 => ("i16", 2),
        4 => ("u32", 4),
        5 => ("i32", 4),
        6 => ("f32", 4),
        7 => ("bool", 1),
        8 => ("string", 0),
        9 => ("array", 0),
        10 => ("u64", 8),
        11 => ("i64", 8),
        12 => ("f64", 8),
        _ => return None,
    })
}

/// A bounds-checked walk over the header, never reading past `len`.
struct Scan<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    /// Length prefixes (strings, arrays, dims) are u32 in GGUF v1 and u64 later.
    wide: bool,
    path: &'a Path,
}

impl<R: Read + Seek> Scan<'_, R> {
    fn err(&self, msg: String) -> Error {
        Error::Weights {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.err(format!(
                "the file ends at byte {} but {} needs {n} bytes from byte {}: the file is \
                 truncated (an interrupted download?) or its header is corrupt",
                self.len,
                what(),
                self.pos
            )));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("reading {} at byte {}: {e}", what(), self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A length prefix or a dimension: u32 in v1, u64 later.
    fn length(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.need(n, what)?;
        let n_i64 = i64::try_from(n).map_err(|_| self.err(format!("{} is too long", what())))?;
        self.r
            .seek(SeekFrom::Current(n_i64))
            .map_err(|e| self.err(format!("seeking past {}: {e}", what())))?;
        self.pos += n;
        Ok(())
    }

    /// A string of at most `max` bytes, read (keys and tensor names).
    fn string(&mut self, max: u64, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.length(what)?;
        if n > max {
            return Err(self.err(format!(
                "{} claims to be {n} bytes long (at most {max} expected): corrupt header",
                what()
            )));
        }
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| self.err(format!("reading {} at byte {}: {e}", what(), self.pos)))?;
        self.pos += n;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Skips a string value after checking its length.
    fn skip_string(&mut self, what: &dyn Fn() -> String) -> Result<()> {
        let n = self.length(what)?;
        if n > MAX_STRING_LEN {
            return Err(self.err(format!(
                "{} claims a string of {n} bytes (at most {MAX_STRING_LEN}): corrupt header",
                what()
            )));
        }
        self.skip(n, what)
    }

    /// Skips one value of type `ty` of metadata entry `key`.
    fn skip_value(&mut self, ty: u32, key: &str, depth: usize) -> Result<()> {
        let what = || format!("the value of metadata `{key}`");
        let Some((name, size)) = value_type(ty) else {
            return Err(self.err(format!(
                "metadata `{key}` has unknown value type {ty} (GGUF defines 0..=12): corrupt \
                 header or a newer GGUF version"
            )));
        };
        match name {
            "string" => self.skip_string(&what),
            "bool" => self.check_bools(1, key),
            "array" => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!(
                        "metadata `{key}` nests arrays deeper than {MAX_DEPTH}: corrupt header"
                    )));
                }
                let elem = self.u32(&what)?;
                let n = self.length(&what)?;
                if n > MAX_ARRAY_LEN {
                    return Err(self.err(format!(
                        "metadata `{key}` claims an array of {n} elements (at most \
                         {MAX_ARRAY_LEN}): corrupt header"
                    )));
                }
                match value_type(elem) {
                    None => Err(self.err(format!(
                        "metadata `{key}` is an array of unknown value type {elem}: corrupt header"
                    ))),
                    Some(("bool", _)) => self.check_bools(n, key),
                    Some((_, size)) if size > 0 => self.skip(n * size, &what),
                    Some(("string", _)) => {
                        // Every string has at least its length prefix.
                        self.need(n * if self.wide { 8 } else { 4 }, &what)?;
                        (0..n).try_for_each(|_| self.skip_string(&what))
                    }
                    Some(_) => (0..n).try_for_each(|_| self.skip_value(elem, key, depth + 1)),
                }
            }
            _ => self.skip(size, &what),
        }
    }

    /// Reads `n` bools of `key`, which must each be 0 or 1 (candle rejects other bytes).
    fn check_bools(&mut self, n: u64, key: &str) -> Result<()> {
        let what = || format!("the value of metadata `{key}`");
        for _ in 0..n {
            let [b] = self.bytes::<1>(&what)?;
            if b > 1 {
                return Err(self.err(format!(
                    "metadata `{key}` holds the bool byte {b} (must be 0 or 1): corrupt header"
                )));
            }
        }
        Ok(())
    }

    /// Reads a `general.alignment` value (the integer types candle honours; others leave
    /// the default in place, as candle does).
    fn alignment(&mut self, ty: u32, key: &str) -> Result<Option<u64>> {
        let what = || format!("the value of metadata `{key}`");
        let v = match ty {
            0 => u64::from(self.bytes::<1>(&what)?[0]),
            1 => i8::from_le_bytes(self.bytes::<1>(&what)?) as u64,
            2 => u64::from(u16::from_le_bytes(self.bytes::<2>(&what)?)),
            3 => i16::from_le_bytes(self.bytes::<2>(&what)?) as u64,
            4 => u64::from(self.u32(&what)?),
            5 => i32::from_le_bytes(self.bytes::<4>(&what)?) as u64,
            _ => {
                self.skip_value(ty, key, 0)?;
                return Ok(None);
            }
        };
        // Negative values (cast to huge u64) are ignored by candle too.
        if v > u64::from(u32::MAX) {
            return Ok(None);
        }
        if v == 0 {
            return Err(self.err(format!(
                "metadata `{key}` is 0; the tensor data alignment must be positive (ggml \
                 writes 32): corrupt header"
            )));
        }
        Ok(Some(v))
    }
}

/// What the header walk learns: where the tensor data starts.
struct Header {
    tensor_data_offset: u64,
}

/// Walks the header of the GGUF file at `path` (`len` bytes), checking everything candle's
/// reader would otherwise trip over.
fn scan_header(path: &Path, file: &File, len: u64) -> Result<Header> {
    let mut s = Scan {
        r: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        len,
        wide: true,
        path,
    };
    let magic = s.bytes::<4>(&|| "the GGUF magic".to_string())?;
    if magic != GGUF_MAGIC {
        let hint = if magic == *b"FUGG" {
            "a big-endian GGUF file, which is not supported".to_string()
        } else if magic.starts_with(b"gg") || magic == *b"lmgg" || magic == *b"tjgg" {
            "an old GGML/GGJT file; convert it to GGUF with llama.cpp".to_string()
        } else if magic.starts_with(b"PK") {
            "a zip archive (a PyTorch checkpoint?), not GGUF".to_string()
        } else {
            "not a GGUF file".to_string()
        };
        return Err(s.err(format!(
            "bad magic {:?} (bytes {:02x?}): expected \"GGUF\"; this looks like {hint}",
            String::from_utf8_lossy(&magic),
            magic
        )));
    }
    let version = s.u32(&|| "the GGUF version".to_string())?;
    match version {
        1 => s.wide = false,
        2 | 3 => {}
        v => {
            return Err(s.err(format!(
                "GGUF version {v} is not supported (only 1, 2 and 3)"
            )))
        }
    }
    let tensor_count = s.length(&|| "the tensor count".to_string())?;
    let kv_count = s.length(&|| "the metadata count".to_string())?;
    // Each metadata entry needs at least a key length, a type and one byte; each tensor
    // description a name length, a dim count, a type and an offset.
    let prefix = if s.wide { 8 } else { 4 };
    let min = kv_count
        .saturating_mul(prefix + 5)
        .saturating_add(tensor_count.saturating_mul(prefix + 16));
    s.need(min, &|| {
        format!("the header ({kv_count} metadata entries, {tensor_count} tensors)")
    })?;

    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..kv_count {
        let key = s.string(1 << 16, &|| format!("the key of metadata entry #{i}"))?;
        let ty = s.u32(&|| format!("the value type of metadata `{key}`"))?;
        if key == "general.alignment" {
            if let Some(a) = s.alignment(ty, &key)? {
                alignment = a;
            }
        } else {
            s.skip_value(ty, &key, 0)?;
        }
    }

    struct Desc {
        name: String,
        dims: Vec<u64>,
        dtype: GgmlDType,
        offset: u64,
    }
    let mut descs = Vec::with_capacity(tensor_count.min(1 << 16) as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = s.string(1 << 16, &|| format!("the name of tensor #{i}"))?;
        let what = || format!("the description of tensor `{name}`");
        let n_dims = s.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(s.err(format!(
                "tensor `{name}` claims {n_dims} dimensions (at most {MAX_DIMS}): corrupt header"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(s.length(&what)?);
        }
        let ty = s.u32(&what)?;
        let offset = s.u64(&what)?;
        let dtype = match loadable_type(ty) {
            Some(d) => d,
            None => {
                let msg = match other_type_name(ty) {
                    Some(n) => format!(
                        "tensor `{name}` has ggml type {n} (id {ty}), which candle cannot read; \
                         use a GGUF quantized to one of {LOADABLE_TYPES} (e.g. Q4_K_M or Q8_0)"
                    ),
                    None => format!(
                        "tensor `{name}` has unknown ggml type id {ty} (newer than this reader, \
                         or a corrupt header); readable types: {LOADABLE_TYPES}"
                    ),
                };
                return Err(s.err(msg));
            }
        };
        if !names.insert(name.clone()) {
            return Err(s.err(format!(
                "tensor `{name}` is described twice: corrupt header"
            )));
        }
        descs.push(Desc {
            name,
            dims,
            dtype,
            offset,
        });
    }

    let tensor_data_offset = s
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| s.err(format!("alignment {alignment} overflows the data offset")))?;
    for d in &descs {
        // ggml order: dims[0] is the row length, the one the blocks run along.
        let shape: Vec<u64> = d.dims.iter().rev().copied().collect();
        let tname = ggml_type_name(d.dtype);
        let elems = d
            .dims
            .iter()
            .try_fold(1u64, |a, &x| a.checked_mul(x))
            .filter(|&e| usize::try_from(e).is_ok())
            .ok_or_else(|| {
                s.err(format!(
                    "tensor `{}` has shape {shape:?}, too many elements: corrupt header",
                    d.name
                ))
            })?;
        let block = d.dtype.block_size() as u64;
        let row = d.dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(s.err(format!(
                "tensor `{}` {tname} {shape:?}: its row length {row} is not a multiple of \
                 the {tname} block size {block}: corrupt header",
                d.name
            )));
        }
        let bytes = elems / block * d.dtype.type_size() as u64;
        let end = tensor_data_offset
            .checked_add(d.offset)
            .and_then(|start| start.checked_add(bytes));
        if end.is_none_or(|end| end > len) {
            return Err(s.err(format!(
                "tensor `{}` ({tname} {shape:?}, {bytes} bytes at data offset {}) runs past the \
                 end of the file ({len} bytes, data section from byte {tensor_data_offset}): \
                 the file is truncated (an interrupted download?)",
                d.name, d.offset
            )));
        }
    }
    Ok(Header { tensor_data_offset })
}

/// The text of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// A short description of a metadata value (its type and, for scalars, the value).
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 40 => format!("a string ({} bytes)", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => match a.first() {
            Some(e) => format!("an array of {} {:?} values", a.len(), e.value_type()),
            None => "an empty array".to_string(),
        },
        v => format!("{:?}", v),
    }
}

/// An integer metadata value as i128 (any width, any sign).
fn as_int(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    })
}

/// An open GGUF file: its metadata, its tensor descriptions and a handle to read tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    file_len: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, {} metadata entries, {} tensors)",
            self.path.display(),
            self.content.metadata.len(),
            self.content.tensor_infos.len()
        )
    }
}

impl GgufFile {
    /// Opens `path` and reads its header (metadata and tensor descriptions, not the tensors).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile {
                    path: path.clone(),
                    hint: "expected a GGUF model file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)"
                        .into(),
                }
            } else {
                Error::io("opening", &path, e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("reading", &path, e))?;
        if meta.is_dir() {
            return Err(Error::Weights {
                path,
                msg: "is a directory; expected a .gguf file".into(),
            });
        }
        let file_len = meta.len();
        let header = scan_header(&path, &file, file_len)?;

        let weights_err = |msg: String| Error::Weights {
            path: path.clone(),
            msg,
        };
        let mut reader = BufReader::with_capacity(1 << 16, &file);
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seeking", &path, e))?;
        let content = match catch_unwind(AssertUnwindSafe(|| Content::read(&mut reader))) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(weights_err(format!("reading the GGUF header: {e}"))),
            Err(p) => {
                return Err(weights_err(format!(
                    "the GGUF header reader panicked: {}",
                    panic_text(&*p)
                )))
            }
        };
        drop(reader);
        if content.tensor_data_offset != header.tensor_data_offset {
            return Err(weights_err(format!(
                "the tensor data starts at byte {} by candle's reading but at {} by deltatune's \
                 header check: unsupported header layout",
                content.tensor_data_offset, header.tensor_data_offset
            )));
        }
        Ok(Self {
            path,
            content,
            file: Mutex::new(file),
            file_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// candle's parsed header (metadata, tensor descriptions, data offset).
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn meta_err(&self, key: &str, msg: String) -> Error {
        Error::MalformedConfig {
            path: self.path.clone(),
            msg: format!("GGUF metadata `{key}`: {msg}"),
        }
    }

    /// All metadata keys, sorted.
    pub fn metadata_keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.content.metadata.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The value of `key`; missing keys are an error naming the closest keys present.
    pub fn metadata(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            let nearest = nearest_names(key, self.content.metadata.keys().map(String::as_str), 5);
            self.meta_err(
                key,
                format!("missing from the file (closest keys: {nearest})"),
            )
        })
    }

    fn int_in_range(&self, key: &str, v: &Value, lo: i128, hi: i128, what: &str) -> Result<i128> {
        match as_int(v) {
            Some(x) if (lo..=hi).contains(&x) => Ok(x),
            _ => Err(self.meta_err(key, format!("is {}, expected {what}", describe(v)))),
        }
    }

    /// An unsigned integer of any stored width that fits in u32.
    pub fn metadata_u32(&self, key: &str) -> Result<u32> {
        let v = self.metadata(key)?;
        Ok(self.int_in_range(key, v, 0, u32::MAX.into(), "an integer in 0..=u32::MAX")? as u32)
    }

    /// An unsigned integer of any stored width that fits in u64.
    pub fn metadata_u64(&self, key: &str) -> Result<u64> {
        let v = self.metadata(key)?;
        Ok(self.int_in_range(key, v, 0, u64::MAX.into(), "a non-negative integer")? as u64)
    }

    /// A float (f32 or f64 in the file).
    pub fn metadata_f32(&self, key: &str) -> Result<f32> {
        Ok(self.metadata_f64(key)? as f32)
    }

    /// A float (f32 or f64 in the file), widened to f64.
    pub fn metadata_f64(&self, key: &str) -> Result<f64> {
        match self.metadata(key)? {
            Value::F32(x) => Ok(f64::from(*x)),
            Value::F64(x) => Ok(*x),
            v => Err(self.meta_err(key, format!("is {}, expected a float", describe(v)))),
        }
    }

    pub fn metadata_bool(&self, key: &str) -> Result<bool> {
        match self.metadata(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.meta_err(key, format!("is {}, expected a bool", describe(v)))),
        }
    }

    pub fn metadata_str(&self, key: &str) -> Result<&str> {
        match self.metadata(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.meta_err(key, format!("is {}, expected a string", describe(v)))),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.metadata(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.meta_err(key, format!("is {}, expected an array", describe(v)))),
        }
    }

    /// An array of strings.
    pub fn metadata_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.meta_err(
                    key,
                    format!("element {i} is {}, expected a string", describe(v)),
                )),
            })
            .collect()
    }

    /// An array of integers (any stored width) that fit in i32.
    pub fn metadata_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                self.int_in_range(
                    key,
                    v,
                    i32::MIN.into(),
                    i32::MAX.into(),
                    &format!("integers (element {i})"),
                )
                .map(|x| x as i32)
            })
            .collect()
    }

    /// An array of floats (f32 or f64).
    pub fn metadata_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(self.meta_err(
                    key,
                    format!("element {i} is {}, expected a float", describe(v)),
                )),
            })
            .collect()
    }

    /// [`Self::metadata_u32`] for an optional key (present with a wrong type is an error).
    pub fn metadata_u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|_| self.metadata_u32(key)).transpose()
    }

    /// [`Self::metadata_f64`] for an optional key.
    pub fn metadata_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|_| self.metadata_f64(key)).transpose()
    }

    /// [`Self::metadata_str`] for an optional key.
    pub fn metadata_str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.metadata_str(key)).transpose()
    }

    /// [`Self::metadata_bool`] for an optional key.
    pub fn metadata_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|_| self.metadata_bool(key)).transpose()
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.metadata_str("general.architecture")
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        n.sort_unstable();
        n
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The description of tensor `name` (shape in candle order `[rows, cols]`, type, offset).
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                key: name.to_string(),
                path: self.path.clone(),
                nearest: nearest_names(
                    name,
                    self.content.tensor_infos.keys().map(String::as_str),
                    5,
                ),
            })
    }

    /// Reads tensor `name` from the file (shape `[rows, cols]` for matrices: GGUF's reversed
    /// dims put back in row-major order).
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let info = self.tensor_info(name)?;
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let read = catch_unwind(AssertUnwindSafe(|| {
            self.content.tensor(&mut *file, name, &Device::Cpu)
        }));
        let what = || {
            format!(
                "reading tensor `{name}` ({} {:?})",
                ggml_type_name(info.ggml_dtype),
                info.shape.dims()
            )
        };
        match read {
            Ok(Ok(t)) => {
                // Non-finite values: every value of a float tensor, each block's scales of a
                // quantized one.
                let data = t.data().map_err(|e| Error::Weights {
                    path: self.path.clone(),
                    msg: format!("{}: {e}", what()),
                })?;
                if let Some((found, unit)) = crate::finite::scan_ggml(t.dtype(), &data) {
                    return Err(crate::finite::non_finite_error(
                        &self.path,
                        name,
                        &found,
                        &format!("{} {unit}", ggml_type_name(info.ggml_dtype)),
                    ));
                }
                drop(data);
                Ok(t)
            }
            Ok(Err(e)) => Err(Error::Weights {
                path: self.path.clone(),
                msg: format!("{}: {e}", what()),
            }),
            Err(p) => Err(Error::Weights {
                path: self.path.clone(),
                msg: format!("{}: the reader panicked: {}", what(), panic_text(&*p)),
            }),
        }
    }

    /// Reads 2-D tensor `name` as a [`QuantMatrix`] named `name`.
    pub fn quant_matrix(&self, name: &str) -> Result<QuantMatrix> {
        let q = self.tensor(name)?;
        QuantMatrix::from_qtensor(q, name).map_err(|e| Error::Weights {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Number of metadata entries and tensors, by type: a one-line summary for logs.
    pub fn summary(&self) -> String {
        let mut by_type: HashMap<&str, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            *by_type.entry(ggml_type_name(info.ggml_dtype)).or_default() += 1;
        }
        let mut types: Vec<_> = by_type.into_iter().collect();
        types.sort_unstable();
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        format!(
            "{}: {} metadata entries, {} tensors ({})",
            self.path.display(),
            self.content.metadata.len(),
            self.content.tensor_infos.len(),
            types.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use candle_core::quantized::gguf_file;

    /// A small valid GGUF (v2, candle's writer): three metadata entries and two tensors.
    fn write_file(dir: &Path, extra: &[(&str, Value)]) -> (PathBuf, Vec<u8>) {
        let w = Rng::new(1).normal_tensor((4, 64), 1.0).unwrap();
        let n = Rng::new(2).normal_tensor(64, 1.0).unwrap();
        let wq = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let nq = QTensor::quantize(&n, GgmlDType::F32).unwrap();
        let arch = Value::String("llama".into());
        let heads = Value::U32(9);
        let eps = Value::F32(1e-5);
        let toks = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        let mut meta: Vec<(&str, &Value)> = vec![
            ("general.architecture", &arch),
            ("llama.attention.head_count", &heads),
            ("llama.attention.layer_norm_rms_epsilon", &eps),
            ("tokenizer.ggml.tokens", &toks),
        ];
        meta.extend(extra.iter().map(|(k, v)| (*k, v)));
        let path = dir.join("t.gguf");
        let mut f = File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &meta,
            &[("weight_matrix", &wq), ("norm_vector", &nq)],
        )
        .unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    fn open_err(path: &Path) -> String {
        match GgufFile::open(path) {
            Err(e @ Error::Weights { .. }) => e.to_string(),
            Err(e) => panic!("expected Error::Weights, got {e:?}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    /// Byte position of the type id of tensor `name` in a v2 file.
    fn type_pos(bytes: &[u8], name: &str, n_dims: usize) -> usize {
        let at = bytes
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap();
        at + name.len() + 4 + 8 * n_dims
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_file(dir.path(), &[]);
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.metadata_u32("llama.attention.head_count").unwrap(), 9);
        assert_eq!(g.metadata_u64("llama.attention.head_count").unwrap(), 9);
        assert!(
            (g.metadata_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap()
                - 1e-5)
                .abs()
                < 1e-12
        );
        assert_eq!(
            g.metadata_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b"]
        );
        assert_eq!(g.metadata_u32_opt("llama.nothing").unwrap(), None);
        assert_eq!(g.tensor_names(), ["norm_vector", "weight_matrix"]);
        // candle's shape is [rows, cols] (GGUF's ne[] reversed).
        let q = g.tensor("weight_matrix").unwrap();
        assert_eq!(q.shape().dims(), &[4, 64]);
        assert_eq!(q.dtype(), GgmlDType::Q4_1);
        let m = g.quant_matrix("weight_matrix").unwrap();
        assert_eq!(m.dims2(), (4, 64));
        assert_eq!(g.tensor("norm_vector").unwrap().shape().dims(), &[64]);
        assert!(g.summary().contains("1 Q4_1"));

        let err = g
            .metadata_u32("llama.attention.head_cnt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.gguf") && err.contains("llama.attention.head_count"),
            "{err}"
        );
        let err = g
            .metadata_str("llama.attention.head_count")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected a string") && err.contains("U32(9)"),
            "{err}"
        );
        let err = g.tensor("weight_matrx").unwrap_err();
        assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
        assert!(err.to_string().contains("weight_matrix"), "{err}");
    }

    #[test]
    fn truncated_files_name_what_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = write_file(dir.path(), &[]);
        // Cut inside the tensor data: the tensor whose data runs past the end is named.
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let err = open_err(&path);
        assert!(
            err.contains("truncated") && err.contains("norm_vector"),
            "{err}"
        );
        // Cut inside the metadata (in the array header of the token list).
        let key = b"tokenizer.ggml.tokens";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        std::fs::write(&path, &bytes[..at + key.len() + 4 + 6]).unwrap();
        let err = open_err(&path);
        assert!(
            err.contains("tokenizer.ggml.tokens") && err.contains("truncated"),
            "{err}"
        );
        // Cut inside a tensor description.
        let at = bytes
            .windows(13)
            .position(|w| w == b"weight_matrix")
            .unwrap();
        std::fs::write(&path, &bytes[..at + 13 + 6]).unwrap();
        let err = open_err(&path);
        assert!(
            err.contains("`weight_matrix`") && err.contains("truncated"),
            "{err}"
        );
        // Cut inside the fixed-size header checks.
        std::fs::write(&path, &bytes[..66]).unwrap();
        assert!(open_err(&path).contains("4 metadata entries, 2 tensors"));
        // Empty file and a lone magic.
        std::fs::write(&path, b"").unwrap();
        assert!(open_err(&path).contains("magic"));
        std::fs::write(&path, b"GGUF").unwrap();
        assert!(open_err(&path).contains("version"));
        // Every prefix fails cleanly (no panic, no huge allocation).
        for cut in (0..bytes.len()).step_by(7) {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(GgufFile::open(&path).is_err(), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn non_finite_values_and_block_scales_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = write_file(dir.path(), &[]);
        let g = GgufFile::open(&path).unwrap();
        let base = g.content().tensor_data_offset as usize;
        let wq = base + g.tensor_info("weight_matrix").unwrap().offset as usize;
        let nv = base + g.tensor_info("norm_vector").unwrap().offset as usize;
        drop(g);
        // The second Q4_1 block's scale d (an f16 at byte 0 of each 20-byte block) becomes
        // +inf, and the norm's third value NaN.
        bytes[wq + 20..wq + 22].copy_from_slice(&0x7c00u16.to_le_bytes());
        bytes[nv + 8..nv + 12].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let hint = "the model file is damaged: fetch it again (`deltatune fetch` for the default \
                    models) or download it again from its source";
        assert_eq!(
            g.tensor("weight_matrix").unwrap_err().to_string(),
            format!(
                "tensor `weight_matrix` in {} holds 1 infinite among its 8 Q4_1 block scales \
                 (the first at index 1): {hint}",
                path.display()
            )
        );
        assert!(g.quant_matrix("weight_matrix").is_err());
        assert_eq!(
            g.tensor("norm_vector").unwrap_err().to_string(),
            format!(
                "tensor `norm_vector` in {} holds 1 NaN among its 64 F32 values (the first at \
                 index 2): {hint}",
                path.display()
            )
        );
    }

    #[test]
    fn bad_magic_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut bytes) = write_file(dir.path(), &[]);
        bytes[..4].copy_from_slice(b"PK\x03\x04");
        std::fs::write(&path, &bytes).unwrap();
        let err = open_err(&path);
        assert!(err.contains("bad magic") && err.contains("t.gguf"), "{err}");
        let missing = GgufFile::open(dir.path().join("nope.gguf")).unwrap_err();
        assert!(matches!(missing, Error::MissingFile { .. }), "{missing:?}");
    }

    #[test]
    fn unsupported_and_unknown_tensor_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = write_file(dir.path(), &[]);
        let pos = type_pos(&bytes, "weight_matrix", 2);
        assert_eq!(&bytes[pos..pos + 4], &3u32.to_le_bytes(), "Q4_1 type id");
        for (id, want) in [
            (23u32, "IQ4_XS"),
            (99, "unknown ggml type id 99"),
            (15, "Q8_K"),
        ] {
            let mut b = bytes.clone();
            b[pos..pos + 4].copy_from_slice(&id.to_le_bytes());
            std::fs::write(&path, &b).unwrap();
            let err = open_err(&path);
            assert!(err.contains("weight_matrix") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn hostile_headers_give_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        // Zero alignment would divide by zero in candle's reader.
        let (path, _) = write_file(dir.path(), &[("general.alignment", Value::U32(0))]);
        let err = open_err(&path);
        assert!(err.contains("general.alignment"), "{err}");

        let (path, bytes) = write_file(dir.path(), &[]);
        // Huge dims: the element count overflows.
        let pos = type_pos(&bytes, "weight_matrix", 2);
        let mut b = bytes.clone();
        b[pos - 16..pos - 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let err = open_err(&path);
        assert!(err.contains("weight_matrix"), "{err}");
        // An offset far past the end.
        let mut b = bytes.clone();
        b[pos + 4..pos + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let err = open_err(&path);
        assert!(
            err.contains("weight_matrix") && err.contains("runs past"),
            "{err}"
        );
        // A string length of 2^62 in the tensor count position and in a key length.
        let mut b = bytes.clone();
        b[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(open_err(&path).contains("tensors"));
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        assert!(open_err(&path).contains("metadata entry #0"));
        // Random byte flips in the header never panic.
        let mut rng = Rng::new(7);
        for _ in 0..300 {
            let mut b = bytes.clone();
            let i = rng.below(300.min(b.len()));
            b[i] = rng.below(256) as u8;
            std::fs::write(&path, &b).unwrap();
            if let Ok(g) = GgufFile::open(&path) {
                for n in g.tensor_names() {
                    let _ = g.tensor(n);
                }
            }
        }
    }
}
