//! The BitLinear product with the weights kept packed: [`PackedMatrix::matmul`] equals
//! [`crate::cpu::ternary_matmul`] (no bias) bit for bit.

use super::{Kernel, for_each_chunk, items_per_task};
use crate::cpu::{QuantizedActivations, TernaryWeights};
use crate::packing::i2s::{self, BlockRows};
use crate::{Error, Result};

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
        self.check(x)?;
        let padded = self.row_bytes * 4;
        // Activations padded with zeros to whole blocks, as the weights are.
        let mut codes = vec![0i8; x.rows * padded];
        for (dst, src) in codes
            .chunks_exact_mut(padded)
            .zip(x.codes.chunks_exact(x.cols))
        {
            dst[..x.cols].copy_from_slice(src);
        }
        let m = x.rows;
        // Task by task over weight rows, each task filling its rows' columns of `by_row`
        // ([rows, m]), every weight row read once for all the tokens.
        let mut by_row = vec![0i32; self.rows * m];
        let per_task = items_per_task(self.rows, self.row_bytes * m.div_ceil(TOKENS), TASK_BYTES);
        let kernel = Kernel::detect();
        for_each_chunk(&mut by_row, per_task * m.max(1), |task, out| {
            let first = task * per_task;
            for (r, out) in out.chunks_exact_mut(m.max(1)).enumerate() {
                let w = &self.bytes[(first + r) * self.row_bytes..][..self.row_bytes];
                for (t, out) in out.chunks_mut(TOKENS).enumerate() {
                    let xs = &codes[t * TOKENS * padded..][..out.len() * padded];
                    kernel.dots(w, xs, padded, out);
                }
            }
        });
        // dot(x, w + 1) - sum(x) = dot(x, w).
        let mut acc = vec![0i32; m * self.rows];
        for (n, row) in by_row.chunks_exact(m.max(1)).enumerate() {
            for (i, &d) in row.iter().enumerate() {
                acc[i * self.rows + n] = d - x.sums[i];
            }
        }
        Ok(acc)
    }

    /// The BitLinear output `y[m, n] = acc[m, n] / (x.scales[m] * scale[n])`, `[x.rows, rows]`:
    /// equal to [`crate::cpu::ternary_matmul`] without bias, bit for bit.
    pub fn matmul(&self, x: &QuantizedActivations) -> Result<Vec<f32>> {
        let acc = self.matmul_acc(x)?;
        let mut y = Vec::with_capacity(acc.len());
        for (row, &sx) in acc.chunks_exact(self.rows.max(1)).zip(&x.scales) {
            y.extend(
                row.iter()
                    .zip(&self.scales)
                    .map(|(&a, &sw)| a as f32 / (sx * sw)),
            );
        }
        Ok(y)
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
    /// `out[t] = dot(x_t, w + 1)` for the activation rows `xs` (`out.len()` rows of `padded`
    /// codes) and one packed weight row `w`.
    fn dots(self, w: &[u8], xs: &[i8], padded: usize, out: &mut [i32]) {
        match self {
            Kernel::Portable => portable_dots(w, xs, padded, out),
            // SAFETY: AVX2 is present (`Kernel::detect`); the slices are whole blocks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dots(w, xs, padded, out) },
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
        assert_eq!(packed.matmul_acc(&x).unwrap(), want);
        // The portable kernel, whatever the machine has.
        let padded = packed.row_bytes * 4;
        let mut codes = vec![0i8; 2 * padded];
        codes[..k].copy_from_slice(&x.codes[..k]);
        codes[padded..padded + k].copy_from_slice(&x.codes[k..]);
        for r in 0..3 {
            let mut out = [0i32; 2];
            let row = &packed.bytes[r * packed.row_bytes..][..packed.row_bytes];
            portable_dots(row, &codes, padded, &mut out);
            let got = [out[0] - x.sums[0], out[1] - x.sums[1]];
            assert_eq!(got, [want[r], want[3 + r]], "row {r}");
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
