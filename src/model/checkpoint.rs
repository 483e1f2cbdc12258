//! Activation checkpointing (`train.activation_checkpointing`): a model segment that runs
//! its forward without keeping activations and runs it again in backward. The autograd
//! node is in `src/model/checkpoint.cpp` (tch binds no custom functions); the segment is a
//! Rust closure it calls back, forward and again in backward, on whichever thread
//! autograd runs backward on (hence `Send + 'static`: it owns what it uses).

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Tensor;

pub use otter_core::train::config::ActivationCheckpointing;

/// A segment: tensor inputs (the checkpoint's, in order) to one output.
type Segment = Box<dyn Fn(&[Tensor]) -> Tensor + Send + 'static>;

static RECOMPUTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Segments run again in backward so far in this process (each checkpointed segment once
/// per backward through it): how a test sees that checkpointing happened.
pub fn recomputed_segments() -> u64 {
    RECOMPUTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether autograd records operations on this thread now.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { otter_grad_enabled() != 0 }
}

/// `segment(inputs)`, checkpointed: no activation inside it is kept for backward, only
/// `inputs` (one or two tensors); backward runs `segment` again with autograd on. The
/// segment must compute the same thing every time (no randomness) and enter autocast
/// itself where it needs it (backward may run on another thread). Weights it captures get
/// their gradients accumulated as if it had run normally.
pub fn checkpoint(inputs: &[&Tensor], segment: impl Fn(&[Tensor]) -> Tensor + Send + 'static) -> Tensor {
    let boxed: Box<Segment> = Box::new(Box::new(segment));
    let closure = Box::into_raw(boxed) as *mut c_void;
    let ptrs: Vec<*const torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 1024];
    // SAFETY: `ptrs` are live tch handles for the call; the shim takes ownership of
    // `closure` (it calls `drop_segment` exactly once, now or when the autograd node is
    // freed) and writes a fresh `at::Tensor*` to `out` on success.
    let rc = unsafe { otter_checkpoint(ptrs.as_ptr(), ptrs.len(), closure, call_segment, drop_segment, &mut out, err.as_mut_ptr(), err.len()) };
    if rc != 0 || out.is_null() {
        // SAFETY: the shim NUL-terminates `err` when it fails.
        let why = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        // The model's shapes were checked before the forward: a failure here is a bug,
        // as a failing op inside the segment would be.
        panic!("checkpointed segment: {why}");
    }
    // SAFETY: `out` is a fresh heap `at::Tensor` nobody else owns.
    unsafe { Tensor::from_ptr(out) }
}

unsafe extern "C" fn call_segment(closure: *mut c_void, inputs: *const *const torch_sys::C_tensor, n: usize) -> *mut torch_sys::C_tensor {
    // SAFETY: `closure` came from `checkpoint`'s `Box::into_raw` and is not yet dropped
    // (the shim owns it); `inputs` holds `n` live tensor handles for this call, which are
    // shallow-copied (the caller keeps its own).
    let segment = unsafe { &*(closure as *const Segment) };
    if grad_enabled() {
        // Forward runs with autograd off; only the recomputation records a graph.
        RECOMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let inputs: Vec<Tensor> = (0..n).map(|i| unsafe { Tensor::clone_from_ptr(*inputs.add(i) as *mut _) }).collect();
    match catch_unwind(AssertUnwindSafe(|| segment(&inputs))) {
        Ok(mut y) => {
            let p = y.as_mut_ptr();
            std::mem::forget(y);
            p
        }
        // The panic hook has printed the message; the shim turns null into a C++ error.
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn drop_segment(closure: *mut c_void) {
    // SAFETY: called once per closure, by the shim's owner of it.
    drop(unsafe { Box::from_raw(closure as *mut Segment) });
}

extern "C" {
    fn otter_grad_enabled() -> std::ffi::c_int;
    fn otter_checkpoint(
        inputs: *const *const torch_sys::C_tensor,
        n: usize,
        closure: *mut c_void,
        call: unsafe extern "C" fn(*mut c_void, *const *const torch_sys::C_tensor, usize) -> *mut torch_sys::C_tensor,
        drop: unsafe extern "C" fn(*mut c_void),
        out: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}
