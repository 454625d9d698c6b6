//! Attention and rotary embeddings for the CPU engine: the reference's arithmetic, heads split
//! over threads and the rotation angles computed once per position.

use super::{Kernel, for_each_chunk};
use crate::cpu::{AttentionShape, rope_inv_freq};
use crate::{Error, Result};

/// Keys per block of the transposed keys: one score per lane, so that the sums of a block's
/// keys run side by side (8 AVX vectors), each key's own sum still left to right.
const KEYS: usize = 64;

/// Equals [`crate::cpu::attention`] bit for bit (same shapes, same errors for bad ones), one
/// (query row, head) per task.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Result<Vec<f32>> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
        // The reference names the problem.
        return crate::cpu::attention(q, k, v, shape);
    }
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    if !q.len().is_multiple_of(q_width)
        || !k.len().is_multiple_of(kv_width)
        || v.len() != k.len()
        || q.len() / q_width > k.len() / kv_width
    {
        return crate::cpu::attention(q, k, v, shape);
    }
    let (n, t) = (q.len() / q_width, k.len() / kv_width);
    let group = heads / kv_heads;
    let keys = transposed_keys(k, t, kv_heads, head_dim);
    let head_keys = t.div_ceil(KEYS) * head_dim * KEYS;
    let kernel = Kernel::detect();
    let mut out = vec![0.0f32; q.len()];
    // Heads per task: about 64k multiply-adds each.
    let per_task = (65_536 / (2 * t * head_dim).max(1)).max(1);
    for_each_chunk(&mut out, per_task * head_dim, |task, out| {
        let mut scores = Vec::with_capacity(t.next_multiple_of(KEYS));
        for (i, acc) in out.chunks_exact_mut(head_dim).enumerate() {
            let index = task * per_task + i;
            let (r, h) = (index / heads, index % heads);
            let g = h / group;
            let head = Head {
                q: &q[r * q_width + h * head_dim..][..head_dim],
                keys: &keys[g * head_keys..][..head_keys],
                values: &v[g * head_dim..],
                kv_width,
                visible: t - n + r + 1,
            };
            kernel.head(&head, &mut scores, acc);
        }
    });
    Ok(out)
}

/// The keys `[t, kv_heads * head_dim]` as `[kv_heads, blocks of KEYS, head_dim, KEYS]`, the
/// last block's missing keys zero: a block's keys side by side for each of their dimensions.
fn transposed_keys(k: &[f32], t: usize, kv_heads: usize, head_dim: usize) -> Vec<f32> {
    let kv_width = kv_heads * head_dim;
    let head_keys = t.div_ceil(KEYS) * head_dim * KEYS;
    let mut keys = vec![0.0f32; kv_heads * head_keys];
    for_each_chunk(&mut keys, head_dim * KEYS, |index, block| {
        let (g, b) = (index / t.div_ceil(KEYS), index % t.div_ceil(KEYS));
        for (lane, j) in (b * KEYS..t.min((b + 1) * KEYS)).enumerate() {
            let key = &k[j * kv_width + g * head_dim..][..head_dim];
            for (d, &value) in key.iter().enumerate() {
                block[d * KEYS + lane] = value;
            }
        }
    });
    keys
}

/// One query head's work: its query, its kv head's transposed keys ([`transposed_keys`]) and
/// values (row `j` at `values[j * kv_width..]`), and how many positions it sees.
struct Head<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    kv_width: usize,
    visible: usize,
}

impl Kernel {
    /// `acc = softmax(q · keys * scaling) · values` over the visible positions, as the
    /// reference; `scores` is scratch.
    fn head(self, head: &Head<'_>, scores: &mut Vec<f32>, acc: &mut [f32]) {
        match self {
            Kernel::Portable => attend(head, scores, acc),
            // SAFETY: AVX2 is present (`Kernel::detect`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { avx2_attend(head, scores, acc) },
        }
    }
}

/// [`attend`] in AVX2 intrinsics: the same operations in the same order, each block's 64 sums
/// (and each stretch of 64 output dimensions) held in eight vector registers. Left to the
/// compiler, the 64 sums lived on the stack, a store and a reload per multiply-add.
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_attend(head: &Head<'_>, scores: &mut Vec<f32>, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    const VECTORS: usize = KEYS / 8;
    let head_dim = head.q.len();
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let start: f32 = std::iter::empty::<f32>().sum();
    scores.clear();
    let mut lanes = [0.0f32; KEYS];
    for block in head
        .keys
        .chunks_exact(head_dim * KEYS)
        .take(head.visible.div_ceil(KEYS))
    {
        let mut sums = [_mm256_set1_ps(start); VECTORS];
        for (&x, keys) in head.q.iter().zip(block.chunks_exact(KEYS)) {
            let x = _mm256_set1_ps(x);
            for (l, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `keys` holds KEYS values, 8 per vector.
                let key = unsafe { _mm256_loadu_ps(keys.as_ptr().add(8 * l)) };
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(x, key));
            }
        }
        for (l, sum) in sums.iter().enumerate() {
            // SAFETY: `lanes` holds KEYS values.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * l), *sum) };
        }
        scores.extend(lanes.iter().map(|&s| s * scaling));
    }
    scores.truncate(head.visible);
    softmax(scores);
    const DIMS: usize = 64;
    for (c, acc) in acc.chunks_mut(DIMS).enumerate() {
        if acc.len() < DIMS {
            weighted_values(head, scores, c * DIMS, acc);
            continue;
        }
        let mut sums = [_mm256_setzero_ps(); DIMS / 8];
        for (j, &weight) in scores.iter().enumerate() {
            let value = &head.values[j * head.kv_width + c * DIMS..][..DIMS];
            let weight = _mm256_set1_ps(weight);
            for (l, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `value` holds DIMS values, 8 per vector.
                let v = unsafe { _mm256_loadu_ps(value.as_ptr().add(8 * l)) };
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(weight, v));
            }
        }
        for (l, sum) in sums.iter().enumerate() {
            // SAFETY: `acc` holds DIMS values.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(8 * l), *sum) };
        }
    }
}

/// The reference's arithmetic for one head: each score `dot(q, key_j)` summed left to right from
/// `Iterator::sum`'s start, then `* scaling`; softmax; then `acc[d] += weight_j * v_j[d]` from
/// zero, `j` in order. Written lane-wise (a block of keys, a stretch of dimensions) so that the
/// compiler keeps the independent sums in vector registers without reordering any one of them.
#[inline(always)]
fn attend(head: &Head<'_>, scores: &mut Vec<f32>, acc: &mut [f32]) {
    let head_dim = head.q.len();
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let start: f32 = std::iter::empty::<f32>().sum();
    scores.clear();
    for block in head
        .keys
        .chunks_exact(head_dim * KEYS)
        .take(head.visible.div_ceil(KEYS))
    {
        let mut sums = [start; KEYS];
        for (&x, keys) in head.q.iter().zip(block.chunks_exact(KEYS)) {
            for (s, &key) in sums.iter_mut().zip(keys) {
                *s += x * key;
            }
        }
        scores.extend(sums.iter().map(|&s| s * scaling));
    }
    scores.truncate(head.visible);
    softmax(scores);
    const DIMS: usize = 64;
    for (c, acc) in acc.chunks_mut(DIMS).enumerate() {
        weighted_values(head, scores, c * DIMS, acc);
    }
}

/// The reference's softmax of `scores` in place: `exp(s - max)`, then each divided by their sum
/// (left to right).
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
    }
    let total: f32 = scores.iter().sum();
    for s in scores.iter_mut() {
        *s /= total;
    }
}

/// `acc[d] = sum_j weights[j] * v_j[from + d]` from zero, `j` in order.
#[inline(always)]
fn weighted_values(head: &Head<'_>, weights: &[f32], from: usize, acc: &mut [f32]) {
    acc.fill(0.0);
    for (j, &weight) in weights.iter().enumerate() {
        let value = &head.values[j * head.kv_width + from..][..acc.len()];
        for (a, &val) in acc.iter_mut().zip(value) {
            *a += weight * val;
        }
    }
}

/// The cosines and sines [`crate::cpu::rope`] rotates by, computed once per position:
/// [`RopeTable::rotate`] equals `rope` bit for bit without recomputing them for each call.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    head_dim: usize,
    inv_freq: Vec<f32>,
    /// `[positions, head_dim / 2]` pairs `(cos, sin)`, for the positions reserved so far.
    angles: Vec<(f32, f32)>,
}

/// An empty table for heads of `head_dim` (even and positive) and base `theta`.
pub fn rope_table(head_dim: usize, theta: f32) -> Result<RopeTable> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "rope head_dim",
            format!("{head_dim} is not a positive even number"),
        ));
    }
    Ok(RopeTable {
        head_dim,
        inv_freq: rope_inv_freq(head_dim, theta),
        angles: Vec::new(),
    })
}

impl RopeTable {
    /// Makes the angles of every position below `positions` ready.
    pub fn reserve(&mut self, positions: usize) {
        let half = self.head_dim / 2;
        for pos in self.angles.len() / half..positions {
            self.angles.extend(self.inv_freq.iter().map(|&f| {
                let angle = pos as f32 * f;
                (angle.cos(), angle.sin())
            }));
        }
    }

    /// Rotates the rows `x` (`[positions.len(), heads * head_dim]`) in place by their
    /// positions, as [`crate::cpu::rope`] does.
    pub fn rotate(&self, x: &mut [f32], positions: &[usize]) -> Result<()> {
        let half = self.head_dim / 2;
        let table_len = self.angles.len() / half;
        let row_len = x.len() / positions.len().max(1);
        if positions.len() * row_len != x.len()
            || !row_len.is_multiple_of(self.head_dim)
            || positions.iter().any(|&p| p >= table_len)
        {
            return Err(Error::shape(
                "rope rows and positions",
                format!(
                    "{} rows of whole heads of {} at positions below {table_len} (reserved)",
                    positions.len(),
                    self.head_dim
                ),
                format!("{} values, positions {positions:?}", x.len()),
            ));
        }
        for (&pos, row) in positions.iter().zip(x.chunks_exact_mut(row_len.max(1))) {
            let angles = &self.angles[pos * half..][..half];
            for head in row.chunks_exact_mut(self.head_dim) {
                let (low, high) = head.split_at_mut(half);
                for ((l, h), &(cos, sin)) in low.iter_mut().zip(high).zip(angles) {
                    let (a, b) = (*l, *h);
                    *l = a * cos + (-b) * sin;
                    *h = b * cos + a * sin;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::rope;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn floats(rng: &mut SmallRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn attention_equals_the_reference() {
        let mut rng = SmallRng::seed_from_u64(21);
        for (heads, kv_heads, head_dim, n, t) in [
            (1, 1, 1, 1, 1),
            (2, 1, 6, 3, 3),
            (6, 2, 10, 1, 37),
            (4, 4, 64, 5, 9),
            (20, 5, 128, 2, 300),
            (4, 2, 64, 70, 130),
            (8, 8, 96, 65, 65),
        ] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            let q = floats(&mut rng, n * heads * head_dim);
            let k = floats(&mut rng, t * kv_heads * head_dim);
            let v = floats(&mut rng, t * kv_heads * head_dim);
            let fast = attention(&q, &k, &v, shape).unwrap();
            let reference = crate::cpu::attention(&q, &k, &v, shape).unwrap();
            assert!(same_bits(&fast, &reference), "{shape:?}, {n} of {t}");
        }
        let shape = AttentionShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 2,
        };
        assert!(attention(&[0.0; 6], &[0.0; 4], &[0.0; 4], shape).is_err());
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        assert!(attention(&[0.0; 8], &[0.0; 2], &[0.0; 2], shape).is_err());
    }

    #[test]
    fn rope_table_equals_the_reference() {
        let mut rng = SmallRng::seed_from_u64(4);
        for (heads, head_dim, theta) in [(1, 2, 10_000.0), (3, 20, 500_000.0), (2, 128, 10.0)] {
            let positions = [0, 1, 7, 1000, 4095];
            let mut table = rope_table(head_dim, theta).unwrap();
            table.reserve(2000);
            table.reserve(4096);
            let mut x = floats(&mut rng, positions.len() * heads * head_dim);
            let mut want = x.clone();
            rope(&mut want, &positions, heads, head_dim, theta).unwrap();
            table.rotate(&mut x, &positions).unwrap();
            assert!(same_bits(&x, &want), "{heads} x {head_dim}");
            assert!(table.rotate(&mut x, &[4096; 5]).is_err());
        }
        assert!(rope_table(3, 1.0).is_err());
    }
}
