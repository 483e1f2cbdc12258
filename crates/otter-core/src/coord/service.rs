//! The gRPC face of the coordinator: the tonic service (every handler feeds one event to
//! the machine through [`Coordinator`], persists, then answers), the watch streams whose
//! closing reports a node lost, the join-token check, and `serve`.

use super::machine::{Machine, Refusal};
use super::rpc::pb;
use super::server::{update_of, Coordinator, RENDEZVOUS_POLL, TOKEN_HEADER};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

impl From<super::persist::PersistError> for Status {
    fn from(e: super::persist::PersistError) -> Self {
        Status::unavailable(e.to_string())
    }
}

impl Coordinator {
    /// A refusal as a status, counted in `otter_coord_refusals_total{code}` (a stale
    /// generation's calls after a partition heals show there).
    fn refused(&self, r: Refusal) -> Status {
        self.count_refusal(&r);
        refusal_status(r)
    }

    fn count_refusal(&self, r: &Refusal) {
        self.metrics.refusals.with_label_values(&[r.code()]).inc();
    }
}

/// A refusal as a status: FAILED_PRECONDITION (RESOURCE_EXHAUSTED for a full job) with
/// the refusal's code in the `x-otter-refusal` metadata entry.
fn refusal_status(r: Refusal) -> Status {
    let status = match r {
        Refusal::StaleGeneration { .. } | Refusal::FutureGeneration { .. } => Status::failed_precondition(format!("stale generation: {r}")),
        Refusal::JobOver { .. } => Status::failed_precondition(format!("job over: {r}")),
        Refusal::Full { .. } => Status::resource_exhausted(r.to_string()),
        _ => Status::failed_precondition(r.to_string()),
    };
    super::rpc::coded(status, r.code())
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
    async fn job_spec(&self, _req: Request<pb::JobSpecRequest>) -> Result<Response<pb::JobSpecReply>, Status> {
        Ok(Response::new(pb::JobSpecReply { job_yaml: self.0.job_yaml.clone() }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let identity = super::rpc::identity_from_pb(r.identity).map_err(Status::invalid_argument)?;
        let mut s = c.state.lock().await;
        let reply = match s.machine.join(c.now(), &r.node_id, r.local_ranks, &identity) {
            Ok(reply) => reply,
            Err(e @ Refusal::ModelMismatch { .. }) => {
                // The operator sees who was refused and why (on the status page, in the log).
                if let Refusal::ModelMismatch { node_id, why } = &e {
                    tracing::error!("node {node_id} refused: {why}");
                    s.machine.note_refused(c.now(), node_id, why);
                }
                let v = c.commit(&mut s, format!("node {} refused", r.node_id));
                drop(s);
                c.durable(v).await?;
                return Err(c.refused(e));
            }
            Err(e) => return Err(c.refused(e)),
        };
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
        s.machine.heartbeat(c.now(), &r.node_id, r.generation).map_err(|e| c.refused(e))?;
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
                s.machine.rendezvous(c.now(), &r.node_id, r.local_rank, r.applied_step, &r.comm_addr).map_err(|e| c.refused(e))?;
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
                    let (total, per_step) = (s.machine.total_steps().unwrap_or(0), s.machine.batches_per_step().unwrap_or(0));
                    // The assignment may come from another request's change: answer once
                    // the state holding it is saved.
                    let v = c.current_version();
                    drop(s);
                    c.durable(v).await?;
                    return Ok(Response::new(super::rpc::assignment_to_pb(a, total, per_step)));
                }
                if s.machine.phase().is_over() {
                    return Err(c.refused(Refusal::JobOver { phase: s.machine.phase().clone() }));
                }
                if !s.machine.checked_in(&r.node_id, r.local_rank) {
                    // The generation this check-in was for is gone: check in again.
                    s.machine.rendezvous(c.now(), &r.node_id, r.local_rank, r.applied_step, &r.comm_addr).map_err(|e| c.refused(e))?;
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
        let reply = s.machine.step_done(c.now(), r.generation, r.rank as usize, r.step, r.loss, r.lr).map_err(|e| c.refused(e))?;
        c.observe_step(r.generation, s.machine.world(), r.step, &super::rpc::step_report(&r));
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
        let shard = super::machine::ShardReport { file: r.file, bytes: r.bytes, crc32: r.crc32, names: r.names };
        s.machine.checkpoint_done(c.now(), r.generation, r.rank as usize, r.step, shard).map_err(|e| c.refused(e))?;
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
            // A second report of the same failure arrives after the generation moved on
            // (or a rank cut off from the job reports its old generation's failure).
            Err(e @ Refusal::StaleGeneration { .. }) => c.count_refusal(&e),
            Err(e) => return Err(c.refused(e)),
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
            Err(e @ (Refusal::StaleGeneration { .. } | Refusal::NotRestored { .. })) => c.count_refusal(&e),
            Err(e) => return Err(c.refused(e)),
        }
        Ok(Response::new(pb::FailureReply {}))
    }

    async fn checkpoint_failed(&self, req: Request<pb::CheckpointFailedRequest>) -> Result<Response<pb::FailureReply>, Status> {
        let r = req.into_inner();
        let c = &self.0;
        let mut s = c.state.lock().await;
        let first = s.machine.checkpoint_failed(c.now(), r.generation, r.rank as usize, r.step, &r.kind, &r.reason).map_err(|e| c.refused(e))?;
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
        s.machine.final_weights(c.now(), r.generation, r.rank as usize, written).map_err(|e| c.refused(e))?;
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
        s.machine.leave(c.now(), &r.node_id).map_err(|e| c.refused(e))?;
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

/// Runs the coordinator's time-driven transitions (last call, timeouts) every 100 ms
/// until the returned task is aborted: what [`serve`] runs beside the API.
pub fn spawn_ticker(coord: Arc<Coordinator>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            coord.tick().await;
        }
    })
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
    let (health, _) = tonic_health::server::health_reporter();
    health.set_serving::<pb::coordinator_server::CoordinatorServer<Service>>().await;
    // A replica that may no longer act (its etcd lease is past) answers nothing, not even
    // the health check: clients then try the other replicas.
    let fenced = |coord: Arc<Coordinator>| {
        move |req: Request<()>| match coord.fence() {
            Ok(()) => Ok(req),
            Err(why) => Err(Status::unavailable(format!("not the active coordinator: {why}"))),
        }
    };
    let health_service = tonic_health::pb::health_server::HealthServer::with_interceptor(
        tonic_health::server::HealthService::from_health_reporter(health),
        fenced(coord.clone()),
    );
    let ticker = spawn_ticker(coord.clone());
    let (check_fence, mut check_token) = (fenced(coord.clone()), auth(token));
    let svc = pb::coordinator_server::CoordinatorServer::with_interceptor(Service(coord), move |req: Request<()>| check_token(check_fence(req)?));
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
    use crate::coord::server::Persisted;
    use crate::coord::store::StateStore;
    use crate::coord::rpc::with_token;
    use crate::coord::store::MemStore;
    use crate::coord::CoordConfig;
    use pb::coordinator_server::Coordinator as _;

    fn config() -> CoordConfig {
        CoordConfig { join_timeout: Duration::from_secs(60), last_call: Duration::from_secs(1), lease_ahead_steps: 2, ..CoordConfig::new(1, 1) }
    }

    async fn running() -> (Service, pb::Assignment) {
        let m = Machine::new(config(), vec![10]).unwrap();
        let c = Coordinator::open(m, Box::new(MemStore::default()), "job".into(), Duration::from_secs(1)).await.unwrap();
        let s = Service(c);
        s.join(Request::new(pb::JoinRequest { node_id: "a".into(), local_ranks: 1, identity: Some(crate::coord::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("m"))) })).await.unwrap();
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
        assert_eq!(crate::coord::rpc::refusal_code(&e), Some("stale-generation"), "{}", e.message());
        let status = s.0.status_json().await;
        assert_eq!(status["summary"]["steps_committed"], 0);
        assert_eq!(s.0.metrics.refusals.with_label_values(&["stale-generation"]).get(), 1, "counted for the operator");
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
            let e = client.join(with_token(pb::JoinRequest { node_id: "x".into(), local_ranks: 1, identity: Some(crate::coord::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("m"))) }, token)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "token {token:?}");
        }
        let r = client.join(with_token(pb::JoinRequest { node_id: "x".into(), local_ranks: 1, identity: Some(crate::coord::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("m"))) }, "sesame")).await.unwrap();
        assert_eq!(r.into_inner().job_yaml, "job");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }

    /// A store that can be told its replica may no longer act (an etcd lease past its TTL).
    #[derive(Default)]
    struct LeaseStore {
        inner: MemStore,
        past: std::sync::atomic::AtomicBool,
    }

    impl StateStore for LeaseStore {
        fn load(&self) -> super::super::store::StoreFuture<'_, Option<Vec<u8>>> {
            self.inner.load()
        }
        fn save(&self, bytes: Vec<u8>) -> super::super::store::StoreFuture<'_, ()> {
            self.inner.save(bytes)
        }
        fn describe(&self) -> String {
            "lease".into()
        }
        fn may_act(&self) -> Result<(), String> {
            match self.past.load(std::sync::atomic::Ordering::SeqCst) {
                true => Err("the lease is past".into()),
                false => Ok(()),
            }
        }
    }

    /// A replica resumed after its lease ran out (a SIGSTOP longer than the TTL) must not
    /// act on its stale clock before it notices: no tick decides anything, no RPC or health
    /// check is answered, and it deposes itself (issue 51).
    #[tokio::test]
    async fn a_replica_whose_lease_is_past_decides_nothing_and_answers_nothing() {
        let mut cfg = config();
        cfg.heartbeat_timeout = Duration::from_millis(50);
        cfg.min_nodes = 2;
        cfg.max_nodes = 2;
        let store = Arc::new(LeaseStore::default());
        struct Shared(Arc<LeaseStore>);
        impl StateStore for Shared {
            fn load(&self) -> super::super::store::StoreFuture<'_, Option<Vec<u8>>> {
                self.0.load()
            }
            fn save(&self, bytes: Vec<u8>) -> super::super::store::StoreFuture<'_, ()> {
                self.0.save(bytes)
            }
            fn describe(&self) -> String {
                self.0.describe()
            }
            fn may_act(&self) -> Result<(), String> {
                self.0.may_act()
            }
        }
        let c = Coordinator::open(Machine::new(cfg, vec![10]).unwrap(), Box::new(Shared(store.clone())), "job".into(), Duration::from_secs(1)).await.unwrap();
        Service(c.clone()).join(Request::new(pb::JoinRequest { node_id: "a".into(), local_ranks: 1, identity: Some(crate::coord::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("m"))) })).await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(serve(c.clone(), "t".into(), l, std::future::pending()));
        crate::coord::client::connect(&[addr.clone()], Duration::from_secs(5)).await.expect("serving while the lease lives");
        // Node a's heartbeat timeout passes while the lease is past: nothing may be decided.
        store.past.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.tick().await;
        assert_eq!(c.status_json().await["summary"]["nodes"], 1, "a was declared lost by a replica that may not act");
        assert!(c.fence().is_err());
        let why = tokio::time::timeout(Duration::from_secs(1), c.deposed()).await.expect("deposed");
        assert!(why.contains("lease is past"), "{why}");
        let e = match crate::coord::client::connect(&[addr.clone()], Duration::from_millis(300)).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the health check passed on a replica that may not act"),
        };
        assert!(e.contains("not the active coordinator"), "{e}");
        let ch = tonic::transport::Endpoint::try_from(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let r = pb::coordinator_client::CoordinatorClient::new(ch).heartbeat(with_token(pb::HeartbeatRequest { node_id: "a".into(), generation: 0 }, "t")).await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(!crate::coord::client::is_refusal(&e), "clients try the other replicas");
        // Control: the same tick on a replica that may act loses the node.
        store.past.store(false, std::sync::atomic::Ordering::SeqCst);
        c.tick().await;
        assert_eq!(c.status_json().await["summary"]["nodes"], 0);
        server.abort();
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
                tokio::spawn(async move { s.join(Request::new(pb::JoinRequest { node_id: format!("n{i}"), local_ranks: 1, identity: Some(crate::coord::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("m"))) })).await })
            })
            .collect();
        // Wait until all four are in the state (their changes made, the first save held at
        // the gate), then let every other task run: none may have been answered.
        while s.0.state.lock().await.machine.summary().nodes < 4 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(joins.iter().all(|j| !j.is_finished()), "a join was answered before any save");
        assert_eq!(store.saves.load(std::sync::atomic::Ordering::SeqCst), 1, "only open()'s save got through the gate");
        store.open.add_permits(100);
        for j in joins {
            j.await.unwrap().unwrap();
        }
        // The save held at the gate took a snapshot with one to four joins in it; the next
        // one holds the rest: 1 (open) + at most 2. A save per join (no sharing) would be 5.
        let saves = store.saves.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=3).contains(&saves), "1 initial save + the one in flight + one for the rest, here {saves}");
        // What was saved last holds all four nodes.
        let last: Persisted = crate::coord::persist::decode_state(store.saved.lock().unwrap().as_ref().unwrap(), "gated").unwrap();
        assert_eq!(last.machine.summary().nodes, 4);
    }
}
