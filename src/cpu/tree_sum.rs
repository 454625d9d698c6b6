//! The summation order of the GPU's workgroup reduction, so that CPU and GPU sums agree bit for bit.

/// Values one workgroup reduces: 256 threads, 4 values each.
const BLOCK: usize = 1024;
/// Threads (tree leaves) per workgroup.
const LEAVES: usize = 256;

/// Sums `values` in the fixed order the GPU reduction uses, so its f32 result is reproducible.
///
/// Float addition is not associative: a plain left-to-right sum and a parallel tree give different
/// bits. This order is the shader's: blocks of 1024 values, each thread adding its 4 values left to
/// right, then a halving tree over the 256 partial sums; with more than one block the block results
/// are reduced again the same way. Missing values (past the end) count as `0.0`. The tree also keeps
/// the rounding error growing with `log n` rather than `n`.
///
/// ```
/// use bitnet_wgpu::cpu::tree_sum;
/// assert_eq!(tree_sum(&[]), 0.0);
/// assert_eq!(tree_sum(&[1.0, 2.0, 3.0]), 6.0);
/// assert_eq!(tree_sum(&vec![0.5; 3000]), 1500.0);
/// ```
pub fn tree_sum(values: &[f32]) -> f32 {
    let mut level: Vec<f32> = values.chunks(BLOCK).map(block_sum).collect();
    while level.len() > 1 {
        level = level.chunks(BLOCK).map(block_sum).collect();
    }
    level.first().copied().unwrap_or(0.0)
}

/// One workgroup's sum of up to `BLOCK` values.
fn block_sum(block: &[f32]) -> f32 {
    let mut partial = [0.0f32; LEAVES];
    if let Ok(block) = <&[f32; BLOCK]>::try_from(block) {
        // A whole block (all but a sum's last): the same additions without a bounds check per
        // value, which kept the compiler from vectorizing them.
        for (leaf, x) in partial.iter_mut().zip(block.chunks_exact(4)) {
            *leaf = ((x[0] + x[1]) + x[2]) + x[3];
        }
    } else {
        let at = |i: usize| block.get(i).copied().unwrap_or(0.0);
        for (t, leaf) in partial.iter_mut().enumerate() {
            *leaf = ((at(4 * t) + at(4 * t + 1)) + at(4 * t + 2)) + at(4 * t + 3);
        }
    }
    let mut stride = LEAVES / 2;
    while stride > 0 {
        let (low, high) = partial[..2 * stride].split_at_mut(stride);
        for (a, b) in low.iter_mut().zip(high.iter()) {
            *a += *b;
        }
        stride /= 2;
    }
    partial[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn one_element_is_itself() {
        for v in [1.0f32, -3.25, 1e-40, f32::MAX, 0.1] {
            assert_eq!(tree_sum(&[v]).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn close_to_exact_sum() {
        let mut rng = SmallRng::seed_from_u64(3);
        for n in [1, 3, 17, 1023, 1024, 1025, 5000, 70_000] {
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let abs_sum: f64 = values.iter().map(|&v| f64::from(v.abs())).sum();
            let exact: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let got = f64::from(tree_sum(&values));
            assert!(
                (got - exact).abs() <= abs_sum * 1e-6,
                "n={n}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn follows_the_stated_order() {
        // At 1e8 an f32 step is 8, so 1e8 + 4 rounds (to even) back to 1e8. Adding the fours one
        // by one loses them all; the tree adds them in their own leaf first and keeps 16.
        let mut values = vec![0.0f32; 8];
        values[0] = 1e8;
        values[4..8].copy_from_slice(&[4.0; 4]);
        assert_eq!(values.iter().sum::<f32>(), 1e8);
        assert_eq!(tree_sum(&values), 1e8 + 16.0);
        // In the first leaf they are added one by one, and lost.
        values.copy_from_slice(&[1e8, 4.0, 4.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(tree_sum(&values), 1e8);
    }

    #[test]
    fn several_levels_are_exact_for_integers() {
        assert_eq!(tree_sum(&vec![1.0; 2_000_000]), 2e6);
        assert_eq!(tree_sum(&vec![1.0; 1024 * 1024 + 1]), 1_048_577.0);
    }
}
