//! Bakes libtorch's directory into the rpath of every binary and test, so nothing needs
//! LD_LIBRARY_PATH. torch-sys (`links = "tch"`) exports its lib dir as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
