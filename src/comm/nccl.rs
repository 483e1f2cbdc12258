//! NCCL through libtorch's own c10d (feature `nccl`): `c10d::TCPStore` for the bootstrap
//! (rank 0 serves it at the address the coordinator hands out) and
//! `c10d::ProcessGroupNCCL`, via the small C++ shim in `nccl_shim.cpp`. Collectives run
//! on device tensors; errors and timeouts come back as [`CommError`] and the communicator
//! is aborted, never left hanging. Dropping the group shuts it down; a new membership is
//! a new group (same process).

use super::CommError;
use crate::train::grad_sync::TensorCollective;
use std::ffi::{c_char, c_void, CString};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn otter_nccl_new(host: *const c_char, port: u16, rank: i32, world: i32, timeout_ms: i64, err: *mut c_char, len: usize) -> *mut c_void;
    fn otter_nccl_all_reduce_mean(g: *mut c_void, ts: *const *mut c_void, n: usize, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_broadcast(g: *mut c_void, t: *mut c_void, root: i32, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn otter_nccl_abort(g: *mut c_void);
    fn otter_nccl_free(g: *mut c_void);
}

pub struct NcclGroup {
    raw: *mut c_void,
    rank: usize,
    world: usize,
}

// SAFETY: the process group is used from one thread at a time (&mut self).
unsafe impl Send for NcclGroup {}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl NcclGroup {
    /// Joins the group through the TCPStore at `host:port` (served by rank 0).
    pub fn new(host: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Self, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::Invalid(format!("rank {rank} of a world of {world}")));
        }
        crate::cuda::load().map_err(|e| CommError::Invalid(format!("NCCL needs CUDA: {e}")))?;
        let host = CString::new(host).map_err(|_| CommError::Invalid("store host contains a NUL byte".into()))?;
        let mut err = vec![0u8; 1024];
        // SAFETY: valid C string and error buffer; the shim catches every C++ exception.
        let raw = unsafe {
            otter_nccl_new(host.as_ptr(), port, rank as i32, world as i32, timeout.as_millis() as i64, err.as_mut_ptr() as *mut c_char, err.len())
        };
        if raw.is_null() {
            return Err(CommError::Protocol { rank, message: format!("NCCL group init: {}", message(&err)) });
        }
        Ok(Self { raw, rank, world })
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
        let rc = unsafe { otter_nccl_barrier(self.raw, err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "barrier", &err)
    }

    /// Aborts the communicator: pending and future collectives fail instead of hanging.
    pub fn abort(&mut self) {
        // SAFETY: live group handle.
        unsafe { otter_nccl_abort(self.raw) }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: handle from otter_nccl_new, freed once.
        unsafe { otter_nccl_free(self.raw) }
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
        let rc = unsafe { otter_nccl_all_reduce_mean(self.raw, ptrs.as_ptr(), ptrs.len(), err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "all-reduce", &err)
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensor and handle.
        let rc = unsafe { otter_nccl_broadcast(self.raw, t.as_ptr() as *mut c_void, root as i32, err.as_mut_ptr() as *mut c_char, err.len()) };
        self.check(rc, "broadcast", &err)
    }
}
