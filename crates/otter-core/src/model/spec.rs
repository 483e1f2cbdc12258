//! The checkpoint schema: every parameter of an Otter model by its upstream HF name,
//! with shape, group and whether it trains. Computed from the config alone (no weights
//! are allocated), it is what `otter model-info` counts and what strict loading checks
//! a checkpoint against. The tch modules read exactly these names.

use super::config::{Backbone, OtterConfig, TextConfig};
use serde::Serialize;

/// Coarse parameter groups, in the order `model-info` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Group {
    VisionEncoder,
    Perceiver,
    CrossAttention,
    Embeddings,
    LanguageModel,
}

impl Group {
    /// The group's name in a model with this backbone.
    pub fn name(self, backbone: Backbone) -> &'static str {
        match (self, backbone) {
            (Group::VisionEncoder, _) => "vision_encoder (CLIP)",
            (Group::Perceiver, _) => "perceiver",
            (Group::CrossAttention, _) => "gated_cross_attn",
            (Group::Embeddings, Backbone::Llama) => "embed_tokens + lm_head",
            (Group::Embeddings, Backbone::Mpt) => "wte (tied output)",
            (Group::LanguageModel, Backbone::Llama) => "lang_encoder (LLaMA)",
            (Group::LanguageModel, Backbone::Mpt) => "lang_encoder (MPT)",
        }
    }
}

/// LLaMA's input embeddings and output head; MPT's `wte` is both (tied).
const LLAMA_EMBED: &str = "lang_encoder.model.embed_tokens.weight";
const LLAMA_HEAD: &str = "lang_encoder.lm_head.weight";
const MPT_WTE: &str = "lang_encoder.transformer.wte.weight";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub group: Group,
    pub trainable: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Upstream's trainable set (Otter HEAD, `init_weights`): perceiver, every gated
/// cross-attention block, the input embeddings and (LLaMA) the output head; MPT's output
/// projection is `wte` itself, trained through it. Everything else is frozen.
pub fn is_trainable(name: &str) -> bool {
    name.starts_with("perceiver.") || name.contains("gated_cross_attn_layer") || [LLAMA_EMBED, LLAMA_HEAD, MPT_WTE].contains(&name)
}

/// The language-model layer a parameter belongs to (`...layers.N.` in LLaMA,
/// `...blocks.N.` in MPT), with its gated cross-attention block.
pub fn lm_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("lang_encoder.")?;
    let (_, rest) = rest.split_once(".layers.").or_else(|| rest.split_once(".blocks."))?;
    rest.split('.').next()?.parse().ok()
}

/// Where a parameter's gradient becomes final in a backward pass, as a sort key (earliest
/// first): the output head; the language model's layers from the last to the first (each
/// with its gated cross-attention block); the perceiver, from its final norm back to its
/// first layer and latents (its output feeds every block, so it finishes after all of
/// them); the vision encoder; the input embeddings last (MPT's tied `wte` too: its
/// gradient is final only after the lookup's). That is the reverse of the
/// forward order in which [`parameter_specs`] lists the model, computed from the name
/// alone so that every rank derives the same order: gradient buckets are packed and
/// launched in it, so that each bucket's all-reduce can start while backward still runs
/// (DDP packs in reverse registration order for the same reason).
pub fn backward_order(name: &str) -> (u8, std::cmp::Reverse<usize>, std::cmp::Reverse<&str>) {
    use std::cmp::Reverse;
    let stage = if name == LLAMA_HEAD {
        0
    } else if name == LLAMA_EMBED || name == MPT_WTE {
        4
    } else if name.starts_with("lang_encoder.") {
        1
    } else if name.starts_with("perceiver.") {
        2
    } else {
        3
    };
    // The layer index; a part after every layer (a final norm) comes first.
    let layer = match (lm_layer(name), name.split_once(".layers.")) {
        (Some(i), _) => i,
        (None, Some((_, rest))) => rest.split('.').next().and_then(|i| i.parse().ok()).unwrap_or(0),
        (None, None) if name.contains(".norm.") => usize::MAX,
        (None, None) => 0,
    };
    (stage, Reverse(layer), Reverse(name))
}

fn group_of(name: &str) -> Group {
    if name.starts_with("vision_encoder.") {
        Group::VisionEncoder
    } else if name.starts_with("perceiver.") {
        Group::Perceiver
    } else if name.contains("gated_cross_attn_layer") {
        Group::CrossAttention
    } else if [LLAMA_EMBED, LLAMA_HEAD, MPT_WTE].contains(&name) {
        Group::Embeddings
    } else {
        Group::LanguageModel
    }
}

/// All parameters of the model described by `cfg`, sorted by name.
pub fn parameter_specs(cfg: &OtterConfig) -> Vec<ParamSpec> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut p = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));

    // CLIP vision transformer (HF CLIPVisionModel).
    let v = &cfg.vision;
    let (d, vi) = (v.hidden_size, v.intermediate_size);
    let e = "vision_encoder.vision_model";
    p(format!("{e}.embeddings.class_embedding"), &[d]);
    p(format!("{e}.embeddings.patch_embedding.weight"), &[d, v.num_channels, v.patch_size, v.patch_size]);
    p(format!("{e}.embeddings.position_embedding.weight"), &[v.num_patches() + 1, d]);
    p(format!("{e}.pre_layrnorm.weight"), &[d]);
    p(format!("{e}.pre_layrnorm.bias"), &[d]);
    for i in 0..v.num_hidden_layers {
        let l = format!("{e}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            p(format!("{l}.self_attn.{proj}.weight"), &[d, d]);
            p(format!("{l}.self_attn.{proj}.bias"), &[d]);
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            p(format!("{l}.{ln}.weight"), &[d]);
            p(format!("{l}.{ln}.bias"), &[d]);
        }
        p(format!("{l}.mlp.fc1.weight"), &[vi, d]);
        p(format!("{l}.mlp.fc1.bias"), &[vi]);
        p(format!("{l}.mlp.fc2.weight"), &[d, vi]);
        p(format!("{l}.mlp.fc2.bias"), &[d]);
    }
    // Present in every CLIP checkpoint; Otter does not apply it (last_hidden_state is
    // taken before it), but strict loading still expects it.
    p(format!("{e}.post_layernorm.weight"), &[d]);
    p(format!("{e}.post_layernorm.bias"), &[d]);

    // Perceiver resampler.
    let pc = &cfg.perceiver;
    let inner = pc.dim_head * pc.heads;
    p("perceiver.latents".into(), &[pc.num_latents, d]);
    if let Some(f) = cfg.max_num_frames {
        p("perceiver.frame_embs".into(), &[f, d]);
    }
    for i in 0..pc.depth {
        let l = format!("perceiver.layers.{i}");
        for ln in ["norm_media", "norm_latents"] {
            p(format!("{l}.{ln}.weight"), &[d]);
            p(format!("{l}.{ln}.bias"), &[d]);
        }
        p(format!("{l}.to_q.weight"), &[inner, d]);
        p(format!("{l}.to_kv.weight"), &[2 * inner, d]);
        p(format!("{l}.to_out.weight"), &[d, inner]);
        p(format!("{l}.feed_forward.0.weight"), &[d]);
        p(format!("{l}.feed_forward.0.bias"), &[d]);
        p(format!("{l}.feed_forward.1.weight"), &[d * pc.ff_mult, d]);
        p(format!("{l}.feed_forward.3.weight"), &[d, d * pc.ff_mult]);
    }
    p("perceiver.norm.weight".into(), &[d]);
    p("perceiver.norm.bias".into(), &[d]);

    // The language model with gated cross-attention blocks.
    let h = cfg.text.hidden_size();
    let x = &cfg.xattn;
    let x_inner = x.dim_head * x.heads;
    let xattn = |p: &mut dyn FnMut(String, &[usize]), l: &str| {
        let g = format!("{l}.gated_cross_attn_layer");
        p(format!("{g}.attn.norm.weight"), &[h]);
        p(format!("{g}.attn.norm.bias"), &[h]);
        p(format!("{g}.attn.to_q.weight"), &[x_inner, h]);
        p(format!("{g}.attn.to_kv.weight"), &[2 * x_inner, d]);
        p(format!("{g}.attn.to_out.weight"), &[h, x_inner]);
        p(format!("{g}.attn_gate"), &[1]);
        p(format!("{g}.feed_forward.0.weight"), &[h]);
        p(format!("{g}.feed_forward.0.bias"), &[h]);
        p(format!("{g}.feed_forward.1.weight"), &[h * x.ff_mult, h]);
        p(format!("{g}.feed_forward.3.weight"), &[h, h * x.ff_mult]);
        p(format!("{g}.ff_gate"), &[1]);
    };
    match &cfg.text {
        TextConfig::Llama(t) => {
            let (q_dim, kv_dim) = (t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim);
            p(LLAMA_EMBED.into(), &[t.vocab_size, h]);
            for i in 0..t.num_hidden_layers {
                let l = format!("lang_encoder.model.layers.{i}");
                if cfg.has_xattn(i) {
                    xattn(&mut p, &l);
                }
                let dl = format!("{l}.decoder_layer");
                p(format!("{dl}.self_attn.q_proj.weight"), &[q_dim, h]);
                p(format!("{dl}.self_attn.k_proj.weight"), &[kv_dim, h]);
                p(format!("{dl}.self_attn.v_proj.weight"), &[kv_dim, h]);
                p(format!("{dl}.self_attn.o_proj.weight"), &[h, q_dim]);
                p(format!("{dl}.mlp.gate_proj.weight"), &[t.intermediate_size, h]);
                p(format!("{dl}.mlp.up_proj.weight"), &[t.intermediate_size, h]);
                p(format!("{dl}.mlp.down_proj.weight"), &[h, t.intermediate_size]);
                p(format!("{dl}.input_layernorm.weight"), &[h]);
                p(format!("{dl}.post_attention_layernorm.weight"), &[h]);
            }
            p("lang_encoder.model.norm.weight".into(), &[h]);
            p(LLAMA_HEAD.into(), &[t.vocab_size, h]);
        }
        TextConfig::Mpt(t) => {
            // No biases (`no_bias`), weight-only norms, no `wpe` (ALiBi), no lm_head (tied).
            let ffn = t.expansion_ratio * h;
            p(MPT_WTE.into(), &[t.vocab_size, h]);
            for i in 0..t.n_layers {
                let l = format!("lang_encoder.transformer.blocks.{i}");
                if cfg.has_xattn(i) {
                    xattn(&mut p, &l);
                }
                let dl = format!("{l}.decoder_layer");
                p(format!("{dl}.norm_1.weight"), &[h]);
                p(format!("{dl}.attn.Wqkv.weight"), &[3 * h, h]);
                p(format!("{dl}.attn.out_proj.weight"), &[h, h]);
                p(format!("{dl}.norm_2.weight"), &[h]);
                p(format!("{dl}.ffn.up_proj.weight"), &[ffn, h]);
                p(format!("{dl}.ffn.down_proj.weight"), &[h, ffn]);
            }
            p("lang_encoder.transformer.norm_f.weight".into(), &[h]);
        }
    }

    let mut specs: Vec<ParamSpec> = out
        .into_iter()
        .map(|(name, shape)| ParamSpec { group: group_of(&name), trainable: is_trainable(&name), name, shape })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Parameter counts per group, as `otter model-info` reports them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParamCounts {
    pub total: u64,
    pub trainable: u64,
    /// (group, total, trainable) in [`Group`] order.
    pub groups: Vec<(Group, u64, u64)>,
}

pub fn count(specs: &[ParamSpec]) -> ParamCounts {
    let mut by: std::collections::BTreeMap<Group, (u64, u64)> = Default::default();
    let mut c = ParamCounts::default();
    for s in specs {
        let n = s.numel();
        let e = by.entry(s.group).or_default();
        e.0 += n;
        c.total += n;
        if s.trainable {
            e.1 += n;
            c.trainable += n;
        }
    }
    c.groups = by.into_iter().map(|(g, (t, tr))| (g, t, tr)).collect();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otter_llama7b_counts_match_upstream() {
        let c = count(&parameter_specs(&OtterConfig::otter_llama7b()));
        assert_eq!(c.trainable, 1_441_011_728);
        let g = |grp: Group| c.groups.iter().find(|x| x.0 == grp).unwrap().2;
        assert_eq!(g(Group::Perceiver), 63_019_008);
        assert_eq!(g(Group::CrossAttention), 8 * 139_476_994);
        assert_eq!(g(Group::Embeddings), 2 * 131_088_384);
        assert_eq!(g(Group::VisionEncoder) + g(Group::LanguageModel), 0);
        assert!((8_100_000_000..8_300_000_000).contains(&c.total), "{}", c.total);
    }

    /// Upstream's rule on OTTER-Image-MPT7B (fixtures README): 1,385,404,432 trainable of
    /// 8,131,301,392, by group.
    #[test]
    fn otter_mpt7b_counts_match_upstream() {
        let c = count(&parameter_specs(&OtterConfig::otter_mpt7b()));
        assert_eq!((c.trainable, c.total), (1_385_404_432, 8_131_301_392));
        let g = |grp: Group| *c.groups.iter().find(|x| x.0 == grp).unwrap();
        assert_eq!(g(Group::Embeddings), (Group::Embeddings, 206_569_472, 206_569_472), "wte, 50432 x 4096, no lm_head");
        assert_eq!(g(Group::CrossAttention).2, 8 * 139_476_994);
        assert_eq!(g(Group::Perceiver).2, 63_019_008);
        assert_eq!(g(Group::VisionEncoder), (Group::VisionEncoder, 303_179_776, 0));
        assert_eq!(g(Group::LanguageModel), (Group::LanguageModel, 6_442_717_184, 0));
    }

    #[test]
    fn mpt_gradients_are_ordered_as_backward_finishes_them() {
        let mut names = vec![
            "lang_encoder.transformer.wte.weight",
            "perceiver.latents",
            "lang_encoder.transformer.blocks.3.gated_cross_attn_layer.attn_gate",
            "lang_encoder.transformer.blocks.11.gated_cross_attn_layer.ff_gate",
        ];
        names.sort_by_key(|n| backward_order(n));
        assert_eq!(
            names,
            [
                "lang_encoder.transformer.blocks.11.gated_cross_attn_layer.ff_gate",
                "lang_encoder.transformer.blocks.3.gated_cross_attn_layer.attn_gate",
                "perceiver.latents",
                "lang_encoder.transformer.wte.weight",
            ],
            "the tied wte is final only after the embedding lookup's backward"
        );
        assert_eq!(lm_layer("lang_encoder.transformer.blocks.11.decoder_layer.norm_1.weight"), Some(11));
        assert_eq!(lm_layer("lang_encoder.model.layers.7.gated_cross_attn_layer.attn_gate"), Some(7));
        assert_eq!(lm_layer("perceiver.layers.1.to_q.weight"), None);
    }

    #[test]
    fn gradients_are_ordered_as_backward_finishes_them() {
        let mut names = vec![
            "lang_encoder.model.embed_tokens.weight",
            "perceiver.latents",
            "perceiver.layers.0.to_q.weight",
            "perceiver.layers.1.to_q.weight",
            "perceiver.norm.weight",
            "lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate",
            "lang_encoder.model.layers.11.gated_cross_attn_layer.ff_gate",
            "lang_encoder.model.layers.11.gated_cross_attn_layer.attn_gate",
            "lang_encoder.lm_head.weight",
        ];
        names.sort_by_key(|n| backward_order(n));
        assert_eq!(
            names,
            [
                "lang_encoder.lm_head.weight",
                "lang_encoder.model.layers.11.gated_cross_attn_layer.ff_gate",
                "lang_encoder.model.layers.11.gated_cross_attn_layer.attn_gate",
                "lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate",
                "perceiver.norm.weight",
                "perceiver.layers.1.to_q.weight",
                "perceiver.layers.0.to_q.weight",
                "perceiver.latents",
                "lang_encoder.model.embed_tokens.weight",
            ],
            "layer 11 before layer 3 (not name order, where 11 < 3)"
        );
    }

    #[test]
    fn trainable_set_is_upstreams() {
        assert!(is_trainable("perceiver.latents"));
        assert!(is_trainable("lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate"));
        assert!(is_trainable("lang_encoder.lm_head.weight"));
        assert!(!is_trainable("lang_encoder.model.layers.3.decoder_layer.self_attn.q_proj.weight"));
        assert!(!is_trainable("lang_encoder.model.norm.weight"));
        assert!(!is_trainable("vision_encoder.vision_model.post_layernorm.weight"));
        assert!(is_trainable("lang_encoder.transformer.wte.weight"));
        assert!(is_trainable("lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff_gate"));
        assert!(!is_trainable("lang_encoder.transformer.blocks.1.decoder_layer.attn.Wqkv.weight"));
        assert!(!is_trainable("lang_encoder.transformer.norm_f.weight"));
    }
}
