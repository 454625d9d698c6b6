//! The activation quantizer and the RMS norm for the CPU engine, a prompt's rows split over
//! threads: [`act_quant`] equals [`crate::cpu::act_quant`] bit for bit, its rounding in vector
//! instructions (plain x86-64 has none: each value was a call to `rintf`); [`rmsnorm`] is the
//! reference's own per row.

use super::{Kernel, for_each_chunk, for_each_chunk_pair, items_per_task};
use crate::Result;
use crate::cpu::QuantizedActivations;

/// Values side by side in the per-row maximum and finiteness checks.
const LANES: usize = 16;
/// Values a task of [`act_quant`] or [`rmsnorm`] takes at least: a decoding step's one row
/// stays on the calling thread, a prompt's rows are split.
const ROWS_WORK: usize = 32 << 10;

/// Equals [`crate::cpu::act_quant`] (codes, scales, sums, and the errors of bad shapes).
pub fn act_quant(x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations> {
    if cols == 0 || rows.checked_mul(cols) != Some(x.len()) {
        // The reference names the problem.
        return crate::cpu::act_quant(x, rows, cols);
    }
    let mut codes = vec![0; x.len()];
    let mut rows_out = vec![(0.0, 0); rows];
    let kernel = Kernel::detect();
    let per_task = items_per_task(rows, cols, ROWS_WORK);
    for_each_chunk_pair(
        (&mut codes, per_task * cols),
        (&mut rows_out, per_task),
        |task, codes, out| {
            let x = &x[task * per_task * cols..];
            for ((row, codes), out) in x
                .chunks_exact(cols)
                .zip(codes.chunks_exact_mut(cols))
                .zip(out)
            {
                *out = kernel.quantize_row(row, codes);
            }
        },
    );
    let (scales, sums) = rows_out.into_iter().unzip();
    Ok(QuantizedActivations {
        rows,
        cols,
        codes,
        scales,
        sums,
    })
}

/// Equals [`crate::cpu::rmsnorm`] (values and errors), rows split over threads.
pub fn rmsnorm(x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>> {
    let cols = weight.len();
    if cols == 0 || rows.checked_mul(cols) != Some(x.len()) {
        return crate::cpu::rmsnorm(x, rows, weight, eps);
    }
    let mut y = vec![0.0; x.len()];
    let per_task = items_per_task(rows, cols, ROWS_WORK);
    for_each_chunk(&mut y, per_task * cols, |task, y| {
        let x = &x[task * per_task * cols..][..y.len()];
        crate::cpu::rmsnorm::rmsnorm_rows(x, weight, eps, y);
    });
    Ok(y)
}

impl Kernel {
    /// One row's codes (into `codes`), scale and sum of codes.
    fn quantize_row(self, row: &[f32], codes: &mut [i8]) -> (f32, i32) {
        match self {
            Kernel::Portable => quantize_row(row, codes),
            // SAFETY: AVX2 is present (`Kernel::detect`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2_quantize_row(row, codes) },
        }
    }
}

/// [`quantize_row`] compiled for AVX2 (its maximum 8 values per instruction), its codes from
/// [`avx2_codes`].
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_quantize_row(row: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let Some(scale) = row_scale(row) else {
        codes.fill(0);
        return (f32::NAN, 0);
    };
    // SAFETY: AVX2 is present.
    (scale, unsafe { avx2_codes(row, scale, -128.0, codes) })
}

/// `codes[i] = clamp(round_ties_even(values[i] * scale), low, 127)` for finite `values`, 32
/// at a time (`vroundps`, then packed to bytes), and the sum of the codes: what the scalar
/// `(v * scale).round_ties_even().clamp(low, 127.0) as i8` gives, value for value.
///
/// # Safety
/// AVX2 must be present; `codes` holds `values.len()` codes at least.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2_codes(values: &[f32], scale: f32, low: f32, codes: &mut [i8]) -> i32 {
    use std::arch::x86_64::*;
    const VECTOR: usize = 8;
    let (factor, bottom, top) = (
        _mm256_set1_ps(scale),
        _mm256_set1_ps(low),
        _mm256_set1_ps(127.0),
    );
    let code = |chunk: &[f32]| {
        // SAFETY: 8 values.
        let v = _mm256_mul_ps(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, factor);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, bottom), top))
    };
    let whole = values.len() / (4 * VECTOR) * 4 * VECTOR;
    let mut sums = _mm256_setzero_si256();
    for (chunk, out) in values[..whole]
        .chunks_exact(4 * VECTOR)
        .zip(codes.chunks_exact_mut(4 * VECTOR))
    {
        let [a, b, c, d] = [0, 1, 2, 3].map(|i| code(&chunk[i * VECTOR..][..VECTOR]));
        sums = _mm256_add_epi32(
            sums,
            _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)),
        );
        // Packing works within 128-bit halves: the dwords come out as a0 b0 c0 d0 a1 b1 c1 d1
        // (each 4 codes), put back in order by one permutation.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 writable codes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), ordered) };
    }
    let mut lanes = [0i32; VECTOR];
    // SAFETY: 8 writable i32s.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
    let mut sum: i32 = lanes.iter().sum();
    for (c, &v) in codes[whole..].iter_mut().zip(&values[whole..]) {
        *c = (v * scale).round_ties_even().clamp(low, 127.0) as i8;
        sum += i32::from(*c);
    }
    sum
}

/// The reference's row: a row holding a NaN or an infinity gets zero codes and a NaN scale;
/// else `scale = quant_scale(max |x|)` and `code = clamp(round_ties_even(x * scale))` (the
/// maximum in [`row_scale`]).
fn quantize_row(row: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let Some(scale) = row_scale(row) else {
        codes.fill(0);
        return (f32::NAN, 0);
    };
    let mut sum = 0i32;
    for (c, &v) in codes.iter_mut().zip(row) {
        *c = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
        sum += i32::from(*c);
    }
    (scale, sum)
}

/// The row's `quant_scale(max |x|)`, or `None` where a value is not finite. The maximum is taken
/// lane by lane, then across: the same value, as a maximum of finite values does not depend on
/// the order.
#[inline(always)]
fn row_scale(row: &[f32]) -> Option<f32> {
    let mut finite = [true; LANES];
    let mut amax = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((f, m), &v) in finite.iter_mut().zip(&mut amax).zip(chunk) {
            *f &= v.is_finite();
            *m = m.max(v.abs());
        }
    }
    for (&v, (f, m)) in tail.iter().zip(finite.iter_mut().zip(&mut amax)) {
        *f &= v.is_finite();
        *m = m.max(v.abs());
    }
    finite
        .iter()
        .all(|&f| f)
        .then(|| crate::cpu::quant_scale(amax.iter().fold(0.0f32, |m, &v| m.max(v))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn every_kernel_equals_the_reference() {
        let mut rng = SmallRng::seed_from_u64(8);
        let mut x: Vec<f32> = (0..7 * 300).map(|_| rng.random_range(-4.0..4.0)).collect();
        // Half-way cases (127 is the maximum: scale 1), zeros, a non-finite row, huge values.
        x[..4].copy_from_slice(&[127.0, 2.5, -3.5, -0.0]);
        x[300..600].fill(0.0);
        x[650] = f32::NAN;
        x[1000] = f32::INFINITY;
        x[1300] = -f32::MAX;
        for (rows, cols) in [(7, 300), (21, 100), (1, 2100), (300, 7)] {
            let want = crate::cpu::act_quant(&x, rows, cols).unwrap();
            for kernel in Kernel::available() {
                let mut codes = vec![0; x.len()];
                let (scales, sums): (Vec<f32>, Vec<i32>) = x
                    .chunks_exact(cols)
                    .zip(codes.chunks_exact_mut(cols))
                    .map(|(row, codes)| kernel.quantize_row(row, codes))
                    .unzip();
                assert_eq!(codes, want.codes, "{kernel:?}, {rows} x {cols}");
                assert_eq!(sums, want.sums, "{kernel:?}, {rows} x {cols}");
                let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&scales), bits(&want.scales), "{kernel:?}");
            }
            assert_eq!(act_quant(&x, rows, cols).unwrap().codes, want.codes);
        }
        assert!(act_quant(&x, 7, 301).is_err());
        assert!(act_quant(&[], 0, 0).is_err());
    }

    #[test]
    fn a_prompt_split_over_tasks_equals_the_reference() {
        let mut rng = SmallRng::seed_from_u64(9);
        for (rows, cols) in [(97, 1001), (40, 2560), (3, 40_000), (1, 7)] {
            let mut x: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            x[cols / 2] = f32::NAN;
            let weight: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let q = act_quant(&x, rows, cols).unwrap();
            let want = crate::cpu::act_quant(&x, rows, cols).unwrap();
            let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                (&q.codes, &q.sums),
                (&want.codes, &want.sums),
                "{rows} x {cols}"
            );
            assert_eq!(bits(&q.scales), bits(&want.scales), "{rows} x {cols}");
            let y = rmsnorm(&x, rows, &weight, 1e-5).unwrap();
            let want = crate::cpu::rmsnorm(&x, rows, &weight, 1e-5).unwrap();
            assert_eq!(bits(&y), bits(&want), "{rows} x {cols}");
        }
        assert!(rmsnorm(&[1.0; 5], 2, &[1.0; 3], 0.0).is_err());
        assert!(rmsnorm(&[], 0, &[], 0.0).is_err());
    }
}
