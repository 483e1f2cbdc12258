//! CUDA is loaded on demand. `libtorch_cuda` is not linked (it would cost every process,
//! CPU-only ones included, ~0.4 GB RSS and ~0.5 s at start); [`load`] dlopens it when a
//! CUDA device is requested.
//!
//! It must run before anything asks libtorch about CUDA (`Cuda::is_available`,
//! `manual_seed`, a CUDA tensor): libtorch resolves its CUDA hooks once per process, and
//! if libtorch_cuda is not loaded by then, CUDA stays unavailable for good.

use std::ffi::CString;
use std::sync::OnceLock;

static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// Makes `device` usable: loads CUDA when a CUDA device is asked for, and fails clearly
/// instead of letting libtorch abort when CUDA is absent.
pub fn ensure(device: tch::Device) -> Result<(), String> {
    if device.is_cuda() {
        load()?;
        if !tch::Cuda::is_available() {
            return Err("CUDA is not available on this machine".into());
        }
    }
    Ok(())
}

/// CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`); 0 where CUDA cannot load.
pub fn device_count() -> usize {
    if load().is_err() {
        return 0;
    }
    tch::Cuda::device_count().max(0) as usize
}

/// Loads libtorch_cuda (idempotent). Tries the libtorch this binary was built against,
/// then the loader's search path (LD_LIBRARY_PATH, rpath).
pub fn load() -> Result<(), String> {
    LOADED
        .get_or_init(|| {
            let built = option_env!("OTTER_LIBTORCH_LIB").map(|d| format!("{d}/libtorch_cuda.so"));
            let mut errors = Vec::new();
            for name in built.into_iter().chain(["libtorch_cuda.so".to_string()]) {
                if name.starts_with('/') && !std::path::Path::new(&name).exists() {
                    continue;
                }
                let c = CString::new(name.clone()).expect("no NUL in path");
                // SAFETY: dlopen with a valid C string; the handle is kept for the process.
                let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !h.is_null() {
                    return Ok(());
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    "unknown error".to_string()
                } else {
                    // SAFETY: non-null: a NUL-terminated string owned by libdl, read at once.
                    unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
                };
                errors.push(format!("{name}: {msg}"));
            }
            Err(format!("cannot load libtorch_cuda ({})", errors.join("; ")))
        })
        .clone()
}

/// The CUDA caching allocator's accounting for one device, in bytes (feature `nccl`, which
/// builds against the CUDA headers).
#[cfg(feature = "nccl")]
#[derive(Debug, Clone, Copy)]
pub struct MemoryStats {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
    /// The device's memory, as the driver reports it.
    pub total: u64,
}

#[cfg(feature = "nccl")]
pub mod memory {
    use super::MemoryStats;
    use std::ffi::{c_char, c_int, CStr};

    extern "C" {
        fn otter_cuda_memory(device: c_int, out: *mut i64, err: *mut c_char, len: usize) -> c_int;
        fn otter_cuda_reset_peak(device: c_int, err: *mut c_char, len: usize) -> c_int;
        fn otter_cuda_set_memory_fraction(device: c_int, fraction: f64, err: *mut c_char, len: usize) -> c_int;
    }

    fn checked(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
        let mut err = [0 as c_char; 512];
        if f(err.as_mut_ptr(), err.len()) == 0 {
            return Ok(());
        }
        // SAFETY: the shim NUL-terminates `err` when it fails.
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// The caching allocator keeps no accounting for a device before its first CUDA
    /// tensor: make one.
    fn init(device: usize) {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(device)));
    }

    /// Allocated and reserved bytes, now and at their peaks since the last
    /// [`reset_peak`], and the device's total.
    pub fn stats(device: usize) -> Result<MemoryStats, String> {
        init(device);
        let mut v = [0i64; 5];
        // SAFETY: `v` has the five slots the shim writes.
        checked(|e, l| unsafe { otter_cuda_memory(device as c_int, v.as_mut_ptr(), e, l) })?;
        let u = |i: usize| v[i].max(0) as u64;
        Ok(MemoryStats { allocated: u(0), peak_allocated: u(1), reserved: u(2), peak_reserved: u(3), total: u(4) })
    }

    pub fn reset_peak(device: usize) -> Result<(), String> {
        init(device);
        // SAFETY: plain values.
        checked(|e, l| unsafe { otter_cuda_reset_peak(device as c_int, e, l) })
    }

    /// Caps what the allocator may take from `device` at `fraction` of its memory (an
    /// allocation past it fails as out of memory would).
    pub fn set_fraction(device: usize, fraction: f64) -> Result<(), String> {
        init(device);
        // SAFETY: plain values.
        checked(|e, l| unsafe { otter_cuda_set_memory_fraction(device as c_int, fraction, e, l) })
    }
}
