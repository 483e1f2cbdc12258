//! The training recipe's parts that need no libtorch: the `train:` section of a run config
//! (`config.rs`) and the LR schedule as a pure function (`schedule.rs`). The trainer is in
//! the `otter` crate.

pub mod config;
pub mod schedule;
