//! Shared helpers for integration tests: fixture paths and tolerance checks.
//! Fixtures are copies of the upstream reference numbers (see tests/fixtures/PROVENANCE.md).
#![allow(dead_code)]

pub mod cluster;
pub mod job;

use std::path::PathBuf;
use tch::Tensor;

/// `tests/fixtures` of this checkout; falls back to the working directory's copy when the
/// test binary was built elsewhere (prebuilt GPU checks, see scripts/gpu-check.sh).
pub fn fixtures() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.exists() {
        built
    } else {
        // Absolute: job files written by tests name fixtures relative to their own folder.
        std::env::current_dir().expect("a working directory").join("tests/fixtures")
    }
}

/// A test that cannot run its case on this machine (no network namespaces, no nftables,
/// no tmpfs): a failure under `CI=true`, where the machine is known to have them; elsewhere
/// it says so, and records the test in `target/tmp/skipped-tests.txt`, which
/// `scripts/test.sh` lists at the end (a skip is never a silent pass). The caller returns.
pub fn cannot_run(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: cannot run its case here, and CI=true makes that a failure: {why}");
    }
    println!("SKIPPED: {test}: {why}");
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&log) {
        let _ = writeln!(f, "{test}: {why}");
    }
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny_otter")
}

/// The MPT-backbone fixtures (`tests/fixtures/mpt/`: same layout as the LLaMA ones).
pub fn mpt_fixtures() -> PathBuf {
    fixtures().join("mpt")
}

/// The tiny Otter-MPT model (upstream's MPT-7B Otter configuration, scaled down).
pub fn tiny_mpt_model() -> PathBuf {
    mpt_fixtures().join("tiny_otter")
}

/// The coordinator binary, `otter-coord`, which the workspace's otter-core package builds
/// beside the test binaries (`target/<profile>/otter-coord`; `cargo test` builds it for
/// otter-core's own integration test).
/// With `OTTER_GPU_BINS` set (prebuilt binaries on a machine without cargo, see
/// scripts/build-gpu-bins.sh), every binary comes from that directory instead.
pub fn coord_bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(b) = prebuilt("otter-coord") {
            return b.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps/<test>");
        let bin = dir.join("otter-coord");
        assert!(bin.is_file(), "{} is missing: build the workspace first (`cargo build`; scripts/test.sh does)", bin.display());
        bin.to_string_lossy().into_owned()
    })
}

pub fn otter_bin() -> PathBuf {
    prebuilt("otter").unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_otter")))
}

/// `otter-worker` (from `OTTER_GPU_BINS` where set).
pub fn worker_bin() -> PathBuf {
    prebuilt("otter-worker").unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_otter-worker")))
}

fn prebuilt(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("OTTER_GPU_BINS")?;
    let bin = PathBuf::from(dir).join(name);
    assert!(bin.is_file(), "OTTER_GPU_BINS has no {}", bin.display());
    Some(bin)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().to_kind(tch::Kind::Double).double_value(&[])
}

/// Runs the `otter` binary; returns (success, stdout, stderr).
pub fn run_otter(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(otter_bin()).args(args).output().expect("spawn otter");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// (step, loss) of every line of a run's metrics.jsonl.
pub fn losses(run_dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// `world` ranks on threads of this process, each with a ring group over loopback TCP:
/// `f(rank, group)` on each, results in rank order.
pub fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, &mut otter::comm::ring::RingGroup) -> T + Sync) -> Vec<T> {
    use std::net::{SocketAddr, TcpListener};
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, f) = (&addrs, &f);
                s.spawn(move || f(r, &mut otter::comm::ring::RingGroup::connect(r, addrs, l, std::time::Duration::from_secs(30)).unwrap()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
