//! The memory plan (`otter plan`): what one data-parallel rank holds, from the config
//! alone (no weights), and the largest micro-batch that fits a device.
//!
//! Per rank:
//! - **frozen weights** (CLIP, LLaMA layers) in the run's dtype; **trainable weights** as
//!   f32 masters, and under bf16 autocast their bf16 copies, which autocast caches for the
//!   step (every trainable matrix but the input embeddings, which are looked up);
//! - **gradients** (f32, one per trainable weight) and **optimizer state** (AdamW's two
//!   f32 moments; with `train.optimizer_sharding` those of a 1/world part, plus that
//!   part of the reduced gradient);
//! - **communication buckets**: with more than one rank, the flattened gradient buckets
//!   in flight: one bucket after backward, every bucket (a copy of the gradients) when
//!   the sync overlaps backward, as `train::grad_sync` keeps them until written back;
//! - **activations** of one micro-batch: what autograd keeps for backward, counted from
//!   the tensors each layer saves (see [`activation_bytes`]), plus the logits and the
//!   loss's saved softmax, plus the largest transient of backward.
//!
//! The activation count is an estimate: tests check it against measured peaks (peak RSS
//! on the CPU, the CUDA caching allocator's peak on a GPU, BENCHMARKS.md).

use crate::model::config::{Backbone, OtterConfig};
use crate::model::spec::parameter_specs;
use crate::train::config::ActivationCheckpointing;
use serde::Serialize;

/// What the plan is computed for.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub model: OtterConfig,
    /// bf16 frozen weights and autocast (CUDA); f32 otherwise.
    pub bf16: bool,
    /// Fused attention kernels (CUDA): no attention matrix is kept.
    pub fused_attention: bool,
    pub micro_batch: u64,
    pub seq_len: u64,
    /// Media items per sample (images, or videos of `frames` frames).
    pub media_per_sample: u64,
    pub frames: u64,
    pub world: u64,
    pub optimizer_sharding: bool,
    pub checkpointing: ActivationCheckpointing,
    pub bucket_bytes: u64,
    pub overlap: bool,
    /// The device's memory, if a fit is asked for.
    pub device_bytes: Option<u64>,
}

/// Bytes per rank, by what holds them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Plan {
    pub frozen_weights: u64,
    pub trainable_weights: u64,
    pub autocast_copies: u64,
    pub gradients: u64,
    pub optimizer_state: u64,
    pub comm_buckets: u64,
    /// Activations of one micro-batch of `micro_batch` samples.
    pub activations: u64,
    pub total: u64,
}

/// Allocator headroom: a plan fits when its total is at most this fraction of the device
/// (the caching allocator's fragmentation, the CUDA context, NCCL's buffers).
pub const FIT_FRACTION: f64 = 0.9;

impl Plan {
    pub fn fits(&self, device_bytes: u64) -> bool {
        self.total as f64 <= FIT_FRACTION * device_bytes as f64
    }
}

/// The plan for `input`.
pub fn plan(input: &PlanInput) -> Plan {
    let specs = parameter_specs(&input.model);
    let wbytes = if input.bf16 { 2 } else { 4 };
    let (mut frozen, mut trainable, mut cast) = (0u64, 0u64, 0u64);
    for s in &specs {
        if s.trainable {
            trainable += s.numel();
            if input.bf16 && !s.name.ends_with("embed_tokens.weight") && s.shape.len() >= 2 {
                cast += s.numel();
            }
        } else {
            frozen += s.numel();
        }
    }
    // Sharded: two f32 moments of a 1/world part, plus that part of the reduced gradient
    // (kept between steps).
    let world = input.world.max(1);
    let optimizer = if input.optimizer_sharding { 12 * trainable.div_ceil(world) } else { 8 * trainable };
    // A sharded step reduce-scatters after backward (never overlapped): one bucket, padded.
    let comm = match (input.world > 1, input.overlap && !input.optimizer_sharding) {
        (false, _) => 0,
        (true, false) => input.bucket_bytes.min(4 * trainable),
        (true, true) => 4 * trainable,
    };
    let mut p = Plan {
        frozen_weights: frozen * wbytes,
        trainable_weights: trainable * 4,
        autocast_copies: cast * 2,
        gradients: trainable * 4,
        optimizer_state: optimizer,
        comm_buckets: comm,
        activations: activation_bytes(input, input.micro_batch),
        total: 0,
    };
    p.total = p.frozen_weights + p.trainable_weights + p.autocast_copies + p.gradients + p.optimizer_state + p.comm_buckets + p.activations;
    p
}

/// The largest micro-batch (samples) whose plan fits `device_bytes`, if any does.
pub fn largest_micro_batch(input: &PlanInput, device_bytes: u64) -> Option<u64> {
    let fits = |b: u64| plan(&PlanInput { micro_batch: b, ..input.clone() }).fits(device_bytes);
    if !fits(1) {
        return None;
    }
    let mut b = 1;
    while b < 1 << 16 && fits(b * 2) {
        b *= 2;
    }
    // fits(b), !fits(2b): bisect.
    let (mut lo, mut hi) = (b, b * 2);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// Bytes autograd keeps for one micro-batch of `b` samples, and backward's largest
/// transient. Per token, with `e` the activation element size (2 under bf16 autocast,
/// else 4) and the residual stream in f32 (the trainable embeddings are f32):
///
/// - a LLaMA decoder layer keeps its two residual inputs (`2 x 4h`: RMSNorm saves its
///   input), the attention's q, k, v and output (`4eh`; eager attention keeps q, k, v,
///   the f32 softmax and its cast instead: `3eh + (4 + e') heads x L`), and the SwiGLU's
///   gate, its SiLU and the up projection (`3eI`); frozen projections keep nothing for a
///   weight gradient; an MPT block keeps the same but the GELU MLP's input and output
///   (`2eI`), and always the eager attention (ALiBi is added in f32);
/// - a cross-attention block keeps its LayerNorm inputs (`2 x 4h`), the inputs of its
///   trainable projections (`e(h + 2 inner)` and `e(h + ff h)` for the feed-forward), its
///   attention (`4 e inner`, or eager: `2 e inner + (4 + e') heads x T n`) and the
///   feed-forward's GELU input (`e ff h`);
/// - the perceiver keeps, per layer and media item, its inputs and projections over the
///   patches and latents; CLIP keeps nothing (no autograd);
/// - the loss keeps the f32 logits' log-softmax (`4V` per token) beside the logits
///   (`eV`), and backward holds their f32 gradient and its cast (`(4 + e)V`).
///
/// With checkpointing, a checkpointed segment keeps only its input (the f32 residual),
/// and backward holds one segment's activations at a time on top.
pub fn activation_bytes(input: &PlanInput, b: u64) -> u64 {
    let m = &input.model;
    let e: u64 = if input.bf16 { 2 } else { 4 };
    let cast_extra = if e == 4 { 0 } else { e }; // eager softmax: f32, then cast to e
    let (h, i, v) = (m.text.hidden_size() as u64, m.text.intermediate_size() as u64, m.text.vocab_size() as u64);
    let heads = m.text.num_attention_heads() as u64;
    let tokens = b * input.seq_len;
    let l = input.seq_len;
    let media = b * input.media_per_sample;
    let lat = m.perceiver.num_latents as u64;
    let xi = (m.xattn.dim_head * m.xattn.heads) as u64;
    let xheads = m.xattn.heads as u64;
    let xff = m.xattn.ff_mult as u64 * h;
    let d = m.vision.hidden_size as u64;
    let pinner = (m.perceiver.dim_head * m.perceiver.heads) as u64;
    let pff = m.perceiver.ff_mult as u64 * d;
    let patches = m.vision.num_patches() as u64 * input.frames;

    let attn_self = if input.fused_attention { 4 * e * h } else { 3 * e * h + (4 + cast_extra) * heads * l };
    // MLP: SwiGLU keeps gate, SiLU and up (3 x I); MPT's GELU MLP its input and output (2 x
    // I). MPT's attention is always eager (ALiBi is added in f32).
    let (attn_self, mlp_kept) = match m.text.backbone() {
        Backbone::Llama => (attn_self, 3 * e * i),
        Backbone::Mpt => (3 * e * h + (4 + cast_extra) * heads * l, 2 * e * i),
    };
    let decoder_per_token = 2 * 4 * h + attn_self + mlp_kept;
    let media_keys = input.media_per_sample * lat;
    let attn_x = if input.fused_attention { 4 * e * xi } else { 2 * e * xi + (4 + cast_extra) * xheads * media_keys };
    let xattn_per_token = 2 * 4 * h + e * (h + 2 * xi) + e * (h + xff) + attn_x + e * xff;
    let blocks = (0..m.text.num_layers()).filter(|&k| m.has_xattn(k)).count() as u64;
    let layers = m.text.num_layers() as u64;
    // Perceiver layer, per media item: media LayerNorm input (f32 CLIP features under no
    // autocast on the CPU, bf16 on CUDA) and the kv projection's input over patches +
    // latents, the latents' LayerNorm, q, attention and feed-forward over the latents.
    let perceiver_per_media = e * patches * d
        + e * (patches + lat) * d
        + lat * (2 * 4 * d + e * pinner * 2 + e * (d + pff) + e * pff)
        + (4 + cast_extra) * (m.perceiver.heads as u64) * lat * (patches + lat);
    let perceiver_layers = m.perceiver.depth as u64;
    let loss_kept = tokens * (e + 4) * v;
    let loss_backward = tokens * (4 + e) * v;

    let decoder_layer = tokens * decoder_per_token;
    let xattn_block = tokens * xattn_per_token;
    let perceiver_layer = media * perceiver_per_media;
    let residual = tokens * 4 * h;
    let embed_and_media = residual + media * lat * d * 4;

    let (decoder_kept, decoder_transient) = if input.checkpointing.decoder_layers() {
        (layers * residual, decoder_layer + xattn_block)
    } else {
        (layers * decoder_layer + blocks * xattn_block, 0)
    };
    let (perceiver_kept, perceiver_transient) = if input.checkpointing.perceiver_layers() {
        (perceiver_layers * media * lat * d * 4, perceiver_layer)
    } else {
        (perceiver_layers * perceiver_layer, 0)
    };
    let transient = loss_backward.max(decoder_transient).max(perceiver_transient);
    embed_and_media + decoder_kept + perceiver_kept + loss_kept + transient
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s_7b(world: u64, sharding: bool, checkpointing: ActivationCheckpointing) -> PlanInput {
        PlanInput {
            model: OtterConfig::otter_llama7b(),
            bf16: true,
            fused_attention: true,
            micro_batch: 4,
            seq_len: 2048,
            media_per_sample: 1,
            frames: 1,
            world,
            optimizer_sharding: sharding,
            checkpointing,
            bucket_bytes: 25 << 20,
            overlap: true,
            device_bytes: Some(80_000_000_000),
        }
    }

    #[test]
    fn weights_gradients_and_optimizer_follow_the_parameter_counts() {
        let p = plan(&k8s_7b(1, false, ActivationCheckpointing::DecoderLayers));
        let specs = parameter_specs(&OtterConfig::otter_llama7b());
        let trainable: u64 = specs.iter().filter(|s| s.trainable).map(|s| s.numel()).sum();
        let frozen: u64 = specs.iter().filter(|s| !s.trainable).map(|s| s.numel()).sum();
        assert_eq!(p.frozen_weights, 2 * frozen, "bf16 frozen weights");
        assert_eq!((p.trainable_weights, p.gradients, p.optimizer_state), (4 * trainable, 4 * trainable, 8 * trainable));
        assert_eq!(p.comm_buckets, 0, "one rank syncs nothing");
        assert_eq!(p.total, p.frozen_weights + p.trainable_weights + p.autocast_copies + p.gradients + p.optimizer_state + p.comm_buckets + p.activations);
    }

    #[test]
    fn sharding_divides_the_optimizer_state_by_the_world() {
        let one = plan(&k8s_7b(1, false, ActivationCheckpointing::DecoderLayers)).optimizer_state;
        let eight = plan(&k8s_7b(8, true, ActivationCheckpointing::DecoderLayers));
        // Two moments and the reduced gradient, of an eighth of the parameters.
        assert!(eight.optimizer_state * 8 >= one * 3 / 2 && eight.optimizer_state * 8 < one * 3 / 2 + 12 * 8, "{} vs {one}", eight.optimizer_state);
        assert_eq!(plan(&k8s_7b(8, false, ActivationCheckpointing::DecoderLayers)).optimizer_state, one);
        // Sharded steps reduce-scatter after backward: one bucket in flight.
        assert!(eight.comm_buckets <= 25 << 20, "{}", eight.comm_buckets);
    }

    #[test]
    fn otter_7b_at_the_k8s_recipe_fits_80_gb_only_with_checkpointing() {
        let with = plan(&k8s_7b(8, false, ActivationCheckpointing::DecoderLayers));
        let without = plan(&k8s_7b(8, false, ActivationCheckpointing::None));
        assert!(with.fits(80_000_000_000), "{with:?}");
        assert!(!without.fits(80_000_000_000), "{without:?}");
        assert!(without.activations > 4 * with.activations);
        let b = largest_micro_batch(&k8s_7b(8, false, ActivationCheckpointing::DecoderLayers), 80_000_000_000).unwrap();
        assert!(b >= 4, "the recipe's 4 fits: {b}");
        assert!(plan(&PlanInput { micro_batch: b + 1, ..k8s_7b(8, false, ActivationCheckpointing::DecoderLayers) }).total as f64 > FIT_FRACTION * 80e9);
    }

    #[test]
    fn activations_grow_with_the_micro_batch() {
        let input = k8s_7b(1, false, ActivationCheckpointing::None);
        assert_eq!(activation_bytes(&input, 2), 2 * activation_bytes(&input, 1));
    }
}
