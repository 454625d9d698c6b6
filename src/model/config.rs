use crate::model::Family;

/// The hyper-parameters of a BitNet model (the fields of Hugging Face's config.json that matter).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Which decoder the tensors make up (activation, sub-norms, file names).
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head dimension (`hidden_size / num_attention_heads` unless the config says otherwise).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Errors unless the sizes are positive, the query heads split evenly over the key/value
    /// heads, `head_dim` is even (RoPE rotates pairs), `rms_norm_eps` is finite and non-negative and
    /// `rope_theta` finite and positive.
    pub fn validate(&self) -> crate::Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(crate::Error::invalid(
                "model config",
                format!("{name} is 0"),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(crate::Error::invalid(
                "model config",
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(crate::Error::invalid(
                "model config",
                format!("head_dim {} is odd (RoPE rotates pairs)", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(crate::Error::invalid(
                "model config",
                format!(
                    "rms_norm_eps {} is not a finite non-negative number",
                    self.rms_norm_eps
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(crate::Error::invalid(
                "model config",
                format!(
                    "rope_theta {} is not a finite positive number",
                    self.rope_theta
                ),
            ));
        }
        Ok(())
    }

    /// Errors unless `tokens` is a non-empty run of ids below the vocabulary size.
    pub fn check_tokens(&self, tokens: &[u32]) -> crate::Result<()> {
        if tokens.is_empty() {
            return Err(crate::Error::Empty("token sequence"));
        }
        match tokens
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= self.vocab_size)
        {
            Some((i, id)) => Err(crate::Error::invalid(
                "token id",
                format!(
                    "token {id} at index {i} is not below the vocabulary size {}",
                    self.vocab_size
                ),
            )),
            None => Ok(()),
        }
    }
}
