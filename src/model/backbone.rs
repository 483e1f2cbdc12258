//! What a language-model backbone supplies to Otter's composition (`otter.rs`): its own
//! file, so that the backbones (`llama.rs`, `mpt.rs`) and the composition that uses them
//! do not import each other.

use super::nn::KvCache;
use tch::{Device, Tensor};

/// What a language-model backbone supplies to Otter's composition.
pub trait Backbone: Send + 'static {
    /// One decoder layer (run after its gated cross-attention block, if any).
    /// `Sync`: a checkpointed segment holds the layer and runs it again in backward, on
    /// autograd's thread (each implementation says why its forward only reads).
    type Layer: Send + Sync + 'static;
    /// What every layer of one forward shares (positions, masks), built once per forward.
    type Shared: Send + 'static;
    fn device(&self) -> Device;
    /// Token embedding: ids (B, L) -> (B, L, h).
    fn embed(&self, ids: &Tensor) -> Tensor;
    /// For L new positions after `offset` cached ones; `key_mask` (B, offset + L) is 1 for
    /// real tokens.
    fn shared(&self, key_mask: &Tensor, l: i64, offset: i64) -> Self::Shared;
    /// Handles to the same tensors, for a checkpointed segment to own.
    fn share(shared: &Self::Shared) -> Self::Shared;
    fn layer(layer: &Self::Layer, x: &Tensor, shared: &Self::Shared, cache: Option<&mut KvCache>) -> Tensor;
    /// Final norm and output projection: (B, L, h) -> (B, L, V).
    fn head(&self, x: &Tensor) -> Tensor;
}

