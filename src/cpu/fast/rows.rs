//! A float table (the embeddings, the lm_head) laid out for the CPU engine's products.

use super::{Kernel, for_each_chunk, items_per_task, populate, table_shape};
use std::borrow::Cow;
use std::ops::Range;

#[cfg(not(target_arch = "wasm32"))]
use crate::table::MappedTable;
use crate::table::{FloatType, Table};
use crate::{Error, Result};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// Rows stored side by side, a column of them in 8 AVX vectors: 8 independent chains of adds
/// keep the adder busy (each row's own sum is a chain that must stay in order).
const LANES: usize = 64;
/// Values widened at a time when a file's table is laid out: 16 MiB as f32, under the size
/// from which malloc maps each allocation afresh (`keep_freed_memory`), so that every block
/// reuses the last one's pages instead of faulting in new ones.
const BLOCK_VALUES: usize = 4 << 20;
/// Table bytes a task reads at least.
const TASK_BYTES: usize = 256 << 10;
/// Fewer picked rows than this are summed one by one rather than laid out as a group of
/// [`LANES`] (a group's layout writes all its lanes, however few are picked).
const FEW_PICKS: usize = 8;

/// A `[rows, cols]` f32 table (row-major in memory elsewhere) stored in groups of [`LANES`]
/// rows interleaved column by column, so that the products of one vector with every row run
/// [`LANES`] rows per instruction, each row still summed left to right as the reference's
/// `sum_k x[k] * row[k]`. Kept as f16 when every value is one exactly (a GGUF's F16 table),
/// as bf16 when a file stores them so: half the bytes to read, the same values.
///
/// ```
/// use bitnet_wgpu::cpu::fast::InterleavedRows;
/// let table = InterleavedRows::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?;
/// assert_eq!(table.row(1), [3.0, 4.0]);
/// assert_eq!(table.products(&[1.0, -1.0], 1)?, [-1.0, -1.0, -1.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct InterleavedRows {
    rows: usize,
    cols: usize,
    /// `[groups, cols, LANES]`, rows past the end zero.
    values: Values,
}

/// A table's values, as f32 or as the bits of f16 or bf16 values (each widens to f32
/// exactly).
#[derive(Clone, Debug, PartialEq)]
enum Values {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

impl Values {
    fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => 4 * v.len(),
            Values::F16(v) | Values::Bf16(v) => 2 * v.len(),
        }
    }

    /// Values `at` (a range of the vector), as f32.
    fn widen(&self, at: Range<usize>) -> Vec<f32> {
        match self {
            Values::F32(v) => v[at].to_vec(),
            Values::F16(v) => v[at].iter().map(|&h| f16::from_bits(h).to_f32()).collect(),
            Values::Bf16(v) => v[at].iter().map(|&h| bf16::from_bits(h).to_f32()).collect(),
        }
    }
}

impl InterleavedRows {
    /// The table `values` (`[rows, cols]`, row-major).
    pub fn new(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(Error::Empty("table row"));
        }
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(Error::shape(
                "table",
                format!("{rows} x {cols}"),
                values.len(),
            ));
        }
        Self::from_table(&Table::values(values, cols), &|| {})
    }

    /// A [`Table`], read a block of rows at a time (again as f32 where a value is not an f16
    /// exactly), so that a file's table is never widened whole.
    /// `release` is called after each block: an engine passes its source's
    /// [`crate::model::WeightSource::release`], so that a mapped file's pages go as the rows are
    /// laid out rather than all at the end.
    pub fn from_table(table: &Table<'_>, release: &dyn Fn()) -> Result<Self> {
        let (rows, cols) = table_shape(table)?;
        let block_rows = (BLOCK_VALUES / cols).max(1).next_multiple_of(LANES);
        let read = |rows| table.read_half(rows);
        match table.stored_type() {
            Some(FloatType::F16) => {
                let values = Values::F16(interleave(table, block_rows, 0, read, release)?);
                return Ok(InterleavedRows { rows, cols, values });
            }
            Some(FloatType::Bf16) => {
                let values = Values::Bf16(interleave(table, block_rows, 0, read, release)?);
                return Ok(InterleavedRows { rows, cols, values });
            }
            _ => {}
        }
        // As f16 until a value is not one exactly; then, from the start, as f32.
        let inexact = std::cell::Cell::new(false);
        let read = |rows| match exact_f16(&table.read(rows)?) {
            Some(bits) => Ok(Cow::Owned(bits)),
            None => {
                inexact.set(true);
                Err(Error::invalid("table", "a value that is not an f16"))
            }
        };
        let values = match interleave(table, block_rows, 0, read, release) {
            Ok(bits) => Values::F16(bits),
            Err(_) if inexact.get() => {
                let read = |rows| table.read(rows);
                Values::F32(interleave(table, block_rows, 0.0, read, release)?)
            }
            Err(e) => return Err(e),
        };
        Ok(InterleavedRows { rows, cols, values })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.values.bytes()
    }

    /// Row `r` (an embedding), as f32.
    pub fn row(&self, r: usize) -> Vec<f32> {
        let at = r / LANES * LANES * self.cols + r % LANES;
        let column = (0..self.cols).map(|k| at + k * LANES);
        match &self.values {
            Values::F32(v) => column.map(|i| v[i]).collect(),
            Values::F16(v) => column.map(|i| f16::from_bits(v[i]).to_f32()).collect(),
            Values::Bf16(v) => column.map(|i| bf16::from_bits(v[i]).to_f32()).collect(),
        }
    }

    /// `y[m, r] = sum_k x[m, k] * row_r[k]` for the `n` vectors `x` (`[n, cols]`), `[n, rows]`
    /// row-major: each sum left to right from `-0.0`, as `Iterator::sum` forms the reference's.
    pub fn products(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if n.checked_mul(self.cols) != Some(x.len()) {
            return Err(Error::shape(
                "table product input",
                format!("{n} x {}", self.cols),
                x.len(),
            ));
        }
        let groups = self.rows.div_ceil(LANES);
        let bytes_per_group = self.bytes() / groups.max(1);
        let per_task = items_per_task(groups, bytes_per_group, TASK_BYTES);
        // [groups, n, LANES], then transposed into [n, rows].
        let mut by_group = vec![0.0f32; groups * n * LANES];
        let kernel = Kernel::detect();
        let group_len = LANES * self.cols;
        for_each_chunk(&mut by_group, per_task * n * LANES, |task, out| {
            for (g, out) in out.chunks_exact_mut(n * LANES).enumerate() {
                let at = (task * per_task + g) * group_len;
                for (x, out) in x.chunks_exact(self.cols).zip(out.chunks_exact_mut(LANES)) {
                    let sums = match &self.values {
                        Values::F32(v) => kernel.f32_lanes(x, &v[at..][..group_len]),
                        Values::F16(v) => kernel.f16_lanes(x, &v[at..][..group_len]),
                        Values::Bf16(v) => kernel.bf16_lanes(x, &v[at..][..group_len]),
                    };
                    out.copy_from_slice(&sums);
                }
            }
        });
        let mut y = vec![0.0f32; n * self.rows];
        for (g, block) in by_group.chunks_exact(n * LANES).enumerate() {
            for (m, lanes) in block.chunks_exact(LANES).enumerate() {
                let first = g * LANES;
                let count = LANES.min(self.rows - first);
                y[m * self.rows + first..][..count].copy_from_slice(&lanes[..count]);
            }
        }
        Ok(y)
    }
}

/// The bits of `values` as f16 where every one is an f16 exactly, else `None`: a slice at a
/// time (F16C on x86-64, 8 values per instruction), checked by widening them back.
fn exact_f16(values: &[f32]) -> Option<Vec<u16>> {
    const CHUNK: usize = 1024;
    let per_task = TASK_BYTES / 4;
    let mut bits = vec![0u16; values.len()];
    let inexact = std::sync::atomic::AtomicBool::new(false);
    for_each_chunk(&mut bits, per_task, |task, out| {
        let values = &values[task * per_task..][..out.len()];
        let mut back = [0.0f32; CHUNK];
        for (out, want) in out.chunks_mut(CHUNK).zip(values.chunks(CHUNK)) {
            bytemuck::cast_slice_mut::<u16, f16>(out).convert_from_f32_slice(want);
            let back = &mut back[..out.len()];
            bytemuck::cast_slice::<u16, f16>(out).convert_to_f32_slice(back);
            if back
                .iter()
                .zip(want)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                inexact.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (!inexact.into_inner()).then_some(bits)
}

/// A `[rows, cols]` float table row-major, for rows read one at a time: the embeddings'
/// lookups and the exact products of the few rows an int8 screen cannot rule out
/// ([`FloatRows::products_of`]). A table that lies in a mapped file ([`Table::mapped`]) is
/// read there as it is needed (the rows a decoding step reads are a few kilobytes of the page
/// cache, not a copy of the table); any other is copied, f16 where every value is one exactly
/// (as [`InterleavedRows`] keeps it).
///
/// ```
/// use bitnet_wgpu::cpu::fast::FloatRows;
/// use bitnet_wgpu::table::Table;
/// let table = FloatRows::from_table(&Table::values(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0][..], 2), &|| {})?;
/// assert_eq!(table.row(1), [3.0, 4.0]);
/// assert_eq!(table.products_of(&[2, 0], &[1.0, -1.0])?, [-1.0, -1.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct FloatRows {
    rows: usize,
    cols: usize,
    values: RowValues,
}

#[derive(Clone, Debug, PartialEq)]
enum RowValues {
    /// `[rows, cols]`.
    Held(Values),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(MappedTable),
}

impl FloatRows {
    /// A [`Table`], read a block of rows at a time, `release` called after each (as
    /// [`InterleavedRows::from_table`] reads it). A mapped table's values are read once, to
    /// check that they are finite, and left where they lie.
    pub fn from_table(table: &Table<'_>, release: &dyn Fn()) -> Result<Self> {
        let (rows, cols) = table_shape(table)?;
        let block_rows = (BLOCK_VALUES / cols).max(1);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(mapped) = table.mapped() {
            for block in table.blocks(block_rows) {
                match mapped.dtype {
                    FloatType::F32 => drop(table.read(block)?),
                    _ => drop(table.read_half(block)?),
                }
                release();
            }
            return Ok(FloatRows {
                rows,
                cols,
                values: RowValues::Mapped(mapped),
            });
        }
        // As the file's 16 bits, else as f16 until a value is not one exactly; then, from the
        // start, as f32.
        let mut bits = Vec::with_capacity(rows * cols);
        let mut f16 = true;
        for block in table.blocks(block_rows) {
            if table.stored_type().is_some_and(|t| t != FloatType::F32) {
                bits.extend_from_slice(&table.read_half(block)?);
            } else if let Some(block) = exact_f16(&table.read(block)?) {
                bits.extend(block);
            } else {
                f16 = false;
                break;
            }
            release();
        }
        let values = if table.stored_type() == Some(FloatType::Bf16) {
            Values::Bf16(bits)
        } else if f16 {
            Values::F16(bits)
        } else {
            drop(bits);
            let mut values = Vec::with_capacity(rows * cols);
            for block in table.blocks(block_rows) {
                values.extend_from_slice(&table.read(block)?);
                release();
            }
            Values::F32(values)
        };
        Ok(FloatRows {
            rows,
            cols,
            values: RowValues::Held(values),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (none for a table read from its mapped file).
    pub fn bytes(&self) -> usize {
        match &self.values {
            RowValues::Held(values) => values.bytes(),
            #[cfg(not(target_arch = "wasm32"))]
            RowValues::Mapped(_) => 0,
        }
    }

    /// Row `r`, as f32.
    pub fn row(&self, r: usize) -> Vec<f32> {
        let at = r * self.cols..(r + 1) * self.cols;
        match &self.values {
            RowValues::Held(values) => values.widen(at),
            #[cfg(not(target_arch = "wasm32"))]
            RowValues::Mapped(m) => {
                let size = m.dtype.bytes();
                m.dtype
                    .widen(&m.mapping[m.offset + at.start * size..m.offset + at.end * size])
            }
        }
    }

    /// `x · row_r` for each `r` of `picks`, in that order, each equal bit for bit to
    /// [`InterleavedRows::products`]' (left to right from `-0.0`): a few rows one by one, more
    /// laid out as groups, [`LANES`] at a time, for the same kernels.
    pub fn products_of(&self, picks: &[usize], x: &[f32]) -> Result<Vec<f32>> {
        if x.len() != self.cols {
            return Err(Error::shape("table product input", self.cols, x.len()));
        }
        if let Some(&r) = picks.iter().find(|&&r| r >= self.rows) {
            return Err(Error::shape("table row", format!("below {}", self.rows), r));
        }
        let kernel = Kernel::detect();
        let cols = self.cols;
        let mut out = vec![0.0f32; picks.len()];
        for_each_chunk(&mut out, LANES, |batch, out| {
            let picks = &picks[batch * LANES..][..out.len()];
            if picks.len() < FEW_PICKS {
                for (o, &r) in out.iter_mut().zip(picks) {
                    *o = self
                        .row(r)
                        .iter()
                        .zip(x)
                        .fold(-0.0, |acc, (&w, &xk)| acc + xk * w);
                }
                return;
            }
            let sums = match &self.values {
                RowValues::Held(Values::F32(v)) => kernel.f32_lanes(
                    x,
                    &gather(picks.iter().map(|&r| &v[r * cols..][..cols]), cols, 0.0),
                ),
                RowValues::Held(Values::F16(v)) => kernel.f16_lanes(
                    x,
                    &gather(picks.iter().map(|&r| &v[r * cols..][..cols]), cols, 0),
                ),
                RowValues::Held(Values::Bf16(v)) => kernel.bf16_lanes(
                    x,
                    &gather(picks.iter().map(|&r| &v[r * cols..][..cols]), cols, 0),
                ),
                #[cfg(not(target_arch = "wasm32"))]
                RowValues::Mapped(_) => {
                    let rows: Vec<Vec<f32>> = picks.iter().map(|&r| self.row(r)).collect();
                    kernel.f32_lanes(x, &gather(rows.iter().map(Vec::as_slice), cols, 0.0))
                }
            };
            out.copy_from_slice(&sums[..out.len()]);
        });
        Ok(out)
    }
}

/// `rows` (at most [`LANES`], of `cols` values each) as one group (`[cols, LANES]`), missing
/// lanes `zero`.
fn gather<'v, T: Transpose + 'v>(
    rows: impl Iterator<Item = &'v [T]>,
    cols: usize,
    zero: T,
) -> Vec<T> {
    let mut side_by_side = Vec::with_capacity(LANES * cols);
    for row in rows {
        side_by_side.extend_from_slice(row);
    }
    side_by_side.resize(LANES * cols, zero);
    let mut group = vec![zero; LANES * cols];
    T::transpose(&side_by_side, cols, &mut group);
    group
}

/// `table` as `[groups, cols, LANES]`, missing rows `zero`, from the values `read` gives for
/// blocks of `block_rows` rows (a multiple of [`LANES`], so that a block is whole groups),
/// `release` called after each.
fn interleave<'t, T: Transpose + Send + Sync + 't>(
    table: &Table<'_>,
    block_rows: usize,
    zero: T,
    read: impl Fn(Range<usize>) -> Result<Cow<'t, [T]>>,
    release: &dyn Fn(),
) -> Result<Vec<T>> {
    let group_len = LANES * table.cols();
    let mut out = vec![zero; table.rows().div_ceil(LANES) * group_len];
    populate(out.as_ptr(), out.len());
    for block in table.blocks(block_rows) {
        let first = block.start / LANES;
        let groups = block.len().div_ceil(LANES);
        let values = read(block)?;
        let out = &mut out[first * group_len..][..groups * group_len];
        for_each_chunk(out, group_len, |g, group| {
            let rows = &values[g * group_len..values.len().min((g + 1) * group_len)];
            T::transpose(rows, table.cols(), group);
        });
        release();
    }
    Ok(out)
}

/// The values a table is laid out in, each with its transposition into a group.
trait Transpose: Copy {
    /// `group[k * LANES + lane] = rows[lane * cols + k]` for up to [`LANES`] rows of `cols`
    /// values.
    fn transpose(rows: &[Self], cols: usize, group: &mut [Self]);
}

impl Transpose for f32 {
    fn transpose(rows: &[f32], cols: usize, group: &mut [f32]) {
        transpose(rows, cols, group)
    }
}

/// f16 bits: a whole group on x86-64 in SSE2 tiles of 8 x 8 (16 instructions of loads and
/// stores and 24 shuffles where the portable tiles move each value on its own: most of the
/// time it takes to lay out 2B4T's table).
impl Transpose for u16 {
    fn transpose(rows: &[u16], cols: usize, group: &mut [u16]) {
        #[cfg(target_arch = "x86_64")]
        if rows.len() == LANES * cols && cols.is_multiple_of(8) {
            // SAFETY: SSE2 is part of x86-64; the group is whole and whole tiles of 8 columns.
            return unsafe { sse2_transpose(rows, cols, group) };
        }
        transpose(rows, cols, group)
    }
}

/// [`transpose`] of a whole group, `cols` a multiple of 8, in 8 x 8 tiles of 16-bit values.
///
/// # Safety
/// `rows.len() == LANES * cols == group.len()` and `cols % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
unsafe fn sse2_transpose(rows: &[u16], cols: usize, group: &mut [u16]) {
    use std::arch::x86_64::*;
    debug_assert!(rows.len() == LANES * cols && group.len() == rows.len());
    for k0 in (0..cols).step_by(8) {
        for l0 in (0..LANES).step_by(8) {
            // SAFETY: 8 values of each of rows l0..l0 + 8, from column k0, are in bounds.
            let r: [__m128i; 8] = std::array::from_fn(|i| unsafe {
                _mm_loadu_si128(rows.as_ptr().add((l0 + i) * cols + k0).cast())
            });
            // Pairs of rows interleaved, then fours, then eights.
            let t: [__m128i; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                if i % 2 == 0 {
                    _mm_unpacklo_epi16(a, b)
                } else {
                    _mm_unpackhi_epi16(a, b)
                }
            });
            // u[4h + m]: columns 2m and 2m + 1 of rows 4h..4h + 4.
            let u: [__m128i; 8] = std::array::from_fn(|i| {
                let (h, p, hi) = (i / 4, (i / 2) % 2, i % 2 == 1);
                let (a, b) = (t[4 * h + p], t[4 * h + p + 2]);
                if hi {
                    _mm_unpackhi_epi32(a, b)
                } else {
                    _mm_unpacklo_epi32(a, b)
                }
            });
            for j in 0..8 {
                let (a, b) = (u[j / 2], u[4 + j / 2]);
                let c = if j % 2 == 0 {
                    _mm_unpacklo_epi64(a, b)
                } else {
                    _mm_unpackhi_epi64(a, b)
                };
                // SAFETY: column k0 + j's lanes l0..l0 + 8 are in bounds.
                unsafe {
                    _mm_storeu_si128(group.as_mut_ptr().add((k0 + j) * LANES + l0).cast(), c)
                };
            }
        }
    }
}

/// `group[k * LANES + lane] = rows[lane * cols + k]` for up to [`LANES`] rows of `cols`
/// values: a whole group in tiles of 8 x 8 (8 values loaded from each of 8 rows, stored as 8
/// values of each of 8 columns, whole vectors both ways), a partial one value by value.
fn transpose<T: Copy>(rows: &[T], cols: usize, group: &mut [T]) {
    const TILE: usize = 8;
    if rows.len() != LANES * cols || !cols.is_multiple_of(TILE) {
        for (lane, row) in rows.chunks_exact(cols).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                group[k * LANES + lane] = v;
            }
        }
        return;
    }
    for k0 in (0..cols).step_by(TILE) {
        let strip = &mut group[k0 * LANES..][..TILE * LANES];
        for l0 in (0..LANES).step_by(TILE) {
            let tile: [[T; TILE]; TILE] = std::array::from_fn(|i| {
                let row = &rows[(l0 + i) * cols + k0..][..TILE];
                std::array::from_fn(|j| row[j])
            });
            for (j, column) in strip.chunks_exact_mut(LANES).enumerate() {
                column[l0..l0 + TILE]
                    .copy_from_slice(&std::array::from_fn::<T, TILE, _>(|i| tile[i][j]));
            }
        }
    }
}

impl Kernel {
    /// The [`LANES`] sums of one group (`[cols, LANES]`) with `x`.
    fn f32_lanes(self, x: &[f32], group: &[f32]) -> [f32; LANES] {
        match self {
            Kernel::Portable => portable_lanes(x, group.chunks_exact(LANES), |&v| v),
            // SAFETY: AVX2 is present; `group` holds `x.len()` columns.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2::f32_lanes(x, group) },
        }
    }

    fn f16_lanes(self, x: &[f32], group: &[u16]) -> [f32; LANES] {
        match self {
            Kernel::Portable => portable_lanes(x, group.chunks_exact(LANES), |&h| {
                f16::from_bits(h).to_f32()
            }),
            // SAFETY: AVX2 and F16C are present; `group` holds `x.len()` columns.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2::f16_lanes(x, group) },
        }
    }

    fn bf16_lanes(self, x: &[f32], group: &[u16]) -> [f32; LANES] {
        match self {
            Kernel::Portable => portable_lanes(x, group.chunks_exact(LANES), |&h| {
                bf16::from_bits(h).to_f32()
            }),
            // SAFETY: AVX2 is present; `group` holds `x.len()` columns.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2::bf16_lanes(x, group) },
        }
    }
}

/// `acc[i] = acc[i] + x[k] * column_k[i]`, `k` ascending, from `-0.0`.
fn portable_lanes<'a, T: 'a>(
    x: &[f32],
    columns: impl Iterator<Item = &'a [T]>,
    value: impl Fn(&T) -> f32,
) -> [f32; LANES] {
    let mut acc = [-0.0f32; LANES];
    for (&xk, column) in x.iter().zip(columns) {
        for (a, v) in acc.iter_mut().zip(column) {
            *a += xk * value(v);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// f32 values per AVX vector.
    const VECTOR: usize = 8;

    /// The portable sums with 8 rows per instruction: a product, then a sum, each rounded as
    /// the scalar `a + x * w` is (never fused).
    ///
    /// # Safety
    /// AVX2 must be present and `group.len() == x.len() * LANES`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn f32_lanes(x: &[f32], group: &[f32]) -> [f32; LANES] {
        debug_assert_eq!(group.len(), x.len() * LANES);
        let mut acc = [_mm256_set1_ps(-0.0); LANES / VECTOR];
        for (k, &xk) in x.iter().enumerate() {
            let xk = _mm256_set1_ps(xk);
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: column k's values are in bounds.
                let w = unsafe { _mm256_loadu_ps(group.as_ptr().add(k * LANES + v * VECTOR)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(xk, w));
            }
        }
        store(acc)
    }

    /// As [`f32_lanes`], the table's f16 values widened exactly by `vcvtph2ps`.
    ///
    /// # Safety
    /// AVX2 and F16C must be present and `group.len() == x.len() * LANES`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16_lanes(x: &[f32], group: &[u16]) -> [f32; LANES] {
        debug_assert_eq!(group.len(), x.len() * LANES);
        let mut acc = [_mm256_set1_ps(-0.0); LANES / VECTOR];
        for (k, &xk) in x.iter().enumerate() {
            let xk = _mm256_set1_ps(xk);
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: column k's values are in bounds.
                let w = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        group.as_ptr().add(k * LANES + v * VECTOR).cast(),
                    ))
                };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(xk, w));
            }
        }
        store(acc)
    }

    /// As [`f32_lanes`], the table's bf16 values widened exactly (the bits moved up by 16).
    ///
    /// # Safety
    /// AVX2 must be present and `group.len() == x.len() * LANES`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_lanes(x: &[f32], group: &[u16]) -> [f32; LANES] {
        debug_assert_eq!(group.len(), x.len() * LANES);
        let mut acc = [_mm256_set1_ps(-0.0); LANES / VECTOR];
        for (k, &xk) in x.iter().enumerate() {
            let xk = _mm256_set1_ps(xk);
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: column k's values are in bounds.
                let bits =
                    unsafe { _mm_loadu_si128(group.as_ptr().add(k * LANES + v * VECTOR).cast()) };
                let w = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(xk, w));
            }
        }
        store(acc)
    }

    #[target_feature(enable = "avx2")]
    fn store(acc: [__m256; LANES / VECTOR]) -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        for (chunk, acc) in out.chunks_exact_mut(VECTOR).zip(acc) {
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), acc) };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    /// The reference's form: a left-to-right `Iterator::sum` per row.
    fn reference(table: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
        x.chunks_exact(cols)
            .flat_map(|x| {
                table
                    .chunks_exact(cols)
                    .map(move |w| x.iter().zip(w).map(|(&a, &b)| a * b).sum::<f32>())
            })
            .collect()
    }

    #[test]
    fn products_equal_left_to_right_sums() {
        let mut rng = SmallRng::seed_from_u64(8);
        for (rows, cols, n, f16_exact) in [
            (1, 1, 1, false),
            (17, 5, 2, false),
            (37, 40, 3, true),
            (300, 129, 1, false),
            (1000, 64, 2, true),
            (2000, 70, 1, true),
        ] {
            let mut table: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            if f16_exact {
                table
                    .iter_mut()
                    .for_each(|v| *v = f16::from_f32(*v).to_f32());
            }
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let t = InterleavedRows::new(&table, rows, cols).unwrap();
            assert_eq!(matches!(t.values, Values::F16(_)), f16_exact);
            let got = t.products(&x, n).unwrap();
            let want = reference(&table, cols, &x);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(a.to_bits(), b.to_bits(), "{rows} x {cols}");
            }
            for r in [0, rows / 2, rows - 1] {
                assert_eq!(t.row(r), table[r * cols..][..cols]);
            }
            // The portable kernel gives the same sums.
            let group = &table[..cols.min(table.len())];
            let portable = portable_lanes(&x[..cols], group.chunks(1), |&v| v);
            assert_eq!(portable[0].to_bits(), want[0].to_bits());
        }
    }

    /// A BF16 table keeps its 16 bits, values f16 cannot hold among them, and its products are
    /// the reference's of the widened values, in both layouts and on every kernel.
    #[test]
    fn a_stored_bf16_table_keeps_its_values() {
        let mut rng = SmallRng::seed_from_u64(10);
        let (rows, cols, n) = (150, 70, 2);
        let mut bits: Vec<u16> = (0..rows * cols)
            .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
            .collect();
        (bits[3], bits[500]) = (
            bf16::from_f32(3e-7).to_bits(),
            bf16::from_f32(1e9).to_bits(),
        );
        let values: Vec<f32> = bits.iter().map(|&h| bf16::from_bits(h).to_f32()).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|h| h.to_le_bytes()).collect();
        let stored = Table::stored("t", FloatType::Bf16, &bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let want = reference(&values, cols, &x);
        let t = InterleavedRows::from_table(&stored, &|| {}).unwrap();
        assert!(matches!(t.values, Values::Bf16(_)));
        assert_eq!(t.bytes(), 2 * 192 * cols);
        let same = |got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        };
        same(&t.products(&x, n).unwrap(), &want);
        assert_eq!(t.row(0), values[..cols]);
        let Values::Bf16(laid_out) = &t.values else {
            unreachable!()
        };
        for kernel in Kernel::available() {
            let sums = kernel.bf16_lanes(&x[..cols], &laid_out[..LANES * cols]);
            same(&sums, &want[..LANES]);
        }
        let held = FloatRows::from_table(&stored, &|| {}).unwrap();
        assert_eq!(held.bytes(), 2 * rows * cols);
        let picks: Vec<usize> = (0..rows).rev().step_by(7).collect();
        for picks in [&picks[..3], &picks[..]] {
            let want: Vec<f32> = picks.iter().map(|&r| want[r]).collect();
            same(&held.products_of(picks, &x[..cols]).unwrap(), &want);
        }
        assert_eq!(held.row(0), values[..cols]);
    }

    #[test]
    fn a_stored_f16_table_is_laid_out_as_its_values() {
        let mut rng = SmallRng::seed_from_u64(9);
        let (rows, cols) = (150, 70);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
            .collect();
        let mut bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let stored = Table::stored("t", FloatType::F16, &bytes, rows, cols).unwrap();
        let want = InterleavedRows::new(&values, rows, cols).unwrap();
        let released = std::cell::Cell::new(0);
        let release = || released.set(released.get() + 1);
        assert_eq!(
            InterleavedRows::from_table(&stored, &release).unwrap(),
            want
        );
        assert_eq!(released.get(), 1);
        // Blocks of one group each, the last one partial, lay out the same values.
        let read = |r| stored.read_half(r);
        let by_group = interleave(&stored, LANES, 0, read, &release);
        assert_eq!(Values::F16(by_group.unwrap()), want.values);
        assert_eq!(released.get(), 4);
        // An infinity (f16 0x7c00) at row 3, column 5.
        bytes[2 * (3 * cols + 5)..][..2].copy_from_slice(&[0x00, 0x7c]);
        let stored = Table::stored("t", FloatType::F16, &bytes, rows, cols).unwrap();
        let e = InterleavedRows::from_table(&stored, &|| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("inf at row 3, column 5"), "{e}");
    }

    #[test]
    fn float_rows_give_the_interleaved_products_of_any_rows() {
        let mut rng = SmallRng::seed_from_u64(10);
        for (rows, cols, f16_values) in [(1, 1, true), (70, 13, false), (200, 136, true)] {
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .map(|v: f32| {
                    if f16_values {
                        f16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect();
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect();
            let table = FloatRows::new_for_test(&values, cols);
            assert_eq!(table.bytes(), rows * cols * if f16_values { 2 } else { 4 });
            let mut tables = vec![table];
            if f16_values {
                let stored = Table::stored("t", FloatType::F16, &bytes, rows, cols).unwrap();
                assert_eq!(FloatRows::from_table(&stored, &|| {}).unwrap(), tables[0]);
                tables.extend(mapped_rows(&bytes, rows, cols));
            }
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let all = InterleavedRows::new(&values, rows, cols)
                .unwrap()
                .products(&x, 1)
                .unwrap();
            // Every row, in an order of its own, more than a group's worth, and repeats; and a
            // few rows, summed one by one.
            let picks: Vec<usize> = (0..rows + 70).map(|i| (i * 7 + 3) % rows).collect();
            for table in &tables {
                for picks in [&picks[..], &picks[..3]] {
                    let got = table.products_of(picks, &x).unwrap();
                    for (&r, g) in picks.iter().zip(&got) {
                        assert_eq!(g.to_bits(), all[r].to_bits());
                        assert_eq!(table.row(r), values[r * cols..][..cols]);
                    }
                }
                assert!(table.products_of(&[rows], &x).is_err());
                assert!(table.products_of(&[0], &x[1..]).is_err());
            }
        }
    }

    /// The F16 table `bytes` read where a mapped file holds them (after 6 bytes of something
    /// else); none in the browser, which maps no files.
    #[cfg(not(target_arch = "wasm32"))]
    fn mapped_rows(bytes: &[u8], rows: usize, cols: usize) -> Option<FloatRows> {
        let path =
            std::env::temp_dir().join(format!("bitnet-float-rows-{}-{rows}", std::process::id()));
        std::fs::write(&path, [&[7u8; 6][..], bytes].concat()).unwrap();
        let mapping = std::sync::Arc::new(crate::formats::map(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let stored = Table::stored("t", FloatType::F16, &mapping[6..], rows, cols)
            .unwrap()
            .in_mapping(mapping.clone())
            .unwrap();
        let mapped = FloatRows::from_table(&stored, &|| {}).unwrap();
        assert_eq!(mapped.bytes(), 0);
        let elsewhere = Table::stored("t", FloatType::F16, bytes, rows, cols).unwrap();
        assert!(elsewhere.in_mapping(mapping.clone()).is_err());
        Some(mapped)
    }

    #[cfg(target_arch = "wasm32")]
    fn mapped_rows(_: &[u8], _: usize, _: usize) -> Option<FloatRows> {
        None
    }

    impl FloatRows {
        fn new_for_test(values: &[f32], cols: usize) -> Self {
            FloatRows::from_table(&Table::values(values, cols), &|| {}).unwrap()
        }
    }

    #[test]
    fn f16_groups_transpose_as_the_portable_tiles_do() {
        for cols in [8, 72, 70] {
            let rows: Vec<u16> = (0..LANES * cols).map(|i| (i * 31 % 65521) as u16).collect();
            let (mut fast, mut portable) = (vec![0; rows.len()], vec![0; rows.len()]);
            u16::transpose(&rows, cols, &mut fast);
            transpose(&rows, cols, &mut portable);
            assert_eq!(fast, portable, "{cols} columns");
            assert_eq!(fast[5 * LANES + 3], rows[3 * cols + 5]);
        }
    }

    #[test]
    fn signed_zero_and_nan_follow_the_reference() {
        // A row of -0.0 products sums to -0.0, as `Iterator::sum` does; a NaN input spreads.
        let t = InterleavedRows::new(&[0.0, 0.0, 1.0, 2.0], 2, 2).unwrap();
        let y = t.products(&[-1.0, -1.0], 1).unwrap();
        assert!(y[0] == 0.0 && y[0].is_sign_negative());
        assert!(t.products(&[f32::NAN, 1.0], 1).unwrap()[1].is_nan());
        assert!(InterleavedRows::new(&[1.0; 5], 2, 2).is_err());
        assert!(t.products(&[1.0; 3], 1).is_err());
        assert_eq!(t.bytes(), 2 * LANES * 2);
    }
}
