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

/// Issue 50: the coordinator runs with glibc's per-thread caches of freed chunks off (they
/// grew its heap for 10k steps), which glibc reads only at start: `otter-coord` runs itself
/// again with the tunable, under the same process id.
#[test]
fn otter_coord_runs_itself_again_with_glibcs_thread_caches_off() {
    let bin = env!("CARGO_BIN_EXE_otter-coord");
    let mut child = std::process::Command::new(bin)
        .args(["bench", "--nodes", "2", "--steps", "100000000", "--store", "memory"])
        .env_remove("GLIBC_TUNABLES")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start otter-coord");
    let environ = format!("/proc/{}/environ", child.id());
    let wanted = format!("GLIBC_TUNABLES={}", otter_core::heap::COORDINATOR_TUNABLE);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    // The environment of the process id we started changes when it runs itself again.
    while std::time::Instant::now() < deadline {
        seen = std::fs::read(&environ).unwrap_or_default();
        if seen.split(|&b| b == 0).any(|v| v == wanted.as_bytes()) || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(exited.is_none(), "otter-coord exited: {exited:?}");
    let vars: Vec<String> = seen.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).filter(|v| v.starts_with("GLIBC_")).collect();
    assert!(vars.contains(&wanted), "otter-coord's environment has {vars:?}, not {wanted}");
}
