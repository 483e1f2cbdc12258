//! Model configuration in two tiers (candle's `LlamaConfig::into_config` pattern):
//!
//! * [`HfOtterConfig`]: a serde mirror of upstream's Hugging Face `config.json`
//!   (`OtterConfig`: `text_config` = LlamaConfig, `vision_config` = CLIPVisionConfig,
//!   `cross_attn_every_n_layers`, optional `max_num_frames`), with `Option`s wherever
//!   upstream has defaults. Unknown keys are ignored, as HF does.
//! * [`OtterConfig`]: the resolved config the model is built from; every default filled
//!   in, every unsupported setting rejected with the field named.
//!
//! Upstream hard-codes the perceiver and cross-attention sizes; they may be given
//! explicitly as `perceiver_config` / `xattn_config` (the tiny fixture does).
//! Presets: [`OtterConfig::tiny`] and [`OtterConfig::otter_llama7b`].

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
    #[error("unknown model preset `{0}` (known: tiny, otter_llama7b)")]
    UnknownPreset(String),
}

// ---------------------------------------------------------------------------------------
// Tier 1: serde mirror of the HF config.json
// ---------------------------------------------------------------------------------------

/// Mirror of upstream `OtterConfig` as saved in `config.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfOtterConfig {
    pub text_config: HfLlamaConfig,
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

/// Mirror of HF `LlamaConfig` (the fields that change the computation).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfLlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
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
}

/// The resolved Otter configuration: no defaults left to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtterConfig {
    pub text: LlamaConfig,
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
        (0..self.text.num_hidden_layers).filter(move |i| (i + 1) % n == 0)
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

    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "otter_llama7b" => Ok(Self::otter_llama7b()),
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
        let positive = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
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
        if let Some(act) = &t.hidden_act {
            if act != "silu" {
                return Err(bad("text_config.hidden_act", format!("`{act}` is not supported (LLaMA uses `silu`)")));
            }
        }
        if let Some(act) = &v.hidden_act {
            if act != "quick_gelu" {
                return Err(bad("vision_config.hidden_act", format!("`{act}` is not supported (CLIP uses `quick_gelu`)")));
            }
        }
        if matches!(&t.rope_scaling, Some(x) if !x.is_null()) {
            return Err(bad("text_config.rope_scaling", "RoPE scaling is not supported".into()));
        }
        if t.attention_bias == Some(true) {
            return Err(bad("text_config.attention_bias", "biased attention projections are not supported".into()));
        }
        if t.mlp_bias == Some(true) {
            return Err(bad("text_config.mlp_bias", "biased MLP projections are not supported".into()));
        }
        if t.tie_word_embeddings == Some(true) {
            return Err(bad("text_config.tie_word_embeddings", "Otter's lm_head is untied".into()));
        }
        if self.only_attend_previous == Some(false) {
            return Err(bad("only_attend_previous", "only `true` (upstream's training mode) is supported".into()));
        }
        let heads = t.num_attention_heads;
        let kv_heads = t.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(
                "text_config.num_key_value_heads",
                format!("{kv_heads} must divide num_attention_heads ({heads})"),
            ));
        }
        if t.head_dim.is_none() && t.hidden_size % heads != 0 {
            return Err(bad(
                "text_config.num_attention_heads",
                format!("{heads} does not divide hidden_size ({})", t.hidden_size),
            ));
        }
        let head_dim = t.head_dim.unwrap_or(t.hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(bad("text_config.head_dim", format!("{head_dim} must be even for RoPE")));
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
        if t.vocab_size < 4 {
            return Err(bad("text_config.vocab_size", "must hold Otter's 4 added tokens".into()));
        }
        let mut tokens = SpecialTokens::upstream_layout(t.vocab_size);
        if let Some(b) = t.bos_token_id {
            tokens.bos = b;
        }
        if let Some(e) = t.eos_token_id {
            tokens.eos = e;
        }
        Ok(OtterConfig {
            text: LlamaConfig {
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                intermediate_size: t.intermediate_size,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: heads,
                num_key_value_heads: kv_heads,
                head_dim,
                rms_norm_eps: t.rms_norm_eps.unwrap_or(1e-6),
                rope_theta: t.rope_theta.unwrap_or(10000.0),
                max_position_embeddings: t.max_position_embeddings.unwrap_or(2048),
            },
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

/// Reads the ids of Otter's special tokens from an HF `tokenizer.json`'s `added_tokens`
/// (without the tokenizer machinery) and checks them against the vocabulary size.
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
    for (name, slot) in [
        ("<|endofchunk|>", &mut t.end_of_chunk),
        ("<image>", &mut t.media),
        ("<answer>", &mut t.answer),
        ("<PAD>", &mut t.pad),
        ("<s>", &mut t.bos),
        ("</s>", &mut t.eos),
    ] {
        if let Some(id) = find(name) {
            if id < 0 || id as usize >= cfg.text.vocab_size {
                return Err(ConfigError::Invalid {
                    origin: path.display().to_string(),
                    field: format!("added_tokens[{name}]"),
                    message: format!("id {id} is outside the model's vocabulary of {}", cfg.text.vocab_size),
                });
            }
            *slot = id;
        }
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
