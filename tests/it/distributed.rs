//! A distributed job end to end on CPU with the tiny model: `otter-coord start` plus
//! `otter-worker join` processes on loopback. What the product promises, as tests:
//! equal losses to one process, exactly-once data through a kill -9, admission of a new
//! worker with identical state, a coordinator restart that training survives, refusals.

use crate::common;

use common::cluster::*;
use common::*;
use otter_core::coord::etcd::LocalEtcd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn two_workers_train_with_the_same_losses_as_one_process() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 64);
    let single_out = d.path().join("single");
    let single = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(8), epochs: 1, grad_accum: 2, coord: None, out: &single_out });
    let (ok, _, err) = run_otter(&["train", "--config", single.to_str().unwrap()]);
    assert!(ok, "{err}");
    let want: Vec<f64> = std::fs::read_to_string(single_out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(want.len(), 8);

    let dist_out = d.path().join("dist");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(8), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &dist_out });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", d.path());
    let _b = start_worker(&c.addr, "b", d.path());
    let s = finish(c, Duration::from_secs(120));
    let got = losses_of(&s);
    assert_eq!(got.len(), 8, "{}", s["summary"]);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-4, "step {i}: 2 workers {g} vs 1 process {w}");
    }
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    println!("2 workers vs 1 process over 8 steps: max |loss diff| {worst:.2e}");
    assert_exactly_once(&s);
}

/// Runs `job` to the end with workers `a`, `b`, `c`; if `elastic`, `b` is killed (`kill
/// -9`) after step `kill_after` and, once the 2 survivors trained a step, `d` joins.
/// Returns the final status and the final weights.
fn run_three(d: &Path, job: &Path, out: &Path, elastic: Option<u64>) -> (serde_json::Value, otter::tensors::TensorFile) {
    let c = start_coord(job, &d.join("coord"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", d);
    let mut b = start_worker(&c.addr, "b", d);
    let _c = start_worker(&c.addr, "c", d);
    let mut _late = None;
    if let Some(kill_after) = elastic {
        wait_for(&c.addr, "3 ranks past the kill step", Duration::from_secs(60), |s| s["summary"]["world"] == 3 && steps_committed(s) > kill_after);
        b.child.0.kill().unwrap();
        wait_for(&c.addr, "2 ranks training", Duration::from_secs(60), |s| {
            s["steps"].as_array().is_some_and(|v| v.iter().any(|x| x["world"] == 2))
        });
        _late = Some(start_worker(&c.addr, "d", d));
        wait_for(&c.addr, "3 ranks again", Duration::from_secs(60), |s| s["summary"]["world"] == 3);
    }
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    (s, otter::tensors::TensorFile::read(&out.join("final_weights.safetensors")).unwrap())
}

/// The same job run twice: left alone (three workers throughout), and elastic (worker
/// kill -9'd after step 4, another joining later). `deterministic`: with
/// `comm.deterministic` (and the pinned thread count it needs). Returns each run's
/// committed steps and final weights.
fn calm_and_elastic(deterministic: bool) -> ((Vec<serde_json::Value>, otter::tensors::TensorFile), (Vec<serde_json::Value>, otter::tensors::TensorFile), serde_json::Value) {
    let d = tempfile::tempdir().unwrap();
    // Enough steps after the kill that the joiner's start-up (a second or so on a loaded
    // machine) always finds the job still running.
    let data = synth(d.path(), 384);
    let job_for = |name: &str| {
        let out = d.path().join(name);
        let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(60), epochs: 1, grad_accum: 1, coord: Some((2, 3)), out: &out });
        edit_yaml(&job, &[("train:\n", "train:\n  global_batch: 6\n")]);
        if deterministic {
            edit_yaml(&job, &[("train:\n", "train:\n  cpu_threads: 1\n"), ("comm:\n", "comm:\n  deterministic: true\n")]);
        }
        job
    };
    let (calm_dir, elastic_dir) = (d.path().join("calm-run"), d.path().join("elastic-run"));
    std::fs::create_dir_all(&calm_dir).unwrap();
    std::fs::create_dir_all(&elastic_dir).unwrap();
    let (calm, calm_w) = run_three(&calm_dir, &job_for("calm"), &d.path().join("calm"), None);
    let (elastic, elastic_w) = run_three(&elastic_dir, &job_for("elastic"), &d.path().join("elastic"), Some(4));
    assert_eq!(calm["total_steps"], elastic["total_steps"]);
    let steps = |s: &serde_json::Value| s["steps"].as_array().unwrap().clone();
    let (a, b) = (steps(&calm), steps(&elastic));
    assert_eq!((a.len(), b.len()), (60, 60));
    let worlds: std::collections::BTreeSet<u64> = b.iter().filter_map(|x| x["world"].as_u64()).collect();
    let changes = b.windows(2).filter(|w| w[0]["world"] != w[1]["world"]).count();
    assert!(worlds.contains(&2) && changes >= 2, "the elastic run shrank and grew again: {worlds:?}, {changes} changes");
    // A step every rank applied whose reports were still in flight when its generation
    // ended is committed at the next rendezvous without its loss and lr (known gap: the
    // check-in does not carry them); at most a few around each world change.
    let unreported = b.iter().filter(|y| y["lr"].is_null()).count();
    assert!(unreported <= 2 * changes, "{unreported} steps without loss/lr, {changes} world changes");
    for (x, y) in a.iter().zip(&b) {
        let step = x["step"].as_u64().unwrap();
        assert_eq!(x["micro_batches"], 3, "step {step}: 6 samples = 3 batches of 2");
        assert_eq!(y["micro_batches"], 3, "step {step} (world {}): the same global batch", y["world"]);
        assert!(x["lr"].is_number(), "step {step}: the uninterrupted run reports every step");
        if y["lr"].is_null() {
            assert!(y["loss"].is_null(), "step {step}: lr and loss travel together");
            continue;
        }
        assert_eq!(x["lr"].as_f64(), y["lr"].as_f64(), "step {step}: one schedule");
    }
    ((a, calm_w), (b, elastic_w), elastic)
}

/// The losses of the steps both runs reported, as (step, world in the elastic run, calm, elastic).
fn reported_losses(a: &[serde_json::Value], b: &[serde_json::Value]) -> Vec<(u64, u64, f64, f64)> {
    a.iter().zip(b).filter(|(_, y)| y["loss"].is_number()).map(|(x, y)| (x["step"].as_u64().unwrap(), y["world"].as_u64().unwrap_or(0), x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap())).collect()
}

/// The global batch is the job's, not the world's: a run in which a worker is killed at
/// one step and another joins later computes the same run as one left alone (the same
/// batches in every step, the gradient the mean over them however the ranks split them,
/// one schedule): losses within reduction-order noise, the same learning rates, the same
/// final weights.
#[test]
fn an_elastic_run_computes_the_same_run_as_an_uninterrupted_one() {
    let _serial = serial();
    let ((a, calm_w), (b, elastic_w), _) = calm_and_elastic(false);
    let losses = reported_losses(&a, &b);
    let worst = losses.iter().map(|(_, _, x, y)| (x - y).abs()).fold(0f64, f64::max);
    let table: Vec<String> = losses.iter().map(|(s, w, x, y)| format!("step {s} world {w}: {x} vs {y}")).collect();
    println!("elastic (kill after step 4, a join after) vs uninterrupted: max |loss diff| {worst:.2e} over 60 steps");
    assert!(worst <= 1e-5, "max |loss diff| {worst:.2e}:\n{}", table.join("\n"));
    let mut wdiff = 0f64;
    for (name, t) in &calm_w.tensors {
        wdiff = wdiff.max(max_abs_diff(t, elastic_w.get(name).unwrap()));
    }
    println!("final weights: max |diff| {wdiff:.2e}");
    assert!(wdiff <= 1e-5, "final weights differ by {wdiff:.2e}");
}

/// Issue 46: with `comm.deterministic`, the elastic run (world 3, a kill -9 down to 2, a
/// join back to 3) is the uninterrupted run: every reported loss the same bits, and the
/// final weights file's tensors byte-identical.
#[test]
fn with_the_deterministic_reduction_an_elastic_run_is_the_same_bits_as_an_uninterrupted_one() {
    let _serial = serial();
    let ((a, calm_w), (b, elastic_w), _) = calm_and_elastic(true);
    let losses = reported_losses(&a, &b);
    let differ: Vec<String> = losses.iter().filter(|(_, _, x, y)| x.to_bits() != y.to_bits()).map(|(s, w, x, y)| format!("step {s} world {w}: {x} vs {y}")).collect();
    println!("deterministic: elastic vs uninterrupted: {} of {} reported losses differ", differ.len(), losses.len());
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    let mut names = 0;
    for (name, t) in &calm_w.tensors {
        let e = elastic_w.get(name).unwrap();
        let bytes = |t: &tch::Tensor| t.contiguous().reshape([-1]).view_dtype(tch::Kind::Uint8);
        assert!(t.kind() == e.kind() && t.size() == e.size() && bytes(t).equal(&bytes(e)), "{name}: the final weights differ (max |diff| {:.2e})", max_abs_diff(t, e));
        names += 1;
    }
    println!("final weights: {names} tensors, byte-identical");
}

/// ZeRO-1 through failures (`train.optimizer_sharding`): a job whose worker is killed
/// loses that rank's part of the optimizer state, so every rank restarts fresh and the job
/// restores its newest checkpoint (whose moments were gathered from the parts); when it
/// grows again, the survivors' parts are re-cut from 2 ranks into 3 without a checkpoint.
/// Through both it computes what an unsharded, uninterrupted job computes.
#[test]
fn a_sharded_optimizer_through_a_lost_part_and_a_recut_computes_the_same_run() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 384);
    let job_for = |name: &str, sharded: bool| {
        let out = d.path().join(name);
        let job = job_yaml(d.path(), &data, &Job { save_every: 4, max_steps: Some(40), epochs: 1, grad_accum: 1, coord: Some((2, 3)), out: &out });
        let train = if sharded { "train:\n  global_batch: 6\n  optimizer_sharding: true\n" } else { "train:\n  global_batch: 6\n" };
        edit_yaml(&job, &[("train:\n", train)]);
        job
    };
    let (calm_dir, sharded_dir) = (d.path().join("calm-run"), d.path().join("sharded-run"));
    std::fs::create_dir_all(&calm_dir).unwrap();
    std::fs::create_dir_all(&sharded_dir).unwrap();
    let (calm, calm_w) = run_three(&calm_dir, &job_for("calm", false), &d.path().join("calm"), None);
    let (sharded, sharded_w) = run_three(&sharded_dir, &job_for("sharded", true), &d.path().join("sharded"), Some(6));
    // Whole logs: on a slow machine the lines asked for can be far from the end.
    let log = full_logs(&sharded_dir);
    let tails = logs(&sharded_dir);
    assert!(log.contains("was lost with its rank"), "the killed rank's part was found missing:\n{tails}");
    assert!(log.contains("restored from checkpoint step-"), "the job restored a checkpoint:\n{tails}");
    assert!(log.contains("re-cut from 2 parts into 3"), "the parts were re-cut when the job grew:\n{tails}");
    let steps = |s: &serde_json::Value| s["steps"].as_array().unwrap().clone();
    let (a, b) = (steps(&calm), steps(&sharded));
    assert_eq!((a.len(), b.len()), (40, 40));
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&b) {
        if let (Some(p), Some(q)) = (x["loss"].as_f64(), y["loss"].as_f64()) {
            worst = worst.max((p - q).abs());
        }
    }
    let mut wdiff = 0f64;
    for (name, t) in &calm_w.tensors {
        wdiff = wdiff.max(max_abs_diff(t, sharded_w.get(name).unwrap()));
    }
    println!("sharded (part lost, checkpoint restored, re-cut 2 -> 3) vs unsharded uninterrupted: max |loss diff| {worst:.2e}, final weights {wdiff:.2e}");
    assert!(worst <= 1e-5, "max |loss diff| {worst:.2e}");
    assert!(wdiff <= 1e-5, "final weights differ by {wdiff:.2e}");
}

/// `otter_optimizer_state_bytes`, scraped from each node of a running sharded 2-rank job:
/// every rank reports half of AdamW's moments (up to a padding element per bucket).
#[test]
fn each_rank_of_a_sharded_job_reports_half_the_optimizer_state_in_its_metrics() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let model = otter::model::Otter::load_dir(&tiny_model(), otter::model::weights::LoadOptions::default()).unwrap();
    let full: u64 = model.trainable().iter().map(|(_, t)| 8 * t.numel() as u64).sum();
    let job = common::job::start_live_job_with(d.path(), 400, 1000, "  optimizer_sharding: true\n");
    let t = Instant::now();
    let mut seen = Vec::new();
    for node in &job.node_metrics {
        let value = loop {
            let page = common::job::http_get(node, "/metrics").unwrap_or_default();
            let v = page.lines().find(|l| l.starts_with("otter_optimizer_state_bytes{")).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
            if let Some(v) = v.filter(|&v| v > 0) {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(90), "node {node} never reported its optimizer state:\n{page}");
            std::thread::sleep(Duration::from_millis(200));
        };
        seen.push(value);
    }
    println!("sharded 2-rank job: otter_optimizer_state_bytes {seen:?}, unsharded {full}");
    for v in &seen {
        assert!(2 * v >= full && 2 * v <= full + 16 * 64, "a rank holds {v} B of {full} B of moments");
    }
    drop(job);
}

#[test]
fn kill_9_of_one_of_three_workers_recovers_in_seconds_and_loses_no_sample() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 96);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 3)), out: &out });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", d.path());
    let mut b = start_worker(&c.addr, "b", d.path());
    let _c = start_worker(&c.addr, "c", d.path());
    let before = wait_for(&c.addr, "3 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 3 && steps_committed(s) >= 3);
    let generation = before["summary"]["generation"].as_u64().unwrap();
    let killed = Instant::now();
    b.child.0.kill().unwrap(); // SIGKILL: the agent and (PDEATHSIG) its rank process
    let after = wait_for(&c.addr, "training to continue", Duration::from_secs(30), |s| {
        s["steps"].as_array().is_some_and(|v| v.iter().any(|x| x["generation"].as_u64() > Some(generation)))
    });
    let recovery = killed.elapsed();
    println!("kill -9 of worker b: the 2 others committed a step again {:.2} s later (generation {})", recovery.as_secs_f64(), after["summary"]["generation"]);
    assert!(recovery < Duration::from_secs(10), "recovery took {recovery:?}");
    let s = finish(c, Duration::from_secs(90));
    assert_exactly_once(&s);
    assert!(s["summary"]["recoveries"].as_u64() >= Some(1));
    // Every batch of the epoch was trained exactly once (up to the documented tail).
    let tail = s["summary"]["dropped_tail"].as_u64().unwrap_or(0);
    assert!(tail < 2, "tail {tail}: smaller than one step of the 2 survivors");
}

/// NCCL does not fail a collective when a peer dies: it blocks until its communicator is
/// aborted. With groups that fail that way (`comm::emulated`, standing in for a CUDA
/// rank's NCCL group) a `kill -9` still costs seconds, not the collective timeout: the
/// coordinator's notice (the generation watch) aborts the survivors' communicators, and
/// they regroup in the same processes, without a restart or a reload.
#[test]
fn with_groups_that_block_like_nccl_a_dead_peer_costs_seconds_and_no_restart() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 96);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 3)), out: &out });
    // Only the abort can release the survivors in time.
    edit_yaml(&job, &[("comm:\n  timeout: 60s\n", "comm:\n  timeout: 300s\n")]);
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let nccl_like = [("OTTER_TEST_EMULATE_NCCL", "1")];
    let a = start_worker_env(&c.addr, "a", d.path(), &nccl_like);
    let mut b = start_worker_env(&c.addr, "b", d.path(), &nccl_like);
    let cw = start_worker_env(&c.addr, "c", d.path(), &nccl_like);
    let before = wait_for(&c.addr, "3 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 3 && steps_committed(s) >= 3);
    let generation = before["summary"]["generation"].as_u64().unwrap();
    let survivors = || -> Vec<u32> { [&a, &cw].iter().flat_map(|w| process_tree(w.child.0.id())).collect() };
    let processes = survivors();
    assert_eq!(processes.len(), 4, "two agents and their rank processes: {processes:?}");
    let killed = Instant::now();
    b.child.0.kill().unwrap();
    wait_for(&c.addr, "training to continue", Duration::from_secs(120), |s| {
        s["steps"].as_array().is_some_and(|v| v.iter().any(|x| x["generation"].as_u64() > Some(generation)))
    });
    let recovery = killed.elapsed();
    println!("NCCL-like groups, kill -9 of worker b: a step committed again {:.2} s later", recovery.as_secs_f64());
    assert!(recovery < Duration::from_secs(30), "recovery took {recovery:?}: the survivors waited for the collective timeout");
    assert_eq!(survivors(), processes, "the survivors regrouped in the same processes");
    let s = finish(c, Duration::from_secs(90));
    assert_exactly_once(&s);
    // Each survivor left generation `generation` through its abort: either blocked in a
    // collective (the emulated group then reports it done, as c10d's aborted NCCL work
    // does, and the generation's check turns that into an error naming the abort: "(during
    // a collective: its result is not used)"), or, when the coordinator's notice came
    // while it was still computing, at its next collective. Which one is a race with the
    // survivors' compute (on 2 cores the notice often wins); tests/it/grad_sync.rs's
    // `an_abort_during_*` tests pin the in-collective case down deterministically. What
    // must never show is a failure report (a timeout or a socket error taken for news).
    let released = format!("generation {generation}: step ");
    for w in [&a, &cw] {
        let log = std::fs::read_to_string(&w.log).unwrap();
        let left: Vec<&str> = log.lines().filter(|l| l.contains(&released) && l.contains(" released: ")).collect();
        assert_eq!(left.len(), 1, "each survivor was released from generation {generation} by its abort, once:\n{}", logs(d.path()));
        let err = std::fs::read_to_string(w.log.with_extension("err")).unwrap();
        assert!(!err.contains(" failed: "), "no survivor reported its collective as failed:\n{}", logs(d.path()));
    }
}

/// A forced regroup (`OTTER_FAULT_ABORT_AT_STEP`: a rank aborts its generation's group
/// before a step's collectives and reports the failure, as after an NCCL error): the job
/// forms the next generation with the same processes, which keep their state, and every
/// batch is still trained once. scripts/gpu-check.sh runs the same on a GPU over NCCL.
#[test]
fn a_forced_regroup_reforms_the_group_in_the_same_processes() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 48);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(10), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let a = start_worker_env(&c.addr, "a", d.path(), &[("OTTER_FAULT_ABORT_AT_STEP", "3")]);
    let b = start_worker(&c.addr, "b", d.path());
    let first = wait_for(&c.addr, "2 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 2);
    let generation = first["summary"]["generation"].as_u64().unwrap();
    // The generation forms when both nodes have joined, before every agent has started its
    // rank process: wait for those (no step runs without both ranks, so this is before the
    // fault at step 3).
    let t = std::time::Instant::now();
    let processes: Vec<u32> = loop {
        let p: Vec<u32> = [&a, &b].iter().flat_map(|w| process_tree(w.child.0.id())).collect();
        if p.len() == 4 || t.elapsed() > Duration::from_secs(30) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(processes.len(), 4, "two agents and their rank processes: {processes:?}");
    wait_for(&c.addr, "a step of a later generation", Duration::from_secs(60), |s| {
        s["steps"].as_array().is_some_and(|v| v.iter().any(|x| x["generation"].as_u64() > Some(generation)))
    });
    let after: Vec<u32> = [&a, &b].iter().flat_map(|w| process_tree(w.child.0.id())).collect();
    assert_eq!(after, processes, "the same processes trained on");
    // Issue 43: every rank process runs with the c10d settings that keep it alive and in
    // charge through a peer's failure (the agent sets them unless the operator did).
    for w in [&a, &b] {
        let rank = *process_tree(w.child.0.id()).last().unwrap();
        let env = environ(rank);
        for (k, v) in otter::worker::agent::RANK_ENV {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "rank process {rank}: {k}");
        }
    }
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    let steps = s["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 10, "{}", s["summary"]);
    let generations: std::collections::BTreeSet<u64> = steps.iter().filter_map(|x| x["generation"].as_u64()).collect();
    assert!(generations.len() >= 2, "steps after the fault ran in a new generation: {generations:?}");
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(log.contains("fault injection: aborting generation"), "{log}");
}

#[test]
fn a_worker_added_mid_run_gets_identical_state_and_training_continues() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 96);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 3)), out: &out });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let a = start_worker(&c.addr, "a", d.path());
    let b = start_worker(&c.addr, "b", d.path());
    wait_for(&c.addr, "2 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 2 && steps_committed(s) >= 3);
    let late = start_worker(&c.addr, "c", d.path());
    let grown = wait_for(&c.addr, "3 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 3 && steps_committed(s) >= 1);
    let generation = grown["summary"]["generation"].as_u64().unwrap();
    let s = finish(c, Duration::from_secs(90));
    assert_exactly_once(&s);
    let marker = format!("generation {generation} rank");
    let joined: Vec<Vec<String>> = [&a, &b, &late].iter().map(|w| checksums(&w.log, &marker)).collect();
    println!("checksums at the start of generation {generation}: {joined:?}");
    assert!(joined.iter().all(|c| c.len() == 1), "every rank started generation {generation} once: {joined:?}\n{}", logs(d.path()));
    assert!(joined.windows(2).all(|w| w[0] == w[1]), "identical state on all ranks: {joined:?}");
    let late_log = std::fs::read_to_string(&late.log).unwrap();
    assert!(late_log.contains("state copied from rank"), "{late_log}");
    let done: Vec<Vec<String>> = [&a, &b, &late].iter().map(|w| checksums(&w.log, "done after step")).collect();
    assert!(done.iter().all(|c| c.len() == 1) && done.windows(2).all(|w| w[0] == w[1]), "final states equal: {done:?}");
}

#[test]
fn the_job_survives_a_coordinator_restart_on_its_state_dir() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 160);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let state = d.path().join("coord");
    let c = start_coord(&job, &state, &listen);
    let _a = start_worker(&c.addr, "a", d.path());
    let _b = start_worker(&c.addr, "b", d.path());
    let before = steps_committed(&wait_for(&c.addr, "training", Duration::from_secs(60), |s| steps_committed(s) >= 3));
    assert!(status(&c.addr).is_some_and(|s| s["summary"]["phase"].get("Running").is_some()), "the job must still be running when the coordinator is killed");
    drop(c); // SIGKILL
    let c = start_coord(&job, &state, &listen);
    let after = wait_for(&c.addr, "training to continue", Duration::from_secs(30), |s| steps_committed(s) > before + 2);
    println!("coordinator restarted after step {before}; {} steps committed since", steps_committed(&after) - before);
    let s = finish(c, Duration::from_secs(90));
    assert_exactly_once(&s);
    assert_eq!(s["summary"]["phase"], "Finished");
}

/// A group is all ring or all NCCL: every rank runs on the job's `train.device`, and a
/// node without GPUs refuses a job that trains on CUDA instead of joining its group.
#[test]
fn a_cpu_node_refuses_a_job_that_trains_on_cuda() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 16);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(2), epochs: 1, grad_accum: 1, coord: Some((1, 1)), out: &out });
    edit_yaml(&job, &[("train:\n", "train:\n  device: cuda\n")]);
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let o = Command::new(WORKER)
        .args(["join", "--coord", &c.addr, "--node-id", "cpu-only", "--cpu-ranks", "1", "--advertise-host", "127.0.0.1"])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the node must not run a CUDA job on CPU ranks");
    assert!(err.contains("the job trains on cuda:0 (train.device) and this node joined with CPU ranks: start it with --gpus N"), "{err}");
    // Issue 43: GPUs asked for but not there is an error at join, not a rank failing later.
    let o = Command::new(WORKER)
        .args(["join", "--coord", &c.addr, "--node-id", "no-gpus", "--gpus", "1", "--advertise-host", "127.0.0.1"])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--gpus 1: this node has 0 usable GPU(s) (CUDA reports 0)"), "{err}");
    // And a job that names a device index: each rank sees one GPU, the agent chooses it.
    let indexed = d.path().join("indexed.yaml");
    std::fs::write(&indexed, std::fs::read_to_string(&job).unwrap().replace("device: cuda\n", "device: cuda:1\n")).unwrap();
    let o = Command::new(coord_bin()).args(["start", "--config", indexed.to_str().unwrap(), "--listen", "127.0.0.1:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("field `train.device`: cuda:1") && err.contains("write `cuda`"), "{err}");
}

/// The environment of process `pid`.
fn environ(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn wrong_token_and_malformed_job_are_refused_clearly() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 16);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let o = Command::new(WORKER).args(["join", "--coord", &c.addr, "--node-id", "intruder"]).env("OTTER_JOIN_TOKEN", "wrong").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("join token"), "{err}");
    let s = status(&c.addr).unwrap();
    assert_eq!(s["summary"]["nodes"], 0, "the intruder was not registered");

    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, std::fs::read_to_string(&job).unwrap().replace("max_nodes: 2", "max_nodes: 1")).unwrap();
    let o = Command::new(coord_bin()).args(["start", "--config", bad.to_str().unwrap(), "--listen", "127.0.0.1:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("coord.max_nodes"), "{err}");
    let typo = d.path().join("typo.yaml");
    std::fs::write(&typo, std::fs::read_to_string(&job).unwrap().replace("last_call:", "last_cal:")).unwrap();
    let o = Command::new(coord_bin()).args(["start", "--config", typo.to_str().unwrap(), "--listen", "127.0.0.1:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("last_cal"), "{err}");
}

fn start_coord_etcd(config: &Path, etcd: &str, listen: &str, log: &Path) -> Child {
    Command::new(coord_bin())
        // Each replica its own HTTP port: two on one host must not share the default.
        .args(["start", "--config", config.to_str().unwrap(), "--listen", listen, "--etcd", etcd, "--http-listen", "127.0.0.1:0"])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The rank processes under a worker agent (its descendants), sorted.
fn rank_pids(w: &Worker) -> Vec<u32> {
    let mut p = process_tree(w.child.0.id());
    p.remove(0);
    p.sort();
    p
}

/// Per-step losses of an uninterrupted run of `job` (one coordinator on its state dir,
/// workers a and b): the reference a failover must equal.
fn uninterrupted_losses(d: &Path, job: &Path) -> Vec<f64> {
    let dir = d.join("reference");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::fs::read_to_string(job).unwrap();
    let out = out.lines().find_map(|l| l.trim().strip_prefix("out_dir: ")).unwrap().to_string();
    let job_ref = dir.join("job.yaml");
    std::fs::write(&job_ref, std::fs::read_to_string(job).unwrap().replace(&format!("out_dir: {out}"), &format!("out_dir: {}", dir.join("out").display()))).unwrap();
    let c = start_coord(&job_ref, &dir.join("coord"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", &dir);
    let _b = start_worker(&c.addr, "b", &dir);
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    losses_of(&s)
}

/// An HA pair on a real etcd (lease TTL 3 s), two workers given both addresses; at step 15
/// the active coordinator gets `signal` (SIGKILL: it is gone; SIGSTOP: it hangs with its
/// sockets open, and is resumed once the standby has taken over). The workers must follow
/// the standby without restarting a rank process, steps must commit again within the
/// lease TTL + 5 s, and the run must equal an uninterrupted one step for step (issue 51).
fn the_standby_takes_over_from_an_active_coordinator_that(signal: libc::c_int) {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(d.path(), &[]).unwrap();
    let data = synth(d.path(), 192);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(120), epochs: 2, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let want = uninterrupted_losses(d.path(), &job);
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (addr_a, addr_b) = (free(), free());
    let mut active = start_coord_etcd(&job, etcd.url(), &addr_a, &d.path().join("coord-a.log"));
    wait_for(&addr_a, "coordinator a elected", Duration::from_secs(30), |_| true);
    let mut standby = start_coord_etcd(&job, etcd.url(), &addr_b, &d.path().join("coord-b.log"));
    let both = format!("{addr_a},{addr_b}");
    let wa = start_worker(&both, "a", d.path());
    let wb = start_worker(&both, "b", d.path());
    let before = steps_committed(&wait_for(&addr_a, "training", Duration::from_secs(60), |s| steps_committed(s) >= 15));
    let pids = (rank_pids(&wa), rank_pids(&wb));
    assert!(steps_committed(&status(&addr_a).unwrap()) < 100, "the signal lands mid-run");
    assert!(std::net::TcpStream::connect(&addr_b).is_err(), "the standby must not serve while the active one lives");
    assert_eq!((pids.0.len(), pids.1.len()), (1, 1), "one rank process per worker: {pids:?}");
    // SAFETY: kill(2) on the coordinator child we started.
    unsafe { libc::kill(active.id() as libc::pid_t, signal) };
    let t = Instant::now();
    wait_for(&addr_b, "the standby to take over and steps to commit again", Duration::from_secs(30), |s| steps_committed(s) > before + 1);
    let took = t.elapsed();
    println!("signal {signal}: steps committed again on the standby {:.2} s after the signal (lease TTL 3 s)", took.as_secs_f64());
    assert!(took < Duration::from_secs(3 + 5), "took {took:?}: more than the lease TTL + 5 s");
    if signal == libc::SIGSTOP {
        // Resumed past a heartbeat timeout (10 s), with the agents' watch streams to it
        // closed meanwhile, the old leader finds its lease long past: it acts on nothing
        // (declares no node lost, tells nobody anything) and stops (exit 3: deposed).
        std::thread::sleep(Duration::from_secs(11).saturating_sub(t.elapsed()));
        unsafe { libc::kill(active.id() as libc::pid_t, libc::SIGCONT) };
        let t = Instant::now();
        let code = loop {
            if let Some(c) = active.try_wait().unwrap() {
                break c;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "the resumed old leader did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(code.code(), Some(3), "deposed");
        let log_a = std::fs::read_to_string(d.path().join("coord-a.log")).unwrap();
        assert!(log_a.contains("stops acting"), "{log_a}");
        // Nothing was lost in this job: a line saying so is the old leader acting on its
        // stale clock (before the fix it declared both nodes lost on resuming).
        assert!(!log_a.contains("NodeLost") && !log_a.contains(" lost: "), "the resumed old leader acted: {log_a}");
    } else {
        let log_a = std::fs::read_to_string(d.path().join("coord-a.log")).unwrap();
        assert!(!log_a.contains("another coordinator is active"), "a was fenced before the kill: {log_a}");
    }
    let t = Instant::now();
    let code = loop {
        if let Some(c) = standby.try_wait().unwrap() {
            break c;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "job did not finish\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "standby exited with {code}\n{}", logs(d.path()));
    let logs_now = full_logs(d.path());
    assert!(!logs_now.contains("restarts fresh"), "a rank process restarted:\n{logs_now}");
    assert_eq!(checksums(&wa.log, "done after step").len(), 1, "rank a finished in its first process\n{}", logs(d.path()));
    assert_eq!(checksums(&wb.log, "done after step").len(), 1, "rank b finished in its first process\n{}", logs(d.path()));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("coord/status.json")).unwrap()).unwrap();
    assert_exactly_once(&s);
    assert_eq!(s["summary"]["phase"], "Finished");
    assert_eq!(s["summary"]["recoveries"], 0, "no generation was re-formed: {}", s["summary"]);
    assert_eq!(losses_of(&s), want, "per-step losses equal the uninterrupted run's");
    drop((wa, wb));
}

#[test]
fn killing_the_active_coordinator_of_an_ha_pair_costs_seconds_and_no_rank_restarts() {
    the_standby_takes_over_from_an_active_coordinator_that(libc::SIGKILL);
}

#[test]
fn a_hung_active_coordinator_is_replaced_by_the_standby_and_fenced_when_it_resumes() {
    the_standby_takes_over_from_an_active_coordinator_that(libc::SIGSTOP);
}

/// With its only coordinator gone for longer than `coord.reconnect_timeout`, a rank
/// leaves, saying which address it tried and for how long (issue 51).
#[test]
fn a_rank_whose_coordinator_stays_unreachable_leaves_naming_the_address_and_the_time() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 96);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 20, grad_accum: 1, coord: Some((1, 1)), out: &out });
    edit_yaml(&job, &[("heartbeat_timeout: 10s\n", "heartbeat_timeout: 10s\n  reconnect_timeout: 3s\n")]);
    let mut c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let mut w = start_worker(&c.addr, "a", d.path());
    wait_for(&c.addr, "training", Duration::from_secs(60), |s| steps_committed(s) >= 3);
    c.child.0.kill().unwrap();
    let t = Instant::now();
    let code = loop {
        if let Some(code) = w.child.0.try_wait().unwrap() {
            break code;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the worker did not give up\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!code.success());
    let said = full_logs(d.path());
    let line = said.lines().find(|l| l.contains("no coordinator answered at")).unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains(&c.addr), "names the address: {line}");
    let secs: f64 = line.split("no coordinator answered at").nth(1).unwrap().split(" for ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((3.0..10.0).contains(&secs), "tried for reconnect_timeout (3 s): {line}");
    assert!(t.elapsed() >= Duration::from_secs(3), "it did not give up before reconnect_timeout");
}

/// `etcdctl` (v3 API) against `etcd`.
fn etcdctl(etcd: &str) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3").arg(format!("--endpoints={etcd}"));
    c
}

/// Every value under `prefix` in etcd, with its size in bytes.
fn etcd_values(etcd: &str, prefix: &str) -> Vec<(String, usize)> {
    use base64::Engine;
    let o = etcdctl(etcd).args(["get", "--prefix", prefix, "-w", "json"]).output().unwrap();
    assert!(o.status.success(), "etcdctl: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = String::from_utf8(b64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap();
                    (key, b64.decode(kv["value"].as_str().unwrap_or("")).unwrap().len())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The previous design kept about 70 bytes of every committed step in its one etcd value
/// forever, so an HA job stopped being able to save its state (etcd refuses requests over
/// 1.5 MiB by default) after about 22,500 steps. Here etcd's request limit is lowered to
/// 192 KiB, which that design would have hit after about 2,800 steps (the same failure,
/// ten times sooner). Two simulated nodes (the worker's protocol without training, so a
/// step takes a millisecond) drive a real pair of coordinators on that etcd past that
/// point; then the active coordinator is killed: the standby takes over, the job runs to
/// its end, every etcd value stayed under the limit throughout, the step history left the
/// state for its file, and the exactly-once check holds.
#[test]
fn an_etcd_job_runs_past_the_old_designs_size_limit_then_fails_over() {
    const LIMIT: u64 = 192 * 1024;
    const OLD_LIMIT_STEPS: u64 = LIMIT / 70;
    const STEPS: u64 = OLD_LIMIT_STEPS + 400;
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    // Without fsyncs (the test is about sizes and the failover, not etcd's durability): a
    // step takes the time of the coordinator's work, not of a disk flush.
    let etcd = LocalEtcd::start(d.path(), &["--unsafe-no-fsync", "--max-request-bytes", &LIMIT.to_string()]).unwrap();
    // The lowered limit bites: a value the old design would have written by the end is refused.
    let put = |bytes: usize| {
        // The value on standard input (one argument may not exceed 128 KiB).
        let mut c = etcdctl(etcd.url())
            .args(["put", "probe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), "x".repeat(bytes).as_bytes()).unwrap();
        c.wait().unwrap().success()
    };
    assert!(put(1000) && !put(LIMIT as usize + 1), "etcd refuses requests over {LIMIT} bytes");
    let data = synth(d.path(), 192); // 96 batches of 2 an epoch: 48 steps of world 2
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 100, max_steps: Some(STEPS), epochs: STEPS / 48 + 2, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (addr_a, addr_b) = (free(), free());
    let mut active = start_coord_etcd(&job, etcd.url(), &addr_a, &d.path().join("coord-a.log"));
    wait_for(&addr_a, "coordinator a elected", Duration::from_secs(30), |_| true);
    let mut standby = start_coord_etcd(&job, etcd.url(), &addr_b, &d.path().join("coord-b.log"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let nodes: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| {
            let node = otter_core::coord::simnode::SimNode {
                addrs: vec![addr_a.clone(), addr_b.clone()],
                token: TOKEN.into(),
                node_id: format!("sim-{n}"),
                ckpt_dir: out.join("checkpoints"),
                save_every: 100,
            };
            rt.spawn(async move { node.run().await })
        })
        .collect();
    let t = Instant::now();
    let mut largest = 0;
    let before = loop {
        let s = status(&addr_a).unwrap_or_default();
        largest = largest.max(etcd_values(etcd.url(), "otter/").iter().map(|(_, n)| *n).max().unwrap_or(0));
        if steps_committed(&s) > OLD_LIMIT_STEPS + 100 {
            break steps_committed(&s);
        }
        assert!(t.elapsed() < Duration::from_secs(600), "{} steps in 10 min\n{}", steps_committed(&s), logs(d.path()));
        std::thread::sleep(Duration::from_millis(500));
    };
    let rate = before as f64 / t.elapsed().as_secs_f64();
    let values = etcd_values(etcd.url(), "otter/");
    let state = values.iter().find(|(k, _)| k == "otter/state").map_or(0, |(_, n)| *n);
    println!("{before} steps in {:.0} s ({rate:.0} steps/s); etcd values: {values:?}", t.elapsed().as_secs_f64());
    assert!(state > 0 && state < LIMIT as usize, "the saved state: {state} bytes");
    active.kill().unwrap();
    let killed = Instant::now();
    for n in nodes {
        let report = rt.block_on(async { tokio::time::timeout(Duration::from_secs(300), n).await }).expect("the simulated nodes finish").unwrap();
        let report = report.unwrap_or_else(|e| panic!("a simulated node: {e:#}\n{}", logs(d.path())));
        assert!(report.generations >= 1, "{report:?}");
    }
    println!("failover and the last {} steps took {:.1} s", STEPS - before, killed.elapsed().as_secs_f64());
    let code = loop {
        if let Some(c) = standby.try_wait().unwrap() {
            break c;
        }
        assert!(killed.elapsed() < Duration::from_secs(360), "the standby did not finish\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "standby exited with {code}\n{}", std::fs::read_to_string(d.path().join("coord-b.log")).unwrap());
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("coord/status.json")).unwrap()).unwrap();
    assert_exactly_once(&s);
    assert_eq!((s["summary"]["phase"].as_str(), steps_committed(&s)), (Some("Finished"), STEPS));
    let values = etcd_values(etcd.url(), "otter/");
    largest = largest.max(values.iter().map(|(_, n)| *n).max().unwrap_or(0));
    assert!(largest < LIMIT as usize, "an etcd value of {largest} bytes: {values:?}");
    let history = std::fs::read_to_string(out.join("coord/history.jsonl")).unwrap();
    let steps: Vec<u64> = history.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert!(steps.len() as u64 > STEPS - 1000 && steps.windows(2).all(|w| w[1] == w[0] + 1) && steps[0] == 0, "the history file: {} steps", steps.len());
}

/// A throwaway CA and a `localhost` certificate signed by it (openssl CLI).
/// A coordinator whose etcd lease is revoked (as when etcd expires it behind a partition)
/// stops acting as leader within one lease TTL (3 s), and the standby takes over.
#[test]
fn a_coordinator_whose_etcd_lease_is_revoked_stops_within_one_ttl() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let etcd = LocalEtcd::start(d.path(), &[]).unwrap();
    let data = synth(d.path(), 48);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: None, epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (addr_a, addr_b) = (free(), free());
    let mut active = start_coord_etcd(&job, etcd.url(), &addr_a, &d.path().join("coord-a.log"));
    wait_for(&addr_a, "coordinator a elected", Duration::from_secs(30), |_| true);
    let mut standby = start_coord_etcd(&job, etcd.url(), &addr_b, &d.path().join("coord-b.log"));
    let etcdctl = |args: &[&str]| {
        let o = etcdctl(etcd.url()).args(args).output().unwrap();
        assert!(o.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    // b campaigns: its key joins a's under the election prefix. Only then may it be seen
    // not to serve.
    let t = Instant::now();
    while etcdctl(&["get", "--prefix", "otter/leader", "--keys-only"]).lines().filter(|l| !l.is_empty()).count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "the standby never campaigned");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(status(&addr_b).is_none(), "the standby does not serve");
    // The leader is the campaign key created first; revoke the lease it is attached to.
    let keys: serde_json::Value = serde_json::from_str(&etcdctl(&["get", "--prefix", "otter/leader", "--sort-by=CREATE", "-w", "json"])).unwrap();
    let lease = keys["kvs"][0]["lease"].as_i64().expect("the leader key has a lease");
    let revoked = Instant::now();
    etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
    let code = loop {
        if let Some(c) = active.try_wait().unwrap() {
            break c;
        }
        assert!(revoked.elapsed() < Duration::from_secs(10), "a still acts 10 s after its lease was revoked");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stopped = revoked.elapsed();
    let log_a = std::fs::read_to_string(d.path().join("coord-a.log")).unwrap();
    println!("lease revoked: the coordinator stopped {:.2} s later (TTL 3 s), exit {code}", stopped.as_secs_f64());
    assert!(stopped < Duration::from_secs(3), "stopped {stopped:?} after the revoke: more than one lease TTL\n{log_a}");
    assert!(log_a.contains("was revoked or has expired"), "{log_a}");
    assert_eq!(code.code(), Some(3), "deposed: {log_a}");
    let t = Instant::now();
    while status(&addr_b).is_none() {
        let log_b = std::fs::read_to_string(d.path().join("coord-b.log")).unwrap();
        assert!(t.elapsed() < Duration::from_secs(30), "the standby did not take over: {:?}\n{log_b}", standby.try_wait());
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("the standby answered {:.2} s after the revoke", revoked.elapsed().as_secs_f64());
    let _ = standby.kill();
    let _ = standby.wait();
}

fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=otter-test-ca"]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "csr.pem", "-subj", "/CN=localhost"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&["x509", "-req", "-in", "csr.pem", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf"]);
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

#[test]
fn with_tls_configured_the_job_runs_over_tls_and_plaintext_clients_are_refused() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(d.path());
    let data = synth(d.path(), 24);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(3), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &out });
    let text = std::fs::read_to_string(&job).unwrap().replace("coord:\n", &format!("coord:\n  tls_cert: {}\n  tls_key: {}\n", cert.display(), key.display()));
    std::fs::write(&job, text).unwrap();
    let c = start_coord(&job, &d.path().join("coord"), "127.0.0.1:0");
    let addr = c.addr.replace("127.0.0.1", "localhost");
    let plain = Command::new(coord_bin()).args(["status", "--coord", &addr]).env("OTTER_JOIN_TOKEN", TOKEN).env_remove("OTTER_TLS_CA").output().unwrap();
    assert!(!plain.status.success(), "a plaintext client must not get through");
    let tls_status = Command::new(coord_bin()).args(["status", "--coord", &addr]).env("OTTER_JOIN_TOKEN", TOKEN).env("OTTER_TLS_CA", &ca).output().unwrap();
    assert!(tls_status.status.success(), "{}", String::from_utf8_lossy(&tls_status.stderr));
    let workers: Vec<Worker> = ["a", "b"]
        .iter()
        .map(|n| {
            let log = d.path().join(format!("worker-{n}.log"));
            let child = Command::new(WORKER)
                .args(["join", "--coord", &addr, "--node-id", n, "--cpu-ranks", "1", "--advertise-host", "127.0.0.1"])
                .env("OTTER_JOIN_TOKEN", TOKEN)
                .env("OTTER_TLS_CA", &ca)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
                .spawn()
                .unwrap();
            Worker { child: job::Killed(child), log }
        })
        .collect();
    let s = finish(c, Duration::from_secs(90));
    assert_eq!(s["summary"]["steps_committed"], 3);
    drop(workers);
}

/// Runs a 2-worker job that checkpoints every 2 steps until `step-2` is committed and
/// worker b is stuck writing its shard of `step-4` (fault injection), then kills -9 the
/// whole job: both workers and the coordinator. Returns the job file.
fn run_until_killed_mid_checkpoint(d: &Path, data: &Path, out: &Path, max_steps: u64) -> PathBuf {
    run_until_killed_mid_checkpoint_with(d, data, &tiny_model(), out, max_steps)
}

/// [`run_until_killed_mid_checkpoint`] with the model directory `model`.
fn run_until_killed_mid_checkpoint_with(d: &Path, data: &Path, model: &Path, out: &Path, max_steps: u64) -> PathBuf {
    let job = job_yaml_for_model(d, data, model, &Job { save_every: 2, max_steps: Some(max_steps), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out });
    let c = start_coord(&job, &d.join("coord-1"), "127.0.0.1:0");
    let a = start_worker(&c.addr, "a", d);
    let b = start_worker_env(&c.addr, "b", d, &[("OTTER_FAULT_CKPT_STALL", "4")]);
    wait_for(&c.addr, "checkpoint step-2", Duration::from_secs(60), |s| s["checkpoints"].as_array().is_some_and(|v| v.contains(&2.into())));
    let t = Instant::now();
    while !std::fs::read_to_string(b.log.with_extension("err")).unwrap_or_default().contains("stalling the shard write") {
        assert!(t.elapsed() < Duration::from_secs(30), "worker b never started writing step-4\n{}", logs(d));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((a, b, c)); // SIGKILL each (rank processes die with their agents)
    let ckpt = out.join("checkpoints");
    assert!(ckpt.join("step-2/manifest.json").is_file());
    assert!(!ckpt.join("step-4/manifest.json").exists(), "a rank killed while writing leaves step-4 uncommitted");
    job
}

#[test]
fn after_a_kill_mid_checkpoint_the_whole_job_resumes_from_the_previous_one_with_identical_losses() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 64);
    // The uninterrupted run.
    let base_out = d.path().join("base");
    let base = job_yaml(d.path(), &data, &Job { save_every: 2, max_steps: Some(10), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &base_out });
    let c = start_coord(&base, &d.path().join("coord-base"), "127.0.0.1:0");
    let (_a, _b) = (start_worker(&c.addr, "a", d.path()), start_worker(&c.addr, "b", d.path()));
    let want = losses_of(&finish(c, Duration::from_secs(120)));
    assert_eq!(want.len(), 10);
    assert!(ckpt_steps(&base_out).contains(&8), "{:?}", ckpt_steps(&base_out));

    // Killed while step-4 was being written; a new coordinator (new state dir, same
    // out_dir) and new worker processes pick the job up from step-2.
    let out = d.path().join("out");
    let job = run_until_killed_mid_checkpoint(d.path(), &data, &out, 10);
    let c = start_coord(&job, &d.path().join("coord-2"), "127.0.0.1:0");
    let (a, b) = (start_worker(&c.addr, "a", d.path()), start_worker(&c.addr, "b", d.path()));
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    for w in [&a, &b] {
        let log = std::fs::read_to_string(&w.log).unwrap();
        assert!(log.contains("from step 2, restored from checkpoint step-2 (written by 2 ranks)"), "{log}");
    }
    let got = losses_of(&s);
    assert_eq!(got, want, "per-step losses of the resumed job equal the uninterrupted run's exactly");
    println!("resumed from step-2 after a kill mid step-4: 10 losses bit-identical to the uninterrupted run");
}

#[test]
fn a_two_rank_checkpoint_resumes_on_three_ranks_with_identical_state_on_each() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 96);
    let out = d.path().join("out");
    run_until_killed_mid_checkpoint(d.path(), &data, &out, 12);
    let job = job_yaml(d.path(), &data, &Job { save_every: 2, max_steps: Some(12), epochs: 1, grad_accum: 1, coord: Some((3, 3)), out: &out });
    let c = start_coord(&job, &d.path().join("coord-3"), "127.0.0.1:0");
    let ws: Vec<Worker> = ["a", "b", "c"].iter().map(|n| start_worker(&c.addr, n, d.path())).collect();
    let s = finish(c, Duration::from_secs(120));
    assert_exactly_once(&s);
    let restored: Vec<Vec<String>> = ws.iter().map(|w| checksums(&w.log, "restored from checkpoint step-2 (written by 2 ranks)")).collect();
    println!("checksums after loading the 2-rank step-2 on 3 ranks: {restored:?}");
    assert!(restored.iter().all(|c| c.len() == 1) && restored.windows(2).all(|w| w[0] == w[1]), "{restored:?}\n{}", logs(d.path()));
    // Steps 0-1 came from the checkpoint's ledger, the rest ran on 3 ranks.
    let per_rank: Vec<u64> = s["steps"].as_array().unwrap().iter().map(|x| x["world"].as_u64().unwrap()).collect();
    assert_eq!(&per_rank[..2], &[2, 2]);
    assert!(per_rank[2..].iter().all(|&n| n == 3), "{per_rank:?}");
    // The new world's checkpoints have 3 shards.
    let last = *ckpt_steps(&out).last().unwrap();
    assert!(last > 2, "the resumed job checkpointed again");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("checkpoints/step-{last}/manifest.json"))).unwrap()).unwrap();
    assert_eq!(m["world_size"], 3);
}

/// The MPT backbone through the whole job (tests/fixtures/mpt/tiny_otter, its own
/// tokenizer: `<|endoftext|>` around samples, `<PAD>` added): 2 CPU workers train it and
/// checkpoint; the whole job killed -9 while a rank writes `step-4` resumes from `step-2`
/// with per-step losses and final weights identical to an uninterrupted run; the last
/// checkpoint exported as an HF directory loads back bit-exactly (trained tensors as
/// checkpointed, frozen ones as in the source model, mmap'd again).
#[test]
fn two_workers_train_checkpoint_resume_and_export_the_tiny_mpt_model() {
    use otter::model::weights::LoadOptions;
    use otter::model::Otter;
    use otter::tensors::TensorFile;
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 64);
    let model = tiny_mpt_model();
    let base_out = d.path().join("base");
    let base = job_yaml_for_model(d.path(), &data, &model, &Job { save_every: 2, max_steps: Some(8), epochs: 1, grad_accum: 1, coord: Some((2, 2)), out: &base_out });
    let c = start_coord(&base, &d.path().join("coord-base"), "127.0.0.1:0");
    let (_a, _b) = (start_worker(&c.addr, "a", d.path()), start_worker(&c.addr, "b", d.path()));
    let s = finish(c, Duration::from_secs(180));
    assert_exactly_once(&s);
    let want = losses_of(&s);
    assert_eq!(want.len(), 8, "{}", s["summary"]);
    assert!(want[7] < want[0], "training lowers the loss: {want:?}");

    let out = d.path().join("out");
    let job = run_until_killed_mid_checkpoint_with(d.path(), &data, &model, &out, 8);
    let c = start_coord(&job, &d.path().join("coord-2"), "127.0.0.1:0");
    let (a, b) = (start_worker(&c.addr, "a", d.path()), start_worker(&c.addr, "b", d.path()));
    let s = finish(c, Duration::from_secs(180));
    assert_exactly_once(&s);
    for w in [&a, &b] {
        let log = std::fs::read_to_string(&w.log).unwrap();
        assert!(log.contains("restored from checkpoint step-2 (written by 2 ranks)"), "{log}");
    }
    assert_eq!(losses_of(&s), want, "per-step losses of the resumed MPT job equal the uninterrupted run's exactly");
    let (fa, fb) = (TensorFile::read(&base_out.join("final_weights.safetensors")).unwrap(), TensorFile::read(&out.join("final_weights.safetensors")).unwrap());
    assert_eq!(fa.tensors.len(), 48, "perceiver, cross-attention and wte; no lm_head");
    for (k, v) in &fa.tensors {
        assert!(v.equal(fb.get(k).unwrap()), "{k} differs after resume");
    }

    let last = *ckpt_steps(&out).last().unwrap();
    let step = out.join(format!("checkpoints/step-{last}"));
    let (hf, fw) = (d.path().join("hf"), d.path().join("trained.safetensors"));
    for (fmt, dest) in [("hf", &hf), ("final-weights", &fw)] {
        let (ok, _, err) = run_otter(&["export", "--ckpt", step.to_str().unwrap(), "--out", dest.to_str().unwrap(), "--format", fmt]);
        assert!(ok, "{err}");
    }
    let exported = Otter::load_dir(&hf, LoadOptions::default()).expect("the exported MPT directory loads strictly");
    let source = Otter::load_dir(&model, LoadOptions::default()).unwrap();
    let trained = TensorFile::read(&fw).unwrap();
    assert_eq!(exported.cfg, source.cfg, "config and tokenizer travel with the export");
    assert_eq!(exported.params.tensors().len(), source.params.tensors().len());
    let mut moved = 0;
    for (name, t) in exported.params.tensors() {
        let want = if t.requires_grad() { trained.get(name).unwrap().shallow_clone() } else { source.params.get(name) };
        assert!(t.equal(&want), "{name} is not what was exported");
        moved += usize::from(t.requires_grad() && !t.equal(&source.params.get(name)));
    }
    assert!(moved > 0, "the export carries trained weights");
    let frozen: u64 = exported.params.tensors().values().filter(|t| !t.requires_grad()).map(|t| (t.numel() * 4) as u64).sum();
    assert_eq!(exported.params.mapped_bytes(), frozen, "frozen weights of the export are mmap'd");
    println!("MPT job: 8 losses identical after a kill mid-checkpoint; step-{last} exported as HF and loaded back bit-exactly ({moved} trained tensors moved)");
}

/// A copy of the tiny model in `dst` (config, weights, tokenizer).
fn copy_model(dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_model().join(f), dst.join(f)).unwrap();
    }
    dst.to_path_buf()
}

/// Adds `delta` to every value of f32 tensor `name` of `file`, in place: same names,
/// shapes and dtypes, other bytes (a copy from another revision, a corrupted cache).
fn perturb_tensor(file: &Path, name: &str, delta: f32) {
    let mut b = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let (lo, hi) = (header[name]["data_offsets"][0].as_u64().unwrap() as usize, header[name]["data_offsets"][1].as_u64().unwrap() as usize);
    for c in b[8 + n + lo..8 + n + hi].chunks_mut(4) {
        let v = f32::from_le_bytes(c.try_into().unwrap()) + delta;
        c.copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(file, b).unwrap();
}

const FROZEN: &str = "vision_encoder.vision_model.embeddings.patch_embedding.weight";

/// Runs a 2-node job (min 1, max 2) where node b uses `b_model` (its own copy of the model);
/// returns the final status, and b's agent exit status and output.
fn job_with_node_b_on(d: &Path, name: &str, b_model: &Path) -> (serde_json::Value, std::process::ExitStatus, String) {
    let dir = d.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let data = synth(&dir, 48);
    let out = dir.join("out");
    let job = job_yaml(&dir, &data, &Job { save_every: 1000, max_steps: Some(6), epochs: 1, grad_accum: 1, coord: Some((1, 2)), out: &out });
    let c = start_coord(&job, &dir.join("coord"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", &dir);
    let log = dir.join("worker-b.log");
    let mut b = Command::new(WORKER)
        .args(["join", "--coord", &c.addr, "--node-id", "b", "--cpu-ranks", "1", "--advertise-host", "127.0.0.1", "--model-dir", b_model.to_str().unwrap()])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let s = finish(c, Duration::from_secs(120));
    let t = Instant::now();
    let code = loop {
        if let Some(code) = b.try_wait().unwrap() {
            break code;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = b.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = std::fs::read_to_string(&log).unwrap() + &std::fs::read_to_string(log.with_extension("err")).unwrap();
    (s, code, said)
}

/// Issue 42: a node whose copy of the frozen model (one tensor), its config.json or its
/// tokenizer differs is refused by name with what differs; nothing it computed is
/// committed; the other node trains on. Identical copies form the job of two as before.
#[test]
fn a_node_whose_model_differs_is_refused_by_name_and_the_other_trains_on() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    // Negative control: an identical copy at another path joins and trains.
    let same = copy_model(&d.path().join("same"));
    let (s, code, said) = job_with_node_b_on(d.path(), "control", &same);
    assert!(code.success(), "b: {said}");
    assert!(s["steps"].as_array().unwrap().iter().all(|x| x["world"] == 2), "both trained every step: {}", s["steps"]);
    assert_exactly_once(&s);

    let weights = copy_model(&d.path().join("weights"));
    perturb_tensor(&weights.join("model.safetensors"), FROZEN, 1e-2);
    let config = copy_model(&d.path().join("config"));
    std::fs::write(config.join("config.json"), std::fs::read_to_string(config.join("config.json")).unwrap() + "\n").unwrap();
    let tokenizer = copy_model(&d.path().join("tokenizer"));
    std::fs::write(tokenizer.join("tokenizer.json"), std::fs::read_to_string(tokenizer.join("tokenizer.json")).unwrap() + "\n").unwrap();
    let cases = [
        (&weights, format!("weight file model.safetensors: tensor {FROZEN} differs")),
        (&config, "config.json differs".to_string()),
        (&tokenizer, "the tokenizer file differs".to_string()),
    ];
    for (model, what) in cases {
        let name = model.file_name().unwrap().to_str().unwrap();
        let (s, code, said) = job_with_node_b_on(d.path(), &format!("job-{name}"), model);
        assert!(!code.success(), "{name}: b must be refused: {said}");
        assert!(said.contains("refused") && said.contains(&what), "{name}: b's agent names what differs ({what}): {said}");
        let refused = s["events"].as_array().unwrap().iter().find(|e| e["kind"] == "NodeRefused").unwrap_or_else(|| panic!("{name}: no refusal event: {}", s["events"]));
        assert_eq!(refused["node"], "b", "{name}");
        assert!(refused["reason"].as_str().unwrap().contains(&what), "{name}: {refused}");
        let steps = s["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 6, "{name}: a trained the job to its end");
        assert!(steps.iter().all(|x| x["world"] == 1), "{name}: nothing b computed was committed: {}", s["steps"]);
        assert_exactly_once(&s);
    }
}

/// Issue 42: resuming against a model directory that changed since the checkpoint is
/// refused, naming what changed, for one process (`otter train --resume`) and for a whole
/// job restarted from its checkpoint; the operator's `--accept-model-change` lets it go on.
#[test]
fn a_resume_against_a_changed_model_is_refused_naming_what_changed() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 48);
    let model = copy_model(&d.path().join("model"));
    let single_out = d.path().join("single");
    let single = job_yaml_for_model(d.path(), &data, &model, &Job { save_every: 2, max_steps: Some(6), epochs: 1, grad_accum: 1, coord: None, out: &single_out });
    let (ok, _, err) = run_otter(&["train", "--config", single.to_str().unwrap(), "--stop-after", "2"]);
    assert!(ok, "{err}");
    perturb_tensor(&model.join("model.safetensors"), FROZEN, 1e-2);
    let (ok, _, err) = run_otter(&["train", "--config", single.to_str().unwrap(), "--resume"]);
    assert!(!ok, "resumed on another model");
    assert!(err.contains(&format!("tensor {FROZEN} differs")) && err.contains("--accept-model-change weights"), "{err}");
    let (ok, out, err) = run_otter(&["train", "--config", single.to_str().unwrap(), "--resume", "--accept-model-change", "weights"]);
    assert!(ok, "{err}");
    assert!(out.contains("weights changed since the checkpoint, as allowed"), "{out}");

    // A whole job: trained to a checkpoint, then restarted on a fresh coordinator (it takes
    // the job over from the manifest) with the model changed under it.
    perturb_tensor(&model.join("model.safetensors"), FROZEN, -1e-2);
    let out = d.path().join("dist");
    let job = job_yaml_for_model(d.path(), &data, &model, &Job { save_every: 2, max_steps: Some(6), epochs: 1, grad_accum: 1, coord: Some((1, 1)), out: &out });
    edit_yaml(&job, &[("max_steps: 6", "max_steps: 4")]);
    let c = start_coord(&job, &d.path().join("coord1"), "127.0.0.1:0");
    let _a = start_worker(&c.addr, "a", d.path());
    let s = finish(c, Duration::from_secs(120));
    assert_eq!(s["summary"]["phase"], "Finished");
    assert!(!ckpt_steps(&out).is_empty(), "a committed checkpoint");
    perturb_tensor(&model.join("model.safetensors"), FROZEN, 1e-2);
    edit_yaml(&job, &[("max_steps: 4", "max_steps: 6"), ("join_timeout: 60s", "join_timeout: 5s")]);
    let c = start_coord(&job, &d.path().join("coord2"), "127.0.0.1:0");
    let mut a = start_worker(&c.addr, "a2", d.path());
    let t = Instant::now();
    let code = loop {
        if let Some(code) = a.child.0.try_wait().unwrap() {
            break code;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the node was not refused\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!code.success());
    let said = std::fs::read_to_string(a.log.with_extension("err")).unwrap();
    assert!(said.contains("model-mismatch") || said.contains(&format!("tensor {FROZEN} differs")), "{said}");
    drop(c);
    // With the operator's word, the restarted job goes on.
    let c = start_coord_with(&job, &d.path().join("coord3"), "127.0.0.1:0", &["--accept-model-change", "weights"]);
    let _a = start_worker(&c.addr, "a3", d.path());
    let (ok, s, log) = outcome(c, Duration::from_secs(120));
    assert!(ok, "{log}\n{}", logs(d.path()));
    assert_eq!(s["summary"]["steps_committed"], 6);
    assert!(s["events"].as_array().unwrap().iter().any(|e| e["kind"] == "ModelChangeAccepted"), "{}", s["events"]);
}
