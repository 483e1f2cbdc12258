//! The training recipe's parts that need no libtorch: the `train:` section of a run config
//! (`config.rs`), the LR schedule as a pure function (`schedule.rs`) and the memory plan
//! (`plan.rs`, `otter plan`). The trainer is in
//! the `otter` crate.

pub mod config;
pub mod plan;
pub mod schedule;
