//! A small live job for tests that look at it from outside (Prometheus, a browser): a
//! synthetic dataset, a coordinator with its HTTP side on a known port, worker nodes with
//! their metrics ports. Every process is killed when its handle drops.

use super::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const WORKER: &str = env!("CARGO_BIN_EXE_otter-worker");
/// The join token of [`start_live_job`]'s jobs.
pub const TOKEN: &str = "live-job-token";

pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago, and its neighbour (a node's first rank).
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// GET over HTTP/1.0; the body of a 200 response.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).filter(|c| *c == "200").map(|_| body.to_string())
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}

/// `otter-coord start` on `config`, its state in `state`, its stderr in `log`; returns the
/// process (killed on drop) and the gRPC address it announced on its first stdout line.
pub fn spawn_coord(config: &Path, state: &Path, listen: &str, http_listen: &str, token: &str, log: &Path) -> (Killed, String) {
    spawn_coord_with(config, state, listen, http_listen, token, log, &[])
}

/// [`spawn_coord`] with more `otter-coord start` arguments.
pub fn spawn_coord_with(config: &Path, state: &Path, listen: &str, http_listen: &str, token: &str, log: &Path, extra: &[&str]) -> (Killed, String) {
    let mut child = Command::new(coord_bin())
        .args(["start", "--config", config.to_str().unwrap(), "--listen", listen, "--http-listen", http_listen])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(extra)
        .env("OTTER_JOIN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = first.split_whitespace().nth(3).unwrap_or_else(|| panic!("coordinator said {first:?}")).to_string();
    (Killed(child), addr)
}

pub struct LiveJob {
    pub coord: Killed,
    /// The coordinator's gRPC address (`otter-coord status --coord`).
    pub addr: String,
    /// The coordinator's HTTP address (`/metrics`, `/status`).
    pub http: String,
    pub workers: Vec<Killed>,
    /// Each node's metrics address.
    pub node_metrics: Vec<String>,
}

/// Starts a 2-node CPU job of `max_steps` steps (checkpoint every `save_every`) in `dir`.
pub fn start_live_job(dir: &Path, max_steps: u64, save_every: u64) -> LiveJob {
    start_live_job_with(dir, max_steps, save_every, "")
}

/// [`start_live_job`] with more lines for its `train:` section (each `  key: value\n`).
pub fn start_live_job_with(dir: &Path, max_steps: u64, save_every: u64, train_extra: &str) -> LiveJob {
    start_live_job_of(dir, &["a", "b"], 2, max_steps, save_every, train_extra)
}

/// A CPU job of one rank per node of `nodes` (`workers` in that order), which goes on
/// with `min_nodes` of them.
pub fn start_live_job_of(dir: &Path, nodes: &[&str], min_nodes: usize, max_steps: u64, save_every: u64, train_extra: &str) -> LiveJob {
    let data = dir.join("synthetic");
    let (ok, _, err) = run_otter(&["data", "synth", "--out", data.to_str().unwrap(), "--samples", "96", "--image-px", "40"]);
    assert!(ok, "{err}");
    let m = tiny_model();
    let yaml = format!(
        "model:\n  dir: {m}\ndata:\n  tokenizer: {m}/tokenizer.json\n  image_size: 32\n  max_seq_len: 256\n  batch_size: 2\n  shard_batches: 4\n  seed: 0\n  workers: 1\n  prefetch: 2\n  datasets:\n    - name: SYN\n      group: IMAGE_TEXT_IN_CONTEXT\n      instructions: {d}/SYN_instructions.json\n      images: {d}/SYN.json\n      train_config: {d}/SYN_train.json\n      weight: 1.0\ntrain:\n  epochs: 10\n  lr: 1.0e-3\n  warmup_ratio: 0.1\n  clip: 1.0\n  seed: 0\n  out_dir: {o}\n  save_every: {save_every}\n  max_steps: {max_steps}\n{train_extra}coord:\n  min_nodes: {min_nodes}\n  max_nodes: {max_nodes}\n  last_call: 1s\n  heartbeat_interval: 500ms\n",
        m = m.display(),
        d = data.display(),
        o = dir.join("out").display(),
        max_nodes = nodes.len()
    );
    let job = dir.join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    let http_port = free_port_pair();
    let (coord, addr) = spawn_coord(&job, &dir.join("coord"), "127.0.0.1:0", &format!("127.0.0.1:{http_port}"), TOKEN, &dir.join("coord.log"));
    let mut workers = Vec::new();
    let mut node_metrics = Vec::new();
    for &node in nodes {
        let port = free_port_pair();
        workers.push(Killed(
            Command::new(WORKER)
                .args(["join", "--coord", &addr, "--node-id", node, "--cpu-ranks", "1", "--advertise-host", "127.0.0.1", "--metrics-port", &port.to_string()])
                .env("OTTER_JOIN_TOKEN", TOKEN)
                .stdout(std::fs::File::create(dir.join(format!("{node}.log"))).unwrap())
                .stderr(std::fs::File::create(dir.join(format!("{node}.err"))).unwrap())
                .spawn()
                .unwrap(),
        ));
        node_metrics.push(format!("127.0.0.1:{port}"));
    }
    LiveJob { coord, addr, http: format!("127.0.0.1:{http_port}"), workers, node_metrics }
}

/// Metric names the Grafana dashboard's queries use (`otter_*`, as stored: histogram
/// series with their `_bucket`/`_sum`/`_count` suffixes).
pub fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster/grafana/otter-training.json");
    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    match x {
                        serde_json::Value::String(s) if k == "expr" || k == "query" => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&d, &mut exprs);
    let mut names = std::collections::BTreeSet::new();
    for e in exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(p) = e[i..].find("otter_") {
            let start = i + p;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_' || b[end].is_ascii_digit()) {
                end += 1;
            }
            names.insert(e[start..end].to_string());
            i = end;
        }
    }
    names
}
