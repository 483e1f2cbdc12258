//! Otter training orchestrator.
//!
//! * [`model`]: the Otter model (config and parameter schema always; tch modules with
//!   the `torch` feature).
//! * [`coord`]: the coordinator: a pure state machine (membership, rendezvous,
//!   exactly-once data leases, step commit) and its gRPC/storage shell (no libtorch).
//! * [`worker`]: the node agent and the per-rank training process (with `torch`).
//! * [`ckpt`]: sharded, asynchronous, resumable checkpoints (manifest and layout without
//!   libtorch; tensors with `torch`).
//! * [`comm`]: collectives: the `Collective` seam and our CPU ring over TCP (no libtorch).
//! * [`data`]: the MIMIC-IT data pipeline (no libtorch).
//! * [`run_config`]: YAML run configs (`configs/*.yaml`).
//! * [`cmd`]: the `otter` subcommands (with `torch`).
//! * [`train`]: config and schedule (always); optimizer, step, loop (with `torch`).
//! * [`tensors`]: reading/writing named-tensor files (safetensors) for commands and tests.
//!
//! See `ARCHITECTURE.md` for the code map and invariants.

pub mod ckpt;
pub mod comm;
pub mod coord;
pub mod cpus;
pub mod data;
pub mod metrics;
pub mod otel;
pub mod model;
pub mod run_config;
pub mod train;

#[cfg(feature = "torch")]
pub mod cmd;
#[cfg(feature = "torch")]
pub mod cuda;
#[cfg(feature = "torch")]
pub mod tensors;
#[cfg(feature = "torch")]
pub mod worker;
