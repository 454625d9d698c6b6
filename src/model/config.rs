/// The hyper-parameters of a BitNet model (the fields of Hugging Face's config.json that matter).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
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
