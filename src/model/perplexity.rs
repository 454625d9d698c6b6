//! A text's perplexity under a model: scored in consecutive windows of the model's context, the
//! negative log-likelihoods of every predicted token summed in f64.

use std::ops::Range;

use crate::model::Engine;
use crate::{Error, Result};

/// What [`Engine::perplexity`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp` of the mean negative log-likelihood of the scored tokens.
    pub perplexity: f64,
    /// Tokens predicted (each window's first token has no prediction).
    pub scored: usize,
    /// Windows the text was split into ([`perplexity_windows`]).
    pub windows: usize,
    /// Tokens per window.
    pub context: usize,
}

impl Engine {
    /// The perplexity of the token ids `ids`, scored in windows of `context` tokens, each from
    /// an empty cache; `on_scored` gets the number of tokens scored so far after each window (a
    /// progress bar's). The engine's sequence is forgotten.
    ///
    /// Errors: `context` outside `2..=max_position_embeddings`, fewer than 2 ids, and logits that
    /// are not numbers (NaN), with the position of the token.
    ///
    /// ```
    /// use bitnet_wgpu::model::{CpuEngine, Engine, ModelConfig, synthetic};
    /// let config = ModelConfig { vocab_size: 32, hidden_size: 16, intermediate_size: 32,
    ///     num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8,
    ///     max_position_embeddings: 8, ..ModelConfig::bitnet_b158_2b4t() };
    /// let mut engine = Engine::Cpu(Box::new(CpuEngine::new(&synthetic(&config, 3))?));
    /// let p = pollster::block_on(engine.perplexity(&[1, 5, 9, 2, 7, 3, 3, 1, 4, 4], 4, &mut |_| {}))?;
    /// assert_eq!((p.scored, p.windows), (7, 3));
    /// assert!(p.perplexity > 1.0);
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub async fn perplexity(
        &mut self,
        ids: &[u32],
        context: usize,
        on_scored: &mut dyn FnMut(usize),
    ) -> Result<Perplexity> {
        let max = self.config().max_position_embeddings;
        if !(2..=max).contains(&context) {
            return Err(Error::invalid(
                "perplexity context",
                format!(
                    "{context}: a window needs 2 to {max} tokens (the model's \
                     max_position_embeddings)"
                ),
            ));
        }
        let windows = perplexity_windows(ids.len(), context);
        let scored: usize = windows.iter().map(|w| w.len() - 1).sum();
        if scored == 0 {
            return Err(Error::invalid(
                "perplexity text",
                format!("{} token(s), and perplexity needs at least 2", ids.len()),
            ));
        }
        let (mut total, mut done) = (0.0, 0);
        for window in windows.iter().filter(|w| w.len() >= 2) {
            self.reset();
            let nll = self.nll(&ids[window.clone()]).await?;
            if let Some(i) = nll.iter().position(|v| v.is_nan()) {
                return Err(Error::invalid(
                    "model output",
                    format!(
                        "the logits for token {} of the text are not numbers (NaN): the \
                         checkpoint's weights or norms hold NaN or overflow",
                        window.start + i + 1
                    ),
                ));
            }
            total += nll.iter().sum::<f64>();
            done += window.len() - 1;
            on_scored(done);
        }
        self.reset();
        Ok(Perplexity {
            perplexity: (total / scored as f64).exp(),
            scored,
            windows: windows.len(),
            context,
        })
    }
}

/// Splits `n_tokens` into consecutive, non-overlapping windows of `context` tokens, the last one
/// shorter when `context` does not divide `n_tokens`. Each window is scored on its own, so its
/// first token is predicted from nothing and only the following ones count. `context == 0` gives
/// no window.
///
/// ```
/// use bitnet_wgpu::model::perplexity_windows;
/// assert_eq!(perplexity_windows(10, 4), [0..4, 4..8, 8..10]);
/// assert_eq!(perplexity_windows(8, 4), [0..4, 4..8]);
/// ```
pub fn perplexity_windows(n_tokens: usize, context: usize) -> Vec<Range<usize>> {
    if context == 0 {
        return Vec::new();
    }
    (0..n_tokens)
        .step_by(context)
        .map(|start| start..(start + context).min(n_tokens))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_token_once() {
        assert_eq!(perplexity_windows(0, 4), Vec::<Range<usize>>::new());
        assert_eq!(perplexity_windows(3, 4), [Range { start: 0, end: 3 }]);
        assert_eq!(perplexity_windows(9, 4), [0..4, 4..8, 8..9]);
        assert!(perplexity_windows(5, 0).is_empty());
        for (n, c) in [(1000, 7), (1024, 256), (5, 1)] {
            let w = perplexity_windows(n, c);
            assert_eq!(w.len(), n.div_ceil(c));
            assert!(w.windows(2).all(|p| p[0].end == p[1].start));
            assert_eq!((w[0].start, w.last().unwrap().end), (0, n));
        }
    }
}
