//! Greedy decoding with a KV cache, stopping at `<|endofchunk|>`.
//!
//! Works for both backbones: LLaMA's RoPE and MPT's ALiBi positions continue from the
//! cached length (`Backbone::shared` with the cache's offset). A model with a
//! `max_seq_len` (MPT) stops there.
//!
//! Media is encoded once. Every new token's `text_time` is the number of `<image>` tokens
//! in the whole sequence so far, so generated tokens keep attending to the last image.
//! (Upstream's cached generation recomputes the media mask from the new tokens alone and
//! loses image attention after the first generated token; that is not reproduced.)

use super::nn::KvCache;
use super::otter::Otter;
use tch::{Kind, Tensor};

/// What one decoding run produced.
pub struct Generation {
    pub tokens: Vec<i64>,
    /// Logits (V) that chose each token, for comparing cached and uncached decoding.
    pub logits: Vec<Tensor>,
}

impl Otter {
    /// Greedy continuation of `prompt` (one sample) given `vision_x` (1, T, F, C, H, W).
    /// `use_cache: false` re-runs the full sequence for every token (the reference).
    pub fn generate(&self, vision_x: &Tensor, prompt: &[i64], max_new_tokens: usize, use_cache: bool) -> Generation {
        // Decoding runs in the model's precision, as its forward does (bf16 autocast).
        super::precision::autocast(self.autocast(), || tch::no_grad(|| self.generate_in_precision(vision_x, prompt, max_new_tokens, use_cache)))
    }

    fn generate_in_precision(&self, vision_x: &Tensor, prompt: &[i64], max_new_tokens: usize, use_cache: bool) -> Generation {
        {
            let dev = self.device();
            let media_id = self.cfg.tokens.media;
            let media = self.encode_media(vision_x);
            let mut seq: Vec<i64> = prompt.to_vec();
            let mut out = Generation { tokens: vec![], logits: vec![] };
            let mut caches: Vec<KvCache> = Vec::new();
            let mut images_so_far = prompt.iter().filter(|&&t| t == media_id).count() as i64;
            let max_len = self.cfg.text.max_seq_len().unwrap_or(usize::MAX);
            for i in 0..max_new_tokens {
                if seq.len() >= max_len {
                    break;
                }
                let logits = if !use_cache || i == 0 {
                    let ids = Tensor::from_slice(&seq).view([1, -1]).to_device(dev);
                    let text_time = ids.eq(media_id).cumsum(-1, Kind::Int64);
                    let mask = ids.ones_like();
                    caches.clear();
                    self.decode(&media, &ids, &mask, &text_time, &mut caches, use_cache)
                } else {
                    let last = *seq.last().expect("non-empty sequence");
                    let ids = Tensor::from_slice(&[last]).view([1, 1]).to_device(dev);
                    let text_time = Tensor::from_slice(&[images_so_far]).view([1, 1]).to_device(dev);
                    let mask = Tensor::ones([1, seq.len() as i64], (Kind::Int64, dev));
                    self.decode(&media, &ids, &mask, &text_time, &mut caches, true)
                };
                let last = logits.get(0).get(-1).to_device(tch::Device::Cpu);
                let next = last.argmax(0, false).int64_value(&[]);
                out.logits.push(last);
                out.tokens.push(next);
                seq.push(next);
                if next == media_id {
                    images_so_far += 1;
                }
                if next == self.cfg.tokens.end_of_chunk {
                    break;
                }
            }
            out
        }
    }
}
