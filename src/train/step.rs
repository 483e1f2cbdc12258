//! One optimizer step: micro-batches, gradient accumulation, clip, AdamW.

use crate::ckpt::ReadFence;
use crate::data::Batch;
use crate::model::{causal_lm_loss, Otter};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, Moments};
use super::zero::ShardedAdamW;
use std::collections::BTreeMap;
use super::grad_sync::{GradBuckets, SyncTimes, TensorCollective};
use super::schedule;
use crate::comm::CommError;
use tch::{Device, Tensor};

/// A batch as tensors on the model's device.
pub struct TensorBatch {
    /// (B, T, F, 3, S, S)
    pub vision_x: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl TensorBatch {
    /// A random batch for benchmarks and checks: `b` samples of `l` random text tokens
    /// (below `<|endofchunk|>`) with the `<image>` token at position 1 and one random
    /// image each, no padding, labels = inputs. Draws from libtorch's global generator.
    pub fn random(cfg: &crate::model::OtterConfig, b: i64, l: i64, device: Device) -> Self {
        let s = cfg.vision.image_size as i64;
        let ids = Tensor::randint(cfg.tokens.end_of_chunk, [b, l], (tch::Kind::Int64, device));
        let _ = ids.narrow(1, 1, 1).fill_(cfg.tokens.media);
        Self {
            vision_x: Tensor::randn([b, 1, 1, 3, s, s], (tch::Kind::Float, device)),
            attention_mask: ids.ones_like(),
            labels: ids.copy(),
            input_ids: ids,
        }
    }

    pub fn from_batch(b: &Batch, device: Device) -> Self {
        let (bb, l) = (b.b as i64, b.l as i64);
        let s = b.image_size as i64;
        Self {
            vision_x: Tensor::from_slice(&b.pixels).reshape([bb, b.t as i64, b.f as i64, 3, s, s]).to_device(device),
            input_ids: Tensor::from_slice(&b.input_ids).reshape([bb, l]).to_device(device),
            attention_mask: Tensor::from_slice(&b.attention_mask).reshape([bb, l]).to_device(device),
            labels: Tensor::from_slice(&b.labels).reshape([bb, l]).to_device(device),
        }
    }

    /// Tokens that carry a loss target (labels != -100 after the shift).
    pub fn target_tokens(&self) -> i64 {
        let l = self.labels.size()[1];
        self.labels.narrow(1, 1, l - 1).ne(-100).sum(tch::Kind::Int64).int64_value(&[])
    }
}

/// Optimization hyper-parameters of a run.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Global-norm clipping threshold (upstream: 1.0); `None` disables it.
    pub clip: Option<f64>,
    pub adamw: AdamWConfig,
}

#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean of the step's micro-batch losses (before the update): in a group, over every
    /// rank's micro-batches of the step (one more scalar all-reduce), so every rank
    /// reports the step's loss.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Forward + backward of the micro-batches.
    pub compute: std::time::Duration,
    /// The gradient all-reduce (zero without a collective): the time its collectives ran.
    pub allreduce: std::time::Duration,
    /// The part of the step that waited on the all-reduce: all of `allreduce` when it runs
    /// after backward, what backward did not hide when overlapped.
    pub allreduce_exposed: std::time::Duration,
    /// Clip + AdamW + zeroing the gradients.
    pub optimizer: std::time::Duration,
    /// Waiting, before the update, for a checkpoint to finish staging the state (what an
    /// asynchronous save costs the loop beyond handing the job off).
    pub checkpoint_wait: std::time::Duration,
}

/// How a step syncs its gradients over the data-parallel group.
pub struct GradSync<'a> {
    pub buckets: &'a GradBuckets,
    pub comm: &'a mut (dyn TensorCollective + Send),
    /// All-reduce each bucket while the last micro-batch's backward still runs
    /// (`comm.overlap`), rather than after it.
    pub overlap: bool,
    /// The step's micro-batches over the whole group (the job's global batch in batches;
    /// ranks may hold different numbers of them). 0: this rank's count times the world.
    pub step_micro_batches: usize,
}

pub struct Trainer {
    pub model: Otter,
    /// The optimizer step count, and the moments unless they are sharded (then empty).
    pub opt: AdamW,
    /// The moments of this rank's part, when the optimizer state is sharded
    /// ([`Trainer::shard_optimizer`]).
    pub zero: Option<ShardedAdamW>,
    /// Full moments of the parameters this rank's checkpoint shard holds, gathered from
    /// every rank's part for one save ([`Trainer::gather_for_checkpoint`]).
    ckpt_moments: BTreeMap<String, Moments>,
    /// A sharded step failed after this rank's update and before the all-gather brought
    /// the other ranks' updated pieces: the parameters are of no step until they are
    /// copied from a rank that has them (whoever syncs them clears this).
    pub params_incomplete: bool,
    pub cfg: StepConfig,
    /// The deterministic reduction (`comm.deterministic`, issue 46): a step's gradient and
    /// loss are exact sums over its micro-batches, rounded once ([`super::exact`]), so the
    /// parameters after a step do not depend on the world size or on which rank computed
    /// which micro-batch.
    pub deterministic: bool,
    /// A background reader of the weights and moments (a checkpoint copying them out).
    reader: Option<ReadFence>,
}

fn wait_for(reader: &mut Option<ReadFence>) -> std::time::Duration {
    let t = std::time::Instant::now();
    if let Some(f) = reader.take() {
        f.wait();
    }
    t.elapsed()
}


impl Trainer {
    pub fn new(model: Otter, cfg: StepConfig) -> Self {
        let opt = AdamW::new(cfg.adamw, &model.trainable());
        Self { model, opt, zero: None, ckpt_moments: BTreeMap::new(), params_incomplete: false, cfg, deterministic: false, reader: None }
    }

    /// Copies every trainable parameter and the AdamW moments from rank `root` (by name).
    /// If a broadcast fails on a rank that receives, its parameters are partly `root`'s
    /// and partly its own: it is marked [`Trainer::params_incomplete`] (of no step), so it
    /// never reports a step applied nor serves as anyone's sync source.
    pub fn sync_from(&mut self, comm: &mut dyn TensorCollective, root: usize) -> Result<(), CommError> {
        self.wait_for_readers(); // the broadcast writes the state a save may still be staging
        let receiving = comm.rank() != root;
        let r = (|| {
            let _g = tch::no_grad_guard();
            let mut params: Vec<(String, Tensor)> = self.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.shallow_clone())).collect();
            params.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, p) in params.iter_mut() {
                comm.broadcast_tensor(p, root)?;
            }
            for m in self.opt.state.values_mut() {
                comm.broadcast_tensor(&mut m.exp_avg, root)?;
                comm.broadcast_tensor(&mut m.exp_avg_sq, root)?;
            }
            Ok(())
        })();
        if r.is_err() && receiving {
            self.params_incomplete = true;
        }
        r
    }

    /// Shards the optimizer state: from now on this rank keeps the moments of its part of
    /// `buckets` among `world` ranks only. The moments it holds (full, or another cut's
    /// part when re-sharding) are kept for its part; the rest are freed. A trainer that
    /// re-cuts from other ranks' parts takes them with [`ShardedAdamW::take_from_part`]
    /// afterwards.
    pub fn shard_optimizer(&mut self, buckets: &GradBuckets, world: usize, rank: usize) -> Result<(), CommError> {
        self.wait_for_readers();
        let trainable = self.model.trainable();
        let mut part = ShardedAdamW::zeros(buckets, &trainable, world, rank)?;
        if let Some(old) = self.zero.take() {
            part.take_from_part(&old.layout, old.part());
        }
        for (name, m) in std::mem::take(&mut self.opt.state) {
            part.load_full(&name, &m.exp_avg, &m.exp_avg_sq);
        }
        part.set_updates(self.opt.step);
        self.zero = Some(part);
        Ok(())
    }

    /// Bytes of optimizer state (AdamW's moments) this rank holds.
    pub fn optimizer_state_bytes(&self) -> u64 {
        self.opt.state_bytes() + self.zero.as_ref().map_or(0, ShardedAdamW::state_bytes)
    }

    /// With a sharded optimizer, gathers from every rank's part the full moments of the
    /// parameters rank `rank` of `world` saves in a checkpoint (the same partition as
    /// [`crate::ckpt::ShardSaver::save`]'s): every rank calls it before saving. Without
    /// sharding, nothing to do.
    pub fn gather_for_checkpoint<C: TensorCollective + ?Sized>(&mut self, comm: &mut C, rank: usize, world: usize) -> Result<(), CommError> {
        self.ckpt_moments.clear();
        let Some(zero) = &self.zero else { return Ok(()) };
        let units = crate::ckpt::Stateful::units(self);
        let want = crate::ckpt::partition(&units, world).swap_remove(rank).into_iter().collect();
        let trainable = self.model.trainable();
        let params = zero.ordered(&trainable)?;
        self.ckpt_moments = zero.gather_full(&params, &want, comm)?;
        Ok(())
    }

    /// Drops the moments gathered for a checkpoint (the save holds its own handles).
    pub fn release_checkpoint_moments(&mut self) {
        self.ckpt_moments.clear();
    }

    /// Registers a background reader of the weights and moments: the next in-place
    /// update waits for `fence` (a previous reader is waited for first).
    pub fn hold_updates_until(&mut self, fence: ReadFence) {
        self.wait_for_readers();
        self.reader = Some(fence);
    }

    /// Waits for the background reader, if any; returns how long that took. Whatever
    /// writes the weights or moments in place calls this first.
    pub fn wait_for_readers(&mut self) -> std::time::Duration {
        wait_for(&mut self.reader)
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.opt.step
    }
}

/// A checkpoint's view of the trainer: a unit per trainable parameter, with its AdamW
/// moments.
impl crate::ckpt::Stateful for Trainer {
    fn units(&self) -> Vec<(String, u64)> {
        self.model.trainable().iter().map(|(n, t)| (n.to_string(), t.numel() as u64 * 4)).collect()
    }

    fn unit_tensors(&self, unit: &str) -> Vec<(String, Tensor)> {
        let Some((_, p)) = self.model.trainable().into_iter().find(|(n, _)| *n == unit) else { return Vec::new() };
        let m = match &self.zero {
            None => &self.opt.state[unit],
            Some(_) => self.ckpt_moments.get(unit).unwrap_or_else(|| {
                panic!("sharded optimizer: the moments of `{unit}` were not gathered for this checkpoint (Trainer::gather_for_checkpoint)")
            }),
        };
        vec![
            (format!("param.{unit}"), p.shallow_clone()),
            (format!("exp_avg.{unit}"), m.exp_avg.shallow_clone()),
            (format!("exp_avg_sq.{unit}"), m.exp_avg_sq.shallow_clone()),
        ]
    }

    fn load_unit(&mut self, unit: &str, read: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor, String>) -> Result<(), String> {
        let Some((_, p)) = self.model.trainable().into_iter().find(|(n, _)| *n == unit) else {
            return Err(format!("parameter `{unit}` is not trainable in this model"));
        };
        let mut p = p.shallow_clone();
        let _g = tch::no_grad_guard();
        p.copy_(&read(&format!("param.{unit}"), &p)?);
        if let Some(zero) = &mut self.zero {
            // This rank keeps its pieces of the full moments the checkpoint holds.
            let ea = read(&format!("exp_avg.{unit}"), &p)?;
            let es = read(&format!("exp_avg_sq.{unit}"), &p)?;
            zero.load_full(unit, &ea, &es);
            return Ok(());
        }
        let m = self.opt.state.get_mut(unit).ok_or_else(|| format!("parameter `{unit}` has no optimizer state"))?;
        let ea = read(&format!("exp_avg.{unit}"), &m.exp_avg)?;
        m.exp_avg.copy_(&ea);
        let es = read(&format!("exp_avg_sq.{unit}"), &m.exp_avg_sq)?;
        m.exp_avg_sq.copy_(&es);
        Ok(())
    }

    fn set_steps(&mut self, steps: u64) {
        self.opt.step = steps;
    }

    fn hold_writes_until(&mut self, fence: ReadFence) {
        self.hold_updates_until(fence);
    }

    fn wait_for_readers(&mut self) {
        Trainer::wait_for_readers(self);
    }
}

impl Trainer {

    /// One optimizer step over `micro` micro-batches: each loss is scaled by 1/n and
    /// back-propagated (gradients accumulate onto whatever the parameters hold, as in
    /// upstream's `backward(); step(); zero_grad()` loop); then the single gradient sync
    /// point (a no-op on one process), clipping, the AdamW update at the scheduled LR, and
    /// the gradients are zeroed for the next step.
    pub fn step(&mut self, micro: &[TensorBatch]) -> StepStats {
        self.step_synced(micro, None).expect("no collective, no communication error")
    }

    /// [`Trainer::step`] with data parallelism: the sync point averages the trainable
    /// gradients over the group, after backward or overlapped with the last micro-batch's
    /// backward (the same bits either way). On a communication error the update is *not*
    /// applied (the gradients are zeroed), so the model still holds the previous step's
    /// state.
    pub fn step_synced(&mut self, micro: &[TensorBatch], mut sync: Option<GradSync<'_>>) -> Result<StepStats, CommError> {
        use std::time::Instant;
        if self.deterministic {
            return self.step_exact(micro, sync);
        }
        let params = self.model.trainable();
        let n = micro.len().max(1) as f64;
        // The gradient is the mean over the step's micro-batches, however the group split
        // them: alone, each loss is divided by n; in a group of `world` whose all-reduce
        // averages, each is scaled by world / (the step's micro-batches over all ranks).
        let scale = sync.as_ref().filter(|s| s.step_micro_batches > 0).map(|s| s.comm.world() as f64 / s.step_micro_batches as f64);
        // The micro-batches' losses, summed on their device in f64: read once, after the
        // sync, so that no micro-batch waits for the device (the host runs ahead).
        let mut loss_sum: Option<Tensor> = None;
        let mut times: Option<Result<SyncTimes, CommError>> = None;
        // A sharded optimizer reduce-scatters after backward (no overlap yet).
        let sharded = self.zero.is_some();
        let t0 = Instant::now();
        for (i, mb) in micro.iter().enumerate() {
            let loss = tracing::info_span!("forward").in_scope(|| {
                let logits = self.model.forward(&mb.vision_x, &mb.input_ids, &mb.attention_mask);
                causal_lm_loss(&logits, &mb.labels)
            });
            let l = loss.detach().to_kind(tch::Kind::Double);
            loss_sum = Some(match loss_sum.take() {
                Some(sum) => sum + l,
                None => l,
            });
            let mut backward = || {
                tracing::info_span!("backward").in_scope(|| match scale {
                    Some(s) => (&loss * s).backward(),
                    None => (&loss / n).backward(),
                })
            };
            match sync.as_mut().filter(|s| s.overlap && !sharded && i + 1 == micro.len()) {
                Some(s) => times = Some(s.buckets.backward_and_sync(&params, &mut *s.comm, &mut backward)),
                None => backward(),
            }
        }
        let mut compute = t0.elapsed();
        let overlapped = times.is_some();
        // Sharded: this rank's part of the mean gradient, and the parameters in the
        // layout's order.
        let mut ordered: Option<Vec<&Tensor>> = None;
        if let Some(zero) = &mut self.zero {
            let _span = tracing::info_span!("reduce_scatter").entered();
            let t1 = Instant::now();
            let comm = sync.as_mut().map(|s| &mut *s.comm);
            let reduced = zero.ordered(&params).and_then(|o| {
                super::grad_sync::materialize_grads(&o);
                zero.reduce_scatter_grads(&o, comm)?;
                Ok(o)
            });
            times = Some(reduced.map(|o| {
                ordered = Some(o);
                SyncTimes { comm: t1.elapsed(), exposed: t1.elapsed() }
            }));
        } else if let (None, Some(s)) = (&times, sync.as_mut()) {
            let _span = tracing::info_span!("allreduce", buckets = s.buckets.num_buckets()).entered();
            let t1 = Instant::now();
            times = Some(s.buckets.all_reduce_mean(&params, &mut *s.comm).map(|()| SyncTimes { comm: t1.elapsed(), exposed: t1.elapsed() }));
        }
        // The step's loss over the whole group (the mean over its micro-batches), so that
        // any rank's report is the step's loss, even if another died before reporting.
        let loss_sum = loss_sum.map_or(0.0, |t| t.double_value(&[]));
        let mut loss = loss_sum / n;
        if let (Some(s), Some(Ok(_))) = (sync.as_mut(), times.as_ref()) {
            if s.comm.world() > 1 {
                // On the gradients' device: NCCL reduces device tensors only.
                let device = params.first().map_or(Device::Cpu, |(_, p)| p.device());
                let mut t = [Tensor::from_slice(&[(loss_sum * scale.unwrap_or(1.0 / n)) as f32]).to_device(device)];
                times = Some(s.comm.all_reduce_mean_tensors(&mut t).map(|()| times.take().and_then(Result::ok).unwrap_or_default()));
                loss = t[0].double_value(&[0]);
            }
        }
        let zero_grads = || {
            for (_, p) in &params {
                let mut p = p.shallow_clone();
                p.zero_grad();
            }
        };
        let SyncTimes { comm: allreduce, exposed: allreduce_exposed } = match times.unwrap_or(Ok(SyncTimes::default())) {
            Ok(t) => t,
            Err(e) => {
                zero_grads();
                return Err(e);
            }
        };
        if overlapped {
            // Overlapped: the wait after backward was counted in the loop's time.
            compute = compute.saturating_sub(allreduce_exposed);
        }
        // The update writes the weights and moments in place: a checkpoint still staging
        // them (overlapped with this step's forward and backward) must finish first.
        let checkpoint_wait = wait_for(&mut self.reader); // (`params` borrows the model)
        let t2 = Instant::now();
        let _span = tracing::info_span!("optimizer").entered();
        let lr = schedule::cosine_with_warmup(self.cfg.lr, self.opt.step, self.cfg.warmup_steps, self.cfg.total_steps);
        let grad_norm = match (self.zero.as_mut(), ordered) {
            (Some(zero), Some(ordered)) => {
                let mut comm = sync.as_mut().map(|s| &mut *s.comm);
                let norm = match self.cfg.clip.map(|c| zero.clip(c, comm.as_deref_mut())) {
                    Some(Ok(norm)) => norm,
                    Some(Err(e)) => {
                        zero_grads();
                        return Err(e);
                    }
                    None => f64::NAN,
                };
                self.opt.step += 1;
                zero.update(self.cfg.adamw, self.opt.step, lr, &ordered);
                if let Err(e) = zero.all_gather_params(&ordered, comm) {
                    // This rank's pieces and part are updated, the other ranks' pieces
                    // are not: these parameters are of no step.
                    self.params_incomplete = true;
                    zero_grads();
                    return Err(e);
                }
                norm
            }
            _ => {
                let norm = match self.cfg.clip {
                    Some(c) => clip_grad_norm(&params, c),
                    None => f64::NAN,
                };
                self.opt.step(&params, lr);
                norm
            }
        };
        zero_grads();
        Ok(StepStats { loss, lr, grad_norm, compute, allreduce, allreduce_exposed, optimizer: t2.elapsed(), checkpoint_wait })
    }

    /// [`Trainer::step_synced`] with the deterministic reduction: each micro-batch's loss
    /// (its own mean, unscaled) is back-propagated, and its gradients and loss are added
    /// into one exact sum ([`super::exact::ExactSum`]); the group adds the sums as integers
    /// (`all_reduce_sum_i64_tensors`), and the step's mean gradient and loss are rounded
    /// once from the result: the same bits on every rank, for any world size and any
    /// spread of the micro-batches over ranks. The reduction runs after backward (overlap
    /// and bucket sizes do not apply), and the optimizer state is not sharded (yet).
    fn step_exact(&mut self, micro: &[TensorBatch], mut sync: Option<GradSync<'_>>) -> Result<StepStats, CommError> {
        use super::exact::{ExactSum, MAX_TERMS};
        use std::time::Instant;
        if self.zero.is_some() {
            return Err(CommError::Invalid("comm.deterministic does not shard the optimizer state yet: set optimizer_sharding: false".into()));
        }
        let params = self.model.trainable();
        let refs: Vec<&Tensor> = params.iter().map(|(_, p)| *p).collect();
        let numel: i64 = refs.iter().map(|p| p.numel() as i64).sum();
        let device = refs.first().map_or(Device::Cpu, |p| p.device());
        // The step's micro-batches over the whole group: the mean's divisor.
        let total = match &sync {
            Some(s) if s.step_micro_batches > 0 => s.step_micro_batches,
            Some(s) => micro.len() * s.comm.world(),
            None => micro.len(),
        }
        .max(1);
        if total as u64 > MAX_TERMS {
            return Err(CommError::Invalid(format!("comm.deterministic sums at most {MAX_TERMS} micro-batches per step, this step has {total}")));
        }
        let zero_grads = || {
            for p in &refs {
                let mut p = p.shallow_clone();
                p.zero_grad();
            }
        };
        // The step's gradient is its micro-batches' alone: anything the parameters held
        // before (the float path would add to it) is dropped.
        zero_grads();
        let mut sum = ExactSum::zeros(numel + 1, device);
        let flat = |loss: &Tensor| {
            let mut parts: Vec<Tensor> = refs.iter().map(|p| p.grad().reshape([-1])).collect();
            parts.push(loss.reshape([1]).to_kind(tch::Kind::Float));
            Tensor::cat(&parts, 0)
        };
        let t0 = Instant::now();
        for mb in micro {
            let loss = tracing::info_span!("forward").in_scope(|| {
                let logits = self.model.forward(&mb.vision_x, &mb.input_ids, &mb.attention_mask);
                causal_lm_loss(&logits, &mb.labels)
            });
            tracing::info_span!("backward").in_scope(|| loss.backward());
            super::grad_sync::materialize_grads(&refs);
            sum.add(&flat(&loss.detach()));
            zero_grads();
        }
        let compute = t0.elapsed();
        let t1 = Instant::now();
        if let Some(s) = sync.as_mut() {
            let _span = tracing::info_span!("allreduce_exact").entered();
            s.comm.all_reduce_sum_i64_tensors(std::slice::from_mut(sum.limbs_mut()))?;
        }
        let allreduce = t1.elapsed();
        let mean = sum.finish(total as f64);
        let mut offset = 0;
        for p in &refs {
            let n = p.numel() as i64;
            let _ = p.grad().copy_(&mean.narrow(0, offset, n).view(p.size().as_slice()));
            offset += n;
        }
        let loss = mean.double_value(&[numel]);
        let checkpoint_wait = wait_for(&mut self.reader);
        let t2 = Instant::now();
        let _span = tracing::info_span!("optimizer").entered();
        let lr = schedule::cosine_with_warmup(self.cfg.lr, self.opt.step, self.cfg.warmup_steps, self.cfg.total_steps);
        let grad_norm = match self.cfg.clip {
            Some(c) => clip_grad_norm(&params, c),
            None => f64::NAN,
        };
        self.opt.step(&params, lr);
        zero_grads();
        Ok(StepStats { loss, lr, grad_norm, compute, allreduce, allreduce_exposed: allreduce, optimizer: t2.elapsed(), checkpoint_wait })
    }
}
