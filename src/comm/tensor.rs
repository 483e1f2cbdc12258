//! The training side's view of a process group: collectives on tensors.

use super::CommError;
use tch::Tensor;

/// Collectives on tensors, the training side's view: the CPU ring through host buffers
/// (any `Collective`, in `train::grad_sync`), NCCL directly on device tensors (`comm::nccl`).
pub trait TensorCollective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: each tensor (f32, contiguous) becomes the element-wise mean over ranks.
    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError>;
    /// In place: `t` becomes `root`'s.
    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError>;
    /// `input` (f32, contiguous, `world * output.numel()` elements, the same length on
    /// every rank) summed over ranks; this rank's `rank`-th equal part lands in `output`.
    fn reduce_scatter_sum_tensor(&mut self, _input: &Tensor, _output: &mut Tensor) -> Result<(), CommError> {
        Err(CommError::Invalid("this collective has no reduce-scatter (optimizer sharding needs one)".into()))
    }
    /// Every rank's `input` (f32, contiguous, equal lengths) concatenated in rank order into
    /// `output` (`world * input.numel()` elements).
    fn all_gather_tensor(&mut self, _input: &Tensor, _output: &mut Tensor) -> Result<(), CommError> {
        Err(CommError::Invalid("this collective has no all-gather (optimizer sharding needs one)".into()))
    }
    /// In place: each tensor (i64, contiguous) becomes the element-wise sum over ranks,
    /// exact (the deterministic reduction, `train::exact`).
    fn all_reduce_sum_i64_tensors(&mut self, _tensors: &mut [Tensor]) -> Result<(), CommError> {
        Err(CommError::Invalid("this collective has no exact i64 sum (comm.deterministic needs one: use the ring)".into()))
    }
}
