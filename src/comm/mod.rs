//! Collective communication (data parallelism all-reduces only trainable gradients).
//!
//! * [`Collective`]: the seam: all-reduce (mean) of buckets, broadcast, barrier,
//!   reduce-scatter and all-gather, each bounded by a timeout. A group is torn down by
//!   dropping it and rebuilt with a new membership without restarting the process.
//! * [`ring::RingGroup`]: our CPU ring over TCP (reduce-scatter then all-gather, chunked
//!   and pipelined so sending, receiving and reducing overlap). No libtorch.
//!
//! * `nccl::NcclGroup` (feature `nccl`): NCCL through libtorch's c10d, on device tensors.
//! * [`shm`]: the ring's same-host all-reduce through shared memory.
//!
//! Buffers are plain `f32` slices here; the training side flattens gradients into buckets.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ring;
pub mod shm;

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: peer {peer} ({addr}): {what}: {source}")]
    Peer { rank: usize, peer: usize, addr: String, what: &'static str, source: std::io::Error },
    #[error("rank {rank}: {what} timed out after {timeout:?}")]
    Timeout { rank: usize, what: &'static str, timeout: Duration },
    #[error("rank {rank}: {message}")]
    Protocol { rank: usize, message: String },
    #[error("invalid group: {0}")]
    Invalid(String),
}

/// The collective operations every backend provides. All ranks must call the same
/// operations in the same order with buffers of the same sizes.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: every buffer becomes the element-wise mean over ranks.
    fn all_reduce_mean(&mut self, buffers: &mut [&mut [f32]]) -> Result<(), CommError>;
    /// In place: every rank's `buf` becomes `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;
    /// `input` (same length on all ranks) is summed over ranks and split into `world`
    /// contiguous parts ([`split`]); this rank's part is written to `output`.
    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Concatenation of every rank's `input` (lengths given by [`split`] of `output.len()`)
    /// in rank order.
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
}

/// How `len` elements are cut into `world` contiguous parts: the first `len % world` parts
/// get one extra element. Returns (start, len) of part `i`.
pub fn split(len: usize, world: usize, i: usize) -> (usize, usize) {
    let base = len / world;
    let extra = len % world;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        for len in [0, 1, 2, 5, 7, 64, 1001] {
            for world in 1..6 {
                let mut next = 0;
                for i in 0..world {
                    let (s, n) = split(len, world, i);
                    assert_eq!(s, next);
                    next += n;
                }
                assert_eq!(next, len);
            }
        }
    }
}
