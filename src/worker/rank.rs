//! One training process of a distributed job (`otter-worker rank`, started by the node
//! agent). Reads top to bottom:
//!
//! 1. build the model (same seed on every rank), the data source and the trainer;
//! 2. loop over generations: rendezvous with the coordinator (reporting the last step
//!    whose update our state holds), join the collective group, copy state from
//!    `sync_from` if the coordinator says ranks differ;
//! 3. per step: build this rank's leased batches (the next step's are prepared on a
//!    background thread meanwhile), forward/backward, all-reduce of trainable gradients,
//!    clip, AdamW; then `StepDone` (read before the next all-reduce, contract 2) which
//!    returns more leases and possibly a stop step;
//! 4. a collective error means a peer is gone: report it, keep the state (the update of
//!    the failed step was not applied) and rendezvous again. No restart, no reload.
//! 5. checkpoints: after every `train.save_every`-th step each rank stages its share of
//!    the state (the loop waits only for that) and writes it in the background; when the
//!    write is durable it reports `CheckpointDone`, and the coordinator writes the manifest
//!    once every rank has. A generation whose assignment says `restore_step` (no member
//!    held a state as new as the newest committed checkpoint) loads that checkpoint first,
//!    whatever world size wrote it.

use crate::comm::ring::RingGroup;
use crate::coord::ledger::BatchRef;
use crate::coord::rpc::{lease_from_pb, pb, with_token};
use crate::data::order::EpochPlan;
use crate::data::{Batch, DataSource};
use crate::model::weights::{LoadOptions, Params};
use crate::model::Otter;
use crate::run_config::{ModelSource, RunConfig};
use crate::train::grad_sync::{GradBuckets, TensorCollective};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::warmup_steps;
use crate::train::{StepConfig, TensorBatch, Trainer};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
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
}

use crate::coord::client::{call, connect, Client};

fn is_over(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("job over")
}

fn is_stale(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("stale generation")
}

/// Batches of one step, built on a background thread.
struct Prepared {
    step: u64,
    handle: std::thread::JoinHandle<Result<Vec<Batch>>>,
}

struct Data {
    source: Arc<DataSource>,
    plans: HashMap<u64, Arc<EpochPlan>>,
}

impl Data {
    fn plan(&mut self, epoch: u64) -> Arc<EpochPlan> {
        let source = self.source.clone();
        self.plans.entry(epoch).or_insert_with(|| Arc::new(source.plan(epoch))).clone()
    }

    fn prepare(&mut self, step: u64, items: &[BatchRef]) -> Prepared {
        let jobs: Vec<(Arc<EpochPlan>, usize)> = items.iter().map(|b| (self.plan(b.epoch), b.batch as usize)).collect();
        let source = self.source.clone();
        let handle = std::thread::spawn(move || {
            jobs.iter().map(|(plan, i)| source.build_batch(plan, *i).map_err(anyhow::Error::from)).collect::<Result<Vec<_>>>()
        });
        Prepared { step, handle }
    }
}

/// Copies every trainable parameter and the AdamW moments from `root` (sorted by name).
fn sync_state(trainer: &mut Trainer, comm: &mut dyn TensorCollective, root: usize) -> Result<(), crate::comm::CommError> {
    trainer.wait_for_readers(); // the broadcast writes the state a save may still be staging
    let _g = tch::no_grad_guard();
    let mut params: Vec<(String, tch::Tensor)> = trainer.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.shallow_clone())).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, p) in params.iter_mut() {
        comm.broadcast_tensor(p, root)?;
    }
    for m in trainer.opt.state.values_mut() {
        comm.broadcast_tensor(&mut m.exp_avg, root)?;
        comm.broadcast_tensor(&mut m.exp_avg_sq, root)?;
    }
    Ok(())
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

/// Reports a finished shard write to the coordinator (its generation: the one that ran
/// the step). A failed write is only logged: that checkpoint will not be committed.
#[allow(clippy::too_many_arguments)]
fn report_shard(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    args: &RankArgs,
    me: &str,
    rank: usize,
    metrics: &std::sync::Mutex<crate::metrics::RankMetrics>,
    done: (u64, Result<crate::ckpt::ShardWritten, crate::ckpt::CkptError>),
) {
    let (generation, res) = done;
    let w = match res {
        Ok(w) => {
            if let Ok(m) = metrics.lock() {
                m.checkpoint_written(w.total);
            }
            w
        }
        Err(e) => {
            eprintln!("{me}: checkpoint shard write failed (that checkpoint is not committed): {e}");
            return;
        }
    };
    let req = pb::CheckpointDoneRequest {
        generation,
        rank: rank as u32,
        step: w.steps - 1,
        file: w.info.file.clone(),
        bytes: w.info.bytes,
        crc32: w.info.crc32,
        names: w.names.clone(),
        frozen_json: w.frozen.as_ref().and_then(|f| serde_json::to_string(f).ok()),
    };
    match rt.block_on(call(client, &args.coord, |mut c| {
        let r = with_token(req.clone(), &args.token);
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

pub fn run(args: RankArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cfg = RunConfig::from_file(&args.job_file)?;
    let tc = cfg.train.clone().context("job: no `train` section")?;
    let data_cfg = cfg.data.clone().context("job: no `data` section")?;
    let device = crate::cmd::parse_device(&tc.device)?;
    crate::cmd::check_device(device)?;
    let opts = LoadOptions { device, frozen_kind: crate::cmd::parse_dtype(&tc.dtype)? };
    let me = format!("{}/{}", args.node_id, args.local_rank);

    // --- model, data, trainer (identical on every rank: same seed) --------------------
    let model = match cfg.model_source(&args.job_file)? {
        ModelSource::Dir(dir) => Otter::load_dir(&dir, opts)?,
        src @ ModelSource::Preset(_) => {
            let mcfg = src.config()?;
            let params = Params::random(&mcfg, tc.seed as i64, opts);
            Otter::new(mcfg, params, opts)
        }
    };
    let source = Arc::new(DataSource::open(&data_cfg, Some(model.cfg.text.vocab_size))?);
    let step_cfg = StepConfig {
        lr: tc.lr,
        warmup_steps: 0,
        total_steps: 1, // set from the coordinator's assignment
        clip: (tc.clip > 0.0).then_some(tc.clip),
        adamw: AdamWConfig { weight_decay: tc.weight_decay, ..Default::default() },
    };
    let mut trainer = Trainer::new(model, step_cfg);
    let buckets = GradBuckets::new(&trainer.model.trainable(), (cfg.comm.bucket_mb * (1 << 20) as f64) as usize);
    let mut data = Data { source, plans: HashMap::new() };
    let listener = TcpListener::bind((args.advertise_host.as_str(), 0)).with_context(|| format!("binding a collective listener on {}", args.advertise_host))?;
    let comm_addr = listener.local_addr()?.to_string();
    let mut client = rt.block_on(connect(&args.coord, Duration::from_secs(60)))?;
    let token = args.token.clone();

    let ckpt_dir = tc.out_dir.join("checkpoints");
    let save_every = tc.save_every;
    // Rank 0 of each generation reports the frozen weights' checksums (the saver computes
    // them once, in the background); every node checksums its own copy of the files.
    let frozen = crate::train::run::frozen_files(&cfg.model_source(&args.job_file)?)?;
    let mut saver = crate::ckpt::ShardSaver::new(if args.local_rank == 0 { frozen } else { Vec::new() });
    let mut saver_rank = 0usize; // the rank the write in flight was made as

    // --- metrics (docs/metrics.md) -------------------------------------------------------
    let started = Instant::now();
    let mut useful = Duration::ZERO;
    let metrics = Arc::new(std::sync::Mutex::new(crate::metrics::RankMetrics::new(&args.node_id)));
    if let Some(addr) = &args.metrics_addr {
        let m = metrics.clone();
        let bound = crate::metrics::spawn_server(addr, Arc::new(move || m.lock().map(|m| m.encode()).unwrap_or_default()))
            .with_context(|| format!("{me}: serving metrics on {addr}"))?;
        eprintln!("{me}: metrics on http://{bound}/metrics");
    }
    let allreduce_bytes = buckets.bytes(&trainer.model.trainable());
    // MFU where the accelerator's peak is given (OTTER_PEAK_TFLOPS, e.g. 989 for an H100's
    // dense bf16): model FLOPs per text token = 2N forward + 2N activation gradients + 2N'
    // weight gradients of the N' trainable parameters (the vision encoder's per-image FLOPs
    // are left out, so this slightly understates it).
    let peak_flops = std::env::var("OTTER_PEAK_TFLOPS").ok().and_then(|v| v.parse::<f64>().ok()).filter(|_| device.is_cuda()).map(|t| t * 1e12);
    let counts = crate::model::spec::count(&crate::model::spec::parameter_specs(&trainer.model.cfg));
    let flops_per_token = (4 * counts.total + 2 * counts.trainable) as f64;

    let mut applied: Option<u64> = None;
    let mut last_generation: Option<u64> = None;
    'generations: loop {
        if let Some(done) = saver.poll() {
            report_shard(&rt, &mut client, &args, &me, saver_rank, &metrics, done);
        }
        // --- rendezvous -----------------------------------------------------------------
        let req = pb::RendezvousRequest {
            node_id: args.node_id.clone(),
            local_rank: args.local_rank,
            applied_step: applied,
            comm_addr: comm_addr.clone(),
            last_generation,
        };
        let t_rdzv = Instant::now();
        let a = match rt.block_on(call(&mut client, &args.coord, |mut c| {
            let r = with_token(req.clone(), &token);
            async move { c.rendezvous(r).await }
        })) {
            Ok(a) => a,
            Err(s) if is_over(&s) => {
                println!("{me}: job over ({})", s.message());
                return Ok(());
            }
            Err(s) => bail!("{me}: rendezvous refused: {}", s.message()),
        };
        last_generation = Some(a.generation);
        let (rank, world) = (a.rank as usize, a.world as usize);
        metrics.lock().expect("not poisoned").set_rank(rank, a.generation);
        trainer.cfg.total_steps = a.total_steps.max(1);
        trainer.cfg.warmup_steps = warmup_steps(tc.warmup_ratio, trainer.cfg.total_steps);
        let addrs: Vec<SocketAddr> = a.comm_addrs.iter().map(|s| s.parse()).collect::<Result<_, _>>().context("comm addresses")?;
        let report = |client: &mut Client, reason: String| {
            let req = pb::FailureRequest { generation: a.generation, rank: a.rank, reason };
            let _ = rt.block_on(call(client, &args.coord, |mut c| {
                let r = with_token(req.clone(), &token);
                async move { c.report_failure(r).await }
            }));
        };
        let mut group = match RingGroup::connect_tagged(rank, &addrs, &listener, cfg.comm.timeout, a.generation) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{me}: generation {}: forming the group failed: {e}", a.generation);
                report(&mut client, e.to_string());
                continue 'generations;
            }
        };
        if let Some(root) = a.sync_from {
            if let Err(e) = sync_state(&mut trainer, &mut group, root as usize) {
                report(&mut client, format!("state sync: {e}"));
                continue 'generations;
            }
        }
        let mut restored_from_world = 0;
        if let Some(n) = a.restore_step {
            // Every rank reads what it needs from the shards, whatever world size wrote them.
            let dir = crate::ckpt::step_dir(&ckpt_dir, n);
            let m = crate::ckpt::load(&dir, &mut trainer).with_context(|| format!("{me}: restoring checkpoint {}", dir.display()))?;
            if m.step != a.start_step {
                bail!("{me}: {} holds {} steps, the coordinator starts at step {}", dir.display(), m.step, a.start_step);
            }
            applied = a.start_step.checked_sub(1);
            restored_from_world = m.world_size;
        }
        trainer.opt.step = a.start_step;
        println!(
            "{me}: generation {} rank {rank}/{world} from step {}{} (rendezvous {:.2} s) checksum {:016x}",
            a.generation,
            a.start_step,
            match (a.restore_step, a.sync_from) {
                (Some(n), _) => format!(", restored from checkpoint step-{n} (written by {restored_from_world} ranks)"),
                (None, Some(r)) => format!(", state copied from rank {r}"),
                (None, None) => String::new(),
            },
            t_rdzv.elapsed().as_secs_f64(),
            param_checksum(&trainer)
        );

        // --- steps ------------------------------------------------------------------------
        let mut leases: BTreeMap<u64, Vec<BatchRef>> = a.leases.into_iter().map(lease_from_pb).map(|l| (l.step, l.items)).collect();
        let mut step = a.start_step;
        let mut next: Option<Prepared> = leases.get(&step).map(|items| data.prepare(step, items));
        // A save handed off after the previous step: what it cost the loop is known once
        // this step's update has waited for its staging.
        let mut handoff: Option<(u64, std::time::Duration)> = None;
        loop {
            let Some(p) = next.take().filter(|p| p.step == step) else { bail!("{me}: no data lease for step {step}") };
            let _step_span = tracing::info_span!("step", step, rank, generation = a.generation).entered();
            let t0 = Instant::now();
            let batches = tracing::info_span!("data").in_scope(|| p.handle.join().map_err(|_| anyhow::anyhow!("data thread panicked")))??;
            let data_wait = t0.elapsed();
            next = leases.get(&(step + 1)).map(|items| data.prepare(step + 1, items));
            let micro: Vec<TensorBatch> = batches.iter().filter(|b| b.b > 0).map(|b| TensorBatch::from_batch(b, device)).collect();
            let stats = match trainer.step_synced(&micro, Some((&buckets, &mut group))) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{me}: step {step}: collective failed: {e}");
                    report(&mut client, e.to_string());
                    continue 'generations;
                }
            };
            applied = Some(step);
            if let Some((steps, h)) = handoff.take() {
                let blocked = h + stats.checkpoint_wait;
                metrics.lock().expect("not poisoned").checkpoint_staged(blocked);
                if rank == 0 {
                    println!("checkpoint step-{steps}: blocked the loop {:.3} s (staged during step {step}), writing in the background", blocked.as_secs_f64());
                }
            }
            let step_time = t0.elapsed();
            useful += step_time;
            let tokens: u64 = batches.iter().map(|b| b.attention_mask.iter().filter(|&&m| m != 0).count() as u64).sum();
            {
                let m = metrics.lock().expect("not poisoned");
                m.observe_step(&crate::metrics::StepSample {
                    step,
                    seconds: step_time.as_secs_f64(),
                    loss: stats.loss,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    tokens,
                    samples: batches.iter().map(|b| b.b as u64).sum(),
                    data_wait: data_wait.as_secs_f64(),
                    allreduce_seconds: stats.allreduce.as_secs_f64(),
                    allreduce_bytes,
                    world,
                    mfu: peak_flops.map(|p| flops_per_token * tokens as f64 / step_time.as_secs_f64() / p),
                });
                m.bad_samples(batches.iter().map(|b| b.dropped.len() as u64).sum());
                m.goodput(useful, started.elapsed());
            }
            let req = pb::StepDoneRequest {
                generation: a.generation,
                rank: a.rank,
                step,
                loss: stats.loss,
                step_seconds: step_time.as_secs_f64(),
                compute_seconds: step_time.saturating_sub(stats.allreduce).as_secs_f64(),
            };
            let reply = match rt.block_on(call(&mut client, &args.coord, |mut c| {
                let r = with_token(req.clone(), &token);
                async move { c.step_done(r).await }
            })) {
                Ok(r) => r,
                Err(s) if is_stale(&s) => continue 'generations,
                Err(s) if is_over(&s) => return Ok(()),
                Err(s) => bail!("{me}: step {step} refused: {}", s.message()),
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
            if let Some(done) = saver.poll() {
                report_shard(&rt, &mut client, &args, &me, saver_rank, &metrics, done);
            }
            let last = reply.stop_after == Some(step) && reply.finished;
            if save_every > 0 && (step + 1) % save_every == 0 && !last {
                let (blocked, previous) =
                    tracing::info_span!("checkpoint", steps = step + 1).in_scope(|| saver.save(&mut trainer, &ckpt_dir, step + 1, rank, world, a.generation));
                if let Some(done) = previous {
                    report_shard(&rt, &mut client, &args, &me, saver_rank, &metrics, done);
                }
                saver_rank = rank;
                handoff = Some((step + 1, blocked));
            }
            for l in reply.leases.into_iter().map(lease_from_pb) {
                leases.insert(l.step, l.items);
            }
            leases.retain(|&s, _| s > step);
            if reply.stop_after == Some(step) {
                if reply.finished {
                    if rank == 0 {
                        let path = tc.out_dir.join("final_weights.safetensors");
                        std::fs::create_dir_all(&tc.out_dir)?;
                        let w: Vec<(String, tch::Tensor)> = trainer.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.detach())).collect();
                        crate::tensors::write(&path, &w)?;
                        println!("{me}: wrote {}", path.display());
                    }
                    // The job is over: a checkpoint still being written is not needed (the
                    // final weights are), but leave no half-written file behind.
                    let _ = saver.wait();
                    println!("{me}: done after step {step} checksum {:016x}", param_checksum(&trainer));
                    return Ok(());
                }
                continue 'generations;
            }
            step += 1;
            if next.is_none() {
                next = leases.get(&step).map(|items| data.prepare(step, items));
            }
        }
    }
}
