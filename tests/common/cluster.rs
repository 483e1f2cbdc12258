//! A distributed job on loopback for end-to-end tests: a synthetic dataset, a job YAML,
//! `otter-coord start` and `otter-worker join` processes (killed when their handles drop),
//! the coordinator's status, and checks every test makes (exactly once, losses).

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token";

/// One job at a time: each runs several training processes, and two at once on a 2-core
/// CI machine only measures contention.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
pub const WORKER: &str = env!("CARGO_BIN_EXE_otter-worker");

/// A synthetic dataset of `samples` queries (once per test binary size).
pub fn synth(dir: &Path, samples: usize) -> PathBuf {
    let out = dir.join("synthetic");
    let (ok, _, err) = run_otter(&["data", "synth", "--out", out.to_str().unwrap(), "--samples", &samples.to_string(), "--image-px", "40"]);
    assert!(ok, "{err}");
    out
}

pub struct Job<'a> {
    pub save_every: u64,
    pub max_steps: Option<u64>,
    pub epochs: u64,
    pub grad_accum: u64,
    pub coord: Option<(usize, usize)>,
    pub out: &'a Path,
}

pub fn job_yaml(dir: &Path, data: &Path, j: &Job) -> PathBuf {
    job_yaml_for_model(dir, data, &tiny_model(), j)
}

/// [`job_yaml`] for the model directory `m` (its tokenizer too).
pub fn job_yaml_for_model(dir: &Path, data: &Path, m: &Path, j: &Job) -> PathBuf {
    let mut y = format!(
        "model:\n  dir: {m}\ndata:\n  tokenizer: {m}/tokenizer.json\n  image_size: 32\n  max_seq_len: 256\n  batch_size: 2\n  shard_batches: 4\n  seed: 0\n  workers: 1\n  prefetch: 2\n  datasets:\n    - name: SYN\n      group: IMAGE_TEXT_IN_CONTEXT\n      instructions: {d}/SYN_instructions.json\n      images: {d}/SYN.json\n      train_config: {d}/SYN_train.json\n      weight: 1.0\ntrain:\n  epochs: {e}\n  lr: 1.0e-3\n  warmup_ratio: 0.1\n  clip: 1.0\n  grad_accum: {k}\n  seed: 0\n  out_dir: {o}\n  save_every: {se}\n",
        m = m.display(),
        d = data.display(),
        e = j.epochs,
        k = j.grad_accum,
        o = j.out.display(),
        se = j.save_every,
    );
    if let Some(s) = j.max_steps {
        y += &format!("  max_steps: {s}\n");
    }
    if let Some((min, max)) = j.coord {
        y += &format!("coord:\n  min_nodes: {min}\n  max_nodes: {max}\n  join_timeout: 60s\n  last_call: 1s\n  heartbeat_interval: 500ms\n  heartbeat_timeout: 10s\ncomm:\n  timeout: 60s\n");
    }
    let p = dir.join(format!("job-{}.yaml", j.out.file_name().unwrap().to_string_lossy()));
    std::fs::write(&p, y).unwrap();
    p
}

/// A running coordinator; killed on drop.
pub struct Coord {
    pub child: job::Killed,
    pub addr: String,
    pub state: PathBuf,
}

pub fn start_coord(config: &Path, state: &Path, listen: &str) -> Coord {
    start_coord_with(config, state, listen, &[])
}

/// [`start_coord`] with more `otter-coord start` arguments.
pub fn start_coord_with(config: &Path, state: &Path, listen: &str, extra: &[&str]) -> Coord {
    let (child, addr) = job::spawn_coord_with(config, state, listen, "127.0.0.1:0", TOKEN, &state.with_extension("coord.log"), extra);
    Coord { child, addr, state: state.to_path_buf() }
}

/// A worker agent whose output goes to `log`; killed on drop.
pub struct Worker {
    pub child: job::Killed,
    pub log: PathBuf,
}

pub fn start_worker(coord: &str, node: &str, dir: &Path) -> Worker {
    start_worker_env(coord, node, dir, &[])
}

pub fn start_worker_env(coord: &str, node: &str, dir: &Path, env: &[(&str, &str)]) -> Worker {
    // A node started again (same id) gets logs of its own: worker-b.log, worker-b.1.log, ...
    let log = (0..)
        .map(|i| if i == 0 { dir.join(format!("worker-{node}.log")) } else { dir.join(format!("worker-{node}.{i}.log")) })
        .find(|p| !p.exists())
        .unwrap();
    let child = Command::new(WORKER)
        .args(["join", "--coord", coord, "--node-id", node, "--cpu-ranks", "1", "--advertise-host", "127.0.0.1"])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    Worker { child: job::Killed(child), log }
}

pub fn status(addr: &str) -> Option<serde_json::Value> {
    let out = Command::new(coord_bin()).args(["status", "--coord", addr]).env("OTTER_JOIN_TOKEN", TOKEN).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls the coordinator until `pred(status)` holds.
pub fn wait_for(addr: &str, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(s) = status(addr) {
            if pred(&s) {
                return s;
            }
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn steps_committed(s: &serde_json::Value) -> u64 {
    s["summary"]["steps_committed"].as_u64().unwrap_or(0)
}

/// Waits for the coordinator to exit and returns its final status (state_dir/status.json).
pub fn finish(mut c: Coord, limit: Duration) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(code) = c.child.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(c.state.with_extension("coord.log")).unwrap_or_default();
            assert!(code.success(), "coordinator exited with {code}: {}\n{}", &log[log.len().saturating_sub(3000)..], logs(c.state.parent().unwrap()));
            break;
        }
        if t.elapsed() > limit {
            panic!("job did not finish in {limit:?}\n{}", logs(c.state.parent().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    serde_json::from_slice(&std::fs::read(c.state.join("status.json")).unwrap()).unwrap()
}

/// The tails of every log in `dir`, for failure messages.
pub fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log" || x == "err") {
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            // Backtraces bury the message: keep lines up to the first backtrace frame.
            let lines: Vec<&str> = t.lines().filter(|l| !l.starts_with("step ")).take_while(|l| !l.trim_start().starts_with("0: ")).collect();
            out += &format!("== {}\n{}\n", p.display(), lines[lines.len().saturating_sub(15)..].join("\n"));
        }
    }
    out
}

/// Every log in `dir`, whole (for assertions on what a process said; `logs` keeps only
/// the tails, for failure messages).
pub fn full_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log" || x == "err") {
            out += &format!("== {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

pub fn assert_exactly_once(s: &serde_json::Value) {
    assert!(s["exactly_once"].get("Ok").is_some(), "exactly-once check: {}", s["exactly_once"]);
    if s["summary"]["finish"].get("DataExhausted").is_some() {
        assert_eq!(s["summary"]["batches_pending"], s["summary"]["dropped_tail"], "only the documented tail is left: {}", s["summary"]);
    }
}

pub fn losses_of(s: &serde_json::Value) -> Vec<f64> {
    s["steps"].as_array().unwrap().iter().map(|x| x["loss"].as_f64().unwrap()).collect()
}

pub fn checksums(log: &Path, marker: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| l.split("checksum ").nth(1).map(str::to_string))
        .collect()
}


/// Replaces text in a job YAML (each `from` must occur).
pub fn edit_yaml(path: &Path, edits: &[(&str, &str)]) {
    let mut y = std::fs::read_to_string(path).unwrap();
    for (from, to) in edits {
        assert!(y.contains(from), "{} has no {from:?}:\n{y}", path.display());
        y = y.replace(from, to);
    }
    std::fs::write(path, y).unwrap();
}

/// Committed checkpoint steps of a job's out_dir.
pub fn ckpt_steps(out: &Path) -> Vec<u64> {
    otter::ckpt::committed_steps(&out.join("checkpoints"))
}

/// `pid` and all its descendants (from /proc), parents first.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|x| x.parse().ok()) else { continue };
        children.entry(ppid).or_default().push(p);
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(children.get(&out[i]).cloned().unwrap_or_default());
        i += 1;
    }
    out
}

/// Sends `sig` to a worker's agent and its rank processes.
pub fn signal_worker(w: &Worker, sig: libc::c_int) -> Vec<u32> {
    let tree = process_tree(w.child.0.id());
    for &p in &tree {
        // SAFETY: kill(2) on pids we just read; a pid that exited meanwhile is harmless.
        unsafe {
            libc::kill(p as libc::pid_t, sig);
        }
    }
    tree
}

/// Waits for the coordinator to exit; returns whether it succeeded, its final status, and
/// the tail of its log.
pub fn outcome(mut c: Coord, limit: Duration) -> (bool, serde_json::Value, String) {
    let t = Instant::now();
    let code = loop {
        if let Some(code) = c.child.0.try_wait().unwrap() {
            break code;
        }
        if t.elapsed() > limit {
            panic!("job did not end in {limit:?}\n{}", logs(c.state.parent().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(c.state.with_extension("coord.log")).unwrap_or_default();
    let status = std::fs::read(c.state.join("status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    (code.success(), status, log)
}

/// The newest event of `kind` in a status, if any.
pub fn event<'a>(s: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    s["events"].as_array()?.iter().find(|e| e["kind"] == kind)
}
