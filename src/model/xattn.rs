//! Gated cross-attention dense block (Flamingo, Alayrac et al., 2022), as upstream
//! `OtterGatedCrossAttentionBlock` with `OtterMaskedCrossAttention`. Runs *before* the
//! decoder layer it is attached to:
//!
//! ```text
//! x = x + tanh(attn_gate) * attn(x, media)
//! x = x + tanh(ff_gate)   * ff(x)
//! ```
//!
//! Media mask (`only_attend_immediate_media`): `text_time = cumsum(ids == <image>)`; a
//! token attends only to the latents of image number `text_time` (1-based, so the
//! `<image>` token sees its own image); masked scores are `-finfo.max`; tokens before the
//! first `<image>` (`text_time == 0`) get their attention zeroed after the softmax.
//! Trainable. Keys: `lang_encoder.model.layers.N.gated_cross_attn_layer.*`.

use super::config::XattnConfig;
use super::nn::{finfo_max, fused_attention, sdpa, FeedForward, LayerNorm, Linear};
use super::weights::Vb;
use tch::{Kind, Tensor};

/// Which media each text position may attend to, computed once per forward.
pub struct MediaMask {
    /// (B, 1, L, T*n) true where attention is allowed.
    pub allowed: Tensor,
    /// (B, 1, L, 1) true for text before the first `<image>`.
    pub no_media: Tensor,
}

impl MediaMask {
    /// `text_time` (B, L): number of `<image>` tokens at or before each position.
    /// `num_media` T and `latents` n give the media layout (B, T*n).
    pub fn new(text_time: &Tensor, num_media: i64, latents: i64) -> Self {
        let dev = text_time.device();
        let (b, l) = text_time.size2().expect("(B, L)");
        let media_time = Tensor::arange_start(1, num_media + 1, (Kind::Int64, dev))
            .repeat_interleave_self_int(latents, 0, None); // (T*n)
        let allowed = text_time.view([b, 1, l, 1]).eq_tensor(&media_time.view([1, 1, 1, num_media * latents]));
        let no_media = text_time.eq(0).view([b, 1, l, 1]);
        Self { allowed, no_media }
    }

    pub fn shallow_clone(&self) -> Self {
        Self { allowed: self.allowed.shallow_clone(), no_media: self.no_media.shallow_clone() }
    }
}

pub struct GatedCrossAttention {
    norm: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    attn_gate: Tensor,
    feed_forward: FeedForward,
    ff_gate: Tensor,
    heads: i64,
    dim_head: i64,
}

// SAFETY: weight handles that `forward` only reads (no in-place op, no handle replaced);
// libtorch tensors may be read from several threads at once. Needed because a checkpointed
// segment runs the block again in backward, on autograd's thread (`Backbone::Layer: Sync`).
unsafe impl Sync for GatedCrossAttention {}

impl GatedCrossAttention {
    /// `vb` points at `...layers.N.gated_cross_attn_layer`.
    pub fn new(vb: &Vb, cfg: &XattnConfig) -> Self {
        let a = vb.pp("attn");
        Self {
            norm: LayerNorm::new(&a.pp("norm"), 1e-5),
            to_q: Linear::no_bias(&a.pp("to_q")),
            to_kv: Linear::no_bias(&a.pp("to_kv")),
            to_out: Linear::no_bias(&a.pp("to_out")),
            attn_gate: vb.get("attn_gate"),
            feed_forward: FeedForward::new(&vb.pp("feed_forward")),
            ff_gate: vb.get("ff_gate"),
            heads: cfg.heads as i64,
            dim_head: cfg.dim_head as i64,
        }
    }

    /// x (B, L, H), media (B, T*n, D) -> (B, L, H).
    pub fn forward(&self, x: &Tensor, media: &Tensor, mask: &MediaMask) -> Tensor {
        let attn = self.attention(x, media, mask);
        let x = attn * self.attn_gate.tanh() + x;
        self.feed_forward.forward(&x) * self.ff_gate.tanh() + x
    }

    fn attention(&self, x: &Tensor, media: &Tensor, mask: &MediaMask) -> Tensor {
        let (h, dh) = (self.heads, self.dim_head);
        let split = |t: Tensor| {
            let s = t.size();
            t.view([s[0], s[1], h, dh]).transpose(1, 2) // (B, h, S, dh)
        };
        let x = self.norm.forward(x);
        let q = split(self.to_q.forward(&x));
        let kv = self.to_kv.forward(media).chunk(2, -1);
        let (k, v) = (split(kv[0].shallow_clone()), split(kv[1].shallow_clone()));
        let out = if fused_attention(&q) {
            // The same finite fill, so a row with no media is uniform (not NaN) before it
            // is zeroed; zeroing the output row equals zeroing its attention row.
            let fill = Tensor::zeros_like(&mask.allowed).to_kind(q.kind()).masked_fill(&mask.allowed.logical_not(), -finfo_max(q.kind()));
            sdpa(&q, &k, &v, Some(&fill), false, None).masked_fill(&mask.no_media, 0.0)
        } else {
            let q = q * (dh as f64).powf(-0.5);
            let sim = q.matmul(&k.transpose(-2, -1)); // (B, h, L, T*n)
            let sim = sim.masked_fill(&mask.allowed.logical_not(), -finfo_max(sim.kind()));
            let sim = &sim - sim.amax([-1], true).detach();
            let attn = sim.softmax(-1, sim.kind()).masked_fill(&mask.no_media, 0.0);
            attn.matmul(&v) // (B, h, L, dh)
        };
        let s = out.size();
        let out = out.transpose(1, 2).reshape([s[0], s[2], h * dh]);
        self.to_out.forward(&out)
    }
}
