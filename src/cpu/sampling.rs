//! Sampling one token from a row of logits: temperature, top-k, top-p, then a draw. This is the
//! reference `shaders/sampling.wgsl` follows; [`crate::model::Sampler`] runs it with its seeded
//! generator.

use crate::cpu::argmax;
use crate::{Error, Result};

/// How [`sample`] turns logits into a token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; 0 means greedy (argmax), larger is more random.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Then keep the fewest most likely tokens whose probability adds up to at least `top_p`
    /// (nucleus sampling); 1 keeps all. Must be in `(0, 1]`.
    pub top_p: f32,
    /// Seed of the generator: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding, the deterministic choice that needs no tuning.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Refuses a negative or non-finite temperature and a `top_p` outside `(0, 1]`.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "sampling temperature",
                format!("{} is not a finite non-negative number", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "sampling top_p",
                format!("{} is not in (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }
}

/// The token `params` choose from one row of logits (`[vocab]`) for the draw `u` in `[0, 1)`.
///
/// The rules are applied in Hugging Face's order: temperature, then top-k, then top-p on the
/// probabilities renormalized over the top-k survivors. Candidates are ranked by logit, ties by the
/// lower token id, so the result never depends on a sort's stability. The kept candidates are laid
/// end to end, in rank order when top-k or top-p cut them and in id order otherwise, and `u` times
/// their total weight picks one. Temperature 0 is greedy ([`argmax`]) and ignores `u`.
///
/// `-inf` marks a forbidden token. Errors: bad `params`, empty logits, a NaN or `+inf` logit, or
/// no token allowed at all.
///
/// ```
/// use bitnet_wgpu::cpu::{SamplingParams, sample};
/// let params = SamplingParams { temperature: 1.0, top_p: 0.5, ..SamplingParams::default() };
/// // Probabilities 0.6, 0.3, 0.1: top_p 0.5 keeps the first alone, whatever the draw.
/// let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
/// assert_eq!(sample(&logits, &params, 0.99)?, 0);
/// let all = SamplingParams { top_p: 1.0, ..params };
/// assert_eq!(sample(&logits, &all, 0.99)?, 2);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn sample(logits: &[f32], params: &SamplingParams, u: f64) -> Result<u32> {
    params.check()?;
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    if logits.is_empty() {
        return Err(Error::Empty("logits"));
    }
    if let Some((col, &value)) = logits
        .iter()
        .enumerate()
        .find(|&(_, &v)| v.is_nan() || v == f32::INFINITY)
    {
        return Err(Error::NonFinite {
            what: "logits",
            row: 0,
            col,
            value,
        });
    }
    let mut survivors: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
        .collect();
    if survivors.is_empty() {
        return Err(Error::invalid("logits", "every token is -inf"));
    }
    // Descending logit, then ascending id: a total order, the same on every platform.
    let by_rank = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    // Survivors stay in id order, or in rank order once top-k cut them: either way an order
    // fixed by the logits alone, which every sum below follows. A full sort of a 128k
    // vocabulary would cost milliseconds per token; selection costs a pass.
    let mut ranked = false;
    let k = params.top_k;
    if k > 0 && k < survivors.len() {
        survivors.select_nth_unstable_by(k - 1, by_rank);
        survivors.truncate(k);
        survivors.sort_unstable_by(by_rank);
        ranked = true;
    }
    // Softmax over the survivors, in f64: the extra precision keeps tiny probabilities from
    // rounding to zero. Each weight is computed once, beside its id.
    let temperature = f64::from(params.temperature);
    let max = survivors
        .iter()
        .map(|&i| f64::from(logits[i as usize]))
        .fold(f64::NEG_INFINITY, f64::max);
    let weighted: Vec<(u32, f64)> = survivors
        .into_iter()
        .map(|i| {
            (
                i,
                ((f64::from(logits[i as usize]) - max) / temperature).exp(),
            )
        })
        .collect();
    let total: f64 = weighted.iter().map(|&(_, w)| w).sum();
    let threshold = f64::from(params.top_p) * total;
    let (kept, mass) = if params.top_p >= 1.0 {
        (weighted, total)
    } else {
        nucleus(weighted, ranked, |a, b| by_rank(&a.0, &b.0), threshold)
    };
    let target = u * mass;
    let mut cumulative = 0.0;
    for &(id, w) in &kept {
        cumulative += w;
        if target < cumulative {
            return Ok(id);
        }
    }
    // Rounding can leave `target` a hair above the last partial sum.
    Ok(kept[kept.len() - 1].0)
}

/// The fewest best-ranked of the weighted `survivors` whose weights add up to at least
/// `threshold` (one at least), in rank order, and their total weight. Ranks the best 256 first
/// and four times more each time that is not enough: a peaked distribution's nucleus is small.
fn nucleus(
    mut survivors: Vec<(u32, f64)>,
    ranked: bool,
    by_rank: impl Fn(&(u32, f64), &(u32, f64)) -> std::cmp::Ordering,
    threshold: f64,
) -> (Vec<(u32, f64)>, f64) {
    let mut best = if ranked { survivors.len() } else { 256 };
    loop {
        if !ranked {
            if best < survivors.len() {
                survivors.select_nth_unstable_by(best - 1, &by_rank);
                survivors[..best].sort_unstable_by(&by_rank);
            } else {
                survivors.sort_unstable_by(&by_rank);
            }
        }
        let mut mass = 0.0;
        for (n, &(_, w)) in survivors.iter().take(best).enumerate() {
            if n > 0 && mass >= threshold {
                survivors.truncate(n);
                return (survivors, mass);
            }
            mass += w;
        }
        if ranked || best >= survivors.len() {
            return (survivors, mass);
        }
        best *= 4;
    }
}
