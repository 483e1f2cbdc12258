//! CLIP vision transformer (Radford et al., 2021), as HF `CLIPVisionModel`: pre-LN
//! encoder with quick-GELU MLPs. Otter uses `last_hidden_state[:, 1:, :]`: the patch
//! tokens, CLS dropped, **without** `post_layernorm` (that weight is loaded, never used).
//! Frozen: always run under `no_grad`.
//!
//! Keys: `vision_encoder.vision_model.{embeddings.*, pre_layrnorm, encoder.layers.N.*}`.

use super::config::ClipVisionConfig;
use super::nn::{fused_attention, sdpa, LayerNorm, Linear};
use super::weights::Vb;
use tch::{Kind, Tensor};

struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
}

impl EncoderLayer {
    fn new(vb: &Vb, cfg: &ClipVisionConfig) -> Self {
        let a = vb.pp("self_attn");
        Self {
            q_proj: Linear::new(&a.pp("q_proj")),
            k_proj: Linear::new(&a.pp("k_proj")),
            v_proj: Linear::new(&a.pp("v_proj")),
            out_proj: Linear::new(&a.pp("out_proj")),
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), cfg.layer_norm_eps),
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), cfg.layer_norm_eps),
            fc1: Linear::new(&vb.pp("mlp.fc1")),
            fc2: Linear::new(&vb.pp("mlp.fc2")),
            heads: cfg.num_attention_heads as i64,
        }
    }

    fn attention(&self, x: &Tensor) -> Tensor {
        let (n, s, d) = x.size3().expect("(N, S, D)");
        let hd = d / self.heads;
        let split = |t: Tensor| t.view([n, s, self.heads, hd]).transpose(1, 2); // (N, h, S, hd)
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let out = if fused_attention(&q) {
            sdpa(&q, &k, &v, None, false, None)
        } else {
            let scores = q.matmul(&k.transpose(-2, -1)) * (hd as f64).powf(-0.5);
            scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
        };
        let out = out.transpose(1, 2).reshape([n, s, d]);
        self.out_proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention(&self.layer_norm1.forward(x));
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = &h * (&h * 1.702).sigmoid(); // quick_gelu
        x + self.fc2.forward(&h)
    }
}

pub struct ClipVision {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    cfg: ClipVisionConfig,
}

impl ClipVision {
    /// `vb` points at `vision_encoder.vision_model`.
    pub fn new(vb: &Vb, cfg: &ClipVisionConfig) -> Self {
        let e = vb.pp("embeddings");
        Self {
            class_embedding: e.get("class_embedding"),
            patch_embedding: e.get("patch_embedding.weight"),
            position_embedding: e.get("position_embedding.weight"),
            pre_layrnorm: LayerNorm::new(&vb.pp("pre_layrnorm"), cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&vb.pp(format!("encoder.layers.{i}")), cfg)).collect(),
            cfg: cfg.clone(),
        }
    }

    /// pixels (N, C, H, W) -> patch tokens (N, P, D): `last_hidden_state[:, 1:]`.
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let n = pixels.size()[0];
        let p = self.cfg.patch_size as i64;
        let w = &self.patch_embedding;
        let pixels = pixels.to_kind(w.kind());
        // The stride-p convolution written as a matmul over non-overlapping patches: same
        // sums, but no cuDNN (which would use TF32 on Ampere+ by default and miss parity).
        let (c, hgt, wid) = (s_(&pixels, 1), s_(&pixels, 2), s_(&pixels, 3));
        let (gh, gw) = (hgt / p, wid / p);
        let patches = pixels
            .view([n, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5]) // (N, gh, gw, C, p, p)
            .reshape([n, gh * gw, c * p * p]);
        let patches = patches.matmul(&w.view([-1, c * p * p]).transpose(0, 1)); // (N, P, D)
        let d = patches.size()[2];
        let cls = self.class_embedding.to_kind(patches.kind()).view([1, 1, d]).expand([n, 1, d], false);
        let x = Tensor::cat(&[cls, patches], 1) + &self.position_embedding; // (N, P+1, D)
        let mut x = self.pre_layrnorm.forward(&x);
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        x.narrow(1, 1, x.size()[1] - 1) // drop CLS; no post_layernorm
    }
}

fn s_(t: &Tensor, dim: usize) -> i64 {
    t.size()[dim]
}
