//! Big float matrices on the GPU (token embeddings, the lm_head), split into row chunks that
//! each fit one storage binding: 128256 x 2560 f32 values are 1.3 GB, over ten times lavapipe's
//! 128 MiB binding limit. Layout (shared by `shaders/common/table.wgsl`): row-major, each row
//! padded with zeros to whole `vec4<u32>`; f32 one value per u32, f16 two (column 2i low).

use half::f16;

use crate::gpu::GpuContext;
use crate::table::Table;
use crate::{Error, Result};

/// How a [`GpuTable`] stores its values. Shaders read both as f32, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableStorage {
    F32,
    /// Half the memory; values are rounded to nearest f16 on upload.
    F16,
}

impl TableStorage {
    /// The value a shader reads for `v` stored this way.
    pub fn round(self, v: f32) -> f32 {
        match self {
            TableStorage::F32 => v,
            TableStorage::F16 => f16::from_f32(v).to_f32(),
        }
    }
}

/// A `[rows, cols]` float matrix in row chunks, each its own buffer.
pub struct GpuTable {
    rows: usize,
    cols: usize,
    storage: TableStorage,
    chunks: Vec<TableChunk>,
}

/// Rows `first..first + rows` of a table.
pub(crate) struct TableChunk {
    pub first: usize,
    pub rows: usize,
    pub buffer: wgpu::Buffer,
}

impl GpuTable {
    /// Uploads row-major `data` (`rows x cols`, finite; within f16's range for
    /// [`TableStorage::F16`]) in as few chunks as the adapter's binding limit allows.
    pub fn upload_f32(
        ctx: &GpuContext,
        data: &[f32],
        rows: usize,
        cols: usize,
        storage: TableStorage,
    ) -> Result<Self> {
        Self::upload(ctx, &Self::shaped(data, rows, cols)?, storage)
    }

    /// [`GpuTable::upload_f32`] of a [`Table`], read one chunk's rows at a time: a file's table
    /// is never widened whole in host memory.
    pub fn upload(ctx: &GpuContext, table: &Table<'_>, storage: TableStorage) -> Result<Self> {
        let caps = ctx.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer);
        let row_bytes = 4 * row_words(table.cols(), storage) as u64;
        let chunk_rows = limit / row_bytes.max(1);
        if chunk_rows == 0 {
            return Err(Error::Limit {
                what: format!("one table row of {} values", table.cols()),
                limit: "max_storage_buffer_binding_size",
                needed: row_bytes,
                available: limit,
            });
        }
        Self::upload_chunked(ctx, table, storage, chunk_rows as usize)
    }

    /// [`GpuTable::upload_f32`] with at most `chunk_rows` rows per chunk, so that tests can
    /// exercise chunking on small tables.
    #[doc(hidden)]
    pub fn upload_f32_chunked(
        ctx: &GpuContext,
        data: &[f32],
        rows: usize,
        cols: usize,
        storage: TableStorage,
        chunk_rows: usize,
    ) -> Result<Self> {
        Self::upload_chunked(ctx, &Self::shaped(data, rows, cols)?, storage, chunk_rows)
    }

    /// `data` as a `rows x cols` table, or the error that it is not one.
    fn shaped(data: &[f32], rows: usize, cols: usize) -> Result<Table<'_>> {
        if rows == 0 || cols == 0 {
            return Err(Error::Empty("table"));
        }
        if data.len() != rows * cols {
            return Err(Error::shape(
                "table values",
                format!("{rows} x {cols}"),
                data.len(),
            ));
        }
        Ok(Table::values(data, cols))
    }

    fn upload_chunked(
        ctx: &GpuContext,
        table: &Table<'_>,
        storage: TableStorage,
        chunk_rows: usize,
    ) -> Result<Self> {
        let (rows, cols) = (table.rows(), table.cols());
        if rows == 0 || cols == 0 {
            return Err(Error::Empty("table"));
        }
        if chunk_rows == 0 {
            return Err(Error::invalid("table chunk rows", "must be positive"));
        }
        if table.len() != rows * cols {
            return Err(Error::shape(
                "table values",
                format!("{rows} x {cols}"),
                table.len(),
            ));
        }
        // Shaders index rows and logits with u32.
        let total_words = rows.checked_mul(row_words(cols, storage));
        if total_words.and_then(|n| u32::try_from(n).ok()).is_none() {
            return Err(Error::invalid(
                "table",
                format!("{rows} x {cols} is too large"),
            ));
        }
        let words = row_words(cols, storage);
        let mut chunks = Vec::with_capacity(rows.div_ceil(chunk_rows));
        for block in table.blocks(chunk_rows) {
            let first = block.start;
            let values = table.read(block)?;
            for (i, &v) in values.iter().enumerate() {
                if !storage.round(v).is_finite() {
                    let (row, col) = (first + i / cols, i % cols);
                    if !v.is_finite() {
                        return Err(Error::NonFinite {
                            what: "table",
                            row,
                            col,
                            value: v,
                        });
                    }
                    return Err(Error::invalid(
                        "f16 table",
                        format!("{v} at row {row}, column {col} exceeds f16's range"),
                    ));
                }
            }
            let mut packed = vec![0u32; values.len() / cols * words];
            for (dst, src) in packed
                .chunks_exact_mut(words)
                .zip(values.chunks_exact(cols))
            {
                match storage {
                    TableStorage::F32 => {
                        for (d, &s) in dst.iter_mut().zip(src) {
                            *d = s.to_bits();
                        }
                    }
                    TableStorage::F16 => {
                        for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
                            let lo = f16::from_f32(pair[0]).to_bits() as u32;
                            let hi = pair.get(1).map_or(0, |&v| f16::from_f32(v).to_bits());
                            *d = lo | (hi as u32) << 16;
                        }
                    }
                }
            }
            chunks.push(TableChunk {
                first,
                rows: values.len() / cols,
                buffer: ctx.upload("table chunk", &packed)?,
            });
        }
        Ok(GpuTable {
            rows,
            cols,
            storage,
            chunks,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn storage(&self) -> TableStorage {
        self.storage
    }

    /// How many buffers the table is split into.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// GPU memory the table occupies, padding included.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buffer.size()).sum()
    }

    pub(crate) fn chunks(&self) -> &[TableChunk] {
        &self.chunks
    }

    /// The pipeline constants of `shaders/common/table.wgsl` for this table's layout.
    pub(crate) fn constants(&self) -> [(&'static str, u64); 1] {
        [("HALF", (self.storage == TableStorage::F16) as u64)]
    }

    /// u32 words per stored row (a multiple of 4).
    pub(crate) fn row_words(&self) -> usize {
        row_words(self.cols, self.storage)
    }
}

/// u32 words a row of `cols` values takes on the GPU.
pub(crate) fn row_words(cols: usize, storage: TableStorage) -> usize {
    let words = match storage {
        TableStorage::F32 => cols,
        TableStorage::F16 => cols.div_ceil(2),
    };
    words.next_multiple_of(4)
}

/// A dense row-major `[rows, cols]` f32 matrix in row chunks that each fit one storage binding:
/// the gradient of a [`GpuTable`] (embeddings, lm_head), written by the backward kernels.
pub struct GpuGradTable {
    rows: usize,
    cols: usize,
    chunks: Vec<TableChunk>,
}

impl GpuGradTable {
    /// Room for `rows x cols` f32 in as few chunks as the adapter's binding limit allows
    /// (contents undefined until a kernel writes them).
    pub fn new(ctx: &GpuContext, rows: usize, cols: usize) -> Result<Self> {
        let caps = ctx.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer);
        let chunk_rows = limit / (4 * cols as u64).max(1);
        if chunk_rows == 0 {
            return Err(Error::Limit {
                what: format!("one gradient row of {cols} values"),
                limit: "max_storage_buffer_binding_size",
                needed: 4 * cols as u64,
                available: limit,
            });
        }
        Self::new_chunked(ctx, rows, cols, chunk_rows as usize)
    }

    /// [`GpuGradTable::new`] with at most `chunk_rows` rows per chunk, so that tests can exercise
    /// chunking on small tables.
    #[doc(hidden)]
    pub fn new_chunked(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Empty("gradient table"));
        }
        if chunk_rows == 0 {
            return Err(Error::invalid("table chunk rows", "must be positive"));
        }
        if rows
            .checked_mul(cols)
            .and_then(|n| u32::try_from(n).ok())
            .is_none()
        {
            return Err(Error::invalid(
                "gradient table",
                format!("{rows} x {cols} is too large"),
            ));
        }
        let mut chunks = Vec::with_capacity(rows.div_ceil(chunk_rows));
        let mut first = 0;
        while first < rows {
            let n = chunk_rows.min(rows - first);
            chunks.push(TableChunk {
                first,
                rows: n,
                buffer: ctx.storage("gradient table chunk", (n * cols * 4) as u64)?,
            });
            first += n;
        }
        Ok(GpuGradTable { rows, cols, chunks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// How many buffers the matrix is split into.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The buffer of chunk `index`, with its first row and row count (e.g. for an optimizer
    /// update chunk by chunk).
    pub fn chunk(&self, index: usize) -> Option<(usize, usize, &wgpu::Buffer)> {
        self.chunks.get(index).map(|c| (c.first, c.rows, &c.buffer))
    }

    pub(crate) fn chunks(&self) -> &[TableChunk] {
        &self.chunks
    }

    /// Reads the whole matrix back, row-major.
    pub async fn read(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for c in &self.chunks {
            out.extend(ctx.read::<f32>(&c.buffer, c.rows * self.cols).await?);
        }
        Ok(out)
    }
}
