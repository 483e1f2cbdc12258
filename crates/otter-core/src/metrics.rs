//! Prometheus metrics: the stable names of `docs/metrics.md`, one registry per process,
//! and the small HTTP server that exposes them (`/metrics`, plus whatever pages the
//! caller adds, e.g. the coordinator's `/status`).
//!
//! * [`RankMetrics`]: one training process (labels `node`, `rank`; `rank` is the global
//!   rank of the current generation, so the series of a rank that changed are dropped at
//!   each new generation).
//! * [`CoordMetrics`]: the coordinator's view of the job (membership, progress, recovery,
//!   checkpoints, per-rank compute time and stragglers).
//! * [`merge_exposition`]: a node agent serves its ranks' metrics as one page (one scrape
//!   target per node, as Kubernetes pod annotations want).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::time::Duration;

/// Step-time buckets (seconds): tiny CPU jobs to 7B steps with accumulation.
pub const STEP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone())).expect("metric names are unique and valid");
    m
}

/// The Prometheus text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf).expect("text encoding cannot fail");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

/// `otter_goodput_ratio`, one definition at two scopes (docs/metrics.md, "Goodput"):
/// `scope="job"` from the coordinator, `scope="rank"` from each training process.
pub const GOODPUT_HELP: &str = "Goodput: time spent in optimizer steps that were committed / wall time (scope=job: the coordinator's, since the job's first rendezvous; scope=rank: one rank's, since its process started).";

/// One training process's metrics.
pub struct RankMetrics {
    pub registry: Registry,
    node: String,
    rank: String,
    step_duration: HistogramVec,
    allreduce_duration: HistogramVec,
    allreduce_exposed: HistogramVec,
    tokens_per_second: GaugeVec,
    tokens: IntCounterVec,
    samples: IntCounterVec,
    loss: GaugeVec,
    lr: GaugeVec,
    grad_norm: GaugeVec,
    allreduce_busbw: GaugeVec,
    data_wait: prometheus::CounterVec,
    mfu: GaugeVec,
    optimizer_state_bytes: IntGaugeVec,
    bad_samples: IntCounterVec,
    ckpt_blocking: GaugeVec,
    ckpt_duration: GaugeVec,
    goodput: GaugeVec,
    step: IntGaugeVec,
    generation: IntGaugeVec,
    cpu_threads: IntGaugeVec,
    rejected_connections: IntCounterVec,
    heap: IntGaugeVec,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepSample {
    pub step: u64,
    pub seconds: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub samples: u64,
    pub data_wait: f64,
    pub allreduce_seconds: f64,
    /// The part of the step that waited on the all-reduce.
    pub allreduce_exposed_seconds: f64,
    /// Bytes all-reduced (for the nccl-tests bus bandwidth).
    pub allreduce_bytes: u64,
    pub world: usize,
    /// Model FLOPs utilisation, where the accelerator's peak is known.
    pub mfu: Option<f64>,
    /// Bytes of optimizer state (AdamW's moments) this rank holds.
    pub optimizer_state_bytes: u64,
}

impl RankMetrics {
    pub fn new(node: &str) -> Self {
        let r = Registry::new();
        let l = &["node", "rank"];
        let g = |name: &str, help: &str| reg(&r, GaugeVec::new(Opts::new(name, help), l).expect("valid"));
        let c = |name: &str, help: &str| reg(&r, IntCounterVec::new(Opts::new(name, help), l).expect("valid"));
        let h = |name: &str, help: &str| reg(&r, HistogramVec::new(HistogramOpts::new(name, help).buckets(STEP_BUCKETS.to_vec()), l).expect("valid"));
        Self {
            step_duration: h("otter_step_duration_seconds", "Wall time of one optimizer step (data wait, forward, backward, all-reduce, update)."),
            allreduce_duration: h("otter_allreduce_duration_seconds", "Time the gradient all-reduce of one step ran (overlapped with backward or not)."),
            allreduce_exposed: h(
                "otter_allreduce_exposed_seconds",
                "Time one step waited on its gradient all-reduce after backward (all of it without overlap).",
            ),
            tokens_per_second: g("otter_tokens_per_second", "Input tokens this rank processed per second in its last step."),
            tokens: c("otter_tokens_total", "Input tokens this rank trained on."),
            samples: c("otter_samples_total", "Samples this rank trained on."),
            loss: g("otter_loss", "Mean loss of this rank's micro-batches in its last step."),
            lr: g("otter_learning_rate", "Learning rate of the last step."),
            grad_norm: g("otter_grad_norm", "Global gradient norm before clipping, last step."),
            allreduce_busbw: g("otter_allreduce_busbw_bytes_per_second", "All-reduce bus bandwidth of the last step (nccl-tests definition: algbw * 2(n-1)/n)."),
            data_wait: reg(
                &r,
                prometheus::CounterVec::new(Opts::new("otter_data_wait_seconds_total", "Time the training loop waited for data."), l).expect("valid"),
            ),
            mfu: g("otter_mfu_ratio", "Model FLOPs utilisation of the last step (0-1), where the accelerator's peak is known."),
            bad_samples: c("otter_bad_samples_total", "Samples skipped as malformed (on_bad_sample: skip)."),
            ckpt_blocking: g("otter_checkpoint_blocking_seconds", "Time the training loop was blocked by the last checkpoint (hand-off, plus the next update waiting for staging to finish)."),
            ckpt_duration: g("otter_checkpoint_duration_seconds", "Total time of the last checkpoint shard write (staging to durable)."),
            goodput: reg(
                &r,
                GaugeVec::new(Opts::new("otter_goodput_ratio", GOODPUT_HELP).const_label("scope", "rank"), l).expect("valid"),
            ),
            step: reg(&r, IntGaugeVec::new(Opts::new("otter_step", "Last optimizer step this rank applied."), l).expect("valid")),
            optimizer_state_bytes: reg(
                &r,
                IntGaugeVec::new(Opts::new("otter_optimizer_state_bytes", "Bytes of optimizer state (AdamW's moments) this rank holds."), l).expect("valid"),
            ),
            generation: reg(&r, IntGaugeVec::new(Opts::new("otter_rank_generation", "Generation this rank runs in."), l).expect("valid")),
            cpu_threads: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("otter_rank_cpu_threads", "CPU threads this rank runs: kind=intra_op (libtorch's pool), kind=data (batch preparation)."),
                    &["node", "rank", "kind"],
                )
                .expect("valid"),
            ),
            heap: reg(&r, IntGaugeVec::new(Opts::new("otter_process_heap_bytes", crate::heap::HEAP_HELP), &["node", "rank", "kind"]).expect("valid")),
            rejected_connections: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "otter_comm_rejected_connections_total",
                        "Connections to this process's collective listener dropped before joining a group, by reason: foreign (another generation, rank or protocol), unauthenticated (no proof of the job's key), silent (no handshake in time), busy.",
                    ),
                    &["node", "reason"],
                )
                .expect("valid"),
            ),
            registry: r,
            node: node.to_string(),
            rank: String::new(),
        }
    }

    fn labels(&self) -> [&str; 2] {
        [&self.node, &self.rank]
    }

    /// A new generation: this process is now `rank` (series of the old rank go away).
    pub fn set_rank(&mut self, rank: usize, generation: u64) {
        let r = rank.to_string();
        if r != self.rank {
            self.step_duration.reset();
            self.allreduce_duration.reset();
            self.allreduce_exposed.reset();
            self.tokens_per_second.reset();
            self.tokens.reset();
            self.samples.reset();
            self.loss.reset();
            self.lr.reset();
            self.grad_norm.reset();
            self.allreduce_busbw.reset();
            self.data_wait.reset();
            self.mfu.reset();
            self.bad_samples.reset();
            self.ckpt_blocking.reset();
            self.ckpt_duration.reset();
            self.goodput.reset();
            self.step.reset();
            self.optimizer_state_bytes.reset();
            self.generation.reset();
            self.cpu_threads.reset();
            self.heap.reset();
            self.rank = r;
        }
        self.generation.with_label_values(&self.labels()).set(generation as i64);
    }

    pub fn observe_step(&self, s: &StepSample) {
        let l = self.labels();
        self.step_duration.with_label_values(&l).observe(s.seconds);
        self.allreduce_duration.with_label_values(&l).observe(s.allreduce_seconds);
        self.allreduce_exposed.with_label_values(&l).observe(s.allreduce_exposed_seconds);
        if s.seconds > 0.0 {
            self.tokens_per_second.with_label_values(&l).set(s.tokens as f64 / s.seconds);
        }
        self.tokens.with_label_values(&l).inc_by(s.tokens);
        self.samples.with_label_values(&l).inc_by(s.samples);
        self.loss.with_label_values(&l).set(s.loss);
        self.lr.with_label_values(&l).set(s.lr);
        self.grad_norm.with_label_values(&l).set(s.grad_norm);
        if s.allreduce_seconds > 0.0 && s.world > 1 {
            let algbw = s.allreduce_bytes as f64 / s.allreduce_seconds;
            self.allreduce_busbw.with_label_values(&l).set(algbw * 2.0 * (s.world - 1) as f64 / s.world as f64);
        }
        self.data_wait.with_label_values(&l).inc_by(s.data_wait);
        // NaN where the accelerator's peak is unknown (CPU): the series exists, the
        // dashboard shows a gap, nobody reads a made-up number.
        self.mfu.with_label_values(&l).set(s.mfu.unwrap_or(f64::NAN));
        self.step.with_label_values(&l).set(s.step as i64);
        self.optimizer_state_bytes.with_label_values(&l).set(s.optimizer_state_bytes as i64);
    }

    /// The threads this rank chose (after every change).
    pub fn threads(&self, intra_op: usize, data: usize) {
        let [node, rank] = self.labels();
        self.cpu_threads.with_label_values(&[node, rank, "intra_op"]).set(intra_op as i64);
        self.cpu_threads.with_label_values(&[node, rank, "data"]).set(data as i64);
    }

    pub fn bad_samples(&self, n: u64) {
        self.bad_samples.with_label_values(&self.labels()).inc_by(n);
    }

    /// A checkpoint's share was staged: the loop was blocked this long.
    pub fn checkpoint_staged(&self, blocking: Duration) {
        self.ckpt_blocking.with_label_values(&self.labels()).set(blocking.as_secs_f64());
    }

    /// A checkpoint's shard is durable, `total` after staging began.
    pub fn checkpoint_written(&self, total: Duration) {
        self.ckpt_duration.with_label_values(&self.labels()).set(total.as_secs_f64());
    }

    /// Goodput as seen from this rank ([`GOODPUT_HELP`]): `useful`, the time of its steps
    /// that were committed; `wall`, since this process started.
    pub fn goodput(&self, useful: Duration, wall: Duration) {
        if !wall.is_zero() {
            self.goodput.with_label_values(&self.labels()).set(useful.as_secs_f64() / wall.as_secs_f64());
        }
    }

    pub fn encode(&self) -> String {
        // The data plane counts rejections per process (its listener outlives groups).
        for (why, n) in crate::comm::auth::rejected_connections() {
            counter_to(&self.rejected_connections.with_label_values(&[&self.node, why.label()]), n);
        }
        crate::heap::export(&self.heap, &[&self.node, &self.rank]);
        encode(&self.registry)
    }
}

/// The coordinator's metrics, refreshed from the job state after every change.
pub struct CoordMetrics {
    pub registry: Registry,
    pub generation: IntGauge,
    pub members: IntGauge,
    pub world_size: IntGauge,
    pub committed_step: IntGauge,
    pub epoch: IntGauge,
    pub samples_committed: IntCounter,
    pub rendezvous_duration: Gauge,
    pub recovery_duration: Gauge,
    pub recoveries: IntCounter,
    pub goodput: Gauge,
    pub node_failures: IntCounterVec,
    pub checkpoints_committed: IntCounter,
    pub checkpoint_last_step: IntGauge,
    pub rank_step_seconds: GaugeVec,
    pub rank_straggler: IntGaugeVec,
    pub stragglers: IntGauge,
    pub rendezvous: Histogram,
    pub checkpoint_failures: IntCounterVec,
    pub checkpoint_failed_in_a_row: IntGauge,
    pub degraded: IntGauge,
    pub peer_failures: IntCounterVec,
    pub failed_generations: IntGauge,
    pub waiting_for_nodes: IntGauge,
    pub excluded_nodes: IntGauge,
    pub state_bytes: IntGauge,
    pub state_save: Histogram,
    pub refusals: IntCounterVec,
    pub heap: IntGaugeVec,
}

impl Default for CoordMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let ig = |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid"));
        let ic = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        let g = |name: &str, help: &str| reg(&r, Gauge::new(name, help).expect("valid"));
        let m = Self {
            generation: ig("otter_generation", "Current generation (bumped on every membership change)."),
            members: ig("otter_members", "Nodes in the current generation."),
            world_size: ig("otter_world_size", "Ranks in the current generation."),
            committed_step: ig("otter_committed_step", "Optimizer steps committed (every rank applied them)."),
            epoch: ig("otter_epoch", "Epoch of the last committed batch."),
            samples_committed: ic("otter_samples_committed_total", "Samples in committed steps (each counted exactly once)."),
            rendezvous_duration: g("otter_rendezvous_duration_seconds", "Last rendezvous: first check-in to every rank assigned."),
            recovery_duration: g("otter_recovery_duration_seconds", "Last recovery: failure noticed to every survivor assigned."),
            recoveries: ic("otter_recoveries_total", "Generations formed because something failed."),
            goodput: reg(&r, Gauge::with_opts(Opts::new("otter_goodput_ratio", GOODPUT_HELP).const_label("scope", "job")).expect("valid")),
            node_failures: reg(
                &r,
                IntCounterVec::new(Opts::new("otter_node_failures_total", "Nodes lost or ranks failed, by reason."), &["reason"]).expect("valid"),
            ),
            checkpoints_committed: ic("otter_checkpoints_committed_total", "Checkpoints committed by this coordinator."),
            checkpoint_last_step: ig("otter_checkpoint_last_step", "Steps held by the newest committed checkpoint."),
            rank_step_seconds: reg(
                &r,
                GaugeVec::new(Opts::new("otter_rank_step_seconds", "Per rank: compute time of its last step (excluding all-reduce wait)."), &["rank"]).expect("valid"),
            ),
            rank_straggler: reg(
                &r,
                IntGaugeVec::new(Opts::new("otter_rank_straggler", "1 while a rank is flagged as a straggler."), &["rank"]).expect("valid"),
            ),
            stragglers: ig("otter_stragglers", "Ranks flagged as stragglers now."),
            rendezvous: reg(
                &r,
                Histogram::with_opts(HistogramOpts::new("otter_rendezvous_seconds", "Rendezvous durations.").buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]))
                    .expect("valid"),
            ),
            checkpoint_failures: reg(
                &r,
                IntCounterVec::new(Opts::new("otter_checkpoint_failures_total", "Checkpoint saves that failed (a rank could not write its shard), by reason."), &["reason"])
                    .expect("valid"),
            ),
            checkpoint_failed_in_a_row: ig("otter_checkpoint_failed_saves", "Checkpoint saves that failed since the last committed one."),
            degraded: ig("otter_job_degraded", "1 while the job is degraded (max_failed_saves checkpoint saves in a row failed)."),
            peer_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("otter_peer_unreachable_total", "Failure reports in which a rank on node `reporter` could not reach or hear from a rank on node `blamed`."),
                    &["reporter", "blamed"],
                )
                .expect("valid"),
            ),
            failed_generations: ig("otter_failed_generations", "Generations in a row that failed without committing a step."),
            waiting_for_nodes: ig("otter_waiting_for_nodes", "1 while the job waits for nodes (below min_nodes)."),
            excluded_nodes: ig("otter_excluded_nodes", "Nodes left out for now by the partition rule."),
            state_bytes: ig("otter_coord_state_bytes", "Bytes of the coordinator's last saved state (bounded: the step history is in its own file)."),
            state_save: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("otter_coord_state_save_seconds", "Coordinator state saves: serialization and the store's write (fsync or etcd transaction).")
                        .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
                )
                .expect("valid"),
            ),
            refusals: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("otter_coord_refusals_total", "Calls the coordinator refused, by refusal code (stale-generation: a node acting for a generation that is over)."),
                    &["code"],
                )
                .expect("valid"),
            ),
            heap: reg(&r, IntGaugeVec::new(Opts::new("otter_process_heap_bytes", crate::heap::HEAP_HELP), &["kind"]).expect("valid")),
            registry: r,
        };
        for code in ["stale-generation", "unknown-node"] {
            m.refusals.with_label_values(&[code]).reset();
        }
        for reason in ["no_space", "io", "other"] {
            m.checkpoint_failures.with_label_values(&[reason]).reset();
        }
        // Every reason is exported from the start (a rate over a series that appears at its
        // first failure misses that failure).
        for reason in ["node_lost", "rank_failed"] {
            m.node_failures.with_label_values(&[reason]).reset();
        }
        m
    }

    pub fn encode(&self) -> String {
        crate::heap::export(&self.heap, &[]);
        encode(&self.registry)
    }
}

/// Sets a counter to a monotonic total kept elsewhere (it only moves up).
pub fn counter_to(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Merges several Prometheus text expositions into one: the samples of each metric family
/// grouped under a single `# HELP`/`# TYPE` (the format requires a family to be one
/// group). Families keep their first-seen order.
pub fn merge_exposition(pages: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> = Default::default();
    for page in pages {
        let mut current = String::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let name = rest.split_whitespace().next().unwrap_or_default().to_string();
                let entry = families.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Default::default()
                });
                if !entry.0.iter().any(|h| h == line) && entry.0.len() < 2 {
                    entry.0.push(line.to_string());
                }
                current = name;
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                // Histogram series (_bucket, _sum, _count) belong to the family above them.
                let family = if name.starts_with(current.as_str()) && !current.is_empty() { current.clone() } else { name.to_string() };
                families
                    .entry(family.clone())
                    .or_insert_with(|| {
                        order.push(family.clone());
                        Default::default()
                    })
                    .1
                    .push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (head, samples) = &families[&name];
        for l in head.iter().chain(samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Serves `router` (plus nothing else) on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, router: axum::Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// A `/metrics` + `/healthz` server for a registry rendered by `render`, on its own thread
/// and runtime (for processes whose main thread is busy training). Returns the bound
/// address.
pub fn spawn_server(addr: &str, render: std::sync::Arc<dyn Fn() -> String + Send + Sync>) -> std::io::Result<std::net::SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else { return };
            let router = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let render = render.clone();
                        async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render()) }
                    }),
                )
                .route("/healthz", axum::routing::get(|| async { "ok\n" }));
            let _ = serve(listener, router).await;
        });
    })?;
    Ok(local)
}

/// GET `http://{addr}/metrics` (HTTP/1.0, for the agent collecting its ranks' pages).
pub fn fetch_metrics(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    match buf.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("{addr}: not a 200 response"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_metrics_carry_node_and_rank_and_drop_the_old_rank_on_a_new_generation() {
        let mut m = RankMetrics::new("n1");
        m.set_rank(3, 1);
        m.observe_step(&StepSample { step: 7, seconds: 0.5, loss: 2.25, tokens: 100, samples: 4, allreduce_seconds: 0.1, allreduce_exposed_seconds: 0.025, allreduce_bytes: 1_000_000, world: 4, optimizer_state_bytes: 4096, ..Default::default() });
        let page = m.encode();
        assert!(page.contains(r#"otter_allreduce_exposed_seconds_sum{node="n1",rank="3"} 0.025"#), "{page}");
        assert!(page.contains(r#"otter_optimizer_state_bytes{node="n1",rank="3"} 4096"#), "{page}");
        assert!(page.contains(r#"otter_loss{node="n1",rank="3"} 2.25"#), "{page}");
        assert!(page.contains(r#"otter_tokens_per_second{node="n1",rank="3"} 200"#), "{page}");
        assert!(page.contains(r#"otter_step_duration_seconds_count{node="n1",rank="3"} 1"#), "{page}");
        // busbw = 1e6 B / 0.1 s * 2 * 3 / 4 = 1.5e7
        assert!(page.contains(r#"otter_allreduce_busbw_bytes_per_second{node="n1",rank="3"} 15000000"#), "{page}");
        m.set_rank(1, 2);
        let page = m.encode();
        assert!(!page.contains(r#"rank="3""#), "{page}");
        assert!(page.contains(r#"otter_rank_generation{node="n1",rank="1"} 2"#), "{page}");
        m.goodput(Duration::from_secs(3), Duration::from_secs(4));
        assert!(m.encode().contains(r#"otter_goodput_ratio{node="n1",rank="1",scope="rank"} 0.75"#));
    }

    #[test]
    fn the_job_goodput_is_told_apart_from_the_ranks_by_its_scope() {
        let m = CoordMetrics::new();
        m.goodput.set(0.5);
        assert!(m.encode().contains(r#"otter_goodput_ratio{scope="job"} 0.5"#), "{}", m.encode());
    }

    #[test]
    fn merged_pages_keep_one_header_per_family_and_every_sample() {
        let mut a = RankMetrics::new("n");
        a.set_rank(0, 1);
        a.observe_step(&StepSample { seconds: 1.0, loss: 1.0, ..Default::default() });
        let mut b = RankMetrics::new("n");
        b.set_rank(1, 1);
        b.observe_step(&StepSample { seconds: 2.0, loss: 2.0, ..Default::default() });
        let merged = merge_exposition(&[a.encode(), b.encode()]);
        assert_eq!(merged.matches("# TYPE otter_loss gauge").count(), 1, "{merged}");
        assert_eq!(merged.matches("# TYPE otter_step_duration_seconds histogram").count(), 1);
        assert!(merged.contains(r#"otter_loss{node="n",rank="0"} 1"#) && merged.contains(r#"otter_loss{node="n",rank="1"} 2"#));
        // One contiguous group per family: after the family's TYPE line, all its samples
        // come before the next TYPE line.
        let lines: Vec<&str> = merged.lines().collect();
        let start = lines.iter().position(|l| *l == "# TYPE otter_loss gauge").unwrap();
        let group: Vec<&&str> = lines[start + 1..].iter().take_while(|l| !l.starts_with('#')).collect();
        assert_eq!(group.len(), 2, "{merged}");
        assert_eq!(merged.matches("otter_step_duration_seconds_count").count(), 2);
    }

    #[test]
    fn counters_follow_a_monotonic_total() {
        let m = CoordMetrics::new();
        counter_to(&m.recoveries, 3);
        counter_to(&m.recoveries, 2);
        assert_eq!(m.recoveries.get(), 3);
    }
}
