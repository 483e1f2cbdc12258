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
