//! A real Prometheus server (Debian's `prometheus`, installed by scripts/setup.sh) scrapes
//! a running tiny job on loopback: the coordinator's `/metrics` and each worker node's
//! merged `/metrics`. Its HTTP API must then answer queries for the job's loss and
//! step-time series, and hold every metric the Grafana dashboard's panels query.

use crate::common;

use common::job::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn api(prom: &str, path: &str) -> serde_json::Value {
    let body = http_get(prom, path).unwrap_or_else(|| panic!("prometheus {path} failed"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{body}");
    v["data"].clone()
}

/// An instant query: the result vector.
fn query(prom: &str, q: &str) -> Vec<serde_json::Value> {
    api(prom, &format!("/api/v1/query?query={}", urlencode(q)))["result"].as_array().cloned().unwrap_or_default()
}

fn value(s: &serde_json::Value) -> f64 {
    s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn a_real_prometheus_scrapes_a_running_job_and_answers_loss_and_step_time_queries() {
    let prometheus = which("prometheus").expect("the `prometheus` binary (Debian package `prometheus`; scripts/setup.sh installs it)");
    let d = tempfile::tempdir().unwrap();
    // 200 steps (of the 240 its data allows): long enough for several scrapes of each rank.
    let mut job = start_live_job(d.path(), 200, 20);
    // Not a port a worker is about to bind for its metrics (node page p, ranks p+1...).
    let taken: Vec<u16> = job.node_metrics.iter().filter_map(|m| m.rsplit_once(':')?.1.parse().ok()).collect();
    let port = std::iter::repeat_with(free_port_pair).find(|p| taken.iter().all(|t| p.abs_diff(*t) > 4)).unwrap();
    let prom = format!("127.0.0.1:{port}");
    let cfg = d.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 450ms\nscrape_configs:\n  - job_name: otter-coord\n    static_configs:\n      - targets: ['{}']\n  - job_name: otter-worker\n    static_configs:\n      - targets: ['{}']\n",
            job.http,
            job.node_metrics.join("', '")
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
    // Ready, and really Prometheus (not some other server on that port).
    while !http_get(&prom, "/-/ready").is_some_and(|b| b.contains("Prometheus")) {
        assert!(t.elapsed() < Duration::from_secs(30), "prometheus did not become ready: {}", std::fs::read_to_string(d.path().join("prometheus.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A node page merges its rank's series under node/rank labels.
    let t = Instant::now();
    let node_page = loop {
        if let Some(p) = http_get(&job.node_metrics[0], "/metrics").filter(|p| p.contains("otter_loss{")) {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "node a never served its rank's metrics");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(node_page.contains(r#"otter_loss{node="a",rank="#), "{node_page}");

    // Let Prometheus scrape while training runs, then ask it. Step-time quantiles per rank
    // need two scrapes of each rank's histogram.
    let p50_query = "histogram_quantile(0.5, sum by (le, rank) (rate(otter_step_duration_seconds_bucket[1m])))";
    let t = Instant::now();
    let (loss, steps, p50) = loop {
        // `last_over_time`: a tiny job on a fast machine may already be over (its series
        // marked stale) when Prometheus answers; what it scraped still counts.
        let loss = query(&prom, "last_over_time(otter_loss[5m])");
        let steps = query(&prom, "last_over_time(otter_step_duration_seconds_count[5m])");
        let p50 = query(&prom, p50_query);
        if loss.len() == 2 && steps.len() == 2 && p50.len() == 2 && p50.iter().all(|s| value(s).is_finite()) {
            break (loss, steps, p50);
        }
        assert!(t.elapsed() < Duration::from_secs(120), "prometheus has no otter series: loss {loss:?} steps {steps:?} p50 {p50:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let nodes: std::collections::BTreeSet<&str> = loss.iter().filter_map(|s| s["metric"]["node"].as_str()).collect();
    assert_eq!(nodes, ["a", "b"].into_iter().collect(), "{loss:?}");
    assert!(loss.iter().all(|s| value(s).is_finite() && value(s) > 0.0), "{loss:?}");
    let committed = value(&query(&prom, "max_over_time(otter_committed_step[5m])")[0]);
    assert!(committed >= 2.0, "the coordinator's committed-step series: {committed}");
    println!(
        "prometheus scraped the job: otter_loss for nodes {nodes:?}, step counts {:?}, median step time per rank {:?} s, {committed} steps committed",
        steps.iter().map(value).collect::<Vec<_>>(),
        p50.iter().map(value).collect::<Vec<_>>()
    );

    // After the job (checkpoints included): every metric a dashboard panel queries was
    // exported by the job and is in Prometheus.
    let t = Instant::now();
    while job.coord.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(300), "the job did not finish");
        std::thread::sleep(Duration::from_millis(300));
    }
    let stored: std::collections::BTreeSet<String> =
        api(&prom, "/api/v1/label/__name__/values")
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 20, "the dashboard queries {} otter metrics: {wanted:?}", wanted.len());
    let missing: Vec<&String> = wanted.iter().filter(|m| !stored.contains(*m)).collect();
    assert!(missing.is_empty(), "dashboard metrics the running job never exported: {missing:?}");
    println!("all {} metrics the Grafana dashboard queries were scraped from the job", wanted.len());
}
