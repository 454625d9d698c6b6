//! Test support: central finite differences, the ground truth every backward twin is checked
//! against.

use rand::{Rng, SeedableRng, rngs::SmallRng};

/// `n` values uniform in `[lo, hi)` from a seeded generator.
pub fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `sum_i y[i] * r[i]` accumulated in f64: a scalar loss whose gradient wrt `y` is `r`, so that
/// a backward fed `dy = r` must reproduce the finite differences of this sum.
pub fn weighted_sum(y: &[f32], r: &[f32]) -> f64 {
    assert_eq!(y.len(), r.len());
    y.iter()
        .zip(r)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

/// `(loss(x + h e_i) - loss(x - h e_i)) / 2h` for every coordinate `i` of `x`.
pub fn numeric_grad(x: &[f32], h: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let plus = loss(&probe);
            probe[i] = x[i] - h;
            let minus = loss(&probe);
            probe[i] = x[i];
            (plus - minus) / (2.0 * f64::from(h))
        })
        .collect()
}

/// Panics unless every analytic value is within `abs + rel * |numeric|` of its numeric twin.
pub fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64], abs: f64, rel: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths");
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (f64::from(a) - n).abs();
        assert!(
            err <= abs + rel * n.abs(),
            "{what}[{i}]: analytic {a} vs numeric {n} (error {err})"
        );
    }
}
