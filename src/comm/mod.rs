//! Collectives: the `Collective` seam, the CPU ring and its shared-memory path are
//! `otter-core`'s (re-exported here); a generation's bootstrap store (c10d's TCPStore) and
//! NCCL through libtorch's c10d (feature `nccl`) are here.

pub use otter_core::comm::*;

pub mod generation;
pub mod store;
mod tensor;

pub use generation::GenerationGroup;
pub use tensor::TensorCollective;

#[cfg(feature = "nccl")]
pub mod nccl;
