//! The greedy choice over a row of logits.

use crate::{Error, Result};

/// The id of the largest logit, the lowest id on ties (`-0.0` below `+0.0`, as
/// [`f32::total_cmp`] orders them); `-inf` marks a forbidden token and is never chosen.
/// Errors: no logits, a NaN or `+inf` logit (the first is named), or every logit `-inf`.
///
/// ```
/// use bitnet_wgpu::cpu::argmax;
/// assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0])?, 1);
/// assert_eq!(argmax(&[f32::NEG_INFINITY, -7.0])?, 1);
/// assert!(argmax(&[1.0, f32::NAN]).is_err());
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn argmax(logits: &[f32]) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::Empty("logits"));
    }
    let mut best: Option<usize> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || v == f32::INFINITY {
            return Err(Error::NonFinite {
                what: "logits",
                row: 0,
                col: i,
                value: v,
            });
        }
        if v == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|b| v.total_cmp(&logits[b]).is_gt()) {
            best = Some(i);
        }
    }
    best.map(|b| b as u32)
        .ok_or_else(|| Error::invalid("logits", "every token is -inf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_take_the_lowest_id_and_signed_zeros_order() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0, 5.0]).unwrap(), 1);
        assert_eq!(argmax(&[-0.0, 0.0, -0.0]).unwrap(), 1);
        assert_eq!(argmax(&[f32::MIN, f32::NEG_INFINITY]).unwrap(), 0);
    }

    #[test]
    fn bad_logits_are_errors() {
        assert!(matches!(
            argmax(&[1.0, f32::INFINITY, f32::NAN]),
            Err(Error::NonFinite { col: 1, .. })
        ));
        assert!(argmax(&[f32::NEG_INFINITY; 3]).is_err());
        assert!(matches!(argmax(&[]), Err(Error::Empty(_))));
    }
}
