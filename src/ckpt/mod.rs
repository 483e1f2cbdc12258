//! Checkpoints: the layout, manifest, partition and retention are `otter-core`'s
//! (re-exported here); this module stages tensors to host memory and writes and loads
//! shards of them (see `tensors.rs` and the module docs of `otter_core::ckpt`).

pub use otter_core::ckpt::*;

mod fence;
mod tensors;
pub use fence::ReadFence;
pub use tensors::*;
