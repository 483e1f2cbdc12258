//! Small building blocks shared by the model files: bias-optional linear layers, layer
//! norms, and the `feed_forward` stack used by the perceiver and cross-attention.

use super::weights::Vb;
use tch::{Kind, Tensor};

/// `nn.Linear` with upstream's parameter names (`weight`, optional `bias`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: &Vb) -> Self {
        let bias = vb.contains("bias").then(|| vb.get("bias"));
        Self { weight: vb.get("weight"), bias }
    }

    pub fn no_bias(vb: &Vb) -> Self {
        Self { weight: vb.get("weight"), bias: None }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim)` with weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, eps: f64) -> Self {
        Self { weight: vb.get("weight"), bias: vb.get("bias"), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer norm input has a last dim");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Upstream's `FeedForward`: `[LayerNorm, Linear(D, D*mult), GELU, Linear(D*mult, D)]`,
/// stored as `feed_forward.{0,1,3}`; no biases on the linears, exact (erf) GELU.
#[derive(Debug)]
pub struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub fn new(vb: &Vb) -> Self {
        Self { norm: LayerNorm::new(&vb.pp(0), 1e-5), up: Linear::no_bias(&vb.pp(1)), down: Linear::no_bias(&vb.pp(3)) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(&self.norm.forward(x)).gelu("none"))
    }
}

/// `torch.finfo(kind).max`, the magnitude upstream fills masked attention scores with.
pub fn finfo_max(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 3.3895313892515355e38,
        Kind::Half => 65504.0,
        Kind::Double => f64::MAX,
        _ => f32::MAX as f64,
    }
}

/// `torch.finfo(kind).min` (HF's additive attention-mask value).
pub fn finfo_min(kind: Kind) -> f64 {
    -finfo_max(kind)
}
