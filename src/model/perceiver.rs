//! Perceiver resampler (Jaegle et al., 2021; Flamingo, Alayrac et al., 2022), as
//! upstream `OtterPerceiverResampler`: a fixed set of learned latents cross-attends to
//! each image's (or video's) patch tokens, turning (B, T, F, v, D) into (B, T, n, D).
//! Trainable. Keys: `perceiver.{latents, frame_embs?, layers.N.*, norm.*}`.

use super::config::PerceiverConfig;
use super::nn::{fused_attention, sdpa, FeedForward, LayerNorm, Linear};
use super::weights::Vb;
use tch::Tensor;

struct PerceiverBlock {
    norm_media: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    feed_forward: FeedForward,
    heads: i64,
    dim_head: i64,
}

// SAFETY: tensor handles that `forward` only reads; libtorch tensors may be read from
// several threads at once (a checkpointed block runs again on autograd's thread).
unsafe impl Sync for PerceiverBlock {}

impl PerceiverBlock {
    fn new(vb: &Vb, cfg: &PerceiverConfig) -> Self {
        Self {
            norm_media: LayerNorm::new(&vb.pp("norm_media"), 1e-5),
            norm_latents: LayerNorm::new(&vb.pp("norm_latents"), 1e-5),
            to_q: Linear::no_bias(&vb.pp("to_q")),
            to_kv: Linear::no_bias(&vb.pp("to_kv")),
            to_out: Linear::no_bias(&vb.pp("to_out")),
            feed_forward: FeedForward::new(&vb.pp("feed_forward")),
            heads: cfg.heads as i64,
            dim_head: cfg.dim_head as i64,
        }
    }

    /// x (B, T, M, D) media tokens, latents (B, T, n, D) -> latents (B, T, n, D).
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Tensor {
        super::precision::observe(super::precision::Site::PerceiverBlock);
        let x = self.norm_media.forward(x);
        let lat = self.norm_latents.forward(latents);
        let (h, dh) = (self.heads, self.dim_head);
        // "b t n (h d) -> b h t n d"
        let split = |t: Tensor| {
            let s = t.size();
            t.view([s[0], s[1], s[2], h, dh]).permute([0, 3, 1, 2, 4])
        };
        let q = split(self.to_q.forward(&lat));
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &lat], -2));
        let kv = kv.chunk(2, -1);
        let (k, v) = (split(kv[0].shallow_clone()), split(kv[1].shallow_clone()));
        let out = if fused_attention(&q) {
            // The fused kernels take (batch, heads, L, E): fold T into the heads.
            let four = |t: &Tensor| {
                let s = t.size();
                t.reshape([s[0], s[1] * s[2], s[3], s[4]])
            };
            sdpa(&four(&q), &four(&k), &four(&v), None, false, None).view(q.size().as_slice())
        } else {
            let q = q * (dh as f64).powf(-0.5);
            let sim = q.matmul(&k.transpose(-2, -1)); // (B, h, T, n, M+n)
            let sim = &sim - sim.amax([-1], true).detach();
            sim.softmax(-1, sim.kind()).matmul(&v) // (B, h, T, n, dh)
        };
        let s = out.size();
        let out = out.permute([0, 2, 3, 1, 4]).reshape([s[0], s[2], s[3], h * dh]);
        let latents = self.to_out.forward(&out) + latents;
        self.feed_forward.forward(&latents) + latents
    }
}

pub struct PerceiverResampler {
    latents: Tensor,
    frame_embs: Option<Tensor>,
    layers: Vec<std::sync::Arc<PerceiverBlock>>,
    norm: LayerNorm,
}

impl PerceiverResampler {
    /// `vb` points at `perceiver`.
    pub fn new(vb: &Vb, cfg: &PerceiverConfig) -> Self {
        Self {
            latents: vb.get("latents"),
            frame_embs: vb.contains("frame_embs").then(|| vb.get("frame_embs")),
            layers: (0..cfg.depth).map(|i| std::sync::Arc::new(PerceiverBlock::new(&vb.pp(format!("layers.{i}")), cfg))).collect(),
            norm: LayerNorm::new(&vb.pp("norm"), 1e-5),
        }
    }

    /// x (B, T, F, v, D) -> (B, T, n, D). `checkpointed: Some(autocast)` runs each layer
    /// as a checkpointed segment (recomputed in backward, in autocast if set).
    pub fn forward(&self, x: &Tensor, checkpointed: Option<bool>) -> Tensor {
        let s = x.size();
        let (b, t, f, v, d) = (s[0], s[1], s[2], s[3], s[4]);
        let x = match &self.frame_embs {
            // frame_embs[:F] broadcast over (B, T, ., v, .)
            Some(fe) => x + fe.narrow(0, 0, f).view([1, 1, f, 1, d]).to_kind(x.kind()),
            None => x.shallow_clone(),
        };
        let x = x.reshape([b, t, f * v, d]); // (B, T, F*v, D)
        let n = self.latents.size()[0];
        let mut latents = self.latents.view([1, 1, n, d]).expand([b, t, n, d], false);
        for block in &self.layers {
            latents = match checkpointed {
                Some(autocast) => {
                    let block = std::sync::Arc::clone(block);
                    super::checkpoint::checkpoint(&[&x, &latents], move |t| super::precision::autocast(autocast, || block.forward(&t[0], &t[1])))
                }
                None => block.forward(&x, &latents),
            };
        }
        self.norm.forward(&latents)
    }
}

