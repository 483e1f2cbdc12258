//! One training process of a distributed job (`otter-worker rank`, started by the node
//! agent). Reads top to bottom:
//!
//! 1. [`Rank::new`]: build the model (same seed on every rank), the data source and the
//!    trainer; bind the collective listener; start watching the job's generation.
//! 2. [`run`]: loop over generations: [`Rank::rendezvous`] with the coordinator (reporting
//!    the last step whose update our state holds), then [`Rank::run_generation`].
//! 3. A generation: join the collective group, copy state from `sync_from` or load the
//!    checkpoint named by `restore_step`; then per step: build this rank's leased batches
//!    (the next step's are prepared on a background thread meanwhile), forward/backward,
//!    all-reduce of trainable gradients, clip, AdamW; then `StepDone` (read before the next
//!    all-reduce, contract 2) which returns more leases and possibly a stop step.
//! 4. A collective error means a peer is gone or unreachable: report it (naming the peer
//!    it could not reach, if any), keep the state (the update of the failed step was not
//!    applied) and rendezvous again. No restart, no reload. When the coordinator forms a
//!    new generation (it noticed a hung or lost node), the watch releases this process
//!    from the old generation's collective at once ([`crate::comm::Abort`]).
//! 5. Checkpoints: after every `train.save_every`-th step each rank stages its share of
//!    the state (the loop waits only for that) and writes it in the background; when the
//!    write is durable it reports `CheckpointDone`, and the coordinator writes the manifest
//!    once every rank has.
//! 6. A process whose state the job can no longer use (its node was dropped, a checkpoint
//!    load failed half way) exits with [`EXIT_RESTART_FRESH`]; its agent starts it again.

use crate::comm::ring::{RingGroup, RingTimeouts};
use crate::comm::{Abort, CommError};
use crate::coord::client::{call_with_patience, connect, Client};
use crate::coord::ledger::BatchRef;
use crate::coord::rpc::{lease_from_pb, pb, refusal_code, with_token, RENDEZVOUS_PENDING};
use crate::data::order::EpochPlan;
use crate::data::{Batch, DataSource};
use crate::model::weights::{LoadOptions, Params};
use crate::model::Otter;
use crate::run_config::{CommBackend, ModelSource, RunConfig};
use crate::train::config::TrainConfig;
use crate::train::grad_sync::{GradBuckets, TensorCollective};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::warmup_steps;
use crate::train::recut::Recut;
use crate::train::{GradSync, StepConfig, TensorBatch, Trainer};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct RankArgs {
    pub coord: Vec<String>,
    pub node_id: String,
    pub local_rank: u32,
    pub job_file: PathBuf,
    pub token: String,
    pub advertise_host: String,
    /// Serve this process's Prometheus /metrics here.
    pub metrics_addr: Option<String>,
    /// Tests only: the shard write of this checkpoint (`step-N`) stalls for an hour.
    pub fault_ckpt_stall: Option<u64>,
    /// Tests only: a CPU rank's group fails the way NCCL does (a collective with a dead
    /// peer blocks until the generation is aborted; `comm::emulated`).
    pub emulate_nccl: bool,
    /// Tests only: before this step's collectives, the generation's group is aborted (as
    /// the generation watch does) and the failure reported: a forced regroup, in the same
    /// process. Once per process.
    pub fault_abort_at_step: Option<u64>,
}

/// Exit status of a rank process that must start again fresh: the state it holds is not
/// of the job's lineage any more (its node was dropped while it was away), or a checkpoint
/// load failed half way. The agent restarts it; the new process is synced or restored.
pub const EXIT_RESTART_FRESH: i32 = 75;

/// Why a rank process must restart fresh (see [`EXIT_RESTART_FRESH`]).
#[derive(Debug, thiserror::Error)]
#[error("restart fresh: {0}")]
pub struct RestartFresh(pub String);


/// Batches of one step, built on a background thread.
struct Prepared {
    step: u64,
    handle: std::thread::JoinHandle<Result<Vec<Batch>>>,
}

struct Data {
    source: Arc<DataSource>,
    plans: HashMap<u64, Arc<EpochPlan>>,
    /// Threads building one step's batches.
    threads: usize,
}

impl Data {
    fn plan(&mut self, epoch: u64) -> Arc<EpochPlan> {
        let source = self.source.clone();
        self.plans.entry(epoch).or_insert_with(|| Arc::new(source.plan(epoch))).clone()
    }

    /// Builds the step's batches in the background, on up to `threads` threads (batch
    /// `i` on thread `i % threads`), delivered in lease order. Plans of epochs before this
    /// step's are dropped (a lease given back after a failure rebuilds one: it is a pure
    /// function of the seed and the epoch), so a long run keeps one or two.
    fn prepare(&mut self, step: u64, items: &[BatchRef]) -> Prepared {
        if let Some(first) = items.iter().map(|b| b.epoch).min() {
            self.plans.retain(|&e, _| e >= first);
        }
        let jobs: Vec<(Arc<EpochPlan>, usize)> = items.iter().map(|b| (self.plan(b.epoch), b.batch as usize)).collect();
        let (source, threads) = (self.source.clone(), self.threads.clamp(1, jobs.len().max(1)));
        let handle = std::thread::spawn(move || {
            let build = |t: usize| -> Result<Vec<Batch>> {
                jobs.iter().skip(t).step_by(threads).map(|(plan, i)| source.build_batch(plan, *i).map_err(anyhow::Error::from)).collect()
            };
            let parts: Vec<Result<Vec<Batch>>> = std::thread::scope(|s| {
                let helpers: Vec<_> = (1..threads).map(|t| s.spawn(move || build(t))).collect();
                let first = build(0);
                std::iter::once(first).chain(helpers.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a data thread panicked"))))).collect()
            });
            let mut parts: Vec<std::vec::IntoIter<Batch>> = parts.into_iter().map(|p| p.map(Vec::into_iter)).collect::<Result<_>>()?;
            Ok((0..jobs.len()).filter_map(|i| parts[i % threads].next()).collect())
        });
        Prepared { step, handle }
    }
}


/// FNV-1a over the bytes of every trainable parameter, by name: equal on all ranks iff
/// they hold bit-identical models.
pub fn param_checksum(trainer: &Trainer) -> u64 {
    let mut params: Vec<(&str, &tch::Tensor)> = trainer.model.trainable();
    params.sort_by(|a, b| a.0.cmp(b.0));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, p) in params {
        let v = Vec::<f32>::try_from(p.detach().to_kind(tch::Kind::Float).reshape([-1])).unwrap_or_default();
        for b in name.bytes().chain(v.iter().flat_map(|x| x.to_le_bytes())) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Follows the job's generation on a watch stream of its own (as an observer: its
/// closing says nothing about the node) and releases the process from a generation the
/// coordinator has given up on: a newer generation exists, or the job went back to waiting
/// for nodes, or it is over. This is what frees survivors blocked in a collective with a
/// hung peer within the coordinator's heartbeat timeout instead of the collective timeout.
struct GenerationWatch {
    /// The newest generation the coordinator announced, and whether that generation had
    /// ended (waiting for nodes, or the job over) when it last said.
    latest: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    armed: Arc<Mutex<Option<(u64, Abort)>>>,
}

impl GenerationWatch {
    fn spawn(coord: Vec<String>, node_id: String, token: String) -> Result<Self> {
        let w = Self { latest: Default::default(), ended: Default::default(), armed: Default::default() };
        let (latest, ended, armed) = (w.latest.clone(), w.ended.clone(), w.armed.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("generation-watch".into()).spawn(move || {
            rt.block_on(async move {
                loop {
                    if let Ok(mut c) = connect(&coord, Duration::from_secs(5)).await {
                        let req = pb::WatchRequest { node_id: node_id.clone(), observer: true };
                        if let Ok(stream) = c.watch(with_token(req, &token)).await {
                            let mut stream = stream.into_inner();
                            while let Ok(Some(u)) = stream.message().await {
                                latest.fetch_max(u.generation, Ordering::SeqCst);
                                if matches!(u.phase.as_str(), "waiting" | "finished" | "failed") {
                                    ended.fetch_max(u.generation, Ordering::SeqCst);
                                }
                                Self::check(&latest, &ended, &armed);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })?;
        Ok(w)
    }

    /// Aborts the armed generation if the coordinator has moved past it.
    fn check(latest: &AtomicU64, ended: &AtomicU64, armed: &Mutex<Option<(u64, Abort)>>) {
        let guard = armed.lock().unwrap_or_else(|e| e.into_inner());
        let Some((g, abort)) = guard.as_ref() else { return };
        let (latest, ended) = (latest.load(Ordering::SeqCst), ended.load(Ordering::SeqCst));
        if latest > *g {
            abort.abort(format!("the coordinator formed generation {latest}: generation {g} is over"));
        } else if ended >= *g {
            abort.abort(format!("the coordinator ended generation {g} (waiting for nodes, or the job is over)"));
        }
    }

    /// A fresh abort handle for `generation`, already fired if the coordinator is past it.
    fn arm(&self, generation: u64) -> Abort {
        let abort = Abort::new();
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, abort.clone()));
        Self::check(&self.latest, &self.ended, &self.armed);
        abort
    }
}

/// What a generation ended with.
enum Outcome {
    /// Rendezvous again: a stop step, a failed collective, a stale generation.
    Regroup,
    /// The job is over for this process.
    Done,
}

/// A rank process's long-lived state: model, optimizer, data, connections, metrics.
struct Rank {
    args: RankArgs,
    rt: tokio::runtime::Runtime,
    me: String,
    cfg: RunConfig,
    tc: TrainConfig,
    device: tch::Device,
    trainer: Trainer,
    buckets: GradBuckets,
    data: Data,
    listener: TcpListener,
    comm_addr: String,
    client: Client,
    ckpt_dir: PathBuf,
    saver: crate::ckpt::ShardSaver,
    /// The rank the write in flight was made as.
    saver_rank: usize,
    metrics: Arc<Mutex<crate::metrics::RankMetrics>>,
    started: Instant,
    useful: Duration,
    allreduce_bytes: u64,
    peak_flops: Option<f64>,
    flops: crate::model::flops::FlopsModel,
    /// The last step whose update this process's state holds (`None`: fresh).
    applied: Option<u64>,
    last_generation: Option<u64>,
    watch: GenerationWatch,
    threads: crate::cpus::RankThreads,
    /// How long a call keeps trying the coordinator's addresses (`coord.reconnect_timeout`).
    reconnect: Duration,
}

/// Runs one rank process until the job is over.
pub fn run(args: RankArgs) -> Result<()> {
    let mut rank = Rank::new(args)?;
    loop {
        rank.report_finished_shard();
        let Some(a) = rank.rendezvous()? else { return Ok(()) };
        match rank.run_generation(a)? {
            Outcome::Regroup => continue,
            Outcome::Done => return Ok(()),
        }
    }
}

impl Rank {
    fn new(args: RankArgs) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let cfg = RunConfig::from_file(&args.job_file)?;
        let tc = cfg.train.clone().context("job: no `train` section")?;
        let data_cfg = cfg.data.clone().context("job: no `data` section")?;
        let opts = LoadOptions::for_run(tc.device, tc.dtype);
        let device = opts.device;
        crate::cuda::ensure(device).map_err(|e| anyhow::anyhow!("train.device {}: {e}", tc.device))?;
        let me = format!("{}/{}", args.node_id, args.local_rank);

        // --- model, data, trainer (identical on every rank: same seed) ----------------
        let mut model = match cfg.model_source(&args.job_file)? {
            ModelSource::Dir(dir) => Otter::load_dir(&dir, opts)?,
            src @ ModelSource::Preset(_) => {
                let mcfg = src.config()?;
                let params = Params::random(&mcfg, tc.seed as i64, opts);
                Otter::new(mcfg, params, opts)
            }
        };
        model.set_activation_checkpointing(tc.activation_checkpointing);
        let source = Arc::new(DataSource::open(&data_cfg, Some(model.cfg.text.vocab_size()))?);
        let step_cfg = StepConfig {
            lr: tc.lr,
            warmup_steps: 0,
            total_steps: 1, // set from the coordinator's assignment
            clip: (tc.clip > 0.0).then_some(tc.clip),
            adamw: AdamWConfig { weight_decay: tc.weight_decay, ..Default::default() },
        };
        // Until the first assignment says how many ranks share this host, assume the
        // agent's own (it tells us how many it started).
        let local_ranks = std::env::var("OTTER_LOCAL_RANKS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        let threads = Self::apply_threads(&me, &tc, data_cfg.workers, local_ranks, None);
        let mut trainer = Trainer::new(model, step_cfg);
        trainer.deterministic = cfg.comm.deterministic;
        if tc.optimizer_sharding {
            // Each generation cuts this rank's part ([`Rank::recut_optimizer`]): the full
            // moments are never held.
            trainer.opt.state.clear();
        }
        let buckets = GradBuckets::new(&trainer.model.trainable(), (cfg.comm.bucket_mb * (1 << 20) as f64) as usize);
        let listener = TcpListener::bind((args.advertise_host.as_str(), 0)).with_context(|| format!("binding a collective listener on {}", args.advertise_host))?;
        let comm_addr = listener.local_addr()?.to_string();
        let reconnect = cfg.coord.as_ref().map_or(crate::coord::client::DEFAULT_PATIENCE, |c| c.reconnect_timeout);
        let client = rt.block_on(connect(&args.coord, reconnect))?;
        let watch = GenerationWatch::spawn(args.coord.clone(), args.node_id.clone(), args.token.clone())?;

        // (The frozen weights are the job's model identity: the agent's, checked at join.)
        let mut saver = crate::ckpt::ShardSaver::new();
        saver.stall_before_writing(args.fault_ckpt_stall);

        // --- metrics (docs/metrics.md) ---------------------------------------------------
        let metrics = Arc::new(Mutex::new(crate::metrics::RankMetrics::new(&args.node_id)));
        if let Some(addr) = &args.metrics_addr {
            let m = metrics.clone();
            let bound = crate::metrics::spawn_server(addr, Arc::new(move || m.lock().map(|m| m.encode()).unwrap_or_default()))
                .with_context(|| format!("{me}: serving metrics on {addr}"))?;
            eprintln!("{me}: metrics on http://{bound}/metrics");
        }
        let allreduce_bytes = buckets.bytes(&trainer.model.trainable());
        // MFU where the accelerator's peak is given (OTTER_PEAK_TFLOPS, e.g. 989 for an
        // H100's dense bf16): model FLOPs of a partly frozen model (model::flops: the
        // vision encoder per image, weight gradients only where weights train,
        // checkpointing's recomputation not counted).
        let peak_flops = std::env::var("OTTER_PEAK_TFLOPS").ok().and_then(|v| v.parse::<f64>().ok()).filter(|_| device.is_cuda()).map(|t| t * 1e12);
        let ckpt = trainer.model.activation_checkpointing();
        let flops = crate::model::flops::FlopsModel::new(&trainer.model.cfg, ckpt.decoder_layers(), ckpt.perceiver_layers());

        Ok(Self {
            ckpt_dir: tc.out_dir.join("checkpoints"),
            args,
            rt,
            me,
            cfg,
            tc,
            device,
            trainer,
            buckets,
            data: Data { source, plans: HashMap::new(), threads: threads.data },
            listener,
            comm_addr,
            client,
            saver,
            saver_rank: 0,
            metrics,
            started: Instant::now(),
            useful: Duration::ZERO,
            allreduce_bytes,
            peak_flops,
            flops,
            applied: None,
            last_generation: None,
            watch,
            threads,
            reconnect,
        })
    }

    /// Sizes libtorch's intra-op pool and the data threads for `colocated` ranks sharing
    /// this host (see [`crate::cpus::plan`]) and says so when they change.
    fn apply_threads(
        me: &str,
        tc: &TrainConfig,
        workers: Option<usize>,
        colocated: usize,
        current: Option<crate::cpus::RankThreads>,
    ) -> crate::cpus::RankThreads {
        let usable = crate::cpus::usable_cores();
        let overrides = crate::cpus::Overrides { intra_op: tc.cpu_threads, omp_num_threads: crate::cpus::omp_num_threads(), data: workers };
        let t = crate::cpus::plan(usable, colocated, overrides);
        if current != Some(t) {
            tch::set_num_threads(t.intra_op as i32);
            let why = match t.source {
                crate::cpus::ThreadSource::Shared => format!("{colocated} rank(s) share this host's {usable} usable cores"),
                crate::cpus::ThreadSource::Config => "train.cpu_threads".into(),
                crate::cpus::ThreadSource::Environment => "OMP_NUM_THREADS".into(),
            };
            println!("{me}: {} intra-op thread(s), {} data thread(s) ({why})", t.intra_op, t.data);
        }
        t
    }

    /// Checks in and waits for this process's assignment, saying what it waits for while
    /// it does. `None`: the job is over.
    fn rendezvous(&mut self) -> Result<Option<pb::Assignment>> {
        let req = pb::RendezvousRequest {
            node_id: self.args.node_id.clone(),
            local_rank: self.args.local_rank,
            applied_step: self.applied,
            comm_addr: self.comm_addr.clone(),
            last_generation: self.last_generation,
        };
        let mut said = (String::new(), Instant::now());
        loop {
            let token = self.args.token.clone();
            // A rendezvous may wait as long as the job waits for nodes.
            let patience = self.cfg.coord.as_ref().map_or(self.reconnect, |c| c.join_timeout.max(self.reconnect));
            let answer = self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, patience, |mut c| {
                let r = with_token(req.clone(), &token);
                async move { c.rendezvous(r).await }
            }));
            let s = match answer {
                Ok(a) => return Ok(Some(a)),
                Err(s) => s,
            };
            let me = &self.me;
            match refusal_code(&s) {
                Some(RENDEZVOUS_PENDING) => {
                    // Say it when it changes, and now and then while it does not.
                    if s.message() != said.0 || said.1.elapsed() > Duration::from_secs(30) {
                        println!("{me}: waiting: {}", s.message());
                        said = (s.message().to_string(), Instant::now());
                    }
                }
                Some("job-over") => {
                    println!("{me}: job over ({})", s.message());
                    return Ok(None);
                }
                Some("unknown-node") if self.applied.is_none() => {
                    // The node was dropped and its agent is registering it again.
                    if s.message() != said.0 {
                        println!("{me}: waiting for the node to be registered again ({})", s.message());
                        said = (s.message().to_string(), Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Some("unknown-node" | "untracked-state") => {
                    return Err(RestartFresh(format!("{me}: the job cannot use this process's state any more: {}", s.message())).into());
                }
                _ if !crate::coord::client::is_refusal(&s) => bail!("{me}: rendezvous: {}", s.message()),
                _ => bail!("{me}: rendezvous refused: {}", s.message()),
            }
        }
    }

    /// Tells the coordinator this rank's collective failed, and whom it blames.
    fn report_failure(&mut self, a: &pb::Assignment, e: &CommError) {
        let blamed_rank = e.blamed_peer().map(|p| p as u32);
        let req = pb::FailureRequest { generation: a.generation, rank: a.rank, reason: e.to_string(), blamed_rank };
        let token = self.args.token.clone();
        let _ = self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
            let r = with_token(req.clone(), &token);
            async move { c.report_failure(r).await }
        }));
    }

    /// A collective of generation `a` failed: report it unless the coordinator already
    /// gave the generation up (then the failure is its abort, not news).
    fn collective_failed(&mut self, a: &pb::Assignment, what: &str, e: CommError) -> Outcome {
        match &e {
            CommError::Aborted { reason, .. } => println!("{}: generation {}: {what} released: {reason}", self.me, a.generation),
            // The coordinator has moved on: nothing to report, rendezvous again.
            CommError::StaleGeneration { .. } => println!("{}: generation {}: {what}: {e}", self.me, a.generation),
            _ => {
                let blame = e.blamed_peer().map_or(String::new(), |p| format!(" (blaming rank {p} at {})", a.comm_addrs.get(p).map_or("?", String::as_str)));
                eprintln!("{}: generation {}: {what} failed: {e}{blame}", self.me, a.generation);
                self.report_failure(a, &e);
            }
        }
        Outcome::Regroup
    }

    /// Reports a finished background shard write, if there is one.
    fn report_finished_shard(&mut self) {
        if let Some(done) = self.saver.poll() {
            self.report_shard(done);
        }
    }

    /// Reports a finished shard write to the coordinator (its generation: the one that
    /// ran the step). A failed write is only logged: that checkpoint will not be committed.
    fn report_shard(&mut self, done: (u64, Result<crate::ckpt::ShardWritten, crate::ckpt::CkptError>)) {
        let (generation, res) = done;
        let me = self.me.clone();
        let w = match res {
            Ok(w) => {
                if let Ok(m) = self.metrics.lock() {
                    m.checkpoint_written(w.total);
                }
                w
            }
            Err(e) => {
                eprintln!("{me}: checkpoint shard write failed (that checkpoint is not committed): {e}");
                // The coordinator abandons the checkpoint (removing its files) and counts
                // the failure; the save is retried at the next `save_every` step.
                let Some(steps) = self.saver.last_steps() else { return };
                let req = pb::CheckpointFailedRequest {
                    generation,
                    rank: self.saver_rank as u32,
                    step: steps - 1,
                    kind: e.kind().to_string(),
                    reason: e.to_string(),
                };
                let token = self.args.token.clone();
                if let Err(s) = self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
                    let r = with_token(req.clone(), &token);
                    async move { c.checkpoint_failed(r).await }
                })) {
                    eprintln!("{me}: reporting the failed checkpoint: {}", s.message());
                }
                return;
            }
        };
        let req = pb::CheckpointDoneRequest {
            generation,
            rank: self.saver_rank as u32,
            step: w.steps - 1,
            file: w.info.file.clone(),
            bytes: w.info.bytes,
            crc32: w.info.crc32,
            names: w.names.clone(),
        };
        let token = self.args.token.clone();
        match self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
            let r = with_token(req.clone(), &token);
            async move { c.checkpoint_done(r).await }
        })) {
            Ok(r) => {
                if let Some(n) = r.committed_steps {
                    println!("{me}: checkpoint step-{n} committed");
                }
            }
            Err(s) => eprintln!("{me}: checkpoint step-{} shard not accepted: {}", w.steps, s.message()),
        }
    }

    /// Loads checkpoint `step-{n}` as the assignment says. A checkpoint that cannot be read
    /// (a shard's checksum, a missing file) is reported, so that the coordinator never
    /// offers it again; either way this process's state is now partly overwritten, so it
    /// restarts fresh.
    fn restore(&mut self, a: &pb::Assignment, n: u64) -> Result<usize> {
        let dir = crate::ckpt::step_dir(&self.ckpt_dir, n);
        let e = match crate::ckpt::load(&dir, &mut self.trainer) {
            Ok(m) if m.step == a.start_step => return Ok(m.world_size),
            Ok(m) => bail!("{}: {} holds {} steps, the coordinator starts at step {}", self.me, dir.display(), m.step, a.start_step),
            Err(e) => e,
        };
        let unreadable = match &e {
            crate::ckpt::CkptError::Checksum { .. } | crate::ckpt::CkptError::Format { .. } => true,
            crate::ckpt::CkptError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        };
        let reason = e.to_string();
        eprintln!("{}: generation {}: checkpoint step-{n} could not be read: {reason}", self.me, a.generation);
        if unreadable {
            let req = pb::UnreadableCheckpointRequest { generation: a.generation, rank: a.rank, steps: n, reason: reason.clone() };
            let token = self.args.token.clone();
            let _ = self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
                let r = with_token(req.clone(), &token);
                async move { c.report_unreadable_checkpoint(r).await }
            }));
        }
        Err(RestartFresh(format!("{}: loading checkpoint step-{n} failed half way: {reason}", self.me)).into())
    }

    /// Forms generation `a`'s group, brings the state to `a.start_step`, and trains until
    /// the generation stops or fails.
    fn run_generation(&mut self, a: pb::Assignment) -> Result<Outcome> {
        let t_rdzv = Instant::now();
        self.last_generation = Some(a.generation);
        let (rank, world) = (a.rank as usize, a.world as usize);
        self.metrics.lock().expect("not poisoned").set_rank(rank, a.generation);
        self.trainer.cfg.total_steps = a.total_steps.max(1);
        self.trainer.cfg.warmup_steps = warmup_steps(self.tc.warmup_ratio, self.trainer.cfg.total_steps);
        let addrs: Vec<SocketAddr> = a.comm_addrs.iter().map(|s| s.parse()).collect::<Result<_, _>>().context("comm addresses")?;
        let colocated = crate::cpus::colocated(&addrs, rank);
        self.threads = Self::apply_threads(&self.me, &self.tc, self.cfg.data.as_ref().and_then(|d| d.workers), colocated, Some(self.threads));
        self.data.threads = self.threads.data;
        self.metrics.lock().expect("not poisoned").threads(self.threads.intra_op, self.threads.data);
        let abort = self.watch.arm(a.generation);
        let t_group = Instant::now();
        // Every collective of this generation fails once it is aborted, even one the
        // backend reports as done (c10d's aborted NCCL work does: GenerationGroup).
        let mut group: Box<dyn TensorCollective + Send> = match self.form_group(&a, &addrs, abort.clone()) {
            Ok(g) => Box::new(crate::comm::GenerationGroup::new(g, abort.clone())),
            Err(e) => return Ok(self.collective_failed(&a, "forming the group", e)),
        };
        if self.tc.optimizer_sharding {
            match self.recut_optimizer(&a, &mut *group) {
                Ok(()) => {}
                Err(Recut::Comm(e)) => return Ok(self.collective_failed(&a, "re-cutting the optimizer state", e)),
                Err(Recut::Lost(why)) => return Err(RestartFresh(format!("{}: generation {}: {why}", self.me, a.generation)).into()),
            }
        }
        if let Some(root) = a.sync_from {
            if let Err(e) = self.trainer.sync_from(&mut *group, root as usize) {
                if self.trainer.params_incomplete {
                    // Half copied: it must not be the state anyone copies next.
                    self.applied = None;
                }
                return Ok(self.collective_failed(&a, "the state sync", e));
            }
            self.trainer.params_incomplete = false;
        } else if self.trainer.params_incomplete && a.restore_step.is_none() {
            // Nothing will overwrite this process's half-updated parameters.
            return Err(RestartFresh(format!("{}: generation {}: its parameters are of no step (a sharded step failed half way)", self.me, a.generation)).into());
        }
        let mut restored_from_world = 0;
        if let Some(n) = a.restore_step {
            // Every rank reads what it needs from the shards, whatever world size wrote them.
            restored_from_world = self.restore(&a, n)?;
            self.trainer.params_incomplete = false;
            self.applied = a.start_step.checked_sub(1);
        }
        self.trainer.opt.step = a.start_step;
        if let Some(zero) = &mut self.trainer.zero {
            zero.set_updates(a.start_step);
        }
        if a.final_weights_only {
            // Every step is trained: this generation only brings the state together.
            println!("{}: generation {} rank {rank}/{world}: every step is trained", self.me, a.generation);
            return self.finish(&a);
        }
        println!(
            "{}: generation {} rank {rank}/{world} from step {}{} (rendezvous {:.2} s) checksum {:016x}",
            self.me,
            a.generation,
            a.start_step,
            match (a.restore_step, a.sync_from) {
                (Some(n), _) => format!(", restored from checkpoint step-{n} (written by {restored_from_world} ranks)"),
                (None, Some(r)) => format!(", state copied from rank {r}"),
                (None, None) => String::new(),
            },
            t_rdzv.elapsed().as_secs_f64(),
            param_checksum(&self.trainer)
        );
        if self.device.is_cuda() {
            println!(
                "{}: generation {}: NCCL group of {world} formed on {:?} through rank 0's store ({:.2} s)",
                self.me,
                a.generation,
                self.device,
                t_group.elapsed().as_secs_f64()
            );
        }
        self.train_steps(a, &mut *group, &abort)
    }

    /// With `train.optimizer_sharding`: this rank's part of the optimizer state for
    /// generation `a`, re-cut from the members' parts (`Trainer::recut_optimizer`).
    fn recut_optimizer(&mut self, a: &pb::Assignment, group: &mut (dyn TensorCollective + Send)) -> Result<(), Recut> {
        let restoring = a.restore_step.is_some();
        let (rank, world) = (a.rank as usize, a.world as usize);
        if let Some(old_world) = self.trainer.recut_optimizer(&self.buckets, group, rank, world, a.start_step, restoring)? {
            println!("{}: generation {}: optimizer state re-cut from {old_world} parts into {world}", self.me, a.generation);
        }
        Ok(())
    }

    /// Generation `a`'s group, by device and `comm.backend`: NCCL for a CUDA rank
    /// (bootstrapped through the generation's store, which rank 0 serves on its collective
    /// listener) unless the job says `ring`; the ring otherwise (on CUDA tensors through
    /// host copies: ranks sharing one GPU). Either is released by `abort` (the coordinator moved on): the ring
    /// through its sockets, NCCL by aborting its communicator.
    fn form_group(&self, a: &pb::Assignment, addrs: &[SocketAddr], abort: Abort) -> Result<Box<dyn TensorCollective + Send>, CommError> {
        let (rank, world, generation) = (a.rank as usize, a.world as usize, a.generation);
        let comm = &self.cfg.comm;
        if let tch::Device::Cuda(device) = self.device {
            if comm.backend != CommBackend::Ring {
                return self.form_nccl(rank, world, generation, addrs, device, abort);
            }
        }
        let timeouts = RingTimeouts { op: comm.timeout, connect: comm.connect_timeout, peer: comm.peer_timeout };
        if self.args.emulate_nccl {
            let g = crate::comm::emulated::NcclLike::form(rank, addrs, &self.listener, timeouts, generation, self.args.token.as_bytes(), &abort)?;
            return Ok(Box::new(g));
        }
        // The join token keys the data-plane handshake: only the job's ranks get in.
        Ok(Box::new(RingGroup::form(rank, addrs, &self.listener, timeouts, generation, self.args.token.as_bytes(), abort)?))
    }

    #[cfg(feature = "nccl")]
    fn form_nccl(&self, rank: usize, world: usize, generation: u64, addrs: &[SocketAddr], device: usize, abort: Abort) -> Result<Box<dyn TensorCollective + Send>, CommError> {
        use crate::comm::store::GenerationStore;
        let comm = &self.cfg.comm;
        let store = match rank {
            0 => GenerationStore::serve(&self.listener, generation, comm.connect_timeout)?,
            _ => GenerationStore::join(addrs[0], rank, generation, comm.connect_timeout)?,
        };
        let group = crate::comm::nccl::NcclGroup::new(&store, rank, world, device, comm.timeout)?;
        abort.on_abort(group.abort_hook());
        Ok(Box::new(group))
    }

    #[cfg(not(feature = "nccl"))]
    fn form_nccl(&self, _: usize, _: usize, _: u64, _: &[SocketAddr], device: usize, _: Abort) -> Result<Box<dyn TensorCollective + Send>, CommError> {
        Err(CommError::Invalid(format!(
            "a rank on cuda:{device} needs NCCL, and this otter-worker was built without it (build with --features nccl, as the worker image is)"
        )))
    }

    /// Every step is trained: rank 0 writes the final weights (complete and durable, or not
    /// at all) and tells the coordinator, which ends the job either way; the other ranks
    /// wait at the rendezvous until it does (if rank 0 is lost meanwhile, they form the
    /// generation that writes them).
    fn finish(&mut self, a: &pb::Assignment) -> Result<Outcome> {
        // A checkpoint still being written is not needed now (the final weights are), but
        // let it end so that nothing is left half written.
        if let Some(done) = self.saver.wait() {
            self.report_shard(done);
        }
        if a.rank != 0 {
            return Ok(Outcome::Regroup);
        }
        let me = self.me.clone();
        let path = self.tc.out_dir.join("final_weights.safetensors");
        let w: Vec<(String, tch::Tensor)> = self.trainer.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.detach())).collect();
        let written = std::fs::create_dir_all(&self.tc.out_dir)
            .map_err(|e| format!("{}: {e}", self.tc.out_dir.display()))
            .and_then(|()| crate::tensors::write(&path, &w).map_err(|e| e.to_string()));
        let req = match &written {
            Ok(()) => {
                println!("{me}: wrote {}", path.display());
                pb::FinalWeightsRequest { generation: a.generation, rank: a.rank, path: Some(path.display().to_string()), error: None }
            }
            Err(e) => {
                eprintln!("{me}: the final weights could not be written: {e}");
                pb::FinalWeightsRequest { generation: a.generation, rank: a.rank, path: None, error: Some(e.clone()) }
            }
        };
        let token = self.args.token.clone();
        if let Err(s) = self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
            let r = with_token(req.clone(), &token);
            async move { c.final_weights(r).await }
        })) {
            eprintln!("{me}: reporting the final weights: {}", s.message());
        }
        Ok(Outcome::Done)
    }

    /// The steps of one generation.
    fn train_steps(&mut self, a: pb::Assignment, group: &mut (dyn TensorCollective + Send), abort: &Abort) -> Result<Outcome> {
        let (rank, world) = (a.rank as usize, a.world as usize);
        let me = self.me.clone();
        let mut leases: BTreeMap<u64, Vec<BatchRef>> = a.leases.iter().cloned().map(lease_from_pb).map(|l| (l.step, l.items)).collect();
        let mut step = a.start_step;
        let mut next: Option<Prepared> = leases.get(&step).map(|items| self.data.prepare(step, items));
        // A save handed off after the previous step: what it cost the loop is known once
        // this step's update has waited for its staging.
        let mut handoff: Option<(u64, Duration)> = None;
        // Steps of this generation not yet known to be committed, with their times: they
        // count as useful (goodput) once a reply says they are, never if the generation
        // ends first (their batches are trained again).
        let mut uncommitted: std::collections::VecDeque<(u64, Duration)> = Default::default();
        loop {
            let Some(p) = next.take().filter(|p| p.step == step) else { bail!("{me}: no data lease for step {step}") };
            let _step_span = tracing::info_span!("step", step, rank, generation = a.generation).entered();
            let t0 = Instant::now();
            let batches = tracing::info_span!("data").in_scope(|| p.handle.join().map_err(|_| anyhow::anyhow!("data thread panicked")))??;
            let data_wait = t0.elapsed();
            next = leases.get(&(step + 1)).map(|items| self.data.prepare(step + 1, items));
            let micro: Vec<TensorBatch> = batches.iter().filter(|b| b.b > 0).map(|b| TensorBatch::from_batch(b, self.device)).collect();
            if self.args.fault_abort_at_step == Some(step) {
                self.args.fault_abort_at_step = None;
                println!("{me}: fault injection: aborting generation {}'s group at step {step}", a.generation);
                abort.abort(format!("fault injection at step {step}"));
                let e = CommError::Protocol { rank, message: format!("fault injection: the group was aborted at step {step}") };
                return Ok(self.collective_failed(&a, &format!("step {step}"), e));
            }
            let sync = GradSync {
                buckets: &self.buckets,
                comm: &mut *group,
                overlap: self.cfg.comm.overlap,
                step_micro_batches: a.batches_per_step as usize,
            };
            let stats = match self.trainer.step_synced(&micro, Some(sync)) {
                Ok(s) => s,
                Err(e) => {
                    if self.trainer.params_incomplete {
                        // Its parameters are of no step: it must not be the one others copy.
                        self.applied = None;
                    }
                    return Ok(self.collective_failed(&a, &format!("step {step}: the all-reduce"), e));
                }
            };
            self.applied = Some(step);
            if let Some((steps, h)) = handoff.take() {
                let blocked = h + stats.checkpoint_wait;
                self.metrics.lock().expect("not poisoned").checkpoint_staged(blocked);
                if rank == 0 {
                    println!("checkpoint step-{steps}: blocked the loop {:.3} s (staged during step {step}), writing in the background", blocked.as_secs_f64());
                }
            }
            let step_time = t0.elapsed();
            uncommitted.push_back((step, step_time));
            let tokens: u64 = batches.iter().map(|b| b.attention_mask.iter().filter(|&&m| m != 0).count() as u64).sum();
            let samples: u64 = batches.iter().map(|b| b.b as u64).sum();
            let mfu = self.peak_flops.map(|p| {
                let useful: f64 = batches
                    .iter()
                    .map(|b| {
                        let text_tokens = b.attention_mask.iter().filter(|&&m| m != 0).count() as u64;
                        let shape = crate::model::flops::StepShape { text_tokens, media: (b.b * b.t) as u64, frames: b.f as u64 };
                        self.flops.step(shape).useful
                    })
                    .sum();
                useful / step_time.as_secs_f64() / p
            });
            {
                let m = self.metrics.lock().expect("not poisoned");
                m.observe_step(&crate::metrics::StepSample {
                    step,
                    seconds: step_time.as_secs_f64(),
                    loss: stats.loss,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    tokens,
                    samples,
                    data_wait: data_wait.as_secs_f64(),
                    allreduce_seconds: stats.allreduce.as_secs_f64(),
                    allreduce_exposed_seconds: stats.allreduce_exposed.as_secs_f64(),
                    allreduce_bytes: self.allreduce_bytes,
                    world,
                    mfu,
                    optimizer_state_bytes: self.trainer.optimizer_state_bytes(),
                });
                m.bad_samples(batches.iter().map(|b| b.dropped.len() as u64).sum());
            }
            let req = pb::StepDoneRequest {
                generation: a.generation,
                rank: a.rank,
                step,
                loss: stats.loss,
                step_seconds: step_time.as_secs_f64(),
                compute_seconds: step_time.saturating_sub(stats.allreduce_exposed).as_secs_f64(),
                lr: stats.lr,
                samples,
                tokens,
                data_wait_seconds: data_wait.as_secs_f64(),
                mfu,
            };
            let token = self.args.token.clone();
            let reply = match self.rt.block_on(call_with_patience(&mut self.client, &self.args.coord, self.reconnect, |mut c| {
                let r = with_token(req, &token);
                async move { c.step_done(r).await }
            })) {
                Ok(r) => r,
                Err(s) => match refusal_code(&s) {
                    // The generation is gone (re-formed, or the job waits for nodes).
                    Some("stale-generation" | "not-running") => return Ok(Outcome::Regroup),
                    Some("job-over") => return Ok(Outcome::Done),
                    _ if !crate::coord::client::is_refusal(&s) => bail!("{me}: step {step}: {}", s.message()),
                    _ => bail!("{me}: step {step} refused: {}", s.message()),
                },
            };
            if rank == 0 {
                println!(
                    "step {step:>5}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  step {:.3} s  data wait {:.3} s",
                    stats.loss,
                    stats.lr,
                    stats.grad_norm,
                    t0.elapsed().as_secs_f64(),
                    data_wait.as_secs_f64()
                );
            }
            while let (Some(&(s, t)), Some(through)) = (uncommitted.front(), reply.committed_through) {
                if s > through {
                    break;
                }
                self.useful += t;
                uncommitted.pop_front();
            }
            self.metrics.lock().expect("not poisoned").goodput(self.useful, self.started.elapsed());
            self.report_finished_shard();
            let last = reply.stop_after == Some(step) && reply.finished;
            let save_every = self.tc.save_every;
            if save_every > 0 && (step + 1) % save_every == 0 && !last {
                // A sharded optimizer first gathers the full moments of what this rank saves.
                if let Err(e) = self.trainer.gather_for_checkpoint(&mut *group, rank, world) {
                    return Ok(self.collective_failed(&a, &format!("gathering the optimizer state for checkpoint step-{}", step + 1), e));
                }
                let (blocked, previous) = tracing::info_span!("checkpoint", steps = step + 1)
                    .in_scope(|| self.saver.save(&mut self.trainer, &self.ckpt_dir, step + 1, rank, world, a.generation));
                if let Some(done) = previous {
                    self.report_shard(done);
                }
                self.trainer.release_checkpoint_moments();
                self.saver_rank = rank;
                handoff = Some((step + 1, blocked));
            }
            for l in reply.leases.into_iter().map(lease_from_pb) {
                leases.insert(l.step, l.items);
            }
            leases.retain(|&s, _| s > step);
            if reply.stop_after == Some(step) {
                if reply.finished {
                    println!("{me}: done after step {step} checksum {:016x}", param_checksum(&self.trainer));
                    return self.finish(&a);
                }
                return Ok(Outcome::Regroup);
            }
            step += 1;
            if next.is_none() {
                next = leases.get(&step).map(|items| self.data.prepare(step, items));
            }
        }
    }
}
