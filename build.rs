//! Build-time steps of the training side: bakes libtorch's directory into the rpath of
//! every binary and test, so nothing needs LD_LIBRARY_PATH (torch-sys, `links = "tch"`,
//! exports it as DEP_TCH_LIBTORCH_LIB), and passes it to the code as OTTER_LIBTORCH_LIB so
//! `cuda::load` can find libtorch_cuda. (The gRPC code and the JPEG shim are otter-core's.)
//!
//! libtorch_cuda itself is *not* linked by default: nothing references its symbols, and
//! loading it costs ~0.4 GB of RSS and ~0.5 s at every start, CPU-only runs included. It
//! is dlopen'ed when a CUDA device is asked for (src/cuda.rs).
//!
//! Small C++ shims are compiled against the headers beside libtorch:
//! `src/train/adamw_shim.cpp` (the fused AdamW kernel, which tch does not bind),
//! `src/train/grad_hooks.cpp` (autograd post-accumulate-grad hooks, for overlapping the
//! gradient all-reduce with backward), `src/model/onednn_linear.cpp` (CPU linear layers on
//! oneDNN's GEMM), `src/model/mapped_tensor.cpp` (tensors over memory-mapped weights that
//! keep the map alive) and `src/comm/store_shim.cpp` (c10d's TCPStore, in libtorch_cpu:
//! a generation's bootstrap store).
//!
//! Feature `nccl`: compiles `src/comm/nccl_shim.cpp` against the torch wheel's c10d
//! headers (plus the wheel's NCCL and CUDA headers, see ../shared/docs/toolchain.md) and
//! links libtorch_cuda, which then *is* referenced.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(dir) = &lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=OTTER_LIBTORCH_LIB={dir}");
    }
    torch_ops(lib.as_deref());
    allocator();
    #[cfg(feature = "nccl")]
    nccl(lib.as_deref());
}

/// The training processes' allocator: gperftools' TCMalloc (`libtcmalloc_minimal.so.4`,
/// Debian's libtcmalloc-minimal4, installed by scripts/setup.sh and in the worker image),
/// linked ahead of libc so that it serves every allocation of the process, libtorch's
/// included. glibc's malloc, kept from shrinking (as a step's activations need), fragmented
/// its main heap: a rank's RSS grew ~10-15 MB per 1k steps while its live heap stayed flat
/// (issue 50; BENCHMARKS.md has the measurements and the alternatives tried).
fn allocator() {
    // Before libc in the link (and so in DT_NEEDED and the symbol lookup order): a
    // link-arg would land after it, where libc's malloc wins.
    println!("cargo:rustc-link-lib=dylib:+verbatim=libtcmalloc_minimal.so.4");
}

/// The libtorch calls tch cannot make: `at::_fused_adamw_` (takes tensor lists;
/// src/train/adamw_shim.cpp), post-accumulate-grad hooks (src/train/grad_hooks.cpp),
/// oneDNN's dense f32 GEMM behind an autograd node (src/model/onednn_linear.cpp),
/// `at::from_blob` with a deleter (src/model/mapped_tensor.cpp), a custom autograd node for
/// activation checkpointing (src/model/checkpoint.cpp) and c10d's TCPStore
/// (src/comm/store_shim.cpp). Compiled against the headers that ship beside libtorch
/// (`<lib>/../include`), including only what they use.
fn torch_ops(lib: Option<&str>) {
    let files = [
        "src/train/adamw_shim.cpp",
        "src/train/grad_hooks.cpp",
        "src/model/onednn_linear.cpp",
        "src/model/mapped_tensor.cpp",
        "src/model/checkpoint.cpp",
        "src/model/autocast.cpp",
        "src/comm/store_shim.cpp",
    ];
    for f in files.iter().chain(&["src/ffi_guard.h"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let lib = std::path::PathBuf::from(lib.expect("torch-sys did not report libtorch's lib dir"));
    let include = lib.join("../include");
    assert!(include.join("ATen/ops/_fused_adamw.h").exists(), "libtorch headers not found at {}", include.display());
    libtorch_cpp(&include).files(files).opt_level(2).compile("otter_torch_ops");
}

/// A C++ build against libtorch's headers (`include`: `<torch>/include`), with the
/// wheel's C++ ABI.
fn libtorch_cpp(include: &std::path::Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers as system headers: their own warnings are not ours; ours are
        // on (-Wall -Wextra) and must stay clean.
        .flag("-isystem")
        .flag(include.to_str().expect("a UTF-8 libtorch path"))
        .flag("-isystem")
        .flag(include.join("torch/csrc/api/include").to_str().expect("a UTF-8 libtorch path"))
        .warnings(true)
        .extra_warnings(true);
    b
}

#[cfg(feature = "nccl")]
fn nccl(lib: Option<&str>) {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=src/comm/nccl_shim.cpp");
    println!("cargo:rerun-if-changed=src/cuda_memory.cpp");
    println!("cargo:rerun-if-env-changed=OTTER_TORCH_SITE");
    let lib = PathBuf::from(lib.expect("feature nccl: torch-sys did not report libtorch's lib dir"));
    // <site>/torch/lib -> <site>
    let site = std::env::var("OTTER_TORCH_SITE").map(PathBuf::from).unwrap_or_else(|_| lib.join("../..").canonicalize().expect("torch site dir"));
    let torch = site.join("torch");
    let nccl = site.join("nvidia/nccl/include");
    assert!(nccl.exists(), "feature nccl: NCCL headers (nvidia-nccl wheel) not found at {}; run scripts/setup.sh", nccl.display());
    // CUDA headers: CUDA 13 wheels put them all in nvidia/cu13/include (completed by the
    // nvidia-cuda-crt/cccl wheels); CUDA 12 wheels spread them over nvidia/*/include.
    let mut cuda: Vec<PathBuf> = std::fs::read_dir(site.join("nvidia"))
        .map(|d| d.flatten().map(|e| e.path().join("include")).filter(|p| p.exists() && !p.ends_with("nccl/include")).collect())
        .unwrap_or_default();
    cuda.sort();
    assert!(!cuda.is_empty(), "feature nccl: no CUDA headers under {}/nvidia; run scripts/setup.sh", site.display());
    let mut b = libtorch_cpp(&torch.join("include"));
    b.file("src/comm/nccl_shim.cpp").file("src/cuda_memory.cpp").define("USE_C10D_NCCL", None);
    for dir in std::iter::once(&nccl).chain(&cuda) {
        b.flag("-isystem").flag(dir.to_str().expect("a UTF-8 header path"));
    }
    b.compile("otter_nccl");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cuda", "c10_cuda", "torch_cpu", "torch", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}
