//! The BitLinear product with the weights kept packed: [`PackedMatrix::matmul`] equals
//! [`crate::cpu::ternary_matmul`] (no bias) bit for bit.

use super::{Kernel, for_each_chunk, items_per_task, populate};
use crate::cpu::{QuantizedActivations, TernaryWeights};
use crate::packing::i2s::{self, BlockRows};
use crate::{Error, Result};
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Weights per block of the I2_S layout.
const BLOCK: usize = 128;
/// Bytes per block.
const BLOCK_BYTES: usize = BLOCK / 4;
/// The longest row the exact i32 sums allow, as [`crate::cpu::ternary_matmul_acc`]:
/// `dot(x, w + 1)` adds up to `128 * 2` per weight.
const MAX_COLS: usize = i32::MAX as usize / 256;
/// Activation rows that share one pass over a weight row (one decoded block of weights feeds
/// this many dot products).
const TOKENS: usize = 4;
/// Weight bytes a task reads at least, so that small matrices are not split over threads.
const TASK_BYTES: usize = 64 << 10;

/// A ternary matrix `[rows, cols]` packed 2 bits per weight, each row in whole I2_S blocks
/// ([`crate::packing::i2s`]: byte `j` of a block holds weights `j`, `32 + j`, `64 + j`, `96 + j`
/// plus one, so that shifting a 32-byte vector by 6, 4, 2 and 0 bits gives the four quarters of
/// the block in order), padded with zero codes; one scale per row.
///
/// ```
/// use bitnet_wgpu::cpu::fast::PackedMatrix;
/// use bitnet_wgpu::cpu::{TernaryWeights, act_quant, ternary_matmul};
/// let w = TernaryWeights { rows: 2, cols: 3, codes: vec![1, 0, -1, -1, 1, 1], scales: vec![0.5] };
/// let x = act_quant(&[0.5, -1.0, 2.0], 1, 3)?;
/// let packed = PackedMatrix::new(&[&w])?;
/// assert_eq!(packed.matmul(&x)?, ternary_matmul(&x, &w, None)?);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// Bytes per row: `cols` rounded up to whole blocks, 4 weights per byte.
    row_bytes: usize,
    bytes: Vec<u8>,
    /// `W ≈ code / scale`, one per row.
    scales: Vec<f32>,
}

impl PackedMatrix {
    /// Packs the matrices `parts` (same `cols`) stacked one below the other: one product then
    /// gives all their outputs side by side (q, k and v, or gate and up, read the same input).
    pub fn new(parts: &[&TernaryWeights]) -> Result<Self> {
        let cols = parts.first().map_or(0, |w| w.cols);
        check_cols(cols)?;
        let padded = cols.div_ceil(BLOCK) * BLOCK;
        let rows: usize = parts.iter().map(|w| w.rows).sum();
        let mut codes = vec![0i8; rows * padded];
        let mut scales = Vec::with_capacity(rows);
        let mut dst = codes.chunks_exact_mut(padded);
        for w in parts {
            let scale_count = if w.scales.len() == 1 { 1 } else { w.rows };
            if w.cols != cols || w.codes.len() != w.rows * cols || w.scales.len() != scale_count {
                return Err(Error::shape(
                    "packed ternary part",
                    format!("{} x {cols} codes with 1 or {} scales", w.rows, w.rows),
                    format!("{} codes, {} scales", w.codes.len(), w.scales.len()),
                ));
            }
            for (r, src) in w.codes.chunks_exact(cols).enumerate() {
                dst.next().expect("one padded row per row")[..cols].copy_from_slice(src);
                scales.push(w.scales[if scale_count == 1 { 0 } else { r }]);
            }
        }
        // The I2_S trailer (its one scale) is not kept: the scales live per row here.
        let mut bytes = i2s::pack(&codes, 1.0)?;
        bytes.truncate(codes.len() / 4);
        Ok(PackedMatrix {
            rows,
            cols,
            row_bytes: padded / 4,
            bytes,
            scales,
        })
    }

    /// The matrices `parts` (rows of whole I2_S blocks, the same `cols`, each with its scale
    /// `W ≈ code / scale`) stacked as [`PackedMatrix::new`] stacks them. Their bytes are this
    /// layout already: they are copied, not decoded, and the matrix equals the one
    /// [`PackedMatrix::new`] makes of the same codes and scales.
    ///
    /// ```
    /// use bitnet_wgpu::cpu::TernaryWeights;
    /// use bitnet_wgpu::cpu::fast::PackedMatrix;
    /// use bitnet_wgpu::packing::i2s::{BlockRows, pack};
    /// let codes: Vec<i8> = (0..256).map(|i| (i % 3) as i8 - 1).collect();
    /// let bytes = pack(&codes, 1.0)?;
    /// let rows = BlockRows::new(&bytes[..64], 2, 128)?;
    /// let w = TernaryWeights { rows: 2, cols: 128, codes, scales: vec![4.0] };
    /// assert_eq!(PackedMatrix::from_blocks(&[(rows, 4.0)])?, PackedMatrix::new(&[&w])?);
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub fn from_blocks(parts: &[(BlockRows<'_>, f32)]) -> Result<Self> {
        let cols = parts.first().map_or(0, |(w, _)| w.cols());
        check_cols(cols)?;
        let rows: usize = parts.iter().map(|(w, _)| w.rows()).sum();
        let mut bytes = Vec::with_capacity(rows * cols / 4);
        populate(bytes.as_ptr(), bytes.capacity());
        let mut scales = Vec::with_capacity(rows);
        for (w, scale) in parts {
            if w.cols() != cols {
                return Err(Error::shape("packed ternary part columns", cols, w.cols()));
            }
            bytes.extend_from_slice(w.bytes());
            scales.extend(std::iter::repeat_n(*scale, w.rows()));
        }
        Ok(PackedMatrix {
            rows,
            cols,
            row_bytes: cols / 4,
            bytes,
            scales,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: the packed codes and the scales.
    pub fn bytes(&self) -> usize {
        self.bytes.len() + 4 * self.scales.len()
    }

    /// The exact products `acc[m, n] = sum_k x[m, k] * w[n, k]`, `[x.rows, rows]`: equal to
    /// [`crate::cpu::ternary_matmul_acc`] of the unpacked weights.
    pub fn matmul_acc(&self, x: &QuantizedActivations) -> Result<Vec<i32>> {
        self.matmul_acc_on(Kernel::detect(), x)
    }

    fn matmul_acc_on(&self, kernel: Kernel, x: &QuantizedActivations) -> Result<Vec<i32>> {
        // dot(x, w + 1) - sum(x) = dot(x, w).
        let [acc] = self.products_by_token(kernel, x, [self.rows], |products, i, _, out| {
            let sum = x.sums[i];
            for (o, &d) in out.iter_mut().zip(products) {
                o.write(d - sum);
            }
        })?;
        Ok(acc)
    }

    /// The BitLinear output `y[m, n] = acc[m, n] / (x.scales[m] * scale[n])`, `[x.rows, rows]`:
    /// equal to [`crate::cpu::ternary_matmul`] without bias, bit for bit.
    pub fn matmul(&self, x: &QuantizedActivations) -> Result<Vec<f32>> {
        let [y] = self.matmul_split(x, [self.rows])?;
        Ok(y)
    }

    /// [`PackedMatrix::matmul`] of a stacked matrix, each part of the output apart: `widths`
    /// (rows of each part, in order, summing to [`PackedMatrix::rows`]) give `[x.rows, width]`
    /// each, written where they go rather than split from the whole.
    ///
    /// ```
    /// use bitnet_wgpu::cpu::{QuantizedActivations, TernaryWeights};
    /// use bitnet_wgpu::cpu::fast::PackedMatrix;
    /// let w = |codes: Vec<i8>| TernaryWeights { rows: codes.len() / 2, cols: 2, codes, scales: vec![1.0] };
    /// let stacked = PackedMatrix::new(&[&w(vec![1, 0, 0, -1]), &w(vec![1, 1])])?;
    /// let x = QuantizedActivations { rows: 1, cols: 2, codes: vec![3, 4], scales: vec![1.0], sums: vec![7] };
    /// let [a, b] = stacked.matmul_split(&x, [2, 1])?;
    /// assert_eq!((a, b), (vec![3.0, -4.0], vec![7.0]));
    /// assert!(stacked.matmul_split(&x, [1, 1]).is_err());
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub fn matmul_split<const N: usize>(
        &self,
        x: &QuantizedActivations,
        widths: [usize; N],
    ) -> Result<[Vec<f32>; N]> {
        self.products_by_token(Kernel::detect(), x, widths, |products, i, first, out| {
            let (sum, scale) = (x.sums[i], x.scales[i]);
            let scales = &self.scales[first..][..out.len()];
            // Whole slices, no index per value: the loop runs a vector at a time.
            for ((o, &d), &s) in out.iter_mut().zip(products).zip(scales) {
                o.write((d - sum) as f32 / (scale * s));
            }
        })
    }

    /// For each part of `widths` rows (summing to `rows`), `[x.rows, width]` from `f(products,
    /// i, n, out)`, which writes `out[j]` from `products[j] = dot(x_i, w_{n + j} + 1)` for a run
    /// of rows from `n`: the products in tasks over weight rows, each reading its rows once for
    /// all the tokens, into this thread's scratch (part `p` holds rows `p * per_task..` as
    /// `[x.rows, rows of the part]`), then laid out token by token in tasks over tokens.
    fn products_by_token<T: Send, const N: usize>(
        &self,
        kernel: Kernel,
        x: &QuantizedActivations,
        widths: [usize; N],
        f: impl Fn(&[i32], usize, usize, &mut [MaybeUninit<T>]) + Sync,
    ) -> Result<[Vec<T>; N]> {
        if widths.iter().sum::<usize>() != self.rows {
            return Err(Error::shape(
                "parts of a packed ternary matmul",
                format!("{} rows in all", self.rows),
                format!("{widths:?}"),
            ));
        }
        thread_local! {
            /// Products of the last call, kept: a prompt's are megabytes per product, and a
            /// fresh zeroed allocation each time cost page faults or a `memset`.
            static PARTS: std::cell::Cell<Vec<i32>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut parts = PARTS.take();
        let per_task = self.row_products(kernel, x, &mut parts)?;
        let mut first = 0;
        let out = widths.map(|width| {
            first += width;
            self.by_token(&parts, per_task, x.rows, first - width..first, &f)
        });
        PARTS.set(parts);
        Ok(out)
    }

    /// `dot(x_i, w_n + 1)` for every weight row `n` and token `i` into `parts` (see
    /// [`PackedMatrix::products_by_token`]); returns the rows per task.
    fn row_products(
        &self,
        kernel: Kernel,
        x: &QuantizedActivations,
        parts: &mut Vec<i32>,
    ) -> Result<usize> {
        self.check(x)?;
        let (m, padded) = (x.rows, self.row_bytes * 4);
        let per_task = items_per_task(self.rows, self.row_bytes * m.div_ceil(TOKENS), TASK_BYTES);
        if m == 0 {
            return Ok(per_task);
        }
        // Activations padded with zeros to whole blocks, as the weights are (a copy only where
        // the rows are not whole blocks already).
        let codes = if x.cols == padded {
            Cow::Borrowed(&x.codes[..])
        } else {
            let mut codes = vec![0i8; m * padded];
            for (dst, src) in codes
                .chunks_exact_mut(padded)
                .zip(x.codes.chunks_exact(x.cols))
            {
                dst[..x.cols].copy_from_slice(src);
            }
            Cow::Owned(codes)
        };
        // Every value is written by the kernels: old values need no clearing.
        parts.resize(self.rows * m, 0);
        for_each_chunk(parts, per_task * m, |task, out| {
            let rows = out.len() / m;
            let w = &self.bytes[task * per_task * self.row_bytes..][..rows * self.row_bytes];
            kernel.products(w, &codes, padded, out);
        });
        Ok(per_task)
    }

    /// `[m, rows.len()]` from [`PackedMatrix::row_products`]'s parts by `f` (as
    /// [`PackedMatrix::products_by_token`] calls it), in tasks over tokens, written once each
    /// (the output is never zeroed first).
    fn by_token<T: Send>(
        &self,
        parts: &[i32],
        per_task: usize,
        m: usize,
        rows: Range<usize>,
        f: &(impl Fn(&[i32], usize, usize, &mut [MaybeUninit<T>]) + Sync),
    ) -> Vec<T> {
        let width = rows.len();
        let len = m * width;
        let mut out = Vec::with_capacity(len);
        if len == 0 {
            return out;
        }
        let tokens_per_task = items_per_task(m, width, TASK_BYTES / 4);
        for_each_chunk(
            &mut out.spare_capacity_mut()[..len],
            tokens_per_task * width,
            |task, out| {
                for (i, mut out) in (task * tokens_per_task..).zip(out.chunks_exact_mut(width)) {
                    // The runs of `rows` that lie in one task's part each.
                    let mut n = rows.start;
                    while n < rows.end {
                        let start = n / per_task * per_task;
                        let part_rows = per_task.min(self.rows - start);
                        let run = rows.end.min(start + part_rows) - n;
                        let part = &parts[start * m..][..part_rows * m];
                        let (head, tail) = out.split_at_mut(run);
                        f(&part[i * part_rows + n - start..][..run], i, n, head);
                        (out, n) = (tail, n + run);
                    }
                }
            },
        );
        // SAFETY: the chunks cover `out[..len]`, and `f` writes every element of each.
        unsafe { out.set_len(len) };
        out
    }

    fn check(&self, x: &QuantizedActivations) -> Result<()> {
        if x.cols != self.cols {
            return Err(Error::shape(
                "packed ternary matmul inner dimension",
                self.cols,
                x.cols,
            ));
        }
        let rows_ok = |len: usize, per_row: usize| x.rows.checked_mul(per_row) == Some(len);
        if !rows_ok(x.codes.len(), x.cols)
            || !rows_ok(x.scales.len(), 1)
            || !rows_ok(x.sums.len(), 1)
        {
            return Err(Error::shape(
                "packed ternary matmul activations",
                format!(
                    "{} rows of {} codes, a scale and a sum each",
                    x.rows, x.cols
                ),
                format!(
                    "{} codes, {} scales, {} sums",
                    x.codes.len(),
                    x.scales.len(),
                    x.sums.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Errors unless `cols` is a row length the products can take.
fn check_cols(cols: usize) -> Result<()> {
    if cols == 0 {
        return Err(Error::Empty("packed ternary matrix"));
    }
    if cols > MAX_COLS {
        return Err(Error::invalid(
            "packed ternary matrix columns",
            format!("{cols} exceeds the i32-safe maximum {MAX_COLS}"),
        ));
    }
    Ok(())
}

impl Kernel {
    /// `out[t * rows + r] = dot(x_t, w_r + 1)` for the `rows` packed weight rows `w` (each
    /// `padded / 4` bytes) and the activation rows `xs` (each `padded` codes).
    fn products(self, w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        match self {
            Kernel::Portable => row_by_row(w, xs, padded, out, portable_dots),
            // SAFETY: AVX2 is present (`Kernel::detect`); the slices are whole blocks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => row_by_row(w, xs, padded, out, |w, xs, padded, out| unsafe {
                avx2::dots(w, xs, padded, out)
            }),
            // SAFETY: AVX-512 VNNI is present (`Kernel::detect`); the slices are whole blocks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni if xs.len() >= vnni::TILE_TOKENS * padded => unsafe {
                vnni::products(w, xs, padded, out)
            },
            // One token (a decoding step): every row of the task in one call, four at a time.
            // SAFETY: as above; the rows are short enough for the kernel's i32 lanes.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni if xs.len() == padded && padded <= vnni::FEW_MAX_COLS => unsafe {
                vnni::one_token(w, xs, out)
            },
            // Fewer tokens (a few sequences decoding together): the weights stream from
            // memory, and one row at a time streams them faster than tiles of four.
            // SAFETY: as above; the rows are short enough for the kernel's i32 lanes.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni if padded <= vnni::FEW_MAX_COLS => {
                row_by_row(w, xs, padded, out, |w, xs, padded, out| unsafe {
                    vnni::few_dots(w, xs, padded, out)
                })
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => Kernel::Avx2.products(w, xs, padded, out),
        }
    }
}

/// [`Kernel::products`] one weight row at a time, [`TOKENS`] activation rows per pass over it.
fn row_by_row(
    w: &[u8],
    xs: &[i8],
    padded: usize,
    out: &mut [i32],
    dots: impl Fn(&[u8], &[i8], usize, &mut [i32]),
) {
    let rows = w.len() / (padded / 4);
    for (r, w) in w.chunks_exact(padded / 4).enumerate() {
        for (t, xs) in xs.chunks(TOKENS * padded).enumerate() {
            let mut sums = [0i32; TOKENS];
            let sums = &mut sums[..xs.len() / padded];
            dots(w, xs, padded, sums);
            for (i, &d) in sums.iter().enumerate() {
                out[(t * TOKENS + i) * rows + r] = d;
            }
        }
    }
}

/// `out[t] = dot(x_t, w + 1)` in plain Rust, block by block.
fn portable_dots(w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(padded)) {
        let mut acc = 0i32;
        for (block, x) in w.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
            for (j, &b) in block.iter().enumerate() {
                for (lane, shift) in [6, 4, 2, 0].into_iter().enumerate() {
                    let stored = i32::from((b >> shift) & 3);
                    acc += stored * i32::from(x[lane * BLOCK_BYTES + j]);
                }
            }
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, BLOCK_BYTES, TOKENS};
    use std::arch::x86_64::*;

    /// `out[t] = dot(x_t, w + 1)` with `vpmaddubsw`: the stored values `w + 1` in 0..=2 are the
    /// unsigned operand, the int8 codes the signed one. A pair sums to at most 2 * 2 * 128 and
    /// four quarters to 2048 in magnitude, far inside i16; `vpmaddwd` widens to i32 per block.
    ///
    /// # Safety
    /// AVX2 must be present; `w` is whole blocks and `xs` holds `out.len()` rows of `padded`
    /// (= 4 * `w.len()`) codes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dots(w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        debug_assert!(out.len() <= TOKENS && xs.len() == out.len() * padded);
        debug_assert_eq!(w.len() * 4, padded);
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); TOKENS];
        let tokens = out.len();
        for (b, block) in w.chunks_exact(BLOCK_BYTES).enumerate() {
            // SAFETY: 32 readable bytes.
            let packed = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
            let quarters = [
                _mm256_and_si256(_mm256_srli_epi16::<6>(packed), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask),
                _mm256_and_si256(_mm256_srli_epi16::<2>(packed), mask),
                _mm256_and_si256(packed, mask),
            ];
            for (t, acc) in acc.iter_mut().enumerate().take(tokens) {
                let x = xs[t * padded + b * BLOCK..][..BLOCK].as_ptr();
                // SAFETY: the block's 128 codes are in bounds (sliced above).
                let load = |q: usize| unsafe { _mm256_loadu_si256(x.add(q * 32).cast()) };
                let s01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(quarters[0], load(0)),
                    _mm256_maddubs_epi16(quarters[1], load(1)),
                );
                let s23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(quarters[2], load(2)),
                    _mm256_maddubs_epi16(quarters[3], load(3)),
                );
                let s = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones);
                *acc = _mm256_add_epi32(*acc, s);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            let half = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256::<1>(acc),
            );
            let pairs = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
            *o = _mm_cvtsi128_si32(_mm_add_epi32(
                pairs,
                _mm_shuffle_epi32::<0b10_11_00_01>(pairs),
            ));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// Weight rows per tile: their decoded quarters stay in registers while each token's
    /// activations meet all of them.
    const ROWS: usize = 4;
    /// Tokens per tile: each decoded quarter of weights feeds this many products.
    pub(super) const TOKENS: usize = 4;
    /// Weight rows whose bytes (at most 640 to 1728 per row at 2B4T shapes) stay in L2 while
    /// every group of tokens passes over them; the group's activations stay in L1 meanwhile.
    const PANEL: usize = 64;

    /// [`super::Kernel::products`] in tiles of [`ROWS`] weight rows by [`TOKENS`] tokens, each
    /// tile's `ROWS * TOKENS` sums in i32 lanes of `vpdpbusd` (the stored values `w + 1` in 0..=2
    /// the unsigned bytes, the codes the signed ones; exact, as every partial sum is far inside
    /// i32: [`super::MAX_COLS`]).
    ///
    /// # Safety
    /// AVX2, AVX-512F, AVX-512VL and AVX-512 VNNI must be present; `w` is whole rows of
    /// `padded / 4` bytes, `xs` whole rows of `padded` codes, `out` one sum per pair.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn products(w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        let (row_bytes, m) = (padded / 4, xs.len() / padded);
        let all_rows = w.len() / row_bytes;
        debug_assert_eq!(out.len(), all_rows * m);
        for (p, panel) in w.chunks(PANEL * row_bytes).enumerate() {
            let panel_rows = panel.len() / row_bytes;
            for t0 in (0..m).step_by(TOKENS) {
                let tokens = TOKENS.min(m - t0);
                let xs = &xs[t0 * padded..][..tokens * padded];
                for r0 in (0..panel_rows).step_by(ROWS) {
                    let rows = ROWS.min(panel_rows - r0);
                    let w = &panel[r0 * row_bytes..][..rows * row_bytes];
                    let mut sums = [[0i32; TOKENS]; ROWS];
                    // SAFETY: the features are present; the slices are whole rows.
                    unsafe {
                        if rows == ROWS {
                            tiles::<ROWS>(tokens, w, xs, padded, &mut sums)
                        } else {
                            tiles::<1>(tokens, w, xs, padded, &mut sums)
                        }
                    }
                    for (r, sums) in sums.iter().enumerate().take(rows) {
                        for (t, &d) in sums.iter().enumerate().take(tokens) {
                            out[(t0 + t) * all_rows + p * PANEL + r0 + r] = d;
                        }
                    }
                }
            }
        }
    }

    /// Tokens from which the tiles take over from [`few_dots`] (which takes up to 4 at a time,
    /// [`super::TOKENS`]): 2B4T's products for 5 / 6 / 7 tokens took 89 / 97 / 106 ms in
    /// tiles against 104 / 129 / 148 ms in [`few_dots`]; 4 tokens 73 ms there (measured).
    pub(super) const TILE_TOKENS: usize = 5;

    /// How far ahead of its block [`few_dots`] asks for a row's bytes.
    const PREFETCH_BYTES: usize = 4096;

    /// The longest rows [`few_dots`] sums exactly: a lane of one of its accumulators adds four
    /// products of at most `(3 << 6) * 128` per block of 128 codes.
    pub(super) const FEW_MAX_COLS: usize = i32::MAX as usize / 768;

    /// `out[t] = dot(x_t, w + 1)` for 1 to 4 tokens, one weight row.
    /// Each quarter of a block is masked where it lies (its stored values times 64, 16, 4 or 1)
    /// instead of shifted down, and summed into an accumulator of its own, divided back at the
    /// end (exactly: every product is a multiple of the quarter's factor): a block costs 4
    /// `vpand` and 4 `vpdpbusd` per token.
    ///
    /// # Safety
    /// As [`products`]; `w` is one row, `xs` holds `out.len()` (1 to 4) rows, `padded` is at
    /// most [`FEW_MAX_COLS`].
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn few_dots(w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        debug_assert!(padded <= FEW_MAX_COLS && w.len() * 4 == padded);
        debug_assert_eq!(xs.len(), out.len() * padded);
        // SAFETY: as the caller's.
        unsafe {
            match out.len() {
                1 => few::<1>(w, xs, padded, out),
                2 => few::<2>(w, xs, padded, out),
                3 => few::<3>(w, xs, padded, out),
                _ => few::<4>(w, xs, padded, out),
            }
        }
    }

    /// `out[r] = dot(x, w_r + 1)` for every row `r` of `w` and the one token `x`, as
    /// [`few_dots`] computes each (quarters masked in place), four rows side by side: sixteen
    /// chains of `vpdpbusd` in flight instead of four, four streams of weights, each block of
    /// `x` loaded once for all, and no call per row.
    ///
    /// # Safety
    /// As [`products`]; `x` is one row of `w.len() / out.len() * 4` codes, at most
    /// [`FEW_MAX_COLS`].
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn one_token(w: &[u8], x: &[i8], out: &mut [i32]) {
        let row_bytes = x.len() / 4;
        debug_assert!(x.len() <= FEW_MAX_COLS && w.len() == out.len() * row_bytes);
        let masks = [0xc0u8, 0x30, 0x0c, 0x03].map(|m| _mm256_set1_epi8(m as i8));
        // The rows of a step come from the four quarters of `w`, so that each quarter streams
        // from memory in order: neighbouring rows side by side, each stream skipping every
        // other row, ran at half the speed (the prefetchers lost them).
        const S: usize = 4;
        let part = out.len() / S;
        for i in 0..part {
            let mut acc = [[_mm256_setzero_si256(); 4]; S];
            for k in 0..row_bytes / BLOCK_BYTES {
                // SAFETY: block `k` of each row, and of `x`, lie inside them.
                let packed: [__m256i; S] = std::array::from_fn(|p| unsafe {
                    _mm256_loadu_si256(
                        w.as_ptr()
                            .add((p * part + i) * row_bytes + k * BLOCK_BYTES)
                            .cast(),
                    )
                });
                for (q, &mask) in masks.iter().enumerate() {
                    // SAFETY: as above.
                    let x =
                        unsafe { _mm256_loadu_si256(x.as_ptr().add(k * BLOCK + q * 32).cast()) };
                    for (acc, &packed) in acc.iter_mut().zip(&packed) {
                        acc[q] = _mm256_dpbusd_epi32(acc[q], _mm256_and_si256(packed, mask), x);
                    }
                }
            }
            for (p, &acc) in acc.iter().enumerate() {
                out[p * part + i] = quarters_total(acc);
            }
        }
        for last in S * part..out.len() {
            // SAFETY: as the caller's; the rows left.
            unsafe {
                few::<1>(
                    &w[last * row_bytes..][..row_bytes],
                    x,
                    x.len(),
                    &mut out[last..last + 1],
                )
            };
        }
    }

    /// [`few_dots`] for `T` tokens.
    ///
    /// # Safety
    /// As [`few_dots`], with `out.len() == T`.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn few<const T: usize>(w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        let masks = [0xc0u8, 0x30, 0x0c, 0x03].map(|m| _mm256_set1_epi8(m as i8));
        let mut acc = [[_mm256_setzero_si256(); 4]; T];
        for (b, block) in w.chunks_exact(BLOCK_BYTES).enumerate() {
            // With more than one token a block's loop is long enough that too few loads of
            // weights are in flight to keep the memory busy (3 tokens: 105 against 65 ms for
            // 2B4T's products, measured); one token's loop needs no help. An address past
            // the end is never read.
            if T > 1 {
                let ahead = block.as_ptr().wrapping_add(PREFETCH_BYTES);
                _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
            }
            // SAFETY: 32 readable bytes.
            let packed = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
            for (q, &mask) in masks.iter().enumerate() {
                let quarter = _mm256_and_si256(packed, mask);
                for (t, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: token `t`'s codes of block `b` lie inside `xs`.
                    let x = unsafe {
                        _mm256_loadu_si256(xs.as_ptr().add(t * padded + b * BLOCK + q * 32).cast())
                    };
                    acc[q] = _mm256_dpbusd_epi32(acc[q], quarter, x);
                }
            }
        }
        for (o, &acc) in out.iter_mut().zip(&acc) {
            *o = quarters_total(acc);
        }
    }

    /// The sum of the four quarters' accumulators (values x64, x16, x4, x1), each scaled back.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn quarters_total(acc: [__m256i; 4]) -> i32 {
        sum_lanes(_mm256_add_epi32(
            _mm256_add_epi32(
                _mm256_srai_epi32::<6>(acc[0]),
                _mm256_srai_epi32::<4>(acc[1]),
            ),
            _mm256_add_epi32(_mm256_srai_epi32::<2>(acc[2]), acc[3]),
        ))
    }

    /// [`tile`] for `tokens` (1 to [`TOKENS`]) activation rows.
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn tiles<const R: usize>(
        tokens: usize,
        w: &[u8],
        xs: &[i8],
        padded: usize,
        sums: &mut [[i32; TOKENS]; ROWS],
    ) {
        // SAFETY: as the caller's.
        unsafe {
            match tokens {
                1 => tile::<R, 1>(w, xs, padded, sums),
                2 => tile::<R, 2>(w, xs, padded, sums),
                3 => tile::<R, 3>(w, xs, padded, sums),
                _ => tile::<R, 4>(w, xs, padded, sums),
            }
        }
    }

    /// The sums of `R` weight rows (or, where `w` holds fewer, one row after another) with `T`
    /// activation rows, into `sums[r][t]`.
    ///
    /// # Safety
    /// As [`products`]; `xs` holds `T` rows.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        w: &[u8],
        xs: &[i8],
        padded: usize,
        sums: &mut [[i32; TOKENS]; ROWS],
    ) {
        let row_bytes = padded / 4;
        debug_assert!(xs.len() == T * padded);
        for (group, w) in w.chunks(R * row_bytes).enumerate() {
            debug_assert_eq!(w.len(), R * row_bytes);
            let mask = _mm256_set1_epi8(3);
            let mut acc = [[_mm256_setzero_si256(); T]; R];
            for b in 0..row_bytes / BLOCK_BYTES {
                // The next group's rows, a cache line of each per two blocks: the first tokens
                // to meet a panel wait for memory otherwise (8 tokens: 175 against 115 ms for
                // 2B4T's products, measured). An address past the end is never read.
                if b % 2 == 0 {
                    for r in R..2 * R {
                        let ahead = w.as_ptr().wrapping_add(r * row_bytes + b * BLOCK_BYTES);
                        _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                    }
                }
                // SAFETY: each row's block `b` is 32 bytes inside `w`.
                let packed: [__m256i; R] = std::array::from_fn(|r| unsafe {
                    _mm256_loadu_si256(w.as_ptr().add(r * row_bytes + b * BLOCK_BYTES).cast())
                });
                for q in 0..4 {
                    let quarter: [__m256i; R] = std::array::from_fn(|r| {
                        let shifted = match q {
                            0 => _mm256_srli_epi16::<6>(packed[r]),
                            1 => _mm256_srli_epi16::<4>(packed[r]),
                            2 => _mm256_srli_epi16::<2>(packed[r]),
                            _ => packed[r],
                        };
                        _mm256_and_si256(shifted, mask)
                    });
                    for t in 0..T {
                        // SAFETY: token `t`'s quarter `q` of block `b` is inside `xs`.
                        let x = unsafe {
                            _mm256_loadu_si256(
                                xs.as_ptr().add(t * padded + b * BLOCK + q * 32).cast(),
                            )
                        };
                        for (acc, &quarter) in acc.iter_mut().zip(&quarter) {
                            acc[t] = _mm256_dpbusd_epi32(acc[t], quarter, x);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (t, &acc) in acc.iter().enumerate() {
                    sums[group * R + r][t] = sum_lanes(acc);
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn sum_lanes(acc: __m256i) -> i32 {
        let half = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256::<1>(acc),
        );
        let pairs = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
        _mm_cvtsi128_si32(_mm_add_epi32(
            pairs,
            _mm_shuffle_epi32::<0b10_11_00_01>(pairs),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{
        ScaleGranularity, WeightQuantOptions, act_quant, ternary_matmul, ternary_matmul_acc,
        weight_quant,
    };
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn weights(rng: &mut SmallRng, rows: usize, cols: usize, per_channel: bool) -> TernaryWeights {
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let granularity = if per_channel {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        };
        let opts = WeightQuantOptions {
            granularity,
            threshold: 0.5,
        };
        weight_quant(&w, rows, cols, opts).unwrap()
    }

    #[test]
    fn equals_the_reference_on_awkward_shapes() {
        let mut rng = SmallRng::seed_from_u64(17);
        for (m, n, k) in [
            (1, 1, 1),
            (1, 7, 127),
            (3, 5, 128),
            (5, 9, 129),
            (9, 33, 300),
            (4, 3, 1000),
            (2, 600, 256),
        ] {
            let w = weights(&mut rng, n, k, n % 2 == 1);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
            let x = act_quant(&x, m, k).unwrap();
            let packed = PackedMatrix::new(&[&w]).unwrap();
            assert_eq!(
                packed.matmul_acc(&x).unwrap(),
                ternary_matmul_acc(&x, &w).unwrap(),
                "{m} x {k} -> {n}"
            );
            let (fast, reference) = (
                packed.matmul(&x).unwrap(),
                ternary_matmul(&x, &w, None).unwrap(),
            );
            assert_eq!(fast.len(), reference.len());
            for (a, b) in fast.iter().zip(&reference) {
                assert_eq!(a.to_bits(), b.to_bits(), "{m} x {k} -> {n}");
            }
        }
    }

    #[test]
    fn every_kernel_equals_the_reference_on_tile_edges() {
        // Token counts around the tiles' 4, row counts around the tiles' 4 and the panels' 64,
        // and around the one-token kernel's 4 streams.
        let mut rng = SmallRng::seed_from_u64(29);
        for (m, n, k) in [
            (1, 1, 256),
            (1, 3, 640),
            (1, 4, 128),
            (1, 11, 520),
            (1, 203, 2560),
            (2, 7, 900),
            (3, 5, 384),
            (4, 9, 300),
            (7, 3, 1000),
            (6, 67, 130),
            (9, 130, 512),
            (17, 8, 128),
        ] {
            let w = weights(&mut rng, n, k, true);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
            let x = act_quant(&x, m, k).unwrap();
            let packed = PackedMatrix::new(&[&w]).unwrap();
            let want = ternary_matmul_acc(&x, &w).unwrap();
            for kernel in Kernel::available() {
                let got = packed.matmul_acc_on(kernel, &x).unwrap();
                assert_eq!(got, want, "{kernel:?}: {m} x {k} -> {n}");
            }
        }
    }

    #[test]
    fn extreme_codes_are_exact_on_every_kernel() {
        // Codes of -128 and 127 against all-(+1) and all-(-1) rows: the largest sums the i16
        // pairs and the i32 accumulators see.
        let k = 1000;
        let rows = [
            vec![1i8; k],
            vec![-1; k],
            (0..k).map(|i| (i % 3) as i8 - 1).collect(),
        ];
        let w = TernaryWeights {
            rows: 3,
            cols: k,
            codes: rows.concat(),
            scales: vec![0.75],
        };
        let x = QuantizedActivations {
            rows: 2,
            cols: k,
            codes: [vec![-128i8; k], vec![127; k]].concat(),
            scales: vec![1.0, 2.0],
            sums: vec![-128 * k as i32, 127 * k as i32],
        };
        let packed = PackedMatrix::new(&[&w]).unwrap();
        let want = ternary_matmul_acc(&x, &w).unwrap();
        assert_eq!(want[..2], [-128_000, 128_000]);
        for kernel in Kernel::available() {
            assert_eq!(
                packed.matmul_acc_on(kernel, &x).unwrap(),
                want,
                "{kernel:?}"
            );
        }
    }

    #[test]
    fn stacked_parts_keep_their_scales() {
        let mut rng = SmallRng::seed_from_u64(3);
        let q = weights(&mut rng, 6, 40, false);
        let k = weights(&mut rng, 2, 40, true);
        let x = act_quant(
            &(0..120).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            3,
            40,
        )
        .unwrap();
        let stacked = PackedMatrix::new(&[&q, &k]).unwrap().matmul(&x).unwrap();
        let (yq, yk) = (
            ternary_matmul(&x, &q, None).unwrap(),
            ternary_matmul(&x, &k, None).unwrap(),
        );
        for m in 0..3 {
            assert_eq!(stacked[m * 8..m * 8 + 6], yq[m * 6..m * 6 + 6]);
            assert_eq!(stacked[m * 8 + 6..m * 8 + 8], yk[m * 2..m * 2 + 2]);
        }
    }

    #[test]
    fn split_outputs_are_the_whole_output_in_parts() {
        let mut rng = SmallRng::seed_from_u64(4);
        // 300 rows of 16384 columns: tasks of 64 rows, the parts' edges inside them.
        let cols = 16384;
        let (q, k, v) = (
            weights(&mut rng, 130, cols, false),
            weights(&mut rng, 37, cols, true),
            weights(&mut rng, 133, cols, false),
        );
        let stacked = PackedMatrix::new(&[&q, &k, &v]).unwrap();
        for m in [1, 2, 9] {
            let x = act_quant(
                &(0..m * cols)
                    .map(|i| (i as f32 * 0.37).sin())
                    .collect::<Vec<_>>(),
                m,
                cols,
            )
            .unwrap();
            let whole = stacked.matmul(&x).unwrap();
            let [a, b, c] = stacked.matmul_split(&x, [130, 37, 133]).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for t in 0..m {
                let row = &whole[t * 300..][..300];
                assert_eq!(bits(&a[t * 130..][..130]), bits(&row[..130]));
                assert_eq!(bits(&b[t * 37..][..37]), bits(&row[130..167]));
                assert_eq!(bits(&c[t * 133..][..133]), bits(&row[167..]));
            }
            let [none, all] = stacked.matmul_split(&x, [0, 300]).unwrap();
            assert!(none.is_empty() && bits(&all) == bits(&whole));
            assert!(stacked.matmul_split(&x, [130, 37, 132]).is_err());
        }
    }

    #[test]
    fn blocks_stack_into_what_codes_pack_into() {
        let mut rng = SmallRng::seed_from_u64(5);
        let (q, k) = (
            weights(&mut rng, 6, 256, false),
            weights(&mut rng, 2, 256, false),
        );
        let packed: Vec<Vec<u8>> = [&q, &k]
            .iter()
            .map(|w| i2s::pack(&w.codes, 1.0).unwrap())
            .collect();
        let blocks = |i: usize, w: &TernaryWeights| {
            let rows = BlockRows::new(&packed[i][..w.codes.len() / 4], w.rows, w.cols);
            (rows.unwrap(), w.scales[0])
        };
        let stacked = PackedMatrix::from_blocks(&[blocks(0, &q), blocks(1, &k)]).unwrap();
        assert_eq!(stacked, PackedMatrix::new(&[&q, &k]).unwrap());
        let narrow = BlockRows::new(&packed[0][..192], 6, 128).unwrap();
        assert!(PackedMatrix::from_blocks(&[blocks(0, &q), (narrow, 1.0)]).is_err());
        assert!(PackedMatrix::from_blocks(&[]).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut rng = SmallRng::seed_from_u64(1);
        let (a, b) = (
            weights(&mut rng, 2, 8, false),
            weights(&mut rng, 2, 9, false),
        );
        assert!(PackedMatrix::new(&[&a, &b]).is_err());
        assert!(PackedMatrix::new(&[]).is_err());
        let mut broken = a.clone();
        broken.codes.pop();
        assert!(PackedMatrix::new(&[&broken]).is_err());
        let packed = PackedMatrix::new(&[&a]).unwrap();
        assert!(packed.matmul(&act_quant(&[1.0; 9], 1, 9).unwrap()).is_err());
        let mut x = act_quant(&[1.0; 16], 2, 8).unwrap();
        x.sums.pop();
        assert!(packed.matmul(&x).is_err());
        assert_eq!(
            (packed.rows(), packed.cols(), packed.bytes()),
            (2, 8, 2 * 32 + 8)
        );
    }
}
