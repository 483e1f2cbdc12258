//! The coordinator's async shell: a tonic service that feeds RPCs and clock ticks to the
//! pure [`Machine`], persists its state (through a [`StateStore`]) before answering, and
//! carries out its replies. No decision is made here. Its rooms: this file (the
//! [`Coordinator`] and what every event goes through: `commit`, `tick`, the status),
//! `persist.rs` (group commit), `telemetry.rs` (metrics, stragglers), `manifests.rs`
//! (checkpoint commits, retention, history), `service.rs` (the gRPC handlers, `serve`).
//!
//! * `Rendezvous` long-polls: the check-in goes to the machine, then the call waits (on a
//!   notification after every state change) until the assignment exists, or answers
//!   UNAVAILABLE after [`RENDEZVOUS_POLL`] so the caller retries.
//! * `Watch` is held open by each worker agent; when it closes (the agent died: the kernel
//!   closes its socket) the node is reported lost at once.
//! * A ticker feeds `tick(now)` for heartbeat, last-call and rendezvous timeouts.
//! * Every RPC must carry the job's join token in `x-otter-token`.

pub use super::manifests::CheckpointSink;
use super::machine::{Machine, Phase};
use super::persist::Durable;
use super::rpc::pb;
pub use super::service::{auth, serve, serve_tls, Service};
use super::store::{StateStore, StoreError};
pub use super::telemetry::Telemetry;
use super::Millis;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, Notify};

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
    /// Where the previous version kept the schedule length (now the machine's); read so
    /// that its states load, never written.
    #[serde(default, skip_serializing)]
    pub total_steps: Option<u64>,
}

pub struct Coordinator {
    pub(super) ckpt: std::sync::OnceLock<CheckpointSink>,
    /// A checkpoint manifest is being written, off the state lock (at most one at a time;
    /// its writer looks for the next ready checkpoint when it is done).
    pub(super) manifest_in_flight: std::sync::atomic::AtomicBool,
    /// Bumped (under the state lock) by every accepted change.
    pub(super) version: std::sync::atomic::AtomicU64,
    /// Group commit: changes mark the state dirty; one flusher saves the newest state and
    /// every request whose change it includes answers then (many ranks' `StepDone` of one
    /// step share one save instead of queueing one each behind the lock).
    pub(super) dirty: Notify,
    pub(super) durable: watch::Sender<Durable>,
    pub(super) save_stats: std::sync::Mutex<super::persist::SaveStats>,
    /// Set when another replica took over (a fenced save): this one must stop acting.
    pub(super) deposed: watch::Sender<Option<String>>,
    pub metrics: crate::metrics::CoordMetrics,
    pub telemetry: std::sync::Mutex<Telemetry>,
    pub(super) state: Mutex<Persisted>,
    pub(super) store: Box<dyn StateStore>,
    /// Notified when the phase or the generation changes: what a rendezvous waits for
    /// (waking every waiter on every change costs O(nodes^2) per rendezvous).
    pub(super) changed: Notify,
    /// The (generation, phase) the waiters last heard of.
    pub(super) phase_seen: std::sync::Mutex<(u64, String)>,
    /// Node agents holding a watch stream open now.
    pub(super) agents_watching: std::sync::atomic::AtomicUsize,
    /// The last status built for the HTTP endpoints, and when: requests within
    /// [`STATUS_MAX_AGE`] share it instead of each building one under the state lock.
    pub(super) status_cache: Mutex<Option<(std::time::Instant, Arc<serde_json::Value>)>>,
    pub(super) updates: watch::Sender<pb::JobUpdate>,
    pub(super) job_yaml: String,
    pub(super) heartbeat_interval: Duration,
}

pub(super) fn update_of(m: &Machine, message: String) -> pb::JobUpdate {
    let phase = match m.phase() {
        Phase::WaitingForNodes => "waiting",
        Phase::Rendezvous { .. } => "rendezvous",
        Phase::Running { .. } => "running",
        Phase::Finished => "finished",
        Phase::Failed { .. } => "failed",
    };
    pb::JobUpdate { generation: m.generation(), phase: phase.into(), message }
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
                let mut s = super::persist::decode_state(&bytes, &store.describe())?;
                s.machine.adopt_total_steps(s.total_steps);
                s.machine.resume(wall_now());
                s
            }
            None => Persisted { machine: fresh, total_steps: None },
        };
        let (updates, _) = watch::channel(update_of(&state.machine, "coordinator started".into()));
        let telemetry = Telemetry::new();
        let c = Arc::new(Self {
            version: Default::default(),
            dirty: Notify::new(),
            durable: watch::channel(Durable::default()).0,
            save_stats: Default::default(),
            deposed: watch::channel(None).0,
            ckpt: Default::default(),
            manifest_in_flight: Default::default(),
            metrics: crate::metrics::CoordMetrics::new(),
            telemetry: std::sync::Mutex::new(telemetry),
            state: Mutex::new(state), store, changed: Notify::new(), phase_seen: Default::default(), agents_watching: Default::default(), status_cache: Mutex::new(None), updates, job_yaml, heartbeat_interval });
        c.persist(&*c.state.lock().await).await?;
        tokio::spawn(Self::flusher(Arc::downgrade(&c)));
        Ok(c)
    }

    pub fn now(&self) -> Millis {
        wall_now()
    }

    /// After an accepted event: mark the state dirty for the flusher,
    /// wake waiters, tell agents. Returns the state's version: a reply that depends on this
    /// change waits for [`Coordinator::durable`] of it (after releasing the lock), so
    /// nothing is answered before it is saved (contract 4).
    pub(super) fn commit(&self, s: &mut Persisted, message: String) -> u64 {
        let v = self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.dirty.notify_one();
        self.refresh_metrics(s);
        // Waiters and watch streams hear of phase and generation changes only: telling
        // every node of every join or step would cost O(nodes^2) messages per rendezvous.
        let now_phase = (s.machine.generation(), s.machine.phase().to_string());
        let mut seen = self.phase_seen.lock().expect("not poisoned");
        // A replica that may no longer act tells nobody anything (its change is never saved).
        if *seen != now_phase && self.fence().is_ok() {
            *seen = now_phase;
            self.changed.notify_waiters();
            self.updates.send_replace(update_of(&s.machine, message));
        }
        v
    }

    /// Feeds the clock to the machine (timeouts); call periodically.
    pub async fn tick(&self) {
        if self.fence().is_err() {
            return;
        }
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

    /// The operator allows `parts` of the model to change (`--accept-model-change`).
    pub async fn accept_model_change(&self, parts: &[crate::model::identity::Part]) -> Result<(), super::persist::PersistError> {
        let mut s = self.state.lock().await;
        let now = self.now();
        s.machine.accept_model_change(now, parts);
        let v = self.commit(&mut s, "model change accepted".into());
        drop(s);
        self.durable(v).await
    }

    pub async fn node_lost(&self, node_id: &str, reason: &str) {
        if self.fence().is_err() {
            return; // a deposed replica's streams close as it stops: that says nothing of the node
        }
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
        let t = self.telemetry.lock().expect("not poisoned");
        let steps: Vec<serde_json::Value> = l
            .history()
            .map(|c| {
                let mut v = serde_json::json!({
                    "step": c.step, "generation": c.generation, "world": c.world, "epoch": c.epoch,
                    "loss": c.mean_loss, "lr": c.lr, "micro_batches": c.micro_batches,
                });
                if let Some(full) = l.committed_step(c.step) {
                    v["batches"] = serde_json::json!(full.batches);
                }
                // As measured by the ranks (this coordinator's, since it started).
                if let Some(x) = t.steps.step(c.step) {
                    v["seconds"] = serde_json::json!(x.seconds);
                    v["samples"] = serde_json::json!(x.samples);
                    v["tokens"] = serde_json::json!(x.tokens);
                    v["mfu"] = serde_json::json!(x.mfu);
                }
                v
            })
            .collect();
        let flagged = t.stragglers.flagged();
        let ranks: Vec<serde_json::Value> = t
            .steps
            .ranks()
            .iter()
            .enumerate()
            .map(|(r, x)| {
                serde_json::json!({
                    "rank": r,
                    "compute_seconds": x.map(|x| x.compute_seconds),
                    "data_wait_seconds": x.map(|x| x.data_wait_seconds),
                    "straggler": flagged.get(r).copied().unwrap_or(false),
                })
            })
            .collect();
        let now = self.now();
        let goodput = t.steps.goodput(now);
        let checkpoint_log: Vec<_> = t.steps.checkpoints().copied().collect();
        drop(t);
        let history = self.ckpt.get().and_then(|k| k.history.as_ref()).map(|p| p.display().to_string());
        let mut v = serde_json::json!({
            "summary": m.summary(),
            "history_file": history,
            "members": m.members(),
            "total_steps": m.total_steps(),
            "batches_per_step": m.batches_per_step(),
            "checkpoints": m.checkpoints(),
            "unreadable_checkpoints": m.unreadable_checkpoints(),
            "blame": m.blame().0,
            "exactly_once": m.check_exactly_once().map(|c| format!("{c:?}")).map_err(|e| e.to_string()),
            "steps": steps,
            "events": m.events().iter().rev().take(200).collect::<Vec<_>>(),
            "now": now,
            "goodput": goodput,
            "ranks": ranks,
            "checkpoint_log": checkpoint_log,
        });
        v["eta"] = serde_json::json!(self.eta(&v));
        v
    }

    /// The status as of at most `max_age` ago, for the unauthenticated HTTP endpoints:
    /// however many clients poll, it is built (under the state lock) at most once per
    /// `max_age`; concurrent requests wait for that one build.
    pub async fn status_snapshot(&self, max_age: Duration) -> Arc<serde_json::Value> {
        let mut cache = self.status_cache.lock().await;
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < max_age {
                return v.clone();
            }
        }
        let v = Arc::new(self.status_json().await);
        *cache = Some((std::time::Instant::now(), v.clone()));
        v
    }

    /// Whether this replica may act for the job now ([`StateStore::may_act`], on the local
    /// clock). Once it may not, it is deposed (the binary stops serving) and the reason is
    /// returned; every RPC and every tick checks this first.
    pub fn fence(&self) -> Result<(), String> {
        self.store.may_act().map_err(|why| {
            self.deposed.send_if_modified(|d| {
                let first = d.is_none();
                if first {
                    tracing::error!("{why}: this coordinator stops acting");
                    *d = Some(why.clone());
                }
                first
            });
            why
        })
    }

    /// Resolves once the store says this replica may no longer act (its etcd lease is
    /// gone); never for the embedded stores.
    pub async fn leadership_lost(&self) -> String {
        self.store.leadership_lost().await.unwrap_or_else(|e| e.to_string())
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
