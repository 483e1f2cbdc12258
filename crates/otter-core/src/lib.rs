//! Otter's control plane, which never links libtorch (the coordinator binary,
//! `otter-coord`, is built from this crate alone; `ldd` of it is checked by a test).
//!
//! * [`coord`]: the coordinator: a pure state machine (membership, rendezvous,
//!   exactly-once data leases, step commit) and its gRPC/storage shell.
//! * [`comm`]: collectives: the `Collective` seam and our CPU ring over TCP with its
//!   same-host shared-memory path.
//! * [`data`]: the MIMIC-IT data pipeline.
//! * [`run_config`]: YAML run configs (`configs/*.yaml`).
//! * [`model`]: the model's config and parameter schema (the tch modules are in `otter`).
//! * [`train`]: the `train:` section and the LR schedule (the trainer is in `otter`).
//! * [`ckpt`]: the checkpoint layout: manifest, partition, retention, recycling (shards
//!   of tensors are written by `otter`).
//! * [`metrics`], [`otel`]: Prometheus registries and pages, logging and traces.
//! * [`cpus`]: how many threads a training process runs.
//! * [`heap`]: the allocator's statistics (live vs held-free heap).
//!
//! The `otter` crate re-exports all of these under the same paths (`otter::coord`, ...).
//! See `ARCHITECTURE.md` for the code map and invariants.

pub mod ckpt;
pub mod comm;
pub mod coord;
pub mod cpus;
pub mod data;
pub mod heap;
pub mod metrics;
pub mod model;
pub mod otel;
mod panic;
pub mod run_config;
pub mod train;
