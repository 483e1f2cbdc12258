//! NCCL through libtorch's own c10d (feature `nccl`): `c10d::ProcessGroupNCCL`,
//! bootstrapped through a generation's store ([`super::store::GenerationStore`], under the
//! generation's key prefix), via the small C++ shim in `nccl_shim.cpp`. Collectives run
//! on device tensors; errors and timeouts come back as [`CommError`] and the communicator
//! is aborted, never left hanging. Another thread releases a rank blocked in a collective
//! through [`NcclGroup::abort_hook`] (the coordinator said a peer is gone). Dropping the
//! group shuts it down; a new membership is a new group (same process, same state).

use super::store::GenerationStore;
use super::CommError;
use super::TensorCollective;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn otter_nccl_new(store: *mut c_void, prefix: *const c_char, rank: i32, world: i32, device: i32, timeout_ms: i64, err: *mut c_char, len: usize) -> *mut c_void;
    fn otter_nccl_all_reduce_mean(g: *mut c_void, ts: *const *mut c_void, n: usize, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_broadcast(g: *mut c_void, t: *mut c_void, root: i32, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_reduce_scatter_sum(g: *mut c_void, input: *mut c_void, output: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_all_gather(g: *mut c_void, input: *mut c_void, output: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_abort(g: *mut c_void);
    fn otter_nccl_free(g: *mut c_void);
}

/// The shim's group handle, freed when the last owner lets go: the group, or an abort
/// hook running on another thread at that moment.
struct Handle(*mut c_void);

// SAFETY: collectives go through `&mut NcclGroup` (one thread at a time); the only other
// call, `otter_nccl_abort`, is made to be called from another thread (it is how
// ProcessGroupNCCL's own watchdog releases blocked work).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: handle from otter_nccl_new, freed once (the last Arc).
        unsafe { otter_nccl_free(self.0) }
    }
}

pub struct NcclGroup {
    raw: Arc<Handle>,
    rank: usize,
    world: usize,
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl NcclGroup {
    /// Forms generation `store.generation()`'s group on CUDA device `device` through its
    /// store (every key under the generation's prefix); the communicator is created at
    /// once, so a failing init is an error here. Collectives fail after `timeout`.
    pub fn new(store: &GenerationStore, rank: usize, world: usize, device: usize, timeout: Duration) -> Result<Self, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::Invalid(format!("rank {rank} of a world of {world}")));
        }
        crate::cuda::load().map_err(|e| CommError::Invalid(format!("NCCL needs CUDA: {e}")))?;
        let prefix = CString::new(store.prefix()).map_err(|_| CommError::Invalid("store prefix contains a NUL byte".into()))?;
        let mut err = vec![0u8; 1024];
        // SAFETY: a live store handle (the shim shares it, it does not take it over), a
        // valid C string and error buffer; the shim catches every C++ exception.
        let raw = unsafe {
            otter_nccl_new(
                store.raw(),
                prefix.as_ptr(),
                rank as i32,
                world as i32,
                device as i32,
                timeout.as_millis() as i64,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if raw.is_null() {
            return Err(CommError::Protocol { rank, message: format!("NCCL group init (generation {}): {}", store.generation(), message(&err)) });
        }
        Ok(Self { raw: Arc::new(Handle(raw)), rank, world })
    }

    /// What releases this group from another thread (for [`crate::comm::Abort::on_abort`]):
    /// aborts the communicator, so a collective blocked in it fails instead of waiting for
    /// a dead peer. Does nothing once the group is gone.
    pub fn abort_hook(&self) -> Box<dyn Fn() + Send + Sync> {
        let weak: Weak<Handle> = Arc::downgrade(&self.raw);
        Box::new(move || {
            if let Some(h) = weak.upgrade() {
                // SAFETY: a live handle (held by `h` for the call); abort is thread-safe.
                unsafe { otter_nccl_abort(h.0) }
            }
        })
    }

    fn check(&self, rc: i32, what: &str, err: &[u8]) -> Result<(), CommError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(CommError::Protocol { rank: self.rank, message: format!("NCCL {what} failed (communicator aborted): {}", message(err)) })
        }
    }

    pub fn barrier(&mut self) -> Result<(), CommError> {
        let mut err = vec![0u8; 1024];
        // SAFETY: live group handle, valid buffer.
        let rc = unsafe { otter_nccl_barrier(self.raw.0, err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "barrier", &err)
    }

    /// Aborts the communicator: pending and future collectives fail instead of hanging.
    pub fn abort(&mut self) {
        // SAFETY: live group handle.
        unsafe { otter_nccl_abort(self.raw.0) }
    }
}

impl TensorCollective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError> {
        let ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut err = vec![0u8; 1024];
        // SAFETY: `ptrs` are live `at::Tensor*` owned by `tensors` for the whole call.
        let rc = unsafe { otter_nccl_all_reduce_mean(self.raw.0, ptrs.as_ptr(), ptrs.len(), err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "all-reduce", &err)
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensor and handle.
        let rc = unsafe { otter_nccl_broadcast(self.raw.0, t.as_ptr() as *mut c_void, root as i32, err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "broadcast", &err)
    }

    fn reduce_scatter_sum_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensors and handle; NCCL checks the sizes (input = world x output).
        let rc = unsafe {
            otter_nccl_reduce_scatter_sum(self.raw.0, input.as_ptr() as *mut c_void, output.as_ptr() as *mut c_void, err.as_mut_ptr() as *mut c_char, err.len())
        };
        self.check(rc, "reduce-scatter", &err)
    }

    fn all_gather_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensors and handle; NCCL checks the sizes (output = world x input).
        let rc = unsafe {
            otter_nccl_all_gather(self.raw.0, input.as_ptr() as *mut c_void, output.as_ptr() as *mut c_void, err.as_mut_ptr() as *mut c_char, err.len())
        };
        self.check(rc, "all-gather", &err)
    }
}
