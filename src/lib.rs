//! Otter training orchestrator: the training side (libtorch, through `tch`).
//!
//! * [`model`]: the Otter model (config and parameter schema from `otter-core`; tch
//!   modules here).
//! * [`train`]: config and schedule (`otter-core`); optimizer, step, loop.
//! * [`ckpt`]: the checkpoint layout (`otter-core`); staging and writing shards of tensors.
//! * [`comm`]: the `Collective` seam and the CPU ring (`otter-core`); NCCL (feature `nccl`).
//! * [`worker`]: the node agent and the per-rank training process.
//! * [`cmd`]: the `otter` subcommands.
//! * [`tensors`]: reading/writing named-tensor files (safetensors) for commands and tests.
//! * Re-exported from `otter-core` under the same paths: [`coord`], [`data`],
//!   [`run_config`], [`metrics`], [`otel`], [`cpus`].
//!
//! See `ARCHITECTURE.md` for the code map and invariants.

pub use otter_core::{coord, cpus, data, heap, metrics, otel, run_config};

pub mod ckpt;
pub mod cmd;
pub mod comm;
pub mod cuda;
pub mod model;
pub mod tensors;
pub mod train;
pub mod worker;
