//! MPT decoder (MosaicML, "MPT-7B", 2023), as upstream Otter's own `MPTForCausalLM`
//! (`otter_ai/models/mpt/`, `attn_impl: torch`) with the options of MPT-7B: ALiBi
//! positions (Press et al., 2022) instead of a position table, no biases anywhere
//! (`no_bias`: the LayerNorms are weight-only, eps 1e-5), one fused `Wqkv` projection,
//! multi-head attention, an exact-GELU MLP, and the output projection tied to the token
//! embedding (`logits = h @ wte^T`; there is no `lm_head`). Frozen except `wte`, which
//! trains through both of its uses. Otter wraps each block so that its weights live at
//! `lang_encoder.transformer.blocks.N.decoder_layer.*`.
//!
//! Options upstream MPT has and this file does not compute are refused when the config
//! is resolved (`config::HfTextConfig::resolve_mpt`).

use super::config::MptConfig;
use super::nn::{finfo_min, KvCache, Linear};
use super::backbone::Backbone;
use super::weights::Vb;
use tch::{Device, Kind, Tensor};

/// `LayerNorm` without a bias (upstream's `LPLayerNorm` with `no_bias`).
pub struct WeightOnlyLayerNorm {
    weight: Tensor,
}

impl WeightOnlyLayerNorm {
    pub fn new(vb: &Vb) -> Self {
        Self { weight: vb.get("weight") }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer norm input has a last dim");
        x.layer_norm([d], Some(&self.weight), None::<&Tensor>, MptConfig::NORM_EPS, true)
    }
}

/// ALiBi slopes, upstream's `gen_slopes` in f32: with `H2` the smallest power of two
/// `>= heads`, `s_k = 2^(-alibi_bias_max * k / H2)` for `k = 1..H2`; for a power of two
/// head `h` takes `s_{h+1}`, otherwise the list is `s_2, s_4, .., s_H2, s_1, s_3, ..`
/// cut to `heads`. Returns (heads) f32.
pub fn alibi_slopes(heads: usize, alibi_bias_max: f64, device: Device) -> Tensor {
    let h2 = heads.next_power_of_two() as i64;
    let m = Tensor::arange_start(1, h2 + 1, (Kind::Float, device)) * (alibi_bias_max / h2 as f64);
    let slopes = Tensor::pow_scalar(2.0, &m).reciprocal();
    if h2 as usize == heads {
        return slopes;
    }
    let even = slopes.slice(0, 1, h2, 2); // s_2, s_4, ...
    let odd = slopes.slice(0, 0, h2, 2); // s_1, s_3, ...
    Tensor::cat(&[even, odd], 0).narrow(0, 0, heads as i64)
}

/// The self-attention inputs every block of one forward shares.
pub struct AttnBias {
    /// ALiBi bias `slope_h * (j - (S - 1))` for key `j` of `S` (1, H, 1, S), f32:
    /// upstream's form, the same for every query row (it differs from `-slope_h * (i - j)`
    /// only by a constant per row, which the softmax ignores), so one row serves all.
    alibi: Tensor,
    /// (B, 1, L, S) true where query i may not see key j: after it (causal) or padding.
    blocked: Tensor,
}

impl AttnBias {
    /// For L queries after `offset` cached positions; `key_mask` (B, S = offset + L) is 1
    /// for real tokens.
    pub fn new(slopes: &Tensor, key_mask: &Tensor, l: i64, offset: i64) -> Self {
        let (b, s) = key_mask.size2().expect("(B, S)");
        let dev = key_mask.device();
        let heads = slopes.size()[0];
        let dist = Tensor::arange_start(1 - s, 1, (Kind::Float, dev)); // j - (S - 1)
        let alibi = (slopes.to_device(dev).view([heads, 1]) * dist.view([1, s])).view([1, heads, 1, s]);
        let qpos = Tensor::arange_start(offset, offset + l, (Kind::Int64, dev)).view([l, 1]);
        let kpos = Tensor::arange(s, (Kind::Int64, dev)).view([1, s]);
        let causal = kpos.le_tensor(&qpos).view([1, 1, l, s]);
        let allowed = causal.logical_and(&key_mask.ne(0).view([b, 1, 1, s]));
        Self { alibi, blocked: allowed.logical_not() }
    }

    pub fn shallow_clone(&self) -> Self {
        Self { alibi: self.alibi.shallow_clone(), blocked: self.blocked.shallow_clone() }
    }
}

pub struct Attention {
    wqkv: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vb: &Vb, cfg: &MptConfig) -> Self {
        Self {
            wqkv: Linear::no_bias(&vb.pp("Wqkv")),
            out_proj: Linear::no_bias(&vb.pp("out_proj")),
            heads: cfg.n_heads as i64,
            head_dim: cfg.head_dim() as i64,
        }
    }

    /// Upstream's `scaled_multihead_dot_product_attention`: scores `q k^T / sqrt(dh)` plus
    /// ALiBi, in f32 (the bias is f32, so under autocast the sum is too); blocked scores
    /// set to `finfo(f32).min` (not -inf); softmax; `(attn v) out_proj^T`. Always this
    /// eager form: a fused kernel would take the bias in the activations' bf16.
    fn forward(&self, x: &Tensor, bias: &AttnBias, cache: Option<&mut KvCache>) -> Tensor {
        let (b, l, d) = x.size3().expect("(B, L, d)");
        let hd = self.head_dim;
        let qkv = self.wqkv.forward(x); // (B, L, 3d): q, k, v in consecutive chunks of d
        let heads = |i: i64| qkv.narrow(-1, i * d, d).view([b, l, self.heads, hd]).transpose(1, 2); // (B, H, L, dh)
        let q = heads(0);
        let (mut k, mut v) = (heads(1), heads(2));
        if let Some(c) = cache {
            (k, v) = c.extend(k, v);
        }
        let scores = q.matmul(&k.transpose(-2, -1)) * (hd as f64).powf(-0.5) + &bias.alibi; // (B, H, L, S)
        let scores = scores.masked_fill(&bias.blocked, finfo_min(Kind::Float));
        let out = scores.softmax(-1, Kind::Float).to_kind(v.kind()).matmul(&v);
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, l, d]))
    }
}

/// One MPT block: `x + attn(norm_1(x))`, then `+ down_proj(GELU(up_proj(norm_2(x))))`.
pub struct Block {
    norm_1: WeightOnlyLayerNorm,
    attn: Attention,
    norm_2: WeightOnlyLayerNorm,
    up_proj: Linear,
    down_proj: Linear,
}

impl Block {
    /// `vb` points at `...blocks.N.decoder_layer`.
    pub fn new(vb: &Vb, cfg: &MptConfig) -> Self {
        Self {
            norm_1: WeightOnlyLayerNorm::new(&vb.pp("norm_1")),
            attn: Attention::new(&vb.pp("attn"), cfg),
            norm_2: WeightOnlyLayerNorm::new(&vb.pp("norm_2")),
            up_proj: Linear::no_bias(&vb.pp("ffn.up_proj")),
            down_proj: Linear::no_bias(&vb.pp("ffn.down_proj")),
        }
    }

    pub fn forward(&self, x: &Tensor, bias: &AttnBias, cache: Option<&mut KvCache>) -> Tensor {
        let x = x + self.attn.forward(&self.norm_1.forward(x), bias, cache);
        let ffn = self.down_proj.forward(&self.up_proj.forward(&self.norm_2.forward(&x)).gelu("none"));
        x + ffn
    }
}

// SAFETY: weight handles that `forward` only reads (no in-place op, no handle replaced);
// libtorch tensors may be read from several threads at once. Needed because a checkpointed
// segment runs the layer again in backward, on autograd's thread (`Backbone::Layer: Sync`).
unsafe impl Sync for Block {}

/// MPT around its blocks: the tied `wte` (lookup and output projection) and `norm_f`.
pub struct Mpt {
    wte: Tensor,
    norm_f: WeightOnlyLayerNorm,
    /// (H) f32, on the model's device.
    slopes: Tensor,
}

impl Mpt {
    /// `vb` points at `lang_encoder.transformer`.
    pub fn new(vb: &Vb, cfg: &MptConfig) -> Self {
        let wte = vb.get("wte.weight");
        let slopes = alibi_slopes(cfg.n_heads, cfg.alibi_bias_max, wte.device());
        Self { wte, norm_f: WeightOnlyLayerNorm::new(&vb.pp("norm_f")), slopes }
    }
}

impl Backbone for Mpt {
    type Layer = Block;
    type Shared = AttnBias;

    fn device(&self) -> Device {
        self.wte.device()
    }

    fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.wte, ids, -1, false, false)
    }

    fn shared(&self, key_mask: &Tensor, l: i64, offset: i64) -> AttnBias {
        AttnBias::new(&self.slopes, key_mask, l, offset)
    }

    fn share(shared: &AttnBias) -> AttnBias {
        shared.shallow_clone()
    }

    fn layer(layer: &Block, x: &Tensor, shared: &AttnBias, cache: Option<&mut KvCache>) -> Tensor {
        layer.forward(x, shared, cache)
    }

    fn head(&self, x: &Tensor) -> Tensor {
        super::nn::linear(&self.norm_f.forward(x), &self.wte, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slopes(heads: usize) -> Vec<f32> {
        Vec::<f32>::try_from(alibi_slopes(heads, 8.0, Device::Cpu)).unwrap()
    }

    #[test]
    fn alibi_slopes_for_a_power_of_two_head_count() {
        assert_eq!(slopes(4), [1.0 / 4.0, 1.0 / 16.0, 1.0 / 64.0, 1.0 / 256.0]);
        let seven_b = slopes(32);
        for (h, s) in seven_b.iter().enumerate() {
            let want = 2f64.powf(-((h + 1) as f64) / 4.0);
            assert!((*s as f64 - want).abs() <= 1e-7 * want, "head {h}: {s} vs {want}");
        }
    }

    /// 12 heads: H2 = 16, s_k = 2^(-k/2); the even-k slopes first, then the odd ones.
    #[test]
    fn alibi_slopes_for_a_head_count_that_is_not_a_power_of_two() {
        let s = |k: i32| 2f64.powf(-(k as f64) / 2.0);
        let want: Vec<f64> = [2, 4, 6, 8, 10, 12, 14, 16, 1, 3, 5, 7].into_iter().map(s).collect();
        let got = slopes(12);
        assert_eq!(got.len(), 12);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-7 * w, "{got:?} vs {want:?}");
        }
        // 3 heads: H2 = 4, s_k = 2^(-2k): s_2, s_4, s_1.
        assert_eq!(slopes(3), [1.0 / 16.0, 1.0 / 256.0, 1.0 / 4.0]);
    }

    /// A query sees itself and earlier real keys; the ALiBi row is upstream's, relative to
    /// the last key.
    #[test]
    fn the_bias_blocks_later_keys_and_padding() {
        let s = alibi_slopes(2, 8.0, Device::Cpu); // 1/16, 1/256
        let key_mask = Tensor::from_slice(&[1i64, 1, 1, 0]).view([1, 4]);
        let b = AttnBias::new(&s, &key_mask, 2, 2); // queries at 2 and 3 after 2 cached
        let blocked = Vec::<bool>::try_from(b.blocked.reshape([-1])).unwrap();
        assert_eq!(blocked, [false, false, false, true, false, false, false, true]);
        let alibi = Vec::<f32>::try_from(b.alibi.reshape([-1])).unwrap();
        assert_eq!(alibi, [-3.0 / 16.0, -2.0 / 16.0, -1.0 / 16.0, 0.0, -3.0 / 256.0, -2.0 / 256.0, -1.0 / 256.0, 0.0]);
    }
}
