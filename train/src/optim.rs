//! AdamW with decoupled weight decay (the update of `torch.optim.AdamW`), the warmup +
//! cosine learning-rate schedule, and global-norm gradient clipping
//! (`torch.nn.utils.clip_grad_norm_`). f32 master weights and moments.

use serde::{Deserialize, Serialize};

use massv::{Error, Result};

use crate::params::Params;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer's state: first and second moments of every trainable tensor and the
/// number of steps taken.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Params,
    pub v: Params,
    pub t: u64,
}

impl AdamW {
    /// Zero moments shaped like `trainable`.
    pub fn new(cfg: AdamWConfig, trainable: &Params) -> Self {
        AdamW {
            cfg,
            m: trainable.zeros_like(|_| true),
            v: trainable.zeros_like(|_| true),
            t: 0,
        }
    }

    /// One update of every tensor of `grads` in `params` at learning rate `lr`; tensors for
    /// which `decay` is false get no weight decay.
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64, decay: &dyn Fn(&str) -> bool) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.t as i32)).sqrt();
        let step_size = (lr / bc1) as f32;
        let b2 = c.beta2 as f32;
        let (w1, w2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let (bc2_sqrt, eps) = (bc2_sqrt as f32, c.eps as f32);
        for (name, _, g) in grads.iter() {
            let missing = || Error::InvalidArgument(format!("optimizer: no tensor `{name}`"));
            let p = params.get_mut(name).ok_or_else(missing)?;
            let m = self.m.get_mut(name).ok_or_else(missing)?;
            let v = self.v.get_mut(name).ok_or_else(missing)?;
            if decay(name) && c.weight_decay != 0.0 {
                let f = (1.0 - lr * c.weight_decay) as f32;
                p.iter_mut().for_each(|x| *x *= f);
            }
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                *m += w1 * (g - *m);
                *v = *v * b2 + w2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p += -step_size * *m / denom;
            }
        }
        Ok(())
    }
}

/// Default decay rule: matrices decay, vectors (norm weights, biases) do not.
pub fn decay_matrices(params: &Params) -> impl Fn(&str) -> bool + '_ {
    move |name| params.shape(name).is_some_and(|s| s.len() >= 2)
}

/// Linear warmup to the peak rate, then a cosine decay to `min_lr_ratio` × peak at the
/// last step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self
            .total_steps
            .saturating_sub(self.warmup_steps)
            .saturating_sub(1)
            .max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (torch's
/// clip_grad_norm_: coefficient max_norm / (norm + 1e-6) when below 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut Params, max_norm: Option<f64>) -> f64 {
    let norm = grads.global_norm();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            grads.scale(coef as f32);
        }
    }
    norm
}
