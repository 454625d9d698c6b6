//! Attention and rotary embeddings for the CPU engine: the reference's arithmetic, heads split
//! over threads and the rotation angles computed once per position.

use super::{Kernel, for_each_chunk};
use crate::cpu::{AttentionShape, rope_inv_freq};
use crate::{Error, Result};

/// Keys per block of the transposed keys: one score per lane, so that the sums of a block's
/// keys run side by side (8 AVX vectors), each key's own sum still left to right.
const KEYS: usize = 64;

/// Equals [`crate::cpu::attention`] bit for bit (same shapes, same errors for bad ones), one
/// query row's heads of one kv head per task (they read the same keys and values).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Result<Vec<f32>> {
    attention_cached(q, k, v, &mut Vec::new(), &mut 0, shape)
}

/// [`attention`] with the keys' transposed copy (`[blocks of KEYS positions, kv_heads,
/// head_dim, KEYS]`, holding the first `transposed` positions) kept between calls: only the
/// positions past `transposed` are laid out, so that a decoding step costs no pass over the
/// whole cache.
pub(crate) fn attention_cached(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_blocks: &mut Vec<f32>,
    transposed: &mut usize,
    shape: AttentionShape,
) -> Result<Vec<f32>> {
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
    transpose_keys(k, t, kv_width, head_dim, key_blocks, transposed);
    let kernel = Kernel::detect();
    // `[kv_heads, n, group * head_dim]`: the rows of one kv head in turn, so that a task's
    // rows share its keys and values while they are in the cache (a long prompt's keys and
    // values of every kv head do not fit); reordered into `[n, heads * head_dim]` at the end.
    let mut by_group = vec![0.0f32; q.len()];
    // Rows per task: about 64k multiply-adds each.
    let per_task = (65_536 / (2 * t * head_dim * group).max(1)).max(1);
    let group_width = group * head_dim;
    let key_blocks = &key_blocks[..];
    for_each_chunk(&mut by_group, per_task * group_width, |task, out| {
        let mut scores = Vec::new();
        for (i, acc) in out.chunks_exact_mut(group_width).enumerate() {
            let index = task * per_task + i;
            let (g, r) = (index / n, index % n);
            let heads = Heads {
                q: &q[r * q_width + g * group_width..][..group_width],
                head_dim,
                keys: &key_blocks[g * head_dim * KEYS..],
                key_stride: kv_width * KEYS,
                values: &v[g * head_dim..],
                kv_width,
                visible: t - n + r + 1,
            };
            kernel.heads(&heads, &mut scores, acc);
        }
    });
    // One kv head, or one row: the two layouts are the same.
    if kv_heads == 1 || n == 1 {
        return Ok(by_group);
    }
    let mut out = vec![0.0f32; q.len()];
    for (r, row) in out.chunks_exact_mut(q_width).enumerate() {
        for (g, part) in row.chunks_exact_mut(group_width).enumerate() {
            part.copy_from_slice(&by_group[(g * n + r) * group_width..][..group_width]);
        }
    }
    Ok(out)
}

/// Lays out the keys `[t, kv_width]` from position `transposed` on into `blocks`
/// (`[blocks of KEYS positions, kv_heads, head_dim, KEYS]`: a block's keys side by side for each
/// of their dimensions), growing it by whole blocks; `transposed` becomes `t`. Lanes past `t`
/// in the last block are left as they are (zeros, or a truncated cache's stale keys): no score
/// of theirs is kept.
fn transpose_keys(
    k: &[f32],
    t: usize,
    kv_width: usize,
    head_dim: usize,
    blocks: &mut Vec<f32>,
    transposed: &mut usize,
) {
    let block_len = kv_width * KEYS;
    let from = (*transposed).min(t);
    if blocks.len() < t.div_ceil(KEYS) * block_len {
        blocks.resize(t.div_ceil(KEYS) * block_len, 0.0);
    }
    let first = from / KEYS;
    let new = &mut blocks[first * block_len..t.div_ceil(KEYS) * block_len];
    for_each_chunk(new, block_len, |i, block| {
        let b = first + i;
        for j in from.max(b * KEYS)..t.min((b + 1) * KEYS) {
            let lane = j % KEYS;
            for (c, &value) in k[j * kv_width..][..kv_width].iter().enumerate() {
                // Column c is dimension c % head_dim of kv head c / head_dim.
                let (g, d) = (c / head_dim, c % head_dim);
                block[(g * head_dim + d) * KEYS + lane] = value;
            }
        }
    });
    *transposed = t;
}

/// The work of a kv head's query heads on one row: their queries (`[heads, head_dim]`), the kv
/// head's transposed keys ([`transpose_keys`]) and values (row `j` at `values[j * kv_width..]`),
/// and how many positions they see.
#[derive(Clone, Copy)]
struct Heads<'a> {
    q: &'a [f32],
    head_dim: usize,
    /// Block `b` of the kv head's keys at `keys[b * key_stride..]`.
    keys: &'a [f32],
    key_stride: usize,
    values: &'a [f32],
    kv_width: usize,
    visible: usize,
}

impl Kernel {
    /// `acc[h] = softmax(q[h] · keys * scaling) · values` over the visible positions for each
    /// head `h`, as the reference; `scores` is scratch.
    fn heads(self, heads: &Heads<'_>, scores: &mut Vec<f32>, acc: &mut [f32]) {
        match self {
            Kernel::Portable => {
                for (q, acc) in heads
                    .q
                    .chunks_exact(heads.head_dim)
                    .zip(acc.chunks_exact_mut(heads.head_dim))
                {
                    attend(&Heads { q, ..*heads }, scores, acc);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => {
                let width = avx2::HEADS * heads.head_dim;
                for (q, acc) in heads.q.chunks(width).zip(acc.chunks_mut(width)) {
                    let part = Heads { q, ..*heads };
                    // SAFETY: AVX2 is present (`Kernel::detect`); `q` holds whole heads.
                    unsafe {
                        match q.len() / heads.head_dim {
                            1 => avx2::heads::<1>(&part, scores, acc),
                            2 => avx2::heads::<2>(&part, scores, acc),
                            3 => avx2::heads::<3>(&part, scores, acc),
                            _ => avx2::heads::<4>(&part, scores, acc),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Heads, KEYS, softmax, weighted_values};
    use std::arch::x86_64::*;

    /// Query heads taken together: each vector of keys or values loaded feeds this many.
    pub(super) const HEADS: usize = 4;
    /// Keys, or value dimensions, per pass: 2 vectors for each of up to [`HEADS`] heads, 8
    /// sums in registers.
    const WIDTH: usize = 16;

    /// [`super::attend`] for `G` heads at once, in AVX2 intrinsics: the same operations in the
    /// same order for each head, each vector of keys (of values) loaded once for all `G`, and
    /// the sums in registers (left to the compiler they lived on the stack, a store and a
    /// reload per multiply-add).
    ///
    /// # Safety
    /// AVX2 must be present; `heads.q` holds `G` heads.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn heads<const G: usize>(
        heads: &Heads<'_>,
        scores: &mut Vec<f32>,
        acc: &mut [f32],
    ) {
        let head_dim = heads.head_dim;
        debug_assert_eq!(heads.q.len(), G * head_dim);
        let scaling = _mm256_set1_ps(1.0 / (head_dim as f32).sqrt());
        let start: f32 = std::iter::empty::<f32>().sum();
        let blocks = heads.visible.div_ceil(KEYS);
        let stride = blocks * KEYS;
        scores.clear();
        scores.resize(G * stride, 0.0);
        for b in 0..blocks {
            let block = &heads.keys[b * heads.key_stride..][..head_dim * KEYS];
            // Keys past the visible ones are never read (their scores stay zero, unused).
            let keys = KEYS.min(heads.visible - b * KEYS);
            for sub in (0..keys).step_by(WIDTH) {
                let mut sums = [[_mm256_set1_ps(start); 2]; G];
                // Pointers, not indices: bounds checks in this loop left too few registers.
                let (mut key, mut q) = (block[sub..].as_ptr(), heads.q.as_ptr());
                for _ in 0..head_dim {
                    // SAFETY: `key` is dimension `d`'s 16 keys of the block (`d` in
                    // 0..head_dim), `q.add(h * head_dim)` head `h`'s value `d`.
                    unsafe {
                        let k = [_mm256_loadu_ps(key), _mm256_loadu_ps(key.add(8))];
                        for (h, sums) in sums.iter_mut().enumerate() {
                            let x = _mm256_broadcast_ss(&*q.add(h * head_dim));
                            for (sum, &k) in sums.iter_mut().zip(&k) {
                                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(x, k));
                            }
                        }
                        key = key.add(KEYS);
                        q = q.add(1);
                    }
                }
                for (h, sums) in sums.iter().enumerate() {
                    let out = &mut scores[h * stride + b * KEYS + sub..][..WIDTH];
                    // SAFETY: 16 scores.
                    unsafe {
                        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(sums[0], scaling));
                        _mm256_storeu_ps(out.as_mut_ptr().add(8), _mm256_mul_ps(sums[1], scaling));
                    }
                }
            }
        }
        for h in 0..G {
            softmax(&mut scores[h * stride..][..heads.visible]);
        }
        let whole = head_dim / WIDTH * WIDTH;
        for c in (0..whole).step_by(WIDTH) {
            let mut sums = [[_mm256_setzero_ps(); 2]; G];
            // The last value row read is inside `values` (checked once, here).
            let _ = &heads.values[(heads.visible - 1) * heads.kv_width + c..][..WIDTH];
            let (mut value, mut weight) = (heads.values[c..].as_ptr(), scores.as_ptr());
            for _ in 0..heads.visible {
                // SAFETY: `value` is row `j`'s dimensions `c..c + 16` (`j` below `visible`,
                // checked above), `weight.add(h * stride)` head `h`'s weight `j`.
                unsafe {
                    let v = [_mm256_loadu_ps(value), _mm256_loadu_ps(value.add(8))];
                    for (h, sums) in sums.iter_mut().enumerate() {
                        let w = _mm256_broadcast_ss(&*weight.add(h * stride));
                        for (sum, &v) in sums.iter_mut().zip(&v) {
                            *sum = _mm256_add_ps(*sum, _mm256_mul_ps(w, v));
                        }
                    }
                    value = value.add(heads.kv_width);
                    weight = weight.add(1);
                }
            }
            for (h, sums) in sums.iter().enumerate() {
                let out = &mut acc[h * head_dim + c..][..WIDTH];
                // SAFETY: 16 outputs.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), sums[0]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), sums[1]);
                }
            }
        }
        if whole < head_dim {
            for h in 0..G {
                let weights = &scores[h * stride..][..heads.visible];
                weighted_values(
                    heads,
                    weights,
                    whole,
                    &mut acc[h * head_dim..][whole..head_dim],
                );
            }
        }
    }
}

/// The reference's arithmetic for one head: each score `dot(q, key_j)` summed left to right from
/// `Iterator::sum`'s start, then `* scaling`; softmax; then `acc[d] += weight_j * v_j[d]` from
/// zero, `j` in order. Written lane-wise (a block of keys, a stretch of dimensions) so that the
/// compiler keeps the independent sums in vector registers without reordering any one of them.
#[inline(always)]
fn attend(head: &Heads<'_>, scores: &mut Vec<f32>, acc: &mut [f32]) {
    let head_dim = head.q.len();
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let start: f32 = std::iter::empty::<f32>().sum();
    scores.clear();
    for b in 0..head.visible.div_ceil(KEYS) {
        let block = &head.keys[b * head.key_stride..][..head_dim * KEYS];
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
fn weighted_values(head: &Heads<'_>, weights: &[f32], from: usize, acc: &mut [f32]) {
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
            (10, 2, 24, 3, 70),
            (12, 4, 48, 17, 129),
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

    /// The transposed keys kept between calls: a cache growing a position or a prompt at a time,
    /// then cut back and grown with other keys, as a generator's cache is.
    #[test]
    fn kept_keys_follow_the_cache() {
        let mut rng = SmallRng::seed_from_u64(22);
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let kv = shape.kv_heads * shape.head_dim;
        let mut k = floats(&mut rng, 200 * kv);
        let v = floats(&mut rng, 200 * kv);
        let (mut blocks, mut transposed) = (Vec::new(), 0);
        let mut check =
            |k: &[f32], t: usize, n: usize, blocks: &mut Vec<f32>, transposed: &mut usize| {
                let q = floats(&mut rng, n * shape.heads * shape.head_dim);
                let (k, v) = (&k[..t * kv], &v[..t * kv]);
                let got = attention_cached(&q, k, v, blocks, transposed, shape).unwrap();
                let want = crate::cpu::attention(&q, k, v, shape).unwrap();
                assert!(same_bits(&got, &want), "{n} of {t}");
                assert_eq!(*transposed, t);
            };
        for (t, n) in [(1, 1), (2, 1), (70, 68), (71, 1), (129, 58), (130, 1)] {
            check(&k, t, n, &mut blocks, &mut transposed);
        }
        // Cut back to 65 positions; the keys after them change.
        transposed = transposed.min(65);
        k[65 * kv..].iter_mut().for_each(|x| *x = -*x);
        for (t, n) in [(66, 1), (200, 134)] {
            check(&k, t, n, &mut blocks, &mut transposed);
        }
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
