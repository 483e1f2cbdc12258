//! AdamW on tensors with `torch.optim.AdamW` semantics (decoupled weight decay, bias
//! correction, eps outside the sqrt), written out because tch's optimizer cannot expose,
//! save or shard its state. State per parameter: `exp_avg`, `exp_avg_sq`; one shared
//! `step` (all parameters step together).
//!
//! Upstream's parameter groups: weight decay only on cross-attention weights.

use std::collections::BTreeMap;
use tch::Tensor;

/// Upstream Otter's rule: decay params whose name contains `gated_cross_attn_layer` and
/// none of `ff_gate`, `attn_gate`, `norm`, `bias`.
pub fn decays(name: &str) -> bool {
    name.contains("gated_cross_attn_layer") && !["ff_gate", "attn_gate", "norm", "bias"].iter().any(|s| name.contains(s))
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Moments of one parameter.
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// By parameter name (the order every rank agrees on).
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &[(&str, &Tensor)]) -> Self {
        let state = params
            .iter()
            .map(|(n, p)| (n.to_string(), Moments { exp_avg: p.zeros_like().detach(), exp_avg_sq: p.zeros_like().detach() }))
            .collect();
        Self { cfg, step: 0, state }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are skipped
    /// (as torch does); the step counter is shared.
    pub fn step(&mut self, params: &[(&str, &Tensor)], lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bc1;
        tch::no_grad(|| {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let m = self.state.get_mut(*name).expect("optimizer state for every trainable parameter");
                let mut p = p.shallow_clone();
                let wd = if decays(name) { c.weight_decay } else { 0.0 };
                if wd != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = m.exp_avg.lerp_(&g, 1.0 - c.beta1);
                let _ = m.exp_avg_sq.g_mul_scalar_(c.beta2);
                // addcmul_(g, g, value = 1 - beta2), same rounding order as torch's kernel
                let _ = m.exp_avg_sq.addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let denom = (m.exp_avg_sq.sqrt() / bc2_sqrt) + c.eps;
                let _ = p.addcdiv_(&(&m.exp_avg * -step_size), &denom);
            }
        });
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient by
/// `min(1, max_norm / (total_norm + 1e-6))`; returns the total norm before clipping.
pub fn clip_grad_norm(params: &[(&str, &Tensor)], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef);
        }
        total.double_value(&[])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_groups_follow_upstream() {
        assert!(decays("lang_encoder.model.layers.3.gated_cross_attn_layer.attn.to_q.weight"));
        assert!(decays("lang_encoder.model.layers.3.gated_cross_attn_layer.feed_forward.1.weight"));
        assert!(!decays("lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate"));
        assert!(!decays("lang_encoder.model.layers.3.gated_cross_attn_layer.attn.norm.weight"));
        assert!(!decays("lang_encoder.model.layers.3.gated_cross_attn_layer.feed_forward.0.bias"));
        assert!(!decays("perceiver.layers.0.to_q.weight"));
        assert!(!decays("lang_encoder.lm_head.weight"));
    }
}

#[cfg(test)]
mod matches_torch {
    use super::*;

    /// Reference from torch 2.13: `torch.optim.AdamW([p], lr, weight_decay=0.1)` with
    /// p = [1, -2, 0.3], grad = [0.5, 0.1, -3] at each step, lr = 0, 5e-4, 1e-3.
    #[test]
    fn three_steps_equal_torch_adamw() {
        let want = [[1.0f32, -2.0, 0.3], [0.99944997, -2.0004, 0.30048501], [0.99835, -2.0012, 0.30145496]];
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.3]).set_requires_grad(true);
        let name = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.weight";
        let mut opt = AdamW::new(AdamWConfig::default(), &[(name, &p)]);
        for (lr, w) in [0.0, 5e-4, 1e-3].into_iter().zip(want) {
            let mut p2 = p.shallow_clone();
            p2.zero_grad();
            (&p * Tensor::from_slice(&[0.5f32, 0.1, -3.0])).sum(tch::Kind::Float).backward();
            opt.step(&[(name, &p)], lr);
            let got = Vec::<f32>::try_from(&p.detach()).unwrap();
            for (g, w) in got.iter().zip(w) {
                assert!((g - w).abs() <= 1e-7, "lr {lr}: {got:?} vs {w:?}");
            }
        }
        assert_eq!(opt.step, 3);
    }
}
