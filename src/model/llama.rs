//! LLaMA decoder (Touvron et al., 2023), as HF `LlamaForCausalLM` with eager attention:
//! RMSNorm (computed in f32), rotary position embeddings (`rotate_half` layout), SwiGLU
//! MLP, grouped-query attention, untied `lm_head`. Frozen except `embed_tokens` and
//! `lm_head`. Otter wraps each layer so that its decoder weights live at
//! `lang_encoder.model.layers.N.decoder_layer.*`.

use super::config::LlamaConfig;
pub use super::nn::KvCache;
use super::nn::{finfo_min, fused_attention, sdpa, Linear};
use super::backbone::Backbone;
use super::weights::Vb;
use tch::{Device, Kind, Tensor};

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &Vb, eps: f64) -> Self {
        Self { weight: vb.get("weight"), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(&[-1i64][..], true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// cos/sin tables for positions `[start, start + len)`, each (len, head_dim).
pub fn rope_tables(cfg: &LlamaConfig, start: i64, len: i64, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim as i64;
    // 1 / theta^(arange(0, hd, 2) / hd), in f32 exactly as HF computes it.
    let exponent = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
    let pos = Tensor::arange_start(start, start + len, (Kind::Int64, device)).to_kind(Kind::Float);
    let freqs = pos.view([len, 1]).matmul(&inv_freq.view([1, hd / 2])); // (len, hd/2)
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("last dim") / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let kind = x.kind();
    (x * cos.to_kind(kind)) + rotate_half(x) * sin.to_kind(kind)
}

pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vb: &Vb, cfg: &LlamaConfig) -> Self {
        Self {
            q_proj: Linear::no_bias(&vb.pp("q_proj")),
            k_proj: Linear::no_bias(&vb.pp("k_proj")),
            v_proj: Linear::no_bias(&vb.pp("v_proj")),
            o_proj: Linear::no_bias(&vb.pp("o_proj")),
            heads: cfg.num_attention_heads as i64,
            kv_heads: cfg.num_key_value_heads as i64,
            head_dim: cfg.head_dim as i64,
        }
    }

    /// x (B, L, H); rope tables for these L positions; the mask of (B, 1, L, S) where
    /// S = cached + L.
    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), mask: &AttnMask, cache: Option<&mut KvCache>) -> Tensor {
        let (b, l, _) = x.size3().expect("(B, L, H)");
        let hd = self.head_dim;
        let shape = |t: Tensor, h: i64| t.view([b, l, h, hd]).transpose(1, 2); // (B, h, L, hd)
        let q = apply_rope(&shape(self.q_proj.forward(x), self.heads), &rope.0, &rope.1);
        let mut k = apply_rope(&shape(self.k_proj.forward(x), self.kv_heads), &rope.0, &rope.1);
        let mut v = shape(self.v_proj.forward(x), self.kv_heads);
        if let Some(c) = cache {
            (k, v) = c.extend(k, v);
        }
        let rep = self.heads / self.kv_heads;
        if rep > 1 {
            k = k.repeat_interleave_self_int(rep, 1, None);
            v = v.repeat_interleave_self_int(rep, 1, None);
        }
        let out = if fused_attention(&q) {
            match mask.plain_causal {
                true => sdpa(&q, &k, &v, None, true, None),
                false => sdpa(&q, &k, &v, Some(&mask.additive), false, None),
            }
        } else {
            let scores = q.matmul(&k.transpose(-2, -1)) * (hd as f64).powf(-0.5) + &mask.additive;
            scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
        };
        let out = out.transpose(1, 2).reshape([b, l, self.heads * hd]);
        self.o_proj.forward(&out)
    }
}

pub struct DecoderLayer {
    self_attn: Attention,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `vb` points at `...layers.N.decoder_layer`.
    pub fn new(vb: &Vb, cfg: &LlamaConfig) -> Self {
        Self {
            self_attn: Attention::new(&vb.pp("self_attn"), cfg),
            gate_proj: Linear::no_bias(&vb.pp("mlp.gate_proj")),
            up_proj: Linear::no_bias(&vb.pp("mlp.up_proj")),
            down_proj: Linear::no_bias(&vb.pp("mlp.down_proj")),
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), cfg.rms_norm_eps),
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), cfg.rms_norm_eps),
        }
    }

    pub fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), mask: &AttnMask, cache: Option<&mut KvCache>) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), rope, mask, cache);
        let h = self.post_attention_layernorm.forward(&x);
        let mlp = self.down_proj.forward(&(self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h)));
        x + mlp
    }
}

// SAFETY: weight handles that `forward` only reads (no in-place op, no handle replaced);
// libtorch tensors may be read from several threads at once. Needed because a checkpointed
// segment runs the layer again in backward, on autograd's thread (`Backbone::Layer: Sync`).
unsafe impl Sync for DecoderLayer {}

/// The self-attention mask of one forward.
pub struct AttnMask {
    /// HF's additive mask (B, 1, L, S), see [`causal_mask`].
    pub additive: Tensor,
    /// No padding and no cached positions: the mask is plain causal, which the fused
    /// kernels apply without reading a tensor (and then can take the flash kernel).
    pub plain_causal: bool,
}

impl AttnMask {
    /// The mask for L queries after `offset` cached positions; `key_mask` (B, S) is 1 for
    /// real tokens. Looks for the plain causal case (one host sync) only where the fused
    /// kernels run.
    pub fn new(key_mask: &Tensor, l: i64, offset: i64) -> Self {
        let additive = causal_mask(key_mask, l, offset, Kind::Float);
        let plain_causal = fused_attention(&additive) && offset == 0 && key_mask.ne(0).all().int64_value(&[]) == 1;
        Self { additive, plain_causal }
    }

    pub fn shallow_clone(&self) -> Self {
        Self { additive: self.additive.shallow_clone(), plain_causal: self.plain_causal }
    }
}

/// HF's additive 4-D mask: 0 where query i may see key j (j <= i + offset and key j not
/// padding), `finfo.min` elsewhere. `key_mask` (B, S) is 1 for real tokens; `offset` is
/// the number of cached positions before the L queries. Returns (B, 1, L, S).
pub fn causal_mask(key_mask: &Tensor, l: i64, offset: i64, kind: Kind) -> Tensor {
    let (b, s) = key_mask.size2().expect("(B, S)");
    let dev = key_mask.device();
    let qpos = Tensor::arange_start(offset, offset + l, (Kind::Int64, dev)).view([l, 1]);
    let kpos = Tensor::arange(s, (Kind::Int64, dev)).view([1, s]);
    let causal = kpos.le_tensor(&qpos).view([1, 1, l, s]);
    let allowed = causal.logical_and(&key_mask.ne(0).view([b, 1, 1, s]));
    Tensor::zeros([b, 1, l, s], (kind, dev)).masked_fill(&allowed.logical_not(), finfo_min(kind))
}

/// What every decoder layer of one forward shares: the RoPE tables of its positions and
/// the self-attention mask.
pub struct LlamaShared {
    pub rope: (Tensor, Tensor),
    pub mask: AttnMask,
}

/// LLaMA around its decoder layers: `embed_tokens`, the final RMSNorm and the untied
/// `lm_head`.
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    norm: RmsNorm,
    lm_head: Tensor,
}

impl Llama {
    /// `vb` is the root: the model is at `lang_encoder.model`, the head at
    /// `lang_encoder.lm_head`.
    pub fn new(vb: &Vb, cfg: &LlamaConfig) -> Self {
        let lm = vb.pp("lang_encoder.model");
        Self {
            embed_tokens: lm.get("embed_tokens.weight"),
            norm: RmsNorm::new(&lm.pp("norm"), cfg.rms_norm_eps),
            lm_head: vb.get("lang_encoder.lm_head.weight"),
            cfg: cfg.clone(),
        }
    }
}

impl Backbone for Llama {
    type Layer = DecoderLayer;
    type Shared = LlamaShared;

    fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    fn shared(&self, key_mask: &Tensor, l: i64, offset: i64) -> LlamaShared {
        LlamaShared { rope: rope_tables(&self.cfg, offset, l, self.device()), mask: AttnMask::new(key_mask, l, offset) }
    }

    fn share(s: &LlamaShared) -> LlamaShared {
        LlamaShared { rope: (s.rope.0.shallow_clone(), s.rope.1.shallow_clone()), mask: s.mask.shallow_clone() }
    }

    fn layer(layer: &DecoderLayer, x: &Tensor, s: &LlamaShared, cache: Option<&mut KvCache>) -> Tensor {
        layer.forward(x, &s.rope, &s.mask, cache)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        super::nn::linear(&self.norm.forward(x), &self.lm_head, None)
    }
}
