//! Frozen block-quantized weight matrices ([`QuantMatrix`]), kept in their GGUF form.
//!
//! A GGUF weight `[rows = out, cols = in]` stores each row as a run of blocks along `cols`
//! (32 values per block for Q4_0..Q8_0, 256 for the k-quants), so rows are independent: any
//! range of rows dequantizes on its own, rows can be reordered by moving whole runs of
//! blocks, and an embedding lookup only touches the rows it needs. The ops layer uses this
//! to multiply by a quantized weight a few rows at a time ([`crate::ops::quant_linear`])
//! without ever holding the whole matrix in f32.
//!
//! The blocks are candle's own types (`candle_core::quantized::k_quants`), copied once out of
//! the [`QTensor`] they were read into and shared behind an `Arc`, so clones are cheap.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result};

/// The ggml name of a block type (`Q4_K`, not candle's `Q4K`), as llama.cpp prints it.
pub fn ggml_type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The blocks of one matrix, type-erased over the block type.
trait Blocks: Send + Sync {
    fn dtype(&self) -> GgmlDType;
    /// Dequantizes the blocks in `range` into `out` (`range.len() * block_size` values).
    fn to_f32(&self, range: Range<usize>, out: &mut [f32]);
    /// A new block store with the runs of `per_row` blocks in the order `rows`.
    fn reorder(&self, per_row: usize, rows: &[usize]) -> Arc<dyn Blocks>;
    /// Bytes held.
    fn size_in_bytes(&self) -> usize;
    /// A copy as candle quantized storage.
    fn to_qstorage(&self) -> QStorage;
    /// The blocks as the bytes of their ggml layout.
    fn bytes(&self) -> &[u8];
}

impl<T: GgmlType + 'static> Blocks for Vec<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn to_f32(&self, range: Range<usize>, out: &mut [f32]) {
        debug_assert_eq!(range.len() * T::BLCK_SIZE, out.len());
        T::to_float(&self[range], out);
    }

    fn reorder(&self, per_row: usize, rows: &[usize]) -> Arc<dyn Blocks> {
        let mut v = Vec::with_capacity(rows.len() * per_row);
        for &r in rows {
            v.extend_from_slice(&self[r * per_row..(r + 1) * per_row]);
        }
        Arc::new(v)
    }

    fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }

    fn to_qstorage(&self) -> QStorage {
        QStorage::Cpu(Box::new(self.clone()))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: candle's block structs are `repr(C)` plain old data (the ggml layout, read
        // from files byte for byte in `copy_blocks`), so their memory is `size_of_val` bytes.
        unsafe {
            std::slice::from_raw_parts(
                self.as_ptr().cast::<u8>(),
                std::mem::size_of_val(self.as_slice()),
            )
        }
    }
}

/// Copies raw little-endian block bytes into a typed, aligned vector.
///
/// # Safety
/// `T` must be plain old data (every bit pattern a valid value, no padding invariants): only
/// called with candle's block structs (arrays of `u8`/`i8` and `f16`/`f32` scales) and the
/// float types, from the match in [`blocks_from_bytes`].
unsafe fn copy_blocks<T: GgmlType + 'static>(bytes: &[u8]) -> Arc<dyn Blocks> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the destination has capacity for `n` values of `T`, i.e. `n * size` bytes; the
    // source holds at least that many; `T` is plain old data (caller's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size);
        v.set_len(n);
    }
    Arc::new(v)
}

fn blocks_from_bytes(dtype: GgmlDType, bytes: &[u8]) -> Arc<dyn Blocks> {
    // SAFETY: every type below is plain old data (see `copy_blocks`).
    unsafe {
        match dtype {
            GgmlDType::F32 => copy_blocks::<f32>(bytes),
            GgmlDType::F16 => copy_blocks::<f16>(bytes),
            GgmlDType::BF16 => copy_blocks::<bf16>(bytes),
            GgmlDType::Q4_0 => copy_blocks::<BlockQ4_0>(bytes),
            GgmlDType::Q4_1 => copy_blocks::<BlockQ4_1>(bytes),
            GgmlDType::Q5_0 => copy_blocks::<BlockQ5_0>(bytes),
            GgmlDType::Q5_1 => copy_blocks::<BlockQ5_1>(bytes),
            GgmlDType::Q8_0 => copy_blocks::<BlockQ8_0>(bytes),
            GgmlDType::Q8_1 => copy_blocks::<BlockQ8_1>(bytes),
            GgmlDType::Q2K => copy_blocks::<BlockQ2K>(bytes),
            GgmlDType::Q3K => copy_blocks::<BlockQ3K>(bytes),
            GgmlDType::Q4K => copy_blocks::<BlockQ4K>(bytes),
            GgmlDType::Q5K => copy_blocks::<BlockQ5K>(bytes),
            GgmlDType::Q6K => copy_blocks::<BlockQ6K>(bytes),
            GgmlDType::Q8K => copy_blocks::<BlockQ8K>(bytes),
        }
    }
}

/// A frozen 2-D weight `[rows = out, cols = in]` in its block-quantized form (any ggml type
/// candle knows: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q6_K, Q8_K).
///
/// Cloning shares the blocks. Multiply with [`crate::ops::quant_linear`]; look rows up with
/// [`QuantMatrix::gather_rows`].
#[derive(Clone)]
pub struct QuantMatrix {
    blocks: Arc<dyn Blocks>,
    rows: usize,
    cols: usize,
    name: Arc<str>,
    /// The copy repacked for 8-bit activation products (made on first use by generation, or
    /// by the fused f32 products of the types other than Q4_1 and Q8_0).
    int8: Arc<OnceLock<Option<Arc<crate::ops::quant_int8::Packed>>>>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({} {} [{}, {}], {} bytes)",
            self.name,
            self.dtype_name(),
            self.rows,
            self.cols,
            self.size_in_bytes()
        )
    }
}

impl QuantMatrix {
    /// Takes the blocks of a 2-D CPU `QTensor` (shape `[rows, cols]`, blocks along `cols`);
    /// `name` is used in errors (the tensor's key).
    pub fn from_qtensor(q: QTensor, name: &str) -> Result<Self> {
        let (rows, cols) = match q.shape().dims() {
            &[r, c] => (r, c),
            d => {
                return Err(Error::Msg(format!(
                    "quantized tensor `{name}` has shape {d:?}; a QuantMatrix must be 2-D \
                     [out, in] (load 1-D tensors such as norms as dense tensors instead)"
                )))
            }
        };
        if !q.device().is_cpu() {
            return Err(Error::Msg(format!(
                "quantized tensor `{name}` is on {:?}; QuantMatrix holds CPU tensors only",
                q.device().location()
            )));
        }
        let dtype = q.dtype();
        let block = dtype.block_size();
        if cols % block != 0 {
            return Err(Error::Msg(format!(
                "quantized tensor `{name}` [{rows}, {cols}] of type {}: the row length {cols} \
                 is not a multiple of the block size {block}",
                ggml_type_name(dtype)
            )));
        }
        let data = q.data()?;
        let want = rows * (cols / block) * dtype.type_size();
        if data.len() != want {
            return Err(Error::Msg(format!(
                "quantized tensor `{name}` [{rows}, {cols}] of type {} holds {} bytes, \
                 expected {want}",
                ggml_type_name(dtype),
                data.len()
            )));
        }
        Ok(Self {
            blocks: blocks_from_bytes(dtype, &data),
            rows,
            cols,
            name: Arc::from(name),
            int8: Arc::default(),
        })
    }

    /// Quantizes a 2-D f32 tensor (for tests and for quantizing weights on load).
    pub fn quantize(t: &Tensor, dtype: GgmlDType, name: &str) -> Result<Self> {
        let q = QTensor::quantize(t, dtype).map_err(|e| {
            Error::Msg(format!(
                "quantizing `{name}` {:?} to {}: {e}",
                t.dims(),
                ggml_type_name(dtype)
            ))
        })?;
        Self::from_qtensor(q, name)
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns, the direction the blocks run in).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `(rows, cols)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The tensor's name (its key in the file it came from).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same blocks under another name.
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = Arc::from(name);
        self
    }

    pub fn dtype(&self) -> GgmlDType {
        self.blocks.dtype()
    }

    /// The ggml name of the block type (`Q4_1`, `Q4_K`, ...).
    pub fn dtype_name(&self) -> &'static str {
        ggml_type_name(self.dtype())
    }

    /// Bytes held by the blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.size_in_bytes()
    }

    /// The block type and the blocks' bytes in ggml's layout (row after row).
    pub(crate) fn raw(&self) -> (GgmlDType, &[u8]) {
        (self.blocks.dtype(), self.blocks.bytes())
    }

    /// The blocks repacked for [`crate::ops::quant_int8`] (built once, shared by clones, about
    /// as many bytes as the blocks); `None` for block types it does not handle.
    pub(crate) fn int8_packed(&self) -> Option<&crate::ops::quant_int8::Packed> {
        self.int8
            .get_or_init(|| crate::ops::quant_int8::pack(self))
            .as_deref()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / self.dtype().block_size()
    }

    /// The whole matrix as f32 `[rows, cols]` (a full copy: for tests and small matrices).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        if let Some(per) = 16384usize.checked_div(self.cols) {
            let chunk_rows = per.max(1);
            out.par_chunks_mut(chunk_rows * self.cols)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let r0 = i * chunk_rows;
                    let r1 = r0 + chunk.len() / self.cols;
                    self.dequantize_rows_unchecked(r0..r1, chunk);
                });
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Dequantizes rows `rows` into `out` (row-major, `rows.len() * cols` values).
    pub fn dequantize_rows_into(&self, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::Msg(format!(
                "rows {rows:?} are out of range for `{}` with {} rows",
                self.name, self.rows
            )));
        }
        if out.len() != rows.len() * self.cols {
            return Err(Error::Msg(format!(
                "dequantizing rows {rows:?} of `{}` [{}, {}] needs an output of {} values, got {}",
                self.name,
                self.rows,
                self.cols,
                rows.len() * self.cols,
                out.len()
            )));
        }
        self.dequantize_rows_unchecked(rows, out);
        Ok(())
    }

    /// [`Self::dequantize_rows_into`] with the range and length already checked.
    pub(crate) fn dequantize_rows_unchecked(&self, rows: Range<usize>, out: &mut [f32]) {
        let per_row = self.blocks_per_row();
        let blocks = rows.start * per_row..rows.end * per_row;
        if crate::ops::quant_dot::dequantize(self, blocks.clone(), out) {
            return;
        }
        self.blocks.to_f32(blocks, out);
    }

    /// Rows `ids` as f32 `[ids.len(), cols]`: an embedding lookup that dequantizes only the
    /// rows asked for.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some((pos, &bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.rows)
        {
            return Err(Error::Msg(format!(
                "id {bad} (position {pos}) is out of range for `{}` with {} rows; the ids \
                 must come from the tokenizer that belongs to this model",
                self.name, self.rows
            )));
        }
        let cols = self.cols;
        let mut out = vec![0f32; ids.len() * cols];
        if cols > 0 {
            out.par_chunks_mut(cols)
                .with_min_len((8192 / cols).max(1))
                .zip(ids.par_iter())
                .for_each(|(row, &id)| {
                    let id = id as usize;
                    self.dequantize_rows_unchecked(id..id + 1, row);
                });
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?)
    }

    /// A new matrix whose row `i` is row `perm[i]` of this one; the blocks are moved as they
    /// are (no dequantization). `perm` must be a permutation of `0..rows`.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Self> {
        if perm.len() != self.rows {
            return Err(Error::Msg(format!(
                "permutation of `{}` has {} entries but the matrix has {} rows",
                self.name,
                perm.len(),
                self.rows
            )));
        }
        let mut seen = vec![false; self.rows];
        for (i, &p) in perm.iter().enumerate() {
            if p >= self.rows || std::mem::replace(&mut seen[p], true) {
                return Err(Error::Msg(format!(
                    "permutation of `{}` is not a permutation of 0..{}: entry {i} is {p}",
                    self.name, self.rows
                )));
            }
        }
        Ok(Self {
            blocks: self.blocks.reorder(self.blocks_per_row(), perm),
            rows: self.rows,
            cols: self.cols,
            name: self.name.clone(),
            int8: Arc::default(),
        })
    }

    /// A copy as a candle `QTensor` `[rows, cols]` (e.g. to write it back to a GGUF file).
    pub fn to_qtensor(&self) -> Result<QTensor> {
        Ok(QTensor::new(
            self.blocks.to_qstorage(),
            (self.rows, self.cols),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        Rng::new(seed).normal_tensor((rows, cols), 1.0).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn dequantize_equals_candle_for_every_type() {
        use GgmlDType::*;
        for dtype in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
        ] {
            let t = random(7, 512, 1);
            let q = QTensor::quantize(&t, dtype).unwrap();
            let reference = q.dequantize(&Device::Cpu).unwrap();
            let m = QuantMatrix::from_qtensor(q, "w").unwrap();
            assert_eq!(m.dims2(), (7, 512));
            assert_eq!(
                max_abs(&m.dequantize().unwrap(), &reference),
                0.0,
                "{dtype:?}"
            );
            let mut rows = vec![0f32; 3 * 512];
            m.dequantize_rows_into(2..5, &mut rows).unwrap();
            let want = reference.narrow(0, 2, 3).unwrap().flatten_all().unwrap();
            assert_eq!(rows, want.to_vec1::<f32>().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn gather_rows_is_an_embedding_lookup() {
        let t = random(10, 64, 2);
        let m = QuantMatrix::quantize(&t, GgmlDType::Q8_0, "emb").unwrap();
        let full = m.dequantize().unwrap();
        let ids = [3u32, 0, 9, 3];
        let got = m.gather_rows(&ids).unwrap();
        let ids_t = Tensor::new(&ids, &Device::Cpu).unwrap();
        let want = full.index_select(&ids_t, 0).unwrap();
        assert_eq!(max_abs(&got, &want), 0.0);
        let err = m.gather_rows(&[1, 10]).unwrap_err().to_string();
        assert!(err.contains("id 10") && err.contains("emb"), "{err}");
    }

    #[test]
    fn permute_rows_moves_whole_rows() {
        let t = random(5, 64, 3);
        let m = QuantMatrix::quantize(&t, GgmlDType::Q4_1, "w").unwrap();
        let perm = [4usize, 2, 0, 1, 3];
        let p = m.permute_rows(&perm).unwrap();
        let full = m.dequantize().unwrap();
        let idx = Tensor::new(&[4u32, 2, 0, 1, 3], &Device::Cpu).unwrap();
        assert_eq!(
            max_abs(
                &p.dequantize().unwrap(),
                &full.index_select(&idx, 0).unwrap()
            ),
            0.0
        );
        assert!(m.permute_rows(&[0, 1, 2, 3]).is_err());
        assert!(m.permute_rows(&[0, 1, 2, 3, 3]).is_err());
        assert!(m.permute_rows(&[0, 1, 2, 3, 5]).is_err());
    }

    #[test]
    fn rejects_non_2d_and_checks_ranges() {
        let t = Rng::new(4).normal_tensor((2, 3, 32), 1.0).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let err = QuantMatrix::from_qtensor(q, "blk.0.odd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("blk.0.odd") && err.contains("2-D"), "{err}");
        let m = QuantMatrix::quantize(&random(4, 32, 5), GgmlDType::Q8_0, "w").unwrap();
        let mut out = vec![0f32; 64];
        assert!(m.dequantize_rows_into(3..5, &mut out).is_err());
        assert!(m.dequantize_rows_into(0..3, &mut out).is_err());
        m.dequantize_rows_into(2..4, &mut out).unwrap();
    }

    #[test]
    fn to_qtensor_round_trips_and_clone_is_shared() {
        let m = QuantMatrix::quantize(&random(3, 256, 6), GgmlDType::Q4K, "w").unwrap();
        let q = m.to_qtensor().unwrap();
        assert_eq!(q.shape().dims(), &[3, 256]);
        let back = QuantMatrix::from_qtensor(q, "w").unwrap();
        assert_eq!(
            max_abs(&back.dequantize().unwrap(), &m.dequantize().unwrap()),
            0.0
        );
        let c = m.clone();
        assert!(Arc::ptr_eq(&c.blocks, &m.blocks));
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<QuantMatrix>();
        assert!(format!("{m:?}").contains("Q4_K"));
    }
}
