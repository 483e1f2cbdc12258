//! The coordinator never links libtorch: its image is small, starts in milliseconds, and
//! runs where no GPU stack is installed. `ldd` of the `otter-coord` binary this package
//! builds must name no libtorch, c10 or CUDA library. (This test is also why `cargo test`
//! builds `target/<profile>/otter-coord`, which the `otter` package's tests run.)

#[test]
fn otter_coord_links_no_libtorch() {
    let bin = env!("CARGO_BIN_EXE_otter-coord");
    let out = std::process::Command::new("ldd").arg(bin).output().expect("ldd (libc-bin)");
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd {bin}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(libs.contains("libc.so"), "ldd read the binary: {libs}");
    // Library names only: the load addresses ldd prints are random hex, and one such as
    // 0x00007fb1f5ac1000 contains "c10".
    let names: Vec<&str> = libs.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let torch: Vec<&str> = names.into_iter().filter(|l| ["torch", "c10", "cuda", "cudart", "gomp"].iter().any(|n| l.contains(n))).collect();
    assert!(torch.is_empty(), "otter-coord links {torch:?}");
}
