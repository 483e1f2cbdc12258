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
    /// Bytes of the moments this optimizer holds.
    pub fn state_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        self.state.values().map(|m| bytes(&m.exp_avg) + bytes(&m.exp_avg_sq)).sum()
    }

    pub fn new(cfg: AdamWConfig, params: &[(&str, &Tensor)]) -> Self {
        let state = params
            .iter()
            .map(|(n, p)| (n.to_string(), Moments { exp_avg: p.zeros_like().detach(), exp_avg_sq: p.zeros_like().detach() }))
            .collect();
        Self { cfg, step: 0, state }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are skipped
    /// (as torch does); the step counter is shared. See [`update`] for the kernels.
    pub fn step(&mut self, params: &[(&str, &Tensor)], lr: f64) {
        self.step += 1;
        let slots = self.slots(params);
        update(self.cfg, self.step, lr, &slots);
    }

    /// The update written out op by op, in `torch.optim.AdamW`'s (single-tensor) order:
    /// the specification [`AdamW::step`]'s fused kernel is tested against.
    pub fn reference_step(&mut self, params: &[(&str, &Tensor)], lr: f64) {
        self.step += 1;
        let slots = self.slots(params);
        written_out(self.cfg, self.step, lr, &slots);
    }

    /// The parameters with a gradient, with their moments.
    fn slots<'n>(&self, params: &[(&'n str, &Tensor)]) -> Vec<Slot<'n>> {
        tch::no_grad(|| {
            params
                .iter()
                .filter_map(|(name, p)| {
                    let grad = p.grad();
                    if !grad.defined() {
                        return None;
                    }
                    let m = self.state.get(*name).expect("optimizer state for every trainable parameter");
                    Some(Slot { name, param: p.shallow_clone(), grad, exp_avg: m.exp_avg.shallow_clone(), exp_avg_sq: m.exp_avg_sq.shallow_clone() })
                })
                .collect()
        })
    }
}

/// What one AdamW update touches: a parameter (or a piece of one, as a view: the update
/// writes through it), its gradient and its two moments, all of the same shape. `name`
/// is the parameter's, for its weight-decay group.
pub(crate) struct Slot<'n> {
    pub name: &'n str,
    pub param: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The AdamW update of `slots` at optimizer step `step` (already counted). Runs
/// libtorch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`'s): one pass over each
/// parameter's four tensors instead of the dozen elementwise ops (and temporaries) of the
/// written-out update, which take 2-3x as long (BENCHMARKS.md). Same formula as
/// [`written_out`]; results differ from it by rounding only (FMA).
///
/// On CUDA the written-out update still runs: it is the one checked on a GPU (bf16
/// overfit against the f32 fixture); the fused kernel there awaits that check.
pub(crate) fn update(c: AdamWConfig, step: u64, lr: f64, slots: &[Slot<'_>]) {
    if slots.first().is_some_and(|s| s.param.device() != tch::Device::Cpu) {
        return written_out(c, step, lr, slots);
    }
    tch::no_grad(|| {
        // Upstream's two groups: decayed cross-attention weights, and the rest.
        let mut groups: [Vec<&Slot<'_>>; 2] = [Vec::new(), Vec::new()];
        for s in slots {
            groups[decays(s.name) as usize].push(s);
        }
        for (group, wd) in groups.iter().zip([0.0, c.weight_decay]) {
            if let Some(s0) = group.first() {
                let step = Tensor::from(step as f32).to_device(s0.param.device());
                fused_adamw(group, &step, lr, c, wd).unwrap_or_else(|e| panic!("fused AdamW: {e}"));
            }
        }
    });
}

/// The update written out op by op, in `torch.optim.AdamW`'s (single-tensor) order.
pub(crate) fn written_out(c: AdamWConfig, step: u64, lr: f64, slots: &[Slot<'_>]) {
    let bc1 = 1.0 - c.beta1.powi(step as i32);
    let bc2_sqrt = (1.0 - c.beta2.powi(step as i32)).sqrt();
    let step_size = lr / bc1;
    tch::no_grad(|| {
        for s in slots {
            let (mut p, g) = (s.param.shallow_clone(), &s.grad);
            let (mut exp_avg, mut exp_avg_sq) = (s.exp_avg.shallow_clone(), s.exp_avg_sq.shallow_clone());
            let wd = if decays(s.name) { c.weight_decay } else { 0.0 };
            if wd != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * wd);
            }
            let _ = exp_avg.lerp_(g, 1.0 - c.beta1);
            let _ = exp_avg_sq.g_mul_scalar_(c.beta2);
            // addcmul_(g, g, value = 1 - beta2), same rounding order as torch's kernel
            let _ = exp_avg_sq.addcmul_(&(g * (1.0 - c.beta2)), g);
            let denom = (exp_avg_sq.sqrt() / bc2_sqrt) + c.eps;
            let _ = p.addcdiv_(&(&exp_avg * -step_size), &denom);
        }
    });
}

extern "C" {
    /// src/train/adamw_shim.cpp: `at::_fused_adamw_` over one group. Returns 0, or 1 with
    /// the error message in `err`.
    fn otter_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        n: usize,
        step: *mut torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// One fused AdamW update of `group` (one weight-decay group) at `step`.
fn fused_adamw(group: &[&Slot<'_>], step: &Tensor, lr: f64, c: AdamWConfig, weight_decay: f64) -> Result<(), String> {
    let ptr = |t: &Tensor| t.as_ptr() as *mut torch_sys::C_tensor;
    let params: Vec<_> = group.iter().map(|s| ptr(&s.param)).collect();
    let grads: Vec<_> = group.iter().map(|s| ptr(&s.grad)).collect();
    let exp_avgs: Vec<_> = group.iter().map(|s| ptr(&s.exp_avg)).collect();
    let exp_avg_sqs: Vec<_> = group.iter().map(|s| ptr(&s.exp_avg_sq)).collect();
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: every pointer is a live tch tensor handle (`at::Tensor*`) borrowed from
    // `group` or `step` for the duration of the call; the kernel updates the tensors'
    // storage in place (as tch's in-place ops do) and keeps no handle; `err` is a
    // writable buffer of `err.len()` bytes that the shim NUL-terminates.
    let rc = unsafe {
        otter_fused_adamw(
            params.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            group.len(),
            ptr(step),
            lr,
            c.beta1,
            c.beta2,
            weight_decay,
            c.eps,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
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
                // torch's for-loop AdamW made the reference; the fused kernel may round
                // the last bit differently (FMA): at most one ulp of values below 2.
                assert!((g - w).abs() <= f32::EPSILON * 2.0, "lr {lr}: {got:?} vs {w:?}");
            }
        }
        assert_eq!(opt.step, 3);
    }

    /// The fused kernel computes the written-out update: five steps on both groups (one
    /// decayed, one not, one parameter without a gradient) stay within rounding of it (so
    /// each parameter also got its group's weight decay), and the skipped parameter is
    /// untouched.
    #[test]
    fn fused_step_equals_the_written_out_update() {
        tch::manual_seed(7);
        let names = ["lang_encoder.model.layers.3.gated_cross_attn_layer.attn.to_q.weight", "perceiver.latents", "lang_encoder.lm_head.weight"];
        let init: Vec<Tensor> = [4099i64, 1031, 64].iter().map(|&n| Tensor::randn([n], (tch::Kind::Float, tch::Device::Cpu))).collect();
        let run = |fused: bool| -> Vec<Tensor> {
            let ps: Vec<Tensor> = init.iter().map(|t| t.copy().set_requires_grad(true)).collect();
            let named: Vec<(&str, &Tensor)> = names.iter().copied().zip(ps.iter()).collect();
            let mut opt = AdamW::new(AdamWConfig::default(), &named);
            for k in 0..5 {
                for p in &ps[..2] {
                    let mut p = p.shallow_clone();
                    p.zero_grad();
                    (&p * &p * (k as f64 + 1.0)).sum(tch::Kind::Float).backward();
                }
                let lr = 1e-3 * (k as f64 + 1.0);
                if fused {
                    opt.step(&named, lr)
                } else {
                    opt.reference_step(&named, lr)
                }
            }
            ps.iter().map(|p| p.detach()).collect()
        };
        let (fused, reference) = (run(true), run(false));
        for ((f, r), name) in fused.iter().zip(&reference).zip(names) {
            // Rounding only: a few ulps of O(1) values. A wrong group (weight decay 0.1 at
            // these learning rates) would be off by ~1e-4.
            let worst = (f - r).abs().max().double_value(&[]);
            assert!(worst <= 1e-6, "{name}: fused and written-out updates differ by {worst:e}");
        }
        assert_eq!(fused[2], init[2], "a parameter without a gradient is not updated");
        assert_ne!(fused[1], init[1], "a parameter with a gradient is updated");
    }
}
