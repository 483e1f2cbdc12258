//! Otter (Li et al., 2023) = OpenFlamingo's composition (Awadalla et al., 2023), as
//! upstream `OtterForConditionalGeneration`: a frozen CLIP encoder feeds a trainable
//! perceiver resampler; its latents are attended by gated cross-attention blocks placed
//! before every `cross_attn_every_n_layers`-th layer of a frozen language model: LLaMA
//! (`llama.rs`) or MPT (`mpt.rs`), chosen by the config.
//!
//! The composition (embedding, cross-attention placement, media masks, activation
//! checkpointing, KV caches, loss) is written once, generic over [`Backbone`]; a backbone
//! supplies its embedding, its decoder layers, what they share in one forward (RoPE
//! tables and mask, or the ALiBi bias), and its head.
//!
//! Media is passed explicitly to `forward` (no hidden "conditioned" state).

use super::clip::ClipVision;
use super::config::{OtterConfig, TextConfig};
use super::checkpoint::{checkpoint, grad_enabled, ActivationCheckpointing};
use super::nn::KvCache;
use super::perceiver::PerceiverResampler;
use super::weights::{LoadError, LoadOptions, MappedCheckpoint, Params, Vb};
use super::xattn::{GatedCrossAttention, MediaMask};
use super::{llama, mpt};
pub use super::backbone::Backbone;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Reduction, Tensor};

/// Input that does not fit the model, named by tensor.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input `{name}`: {message}")]
    Shape { name: &'static str, message: String },
}

fn bad(name: &'static str, message: String) -> InputError {
    InputError::Shape { name, message }
}

struct Layer<B: Backbone> {
    xattn: Option<GatedCrossAttention>,
    decoder: B::Layer,
}

impl<B: Backbone> Layer<B> {
    /// The cross-attention block (if any) over `media`, then the decoder layer.
    fn forward(&self, x: &Tensor, media: &Tensor, mask: &MediaMask, shared: &B::Shared, cache: Option<&mut KvCache>) -> Tensor {
        super::precision::observe(super::precision::Site::DecoderLayer);
        let x = match &self.xattn {
            Some(xattn) => xattn.forward(x, media, mask),
            None => x.shallow_clone(),
        };
        B::layer(&self.decoder, &x, shared, cache)
    }
}

/// A backbone with its layers, each with its optional gated cross-attention block.
struct LanguageModel<B: Backbone> {
    backbone: B,
    layers: Vec<Arc<Layer<B>>>,
}

impl<B: Backbone> LanguageModel<B> {
    /// Layer i's weights at `{layers}.{i}.decoder_layer`, its cross-attention block's at
    /// `{layers}.{i}.gated_cross_attn_layer` (upstream's names).
    fn new(backbone: B, layers: &Vb, cfg: &OtterConfig, decoder: impl Fn(&Vb) -> B::Layer) -> Self {
        let layers = (0..cfg.text.num_layers())
            .map(|i| {
                let l = layers.pp(i);
                Arc::new(Layer {
                    xattn: cfg.has_xattn(i).then(|| GatedCrossAttention::new(&l.pp("gated_cross_attn_layer"), &cfg.xattn)),
                    decoder: decoder(&l.pp("decoder_layer")),
                })
            })
            .collect();
        Self { backbone, layers }
    }
}

/// The language model of one of the supported backbones.
enum Lm {
    Llama(LanguageModel<llama::Llama>),
    Mpt(LanguageModel<mpt::Mpt>),
}

pub struct Otter {
    pub cfg: OtterConfig,
    pub params: Params,
    vision: ClipVision,
    perceiver: PerceiverResampler,
    lm: Lm,
    /// CUDA autocast in bf16 (`LoadOptions::frozen_kind == BFloat16` on CUDA; see
    /// `precision.rs`).
    autocast: bool,
    /// Segments recomputed in backward (`train.activation_checkpointing`).
    checkpointing: ActivationCheckpointing,
}

impl Otter {
    /// Loads `dir/config.json` (+ `tokenizer.json` if present) and its safetensors.
    pub fn load_dir(dir: &Path, opts: LoadOptions) -> Result<Self, ModelError> {
        let cfg = OtterConfig::from_model_dir(dir)?;
        let ckpt = MappedCheckpoint::open(dir)?;
        let params = Params::load(&cfg, &ckpt, opts)?;
        Ok(Self::new(cfg, params, opts))
    }

    pub fn new(cfg: OtterConfig, params: Params, opts: LoadOptions) -> Self {
        let vb = Vb::root(&params);
        let lm = match &cfg.text {
            TextConfig::Llama(t) => {
                let layers = vb.pp("lang_encoder.model.layers");
                Lm::Llama(LanguageModel::new(llama::Llama::new(&vb, t), &layers, &cfg, |v| llama::DecoderLayer::new(v, t)))
            }
            TextConfig::Mpt(t) => {
                let tr = vb.pp("lang_encoder.transformer");
                Lm::Mpt(LanguageModel::new(mpt::Mpt::new(&tr, t), &tr.pp("blocks"), &cfg, |v| mpt::Block::new(v, t)))
            }
        };
        Self {
            vision: ClipVision::new(&vb.pp("vision_encoder.vision_model"), &cfg.vision),
            perceiver: PerceiverResampler::new(&vb.pp("perceiver"), &cfg.perceiver),
            lm,
            autocast: opts.device.is_cuda() && opts.frozen_kind == Kind::BFloat16,
            checkpointing: ActivationCheckpointing::None,
            cfg,
            params,
        }
    }

    /// Whether the forward runs under CUDA autocast in bf16.
    pub fn autocast(&self) -> bool {
        self.autocast
    }

    /// Turns CUDA autocast (bf16) on or off. Tests only: on CPU tensors CUDA autocast
    /// changes no op, but its thread-local state is set exactly as on a GPU, which is what
    /// `precision::probe` checks at every entry (the CUDA path itself is checked by
    /// scripts/gpu-check.sh).
    pub fn set_autocast_for_tests(&mut self, on: bool) {
        self.autocast = on;
    }

    /// Recompute these segments' activations in backward instead of keeping them. Same
    /// gradients (the segments have no randomness); less memory, one more forward of them.
    pub fn set_activation_checkpointing(&mut self, mode: ActivationCheckpointing) {
        self.checkpointing = mode;
    }

    pub fn activation_checkpointing(&self) -> ActivationCheckpointing {
        self.checkpointing
    }

    pub fn device(&self) -> Device {
        match &self.lm {
            Lm::Llama(lm) => lm.backbone.device(),
            Lm::Mpt(lm) => lm.backbone.device(),
        }
    }

    /// Checks input shapes and dtypes against the config before any op can panic.
    pub fn check_inputs(&self, vision_x: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(), InputError> {
        let v = vision_x.size();
        let c = &self.cfg.vision;
        if v.len() != 6 {
            return Err(bad("vision_x", format!("expected 6 dims (B, T, F, C, H, W), got {v:?}")));
        }
        let want = [c.num_channels as i64, c.image_size as i64, c.image_size as i64];
        if v[3..] != want {
            return Err(bad("vision_x", format!("expected (C, H, W) = {want:?}, got {:?}", &v[3..])));
        }
        if v[1] == 0 || v[2] == 0 {
            return Err(bad("vision_x", format!("needs at least one image and frame, got {v:?}")));
        }
        match self.cfg.max_num_frames {
            Some(max) if v[2] as usize > max => {
                return Err(bad("vision_x", format!("{} frames exceed max_num_frames {max}", v[2])))
            }
            None if v[2] > 1 => {
                return Err(bad("vision_x", format!("{} frames given to an image model (no frame_embs)", v[2])))
            }
            _ => {}
        }
        if !vision_x.is_floating_point() {
            return Err(bad("vision_x", format!("expected a float tensor, got {:?}", vision_x.kind())));
        }
        let ids = input_ids.size();
        if ids.len() != 2 || ids[0] != v[0] || ids[1] == 0 {
            return Err(bad("input_ids", format!("expected (B={}, L>0), got {ids:?}", v[0])));
        }
        if let Some(max) = self.cfg.text.max_seq_len() {
            if ids[1] as usize > max {
                return Err(bad("input_ids", format!("{} tokens exceed the model's max_seq_len {max}", ids[1])));
            }
        }
        if input_ids.kind() != Kind::Int64 {
            return Err(bad("input_ids", format!("expected int64, got {:?}", input_ids.kind())));
        }
        let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.text.vocab_size() as i64 {
            return Err(bad("input_ids", format!("ids span [{lo}, {hi}], vocabulary is {}", self.cfg.text.vocab_size())));
        }
        if attention_mask.size() != ids {
            return Err(bad("attention_mask", format!("expected shape {ids:?}, got {:?}", attention_mask.size())));
        }
        let images = input_ids.eq(self.cfg.tokens.media).sum_dim_intlist(&[1i64][..], false, Kind::Int64).max().int64_value(&[]);
        if images > v[1] {
            return Err(bad("input_ids", format!("a sample has {images} <image> tokens but vision_x holds T={} images", v[1])));
        }
        Ok(())
    }

    /// vision_x (B, T, F, C, H, W) -> perceiver latents (B, T, n, D).
    pub fn encode_media(&self, vision_x: &Tensor) -> Tensor {
        let s = vision_x.size();
        let (b, t, f) = (s[0], s[1], s[2]);
        let feats = tch::no_grad(|| {
            let pixels = vision_x.to_device(self.device()).reshape([b * t * f, s[3], s[4], s[5]]);
            self.vision.forward(&pixels) // (B*T*F, v, D)
        });
        let fs = feats.size();
        let checkpointed = self.checkpointing.perceiver_layers() && grad_enabled();
        self.perceiver.forward(&feats.reshape([b, t, f, fs[1], fs[2]]), checkpointed.then_some(self.autocast))
    }

    /// Full forward: logits (B, L, V) in f32. Inputs must pass [`Self::check_inputs`].
    pub fn forward(&self, vision_x: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        super::precision::autocast(self.autocast, || {
            super::precision::observe(super::precision::Site::Forward);
            let media = self.encode_media(vision_x);
            let ids = input_ids.to_device(self.device());
            let text_time = ids.eq(self.cfg.tokens.media).cumsum(-1, Kind::Int64);
            let mut caches: Vec<KvCache> = Vec::new();
            self.decode(&media, &ids, &attention_mask.to_device(self.device()), &text_time, &mut caches, false)
        })
    }

    /// Runs the language model over `ids` (B, L) given media latents (B, T, n, D).
    /// `key_mask` (B, cached + L) marks real tokens; `text_time` (B, L) is each new
    /// position's image number. With `use_cache`, `caches` holds one entry per layer and is
    /// extended by these L positions.
    pub fn decode(
        &self,
        media: &Tensor,
        ids: &Tensor,
        key_mask: &Tensor,
        text_time: &Tensor,
        caches: &mut Vec<KvCache>,
        use_cache: bool,
    ) -> Tensor {
        match &self.lm {
            Lm::Llama(lm) => self.decode_with(lm, media, ids, key_mask, text_time, caches, use_cache),
            Lm::Mpt(lm) => self.decode_with(lm, media, ids, key_mask, text_time, caches, use_cache),
        }
    }

    /// [`Self::decode`] for one backbone: the composition itself.
    #[allow(clippy::too_many_arguments)]
    fn decode_with<B: Backbone>(
        &self,
        lm: &LanguageModel<B>,
        media: &Tensor,
        ids: &Tensor,
        key_mask: &Tensor,
        text_time: &Tensor,
        caches: &mut Vec<KvCache>,
        use_cache: bool,
    ) -> Tensor {
        let (_, l) = ids.size2().expect("(B, L)");
        let ms = media.size();
        let media_flat = media.reshape([ms[0], ms[1] * ms[2], ms[3]]); // (B, T*n, D)
        let mask = MediaMask::new(text_time, ms[1], ms[2]);
        if use_cache && caches.is_empty() {
            caches.resize_with(lm.layers.len(), KvCache::default);
        }
        let offset = if use_cache { caches[0].len() } else { 0 };
        let shared = lm.backbone.shared(key_mask, l, offset);
        let checkpointed = self.checkpointing.decoder_layers() && !use_cache && grad_enabled();
        let mut x = lm.backbone.embed(ids);
        for (i, layer) in lm.layers.iter().enumerate() {
            x = if checkpointed {
                self.checkpointed_layer(layer, &x, &media_flat, &mask, &shared)
            } else {
                let cache = if use_cache { Some(&mut caches[i]) } else { None };
                layer.forward(&x, &media_flat, &mask, &shared, cache)
            };
        }
        lm.backbone.head(&x).to_kind(Kind::Float)
    }

    /// One layer (cross-attention block and decoder layer) as a checkpointed segment: its
    /// inputs are the hidden states and, where it has a cross-attention block, the media
    /// latents (both carry gradients); the masks and position tables are constants it owns.
    fn checkpointed_layer<B: Backbone>(&self, layer: &Arc<Layer<B>>, x: &Tensor, media: &Tensor, mask: &MediaMask, shared: &B::Shared) -> Tensor {
        let layer = Arc::clone(layer);
        let (mask, shared, autocast) = (mask.shallow_clone(), B::share(shared), self.autocast);
        if layer.xattn.is_some() {
            checkpoint(&[x, media], move |t| super::precision::autocast(autocast, || layer.forward(&t[0], &t[1], &mask, &shared, None)))
        } else {
            let media = media.shallow_clone(); // unused by a layer without cross-attention
            checkpoint(&[x], move |t| super::precision::autocast(autocast, || layer.forward(&t[0], &media, &mask, &shared, None)))
        }
    }

    /// Trainable parameters in name order.
    pub fn trainable(&self) -> Vec<(&str, &Tensor)> {
        self.params.trainable()
    }
}

/// HF causal-LM loss: logits at position i predict label i+1; mean cross-entropy over
/// targets that are not -100. (A batch with no target at all gives NaN, as in HF.)
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (b, l, v) = logits.size3().expect("(B, L, V)");
    let shift_logits = logits.narrow(1, 0, l - 1).reshape([b * (l - 1), v]).to_kind(Kind::Float);
    let shift_labels = labels.to_device(logits.device()).narrow(1, 1, l - 1).reshape([b * (l - 1)]);
    shift_logits.cross_entropy_loss::<Tensor>(&shift_labels, None, Reduction::Mean, -100, 0.0)
}

/// Errors from building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Input(#[from] InputError),
}
