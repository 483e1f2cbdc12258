//! The Otter model. `config` and `spec` are plain Rust (no libtorch), in `otter-core`, so
//! the coordinator can use them; re-exported here beside the tch modules.
//!
//! | file          | what                                                         |
//! |---------------|--------------------------------------------------------------|
//! | `config.rs`   | HF `config.json` mirror -> resolved `OtterConfig`, presets   |
//! | `spec.rs`     | every parameter name/shape/group/trainable; counts           |
//! | `weights.rs`  | mmap'd safetensors, strict key check, `Params`, `Vb`          |
//! | `nn.rs`       | Linear, LayerNorm, FeedForward, KV cache                     |
//! | `clip.rs`     | CLIP vision transformer (frozen)                              |
//! | `perceiver.rs`| Perceiver resampler (trainable)                              |
//! | `xattn.rs`    | gated cross-attention + media mask (trainable)               |
//! | `llama.rs`    | LLaMA decoder, RoPE, RMSNorm, causal mask                    |
//! | `mpt.rs`      | MPT blocks, ALiBi, weight-only LayerNorm, tied `wte`         |
//! | `backbone.rs` | the `Backbone` trait: what a language model supplies         |
//! | `otter.rs`    | composition over a `Backbone`, input checks, causal-LM loss  |
//! | `checkpoint.rs` | activation checkpointing (node in `checkpoint.cpp`)        |
//! | `generate.rs` | greedy decoding with a KV cache                              |

pub use otter_core::model::{config, flops, spec};

pub mod backbone;
pub mod checkpoint;
pub mod clip;
pub mod generate;
pub mod llama;
pub mod mpt;
pub mod nn;
pub mod otter;
pub mod perceiver;
pub mod precision;
pub mod weights;
pub mod xattn;

pub use config::OtterConfig;
pub use otter::{causal_lm_loss, Otter};
