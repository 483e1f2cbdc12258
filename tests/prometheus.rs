//! A real Prometheus server (Debian's `prometheus`, installed by scripts/setup.sh) scrapes
//! a running tiny job on loopback: the coordinator's `/metrics` and each worker node's
//! merged `/metrics`. Then its HTTP API must answer queries for the job's loss and
//! step-time series. Also checks the coordinator's `/status` page while the job runs.
#![cfg(feature = "torch")]

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const COORD: &str = env!("CARGO_BIN_EXE_otter-coord");
const WORKER: &str = env!("CARGO_BIN_EXE_otter-worker");
const TOKEN: &str = "prom-token";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (and its neighbour, for a node's first rank).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// GET over HTTP/1.0; returns the body of a 200 response.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).filter(|c| *c == "200").map(|_| body.to_string())
}

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus's HTTP API: the result vector.
fn query(prom: &str, q: &str) -> Vec<serde_json::Value> {
    let body = http_get(prom, &format!("/api/v1/query?query={}", urlencode(q))).unwrap_or_else(|| panic!("query {q} failed"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn job_yaml(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let m = tiny_model();
    let y = format!(
        "model:\n  dir: {m}\ndata:\n  tokenizer: {m}/tokenizer.json\n  image_size: 32\n  max_seq_len: 256\n  batch_size: 2\n  shard_batches: 4\n  seed: 0\n  workers: 1\n  prefetch: 2\n  datasets:\n    - name: SYN\n      group: IMAGE_TEXT_IN_CONTEXT\n      instructions: {d}/SYN_instructions.json\n      images: {d}/SYN.json\n      train_config: {d}/SYN_train.json\n      weight: 1.0\ntrain:\n  epochs: 2\n  lr: 1.0e-3\n  warmup_ratio: 0.1\n  clip: 1.0\n  seed: 0\n  out_dir: {o}\n  save_every: 20\n  max_steps: 160\ncoord:\n  min_nodes: 2\n  max_nodes: 2\n  last_call: 1s\n  heartbeat_interval: 500ms\n",
        m = m.display(),
        d = data.display(),
        o = out.display()
    );
    let p = dir.join("job.yaml");
    std::fs::write(&p, y).unwrap();
    p
}

#[test]
fn a_real_prometheus_scrapes_a_running_job_and_answers_loss_and_step_time_queries() {
    let prometheus = which("prometheus").expect("the `prometheus` binary (Debian package `prometheus`; scripts/setup.sh installs it)");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("synthetic");
    let (ok, _, err) = run_otter(&["data", "synth", "--out", data.to_str().unwrap(), "--samples", "96", "--image-px", "40"]);
    assert!(ok, "{err}");
    let job = job_yaml(d.path(), &data, &d.path().join("out"));

    // Ports: coordinator HTTP, two worker nodes (node page on P, rank 0 on P+1), Prometheus.
    let (coord_http, wa, wb, prom_port) = (free_port_pair(), free_port_pair(), free_port_pair(), free_port_pair());
    let prom = format!("127.0.0.1:{prom_port}");
    let cfg = d.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: otter-coord\n    static_configs:\n      - targets: ['127.0.0.1:{coord_http}']\n  - job_name: otter-worker\n    static_configs:\n      - targets: ['127.0.0.1:{wa}', '127.0.0.1:{wb}']\n"
        ),
    )
    .unwrap();
    let _prom = Killed(
        Command::new(prometheus)
            .args([
                &format!("--config.file={}", cfg.display()),
                &format!("--storage.tsdb.path={}", d.path().join("tsdb").display()),
                &format!("--web.listen-address={prom}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while http_get(&prom, "/-/ready").is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "prometheus did not become ready: {}", std::fs::read_to_string(d.path().join("prometheus.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut coord = Command::new(COORD)
        .args(["start", "--config", job.to_str().unwrap(), "--listen", "127.0.0.1:0", "--http-listen", &format!("127.0.0.1:{coord_http}")])
        .args(["--state-dir", d.path().join("coord").to_str().unwrap()])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.path().join("coord.log")).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = BufReader::new(coord.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = first.split_whitespace().nth(3).unwrap().to_string();
    let coord = Killed(coord);
    let worker = |node: &str, port: u16| {
        Killed(
            Command::new(WORKER)
                .args(["join", "--coord", &addr, "--node-id", node, "--cpu-ranks", "1", "--advertise-host", "127.0.0.1", "--metrics-port", &port.to_string()])
                .env("OTTER_JOIN_TOKEN", TOKEN)
                .stdout(std::fs::File::create(d.path().join(format!("{node}.log"))).unwrap())
                .stderr(std::fs::File::create(d.path().join(format!("{node}.err"))).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let _a = worker("a", wa);
    let _b = worker("b", wb);

    // While it runs: the status page, and the node pages merging their rank's series.
    let coord_addr = format!("127.0.0.1:{coord_http}");
    let t = Instant::now();
    let page = loop {
        if let Some(p) = http_get(&coord_addr, "/status").filter(|p| p.contains("<polyline")) {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "no status page with a loss curve");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(page.contains("Otter job") && page.contains("world size <b>2</b>"), "{page}");
    let node_page = http_get(&format!("127.0.0.1:{wa}"), "/metrics").expect("node a serves /metrics");
    assert!(node_page.contains(r#"otter_loss{node="a",rank="#), "{node_page}");

    // Let Prometheus scrape a few times while training runs, then ask it.
    let t = Instant::now();
    // Step-time quantiles per rank need two scrapes of each rank's histogram.
    let p50_query = "histogram_quantile(0.5, sum by (le, rank) (rate(otter_step_duration_seconds_bucket[1m])))";
    let (loss, steps, p50) = loop {
        let loss = query(&prom, "otter_loss");
        let steps = query(&prom, "otter_step_duration_seconds_count");
        let p50 = query(&prom, p50_query);
        let finite = |v: &serde_json::Value| v["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()).is_some_and(f64::is_finite);
        if loss.len() == 2 && steps.len() == 2 && p50.len() == 2 && p50.iter().all(finite) {
            break (loss, steps, p50);
        }
        assert!(t.elapsed() < Duration::from_secs(120), "prometheus has no otter series: loss {loss:?} steps {steps:?} p50 {p50:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let nodes: std::collections::BTreeSet<&str> = loss.iter().filter_map(|s| s["metric"]["node"].as_str()).collect();
    assert_eq!(nodes, ["a", "b"].into_iter().collect(), "{loss:?}");
    for s in &loss {
        let v: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v.is_finite() && v > 0.0, "loss {v}");
    }
    let committed = query(&prom, "max_over_time(otter_committed_step[5m])");
    let committed: f64 = committed[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(committed >= 2.0, "the coordinator's committed-step series: {committed}");
    println!(
        "prometheus scraped the job: otter_loss for nodes {nodes:?}, step counts {:?}, median step time per rank {:?} s, {committed} steps committed",
        steps.iter().map(|s| s["value"][1].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>(),
        p50.iter().map(|s| s["value"][1].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>()
    );
    drop(coord);
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}
