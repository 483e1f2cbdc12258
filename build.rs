//! Link-time set-up for libtorch (feature `torch`):
//! * bakes libtorch's directory into the rpath of every binary and test, so nothing needs
//!   LD_LIBRARY_PATH (torch-sys, `links = "tch"`, exports it as DEP_TCH_LIBTORCH_LIB);
//! * keeps `libtorch_cuda` linked: nothing references its symbols directly, so with the
//!   default `--as-needed` the linker drops it and CUDA silently looks unavailable.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
