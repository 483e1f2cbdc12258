//! Build-time steps of the control plane: generates the gRPC code of proto/otter/v1
//! (tonic/prost; protoc comes from scripts/setup.sh), and compiles the JPEG shim over
//! libjpeg-turbo.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .compile_protos(&[proto.join("otter/v1/coordinator.proto")], &[proto.clone()])
        .unwrap_or_else(|e| panic!("compiling proto/otter/v1/coordinator.proto (is protoc installed? scripts/setup.sh): {e}"));
    jpeg();
}

/// JPEG decoding: a small C shim (src/data/jpeg_shim.c) over libjpeg-turbo, the library
/// Pillow bundles, linked statically (no runtime dependency for the images or the GPU
/// binaries). Its headers and `libjpeg.a` come from Debian's libjpeg62-turbo-dev
/// (scripts/setup.sh).
fn jpeg() {
    println!("cargo:rerun-if-changed=src/data/jpeg_shim.c");
    let mut build = cc::Build::new();
    build.file("src/data/jpeg_shim.c").opt_level(2);
    // Where the C compiler finds libjpeg.a (prints the bare name when it does not).
    let compiler = build.get_compiler();
    let out = std::process::Command::new(compiler.path()).arg("-print-file-name=libjpeg.a").output().expect("running the C compiler");
    let archive = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(archive.is_absolute() && archive.exists(), "libjpeg.a not found: install libjpeg62-turbo-dev (bash scripts/setup.sh does)");
    build.compile("otter_jpeg");
    println!("cargo:rustc-link-search=native={}", archive.parent().unwrap().display());
    println!("cargo:rustc-link-lib=static=jpeg");
}
