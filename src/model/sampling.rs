//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
//! seeded generator, so that a run can be reproduced on any platform (the browser included).

use crate::Result;
use crate::cpu::{SamplingParams, argmax, sample};
use crate::rng::SplitMix64;

/// Samples tokens with [`SamplingParams`] ([`sample`]'s rules) and its own generator state: one
/// draw per token, none when greedy.
///
/// ```
/// use bitnet_wgpu::model::{Sampler, SamplingParams};
/// let mut greedy = Sampler::new(SamplingParams::default())?;
/// assert_eq!(greedy.sample(&[0.5, 2.0, 2.0, -1.0])?, 1); // ties go to the lowest id
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler seeded with `params.seed`; refuses a negative or non-finite temperature and a
    /// `top_p` outside `(0, 1]`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.check()?;
        Ok(Sampler {
            params,
            rng: SplitMix64(params.seed),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The draw the next sampled token takes, in `[0, 1)`: what [`Sampler::sample`] uses, for an
    /// engine that samples elsewhere (the GPU) from the same stream.
    pub fn next_draw(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The next token id for one row of logits (`[vocab]`).
    ///
    /// `-inf` marks a forbidden token. Errors: empty logits, a NaN or `+inf` logit, or no token
    /// allowed at all.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let u = self.next_draw();
        sample(logits, &self.params, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
        .unwrap()
    }

    /// How often each id comes out in `draws` samples.
    fn histogram(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_argmax_and_lowest_id_on_ties() {
        let mut s = sampler(0.0, 0, 1.0, 9);
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, -7.0]).unwrap(), 1);
    }

    #[test]
    fn temperature_follows_the_softmax() {
        // Logits [0, ln 3]: probabilities 1/4, 3/4 at T = 1 and 1/(1+√3), √3/(1+√3) at T = 2.
        let logits = [0.0, 3f32.ln()];
        let n = 20_000;
        let at_one = histogram(&mut sampler(1.0, 0, 1.0, 1), &logits, n);
        assert!(
            (at_one[1] as f64 / n as f64 - 0.75).abs() < 0.015,
            "{at_one:?}"
        );
        let at_two = histogram(&mut sampler(2.0, 0, 1.0, 2), &logits, n);
        let expect = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!(
            (at_two[1] as f64 / n as f64 - expect).abs() < 0.015,
            "{at_two:?}"
        );
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = [1.0, 3.0, 2.0, 2.5, 0.0];
        let counts = histogram(&mut sampler(5.0, 2, 1.0, 3), &logits, 2000);
        assert_eq!((counts[0], counts[2], counts[4]), (0, 0, 0));
        assert!(counts[1] > 0 && counts[3] > 0);
        let counts = histogram(&mut sampler(5.0, 1, 1.0, 3), &logits, 100);
        assert_eq!(counts[1], 100);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 needs the first two (0.5 < 0.75 <= 0.8).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let counts = histogram(&mut sampler(1.0, 0, 0.75, 4), &logits, 4000);
        assert_eq!((counts[2], counts[3]), (0, 0));
        // Renormalized over the nucleus: 0.5 / 0.8 = 0.625.
        assert!(
            (counts[0] as f64 / 4000.0 - 0.625).abs() < 0.03,
            "{counts:?}"
        );
        // A tiny top_p is greedy; top_p 1 keeps everyone.
        let counts = histogram(&mut sampler(1.0, 0, 1e-6, 4), &logits, 100);
        assert_eq!(counts[0], 100);
        let counts = histogram(&mut sampler(1.0, 0, 1.0, 4), &logits, 4000);
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn a_wide_nucleus_is_ranked_past_the_first_round() {
        // 3000 equal logits in shuffled order with top_p 0.5: the nucleus is the 1500 lowest ids
        // (ties rank by id), more than the first ranking round holds.
        let n = 3000;
        let mut logits = vec![f32::NEG_INFINITY; 2 * n];
        for i in 0..n {
            logits[(i * 7919) % (2 * n)] = 1.0;
        }
        let live: Vec<usize> = (0..2 * n).filter(|&i| logits[i] == 1.0).collect();
        let counts = histogram(&mut sampler(0.7, 0, 0.5, 5), &logits, 4000);
        let (inside, outside) = live.split_at(n / 2);
        assert!(outside.iter().all(|&i| counts[i] == 0));
        assert!(inside[1000..].iter().any(|&i| counts[i] > 0));
        assert_eq!(counts.iter().sum::<usize>(), 4000);
    }

    #[test]
    fn top_p_applies_after_top_k() {
        // top_k 2 leaves probabilities 0.625, 0.375; top_p 0.6 then keeps only the first.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let counts = histogram(&mut sampler(1.0, 2, 0.6, 5), &logits, 200);
        assert_eq!(counts[0], 200);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(1.0, 0, 0.95, seed);
            (0..64)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut s = sampler(1.0, 0, 1.0, 0);
        assert!(matches!(s.sample(&[]), Err(Error::Empty(_))));
        assert!(matches!(
            s.sample(&[0.0, f32::NAN]),
            Err(Error::NonFinite { col: 1, .. })
        ));
        assert!(s.sample(&[f32::INFINITY]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
        for (temperature, top_p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let params = SamplingParams {
                temperature,
                top_p,
                ..SamplingParams::default()
            };
            assert!(Sampler::new(params).is_err());
        }
    }
}
