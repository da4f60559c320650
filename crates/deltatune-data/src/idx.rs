//! Reading IDX files, the format of MNIST and Fashion-MNIST.
//!
//! An IDX file is `0x00 0x00`, a type byte, the number of dimensions `n`,
//! then `n` big-endian `u32` dimensions, then the data in row-major order.
//! Only unsigned bytes (type `0x08`) are read: images `[N, rows, cols]` and
//! labels `[N]`. Files may be gzip-compressed (detected by the gzip magic, any
//! file name).
//!
//! Hostile files are errors, never huge allocations or panics: the header's
//! dimensions are multiplied with overflow checks and capped at
//! [`MAX_IDX_BYTES`]; an uncompressed file must be exactly as long as its
//! header says; compressed data is read incrementally up to the claimed
//! length (memory grows with the data actually present) and a file holding
//! less or more than claimed is an error naming both lengths.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

/// The largest payload (product of the dimensions) an IDX file may claim:
/// 1 GiB (a gzip bomb can at most make this much). Fashion-MNIST's training images are 47 MB.
pub const MAX_IDX_BYTES: u64 = 1 << 30;
/// The most dimensions an IDX header may have.
pub const MAX_IDX_DIMS: usize = 4;

/// The type byte of unsigned 8-bit data.
const IDX_U8: u8 = 0x08;

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The data, row-major, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Images from an IDX file: `count` images of `rows x cols` grey bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Height of every image.
    pub rows: usize,
    /// Width of every image.
    pub cols: usize,
    /// `count * rows * cols` bytes, image after image, row-major (0 = black).
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The bytes of image `i` (`rows * cols`). Panics when `i >= count`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

fn idx_err(path: &Path, problem: impl Into<String>) -> DataError {
    DataError::Idx {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Reads an IDX file of unsigned bytes (gzip-compressed or not).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::FileNotFound {
                path: path.to_path_buf(),
            }
        } else {
            DataError::io("open", path, e)
        }
    })?;
    let file_len = file
        .metadata()
        .map_err(|e| DataError::io("read", path, e))?
        .len();
    let mut reader = std::io::BufReader::new(file);
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut reader, &mut magic).map_err(|e| idx_err(path, e.to_string()))?;
    let head = &magic[..got];
    if head == [0x1f, 0x8b] {
        let gz = flate2::read::GzDecoder::new(head.chain(reader));
        read_idx_stream(gz, path, None)
    } else {
        read_idx_stream(head.chain(reader), path, Some(file_len))
    }
}

/// Parses IDX bytes already in memory (gzip-compressed or not); `path` only
/// names the source in errors.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        read_idx_stream(flate2::read::GzDecoder::new(bytes), path, None)
    } else {
        read_idx_stream(bytes, path, Some(bytes.len() as u64))
    }
}

/// Fills `buf` as far as the stream allows; returns how many bytes were read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads an IDX stream; `known_len` is the total length when it is known
/// before reading (uncompressed input).
fn read_idx_stream(mut r: impl Read, path: &Path, known_len: Option<u64>) -> Result<IdxArray> {
    let read_err = |e: std::io::Error| idx_err(path, format!("reading failed: {e}"));
    let mut head = [0u8; 4];
    let n = read_up_to(&mut r, &mut head).map_err(read_err)?;
    if n < 4 {
        return Err(idx_err(
            path,
            format!("the file holds {n} bytes, fewer than the 4-byte magic number"),
        ));
    }
    if head[0] != 0 || head[1] != 0 {
        return Err(idx_err(
            path,
            format!(
                "the magic number starts with {:#04x} {:#04x}, not 0x00 0x00",
                head[0], head[1]
            ),
        ));
    }
    if head[2] != IDX_U8 {
        let kind = match head[2] {
            0x09 => "signed bytes",
            0x0B => "16-bit integers",
            0x0C => "32-bit integers",
            0x0D => "32-bit floats",
            0x0E => "64-bit floats",
            _ => "an unknown type",
        };
        return Err(idx_err(
            path,
            format!(
                "type byte {:#04x} ({kind}); only unsigned bytes (0x08) are supported",
                head[2]
            ),
        ));
    }
    let ndims = usize::from(head[3]);
    if ndims == 0 || ndims > MAX_IDX_DIMS {
        return Err(idx_err(
            path,
            format!("the header claims {ndims} dimensions; 1 to {MAX_IDX_DIMS} are supported"),
        ));
    }
    let mut dim_bytes = vec![0u8; 4 * ndims];
    let n = read_up_to(&mut r, &mut dim_bytes).map_err(read_err)?;
    if n < dim_bytes.len() {
        return Err(idx_err(
            path,
            format!(
                "the header claims {ndims} dimensions but the file ends after {} of their {} bytes",
                n,
                dim_bytes.len()
            ),
        ));
    }
    let dims: Vec<u64> = dim_bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let shown = format!("{dims:?}");
    let total = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&t| t <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            idx_err(
                path,
                format!(
                    "the header claims dimensions {shown}, more than {MAX_IDX_BYTES} bytes of data"
                ),
            )
        })?;
    let header_len = 4 + 4 * ndims as u64;
    if let Some(len) = known_len {
        if len != header_len + total {
            return Err(idx_err(
                path,
                format!(
                    "the header claims dimensions {shown} ({total} data bytes after a {header_len}-byte header) but the file is {len} bytes long"
                ),
            ));
        }
    }
    let total_usize = usize::try_from(total).map_err(|_| {
        idx_err(
            path,
            format!("the header claims dimensions {shown}, too large for this machine"),
        )
    })?;
    // Incremental read: memory follows the bytes actually present, not the claim.
    let mut data = Vec::new();
    if known_len.is_some() {
        data.reserve_exact(total_usize);
    }
    (&mut r)
        .take(total)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() != total_usize {
        return Err(idx_err(
            path,
            format!(
                "the header claims dimensions {shown} ({total} data bytes) but only {} data bytes follow",
                data.len()
            ),
        ));
    }
    let mut extra = [0u8; 1];
    if read_up_to(&mut r, &mut extra).map_err(read_err)? > 0 {
        return Err(idx_err(
            path,
            format!(
                "the header claims dimensions {shown} ({total} data bytes) but more data follows"
            ),
        ));
    }
    Ok(IdxArray {
        dims: dims.into_iter().map(|d| d as usize).collect(),
        data,
    })
}

/// Reads an IDX file of images `[N, rows, cols]`.
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let a = read_idx(path)?;
    match a.dims[..] {
        [count, rows, cols] if rows > 0 && cols > 0 => Ok(IdxImages {
            count,
            rows,
            cols,
            pixels: a.data,
        }),
        _ => Err(idx_err(
            path,
            format!(
                "dimensions {:?} are not images [count, rows, cols] with rows and cols above 0",
                a.dims
            ),
        )),
    }
}

/// Reads an IDX file of labels `[N]`.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let a = read_idx(path)?;
    if a.dims.len() != 1 {
        return Err(idx_err(
            path,
            format!("dimensions {:?} are not labels [count]", a.dims),
        ));
    }
    Ok(a.data)
}

/// Reads an images file and its labels file; their counts must agree and
/// every label must be below `num_classes`.
pub fn read_idx_pair(
    images: &Path,
    labels: &Path,
    num_classes: usize,
) -> Result<(IdxImages, Vec<u8>)> {
    let im = read_idx_images(images)?;
    let lb = read_idx_labels(labels)?;
    if im.count != lb.len() {
        return Err(DataError::IdxCountMismatch {
            images: PathBuf::from(images),
            n_images: im.count,
            labels: PathBuf::from(labels),
            n_labels: lb.len(),
        });
    }
    if let Some((i, &l)) = lb
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= num_classes)
    {
        return Err(idx_err(
            labels,
            format!("label {l} of item {i} is not below the number of classes ({num_classes})"),
        ));
    }
    Ok((im, lb))
}

/// Encodes an IDX file of unsigned bytes (for tests and tools).
pub fn encode_idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, IDX_U8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let p = Path::new("mem.idx");
        let b = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx(&b, p).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let e = parse_idx(&b[..b.len() - 1], p).unwrap_err().to_string();
        assert!(
            e.contains("mem.idx") && e.contains("file is 17 bytes"),
            "{e}"
        );
        let mut long = b.clone();
        long.push(0);
        assert!(parse_idx(&long, p).is_err());
        let e = parse_idx(&[0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0], p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32-bit floats"), "{e}");
        let e = parse_idx(&[0, 0, 8], p).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
        let e = parse_idx(&[0, 0, 8, 9], p).unwrap_err().to_string();
        assert!(e.contains("9 dimensions"), "{e}");
    }
}
