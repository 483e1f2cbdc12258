//! A generation's group, whatever its backend: every collective that ends after the
//! generation was aborted is an error (issue 43).
//!
//! c10d's `ProcessGroupNCCL` reports a collective that an abort interrupted as done: once
//! the communicator is aborted, `WorkNCCL::isCompleted` stops checking for errors and
//! `wait()` returns normally, with partial data in the buffers. Taken for a result, that
//! would report a ZeRO step applied after a torn all-gather, or make a rank whose state
//! sync was cut short the source every other rank copies. The abort is the generation's
//! ([`Abort`]: the coordinator moved on, or the rank gave up), so the rule is simple and
//! backend-free: a collective is good only if the generation was not aborted by the time
//! it returned. (An abort that lands just after a collective that did complete makes it an
//! error too: the generation is over either way.)

use super::{Abort, CommError};
use super::TensorCollective;
use tch::Tensor;

pub struct GenerationGroup<'a> {
    inner: Box<dyn TensorCollective + Send + 'a>,
    abort: Abort,
}

impl<'a> GenerationGroup<'a> {
    /// `inner`, one generation's group, released by `abort`.
    pub fn new(inner: Box<dyn TensorCollective + Send + 'a>, abort: Abort) -> Self {
        Self { inner, abort }
    }

    fn checked(&mut self, op: impl FnOnce(&mut (dyn TensorCollective + Send)) -> Result<(), CommError>) -> Result<(), CommError> {
        let rank = self.inner.rank();
        let aborted = |abort: &Abort, what: &str| CommError::Aborted { rank, reason: format!("{}{what}", abort.reason().unwrap_or_else(|| "the generation was aborted".into())) };
        if self.abort.is_aborted() {
            return Err(aborted(&self.abort, ""));
        }
        let r = op(&mut *self.inner);
        if self.abort.is_aborted() {
            // Whatever the backend said: it may be partial data reported as done.
            return Err(match r {
                Err(e @ CommError::Aborted { .. }) => e,
                _ => aborted(&self.abort, " (during a collective: its result is not used)"),
            });
        }
        r
    }
}

impl TensorCollective for GenerationGroup<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError> {
        self.checked(|g| g.all_reduce_mean_tensors(tensors))
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.checked(|g| g.broadcast_tensor(t, root))
    }

    fn reduce_scatter_sum_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.checked(|g| g.reduce_scatter_sum_tensor(input, output))
    }

    fn all_gather_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        self.checked(|g| g.all_gather_tensor(input, output))
    }

    fn all_reduce_sum_i64_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError> {
        self.checked(|g| g.all_reduce_sum_i64_tensors(tensors))
    }
}
