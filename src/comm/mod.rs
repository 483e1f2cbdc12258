//! Collectives: the `Collective` seam, the CPU ring and its shared-memory path are
//! `otter-core`'s (re-exported here); NCCL through libtorch's c10d is here (feature
//! `nccl`).

pub use otter_core::comm::*;

#[cfg(feature = "nccl")]
pub mod nccl;
