//! Learning-rate schedules: a factor on the base rate per optimizer step, as transformers'
//! `get_*_schedule_with_warmup` lambdas compute it.

/// How the learning rate moves over a run. Every schedule ramps linearly from 0 over its
/// `warmup` steps (step `s < warmup` gets `s / warmup`; step 0 therefore updates with rate 0, as
/// in transformers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate after warm-up.
    Constant { warmup: usize },
    /// From the base rate at `warmup` down linearly to 0 at `total`, and 0 after.
    Linear { warmup: usize, total: usize },
    /// From the base rate at `warmup` down a half cosine to `min_ratio` times the base rate at
    /// `total`, and that after (`min_ratio` 0 is transformers' cosine schedule).
    Cosine {
        warmup: usize,
        total: usize,
        min_ratio: f32,
    },
}

impl Schedule {
    /// The factor on the base learning rate for optimizer step `step` (counted from 0).
    ///
    /// ```
    /// use bitnet_wgpu::train::Schedule;
    /// let s = Schedule::Linear { warmup: 10, total: 110 };
    /// assert_eq!((s.factor(5), s.factor(10), s.factor(60), s.factor(110)), (0.5, 1.0, 0.5, 0.0));
    /// ```
    pub fn factor(&self, step: usize) -> f32 {
        let warmup = match *self {
            Schedule::Constant { warmup }
            | Schedule::Linear { warmup, .. }
            | Schedule::Cosine { warmup, .. } => warmup,
        };
        if step < warmup {
            return step as f32 / warmup as f32;
        }
        // How far along the decay: 0 at `warmup`, 1 from `total` on.
        let progress = |total: usize| {
            ((step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0)
        };
        match *self {
            Schedule::Constant { .. } => 1.0,
            Schedule::Linear { total, .. } => (1.0 - progress(total)) as f32,
            Schedule::Cosine {
                total, min_ratio, ..
            } => {
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress(total)).cos());
                (f64::from(min_ratio) + (1.0 - f64::from(min_ratio)) * cosine) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_at_their_endpoints() {
        let constant = Schedule::Constant { warmup: 4 };
        assert_eq!(constant.factor(0), 0.0);
        assert_eq!(constant.factor(2), 0.5);
        assert_eq!(constant.factor(4), 1.0);
        assert_eq!(constant.factor(1_000_000), 1.0);
        assert_eq!(Schedule::Constant { warmup: 0 }.factor(0), 1.0);

        let linear = Schedule::Linear {
            warmup: 2,
            total: 12,
        };
        assert_eq!(linear.factor(0), 0.0);
        assert_eq!(linear.factor(1), 0.5);
        assert_eq!(linear.factor(2), 1.0);
        assert_eq!(linear.factor(7), 0.5);
        assert_eq!(linear.factor(12), 0.0);
        assert_eq!(linear.factor(13), 0.0);

        let cosine = Schedule::Cosine {
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert_eq!(cosine.factor(0), 0.0);
        assert_eq!(cosine.factor(10), 1.0);
        assert!(
            (cosine.factor(60) - 0.55).abs() < 1e-6,
            "{}",
            cosine.factor(60)
        );
        assert!((cosine.factor(110) - 0.1).abs() < 1e-7);
        assert!((cosine.factor(500) - 0.1).abs() < 1e-7);
        let plain = Schedule::Cosine {
            warmup: 0,
            total: 100,
            min_ratio: 0.0,
        };
        assert_eq!(plain.factor(0), 1.0);
        assert!(plain.factor(100).abs() < 1e-7);
        // Monotone after warm-up.
        assert!((10..110).all(|s| cosine.factor(s + 1) <= cosine.factor(s)));
    }
}
