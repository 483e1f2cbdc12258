//! Checkpoints: the layout, manifest, partition and retention are `otter-core`'s
//! (re-exported here); this module stages tensors to host memory and writes and loads
//! shards of them (see `tensors.rs` and the module docs of `otter_core::ckpt`).

pub use otter_core::ckpt::*;

mod tensors;
pub use tensors::*;
