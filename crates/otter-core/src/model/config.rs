//! Model configuration in two tiers (candle's `LlamaConfig::into_config` pattern):
//!
//! * [`HfOtterConfig`]: a serde mirror of upstream's Hugging Face `config.json`
//!   (`OtterConfig`: `text_config` = LlamaConfig or upstream's MPTConfig,
//!   `vision_config` = CLIPVisionConfig, `cross_attn_every_n_layers`, optional
//!   `max_num_frames`), with `Option`s wherever upstream has defaults. Unknown keys are
//!   ignored, as HF does.
//! * [`OtterConfig`]: the resolved config the model is built from; every default filled
//!   in, every unsupported setting rejected with the field named.
//!
//! The language-model backbone ([`Backbone`]) is chosen by `text_config.model_type`
//! (`llama` / `mpt`) or `text_config.architectures[0]` (`LlamaForCausalLM` /
//! `MPTForCausalLM`); a config naming neither is LLaMA (upstream's first releases).
//!
//! Upstream hard-codes the perceiver and cross-attention sizes; they may be given
//! explicitly as `perceiver_config` / `xattn_config` (the tiny fixture does).
//! Presets: [`OtterConfig::tiny`], [`OtterConfig::otter_llama7b`] and
//! [`OtterConfig::otter_mpt7b`].

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors while reading or resolving a model config. Each names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: field `{field}`: {message}")]
    Parse { path: PathBuf, field: String, message: String },
    #[error("{origin}: field `{field}`: {message}")]
    Invalid { origin: String, field: String, message: String },
    #[error("unknown model preset `{0}` (known: tiny, otter_llama7b, otter_mpt7b)")]
    UnknownPreset(String),
}

// ---------------------------------------------------------------------------------------
// Tier 1: serde mirror of the HF config.json
// ---------------------------------------------------------------------------------------

/// Mirror of upstream `OtterConfig` as saved in `config.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfOtterConfig {
    pub text_config: HfTextConfig,
    pub vision_config: HfClipVisionConfig,
    /// Upstream default: 4 (LLaMA-7B: cross-attention before layers 3, 7, ..., 31).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attn_every_n_layers: Option<usize>,
    /// Video models only: adds `perceiver.frame_embs` (max_num_frames, D).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_frames: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perceiver_config: Option<HfPerceiverConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xattn_config: Option<HfXattnConfig>,
    /// Upstream's `only_attend_previous`; must be true when present (the only mode
    /// upstream trains with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_attend_previous: Option<bool>,
}

/// Mirror of the language model's config: HF `LlamaConfig` or upstream Otter's own
/// `MPTConfig` (the fields that change the computation). One flat struct, as the JSON is,
/// so that a malformed field is reported by its path (`text_config.d_model`); which
/// fields are required depends on the backbone and is checked by [`HfOtterConfig::resolve`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HfTextConfig {
    /// `llama` or `mpt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// `["LlamaForCausalLM"]` or `["MPTForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Embedding rows (required for LLaMA; MPT's default is 50368).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    // --- LLaMA (MPT configs may carry `hidden_size` too: upstream reads it for the
    // cross-attention width, so it must equal `d_model` there) ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    // --- both ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    // --- MPT (upstream `otter_ai/models/mpt/configuration_mpt.py`; defaults there) ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_model: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_ratio: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_type: Option<String>,
    /// A number or `"inv_sqrt_d_model"`; only null (none) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_scale: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_fraction: Option<f64>,
    /// Has no effect with ALiBi: upstream creates `wpe` only when `alibi` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_pos_emb: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resid_pdrop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emb_pdrop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_config: Option<HfMptAttnConfig>,
}

/// MPT's `attn_config`. Absent keys take upstream's `attn_config_defaults` (note:
/// `alibi` defaults to false there).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HfMptAttnConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_pdrop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_impl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_ln: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_scale: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_lm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_uses_sequence_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alibi: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alibi_bias_max: Option<f64>,
}

/// Mirror of HF `CLIPVisionConfig`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_channels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
}

/// Perceiver resampler sizes (not in upstream configs: upstream hard-codes them).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HfPerceiverConfig {
    pub depth: Option<usize>,
    pub dim_head: Option<usize>,
    pub heads: Option<usize>,
    pub num_latents: Option<usize>,
    pub ff_mult: Option<usize>,
}

/// Gated cross-attention sizes (not in upstream configs: upstream hard-codes them).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HfXattnConfig {
    pub dim_head: Option<usize>,
    pub heads: Option<usize>,
    pub ff_mult: Option<usize>,
    pub only_attend_immediate_media: Option<bool>,
}

// ---------------------------------------------------------------------------------------
// Tier 2: resolved config
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
}

/// MPT (MosaicML, 2023) as upstream Otter's `MPTForCausalLM` computes it: ALiBi, no
/// biases, weight-only LayerNorms, exact-GELU MLP of `expansion_ratio * d_model`,
/// multi-head attention through one fused `Wqkv`, output projection tied to `wte`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MptConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub expansion_ratio: usize,
    /// Longest sequence (cached positions included) upstream accepts.
    pub max_seq_len: usize,
    /// ALiBi's `alibi_bias_max` (8 in every released MPT).
    pub alibi_bias_max: f64,
}

impl MptConfig {
    /// LayerNorm epsilon of every MPT norm (upstream's `LPLayerNorm` default).
    pub const NORM_EPS: f64 = 1e-5;

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// Which language model Otter is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backbone {
    Llama,
    Mpt,
}

impl Backbone {
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Llama => "LLaMA",
            Backbone::Mpt => "MPT",
        }
    }
}

/// The resolved language-model config of one backbone. Serialized as the inner config
/// (untagged), so a LLaMA model's resolved config reads as it always did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TextConfig {
    Llama(LlamaConfig),
    Mpt(MptConfig),
}

impl TextConfig {
    pub fn backbone(&self) -> Backbone {
        match self {
            TextConfig::Llama(_) => Backbone::Llama,
            TextConfig::Mpt(_) => Backbone::Mpt,
        }
    }

    /// Embedding rows (and output logits).
    pub fn vocab_size(&self) -> usize {
        match self {
            TextConfig::Llama(t) => t.vocab_size,
            TextConfig::Mpt(t) => t.vocab_size,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::Llama(t) => t.hidden_size,
            TextConfig::Mpt(t) => t.d_model,
        }
    }

    /// Decoder layers (LLaMA) or blocks (MPT).
    pub fn num_layers(&self) -> usize {
        match self {
            TextConfig::Llama(t) => t.num_hidden_layers,
            TextConfig::Mpt(t) => t.n_layers,
        }
    }

    pub fn num_attention_heads(&self) -> usize {
        match self {
            TextConfig::Llama(t) => t.num_attention_heads,
            TextConfig::Mpt(t) => t.n_heads,
        }
    }

    /// Width of the MLP's hidden layer.
    pub fn intermediate_size(&self) -> usize {
        match self {
            TextConfig::Llama(t) => t.intermediate_size,
            TextConfig::Mpt(t) => t.expansion_ratio * t.d_model,
        }
    }

    /// The longest sequence the model accepts, where it has such a limit (MPT's
    /// `max_seq_len`; LLaMA's RoPE has none).
    pub fn max_seq_len(&self) -> Option<usize> {
        match self {
            TextConfig::Llama(_) => None,
            TextConfig::Mpt(t) => Some(t.max_seq_len),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patch tokens per image (the CLS token is dropped by Otter).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerceiverConfig {
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_latents: usize,
    pub ff_mult: usize,
}

impl Default for PerceiverConfig {
    /// Upstream `OtterPerceiverResampler` defaults.
    fn default() -> Self {
        Self { depth: 6, dim_head: 64, heads: 8, num_latents: 64, ff_mult: 4 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XattnConfig {
    pub dim_head: usize,
    pub heads: usize,
    pub ff_mult: usize,
}

impl Default for XattnConfig {
    /// Upstream `OtterGatedCrossAttentionBlock` defaults.
    fn default() -> Self {
        Self { dim_head: 64, heads: 8, ff_mult: 4 }
    }
}

/// Ids of the tokens the model itself depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// `<image>`: marks where media is attended (media mask).
    pub media: i64,
    /// `<|endofchunk|>`: ends an answer; generation stops here.
    pub end_of_chunk: i64,
    /// `<answer>`: labels start after it.
    pub answer: i64,
    /// `<PAD>`.
    pub pad: i64,
    pub bos: i64,
    pub eos: i64,
}

impl SpecialTokens {
    /// Upstream adds `<|endofchunk|>`, `<image>`, `<answer>`, `<PAD>` in that order at the
    /// end of the base vocabulary, so in a resized model they are the last four ids.
    pub fn upstream_layout(vocab_size: usize) -> Self {
        let v = vocab_size as i64;
        Self { end_of_chunk: v - 4, media: v - 3, answer: v - 2, pad: v - 1, bos: 1, eos: 2 }
    }

    /// MPT-7B's tokenizer (GPT-NeoX's, 50277 tokens; `<|endoftext|>` = 0 is bos and eos)
    /// with Otter's four tokens appended: 50277..50280. Upstream does not resize MPT's
    /// embedding (50432 rows), so the added ids are not the last rows; where the
    /// vocabulary is too small for this layout (synthetic models), the last four ids.
    /// A model directory's `tokenizer.json` overrides either guess.
    pub fn mpt_layout(vocab_size: usize) -> Self {
        const NEOX_TOKENS: i64 = 50277;
        if vocab_size as i64 >= NEOX_TOKENS + 4 {
            let v = NEOX_TOKENS;
            Self { end_of_chunk: v, media: v + 1, answer: v + 2, pad: v + 3, bos: 0, eos: 0 }
        } else {
            Self { bos: 0, eos: 0, ..Self::upstream_layout(vocab_size) }
        }
    }
}

/// The resolved Otter configuration: no defaults left to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtterConfig {
    pub text: TextConfig,
    pub vision: ClipVisionConfig,
    pub perceiver: PerceiverConfig,
    pub xattn: XattnConfig,
    /// A gated cross-attention block runs before decoder layer N when
    /// `(N + 1) % cross_attn_every_n_layers == 0`.
    pub cross_attn_every_n_layers: usize,
    /// `Some(F)` for video models: learned `perceiver.frame_embs` for up to F frames.
    /// `None` for image models (a real absence, not a default).
    pub max_num_frames: Option<usize>,
    pub tokens: SpecialTokens,
}

impl OtterConfig {
    /// Indices of decoder layers preceded by a gated cross-attention block.
    pub fn xattn_layers(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.cross_attn_every_n_layers;
        (0..self.text.num_layers()).filter(move |i| (i + 1) % n == 0)
    }

    pub fn backbone(&self) -> Backbone {
        self.text.backbone()
    }

    pub fn has_xattn(&self, layer: usize) -> bool {
        (layer + 1) % self.cross_attn_every_n_layers == 0
    }

    /// The fixture-sized model (`shared/fixtures/tiny_otter`), for demos and tests.
    pub fn tiny() -> Self {
        let hf: HfOtterConfig = serde_json::from_str(TINY_CONFIG_JSON).expect("built-in preset parses");
        hf.resolve("preset tiny").expect("built-in preset is valid")
    }

    /// OTTER-Image-LLaMA7B: CLIP ViT-L/14 + LLaMA-7B with 4 added tokens.
    pub fn otter_llama7b() -> Self {
        let hf: HfOtterConfig =
            serde_json::from_str(LLAMA7B_CONFIG_JSON).expect("built-in preset parses");
        hf.resolve("preset otter_llama7b").expect("built-in preset is valid")
    }

    /// OTTER-Image-MPT7B (and OTTER-MPT7B-Init): CLIP ViT-L/14 + MPT-7B, upstream's
    /// `Otter-MPT7B-config.json`.
    pub fn otter_mpt7b() -> Self {
        let hf: HfOtterConfig = serde_json::from_str(MPT7B_CONFIG_JSON).expect("built-in preset parses");
        hf.resolve("preset otter_mpt7b").expect("built-in preset is valid")
    }

    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "otter_llama7b" => Ok(Self::otter_llama7b()),
            "otter_mpt7b" => Ok(Self::otter_mpt7b()),
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }

    /// Reads `dir/config.json` and, when present, the special-token ids from
    /// `dir/tokenizer.json` (otherwise upstream's layout: the last four ids).
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let mut cfg = HfOtterConfig::from_file(&path)?.resolve(&path.display().to_string())?;
        let tok = dir.join("tokenizer.json");
        if tok.exists() {
            cfg.tokens = special_tokens_from_tokenizer(&tok, &cfg)?;
        }
        Ok(cfg)
    }
}

impl HfOtterConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Fills upstream defaults and rejects settings this implementation does not compute.
    /// `origin` names the source (file or preset) in errors.
    pub fn resolve(&self, origin: &str) -> Result<OtterConfig, ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        let t = &self.text_config;
        let v = &self.vision_config;
        let text = match t.backbone().map_err(|(field, message)| bad(field, message))? {
            Backbone::Llama => TextConfig::Llama(t.resolve_llama().map_err(|(field, message)| bad(&field, message))?),
            Backbone::Mpt => TextConfig::Mpt(t.resolve_mpt().map_err(|(field, message)| bad(&field, message))?),
        };
        let positive = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if let Some(act) = &v.hidden_act {
            if act != "quick_gelu" {
                return Err(bad("vision_config.hidden_act", format!("`{act}` is not supported (CLIP uses `quick_gelu`)")));
            }
        }
        if self.only_attend_previous == Some(false) {
            return Err(bad("only_attend_previous", "only `true` (upstream's training mode) is supported".into()));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(bad(
                "vision_config.num_attention_heads",
                format!("{} does not divide hidden_size ({})", v.num_attention_heads, v.hidden_size),
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(bad(
                "vision_config.patch_size",
                format!("{} does not divide image_size ({})", v.patch_size, v.image_size),
            ));
        }
        let every = self.cross_attn_every_n_layers.unwrap_or(4);
        if every == 0 {
            return Err(bad("cross_attn_every_n_layers", "must be positive".into()));
        }
        if self.max_num_frames == Some(0) {
            return Err(bad("max_num_frames", "must be positive when given".into()));
        }
        let p = self.perceiver_config.clone().unwrap_or_default();
        let pd = PerceiverConfig::default();
        let perceiver = PerceiverConfig {
            depth: p.depth.unwrap_or(pd.depth),
            dim_head: p.dim_head.unwrap_or(pd.dim_head),
            heads: p.heads.unwrap_or(pd.heads),
            num_latents: p.num_latents.unwrap_or(pd.num_latents),
            ff_mult: p.ff_mult.unwrap_or(pd.ff_mult),
        };
        for (field, value) in [
            ("perceiver_config.depth", perceiver.depth),
            ("perceiver_config.dim_head", perceiver.dim_head),
            ("perceiver_config.heads", perceiver.heads),
            ("perceiver_config.num_latents", perceiver.num_latents),
            ("perceiver_config.ff_mult", perceiver.ff_mult),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        let x = self.xattn_config.clone().unwrap_or_default();
        if x.only_attend_immediate_media == Some(false) {
            return Err(bad(
                "xattn_config.only_attend_immediate_media",
                "only `true` (upstream's setting) is supported".into(),
            ));
        }
        let xd = XattnConfig::default();
        let xattn = XattnConfig {
            dim_head: x.dim_head.unwrap_or(xd.dim_head),
            heads: x.heads.unwrap_or(xd.heads),
            ff_mult: x.ff_mult.unwrap_or(xd.ff_mult),
        };
        for (field, value) in [
            ("xattn_config.dim_head", xattn.dim_head),
            ("xattn_config.heads", xattn.heads),
            ("xattn_config.ff_mult", xattn.ff_mult),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if text.vocab_size() < 4 {
            return Err(bad("text_config.vocab_size", "must hold Otter's 4 added tokens".into()));
        }
        let mut tokens = match text.backbone() {
            Backbone::Llama => SpecialTokens::upstream_layout(text.vocab_size()),
            Backbone::Mpt => SpecialTokens::mpt_layout(text.vocab_size()),
        };
        if let Some(b) = t.bos_token_id {
            tokens.bos = b;
        }
        if let Some(e) = t.eos_token_id {
            tokens.eos = e;
        }
        Ok(OtterConfig {
            text,
            vision: ClipVisionConfig {
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                num_channels: v.num_channels.unwrap_or(3),
                patch_size: v.patch_size,
                image_size: v.image_size,
                layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
            },
            perceiver,
            xattn,
            cross_attn_every_n_layers: every,
            max_num_frames: self.max_num_frames,
            tokens,
        })
    }
}

/// A text-config problem: (field path, message).
type FieldError = (String, String);

impl HfTextConfig {
    /// The backbone `model_type` / `architectures[0]` name (LLaMA when neither is given).
    pub fn backbone(&self) -> Result<Backbone, (&'static str, String)> {
        let by_type = match self.model_type.as_deref() {
            None => None,
            Some("llama") => Some(Backbone::Llama),
            Some("mpt") => Some(Backbone::Mpt),
            Some(other) => {
                return Err(("text_config.model_type", format!("`{other}` is not a supported backbone (supported: `llama`, `mpt`)")))
            }
        };
        let by_arch = match self.architectures.as_ref().and_then(|a| a.first()).map(String::as_str) {
            None => None,
            Some("LlamaForCausalLM") => Some(Backbone::Llama),
            Some("MPTForCausalLM") => Some(Backbone::Mpt),
            Some(other) => {
                return Err((
                    "text_config.architectures",
                    format!("`{other}` is not a supported language model (supported: `LlamaForCausalLM`, upstream Otter's `MPTForCausalLM`)"),
                ))
            }
        };
        match (by_type, by_arch) {
            (Some(a), Some(b)) if a != b => Err((
                "text_config.architectures",
                format!("names a {} model but `model_type` names {}", b.name(), a.name()),
            )),
            (a, b) => Ok(a.or(b).unwrap_or(Backbone::Llama)),
        }
    }

    fn require(&self, field: &str, value: Option<usize>) -> Result<usize, FieldError> {
        match value {
            None => Err((format!("text_config.{field}"), "missing (required for this backbone)".into())),
            Some(0) => Err((format!("text_config.{field}"), "must be positive".into())),
            Some(v) => Ok(v),
        }
    }

    fn resolve_llama(&self) -> Result<LlamaConfig, FieldError> {
        let bad = |field: &str, message: &str| (format!("text_config.{field}"), message.to_string());
        let vocab_size = self.require("vocab_size", self.vocab_size)?;
        let hidden_size = self.require("hidden_size", self.hidden_size)?;
        let intermediate_size = self.require("intermediate_size", self.intermediate_size)?;
        let num_hidden_layers = self.require("num_hidden_layers", self.num_hidden_layers)?;
        let heads = self.require("num_attention_heads", self.num_attention_heads)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad("hidden_act", &format!("`{act}` is not supported (LLaMA uses `silu`)")));
            }
        }
        if matches!(&self.rope_scaling, Some(x) if !x.is_null()) {
            return Err(bad("rope_scaling", "RoPE scaling is not supported"));
        }
        if self.attention_bias == Some(true) {
            return Err(bad("attention_bias", "biased attention projections are not supported"));
        }
        if self.mlp_bias == Some(true) {
            return Err(bad("mlp_bias", "biased MLP projections are not supported"));
        }
        if self.tie_word_embeddings == Some(true) {
            return Err(bad("tie_word_embeddings", "Otter's LLaMA lm_head is untied"));
        }
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad("num_key_value_heads", &format!("{kv_heads} must divide num_attention_heads ({heads})")));
        }
        if self.head_dim.is_none() && hidden_size % heads != 0 {
            return Err(bad("num_attention_heads", &format!("{heads} does not divide hidden_size ({hidden_size})")));
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(bad("head_dim", &format!("{head_dim} must be even for RoPE")));
        }
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
        })
    }

    /// Upstream `MPTConfig` with its defaults; every option this implementation does not
    /// compute is refused by name (see the fixtures README for what is covered).
    fn resolve_mpt(&self) -> Result<MptConfig, FieldError> {
        let bad = |field: &str, message: &str| (format!("text_config.{field}"), message.to_string());
        let d_model = self.require("d_model", Some(self.d_model.unwrap_or(2048)))?;
        let n_heads = self.require("n_heads", Some(self.n_heads.unwrap_or(16)))?;
        let n_layers = self.require("n_layers", Some(self.n_layers.unwrap_or(24)))?;
        let expansion_ratio = self.require("expansion_ratio", Some(self.expansion_ratio.unwrap_or(4)))?;
        let max_seq_len = self.require("max_seq_len", Some(self.max_seq_len.unwrap_or(2048)))?;
        let vocab_size = self.require("vocab_size", Some(self.vocab_size.unwrap_or(50368)))?;
        if d_model % n_heads != 0 {
            return Err(bad("n_heads", &format!("{n_heads} does not divide d_model ({d_model})")));
        }
        if let Some(h) = self.hidden_size {
            if h != d_model {
                return Err(bad("hidden_size", &format!("{h} differs from d_model ({d_model}); upstream sizes the cross-attention by it")));
            }
        }
        if self.tie_word_embeddings == Some(false) {
            return Err(bad("tie_word_embeddings", "MPTForCausalLM only supports tied word embeddings"));
        }
        if self.no_bias != Some(true) {
            return Err(bad("no_bias", "only `true` is supported (MPT-7B's setting: no biases, weight-only LayerNorms)"));
        }
        match self.norm_type.as_deref().unwrap_or("low_precision_layernorm") {
            "layernorm" | "low_precision_layernorm" => {}
            n @ ("rmsnorm" | "low_precision_rmsnorm") => {
                return Err(bad("norm_type", &format!("`{n}` (RMSNorm) is not supported; only `layernorm` / `low_precision_layernorm`")))
            }
            n => return Err(bad("norm_type", &format!("unknown norm `{n}`"))),
        }
        if self.logit_scale.is_some() {
            return Err(bad("logit_scale", "scaled logits are not supported (only null)"));
        }
        if let Some(f) = self.embedding_fraction {
            if f != 1.0 {
                return Err(bad("embedding_fraction", &format!("{f} is not supported (only 1.0: no embedding gradient shrinking)")));
            }
        }
        for (field, p) in [("resid_pdrop", self.resid_pdrop), ("emb_pdrop", self.emb_pdrop)] {
            if p.is_some_and(|p| p != 0.0) {
                return Err(bad(field, "dropout is not supported (only 0)"));
            }
        }
        let a = self.attn_config.clone().unwrap_or_default();
        if a.alibi != Some(true) {
            return Err(bad(
                "attn_config.alibi",
                "only ALiBi positions (`alibi: true`) are supported; learned positions (`wpe`) are not (upstream's default is false, so it must be given)",
            ));
        }
        match a.attn_type.as_deref().unwrap_or("multihead_attention") {
            "multihead_attention" => {}
            "multiquery_attention" => return Err(bad("attn_config.attn_type", "multi-query attention is not supported")),
            other => return Err(bad("attn_config.attn_type", &format!("unknown attention `{other}`"))),
        }
        match a.attn_impl.as_deref().unwrap_or("triton") {
            // The same arithmetic; this implementation is upstream's `torch` path.
            "torch" | "flash" | "triton" => {}
            other => return Err(bad("attn_config.attn_impl", &format!("unknown attention implementation `{other}`"))),
        }
        if a.attn_pdrop.is_some_and(|p| p != 0.0) {
            return Err(bad("attn_config.attn_pdrop", "dropout is not supported (only 0)"));
        }
        if a.clip_qkv.is_some() {
            return Err(bad("attn_config.clip_qkv", "clipping q, k, v is not supported (only null)"));
        }
        if a.qk_ln == Some(true) {
            return Err(bad("attn_config.qk_ln", "LayerNorm on q and k is not supported (only false)"));
        }
        if a.softmax_scale.is_some() {
            return Err(bad("attn_config.softmax_scale", "a custom softmax scale is not supported (only null: 1/sqrt(head_dim))"));
        }
        if a.prefix_lm == Some(true) {
            return Err(bad("attn_config.prefix_lm", "prefix-LM attention is not supported (only false)"));
        }
        if a.attn_uses_sequence_id == Some(true) {
            return Err(bad("attn_config.attn_uses_sequence_id", "sequence-id attention is not supported (only false)"));
        }
        let alibi_bias_max = a.alibi_bias_max.unwrap_or(8.0);
        if !(alibi_bias_max > 0.0 && alibi_bias_max.is_finite()) {
            return Err(bad("attn_config.alibi_bias_max", "must be positive"));
        }
        Ok(MptConfig { vocab_size, d_model, n_heads, n_layers, expansion_ratio, max_seq_len, alibi_bias_max })
    }
}

/// Reads the ids of Otter's special tokens from an HF `tokenizer.json`'s `added_tokens`
/// (without the tokenizer machinery) and checks them against the vocabulary size.
/// Begin and end of sequence are `<s>` / `</s>` (LLaMA) or, in a tokenizer without them,
/// GPT-NeoX's single `<|endoftext|>` (MPT), which is both.
pub fn special_tokens_from_tokenizer(path: &Path, cfg: &OtterConfig) -> Result<SpecialTokens, ConfigError> {
    #[derive(Deserialize)]
    struct Added {
        id: i64,
        content: String,
    }
    #[derive(Deserialize)]
    struct Tok {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let tok: Tok = serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    let find = |name: &str| tok.added_tokens.iter().find(|a| a.content == name).map(|a| a.id);
    let mut t = cfg.tokens.clone();
    let mut endoftext = t.bos;
    for (name, slot) in [
        ("<|endoftext|>", &mut endoftext),
        ("<|endofchunk|>", &mut t.end_of_chunk),
        ("<image>", &mut t.media),
        ("<answer>", &mut t.answer),
        ("<PAD>", &mut t.pad),
        ("<s>", &mut t.bos),
        ("</s>", &mut t.eos),
    ] {
        if let Some(id) = find(name) {
            if id < 0 || id as usize >= cfg.text.vocab_size() {
                return Err(ConfigError::Invalid {
                    origin: path.display().to_string(),
                    field: format!("added_tokens[{name}]"),
                    message: format!("id {id} is outside the model's vocabulary of {}", cfg.text.vocab_size()),
                });
            }
            *slot = id;
        }
    }
    if find("<|endoftext|>").is_some() && find("<s>").is_none() && find("</s>").is_none() {
        (t.bos, t.eos) = (endoftext, endoftext);
    }
    Ok(t)
}

/// The tiny fixture model's config (same sizes as `shared/fixtures/tiny_otter/config.json`).
const TINY_CONFIG_JSON: &str = r#"{
  "cross_attn_every_n_layers": 2,
  "text_config": {"vocab_size": 304, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 303, "tie_word_embeddings": false},
  "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_channels": 3, "patch_size": 8, "image_size": 32,
    "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
  "perceiver_config": {"depth": 2, "dim_head": 16, "heads": 4, "num_latents": 8, "ff_mult": 2},
  "xattn_config": {"dim_head": 64, "heads": 8, "ff_mult": 4}
}"#;

/// OTTER-Image-LLaMA7B (luodian/OTTER-Image-LLaMA7B-LA-InContext).
const LLAMA7B_CONFIG_JSON: &str = r#"{
  "cross_attn_every_n_layers": 4,
  "text_config": {"vocab_size": 32004, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false},
  "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "patch_size": 14, "image_size": 224,
    "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
}"#;

/// OTTER-Image-MPT7B (luodian/OTTER-Image-MPT7B, also OTTER-MPT7B-Init): upstream's
/// `Otter-MPT7B-config.json`, the keys that change the computation.
const MPT7B_CONFIG_JSON: &str = r#"{
  "cross_attn_every_n_layers": 4,
  "text_config": {"architectures": ["MPTForCausalLM"], "model_type": "mpt",
    "d_model": 4096, "hidden_size": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4,
    "max_seq_len": 2048, "vocab_size": 50432, "no_bias": true,
    "norm_type": "low_precision_layernorm", "tie_word_embeddings": true,
    "logit_scale": null, "embedding_fraction": 1.0, "learned_pos_emb": true,
    "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch",
      "attn_type": "multihead_attention", "attn_pdrop": 0, "attn_uses_sequence_id": false,
      "clip_qkv": null, "prefix_lm": false, "qk_ln": false, "softmax_scale": null},
    "resid_pdrop": 0, "emb_pdrop": 0},
  "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "patch_size": 14, "image_size": 224,
    "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_with_upstream_defaults() {
        let c = OtterConfig::otter_llama7b();
        assert_eq!(c.perceiver, PerceiverConfig::default());
        assert_eq!(c.xattn, XattnConfig::default());
        assert_eq!(c.xattn_layers().collect::<Vec<_>>(), vec![3, 7, 11, 15, 19, 23, 27, 31]);
        assert_eq!(c.tokens.media, 32001);
        assert_eq!(c.vision.num_patches(), 256);
        let t = OtterConfig::tiny();
        assert_eq!(t.xattn_layers().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(t.tokens.media, 301);
        assert_eq!((t.tokens.bos, t.tokens.eos), (0, 1));
    }

    #[test]
    fn the_backbone_is_read_from_model_type_or_architectures() {
        let c = OtterConfig::otter_mpt7b();
        assert_eq!(c.backbone(), Backbone::Mpt);
        assert_eq!(c.xattn_layers().collect::<Vec<_>>(), vec![3, 7, 11, 15, 19, 23, 27, 31]);
        assert_eq!((c.text.hidden_size(), c.text.intermediate_size(), c.text.max_seq_len()), (4096, 16384, Some(2048)));
        assert_eq!((c.tokens.media, c.tokens.pad, c.tokens.bos, c.tokens.eos), (50278, 50280, 0, 0));
        assert_eq!(OtterConfig::otter_llama7b().backbone(), Backbone::Llama, "no model_type, no architectures: LLaMA");
        let resolve = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(MPT7B_CONFIG_JSON).unwrap();
            edit(&mut v);
            serde_json::from_value::<HfOtterConfig>(v).unwrap().resolve("x.json")
        };
        let only_arch = resolve(&|v| {
            v["text_config"].as_object_mut().unwrap().remove("model_type");
        });
        assert_eq!(only_arch.unwrap().backbone(), Backbone::Mpt);
        let only_type = resolve(&|v| {
            v["text_config"].as_object_mut().unwrap().remove("architectures");
        });
        assert_eq!(only_type.unwrap().backbone(), Backbone::Mpt);
        let conflict = resolve(&|v| v["text_config"]["architectures"] = serde_json::json!(["LlamaForCausalLM"])).unwrap_err().to_string();
        assert!(conflict.contains("text_config.architectures"), "{conflict}");
        let other = resolve(&|v| v["text_config"]["model_type"] = "falcon".into()).unwrap_err().to_string();
        assert!(other.contains("text_config.model_type") && other.contains("falcon"), "{other}");
    }

    /// Every MPT option the fixtures do not cover is refused, naming the option.
    #[test]
    fn unimplemented_mpt_options_are_refused_by_name() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("attn_config.clip_qkv", serde_json::json!(8.0), "text_config.attn_config.clip_qkv"),
            ("attn_config.qk_ln", true.into(), "text_config.attn_config.qk_ln"),
            ("attn_config.prefix_lm", true.into(), "text_config.attn_config.prefix_lm"),
            ("attn_config.attn_uses_sequence_id", true.into(), "text_config.attn_config.attn_uses_sequence_id"),
            ("attn_config.attn_type", "multiquery_attention".into(), "text_config.attn_config.attn_type"),
            ("attn_config.alibi", false.into(), "text_config.attn_config.alibi"),
            ("attn_config.softmax_scale", serde_json::json!(0.5), "text_config.attn_config.softmax_scale"),
            ("attn_config.attn_pdrop", serde_json::json!(0.1), "text_config.attn_config.attn_pdrop"),
            ("logit_scale", "inv_sqrt_d_model".into(), "text_config.logit_scale"),
            ("logit_scale", serde_json::json!(0.5), "text_config.logit_scale"),
            ("embedding_fraction", serde_json::json!(0.1), "text_config.embedding_fraction"),
            ("norm_type", "low_precision_rmsnorm".into(), "text_config.norm_type"),
            ("norm_type", "rmsnorm".into(), "text_config.norm_type"),
            ("no_bias", false.into(), "text_config.no_bias"),
            ("tie_word_embeddings", false.into(), "text_config.tie_word_embeddings"),
            ("hidden_size", serde_json::json!(1024), "text_config.hidden_size"),
            ("n_heads", serde_json::json!(5), "text_config.n_heads"),
            ("resid_pdrop", serde_json::json!(0.1), "text_config.resid_pdrop"),
        ];
        for (key, value, field) in cases {
            let mut v: serde_json::Value = serde_json::from_str(MPT7B_CONFIG_JSON).unwrap();
            let mut slot = &mut v["text_config"];
            for part in key.split('.') {
                slot = &mut slot[part];
            }
            *slot = value.clone();
            let err = serde_json::from_value::<HfOtterConfig>(v).unwrap().resolve("x.json").unwrap_err().to_string();
            assert!(err.contains(field), "{key} = {value}: {err}");
        }
        // Absent `attn_config`: upstream's defaults, whose `alibi` is false.
        let mut v: serde_json::Value = serde_json::from_str(MPT7B_CONFIG_JSON).unwrap();
        v["text_config"].as_object_mut().unwrap().remove("attn_config");
        let err = serde_json::from_value::<HfOtterConfig>(v).unwrap().resolve("x.json").unwrap_err().to_string();
        assert!(err.contains("text_config.attn_config.alibi"), "{err}");
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let mut hf: HfOtterConfig = serde_json::from_str(TINY_CONFIG_JSON).unwrap();
        hf.text_config.num_key_value_heads = Some(3);
        let err = hf.resolve("x.json").unwrap_err().to_string();
        assert!(err.contains("text_config.num_key_value_heads"), "{err}");
        let mut hf: HfOtterConfig = serde_json::from_str(TINY_CONFIG_JSON).unwrap();
        hf.cross_attn_every_n_layers = Some(0);
        assert!(hf.resolve("x.json").unwrap_err().to_string().contains("cross_attn_every_n_layers"));
    }

    #[test]
    fn malformed_json_names_the_path_of_the_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, TINY_CONFIG_JSON.replace("\"hidden_size\": 64, \"intermediate_size\": 128,\n    \"num_hidden_layers\": 4", "\"hidden_size\": \"big\", \"intermediate_size\": 128,\n    \"num_hidden_layers\": 4")).unwrap();
        let err = HfOtterConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("text_config.hidden_size"), "{err}");
        assert!(err.contains("config.json"), "{err}");
    }
}
