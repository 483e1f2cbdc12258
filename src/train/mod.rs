//! Training on one process: upstream's recipe (AdamW with upstream's decay groups,
//! cosine schedule with warmup, global-norm clipping, gradient accumulation with one
//! gradient sync point per optimizer step, bf16 autocast on CUDA with f32 masters).
//!
//! | file          | what                                                  |
//! |---------------|-------------------------------------------------------|
//! | `config.rs`   | the `train:` section of a run config      [otter-core]|
//! | `schedule.rs` | cosine-with-warmup LR as a pure function  [otter-core]|
//! | `optim.rs`    | AdamW on tensors (state exposed), clip_grad_norm      |
//! | `step.rs`     | `TensorBatch`, `Trainer::step`                        |
//! | `grad_sync.rs`| gradient buckets, all-reduce of trainable grads only  |
//! | `exact.rs`    | exact, order-free sums (the deterministic reduction)  |
//! | `zero.rs`     | sharded optimizer state (ZeRO-1): parts, re-cuts      |
//! | `run.rs`      | `otter train`: the loop, metrics, resumable state     |

pub use otter_core::train::{config, plan, schedule};

pub mod exact;
pub mod grad_sync;
pub mod optim;
pub mod run;
pub mod recut;
pub mod zero;
mod step;

pub use crate::ckpt::ReadFence;
pub use step::{GradSync, StepConfig, StepStats, TensorBatch, Trainer};
