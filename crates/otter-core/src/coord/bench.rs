//! `otter-coord bench`: the real coordinator service (gRPC on loopback, a real state
//! store) against `nodes` simulated nodes, each an in-process client with its own
//! connection, all joining at once; then `steps` committed optimizer steps with a
//! checkpoint every `save_every`; then a recovery. torchrun's default last-call wait alone
//! is 30 s; the target here is a few seconds for 1024 nodes to join and under 1 s from the
//! last join to every rank assigned, and a saved state (and a save) that does not grow with
//! the step count.
//!
//! Joins, rendezvous and the recovery go over gRPC. The steps call the service's handlers
//! in-process (the code a gRPC request runs, without the transport): a step is one
//! `StepDone` per rank, so 500k steps of 1024 nodes are half a billion requests, which
//! loopback gRPC alone would take hours to carry. Each rank's shard of a checkpoint is an
//! empty file (the coordinator checks shard sizes, not contents).

use super::machine::Machine;
use super::rpc::{pb, with_token};
use super::server::{serve, CheckpointSink, Coordinator, Service};
use super::store::{FileStore, MemStore, StateStore};
use super::CoordConfig;
use anyhow::{Context, Result};
use pb::coordinator_server::Coordinator as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the benchmarked coordinator keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchStore {
    Memory,
    /// The embedded store in a temporary directory (fsyncs included).
    File,
    /// A local `etcd` (Debian's etcd-server, as the tests use) started for the run, with
    /// its default fsyncs.
    Etcd,
}

impl std::str::FromStr for BenchStore {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Self::Memory),
            "file" => Ok(Self::File),
            "etcd" => Ok(Self::Etcd),
            _ => Err(format!("unknown store `{s}` (memory, file, etcd)")),
        }
    }
}

impl std::fmt::Display for BenchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::File => "file",
            Self::Etcd => "etcd",
        })
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub nodes: usize,
    pub steps: u64,
    pub store: BenchStore,
    pub save_every: u64,
    /// Scratch space (state dir, checkpoints, etcd's data); emptied by the caller.
    pub dir: PathBuf,
    /// How long the nodes may take to join.
    pub join_timeout: Duration,
}

pub struct BenchResult {
    pub nodes: usize,
    pub store: BenchStore,
    pub steps: u64,
    /// First join sent (connection opened) -> last join answered.
    pub join: Duration,
    /// The slowest node's connect + join.
    pub join_max: Duration,
    /// Last join answered -> every node holds its assignment.
    pub rendezvous: Duration,
    /// A rank's failure report (after the last step) -> every survivor holds its new
    /// assignment.
    pub recovery: Duration,
    /// The largest and the last saved state (bytes).
    pub state_bytes_max: usize,
    pub state_bytes_last: usize,
    pub saves: u64,
    pub save_p50: Duration,
    pub save_p99: Duration,
    /// Resident memory of this process (the coordinator and its simulated clients) before
    /// the first step, after 100k steps (if run) and after the last.
    pub rss_mb_start: f64,
    pub rss_mb_100k: Option<f64>,
    pub rss_mb_end: f64,
    /// Wall time of the steps.
    pub steps_wall: Duration,
    pub checkpoints: usize,
}

impl BenchResult {
    /// One `name=value` line per measure.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!("store={} nodes={} steps={} checkpoints={}", self.store, self.nodes, self.steps, self.checkpoints),
            format!("state_bytes_max={}", self.state_bytes_max),
            format!("state_bytes_last={}", self.state_bytes_last),
            format!("saves={}", self.saves),
            format!("save_ms_p50={:.3}", self.save_p50.as_secs_f64() * 1e3),
            format!("save_ms_p99={:.3}", self.save_p99.as_secs_f64() * 1e3),
            format!("rss_mb_start={:.1}", self.rss_mb_start),
        ];
        if let Some(m) = self.rss_mb_100k {
            out.push(format!("rss_mb_100k={m:.1}"));
        }
        out.extend([
            format!("rss_mb_end={:.1}", self.rss_mb_end),
            format!("join_s={:.3}", self.join.as_secs_f64()),
            format!("join_max_s={:.3}", self.join_max.as_secs_f64()),
            format!("rendezvous_s={:.3}", self.rendezvous.as_secs_f64()),
            format!("recovery_s={:.3}", self.recovery.as_secs_f64()),
            format!("steps_per_s={:.0}", self.steps as f64 / self.steps_wall.as_secs_f64().max(1e-9)),
        ]);
        out
    }
}

type Client = pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>;

async fn client(addr: std::net::SocketAddr) -> Result<Client> {
    Ok(pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await?)
}

/// This process's resident memory (MB).
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
}

/// How often (in steps) a run prints a progress line.
const PROGRESS_EVERY: u64 = 10_000;

/// The join token of the benchmark's job.
const TOKEN: &str = "bench";

/// Every node connects and joins at once, then checks in its one rank and waits for its
/// assignment. Returns each node's client and assignment, the join phase's span and its
/// slowest join, and the rendezvous (last join answered to every rank assigned).
async fn join_all(addr: std::net::SocketAddr, nodes: usize) -> Result<(Vec<(Client, pb::Assignment)>, Duration, Duration, Duration)> {
    let last_join = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let (last_join, slowest) = (last_join.clone(), slowest.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut c = client(addr).await?;
            let node_id = format!("node-{i:04}");
            c.join(with_token(pb::JoinRequest { node_id: node_id.clone(), local_ranks: 1, identity: Some(super::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("simulated"))) }, TOKEN)).await?;
            let joined = Instant::now();
            {
                let mut s = slowest.lock().unwrap();
                *s = (*s).max(joined - t0);
            }
            {
                let mut last = last_join.lock().unwrap();
                *last = Some(last.map_or(joined, |l| l.max(joined)));
            }
            let req = pb::RendezvousRequest { node_id, local_rank: 0, applied_step: None, comm_addr: format!("127.0.0.1:{}", 20000 + i), last_generation: None };
            loop {
                match c.rendezvous(with_token(req.clone(), TOKEN)).await {
                    Ok(a) => return Ok::<_, anyhow::Error>((c, a.into_inner(), Instant::now())),
                    Err(s) if s.code() == tonic::Code::Unavailable => continue,
                    Err(s) => return Err(s.into()),
                }
            }
        }));
    }
    let mut ranks = Vec::new();
    for t in tasks {
        ranks.push(t.await??);
    }
    let assigned = ranks.iter().map(|(_, _, t)| *t).max().context("no nodes")?;
    let last_joined = last_join.lock().unwrap().context("nobody joined")?;
    let (join, join_max) = (last_joined - started, *slowest.lock().unwrap());
    Ok((ranks.into_iter().map(|(c, a, _)| (c, a)).collect(), join, join_max, assigned.saturating_duration_since(last_joined)))
}

/// Every rank of `generation` reports `step` done, concurrently (the service's handler,
/// in-process). The requests are polled together in this task, as one connection's
/// streams would be: a task each would bench tokio's scheduler more than the coordinator.
async fn step(svc: &Service, generation: u64, world: u32, step: u64) -> Result<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut all: FuturesUnordered<_> = (0..world)
        .map(|rank| {
            let req = pb::StepDoneRequest { generation, rank, step, loss: 2.0 + 1.0 / (step + 1) as f64, lr: 1e-4, step_seconds: 0.5, compute_seconds: 0.4, ..Default::default() };
            svc.step_done(tonic::Request::new(req))
        })
        .collect();
    while let Some(r) = all.next().await {
        r.with_context(|| format!("step {step}"))?;
    }
    Ok(())
}

/// Every rank writes its (empty) shard of the checkpoint after `step` and reports it.
async fn checkpoint(svc: &Service, dir: &Path, generation: u64, world: u32, step: u64) -> Result<()> {
    let step_dir = crate::ckpt::step_dir(dir, step + 1);
    std::fs::create_dir_all(&step_dir)?;
    for rank in 0..world {
        std::fs::File::create(step_dir.join(format!("rank-{rank:05}.safetensors")))?;
    }
    let mut all = tokio::task::JoinSet::new();
    for rank in 0..world {
        let svc = svc.clone();
        all.spawn(async move {
            let req = pb::CheckpointDoneRequest { generation, rank, step, file: format!("rank-{rank:05}.safetensors"), bytes: 0, crc32: 0, names: Vec::new() };
            svc.checkpoint_done(tonic::Request::new(req)).await
        });
    }
    while let Some(r) = all.join_next().await {
        r?.with_context(|| format!("checkpoint after step {step}"))?;
    }
    Ok(())
}

/// The whole benchmark: join and rendezvous of `nodes` nodes, `steps` steps with a
/// checkpoint every `save_every`, a recovery.
pub async fn run(o: &BenchOptions) -> Result<BenchResult> {
    let nodes = o.nodes.max(1);
    let cfg = CoordConfig {
        join_timeout: o.join_timeout,
        // Nothing sends heartbeats in-process, and nothing here should time out.
        heartbeat_timeout: Duration::from_secs(24 * 3600),
        max_steps: Some(o.steps + 1),
        ..CoordConfig::new(nodes, nodes)
    };
    let machine = Machine::new(cfg, vec![nodes as u64 * (o.steps + 2)])?;
    let mut _etcd = None;
    let store: Box<dyn StateStore> = match o.store {
        BenchStore::Memory => Box::new(MemStore::default()),
        BenchStore::File => Box::new(FileStore::open(o.dir.join("state"))?),
        BenchStore::Etcd => {
            // As the HA manifest sets it: every save is a whole state, and etcd keeps its
            // raft log (in memory and in WAL files) until a snapshot.
            let e = super::etcd::LocalEtcd::start(&o.dir, &["--snapshot-count", "10000"])?;
            let s = super::etcd::EtcdStore::connect(&[e.url().to_string()], "otter-bench").await?;
            _etcd = Some(e);
            Box::new(s)
        }
    };
    let coord = Coordinator::open(machine, store, String::new(), Duration::from_secs(1)).await?;
    let ckpt_dir = o.dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir)?;
    coord.set_checkpoints(CheckpointSink {
        dir: ckpt_dir.clone(),
        keep_last: 2,
        template: crate::ckpt::Manifest::new(0, 0),
        warmup_ratio: 0.0,
        history: Some(o.dir.join("history.jsonl")),
    });
    let listener = super::server::bind_listener("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(coord.clone(), TOKEN.to_string(), listener, async {
        let _ = stop_rx.await;
    }));

    let (mut ranks, join, join_max, rendezvous) = join_all(addr, nodes).await?;
    let (generation, world) = (ranks[0].1.generation, ranks[0].1.world);

    let svc = Service(coord.clone());
    let rss_mb_start = rss_mb();
    let mut rss_mb_100k = None;
    let t = Instant::now();
    let mut last_progress = t;
    for s in 0..o.steps {
        step(&svc, generation, world, s).await?;
        if o.save_every > 0 && (s + 1) % o.save_every == 0 {
            checkpoint(&svc, &ckpt_dir, generation, world, s).await?;
        }
        if s + 1 == 100_000 {
            rss_mb_100k = Some(rss_mb());
        }
        if (s + 1) % PROGRESS_EVERY == 0 {
            // A long run leaves its measures as it goes (stderr), so one cut short still
            // says how far it got and what it saw.
            let stats = coord.save_stats();
            let heap = crate::heap::stats();
            eprintln!(
                "progress step={} elapsed_s={:.0} steps_per_s={:.0} rss_mb={:.1} heap_in_use_kb={} heap_free_kb={} state_bytes_max={} saves={} save_ms_p50={:.3} save_ms_p99={:.3}",
                s + 1,
                t.elapsed().as_secs_f64(),
                PROGRESS_EVERY as f64 / last_progress.elapsed().as_secs_f64().max(1e-9),
                rss_mb(),
                heap.in_use / 1024,
                heap.free / 1024,
                stats.bytes_max,
                stats.saves,
                stats.quantile(0.5).as_secs_f64() * 1e3,
                stats.quantile(0.99).as_secs_f64() * 1e3,
            );
            last_progress = Instant::now();
        }
    }
    let steps_wall = t.elapsed();
    coord.flush().await?;
    let rss_mb_end = rss_mb();
    let checkpoints = coord.status_json().await["checkpoints"].as_array().map_or(0, Vec::len);
    let stats = coord.save_stats();

    // Recovery: rank 0 reports a collective failure after the last step, and every rank
    // (all nodes survive) checks in again with its applied step.
    let failed_at = Instant::now();
    let last = o.steps.checked_sub(1);
    ranks[0].0.report_failure(with_token(pb::FailureRequest { generation, rank: 0, reason: "bench".into(), blamed_rank: None }, TOKEN)).await?;
    let mut tasks = Vec::new();
    for (i, (mut c, _)) in ranks.drain(..).enumerate() {
        tasks.push(tokio::spawn(async move {
            let req = pb::RendezvousRequest {
                node_id: format!("node-{i:04}"),
                local_rank: 0,
                applied_step: last,
                comm_addr: format!("127.0.0.1:{}", 20000 + i),
                last_generation: Some(generation),
            };
            loop {
                match c.rendezvous(with_token(req.clone(), TOKEN)).await {
                    Ok(_) => return Ok::<_, anyhow::Error>(Instant::now()),
                    Err(s) if s.code() == tonic::Code::Unavailable => continue,
                    Err(s) => return Err(s.into()),
                }
            }
        }));
    }
    let mut done = failed_at;
    for t in tasks {
        done = done.max(t.await??);
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(BenchResult {
        nodes,
        store: o.store,
        steps: o.steps,
        join,
        join_max,
        rendezvous,
        recovery: done - failed_at,
        state_bytes_max: stats.bytes_max,
        state_bytes_last: stats.bytes_last,
        saves: stats.saves,
        save_p50: stats.quantile(0.5),
        save_p99: stats.quantile(0.99),
        rss_mb_start,
        rss_mb_100k,
        rss_mb_end,
        steps_wall,
        checkpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(nodes: usize, steps: u64, store: BenchStore, dir: &Path) -> BenchOptions {
        BenchOptions { nodes, steps, store, save_every: 100, dir: dir.to_path_buf(), join_timeout: Duration::from_secs(20) }
    }

    /// 384 nodes joining at once once took a minute: their SYNs overflowed the listen
    /// queue and the kernel retried them after 1, 3, 7, ... s. A stall is therefore a
    /// whole second at least, where a join takes about 0.1 s here: the slowest join must
    /// stay under that second. Both embedded stores.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_nodes_joining_at_once_all_join_without_stalling() {
        for store in [BenchStore::Memory, BenchStore::File] {
            let d = tempfile::tempdir().unwrap();
            let r = run(&options(384, 2, store, d.path())).await.unwrap();
            println!("384 nodes ({store}): join {:?} (slowest {:?}), rendezvous {:?}, recovery {:?}", r.join, r.join_max, r.rendezvous, r.recovery);
            assert!(r.join_max < Duration::from_secs(1), "a node took {:?} to connect and join: a stalled connection", r.join_max);
        }
    }

    /// The saved state does not grow with the step count: the steps leave it for the
    /// history file at each checkpoint (once the state's window of recent steps is full).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_saved_state_stays_the_same_size_however_many_steps_run() {
        let d = tempfile::tempdir().unwrap();
        let window = crate::coord::ledger::HISTORY_WINDOW as u64;
        // Both past the window of recent steps; the uncompacted steps (those after the
        // oldest kept checkpoint) make a sawtooth of the same height in both.
        let short = run(&options(4, 1000, BenchStore::File, &d.path().join("short"))).await.unwrap();
        let long = run(&options(4, 2000, BenchStore::File, &d.path().join("long"))).await.unwrap();
        println!("4 nodes: after {} steps {} bytes (max {}), after {} {} bytes (max {})", short.steps, short.state_bytes_last, short.state_bytes_max, long.steps, long.state_bytes_last, long.state_bytes_max);
        assert!(long.state_bytes_max <= short.state_bytes_max * 21 / 20, "{} steps saved {} bytes, {} steps {}", long.steps, long.state_bytes_max, short.steps, short.state_bytes_max);
        assert_eq!((short.checkpoints > 0, long.checkpoints > 0), (true, true), "checkpoints committed");
        let history = std::fs::read_to_string(d.path().join("long/history.jsonl")).unwrap();
        let steps: Vec<u64> = history.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert!(steps.len() as u64 >= 2000 - window - 300, "the history file holds the steps that left the state: {}", steps.len());
        assert!(steps.windows(2).all(|w| w[1] == w[0] + 1) && steps[0] == 0, "in order, from step 0");
    }
}
