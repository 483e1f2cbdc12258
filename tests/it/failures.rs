//! Failures as they really come, end to end on CPU with the tiny model: a hung node
//! (SIGSTOP), every worker lost at once, the whole job killed and started again, an
//! unreadable checkpoint. What must hold each time: training goes on within seconds of
//! the fault being known, from the newest state that can be trusted, with exactly-once
//! data and the losses of an uninterrupted run.

use crate::common;

use common::cluster::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Heartbeat timeout of the hung-node jobs; their collective timeout is far longer.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// A job of three single-rank workers that keeps training for a while, with a collective
/// timeout (120 s) far beyond its heartbeat timeout (3 s).
fn hung_node_job(dir: &Path, data: &Path, out: &Path, save_every: u64) -> PathBuf {
    let job = job_yaml(dir, data, &Job { save_every, max_steps: Some(60), epochs: 3, grad_accum: 1, coord: Some((1, 3)), out });
    edit_yaml(&job, &[("heartbeat_timeout: 10s", "heartbeat_timeout: 3s"), ("comm:\n  timeout: 60s", "comm:\n  timeout: 120s")]);
    job
}

/// Freezes `frozen` (its agent and rank process, as a node stuck in the kernel looks) once
/// three ranks train, and returns how long the others took to commit steps of a newer
/// generation; then thaws it and lets the job finish.
fn freeze_one_of_three(frozen: &str, mid_checkpoint: bool) -> Duration {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 360);
    let out = d.path().join("out");
    let job = hung_node_job(d.path(), &data, &out, if mid_checkpoint { 6 } else { 1000 });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let workers: Vec<Worker> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            // The node to freeze stalls writing its shard of step-12 (until thawed and
            // long after), so that it is frozen in the middle of a checkpoint write.
            let env: &[(&str, &str)] = if mid_checkpoint && *n == frozen { &[("OTTER_FAULT_CKPT_STALL", "12")] } else { &[] };
            start_worker_env(&c.addr, n, d.path(), env)
        })
        .collect();
    let w = &workers[["a", "b", "c"].iter().position(|n| *n == frozen).unwrap()];
    let before = wait_for(&c.addr, "3 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 3 && steps_committed(s) >= 3);
    if mid_checkpoint {
        let t = Instant::now();
        while !std::fs::read_to_string(w.log.with_extension("err")).unwrap_or_default().contains("stalling the shard write") {
            assert!(t.elapsed() < Duration::from_secs(60), "{frozen} never started writing step-12\n{}", logs(d.path()));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let generation = before["summary"]["generation"].as_u64().unwrap();
    let frozen_at = Instant::now();
    let tree = signal_worker(w, libc::SIGSTOP);
    assert!(tree.len() >= 2, "the agent and its rank process: {tree:?}");
    let at_freeze = steps_committed(&status(&c.addr).unwrap());
    let after = wait_for(&c.addr, "the others to commit steps in a new generation", Duration::from_secs(60), |s| {
        s["summary"]["generation"].as_u64() > Some(generation)
            && s["steps"].as_array().is_some_and(|v| v.iter().filter(|x| x["generation"].as_u64() > Some(generation)).count() >= 2)
    });
    let took = frozen_at.elapsed();
    assert!(steps_committed(&after) > at_freeze, "committed steps and the status advance");
    assert!(!after["members"].as_array().unwrap().iter().any(|m| m["node_id"] == frozen), "{frozen} is left behind: {}", after["members"]);
    println!("{frozen} frozen{}: the others committed steps of a new generation {:.2} s later", if mid_checkpoint { " mid-checkpoint" } else { "" }, took.as_secs_f64());
    // It comes back: it must be refused or rejoin cleanly, never corrupt the job.
    signal_worker(w, libc::SIGCONT);
    let s = finish(c, Duration::from_secs(180));
    assert_exactly_once(&s);
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    assert!(log.contains("joining again") || log.contains("restarts fresh") || log.contains("job over"), "{frozen} after the thaw:\n{log}");
    if mid_checkpoint {
        let steps = ckpt_steps(&out);
        assert!(steps.iter().any(|&n| n > 12), "the survivors checkpoint again: {steps:?}");
    }
    took
}

#[test]
fn a_hung_node_is_left_behind_within_the_heartbeat_timeout_not_the_collective_timeout() {
    let took = freeze_one_of_three("c", false);
    assert!(took < HEARTBEAT_TIMEOUT + Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_hung_node_holding_rank_0_is_left_behind_as_fast() {
    let took = freeze_one_of_three("a", false);
    assert!(took < HEARTBEAT_TIMEOUT + Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_node_hung_in_the_middle_of_a_checkpoint_write_is_left_behind_as_fast() {
    let took = freeze_one_of_three("c", true);
    assert!(took < HEARTBEAT_TIMEOUT + Duration::from_secs(5), "took {took:?}");
}

/// The restart jobs: two workers (min 1, max 2), a checkpoint every 4 steps (the newest two
/// kept), 24 steps.
fn restart_job(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let job = job_yaml(dir, data, &Job { save_every: 4, max_steps: Some(24), epochs: 2, grad_accum: 1, coord: Some((1, 2)), out });
    edit_yaml(&job, &[("heartbeat_timeout: 10s", "heartbeat_timeout: 3s")]);
    job
}

/// Flips one byte in the middle of a shard of `step-{steps}`.
fn corrupt(out: &Path, steps: u64) -> PathBuf {
    let shard = out.join(format!("checkpoints/step-{steps}/shard-00000-of-00002.safetensors"));
    let mut b = std::fs::read(&shard).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x40;
    std::fs::write(&shard, b).unwrap();
    shard
}

/// Per-step losses of the uninterrupted restart job (run once per test binary: the
/// synthetic data and the job are the same in every test).
fn uninterrupted(d: &Path, data: &Path) -> Vec<f64> {
    static LOSSES: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    LOSSES
        .get_or_init(|| {
            let out = d.join("base");
            let c = start_coord(&restart_job(d, data, &out), &d.join("coord-base"), "127.0.0.1:0");
            let _w = (start_worker(&c.addr, "a", d), start_worker(&c.addr, "b", d));
            let s = finish(c, Duration::from_secs(120));
            losses_of(&s)
        })
        .clone()
}

/// Runs the restart job until `step-8` is committed (the newest checkpoint: a worker stalls
/// writing `step-12`) and steps past it are, then kills
/// every worker (and the coordinator too if `whole_job`) with SIGKILL, optionally corrupts
/// `step-8`, and starts what was killed again: same state dir, same node ids. Returns the
/// final status and the workers' logs.
fn kill_and_restart(d: &Path, data: &Path, whole_job: bool, corrupt_newest: bool) -> (serde_json::Value, Vec<String>) {
    let out = d.join("out");
    let job = restart_job(d, data, &out);
    let state = d.join("coord");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let c = start_coord(&job, &state, &listen);
    // b stalls writing its shard of step-12, so that step-8 stays the newest checkpoint
    // (and, its next save waiting for that one, the job stops at step 15).
    let (a, b) = (start_worker(&c.addr, "a", d), start_worker_env(&c.addr, "b", d, &[("OTTER_FAULT_CKPT_STALL", "12")]));
    wait_for(&c.addr, "checkpoint step-8 and steps past it", Duration::from_secs(90), |s| {
        s["checkpoints"].as_array().is_some_and(|v| v.contains(&8.into())) && steps_committed(s) >= 12
    });
    let killed_at = steps_committed(&status(&c.addr).unwrap());
    drop((a, b)); // SIGKILL: agents, and their rank processes with them
    let c = if whole_job {
        drop(c);
        None
    } else {
        Some(c)
    };
    assert!(ckpt_steps(&out).contains(&8));
    let shard = corrupt_newest.then(|| corrupt(&out, 8));
    let c = match c {
        Some(c) => {
            std::thread::sleep(Duration::from_secs(1)); // a StatefulSet restarting its pods
            c
        }
        None => start_coord(&job, &state, &listen),
    };
    let back = Instant::now();
    let (a, b) = (start_worker(&c.addr, "a", d), start_worker(&c.addr, "b", d));
    let resumed = wait_for(&c.addr, "training to resume", Duration::from_secs(60), |s| {
        s["summary"]["phase"].get("Running").is_some() && s["steps"].as_array().is_some_and(|v| v.len() as u64 >= killed_at.min(8) + 1)
            && s["events"].as_array().is_some_and(|e| e.iter().any(|x| x["kind"] == "Restored"))
    });
    println!(
        "killed after {killed_at} steps ({}); training resumed {:.2} s after the workers were started again",
        if whole_job { "coordinator and workers" } else { "every worker" },
        back.elapsed().as_secs_f64()
    );
    let _ = resumed;
    let s = finish(c, Duration::from_secs(120));
    if let Some(shard) = shard {
        let e = event(&s, "CheckpointUnreadable").unwrap_or_else(|| panic!("no CheckpointUnreadable event: {}", s["events"]));
        assert!(e["reason"].as_str().unwrap().contains(&shard.display().to_string()), "the corrupt shard is named: {e}");
    }
    let logs = [&a, &b].iter().map(|w| std::fs::read_to_string(&w.log).unwrap()).collect();
    (s, logs)
}

fn restored_from(logs: &[String], steps: u64) -> bool {
    let marker = format!("from step {steps}, restored from checkpoint step-{steps} (written by 2 ranks)");
    logs.iter().all(|l| l.contains(&marker))
}

#[test]
fn after_the_whole_job_restarts_it_resumes_from_the_newest_checkpoint_with_identical_losses() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let want = uninterrupted(d.path(), &data);
    assert_eq!(want.len(), 24);
    let (s, logs) = kill_and_restart(d.path(), &data, true, false);
    assert_exactly_once(&s);
    assert!(restored_from(&logs, 8), "{logs:?}");
    assert_eq!(losses_of(&s), want, "per-step losses equal the uninterrupted run's");
}

#[test]
fn after_the_whole_job_restarts_on_a_corrupt_newest_checkpoint_it_resumes_from_the_previous_one() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let want = uninterrupted(d.path(), &data);
    let (s, logs) = kill_and_restart(d.path(), &data, true, true);
    assert_exactly_once(&s);
    assert!(restored_from(&logs, 4), "{logs:?}");
    assert_eq!(losses_of(&s), want);
}

#[test]
fn losing_every_worker_waits_for_them_and_resumes_from_the_newest_checkpoint() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let want = uninterrupted(d.path(), &data);
    let (s, logs) = kill_and_restart(d.path(), &data, false, false);
    assert_exactly_once(&s);
    assert!(restored_from(&logs, 8), "{logs:?}");
    assert!(event(&s, "WaitingForNodes").is_some(), "the wait is an event: {}", s["events"]);
    assert_eq!(losses_of(&s), want);
}

#[test]
fn losing_every_worker_with_a_corrupt_newest_checkpoint_resumes_from_the_previous_one() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let want = uninterrupted(d.path(), &data);
    let (s, logs) = kill_and_restart(d.path(), &data, false, true);
    assert_exactly_once(&s);
    assert!(restored_from(&logs, 4), "{logs:?}");
    assert_eq!(losses_of(&s), want);
}

#[test]
fn workers_that_do_not_return_within_join_timeout_fail_the_job_naming_it() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let out = d.path().join("out");
    let job = restart_job(d.path(), &data, &out);
    edit_yaml(&job, &[("join_timeout: 60s", "join_timeout: 4s")]);
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let (a, b) = (start_worker(&c.addr, "a", d.path()), start_worker(&c.addr, "b", d.path()));
    wait_for(&c.addr, "training", Duration::from_secs(60), |s| steps_committed(s) >= 2);
    drop((a, b));
    let waiting = wait_for(&c.addr, "the job to wait for nodes", Duration::from_secs(10), |s| s["summary"]["phase"] == "WaitingForNodes");
    assert!(waiting["summary"]["waiting"].as_str().is_some_and(|w| w.contains("below min_nodes 1")), "{}", waiting["summary"]);
    let (ok, s, log) = outcome(c, Duration::from_secs(30));
    assert!(!ok, "a job that lost its nodes for good fails (non-zero exit)");
    let reason = s["summary"]["phase"]["Failed"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("within join_timeout (4.0 s)"), "{reason}\n{log}");
    assert!(log.contains("join_timeout"), "{log}");
}

#[test]
fn a_fresh_rank_says_what_it_waits_for_within_the_heartbeat_timeout() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 120);
    let out = d.path().join("out");
    let job = restart_job(d.path(), &data, &out);
    edit_yaml(&job, &[("min_nodes: 1", "min_nodes: 2"), ("last_call: 1s", "last_call: 30s")]);
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let a = start_worker(&c.addr, "a", d.path());
    let started = Instant::now();
    let said = loop {
        let log = std::fs::read_to_string(&a.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("waiting: waiting for nodes")) {
            break line.to_string();
        }
        // Process start-up (model, data index) plus at most one heartbeat timeout.
        assert!(started.elapsed() < HEARTBEAT_TIMEOUT + Duration::from_secs(5), "silent for {:?}:\n{log}", started.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("{said}");
    assert!(said.contains("1 available of min_nodes 2"), "{said}");
    drop(c);
}
