//! A byte-level BPE tokenizer trained on the training texts, shaped like Llama 3's: Llama 3's
//! split regex then byte-level mapping, a byte-level decoder, `<|begin_of_text|>` and
//! `<|end_of_text|>` as special tokens, and a post-processor that starts every text with the bos.

use std::collections::HashSet;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::tokenizer::{LLAMA3_SPLIT, Tokenizer};
use crate::{Error, Result};

/// The token that starts every text.
pub const BOS_TOKEN: &str = "<|begin_of_text|>";
/// The token between texts (and where generation stops).
pub const EOS_TOKEN: &str = "<|end_of_text|>";

/// The smallest vocabulary worth training: the 256 bytes and the two special tokens.
pub const MIN_BPE_VOCAB: usize = 258;

/// A trained tokenizer: the crate's [`Tokenizer`] and its `tokenizer.json` text.
#[derive(Clone, Debug)]
pub struct TrainedTokenizer {
    pub tokenizer: Tokenizer,
    pub json: String,
    /// The ids of [`BOS_TOKEN`] and [`EOS_TOKEN`] (0 and 1).
    pub bos: u32,
    pub eos: u32,
}

/// Trains a byte-level BPE of at most `vocab_size` tokens (fewer when the texts run out of
/// pairs to merge) on `texts` with the `tokenizers` crate's `BpeTrainer`. Every byte is in the
/// vocabulary, so any text encodes. Deterministic for the same texts. Errors: a `vocab_size`
/// below [`MIN_BPE_VOCAB`], and failures inside `tokenizers`.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<TrainedTokenizer> {
    if vocab_size < MIN_BPE_VOCAB {
        return Err(Error::invalid(
            "vocab size",
            format!("{vocab_size}: a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens"),
        ));
    }
    let fail = |e: tokenizers::Error| Error::invalid("tokenizer training", e);
    let specials = [BOS_TOKEN, EOS_TOKEN].map(|t| AddedToken::from(t, true));
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.to_vec())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<_>>())
        .build();
    let mut inner = tokenizers::Tokenizer::new(BPE::default());
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(fail)?;
    inner.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    inner.with_decoder(Some(ByteLevel::default()));
    inner
        .train(&mut TrainerWrapper::BpeTrainer(trainer), texts.iter())
        .map_err(fail)?;
    let id = |token: &str| {
        inner
            .token_to_id(token)
            .ok_or_else(|| Error::invalid("tokenizer training", format!("no id for {token}")))
    };
    let (bos, eos) = (id(BOS_TOKEN)?, id(EOS_TOKEN)?);
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN} $A"))
        .and_then(|b| b.try_pair(format!("{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1")))
        .map_err(|e| Error::invalid("tokenizer template", e))?
        .special_tokens(vec![(BOS_TOKEN, bos)])
        .build()
        .map_err(|e| Error::invalid("tokenizer template", e))?;
    inner.with_post_processor(Some(template));
    let json = inner.to_string(true).map_err(fail)?;
    let tokenizer =
        Tokenizer::from_json(json.as_bytes())?.with_special_ids(Some(bos), Some(eos))?;
    Ok(TrainedTokenizer {
        tokenizer,
        json,
        bos,
        eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_llama3_like_byte_level_bpe() {
        let text = "the cat sat on the mat. the cat sat on the hat. ".repeat(20);
        let t = train_bpe(&[text.clone(), "héllo wörld".into()], 300).unwrap();
        assert_eq!((t.bos, t.eos), (0, 1));
        assert!(t.tokenizer.vocab_size() <= 300 && t.tokenizer.vocab_size() > 258);
        let ids = t.tokenizer.encode("the cat sat", true).unwrap();
        assert_eq!(ids[0], t.bos);
        // Merges learnt: fewer tokens than bytes; any text (even unseen bytes) round-trips.
        assert!(ids.len() < 1 + "the cat sat".len(), "{ids:?}");
        for s in ["the cat sat", "ünseen ✓ text\n\n  x"] {
            let ids = t.tokenizer.encode(s, true).unwrap();
            assert_eq!(t.tokenizer.decode(&ids).unwrap(), s);
        }
        // The json loads back to the same tokenizer.
        let again = Tokenizer::from_json(t.json.as_bytes()).unwrap();
        assert_eq!(
            again.encode(&text, true).unwrap(),
            t.tokenizer.encode(&text, true).unwrap()
        );
        assert!(train_bpe(&[text], 100).is_err());
    }
}
