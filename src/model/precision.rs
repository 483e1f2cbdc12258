//! Mixed precision: what `train.dtype: bf16` means (issue 43).
//!
//! As upstream Otter trains (accelerate's `mixed_precision: bf16`): frozen weights are
//! stored in bf16; trainable weights, their gradients and AdamW's moments stay f32 (the
//! master copy); the forward and backward run under CUDA autocast **in bf16**: autocast's
//! matmul-class ops cast their inputs to bf16, reductions and norms run in f32. bf16 has
//! f32's exponent range, so no loss scaling is needed.
//!
//! `tch::autocast` only switches CUDA autocast on, and libtorch's CUDA autocast dtype
//! defaults to fp16: [`autocast`] sets the dtype too, on every entry, including the ones
//! activation checkpointing runs again on autograd's thread in backward (the state is
//! thread-local). [`cuda_autocast_state`] reads it back without a device; [`probe`] lets a
//! test record it at each entry point of the model.

use std::ffi::c_char;
use tch::Kind;

extern "C" {
    fn otter_autocast_state(enabled: *mut i32, dtype: *mut i32, err: *mut c_char, err_len: usize) -> i32;
    fn otter_autocast_set(enabled: i32, dtype: i32, enter: i32, err: *mut c_char, err_len: usize) -> i32;
}

/// c10::ScalarType codes of the kinds autocast uses.
fn scalar_type(kind: Kind) -> i32 {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        _ => 6,
    }
}

fn kind_of(code: i32) -> Kind {
    match code {
        5 => Kind::Half,
        15 => Kind::BFloat16,
        _ => Kind::Float,
    }
}

/// This thread's CUDA autocast state: whether it is on, and its dtype.
pub fn cuda_autocast_state() -> (bool, Kind) {
    let (mut enabled, mut dtype) = (0, 0);
    let mut err = [0 as c_char; 256];
    // SAFETY: the shim writes two ints and, on failure, a NUL-terminated message.
    let rc = unsafe { otter_autocast_state(&mut enabled, &mut dtype, err.as_mut_ptr(), err.len()) };
    assert_eq!(rc, 0, "reading autocast's thread-local state cannot fail");
    (enabled != 0, kind_of(dtype))
}

fn set(enabled: bool, dtype: Kind, enter: bool) {
    let mut err = [0 as c_char; 256];
    // SAFETY: sets thread-local flags; on failure the shim writes a NUL-terminated message.
    let rc = unsafe { otter_autocast_set(enabled as i32, scalar_type(dtype), enter as i32, err.as_mut_ptr(), err.len()) };
    assert_eq!(rc, 0, "setting autocast's thread-local state cannot fail");
}

/// Runs `f` under CUDA autocast in bf16 when `on` (as is), restoring this thread's
/// previous state (flag and dtype) afterwards, even if `f` panics.
pub fn autocast<T>(on: bool, f: impl FnOnce() -> T) -> T {
    if !on {
        return f();
    }
    struct Restore(bool, Kind);
    impl Drop for Restore {
        fn drop(&mut self) {
            set(self.0, self.1, false);
        }
    }
    let (was, dtype) = cuda_autocast_state();
    set(true, Kind::BFloat16, true);
    let _restore = Restore(was, dtype);
    f()
}

/// Where in the model [`observe`] was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// `Otter::forward`.
    Forward,
    /// One decoder layer (cross-attention and language-model layer), plain or recomputed.
    DecoderLayer,
    /// One perceiver block, plain or recomputed.
    PerceiverBlock,
}

static PROBING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SEEN: std::sync::Mutex<Vec<(Site, bool, Kind, bool)>> = std::sync::Mutex::new(Vec::new());

/// Records the autocast state at `site` (with whether autograd records: a recompute in
/// backward) while a [`probe`] runs; free otherwise.
pub fn observe(site: Site) {
    if PROBING.load(std::sync::atomic::Ordering::Relaxed) {
        let (on, dtype) = cuda_autocast_state();
        SEEN.lock().unwrap_or_else(|e| e.into_inner()).push((site, on, dtype, super::checkpoint::grad_enabled()));
    }
}

/// Runs `f` and returns the autocast states the model's entry points saw meanwhile
/// (site, enabled, dtype, grad enabled), in order. One probe at a time per process.
pub fn probe(f: impl FnOnce()) -> Vec<(Site, bool, Kind, bool)> {
    SEEN.lock().unwrap_or_else(|e| e.into_inner()).clear();
    PROBING.store(true, std::sync::atomic::Ordering::SeqCst);
    f();
    PROBING.store(false, std::sync::atomic::Ordering::SeqCst);
    std::mem::take(&mut *SEEN.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autocast_runs_in_bf16_and_restores_the_previous_state() {
        assert_eq!(cuda_autocast_state(), (false, Kind::Half), "libtorch's default: off, fp16");
        let inside = autocast(true, cuda_autocast_state);
        assert_eq!(inside, (true, Kind::BFloat16));
        assert_eq!(cuda_autocast_state(), (false, Kind::Half), "restored");
        // tch's own autocast (what the model used) leaves the dtype at fp16: the bug.
        let theirs = tch::autocast(true, cuda_autocast_state);
        assert!(theirs != (true, Kind::BFloat16), "{theirs:?}");
        let off = autocast(false, cuda_autocast_state);
        assert_eq!(off, (false, Kind::Half));
    }
}
