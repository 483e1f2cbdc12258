//! Training on one process: upstream's recipe (AdamW with upstream's decay groups,
//! cosine schedule with warmup, global-norm clipping, gradient accumulation with one
//! gradient sync point per optimizer step, bf16 autocast on CUDA with f32 masters).
//!
//! | file          | what                                                  |
//! |---------------|-------------------------------------------------------|
//! | `config.rs`   | the `train:` section of a run config      [no torch]  |
//! | `schedule.rs` | cosine-with-warmup LR as a pure function  [no torch]  |
//! | `optim.rs`    | AdamW on tensors (state exposed), clip_grad_norm      |
//! | `step.rs`     | `TensorBatch`, `Trainer::step`                        |
//! | `grad_sync.rs`| gradient buckets, all-reduce of trainable grads only  |
//! | `run.rs`      | `otter train`: the loop, metrics, resumable state     |

pub mod config;
pub mod schedule;

#[cfg(feature = "torch")]
pub mod grad_sync;
#[cfg(feature = "torch")]
pub mod optim;
#[cfg(feature = "torch")]
pub mod run;
#[cfg(feature = "torch")]
mod step;

#[cfg(feature = "torch")]
pub use step::{ReadFence, StepConfig, StepStats, TensorBatch, Trainer};
