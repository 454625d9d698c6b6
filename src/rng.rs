//! SplitMix64 (Steele, Lea and Flood 2014): a few lines of well-mixed 64-bit randomness that
//! gives the same stream on every target, for sampling, synthetic models and benchmarks
//! (the `rand` crate is only a test dependency).

/// The generator; the seed is its whole state.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-1, 1)`, from the top 24 bits (exactly representable in f32).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_stream() {
        // The published first outputs of SplitMix64 seeded with 1234567.
        let mut rng = SplitMix64(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn uniform_f32_stays_in_range() {
        let mut rng = SplitMix64(7);
        assert!(
            (0..10_000)
                .map(|_| rng.uniform_f32())
                .all(|v| (-1.0..1.0).contains(&v))
        );
    }
}
