//! Training data: text files tokenized as `bitnet perplexity` tokenizes a text, joined into one
//! stream of ids, cut into windows and drawn in batches, in a seeded order that a checkpoint can
//! resume exactly.

use std::ops::Range;
#[cfg(not(target_arch = "wasm32"))]
use std::path::{Path, PathBuf};

use crate::rng::SplitMix64;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Reads UTF-8 text files. Errors name the file: one that cannot be read, is not UTF-8, or holds
/// no text at all; and an empty list.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_texts(paths: &[PathBuf]) -> Result<Vec<String>> {
    if paths.is_empty() {
        return Err(Error::Empty("the list of data files"));
    }
    paths.iter().map(|p| read_text(p)).collect()
}

/// One UTF-8 text file, refused when empty (or only whitespace) or not UTF-8.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_text(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        ))
    })?;
    if text.trim().is_empty() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file holds no text",
        )));
    }
    Ok(text)
}

/// The ids of `texts` as one stream: each text as [`Tokenizer::encode`]`(text, true)` gives it
/// (what `bitnet perplexity` scores), with the tokenizer's eos between consecutive texts (none
/// when the tokenizer has no eos).
pub fn tokenize(texts: &[String], tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        if i > 0 {
            ids.extend(tokenizer.eos());
        }
        ids.extend(tokenizer.encode(text, true)?);
    }
    Ok(ids)
}

/// A 64-bit FNV-1a hash of token ids, to recognize the same data when a run resumes.
pub fn fingerprint(ids: &[u32]) -> u64 {
    ids.iter()
        .flat_map(|id| id.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Where a [`Batches`] stands: the pass over the data and the next window of that pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: usize,
}

/// Windows of `context` tokens at `0, context, 2 * context, ...` (the tokens past the last whole
/// window are not used), drawn `batch` at a time. Shuffled: each pass over the data visits every
/// window once, in an order drawn from the seed and the pass number (so a position alone
/// resumes it); not shuffled: in order from the start. A batch that runs past the end of a
/// pass continues into the next.
#[derive(Clone, Debug)]
pub struct Batches {
    context: usize,
    windows: usize,
    shuffle: bool,
    seed: u64,
    position: DataPosition,
    order: Vec<usize>,
}

impl Batches {
    /// Batches over `tokens` ids. Errors: fewer tokens than one window, or a window shorter than
    /// 2 tokens (one prediction needs two).
    pub fn new(tokens: usize, context: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if context < 2 {
            return Err(Error::invalid(
                "context",
                format!("{context} tokens: a window needs at least 2"),
            ));
        }
        if tokens < context {
            return Err(Error::invalid(
                "training data",
                format!("{tokens} tokens, shorter than one window of {context} tokens"),
            ));
        }
        let mut batches = Batches {
            context,
            windows: tokens / context,
            shuffle,
            seed,
            position: DataPosition::default(),
            order: Vec::new(),
        };
        batches.seek(DataPosition::default());
        Ok(batches)
    }

    /// Windows per pass over the data.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// The position the next batch starts from.
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Continues from `position` (as [`Batches::position`] gave it).
    pub fn seek(&mut self, position: DataPosition) {
        self.order = self.pass_order(position.epoch);
        self.position = DataPosition {
            epoch: position.epoch,
            cursor: position.cursor.min(self.windows),
        };
    }

    /// The token ranges of the next `batch` windows.
    pub fn next_batch(&mut self, batch: usize) -> Vec<Range<usize>> {
        (0..batch)
            .map(|_| {
                if self.position.cursor == self.windows {
                    self.seek(DataPosition {
                        epoch: self.position.epoch + 1,
                        cursor: 0,
                    });
                }
                let start = self.order[self.position.cursor] * self.context;
                self.position.cursor += 1;
                start..start + self.context
            })
            .collect()
    }

    /// The order of the windows in pass `epoch`: Fisher-Yates with [`SplitMix64`] seeded from
    /// the seed and the pass, or the identity without shuffling.
    fn pass_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.windows).collect();
        if self.shuffle {
            let mut rng = SplitMix64(self.seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F));
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unshuffled_batches_walk_the_data_in_order() {
        let mut b = Batches::new(10, 3, false, 0).unwrap();
        assert_eq!(b.windows(), 3);
        assert_eq!(b.next_batch(2), [0..3, 3..6]);
        // The pass ends after one more window; the batch continues into the next pass.
        assert_eq!(b.next_batch(2), [6..9, 0..3]);
        assert_eq!(
            b.position(),
            DataPosition {
                epoch: 1,
                cursor: 1
            }
        );
    }

    #[test]
    fn shuffled_passes_visit_every_window_and_resume_exactly() {
        let mut b = Batches::new(1000, 10, true, 7).unwrap();
        let mut first: Vec<usize> = b.next_batch(100).iter().map(|r| r.start / 10).collect();
        assert_ne!(first, (0..100).collect::<Vec<_>>());
        first.sort_unstable();
        assert_eq!(first, (0..100).collect::<Vec<_>>());
        b.next_batch(37);
        let saved = b.position();
        let want = b.next_batch(50);
        let mut resumed = Batches::new(1000, 10, true, 7).unwrap();
        resumed.seek(saved);
        assert_eq!(resumed.next_batch(50), want);
        // Another seed, another order.
        let mut other = Batches::new(1000, 10, true, 8).unwrap();
        assert_ne!(
            other.next_batch(10),
            Batches::new(1000, 10, true, 7).unwrap().next_batch(10)
        );
    }

    #[test]
    fn too_little_data_is_an_error() {
        let err = Batches::new(5, 8, true, 0).unwrap_err();
        assert!(err.to_string().contains("shorter than one window"), "{err}");
        assert!(Batches::new(5, 1, true, 0).is_err());
    }

    #[test]
    fn files_join_with_the_eos() {
        let t = Tokenizer::bytes(258);
        let ids = tokenize(&["ab".into(), "c".into()], &t).unwrap();
        assert_eq!(ids, [256, 97, 98, 257, 256, 99]);
        assert_ne!(fingerprint(&ids), fingerprint(&ids[1..]));
    }
}
