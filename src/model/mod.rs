//! The Otter model. `config` and `spec` are plain Rust (no libtorch), so the
//! coordinator and `model-info` can use them; the tch modules sit behind `torch`.
//!
//! | file          | what                                                         |
//! |---------------|--------------------------------------------------------------|
//! | `config.rs`   | HF `config.json` mirror -> resolved `OtterConfig`, presets   |
//! | `spec.rs`     | every parameter name/shape/group/trainable; counts           |
//! | `weights.rs`  | mmap'd safetensors, strict key check, `Params`, `Vb`          |
//! | `nn.rs`       | Linear, LayerNorm, FeedForward                               |
//! | `clip.rs`     | CLIP vision transformer (frozen)                              |
//! | `perceiver.rs`| Perceiver resampler (trainable)                              |
//! | `xattn.rs`    | gated cross-attention + media mask (trainable)               |
//! | `llama.rs`    | LLaMA decoder, RoPE, RMSNorm, KV cache, causal mask          |
//! | `otter.rs`    | composition, input checks, causal-LM loss                    |
//! | `generate.rs` | greedy decoding with a KV cache                              |

pub mod config;
pub mod spec;

#[cfg(feature = "torch")]
pub mod clip;
#[cfg(feature = "torch")]
pub mod generate;
#[cfg(feature = "torch")]
pub mod llama;
#[cfg(feature = "torch")]
pub mod nn;
#[cfg(feature = "torch")]
pub mod otter;
#[cfg(feature = "torch")]
pub mod perceiver;
#[cfg(feature = "torch")]
pub mod weights;
#[cfg(feature = "torch")]
pub mod xattn;

pub use config::OtterConfig;
#[cfg(feature = "torch")]
pub use otter::{causal_lm_loss, Otter};
