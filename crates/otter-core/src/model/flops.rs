//! Model FLOPs of a training step, for MFU (`otter_mfu_ratio`), counted for a partly
//! frozen model:
//!
//! - every parameter costs 2 FLOPs per token it multiplies in forward;
//! - 2 more for the activation gradient wherever a gradient flows: everywhere except the
//!   frozen CLIP encoder (it runs without autograd), so through the frozen LLaMA / MPT
//!   layers too, since the input embeddings train;
//! - 2 more for its weight gradient only where the parameter trains;
//! - lookup tables (token, position and class embeddings, the perceiver's latents and
//!   frame embeddings) multiply nothing and CLIP's unused `post_layernorm` never runs;
//! - a parameter's tokens are what it is applied to: text tokens for the language model,
//!   its cross-attention blocks and `lm_head` (MPT: `wte`, which is the output projection as
//!   well as the lookup, so it counts as a trainable matrix on every text token); the patches (+ CLS) of every frame for
//!   CLIP; per media item, the latents for the perceiver (its `to_kv` also sees the
//!   frames' patches) and for the cross-attention `to_kv`;
//! - activation checkpointing's second forward is work, not useful work: it is reported
//!   apart ([`StepFlops::recomputed`]) and left out of MFU. So is the attention score
//!   arithmetic (QK^T, AV), as in the usual 6N-per-token count.

use super::config::OtterConfig;
use super::spec::{lm_layer, parameter_specs, Group};

/// What one step computes on: text tokens, media items (images or videos, each
/// `frames` frames) over all its samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShape {
    pub text_tokens: u64,
    pub media: u64,
    pub frames: u64,
}

/// FLOPs of one training step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepFlops {
    /// Forward, activation gradients and weight gradients: what MFU counts.
    pub useful: f64,
    /// The extra forward of checkpointed segments.
    pub recomputed: f64,
}

/// Per-unit FLOPs: `per_text_token * tokens + per_media * media + per_frame * media *
/// frames` is a step's useful FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FlopsModel {
    pub per_text_token: f64,
    pub per_media: f64,
    pub per_frame: f64,
    /// Recomputed FLOPs under the checkpointing mode, per the same units.
    pub recomputed_per_text_token: f64,
    pub recomputed_per_media: f64,
    pub recomputed_per_frame: f64,
}

impl FlopsModel {
    /// `recompute_decoder` / `recompute_perceiver`: the segments activation checkpointing
    /// runs again.
    pub fn new(cfg: &OtterConfig, recompute_decoder: bool, recompute_perceiver: bool) -> Self {
        let v = &cfg.vision;
        let patches = v.num_patches() as u64;
        let latents = cfg.perceiver.num_latents as u64;
        let mut m = Self::default();
        for s in parameter_specs(cfg) {
            let n = s.numel() as f64;
            let name = s.name.as_str();
            let lookup = name.ends_with("embed_tokens.weight")
                || name.ends_with("class_embedding")
                || name.ends_with("position_embedding.weight")
                || name == "perceiver.latents"
                || name == "perceiver.frame_embs"
                || name.contains("post_layernorm");
            if lookup {
                continue;
            }
            let grad_flows = s.group != Group::VisionEncoder;
            let per_token = 2.0 * n * (1.0 + f64::from(u8::from(grad_flows)) + f64::from(u8::from(s.trainable)));
            let recompute = 2.0 * n;
            match s.group {
                Group::VisionEncoder => {
                    let tokens = if name.contains("patch_embedding") { patches } else { patches + 1 };
                    m.per_frame += per_token * tokens as f64;
                }
                Group::Perceiver => {
                    // (tokens per frame, tokens per media item)
                    let (frame, media) = if name.ends_with("to_kv.weight") {
                        (patches, latents)
                    } else if name.contains("norm_media") {
                        (patches, 0)
                    } else {
                        (0, latents)
                    };
                    m.per_frame += per_token * frame as f64;
                    m.per_media += per_token * media as f64;
                    if recompute_perceiver && name.starts_with("perceiver.layers.") {
                        m.recomputed_per_frame += recompute * frame as f64;
                        m.recomputed_per_media += recompute * media as f64;
                    }
                }
                Group::CrossAttention if name.ends_with("attn.to_kv.weight") => {
                    m.per_media += per_token * latents as f64;
                    if recompute_decoder {
                        m.recomputed_per_media += recompute * latents as f64;
                    }
                }
                Group::CrossAttention | Group::LanguageModel | Group::Embeddings => {
                    m.per_text_token += per_token;
                    if recompute_decoder && lm_layer(name).is_some() {
                        m.recomputed_per_text_token += recompute;
                    }
                }
            }
        }
        m
    }

    pub fn step(&self, shape: StepShape) -> StepFlops {
        let (t, media, frames) = (shape.text_tokens as f64, shape.media as f64, (shape.media * shape.frames) as f64);
        StepFlops {
            useful: self.per_text_token * t + self.per_media * media + self.per_frame * frames,
            recomputed: self.recomputed_per_text_token * t + self.recomputed_per_media * media + self.recomputed_per_frame * frames,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny config counted by hand, parameter block by parameter block.
    #[test]
    fn the_tiny_config_counts_as_by_hand() {
        let cfg = OtterConfig::tiny();
        let crate::model::config::TextConfig::Llama(t) = &cfg.text else { panic!("tiny is LLaMA") };
        let (v, p, x) = (&cfg.vision, &cfg.perceiver, &cfg.xattn);
        let (d, vi) = (v.hidden_size as f64, v.intermediate_size as f64);
        let patches = v.num_patches() as f64;
        let patch_in = (v.num_channels * v.patch_size * v.patch_size) as f64;
        // CLIP: frozen, no gradient: 2 per parameter per token; pre_layrnorm and each
        // layer on patches + CLS, the patch embedding on patches.
        let clip_layer = 4.0 * (d * d + d) + 2.0 * 2.0 * d + (vi * d + vi) + (d * vi + d);
        let clip = 2.0 * ((patches + 1.0) * (2.0 * d + v.num_hidden_layers as f64 * clip_layer) + patches * d * patch_in);
        // Perceiver: trainable, 6 per parameter per token: to_kv on patches + latents, the
        // rest on latents; then its final norm.
        let inner = (p.dim_head * p.heads) as f64;
        let lat = p.num_latents as f64;
        let per_layer_lat = 2.0 * d + inner * d + d * inner + 2.0 * d + 2.0 * (d * p.ff_mult as f64 * d);
        let per_layer = per_layer_lat * lat + 2.0 * d * patches + 2.0 * inner * d * (patches + lat);
        let perceiver = 6.0 * (p.depth as f64 * per_layer + 2.0 * d * lat);
        // Cross-attention (trainable, 6 per parameter): to_kv on the latents, the rest on text.
        let h = t.hidden_size as f64;
        let xi = (x.dim_head * x.heads) as f64;
        let blocks = (0..t.num_hidden_layers).filter(|&i| cfg.has_xattn(i)).count() as f64;
        let xattn_text = 6.0 * blocks * (2.0 * h + xi * h + h * xi + 1.0 + 2.0 * h + 2.0 * h * x.ff_mult as f64 * h + 1.0);
        let xattn_media = 6.0 * blocks * 2.0 * xi * d * lat;
        // LLaMA layers and final norm: frozen but on the gradient's path: 4 per parameter.
        let (q, kv, im) = ((t.num_attention_heads * t.head_dim) as f64, (t.num_key_value_heads * t.head_dim) as f64, t.intermediate_size as f64);
        let llama = 4.0 * (t.num_hidden_layers as f64 * (2.0 * q * h + 2.0 * kv * h + 3.0 * im * h + 2.0 * h) + h);
        // lm_head trains: 6 per parameter; embed_tokens is a lookup.
        let lm_head = 6.0 * t.vocab_size as f64 * h;

        let m = FlopsModel::new(&cfg, false, false);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        let one_frame = m.per_media + m.per_frame;
        assert!(close(one_frame, clip + perceiver + xattn_media), "per media: {one_frame} vs {}", clip + perceiver + xattn_media);
        // A second frame adds CLIP and the perceiver's per-patch work, not the latents'.
        let per_patch_perceiver = 6.0 * p.depth as f64 * (2.0 * d * patches + 2.0 * inner * d * patches);
        assert!(close(m.per_frame, clip + per_patch_perceiver), "per frame: {} vs {}", m.per_frame, clip + per_patch_perceiver);
        assert!(close(m.per_text_token, xattn_text + llama + lm_head), "per token: {} vs {}", m.per_text_token, xattn_text + llama + lm_head);
        assert_eq!(m.recomputed_per_text_token, 0.0);

        // Checkpointing the decoder layers adds their second forward (2 per parameter),
        // reported apart; the useful count does not move.
        let c = FlopsModel::new(&cfg, true, false);
        assert_eq!((c.per_text_token, c.per_media, c.per_frame), (m.per_text_token, m.per_media, m.per_frame));
        let recomputed_text = xattn_text / 3.0 + (llama - 4.0 * h) / 2.0; // not the final norm
        assert!(close(c.recomputed_per_text_token, recomputed_text), "{} vs {recomputed_text}", c.recomputed_per_text_token);
        assert!(close(c.recomputed_per_media, xattn_media / 3.0));
        let s = c.step(StepShape { text_tokens: 10, media: 3, frames: 1 });
        assert!(close(s.useful, 10.0 * m.per_text_token + 3.0 * one_frame));
    }

    /// OTTER-Image-MPT7B: 4 x the frozen MPT blocks (6.44 B) + 6 x the trainable text-side
    /// parameters (wte, the output projection; the cross-attention blocks less their to_kv)
    /// per text token; the tied wte counts once, as a matrix.
    #[test]
    fn otter_mpt7b_per_token_counts_the_tied_wte_once_as_a_matrix() {
        let cfg = OtterConfig::otter_mpt7b();
        let m = FlopsModel::new(&cfg, false, false);
        let frozen = 6_442_717_184f64;
        let wte = 206_569_472f64;
        let (h, xi, ff) = (4096f64, 512f64, 4.0 * 4096f64);
        let xattn_text = 8.0 * (2.0 * h + xi * h + h * xi + 1.0 + 2.0 * h + 2.0 * h * ff + 1.0);
        let want = 4.0 * frozen + 6.0 * wte + 6.0 * xattn_text;
        assert!((m.per_text_token - want).abs() <= 1e-9 * want, "{} vs {want}", m.per_text_token);
        let c = FlopsModel::new(&cfg, true, false);
        let blocks_recomputed = 2.0 * (frozen - h) + 2.0 * xattn_text; // not norm_f
        assert!((c.recomputed_per_text_token - blocks_recomputed).abs() <= 1e-9 * blocks_recomputed);
    }

    /// Otter-7B: 4 x the frozen LLaMA (6.5 B) + 6 x the trainable text-side parameters per
    /// text token.
    #[test]
    fn otter_7b_per_token_is_near_the_6n_4n_rule() {
        let cfg = OtterConfig::otter_llama7b();
        let m = FlopsModel::new(&cfg, false, false);
        let per_token = m.per_text_token / 1e9;
        assert!((28.0..40.0).contains(&per_token), "{per_token} GFLOP per text token");
    }
}
