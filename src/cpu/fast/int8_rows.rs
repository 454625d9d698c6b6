//! The int8 lm_head ([`crate::cpu::lm_head_int8`]) laid out for the CPU engine: half the bytes
//! of the f16 table per decoding step, and 64 multiply-adds per instruction where AVX-512 VNNI
//! is present.

use super::{FloatRows, Kernel, for_each_chunk, for_each_chunk_pair, items_per_task, table_shape};
use crate::cpu::{INT8_HEAD_BLOCK, ScreenBound, first_largest, quantize_int8};
use crate::table::Table;
use crate::{Error, Result};
use std::sync::OnceLock;

/// Rows side by side: one 64-byte vector holds 4 consecutive columns of 16 rows, so that
/// `vpdpbusd` adds each row's 4 products into its own i32 lane.
const LANES: usize = 16;
/// Columns per lane of a vector.
const QUAD: usize = 4;
/// Values quantized at a time when a table is laid out (64 MiB as f32).
const BLOCK_VALUES: usize = 16 << 20;
/// Table bytes a task reads at least.
const TASK_BYTES: usize = 256 << 10;
/// Rows a task of the screen's test takes.
const SCREEN_ROWS: usize = 8192;

/// A `[rows, cols]` float table in 8 bits per value (each row quantized as
/// [`crate::cpu::int8_table`] quantizes it), whose products with vectors equal
/// [`crate::cpu::lm_head_int8`]'s bit for bit. The codes are stored plus 128 (so that they are
/// the unsigned operand of `vpdpbusd`, the activations the signed one) in groups of [`LANES`]
/// rows, 4 columns of each row side by side; rows and columns past the end hold code 0.
///
/// ```
/// use bitnet_wgpu::cpu::fast::Int8Rows;
/// use bitnet_wgpu::cpu::{int8_table, lm_head_int8};
/// use bitnet_wgpu::table::Table;
/// let table = [1.0, 0.5, -0.25, 0.0, 1.0, 1.0];
/// let rows = Int8Rows::from_table(&Table::values(&table[..], 2), &|| {})?;
/// let reference = lm_head_int8(&[2.0, 3.0], 1, &int8_table(&table, 3, 2)?)?;
/// assert_eq!(rows.products(&[2.0, 3.0], 1)?, reference);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Rows {
    rows: usize,
    cols: usize,
    /// `[groups, padded / QUAD, LANES, QUAD]` codes plus 128; `padded` is `cols` rounded up to
    /// whole [`INT8_HEAD_BLOCK`]s.
    values: Vec<u8>,
    /// One per row, then zeros to whole groups.
    scales: Vec<f32>,
    /// `[rows to whole groups, padded / INT8_HEAD_BLOCK]`: each block's `sum |code|`, for
    /// [`ScreenBound::admits`].
    code_sums: Vec<u16>,
    /// Each row's `sum |code|`.
    totals: Vec<u32>,
}

impl Int8Rows {
    /// `table` quantized a block of rows at a time (never widened whole); `release` is called
    /// after each block, as [`super::InterleavedRows::from_table`] calls it.
    pub fn from_table(table: &Table<'_>, release: &dyn Fn()) -> Result<Self> {
        let (rows, cols) = table_shape(table)?;
        let padded = padded(cols);
        let group_len = LANES * padded;
        let groups = rows.div_ceil(LANES);
        let mut values = vec![128u8; groups * group_len];
        let mut scales = vec![0.0f32; groups * LANES];
        let block_rows = (BLOCK_VALUES / cols).max(1).next_multiple_of(LANES);
        let kernel = Kernel::detect();
        for block in table.blocks(block_rows) {
            let first = block.start / LANES;
            let out = &mut values[first * group_len..][..block.len().div_ceil(LANES) * group_len];
            let scales = &mut scales[block.start..][..block.len()];
            // Each task widens its own rows: a table of 2B4T's size is 0.33 G values.
            let failure = OnceLock::new();
            for_each_chunk_pair((out, group_len), (scales, LANES), |g, group, scales| {
                let start = block.start + g * LANES;
                let floats = match table.read(start..start + scales.len()) {
                    Ok(floats) => floats,
                    Err(e) => {
                        let _ = failure.set(e);
                        return;
                    }
                };
                // Zeros past `cols`, as the padding holds.
                let mut codes = vec![0i8; padded];
                for (lane, (row, scale)) in floats.chunks_exact(cols).zip(scales).enumerate() {
                    *scale = kernel.quantize_int8(row, &mut codes[..cols]);
                    // A quad of codes is one 4-byte word of the layout.
                    for (q, quad) in codes.as_chunks::<QUAD>().0.iter().enumerate() {
                        let word = u32::from_le_bytes(quad.map(|c| c as u8)) ^ 0x8080_8080;
                        group[(q * LANES + lane) * QUAD..][..QUAD]
                            .copy_from_slice(&word.to_le_bytes());
                    }
                }
            });
            if let Some(e) = failure.into_inner() {
                return Err(e);
            }
            release();
        }
        let blocks = padded / INT8_HEAD_BLOCK;
        let mut code_sums = vec![0u16; groups * LANES * blocks];
        for_each_chunk(&mut code_sums, LANES * blocks, |g, sums| {
            let group = &values[g * group_len..][..group_len];
            for (b, block) in group.chunks_exact(LANES * INT8_HEAD_BLOCK).enumerate() {
                // Each byte of a row of quads summed in its own lane (a vector at a time), the
                // four lanes of a row added at the end.
                let mut acc = [0u16; LANES * QUAD];
                for quads in block.chunks_exact(LANES * QUAD) {
                    for (a, &c) in acc.iter_mut().zip(quads) {
                        *a += u16::from(((c ^ 0x80) as i8).unsigned_abs());
                    }
                }
                for (lane, a) in acc.chunks_exact(QUAD).enumerate() {
                    sums[lane * blocks + b] = a.iter().sum();
                }
            }
        });
        let totals = code_sums
            .chunks_exact(blocks)
            .map(|sums| sums.iter().map(|&s| u32::from(s)).sum())
            .collect();
        Ok(Int8Rows {
            rows,
            cols,
            values,
            scales,
            code_sums,
            totals,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len() + 2 * self.code_sums.len() + 4 * self.totals.len()
    }

    /// [`crate::cpu::lm_head_screened`] of the `n` vectors `x` (`[n, cols]`) with this table
    /// as the screen and `exact` as the table (the one this was quantized from): `[n, rows]`,
    /// equal bit for bit. The screen's products, then the exact ones of the rows it cannot
    /// rule out (3 to 7 of 2B4T's 128k rows per token on random weights).
    ///
    /// ```
    /// use bitnet_wgpu::cpu::fast::{FloatRows, Int8Rows};
    /// use bitnet_wgpu::cpu::{int8_table, lm_head_screened};
    /// use bitnet_wgpu::table::Table;
    /// let table = [1.0, 0.5, -0.25, 0.0, 1.0, 1.0];
    /// let (screen, exact) = (Table::values(&table[..], 2), Table::values(&table[..], 2));
    /// let screen = Int8Rows::from_table(&screen, &|| {})?;
    /// let exact = FloatRows::from_table(&exact, &|| {})?;
    /// let reference = lm_head_screened(&[2.0, 3.0], 1, &table, &int8_table(&table, 3, 2)?)?;
    /// assert_eq!(screen.screened_products(&exact, &[2.0, 3.0], 1)?, reference);
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub fn screened_products(&self, exact: &FloatRows, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if (exact.rows(), exact.cols()) != (self.rows, self.cols) {
            return Err(Error::shape(
                "exact table of an int8 screen",
                format!("{} x {}", self.rows, self.cols),
                format!("{} x {}", exact.rows(), exact.cols()),
            ));
        }
        let mut logits = self.products(x, n)?;
        let blocks = padded(self.cols) / INT8_HEAD_BLOCK;
        for (x, logits) in x
            .chunks_exact(self.cols)
            .zip(logits.chunks_exact_mut(self.rows))
        {
            let picks: Vec<usize> = match ScreenBound::new(x) {
                None => (0..self.rows).collect(),
                Some(bound) => {
                    let top = first_largest(logits);
                    let best = exact.products_of(&[top], x)?[0];
                    let mut admitted = vec![false; self.rows];
                    for_each_chunk(&mut admitted, SCREEN_ROWS, |task, admitted| {
                        for (v, a) in (task * SCREEN_ROWS..).zip(admitted) {
                            let sums = self.code_sums[v * blocks..][..blocks].iter().copied();
                            *a = v == top
                                || bound.admits(
                                    logits[v],
                                    self.scales[v],
                                    self.totals[v],
                                    sums,
                                    best,
                                );
                        }
                    });
                    (0..self.rows).filter(|&v| admitted[v]).collect()
                }
            };
            for (&v, z) in picks.iter().zip(exact.products_of(&picks, x)?) {
                logits[v] = z;
            }
        }
        Ok(logits)
    }

    /// [`crate::cpu::lm_head_int8`] of the `n` vectors `x` (`[n, cols]`) with this table:
    /// `[n, rows]`, equal bit for bit.
    pub fn products(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if n.checked_mul(self.cols) != Some(x.len()) {
            return Err(Error::shape(
                "table product input",
                format!("{n} x {}", self.cols),
                x.len(),
            ));
        }
        let acts = Activations::new(x, n, self.cols);
        let padded = acts.padded;
        let groups = self.rows.div_ceil(LANES);
        let group_len = LANES * padded;
        let per_task = items_per_task(groups, group_len, TASK_BYTES);
        let kernel = Kernel::detect();
        // [groups, n, LANES], then transposed into [n, rows].
        let mut by_group = vec![0.0f32; groups * n * LANES];
        for_each_chunk(&mut by_group, per_task * n * LANES, |task, out| {
            let first = task * per_task;
            let done = if n == 1 {
                self.four_streams(kernel, &acts, first, out)
            } else {
                0
            };
            for (g, out) in (first..).zip(out.chunks_exact_mut(n * LANES)).skip(done) {
                let group = &self.values[g * group_len..][..group_len];
                for (m, out) in out.chunks_exact_mut(LANES).enumerate() {
                    self.scale_rows(g, kernel.int8_lanes(group, &acts, m), out);
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

impl Int8Rows {
    /// `out = sums * scale` for the rows of group `g`.
    fn scale_rows(&self, g: usize, sums: [f32; LANES], out: &mut [f32]) {
        for ((o, s), &scale) in out.iter_mut().zip(sums).zip(&self.scales[g * LANES..]) {
            *o = s * scale;
        }
    }

    /// The products of one vector `x` with the groups from `first` that `out` (`[groups,
    /// LANES]`) holds, on VNNI a group from each quarter of them at a time (four streams: one
    /// leaves the memory bandwidth a fifth below the ternary products'): how many groups it
    /// did, from the start (none on other kernels).
    fn four_streams(
        &self,
        kernel: Kernel,
        x: &Activations,
        first: usize,
        out: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni {
            let group_len = LANES * x.padded;
            let quarter = out.len() / LANES / 4;
            for i in 0..quarter {
                let g = [0, 1, 2, 3].map(|q| first + q * quarter + i);
                let groups = g.map(|g| &self.values[g * group_len..][..group_len]);
                // SAFETY: AVX-512F and VNNI are present; each group is whole.
                let sums = unsafe { vnni::int8_four(groups, x) };
                for (q, sums) in sums.into_iter().enumerate() {
                    let at = (q * quarter + i) * LANES;
                    self.scale_rows(g[q], sums, &mut out[at..at + LANES]);
                }
            }
            return 4 * quarter;
        }
        let _ = (kernel, x, first, out);
        0
    }
}

impl Kernel {
    /// [`quantize_int8`], its rounding one vector instruction where AVX2 is present (plain
    /// x86-64 calls `rintf` for each value).
    fn quantize_int8(self, values: &[f32], codes: &mut [i8]) -> f32 {
        match self {
            Kernel::Portable => quantize_int8(values, codes),
            // SAFETY: AVX2 is present (`Kernel::detect`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2_quantize_int8(values, codes) },
        }
    }
}

/// [`quantize_int8`] 8 values per instruction: the largest magnitude and whether all are
/// finite in one pass, then `round_ties_even(v * inverse)` clamped, as the reference forms it
/// ([`super::quant::avx2_codes`]).
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_quantize_int8(values: &[f32], codes: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    const VECTOR: usize = 8;
    let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let infinity = _mm256_set1_ps(f32::INFINITY);
    let (mut widest, mut not_finite) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let whole = values.len() / VECTOR * VECTOR;
    for chunk in values[..whole].chunks_exact(VECTOR) {
        // SAFETY: 8 values.
        let v = _mm256_and_ps(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, magnitude);
        // `maxps` returns its second operand where either is NaN: a NaN is passed over, as
        // `f32::max` passes it over.
        widest = _mm256_max_ps(v, widest);
        not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps::<_CMP_NLT_UQ>(v, infinity));
    }
    let mut lanes = [0.0f32; VECTOR];
    // SAFETY: 8 writable floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), widest) };
    let tail = &values[whole..];
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(0.0f32, |m, v| m.max(v.abs()));
    if _mm256_movemask_ps(not_finite) != 0 || !tail.iter().all(|v| v.is_finite()) || max == 0.0 {
        codes[..values.len()].fill(0);
        return if max == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 127.0 / max;
    // SAFETY: AVX2 is present.
    unsafe { super::quant::avx2_codes(values, inverse, -127.0, codes) };
    max / 127.0
}

/// `cols` rounded up to whole [`INT8_HEAD_BLOCK`]s.
fn padded(cols: usize) -> usize {
    cols.div_ceil(INT8_HEAD_BLOCK) * INT8_HEAD_BLOCK
}

/// Quantized vectors: `[n, padded]` codes (zeros past `cols`), and per block of
/// [`INT8_HEAD_BLOCK`] columns a scale and the sum of its codes (`[n, blocks]` each).
struct Activations {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    padded: usize,
}

impl Activations {
    /// The `n` vectors `x` (`[n, cols]`) quantized block by block as the reference does.
    fn new(x: &[f32], n: usize, cols: usize) -> Self {
        let kernel = Kernel::detect();
        let padded = padded(cols);
        let blocks = padded / INT8_HEAD_BLOCK;
        let mut codes = vec![0i8; n * padded];
        let mut scales = vec![0.0f32; n * blocks];
        let mut sums = vec![0i32; n * blocks];
        for ((x, codes), (scales, sums)) in x
            .chunks_exact(cols)
            .zip(codes.chunks_exact_mut(padded))
            .zip(
                scales
                    .chunks_exact_mut(blocks)
                    .zip(sums.chunks_exact_mut(blocks)),
            )
        {
            let blocks = x
                .chunks(INT8_HEAD_BLOCK)
                .zip(codes.chunks_mut(INT8_HEAD_BLOCK));
            for ((x, codes), (scale, sum)) in blocks.zip(scales.iter_mut().zip(sums.iter_mut())) {
                *scale = kernel.quantize_int8(x, &mut codes[..x.len()]);
                *sum = codes.iter().map(|&c| i32::from(c)).sum();
            }
        }
        Activations {
            codes,
            scales,
            sums,
            padded,
        }
    }
}

impl Kernel {
    /// `sum_b dot_b * scale_b` (blocks in order, from `0.0`) of vector `m` with each of the
    /// [`LANES`] rows of `group`, before the rows' own scales.
    fn int8_lanes(self, group: &[u8], x: &Activations, m: usize) -> [f32; LANES] {
        match self {
            // SAFETY: AVX-512F and VNNI are present; `group` and the codes are whole blocks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { vnni::int8_lanes(group, x, m) },
            // Without VNNI the unsigned-by-signed pairs of `vpmaddubsw` would overflow i16.
            _ => portable_lanes(group, x, m),
        }
    }
}

fn portable_lanes(group: &[u8], x: &Activations, m: usize) -> [f32; LANES] {
    let blocks = x.padded / INT8_HEAD_BLOCK;
    let codes = &x.codes[m * x.padded..][..x.padded];
    let (scales, sums) = (&x.scales[m * blocks..], &x.sums[m * blocks..]);
    let mut out = [0.0f32; LANES];
    for (lane, out) in out.iter_mut().enumerate() {
        for (b, (codes, (&scale, &sum))) in codes
            .chunks_exact(INT8_HEAD_BLOCK)
            .zip(scales.iter().zip(sums))
            .enumerate()
        {
            // sum (w + 128) * x over the block, then less 128 * sum x: the exact dot.
            let stored: i32 = codes
                .chunks_exact(QUAD)
                .enumerate()
                .flat_map(|(j, x)| {
                    let at = ((b * INT8_HEAD_BLOCK / QUAD + j) * LANES + lane) * QUAD;
                    x.iter()
                        .zip(&group[at..at + QUAD])
                        .map(|(&x, &w)| i32::from(x) * i32::from(w))
                })
                .sum();
            *out += (stored - 128 * sum) as f32 * scale;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Activations, INT8_HEAD_BLOCK, LANES, QUAD};
    use std::arch::x86_64::*;

    /// [`super::portable_lanes`] with one `vpdpbusd` per 4 columns of all 16 rows: the 4
    /// codes of the vector broadcast to every lane. Four accumulators, so that no `vpdpbusd`
    /// waits for the one before; each block's integer sums exact, then scaled and added in f32
    /// as the reference adds them (a product, then a sum, never fused).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 VNNI must be present; `group` is `LANES * x.padded` bytes.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn int8_lanes(group: &[u8], x: &Activations, m: usize) -> [f32; LANES] {
        let blocks = x.padded / INT8_HEAD_BLOCK;
        debug_assert_eq!(group.len(), LANES * x.padded);
        let codes = x.codes[m * x.padded..][..x.padded].as_ptr();
        let quads = INT8_HEAD_BLOCK / QUAD;
        let mut total = _mm512_setzero_ps();
        for b in 0..blocks {
            let mut acc = [_mm512_setzero_si512(); 4];
            for j in 0..quads {
                let k = b * quads + j;
                // SAFETY: quad `k` of the codes and its 64 table bytes are in bounds.
                let (w, x4) = unsafe {
                    (
                        _mm512_loadu_si512(group.as_ptr().add(k * LANES * QUAD).cast()),
                        codes.add(k * QUAD).cast::<i32>().read_unaligned(),
                    )
                };
                acc[j % 4] = _mm512_dpbusd_epi32(acc[j % 4], w, _mm512_set1_epi32(x4));
            }
            let stored = _mm512_add_epi32(
                _mm512_add_epi32(acc[0], acc[1]),
                _mm512_add_epi32(acc[2], acc[3]),
            );
            let dot = _mm512_sub_epi32(stored, _mm512_set1_epi32(128 * x.sums[m * blocks + b]));
            let scaled = _mm512_mul_ps(
                _mm512_cvtepi32_ps(dot),
                _mm512_set1_ps(x.scales[m * blocks + b]),
            );
            total = _mm512_add_ps(total, scaled);
        }
        let mut out = [0.0f32; LANES];
        // SAFETY: 16 writable floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), total) };
        out
    }

    /// [`int8_lanes`] of one vector (`m = 0`) with four groups at once, each read in order, two
    /// accumulators each: four streams from memory and eight `vpdpbusd` chains in flight.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 VNNI must be present; each group is `LANES * x.padded` bytes.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn int8_four(groups: [&[u8]; 4], x: &Activations) -> [[f32; LANES]; 4] {
        let blocks = x.padded / INT8_HEAD_BLOCK;
        debug_assert!(groups.iter().all(|g| g.len() == LANES * x.padded));
        let codes = x.codes.as_ptr();
        let quads = INT8_HEAD_BLOCK / QUAD;
        let mut total = [_mm512_setzero_ps(); 4];
        for b in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); 2]; 4];
            for j in 0..quads {
                let k = b * quads + j;
                // SAFETY: quad `k` of the codes is in bounds.
                let x4 = _mm512_set1_epi32(unsafe {
                    codes.add(k * QUAD).cast::<i32>().read_unaligned()
                });
                for (acc, group) in acc.iter_mut().zip(groups) {
                    // SAFETY: quad `k`'s 64 table bytes are in bounds.
                    let w =
                        unsafe { _mm512_loadu_si512(group.as_ptr().add(k * LANES * QUAD).cast()) };
                    acc[j % 2] = _mm512_dpbusd_epi32(acc[j % 2], w, x4);
                }
            }
            let offset = _mm512_set1_epi32(128 * x.sums[b]);
            let scale = _mm512_set1_ps(x.scales[b]);
            for (total, acc) in total.iter_mut().zip(acc) {
                let dot = _mm512_sub_epi32(_mm512_add_epi32(acc[0], acc[1]), offset);
                *total = _mm512_add_ps(*total, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale));
            }
        }
        total.map(|t| {
            let mut out = [0.0f32; LANES];
            // SAFETY: 16 writable floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), t) };
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{int8_table, lm_head_int8, lm_head_screened};
    use crate::table::FloatType;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn products_equal_the_reference_bit_for_bit() {
        let mut rng = SmallRng::seed_from_u64(21);
        for (rows, cols, n) in [
            (1, 1, 1),
            (17, 5, 2),
            (33, 127, 1),
            (40, 129, 3),
            (300, 256, 1),
            (1000, 390, 2),
            (2000, 200, 1),
        ] {
            let mut table: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            // An all-zero row, and a row with one large value.
            table[..cols].fill(0.0);
            table[(rows - 1) * cols] = 40.0;
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let fast = Int8Rows::from_table(&Table::values(&table[..], cols), &|| {}).unwrap();
            let want = lm_head_int8(&x, n, &int8_table(&table, rows, cols).unwrap()).unwrap();
            for kernel in Kernel::available() {
                let got = fast.products_on(kernel, &x, n);
                assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{kernel:?}: {rows} x {cols}, {n}");
                }
            }
            assert_eq!(fast.products(&x, n).unwrap(), want);
        }
    }

    #[test]
    fn screened_products_equal_the_reference_bit_for_bit() {
        let mut rng = SmallRng::seed_from_u64(24);
        for (rows, cols, n) in [(1, 1, 1), (17, 5, 2), (70, 129, 3), (1000, 300, 2)] {
            // Rows in pairs a hair apart (the screen cannot order them), an all-zero row.
            let mut table: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            for r in (1..rows).step_by(2) {
                for k in 0..cols {
                    table[r * cols + k] = table[(r - 1) * cols + k] + rng.random_range(-1e-4..1e-4);
                }
            }
            table[(rows - 1) * cols..].fill(0.0);
            let mut x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            if n > 2 {
                x[cols] = f32::NAN;
            }
            let values = Table::values(&table[..], cols);
            let screen = Int8Rows::from_table(&values, &|| {}).unwrap();
            let exact = FloatRows::from_table(&values, &|| {}).unwrap();
            let int8 = int8_table(&table, rows, cols).unwrap();
            // The per-block sums of |code| the bound is made of.
            let blocks = cols.div_ceil(INT8_HEAD_BLOCK);
            for (r, codes) in int8.codes.chunks_exact(cols).enumerate() {
                let sums: Vec<u16> = codes
                    .chunks(INT8_HEAD_BLOCK)
                    .map(|b| b.iter().map(|c| u16::from(c.unsigned_abs())).sum())
                    .collect();
                assert_eq!(screen.code_sums[r * blocks..][..blocks], sums, "row {r}");
                let total: u32 = sums.iter().map(|&s| u32::from(s)).sum();
                assert_eq!(screen.totals[r], total, "row {r}");
            }
            let want = lm_head_screened(&x, n, &table, &int8).unwrap();
            let got = screen.screened_products(&exact, &x, n).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{rows} x {cols}, {n}"
            );
        }
        let screen = Int8Rows::from_table(&Table::values(&[1.0; 6][..], 2), &|| {}).unwrap();
        let other = FloatRows::from_table(&Table::values(&[1.0; 4][..], 2), &|| {}).unwrap();
        assert!(screen.screened_products(&other, &[1.0, 2.0], 1).is_err());
    }

    #[test]
    fn quantizes_as_the_reference_on_every_kernel() {
        let mut rng = SmallRng::seed_from_u64(25);
        for len in [1, 7, 8, 31, 32, 33, 100, 128] {
            let mut cases: Vec<Vec<f32>> = vec![
                (0..len).map(|_| rng.random_range(-3.0..3.0)).collect(),
                // Ties at .5 after scaling by 127 / 127.
                (0..len).map(|i| (i as f32 - 40.0) * 0.5).collect(),
                vec![0.0; len],
                vec![-0.0; len],
            ];
            cases[1][0] = 127.0;
            for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut v = cases[0].clone();
                v[len / 2] = special;
                cases.push(v);
                let mut zeros = vec![0.0; len];
                zeros[len - 1] = special;
                cases.push(zeros);
            }
            for values in cases {
                let mut want = vec![0i8; len];
                let scale = quantize_int8(&values, &mut want);
                for kernel in Kernel::available() {
                    let mut got = vec![5i8; len];
                    let s = kernel.quantize_int8(&values, &mut got);
                    assert_eq!(
                        (s.to_bits(), &got),
                        (scale.to_bits(), &want),
                        "{kernel:?} {values:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn close_to_the_float_products() {
        // The quantization error of a logit is a small part of the sum of |x_k * w_k|.
        let mut rng = SmallRng::seed_from_u64(22);
        let (rows, cols) = (50, 300);
        let table: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let fast = Int8Rows::from_table(&Table::values(&table[..], cols), &|| {}).unwrap();
        let got = fast.products(&x, 1).unwrap();
        for (r, w) in table.chunks_exact(cols).enumerate() {
            let exact: f32 = x.iter().zip(w).map(|(a, b)| a * b).sum();
            let bound: f32 = x.iter().zip(w).map(|(a, b)| (a * b).abs()).sum();
            assert!((got[r] - exact).abs() < 0.01 * bound, "row {r}");
        }
    }

    #[test]
    fn a_stored_f16_table_quantizes_as_its_values() {
        let mut rng = SmallRng::seed_from_u64(23);
        let (rows, cols) = (70, 130);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| half::f16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
            .collect();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let stored = Table::stored("t", FloatType::F16, &bytes, rows, cols).unwrap();
        let released = std::cell::Cell::new(0);
        let from_file =
            Int8Rows::from_table(&stored, &|| released.set(released.get() + 1)).unwrap();
        assert_eq!(released.get(), 1);
        let from_values = Int8Rows::from_table(&Table::values(&values[..], cols), &|| {});
        assert_eq!(from_file, from_values.unwrap());
        // Codes, then per row a scale, a sum of |code| per 128 columns and in all.
        assert_eq!(from_file.bytes(), 5 * LANES * (256 + 4 + 2 * 2 + 4));
        assert!(from_file.products(&[1.0; 129], 1).is_err());
    }

    impl Int8Rows {
        /// [`Int8Rows::products`] on `kernel`.
        fn products_on(&self, kernel: Kernel, x: &[f32], n: usize) -> Vec<f32> {
            let acts = Activations::new(x, n, self.cols);
            let padded = acts.padded;
            let mut y = vec![0.0; n * self.rows];
            for r in 0..self.rows {
                let (g, lane) = (r / LANES, r % LANES);
                let group = &self.values[g * LANES * padded..][..LANES * padded];
                for m in 0..n {
                    let sums = kernel.int8_lanes(group, &acts, m);
                    y[m * self.rows + r] = sums[lane] * self.scales[r];
                }
            }
            y
        }
    }
}
