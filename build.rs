//! Link-time set-up for libtorch (feature `torch`): bakes libtorch's directory into the
//! rpath of every binary and test, so nothing needs LD_LIBRARY_PATH (torch-sys,
//! `links = "tch"`, exports it as DEP_TCH_LIBTORCH_LIB), and passes it to the code as
//! OTTER_LIBTORCH_LIB so `cuda::load` can find libtorch_cuda.
//!
//! libtorch_cuda itself is *not* linked: nothing references its symbols, and loading it
//! costs ~0.4 GB of RSS and ~0.5 s at every start, CPU-only runs included. It is
//! dlopen'ed when a CUDA device is asked for (src/cuda.rs).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=OTTER_LIBTORCH_LIB={dir}");
    }
}
