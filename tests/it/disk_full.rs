//! A full disk, end to end: the job's `out_dir` on a tmpfs this test mounts, too small for
//! a checkpoint. What must hold: no reader ever finds an empty or partial file at a final
//! path, failed saves leave nothing behind, the failures are counted (metrics, status) and
//! make the job degraded, and a job whose final weights could not be written ends as
//! failed, naming them and the checkpoint to resume from. Skipped (with a printed reason)
//! only where mounting is not permitted.

use crate::common;

use common::cluster::*;
use common::job;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs of `size` mounted at `dir` (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output().map_err(|e| format!("mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file under `dir`, relative, with its size.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), e.metadata().map_or(0, |m| m.len())));
            }
        }
    }
    out.sort();
    out
}

/// A two-worker job writing to `out` (a checkpoint every 5 steps, `keep_last` kept, 40
/// steps), with its coordinator's HTTP side on a known port. Returns the coordinator, its
/// HTTP address and the workers.
fn start(d: &Path, out: &Path, keep_last: usize) -> (Coord, String, Vec<Worker>) {
    let data = synth(d, 200);
    let job = job_yaml(d, &data, &Job { save_every: 5, max_steps: Some(40), epochs: 2, grad_accum: 1, coord: Some((2, 2)), out });
    edit_yaml(&job, &[("  save_every:", &format!("  keep_last: {keep_last}\n  save_every:"))]);
    let http = format!("127.0.0.1:{}", job::free_port_pair());
    let state = d.join("coord");
    let (child, addr) = job::spawn_coord(&job, &state, "127.0.0.1:0", &http, TOKEN, &state.with_extension("coord.log"));
    let c = Coord { child, addr, state };
    let ws = vec![start_worker(&c.addr, "a", d), start_worker(&c.addr, "b", d)];
    (c, http, ws)
}

#[test]
fn on_a_disk_too_small_for_any_checkpoint_nothing_partial_is_left_and_the_job_fails_naming_the_final_weights() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    // A checkpoint of the tiny model is about 5.2 MB (two shards of 2.6 MB), its final
    // weights about 1.7 MB: neither fits in 512 KB.
    let _fs = match Tmpfs::mount(&out, "512k") {
        Ok(fs) => fs,
        Err(e) => {
            common::cannot_run("on_a_disk_too_small_for_any_checkpoint_nothing_partial_is_left_and_the_job_fails_naming_the_final_weights", &format!("cannot mount a tmpfs: {e}"));
            return;
        }
    };
    let (c, http, _workers) = start(d.path(), &out, 2);
    // While it runs: the failed saves are counted, and the job is marked degraded.
    let degraded = wait_for(&c.addr, "the job to be degraded", Duration::from_secs(90), |s| s["summary"]["degraded"].is_string());
    println!("degraded: {}", degraded["summary"]["degraded"]);
    let metrics = job::http_get(&http, "/metrics").expect("/metrics");
    let no_space = metrics.lines().find(|l| l.starts_with("otter_checkpoint_failures_total{reason=\"no_space\"}")).expect("the failure counter");
    assert!(no_space.split_whitespace().last().unwrap().parse::<f64>().unwrap() >= 3.0, "{no_space}");
    assert!(metrics.lines().any(|l| l == "otter_job_degraded 1"), "degraded in the metrics");
    let page = job::http_get(&http, "/status").expect("/status");
    assert!(page.contains("DEGRADED"), "the status page says so");
    assert!(event(&degraded, "CheckpointFailed").is_some_and(|e| e["reason"].as_str().unwrap().contains("not enough free space")), "{}", degraded["events"]);
    let (ok, s, log) = outcome(c, Duration::from_secs(120));
    assert!(!ok, "the coordinator exits non-zero: the run's result does not exist\n{log}");
    let reason = s["summary"]["phase"]["Failed"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the final weights could not be written"), "{reason}");
    assert!(reason.contains("none was committed"), "it names what to resume from: {reason}");
    assert!(s["summary"]["steps_committed"] == 40, "training itself went on: {}", s["summary"]);
    // Nothing partial, nothing empty, nothing temporary at any path.
    let left = files(&out);
    println!("left on the full disk: {left:?}");
    assert!(left.iter().all(|(p, _)| !p.contains("final_weights")), "no final weights file at all: {left:?}");
    assert!(left.iter().all(|(p, _)| !p.ends_with(".tmp") && !p.contains(".tmp-")), "no temporary file left: {left:?}");
    assert!(left.iter().all(|(p, _)| !p.contains("shard-")), "no shard of an abandoned checkpoint left: {left:?}");
    assert!(left.iter().all(|&(_, n)| n > 0), "no empty file: {left:?}");
}

#[test]
fn when_space_is_freed_half_way_later_checkpoints_commit() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    // Room for the checkpoint kept (keep_last: 1) and the next one being written (which
    // then recycles its files), but a filler takes most of it first.
    let _fs = match Tmpfs::mount(&out, "12m") {
        Ok(fs) => fs,
        Err(e) => {
            common::cannot_run("when_space_is_freed_half_way_later_checkpoints_commit", &format!("cannot mount a tmpfs: {e}"));
            return;
        }
    };
    let filler = out.join("filler");
    std::fs::write(&filler, vec![7u8; 9 << 20]).unwrap();
    let (c, _http, _workers) = start(d.path(), &out, 1);
    let failing = wait_for(&c.addr, "a failed save", Duration::from_secs(60), |s| s["summary"]["failed_saves"].as_u64() >= Some(1));
    let failed_at = steps_committed(&failing);
    assert!(failing["checkpoints"].as_array().unwrap().is_empty());
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    let committed: Vec<u64> = s["checkpoints"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    println!("saves failed until the space was freed after step {failed_at}; checkpoints now {committed:?} ({:.1} s)", t.elapsed().as_secs_f64());
    assert!(!committed.is_empty() && committed.iter().all(|&n| n > failed_at), "{committed:?}");
    assert_eq!(s["summary"]["failed_saves"], 0, "a committed save resets the count: {:?}", s["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "CheckpointFailed").map(|e| e["reason"].as_str().unwrap()).collect::<Vec<_>>());
    let left = files(&out);
    assert!(left.iter().any(|(p, n)| p == "final_weights.safetensors" && *n > 0), "{left:?}");
    assert!(left.iter().all(|(p, _)| !p.ends_with(".tmp")), "no temporary file left: {left:?}");
}
