//! The coordinator's async shell: a tonic service that feeds RPCs and clock ticks to the
//! pure [`Machine`], persists its state (through a [`StateStore`]) before answering, and
//! carries out its replies. No decision is made here.
//!
//! * `Rendezvous` long-polls: the check-in goes to the machine, then the call waits (on a
//!   notification after every state change) until the assignment exists, or answers
//!   UNAVAILABLE after [`RENDEZVOUS_POLL`] so the caller retries.
//! * `Watch` is held open by each worker agent; when it closes (the agent died: the kernel
//!   closes its socket) the node is reported lost at once.
//! * A ticker feeds `tick(now)` for heartbeat, last-call and rendezvous timeouts.
//! * Every RPC must carry the job's join token in `x-otter-token`.

use super::machine::{Machine, Phase, Refusal};
use super::rpc::pb;
use super::store::{StateStore, StoreError};
use super::Millis;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, Notify};
use tonic::{Request, Response, Status};

/// How long one `Rendezvous` call waits before answering UNAVAILABLE (the caller retries).
pub const RENDEZVOUS_POLL: Duration = Duration::from_secs(10);
pub const TOKEN_HEADER: &str = "x-otter-token";

/// The coordinator's listen backlog: a job's nodes connect at once (hundreds at a job's
/// start or after a coordinator restart), and a full accept queue drops their SYNs, which
/// the kernel retries only after 1, 3, 7, 15, ... s. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: i32 = 8192;

/// Binds the coordinator's listener (address reuse, [`LISTEN_BACKLOG`]).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Wall-clock milliseconds: comparable across coordinator restarts (contract 1).
pub fn wall_now() -> Millis {
    Millis(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// What the store holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    pub machine: Machine,
    /// Optimizer steps of the whole job (LR schedule length), fixed when the first
    /// generation forms.
    pub total_steps: Option<u64>,
}

/// Where the coordinator commits checkpoints: it writes each manifest once every shard is
/// durable and the step is committed.
pub struct CheckpointSink {
    pub dir: std::path::PathBuf,
    pub keep_last: usize,
    /// What the ranks do not report: LR schedule, seeds, the resolved config. `step`,
    /// `epoch`, `world_size`, `partition`, `shards`, `warmup_steps`, `total_steps`, `data`,
    /// `frozen` and `generation` are filled in per checkpoint.
    pub template: crate::ckpt::Manifest,
    pub warmup_ratio: f64,
    /// Where the summaries of compacted steps go once they leave the state's window (one
    /// JSON line per step, appended): the job's full step history, off the saved state.
    pub history: Option<std::path::PathBuf>,
}

/// Appends step summaries to the history file (JSON lines).
fn append_history(path: &std::path::Path, steps: &[super::ledger::StepSummary]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = Vec::new();
    for s in steps {
        serde_json::to_writer(&mut out, s).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(&out)
}

/// A checkpoint manifest prepared under the state lock, written off it.
struct ManifestWrite {
    steps: u64,
    generation: u64,
    dir: std::path::PathBuf,
    manifest: crate::ckpt::Manifest,
}

impl ManifestWrite {
    /// Checks every shard on the (shared) checkpoint volume, then writes the manifest. A
    /// shard missing or of the wrong size (a volume not shared, a rank that lied) blocks the
    /// commit, loudly.
    fn write(self) -> Result<(), String> {
        for sh in &self.manifest.shards {
            let path = self.dir.join(&sh.file);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == sh.bytes => {}
                Ok(m) => return Err(format!("{} has {} bytes, its rank reported {}", path.display(), m.len(), sh.bytes)),
                Err(e) => return Err(format!("{}: {e} (is the checkpoint directory shared with the coordinator?)", path.display())),
            }
        }
        crate::ckpt::write_manifest(&self.dir, &self.manifest).map_err(|e| format!("writing the manifest: {e}"))
    }
}

/// What the coordinator observes but does not decide on: metrics, straggler flags,
/// per-rank step times (not persisted).
pub struct Telemetry {
    pub stragglers: super::straggler::Detector,
    event_mark: u64,
    /// Blame reports counted into the metrics so far.
    blame_mark: u64,
    metrics_generation: u64,
    samples_per_batch: u64,
    /// (when, steps committed) at each change, the latest few (for the ETA).
    progress: std::collections::VecDeque<(std::time::Instant, u64)>,
}

/// What the flusher has made durable: the newest state version saved, and the newest
/// version whose save failed (with why).
#[derive(Debug, Clone, Default)]
struct Durable {
    saved: u64,
    failed: Option<(u64, String)>,
}

pub struct Coordinator {
    ckpt: std::sync::OnceLock<CheckpointSink>,
    /// A checkpoint manifest is being written, off the state lock (at most one at a time;
    /// its writer looks for the next ready checkpoint when it is done).
    manifest_in_flight: std::sync::atomic::AtomicBool,
    /// Bumped (under the state lock) by every accepted change.
    version: std::sync::atomic::AtomicU64,
    /// Group commit: changes mark the state dirty; one flusher saves the newest state and
    /// every request whose change it includes answers then (many ranks' `StepDone` of one
    /// step share one save instead of queueing one each behind the lock).
    dirty: Notify,
    durable: watch::Sender<Durable>,
    pub metrics: crate::metrics::CoordMetrics,
    pub telemetry: std::sync::Mutex<Telemetry>,
    state: Mutex<Persisted>,
    store: Box<dyn StateStore>,
    /// Notified when the phase or the generation changes: what a rendezvous waits for
    /// (waking every waiter on every change costs O(nodes^2) per rendezvous).
    changed: Notify,
    /// The (generation, phase) the waiters last heard of.
    phase_seen: std::sync::Mutex<(u64, String)>,
    /// Node agents holding a watch stream open now.
    agents_watching: std::sync::atomic::AtomicUsize,
    updates: watch::Sender<pb::JobUpdate>,
    job_yaml: String,
    heartbeat_interval: Duration,
}

fn update_of(m: &Machine, message: String) -> pb::JobUpdate {
    let phase = match m.phase() {
        Phase::WaitingForNodes => "waiting",
        Phase::Rendezvous { .. } => "rendezvous",
        Phase::Running { .. } => "running",
        Phase::Finished => "finished",
        Phase::Failed { .. } => "failed",
    };
    pb::JobUpdate { generation: m.generation(), phase: phase.into(), message }
}

/// A refusal as a status: FAILED_PRECONDITION (RESOURCE_EXHAUSTED for a full job) with
/// the refusal's code in the `x-otter-refusal` metadata entry.
fn refused(r: Refusal) -> Status {
    let status = match r {
        Refusal::StaleGeneration { .. } | Refusal::FutureGeneration { .. } => Status::failed_precondition(format!("stale generation: {r}")),
        Refusal::JobOver { .. } => Status::failed_precondition(format!("job over: {r}")),
        Refusal::Full { .. } => Status::resource_exhausted(r.to_string()),
        _ => Status::failed_precondition(r.to_string()),
    };
    super::rpc::coded(status, r.code())
}

impl Coordinator {
    /// Resumes from `store` if it holds a state, else starts `fresh`.
    pub async fn open(
        fresh: Machine,
        store: Box<dyn StateStore>,
        job_yaml: String,
        heartbeat_interval: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let state = match store.load().await? {
            Some(bytes) => {
                let mut s = serde_json::from_slice::<Persisted>(&bytes)
                    .map_err(|e| StoreError::Unreadable { location: store.describe(), message: e.to_string() })?;
                s.machine.resume(wall_now());
                s
            }
            None => Persisted { machine: fresh, total_steps: None },
        };
        let (updates, _) = watch::channel(update_of(&state.machine, "coordinator started".into()));
        let telemetry = Telemetry {
            stragglers: super::straggler::Detector::new(Default::default()),
            event_mark: 0,
            blame_mark: 0,
            metrics_generation: 0,
            samples_per_batch: 1,
            progress: Default::default(),
        };
        let c = Arc::new(Self {
            version: Default::default(),
            dirty: Notify::new(),
            durable: watch::channel(Durable::default()).0,
            ckpt: Default::default(),
            manifest_in_flight: Default::default(),
            metrics: crate::metrics::CoordMetrics::new(),
            telemetry: std::sync::Mutex::new(telemetry),
            state: Mutex::new(state), store, changed: Notify::new(), phase_seen: Default::default(), agents_watching: Default::default(), updates, job_yaml, heartbeat_interval });
        c.persist(&*c.state.lock().await).await?;
        tokio::spawn(Self::flusher(Arc::downgrade(&c)));
        Ok(c)
    }

    /// Saves the newest state whenever it is dirty; ends with the coordinator.
    async fn flusher(c: std::sync::Weak<Self>) {
        use std::sync::atomic::Ordering;
        loop {
            let Some(dirty) = c.upgrade().map(|c| async move { c.dirty.notified().await }) else { return };
            // A stored permit (notify_one before we waited) makes this return at once.
            if tokio::time::timeout(Duration::from_secs(1), dirty).await.is_err() {
                continue; // re-check that the coordinator still exists
            }
            let Some(c) = c.upgrade() else { return };
            let (bytes, version) = {
                let s = c.state.lock().await;
                (serde_json::to_vec(&*s).expect("state serializes"), c.version.load(Ordering::SeqCst))
            };
            match c.store.save(bytes).await {
                Ok(()) => c.durable.send_modify(|d| d.saved = d.saved.max(version)),
                Err(StoreError::Fenced(e)) => {
                    // Another replica is active: acting on anything now could fork the job.
                    eprintln!("otter-coord: {e}; exiting");
                    std::process::exit(3);
                }
                Err(e) => c.durable.send_modify(|d| d.failed = Some((version, e.to_string()))),
            }
        }
    }

    /// Waits until a save includes state version `v`.
    async fn durable(&self, v: u64) -> Result<(), Status> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.saved >= v || d.failed.as_ref().is_some_and(|(f, _)| *f >= v))
            .await
            .map_err(|_| Status::unavailable("coordinator shutting down"))?
            .clone();
        if d.saved >= v {
            return Ok(());
        }
        let why = d.failed.map(|(_, e)| e).unwrap_or_default();
        Err(Status::unavailable(format!("coordinator could not persist its state: {why}")))
    }

    pub fn now(&self) -> Millis {
        wall_now()
    }

    /// Straggler thresholds and samples per data batch (for the samples metric).
    pub fn set_telemetry(&self, stragglers: super::straggler::StragglerConfig, samples_per_batch: u64) {
        let mut t = self.telemetry.lock().expect("not poisoned");
        t.stragglers = super::straggler::Detector::new(stragglers);
        t.samples_per_batch = samples_per_batch.max(1);
    }

    /// Brings the metrics up to date with the job state (after every change).
    fn refresh_metrics(&self, s: &Persisted) {
        use crate::metrics::counter_to;
        use super::machine::EventKind;
        let m = &s.machine;
        let x = &self.metrics;
        let mut t = self.telemetry.lock().expect("not poisoned");
        x.generation.set(m.generation() as i64);
        x.members.set(m.members().len() as i64);
        x.world_size.set(m.world() as i64);
        let steps = m.ledger().steps_committed();
        x.committed_step.set(steps as i64);
        if t.progress.back().is_none_or(|&(_, n)| n != steps) {
            t.progress.push_back((std::time::Instant::now(), steps));
            if t.progress.len() > 64 {
                t.progress.pop_front();
            }
        }
        x.epoch.set(m.ledger().last_committed().map_or(0, |c| c.epoch) as i64);
        counter_to(&x.samples_committed, m.ledger().committed_batches() * t.samples_per_batch);
        counter_to(&x.recoveries, m.summary().recoveries);
        if let Some(&n) = m.checkpoints().last() {
            x.checkpoint_last_step.set(n as i64);
        }
        for (kind, &n) in m.save_failures() {
            counter_to(&x.checkpoint_failures.with_label_values(&[kind]), n);
        }
        let summary = m.summary();
        x.checkpoint_failed_in_a_row.set(i64::from(summary.failed_saves));
        x.degraded.set(i64::from(summary.degraded.is_some()));
        x.failed_generations.set(i64::from(summary.failed_generations));
        x.waiting_for_nodes.set(i64::from(summary.waiting.is_some()));
        x.excluded_nodes.set(summary.excluded.len() as i64);
        let (blame, total) = m.blame();
        let new = (total.saturating_sub(t.blame_mark) as usize).min(blame.len());
        for b in blame.iter().skip(blame.len() - new) {
            x.peer_failures.with_label_values(&[&b.reporter, &b.blamed]).inc();
        }
        t.blame_mark = total;
        let (events, mark) = m.events_since(t.event_mark);
        t.event_mark = mark;
        for e in events {
            match e.kind {
                EventKind::NodeLost => x.node_failures.with_label_values(&["node_lost"]).inc(),
                EventKind::RankFailed => x.node_failures.with_label_values(&["rank_failed"]).inc(),
                EventKind::PeerUnreachable => x.node_failures.with_label_values(&["peer_unreachable"]).inc(),
                EventKind::CheckpointCommitted => x.checkpoints_committed.inc(),
                EventKind::RendezvousComplete => {
                    if let Some((d, recovery)) = m.last_rendezvous() {
                        x.rendezvous_duration.set(d.as_secs_f64());
                        x.rendezvous.observe(d.as_secs_f64());
                        if recovery {
                            x.recovery_duration.set(d.as_secs_f64());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Remaining time at the recent commit rate, as text for the status page.
    pub fn eta(&self, status: &serde_json::Value) -> String {
        let t = self.telemetry.lock().expect("not poisoned");
        let (Some(total), Some(&(t1, n1)), Some(&(t0, n0))) = (status["total_steps"].as_u64(), t.progress.back(), t.progress.front()) else {
            return "unknown".into();
        };
        if n1 >= total {
            return "done".into();
        }
        let secs = t1.duration_since(t0).as_secs_f64();
        if n1 <= n0 || secs <= 0.0 {
            return "unknown".into();
        }
        let left = (total - n1) as f64 * secs / (n1 - n0) as f64;
        format!("{:.0} s ({:.2} steps/s)", left, (n1 - n0) as f64 / secs)
    }

    /// A rank's step timing: per-rank gauges and straggler detection (a log line when a
    /// rank is flagged or cleared).
    fn observe_step_time(&self, generation: u64, world: usize, rank: usize, step: u64, compute_seconds: f64) {
        use super::straggler::Flag;
        if !(compute_seconds > 0.0) {
            return;
        }
        let mut t = self.telemetry.lock().expect("not poisoned");
        let flags = t.stragglers.observe(generation, world, rank, step, compute_seconds);
        let x = &self.metrics;
        if t.metrics_generation != generation {
            // Ranks are renumbered each generation: drop the old ranks' series.
            t.metrics_generation = generation;
            x.rank_step_seconds.reset();
            x.rank_straggler.reset();
            for r in 0..world {
                x.rank_straggler.with_label_values(&[&r.to_string()]).set(0);
            }
        }
        x.rank_step_seconds.with_label_values(&[&rank.to_string()]).set(compute_seconds);
        for f in flags {
            match f {
                Flag::Raised { rank, step, seconds, median } => {
                    tracing::warn!("straggler: rank {rank} computed step {step} in {seconds:.3} s, the median rank in {median:.3} s");
                    x.rank_straggler.with_label_values(&[&rank.to_string()]).set(1);
                }
                Flag::Cleared { rank, step } => {
                    tracing::info!("straggler cleared: rank {rank} is back within the factor at step {step}");
                    x.rank_straggler.with_label_values(&[&rank.to_string()]).set(0);
                }
            }
        }
        x.stragglers.set(t.stragglers.flagged().iter().filter(|&&f| f).count() as i64);
    }

    /// Enables checkpoint commits (once, before serving).
    pub fn set_checkpoints(&self, sink: CheckpointSink) {
        let _ = self.ckpt.set(sink);
    }

    /// The manifest of the checkpoint that became ready, if any and if no other manifest
    /// is being written, to write with [`Coordinator::write_manifests`] once the state lock
    /// is released: the write (and its fsyncs) must not stall every other request.
    fn prepare_manifest(&self, s: &Persisted) -> Option<ManifestWrite> {
        use crate::ckpt;
        use std::sync::atomic::Ordering;
        let sink = self.ckpt.get()?;
        let c = s.machine.ready_checkpoint()?;
        if self.manifest_in_flight.swap(true, Ordering::SeqCst) {
            return None; // the writer in flight looks again when it is done
        }
        let dir = ckpt::step_dir(&sink.dir, c.steps);
        let total = s.total_steps.unwrap_or(0);
        let warmup = crate::train::schedule::warmup_steps(sink.warmup_ratio, total);
        let epoch = c.ledger.last_committed().map_or(0, |st| st.epoch);
        let frozen = c.shards.iter().find_map(|sh| sh.frozen.as_deref()).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
        let manifest = ckpt::Manifest {
            step: c.steps,
            epoch,
            world_size: c.shards.len(),
            partition: c.shards.iter().map(|sh| sh.names.clone()).collect(),
            shards: c.shards.iter().map(|sh| ckpt::ShardInfo { file: sh.file.clone(), bytes: sh.bytes, crc32: sh.crc32 }).collect(),
            warmup_steps: warmup,
            total_steps: total,
            data: serde_json::json!({ "ledger": c.ledger }),
            frozen,
            generation: Some(c.generation),
            ..sink.template.clone()
        };
        Some(ManifestWrite { steps: c.steps, generation: c.generation, dir, manifest })
    }

    /// Writes `first` (the commit point) off the state lock, then records it in the machine
    /// if its steps are still committed by the generation that wrote it, and goes on with
    /// any checkpoint that became ready meanwhile. Returns the first one's `step-N` if it
    /// was committed.
    fn write_manifests(self: &Arc<Self>, first: ManifestWrite) -> tokio::task::JoinHandle<Option<u64>> {
        let c = self.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            let mut first_committed = None;
            let mut next = Some(first);
            let mut is_first = true;
            while let Some(w) = next.take() {
                let (steps, generation, dir) = (w.steps, w.generation, w.dir.clone());
                let shards = w.manifest.shards.len();
                let written = tokio::task::spawn_blocking(move || w.write()).await.unwrap_or_else(|e| Err(format!("the manifest writer panicked: {e}")));
                let mut s = c.state.lock().await;
                let mut message = String::new();
                let ok = written.is_ok();
                match written {
                    Ok(()) if s.machine.checkpoint_still_ready(steps, generation) => {
                        let left = s.machine.checkpoint_committed(c.now(), steps);
                        tracing::info!("checkpoint step-{steps} committed ({shards} shards, generation {generation})");
                        message = format!("checkpoint step-{steps} committed");
                        if is_first {
                            first_committed = Some(steps);
                        }
                        let sink = c.ckpt.get().expect("a manifest implies a sink");
                        let (root, keep, history) = (sink.dir.clone(), sink.keep_last, sink.history.clone());
                        std::thread::spawn(move || {
                            if let Err(e) = crate::ckpt::retain(&root, keep, None) {
                                tracing::warn!("checkpoint retention: {e}");
                            }
                            if let (Some(path), false) = (history, left.is_empty()) {
                                if let Err(e) = append_history(&path, &left) {
                                    tracing::warn!("{}: step history: {e}", path.display());
                                }
                            }
                        });
                    }
                    Ok(()) => {
                        // Its steps were given back while the manifest was being written: the
                        // job continues from an older state, so this one must not exist.
                        tracing::warn!("checkpoint step-{steps}: its steps were rolled back while its manifest was written; removed");
                        let _ = std::fs::remove_file(dir.join(crate::ckpt::MANIFEST));
                    }
                    Err(e) => tracing::error!("checkpoint step-{steps}: {e}: not committed"),
                }
                let v = c.commit(&mut s, message);
                // Cleared after the commit bumped the version, so `flush` (which waits for
                // this flag) saves the checkpoint's record too.
                c.manifest_in_flight.store(false, Ordering::SeqCst);
                // After a failure the next StepDone or CheckpointDone tries again, not a loop.
                next = if ok { c.prepare_manifest(&s) } else { None };
                drop(s);
                let _ = c.durable(v).await;
                is_first = false;
            }
            first_committed
        })
    }

    /// Removes the files of the checkpoint after `step` that was abandoned (a rank could not
    /// write its shard), unless it is committed after all: a failed save must not leave
    /// the disk fuller than it found it.
    async fn remove_abandoned(&self, step: u64) {
        let Some(sink) = self.ckpt.get() else { return };
        let dir = crate::ckpt::step_dir(&sink.dir, step + 1);
        let _ = tokio::task::spawn_blocking(move || {
            if !dir.join(crate::ckpt::MANIFEST).exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::info!("removed the abandoned checkpoint {}", dir.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("{}: could not remove the abandoned checkpoint: {e}", dir.display()),
                }
            }
        })
        .await;
    }

    async fn persist(&self, s: &Persisted) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s).expect("state serializes");
        self.store.save(bytes).await
    }

    /// After an accepted event: fix total_steps once, mark the state dirty for the flusher,
    /// wake waiters, tell agents. Returns the state's version: a reply that depends on this
    /// change waits for [`Coordinator::durable`] of it (after releasing the lock), so
    /// nothing is answered before it is saved (contract 4).
    fn commit(&self, s: &mut Persisted, message: String) -> u64 {
        if s.total_steps.is_none() && matches!(s.machine.phase(), Phase::Running { .. }) {
            let cfg = s.machine.config();
            let per_step = s.machine.world() as u64 * cfg.batches_per_rank_step;
            let by_data = s.machine.ledger().total() / per_step.max(1);
            s.total_steps = Some(cfg.max_steps.map_or(by_data, |m| m.min(by_data)).max(1));
        }
        let v = self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.dirty.notify_one();
        self.refresh_metrics(s);
        // Waiters and watch streams hear of phase and generation changes only: telling
        // every node of every join or step would cost O(nodes^2) messages per rendezvous.
        let now_phase = (s.machine.generation(), s.machine.phase().to_string());
        let mut seen = self.phase_seen.lock().expect("not poisoned");
        if *seen != now_phase {
            *seen = now_phase;
            self.changed.notify_waiters();
            self.updates.send_replace(update_of(&s.machine, message));
        }
        v
    }

    /// Waits until the state as it is now is saved (before the process exits).
    pub async fn flush(&self) -> Result<(), Status> {
        // A manifest being written finishes first (up to a minute: it is a few fsyncs), so
        // a checkpoint whose shards are all durable is not lost to the exit.
        let t = std::time::Instant::now();
        while self.manifest_in_flight.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.durable(self.current_version()).await
    }

    /// The version of the state as it is now (for replies that only read it).
    fn current_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Feeds the clock to the machine (timeouts); call periodically.
    pub async fn tick(&self) {
        let mut s = self.state.lock().await;
        let events = s.machine.tick(self.now());
        if let Some(last) = events.last() {
            for e in &events {
                tracing::info!(generation = e.generation, "{:?}: {}", e.kind, e.reason);
            }
            let msg = last.reason.clone();
            self.commit(&mut s, msg);
        }
    }

    pub async fn node_lost(&self, node_id: &str, reason: &str) {
        let mut s = self.state.lock().await;
        let now = self.now();
        if s.machine.node_lost(now, node_id, reason).is_ok() {
            tracing::warn!("node {node_id} lost: {reason}");
            self.commit(&mut s, format!("node {node_id} lost: {reason}"));
        }
    }

    pub async fn phase(&self) -> Phase {
        self.state.lock().await.machine.phase().clone()
    }

    /// The whole job state as JSON (status RPC, tests, the status page).
    pub async fn status_json(&self) -> serde_json::Value {
        let s = self.state.lock().await;
        let m = &s.machine;
        // The committed steps the state still describes (the latest compacted ones, every
        // uncompacted one; older ones are in the history file); the batches of each only
        // while it is not compacted.
        let l = m.ledger();
        let steps: Vec<serde_json::Value> = l
            .history()
            .map(|c| {
                let mut v = serde_json::json!({"step": c.step, "generation": c.generation, "world": c.world, "epoch": c.epoch, "loss": c.mean_loss});
                if let Some(full) = l.committed_step(c.step) {
                    v["per_rank"] = serde_json::json!(full.per_rank);
                }
                v
            })
            .collect();
        let history = self.ckpt.get().and_then(|k| k.history.as_ref()).map(|p| p.display().to_string());
        serde_json::json!({
            "summary": m.summary(),
            "history_file": history,
            "members": m.members(),
            "total_steps": s.total_steps,
            "checkpoints": m.checkpoints(),
            "unreadable_checkpoints": m.unreadable_checkpoints(),
            "blame": m.blame().0,
            "exactly_once": m.check_exactly_once().map(|c| format!("{c:?}")).map_err(|e| e.to_string()),
            "steps": steps,
            "events": m.events().iter().rev().take(200).collect::<Vec<_>>(),
        })
    }

    /// How many node agents hold a watch stream open (they close it once they have seen
    /// the job end).
    pub fn agents_watching(&self) -> usize {
        self.agents_watching.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> watch::Receiver<pb::JobUpdate> {
        self.updates.subscribe()
    }
}

/// The tonic service over a shared [`Coordinator`].
#[derive(Clone)]
pub struct Service(pub Arc<Coordinator>);

/// Marks a node lost when its watch stream is dropped (its connection closed).
struct LostOnDrop {
    coord: Arc<Coordinator>,
    node_id: String,
}

impl Drop for LostOnDrop {
    fn drop(&mut self) {
        self.coord.agents_watching.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let (coord, node) = (self.coord.clone(), std::mem::take(&mut self.node_id));
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move { coord.node_lost(&node, "its watch stream closed (the worker exited or its connection broke)").await });
        }
    }
}

/// The `Watch` response stream: job updates, and the node marked lost when it is dropped.
pub struct WatchStream {
    inner: tokio_stream::wrappers::WatchStream<pb::JobUpdate>,
    _guard: Option<LostOnDrop>,
}

impl tokio_stream::Stream for WatchStream {
    type Item = Result<pb::JobUpdate, Status>;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx).map(|o| o.map(Ok))
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let reply = s.machine.join(c.now(), &r.node_id, r.local_ranks).map_err(refused)?;
        tracing::info!("node {} joined with {} local ranks", r.node_id, r.local_ranks);
        let v = c.commit(&mut s, format!("node {} joined", r.node_id));
        drop(s);
        c.durable(v).await?;
        Ok(Response::new(pb::JoinReply {
            job_yaml: c.job_yaml.clone(),
            generation: reply.generation,
            heartbeat_interval_ms: c.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        s.machine.heartbeat(c.now(), &r.node_id, r.generation).map_err(refused)?;
        // Heartbeats only refresh liveness: not persisted (a restarted coordinator gives
        // every node a fresh heartbeat_timeout anyway).
        Ok(Response::new(pb::HeartbeatReply { update: Some(update_of(&s.machine, String::new())) }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let rx = self.0.subscribe();
        // An observer's stream closing says nothing about its node.
        let guard = (!r.observer).then(|| {
            self.0.agents_watching.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            LostOnDrop { coord: self.0.clone(), node_id: r.node_id }
        });
        Ok(Response::new(WatchStream { inner: tokio_stream::wrappers::WatchStream::new(rx), _guard: guard }))
    }

    async fn rendezvous(&self, req: Request<pb::RendezvousRequest>) -> Result<Response<pb::Assignment>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        // Only an assignment newer than the one the caller last acted on answers it (the
        // old generation may still be running while the caller waits at its stop step),
        // and only one formed from this very process's check-in: a fresh process of the
        // same slot (its node restarted) must check in itself.
        let fresh = |a: &super::machine::Assignment| r.last_generation.is_none_or(|g| a.generation > g);
        let mine = |m: &Machine| m.assignment_of_checkin(&r.node_id, r.local_rank, r.applied_step, &r.comm_addr).filter(|a| fresh(a));
        let poll = {
            let mut s = c.state.lock().await;
            // A retried call finds its assignment already made.
            if mine(&s.machine).is_none() {
                s.machine.rendezvous(c.now(), &r.node_id, r.local_rank, r.applied_step, &r.comm_addr).map_err(refused)?;
                c.commit(&mut s, format!("{}/{} checked in", r.node_id, r.local_rank));
            }
            // Answer (pending) well within a heartbeat timeout, so a waiting process says
            // what it waits for before anyone wonders.
            RENDEZVOUS_POLL.min(s.machine.config().heartbeat_timeout / 2).max(Duration::from_millis(200))
        };
        let deadline = tokio::time::Instant::now() + poll;
        loop {
            let changed = c.changed.notified();
            {
                let mut s = c.state.lock().await;
                if let Some(a) = mine(&s.machine) {
                    let total = s.total_steps.unwrap_or(0);
                    // The assignment may come from another request's change: answer once
                    // the state holding it is saved.
                    let v = c.current_version();
                    drop(s);
                    c.durable(v).await?;
                    return Ok(Response::new(super::rpc::assignment_to_pb(a, total)));
                }
                if s.machine.phase().is_over() {
                    return Err(refused(Refusal::JobOver { phase: s.machine.phase().clone() }));
                }
                if !s.machine.checked_in(&r.node_id, r.local_rank) {
                    // The generation this check-in was for is gone: check in again.
                    s.machine.rendezvous(c.now(), &r.node_id, r.local_rank, r.applied_step, &r.comm_addr).map_err(refused)?;
                    c.commit(&mut s, format!("{}/{} checked in again", r.node_id, r.local_rank));
                    continue;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let why = c.state.lock().await.machine.waiting_for(c.now());
                return Err(super::rpc::coded(Status::unavailable(why), super::rpc::RENDEZVOUS_PENDING));
            }
        }
    }

    async fn step_done(&self, req: Request<pb::StepDoneRequest>) -> Result<Response<pb::StepReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let reply = s.machine.step_done(c.now(), r.generation, r.rank as usize, r.step, r.loss).map_err(refused)?;
        c.observe_step_time(r.generation, s.machine.world(), r.rank as usize, r.step, r.compute_seconds);
        let manifest = c.prepare_manifest(&s);
        let v = c.commit(&mut s, String::new());
        drop(s);
        if let Some(w) = manifest {
            c.write_manifests(w); // in the background: a step's reply does not wait for it
        }
        c.durable(v).await?;
        Ok(Response::new(pb::StepReply {
            committed_through: reply.committed_through,
            leases: reply.leases.into_iter().map(super::rpc::lease_to_pb).collect(),
            stop_after: reply.stop_after,
            finished: reply.job_ends,
        }))
    }

    async fn checkpoint_done(&self, req: Request<pb::CheckpointDoneRequest>) -> Result<Response<pb::CheckpointDoneReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let shard = super::machine::ShardReport { file: r.file, bytes: r.bytes, crc32: r.crc32, names: r.names, frozen: r.frozen_json };
        s.machine.checkpoint_done(c.now(), r.generation, r.rank as usize, r.step, shard).map_err(refused)?;
        let abandoned = s.machine.checkpoint_abandoned(r.step);
        let manifest = c.prepare_manifest(&s);
        let v = c.commit(&mut s, String::new());
        drop(s);
        c.durable(v).await?;
        if abandoned {
            c.remove_abandoned(r.step).await; // another rank's shard failed: this one is garbage
        }
        // The shard that completed a checkpoint hears whether it was committed.
        let committed_steps = match manifest {
            Some(w) => c.write_manifests(w).await.ok().flatten(),
            None => None,
        };
        Ok(Response::new(pb::CheckpointDoneReply { committed_steps }))
    }

    async fn report_failure(&self, req: Request<pb::FailureRequest>) -> Result<Response<pb::FailureReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        match s.machine.rank_failed(c.now(), r.generation, r.rank as usize, &r.reason, r.blamed_rank.map(|b| b as usize)) {
            Ok(_) => {
                tracing::warn!("rank {} of generation {} failed: {}", r.rank, r.generation, r.reason);
                let v = c.commit(&mut s, format!("rank {} failed: {}", r.rank, r.reason));
                drop(s);
                c.durable(v).await?;
            }
            // A second report of the same failure arrives after the generation moved on.
            Err(Refusal::StaleGeneration { .. }) => {}
            Err(e) => return Err(refused(e)),
        }
        Ok(Response::new(pb::FailureReply {}))
    }

    async fn report_unreadable_checkpoint(&self, req: Request<pb::UnreadableCheckpointRequest>) -> Result<Response<pb::FailureReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        match s.machine.checkpoint_unreadable(c.now(), r.generation, r.rank as usize, r.steps, &r.reason) {
            Ok(_) => {
                tracing::error!("checkpoint step-{} is unreadable ({}); it is no longer offered", r.steps, r.reason);
                let v = c.commit(&mut s, format!("checkpoint step-{} unreadable: {}", r.steps, r.reason));
                drop(s);
                c.durable(v).await?;
                // Uncommit it on disk too, so that nothing (a fresh coordinator, `otter
                // export`) takes it for a checkpoint again; the files stay for inspection.
                if let Some(sink) = c.ckpt.get() {
                    let dir = crate::ckpt::step_dir(&sink.dir, r.steps);
                    let _ = tokio::task::spawn_blocking(move || {
                        let from = dir.join(crate::ckpt::MANIFEST);
                        if let Err(e) = std::fs::rename(&from, dir.join(crate::ckpt::UNREADABLE_MANIFEST)) {
                            tracing::warn!("{}: could not uncommit the unreadable checkpoint: {e}", from.display());
                        }
                        let _ = std::fs::File::open(&dir).and_then(|d| d.sync_all());
                    })
                    .await;
                }
            }
            // Another rank reported it first.
            Err(Refusal::StaleGeneration { .. } | Refusal::NotRestored { .. }) => {}
            Err(e) => return Err(refused(e)),
        }
        Ok(Response::new(pb::FailureReply {}))
    }

    async fn checkpoint_failed(&self, req: Request<pb::CheckpointFailedRequest>) -> Result<Response<pb::FailureReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let first = s.machine.checkpoint_failed(c.now(), r.generation, r.rank as usize, r.step, &r.kind, &r.reason).map_err(refused)?;
        let degraded = s.machine.degraded();
        let v = c.commit(&mut s, format!("checkpoint step-{} failed", r.step + 1));
        drop(s);
        c.durable(v).await?;
        if first {
            match &degraded {
                Some(d) => tracing::error!("checkpoint step-{} failed: {}; the job is DEGRADED: {d}", r.step + 1, r.reason),
                None => tracing::warn!("checkpoint step-{} failed: {}", r.step + 1, r.reason),
            }
        }
        c.remove_abandoned(r.step).await;
        Ok(Response::new(pb::FailureReply {}))
    }

    async fn final_weights(&self, req: Request<pb::FinalWeightsRequest>) -> Result<Response<pb::FailureReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let written = match (r.path, r.error) {
            (Some(p), None) => Ok(p),
            (_, e) => Err(e.unwrap_or_else(|| "no reason given".into())),
        };
        s.machine.final_weights(c.now(), r.generation, r.rank as usize, written).map_err(refused)?;
        let message = s.machine.phase().to_string();
        let v = c.commit(&mut s, message);
        drop(s);
        c.durable(v).await?;
        Ok(Response::new(pb::FailureReply {}))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        s.machine.leave(c.now(), &r.node_id).map_err(refused)?;
        let v = c.commit(&mut s, format!("node {} leaving", r.node_id));
        drop(s);
        c.durable(v).await?;
        Ok(Response::new(pb::LeaveReply {}))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(pb::StatusReply { json: self.0.status_json().await.to_string() }))
    }
}

/// Checks the join token on every call (constant-time comparison).
pub fn auth(token: String) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let got = req.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        let ok = got.len() == token.len() && got.iter().zip(token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated(format!("wrong or missing join token ({TOKEN_HEADER})")))
        }
    }
}

/// Serves until `shutdown` resolves: the coordinator API (token-checked), the gRPC health
/// service (Kubernetes probes), and the ticker.
pub async fn serve(
    coord: Arc<Coordinator>,
    token: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_tls(coord, token, listener, None, shutdown).await
}

/// [`serve`], over TLS (rustls) when `tls` is given.
pub async fn serve_tls(
    coord: Arc<Coordinator>,
    token: String,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::coordinator_server::CoordinatorServer<Service>>().await;
    let ticker = {
        let coord = coord.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                coord.tick().await;
            }
        })
    };
    let svc = pb::coordinator_server::CoordinatorServer::with_interceptor(Service(coord), auth(token));
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    let r = builder
        .trace_fn(|req| tracing::info_span!("rpc", path = %req.uri().path()))
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await;
    ticker.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::rpc::with_token;
    use crate::coord::store::MemStore;
    use crate::coord::CoordConfig;
    use pb::coordinator_server::Coordinator as _;

    fn config() -> CoordConfig {
        CoordConfig {
            min_nodes: 1,
            max_nodes: 1,
            join_timeout: Duration::from_secs(60),
            last_call: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            batches_per_rank_step: 1,
            lease_ahead_steps: 2,
            max_steps: None,
            epochs: 1,
            exclusion_backoff: Duration::from_secs(60),
            max_failed_generations: 10,
            keep_checkpoints: 2,
            max_failed_saves: 3,
        }
    }

    async fn running() -> (Service, pb::Assignment) {
        let m = Machine::new(config(), vec![10]).unwrap();
        let c = Coordinator::open(m, Box::new(MemStore::default()), "job".into(), Duration::from_secs(1)).await.unwrap();
        let s = Service(c);
        s.join(Request::new(pb::JoinRequest { node_id: "a".into(), local_ranks: 1 })).await.unwrap();
        let req = pb::RendezvousRequest { node_id: "a".into(), local_rank: 0, applied_step: None, comm_addr: "127.0.0.1:1".into(), last_generation: None };
        let a = s.rendezvous(Request::new(req)).await.unwrap().into_inner();
        (s, a)
    }

    #[tokio::test]
    async fn a_stale_generation_is_refused_and_changes_nothing() {
        let (s, a) = running().await;
        assert_eq!((a.world, a.rank, a.start_step, a.leases.len()), (1, 0, 0, 2));
        let stale = pb::StepDoneRequest { generation: a.generation - 1, rank: 0, step: 0, loss: 1.0, ..Default::default() };
        let e = s.step_done(Request::new(stale)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().starts_with("stale generation"), "{}", e.message());
        let status = s.0.status_json().await;
        assert_eq!(status["summary"]["steps_committed"], 0);
        // The current generation is accepted.
        let ok = pb::StepDoneRequest { generation: a.generation, rank: 0, step: 0, loss: 1.0, ..Default::default() };
        let r = s.step_done(Request::new(ok)).await.unwrap().into_inner();
        assert_eq!(r.committed_through, Some(0));
    }

    #[tokio::test]
    async fn every_rpc_needs_the_join_token() {
        let m = Machine::new(config(), vec![10]).unwrap();
        let c = Coordinator::open(m, Box::new(MemStore::default()), "job".into(), Duration::from_secs(1)).await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(c, "sesame".into(), l, async {
            let _ = rx.await;
        }));
        let mut client = pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
        for token in ["", "wrong"] {
            let e = client.join(with_token(pb::JoinRequest { node_id: "x".into(), local_ranks: 1 }, token)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "token {token:?}");
        }
        let r = client.join(with_token(pb::JoinRequest { node_id: "x".into(), local_ranks: 1 }, "sesame")).await.unwrap();
        assert_eq!(r.into_inner().job_yaml, "job");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }

    /// A store whose saves wait for a go-ahead and are counted.
    #[derive(Clone)]
    struct GatedStore {
        saves: Arc<std::sync::atomic::AtomicUsize>,
        open: Arc<tokio::sync::Semaphore>,
        saved: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    }

    impl Default for GatedStore {
        fn default() -> Self {
            Self { saves: Default::default(), open: Arc::new(tokio::sync::Semaphore::new(0)), saved: Default::default() }
        }
    }

    impl StateStore for GatedStore {
        fn load(&self) -> super::super::store::StoreFuture<'_, Option<Vec<u8>>> {
            Box::pin(async { Ok(None) })
        }
        fn save(&self, bytes: Vec<u8>) -> super::super::store::StoreFuture<'_, ()> {
            Box::pin(async move {
                self.open.acquire().await.expect("open").forget();
                self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                *self.saved.lock().unwrap() = Some(bytes);
                Ok(())
            })
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    #[tokio::test]
    async fn replies_wait_for_the_save_that_holds_their_change_and_concurrent_changes_share_saves() {
        let mut cfg = config();
        (cfg.min_nodes, cfg.max_nodes) = (4, 4);
        let store = GatedStore::default();
        store.open.add_permits(1); // open()'s initial save
        let c = Coordinator::open(Machine::new(cfg, vec![40]).unwrap(), Box::new(store.clone()), "job".into(), Duration::from_secs(1)).await.unwrap();
        let s = Service(c);
        // Four joins at once: none is answered while saves are held back.
        let joins: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.join(Request::new(pb::JoinRequest { node_id: format!("n{i}"), local_ranks: 1 })).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(joins.iter().all(|j| !j.is_finished()), "a join was answered before any save");
        store.open.add_permits(100);
        for j in joins {
            j.await.unwrap().unwrap();
        }
        let saves = store.saves.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=5).contains(&saves), "1 initial save + at most one per join, here {saves}");
        // What was saved last holds all four nodes.
        let last: Persisted = serde_json::from_slice(store.saved.lock().unwrap().as_ref().unwrap()).unwrap();
        assert_eq!(last.machine.summary().nodes, 4);
    }
}
