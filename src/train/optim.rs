//! Optimizers (torch's AdamW and SGD, update for update) and global gradient-norm clipping.

use super::params::Parameters;
use crate::{Error, Result};

/// torch.optim.AdamW's hyper-parameters and moments.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to every tensor (torch with a single parameter group).
    pub weight_decay: f32,
    /// First and second moments, shaped like the parameters once the first step has run.
    moments: Option<(Parameters, Parameters)>,
    /// Steps taken (torch's `step`, counted from 1 at the first update).
    steps: u32,
}

impl Default for AdamW {
    /// torch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamW::new(0.9, 0.999, 1e-8, 0.01)
    }
}

impl AdamW {
    /// An optimizer that has taken no step yet.
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            moments: None,
            steps: 0,
        }
    }

    /// The first and second moments (`None` before the first step) and the number of steps
    /// taken: everything a checkpoint needs to continue the run.
    pub fn state(&self) -> (Option<(&Parameters, &Parameters)>, u32) {
        (self.moments.as_ref().map(|(m, v)| (m, v)), self.steps)
    }

    /// Sets the moments and step count, as [`AdamW::state`] gave them (resuming a run).
    pub fn restore(&mut self, moments: Option<(Parameters, Parameters)>, steps: u32) {
        self.moments = moments;
        self.steps = steps;
    }

    /// One update of every parameter from its gradient at learning rate `lr`, as torch's
    /// single-tensor AdamW (amsgrad off) computes it, per scalar in f32:
    ///
    /// ```text
    /// w = w * (1 - lr * weight_decay)          decay first, on the old weight
    /// m = m + (1 - beta1) * (g - m)            torch's lerp
    /// v = v * beta2 + (1 - beta2) * g * g
    /// w = w - (lr / (1 - beta1^t)) * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps))
    /// ```
    ///
    /// The scalar factors are formed in f64 and rounded to f32, as torch does with its Python
    /// floats. Errors when `grads` is shaped unlike `params` or unlike the moments of earlier
    /// steps.
    pub fn update(&mut self, params: &mut Parameters, grads: &Parameters, lr: f32) -> Result<()> {
        params.check_same_shape(grads)?;
        let (m, v) = self
            .moments
            .get_or_insert_with(|| (params.zeros_like(), params.zeros_like()));
        m.check_same_shape(params)?;
        self.steps += 1;
        let t = f64::from(self.steps);
        let (lr64, beta1, beta2) = (f64::from(lr), f64::from(self.beta1), f64::from(self.beta2));
        let decay = (1.0 - lr64 * f64::from(self.weight_decay)) as f32;
        let (one_minus_beta1, one_minus_beta2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
        let step_size = (lr64 / (1.0 - beta1.powf(t))) as f32;
        let bias2_sqrt = (1.0 - beta2.powf(t)).sqrt() as f32;
        let tensors = params
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors())
            .zip(m.tensors_mut())
            .zip(v.tensors_mut());
        for (((w, (_, g)), m), v) in tensors {
            for i in 0..w.len() {
                w[i] *= decay;
                m[i] += one_minus_beta1 * (g[i] - m[i]);
                v[i] = v[i] * self.beta2 + one_minus_beta2 * g[i] * g[i];
                let denom = v[i].sqrt() / bias2_sqrt + self.eps;
                w[i] -= step_size * (m[i] / denom);
            }
        }
        Ok(())
    }
}

/// torch.optim.SGD's hyper-parameters and momentum buffer (no dampening, no Nesterov).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sgd {
    /// 0 for plain gradient descent.
    pub momentum: f32,
    /// L2 penalty added to the gradient (torch's coupled `weight_decay`).
    pub weight_decay: f32,
    buffer: Option<Parameters>,
}

impl Sgd {
    /// An optimizer that has taken no step yet.
    pub fn new(momentum: f32, weight_decay: f32) -> Self {
        Sgd {
            momentum,
            weight_decay,
            buffer: None,
        }
    }

    /// The momentum buffer (`None` before the first step or without momentum history).
    pub fn buffer(&self) -> Option<&Parameters> {
        self.buffer.as_ref()
    }

    /// Sets the momentum buffer, as [`Sgd::buffer`] gave it (resuming a run).
    pub fn restore(&mut self, buffer: Option<Parameters>) {
        self.buffer = buffer;
    }

    /// One update at learning rate `lr`, per scalar as torch computes it:
    /// `d = g + weight_decay * w`; with momentum `b = d` at the first step and
    /// `b = momentum * b + d` after, then `d = b`; finally `w = w - lr * d`.
    /// Errors when `grads` is shaped unlike `params`.
    pub fn update(&mut self, params: &mut Parameters, grads: &Parameters, lr: f32) -> Result<()> {
        params.check_same_shape(grads)?;
        let first = self.buffer.is_none();
        let buffer = self.buffer.get_or_insert_with(|| params.zeros_like());
        buffer.check_same_shape(params)?;
        let tensors = params
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors())
            .zip(buffer.tensors_mut());
        for ((w, (_, g)), b) in tensors {
            for i in 0..w.len() {
                let mut d = g[i] + self.weight_decay * w[i];
                if self.momentum != 0.0 {
                    b[i] = if first { d } else { self.momentum * b[i] + d };
                    d = b[i];
                }
                w[i] -= lr * d;
            }
        }
        Ok(())
    }
}

/// The optimizer of a training run.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// One update of `params` from `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &mut Parameters, grads: &Parameters, lr: f32) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.update(params, grads, lr),
            Optimizer::Sgd(o) => o.update(params, grads, lr),
        }
    }
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, `norm` being the L2 norm over all
/// of them together (torch's `clip_grad_norm_`), and returns that norm, taken before clipping.
/// Errors on a `max_norm` that is negative or NaN.
///
/// ```
/// use bitnet_wgpu::train::{Parameters, clip_grad_norm};
/// let mut g = Parameters { embed_tokens: vec![3.0, 4.0], layers: vec![], norm: vec![], lm_head: None };
/// assert_eq!(clip_grad_norm(&mut g, 1.0)?, 5.0);
/// assert!((g.global_norm() - 1.0).abs() < 1e-6);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn clip_grad_norm(grads: &mut Parameters, max_norm: f32) -> Result<f32> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "max_norm",
            format!("{max_norm} is not a non-negative number"),
        ));
    }
    let norm = grads.global_norm();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    for t in grads.tensors_mut() {
        t.iter_mut().for_each(|g| *g *= coef);
    }
    Ok(norm)
}

/// The f32 factors of one AdamW step, formed as [`AdamW::update`] forms them (in f64, rounded to
/// f32), for updating one tensor at a time ([`adamw_tensor`], and the GPU's optimizer shader).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
}

impl AdamWStep {
    /// The factors of step `t` (counted from 1) of `opt`'s hyper-parameters at learning rate `lr`.
    pub fn new(opt: &AdamW, lr: f32, t: u32) -> Self {
        let t = f64::from(t);
        let (lr64, beta1, beta2) = (f64::from(lr), f64::from(opt.beta1), f64::from(opt.beta2));
        AdamWStep {
            beta2: opt.beta2,
            eps: opt.eps,
            decay: (1.0 - lr64 * f64::from(opt.weight_decay)) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step_size: (lr64 / (1.0 - beta1.powf(t))) as f32,
            bias2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
        }
    }
}

/// One AdamW update of one tensor `w` from its gradient `g` times `grad_scale` (a clipping
/// coefficient, 1 for none), with its moments `m` and `v`: per scalar exactly the arithmetic of
/// [`AdamW::update`], so that an optimizer state kept per tensor (on the GPU) has a CPU twin.
/// Panics when the slices differ in length.
pub fn adamw_tensor(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    grad_scale: f32,
    step: &AdamWStep,
) {
    assert!(g.len() == w.len() && m.len() == w.len() && v.len() == w.len());
    for i in 0..w.len() {
        let g = g[i] * grad_scale;
        w[i] *= step.decay;
        m[i] += step.one_minus_beta1 * (g - m[i]);
        v[i] = v[i] * step.beta2 + step.one_minus_beta2 * g * g;
        let denom = v[i].sqrt() / step.bias2_sqrt + step.eps;
        w[i] -= step.step_size * (m[i] / denom);
    }
}

/// One SGD update of one tensor `w` from its gradient `g` times `grad_scale`, with its momentum
/// buffer `b` (untouched when `opt.momentum` is 0; `first` for the optimizer's first step): per
/// scalar exactly the arithmetic of [`Sgd::update`]. Panics when the slices differ in length.
pub fn sgd_tensor(
    w: &mut [f32],
    g: &[f32],
    b: &mut [f32],
    grad_scale: f32,
    opt: &Sgd,
    lr: f32,
    first: bool,
) {
    assert!(g.len() == w.len() && b.len() == w.len());
    for i in 0..w.len() {
        let mut d = g[i] * grad_scale + opt.weight_decay * w[i];
        if opt.momentum != 0.0 {
            b[i] = if first { d } else { opt.momentum * b[i] + d };
            d = b[i];
        }
        w[i] -= lr * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(values: &[f32]) -> Parameters {
        Parameters {
            embed_tokens: values.to_vec(),
            layers: vec![],
            norm: vec![],
            lm_head: None,
        }
    }

    #[test]
    fn adamw_two_steps_by_hand() {
        // lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.1. Step 1 on w = 1, g = 0.5:
        // w = 0.99; m = 0.05, v = 0.00025; m̂ = 0.5, v̂ = 0.25; w = 0.99 - 0.1 * 0.5 / 0.5 = 0.89.
        // Step 2, g = -0.25: w = 0.8811; m = 0.02, v = 0.00031225; m̂ = 0.02 / 0.19,
        // v̂ = 0.00031225 / 0.001999; w = 0.8811 - 0.1 * m̂ / sqrt(v̂) = 0.854466298687846.
        // The second weight sees g = 0 (decay only: -1.98) then g = 0.001.
        let mut w = params(&[1.0, -2.0]);
        let mut adam = AdamW::new(0.9, 0.999, 1e-8, 0.1);
        adam.update(&mut w, &params(&[0.5, 0.0]), 0.1).unwrap();
        assert!(
            (w.embed_tokens[0] - 0.89).abs() < 1e-6,
            "{:?}",
            w.embed_tokens
        );
        assert!(
            (w.embed_tokens[1] + 1.98).abs() < 1e-6,
            "{:?}",
            w.embed_tokens
        );
        adam.update(&mut w, &params(&[-0.25, 1e-3]), 0.1).unwrap();
        assert!((f64::from(w.embed_tokens[0]) - 0.854_466_298_687_846).abs() < 1e-6);
        assert!((f64::from(w.embed_tokens[1]) + 2.034_612_630_266_31).abs() < 1e-6);
        assert!(adam.update(&mut w, &params(&[1.0]), 0.1).is_err());
    }

    #[test]
    fn sgd_with_momentum_two_steps_by_hand() {
        // d = g + 0.1 w: 0.6, buffer 0.6, w = 0.94; then d = -0.25 + 0.094 = -0.156,
        // buffer = 0.9 * 0.6 - 0.156 = 0.384, w = 0.94 - 0.0384 = 0.9016.
        let mut w = params(&[1.0]);
        let mut sgd = Sgd::new(0.9, 0.1);
        sgd.update(&mut w, &params(&[0.5]), 0.1).unwrap();
        assert!((w.embed_tokens[0] - 0.94).abs() < 1e-6);
        sgd.update(&mut w, &params(&[-0.25]), 0.1).unwrap();
        assert!((w.embed_tokens[0] - 0.9016).abs() < 1e-6);
        let mut plain = params(&[1.0]);
        Sgd::new(0.0, 0.0)
            .update(&mut plain, &params(&[0.5]), 0.1)
            .unwrap();
        assert_eq!(plain.embed_tokens, [0.95]);
    }

    #[test]
    fn clipping_scales_only_above_the_limit() {
        let mut g = params(&[3.0, 4.0]);
        g.norm = vec![12.0]; // global norm 13
        assert_eq!(clip_grad_norm(&mut g, 100.0).unwrap(), 13.0);
        assert_eq!(
            (g.embed_tokens.clone(), g.norm.clone()),
            (vec![3.0, 4.0], vec![12.0])
        );
        assert_eq!(clip_grad_norm(&mut g, 1.3).unwrap(), 13.0);
        let coef = 1.3 / (13.0 + 1e-6);
        assert_eq!(g.embed_tokens, [3.0 * coef, 4.0 * coef]);
        assert!((g.global_norm() - 1.3).abs() < 1e-6);
        assert!(clip_grad_norm(&mut g, -1.0).is_err());
    }

    #[test]
    fn per_tensor_updates_are_the_optimizers_own() {
        // Three steps of both optimizers on two tensors, by Parameters and by tensor, bit for bit.
        let mut rng = crate::rng::SplitMix64(7);
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        let shaped = |a: &[f32], b: &[f32]| Parameters {
            embed_tokens: a.to_vec(),
            layers: vec![],
            norm: b.to_vec(),
            lm_head: None,
        };
        let (w0, w1) = (values(7), values(3));
        let mut adam = AdamW::new(0.9, 0.95, 1e-8, 0.1);
        let mut sgd = Sgd::new(0.9, 0.01);
        let (mut by_params, mut sgd_params) = (shaped(&w0, &w1), shaped(&w0, &w1));
        let (mut tw, mut sw) = ([w0.clone(), w1.clone()], [w0, w1]);
        let mut m = [vec![0.0; 7], vec![0.0; 3]];
        let mut v = m.clone();
        let mut b = m.clone();
        for t in 1..=3 {
            let (g0, g1) = (values(7), values(3));
            adam.update(&mut by_params, &shaped(&g0, &g1), 0.01)
                .unwrap();
            sgd.update(&mut sgd_params, &shaped(&g0, &g1), 0.01)
                .unwrap();
            let step = AdamWStep::new(&adam, 0.01, t);
            for (i, g) in [g0, g1].iter().enumerate() {
                adamw_tensor(&mut tw[i], g, &mut m[i], &mut v[i], 1.0, &step);
                sgd_tensor(&mut sw[i], g, &mut b[i], 1.0, &sgd, 0.01, t == 1);
            }
            assert_eq!((&by_params.embed_tokens, &by_params.norm), (&tw[0], &tw[1]));
            assert_eq!(
                (&sgd_params.embed_tokens, &sgd_params.norm),
                (&sw[0], &sw[1])
            );
        }
    }
}
