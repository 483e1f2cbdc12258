//! Sharded optimizer state (ZeRO-1, `train.optimizer_sharding`): each data-parallel rank
//! keeps AdamW's moments for only its part of the flattened trainable parameters.
//!
//! The cut follows the gradient buckets ([`GradBuckets`], identical on every rank): each
//! bucket's flattened elements are split into `world` equal chunks (the last padded with
//! zeros to the multiple of `world` NCCL's reduce-scatter needs), and rank `r` owns chunk
//! `r` of every bucket. Its part is those chunks back to back, so a rank holds
//! `sum(ceil(bucket / world))` elements of each moment: 1/world of the unsharded state up
//! to one element per bucket and rank.
//!
//! A step, per bucket: the gradients are reduce-scattered (summed, then divided by the
//! world: the same mean the all-reduce gives); the global gradient norm for clipping is
//! the square root of the sum over ranks of each part's squares; the rank updates its
//! chunk of the parameters with its moments; the updated chunks are all-gathered back into
//! every rank's parameters. The update runs in place: a rank whose all-gather fails after
//! it holds a part one update ahead and parameters only partly updated; the trainer says
//! so ([`crate::train::Trainer::params_incomplete`]) and the worker then claims no state,
//! so its parameters come from a rank that finished the step (or a checkpoint), never
//! from it.

use super::grad_sync::{GradBuckets, TensorCollective};
use super::optim::{self, AdamWConfig, Moments, Slot};
use crate::comm::CommError;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// The part of one parameter that falls in a rank's chunk of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`ShardLayout::names`].
    pub param: usize,
    /// Where the piece starts in the parameter (flattened) and in the rank's part.
    pub param_offset: i64,
    pub part_offset: i64,
    pub len: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket {
    /// A range of [`ShardLayout::names`].
    params: Range<usize>,
    /// Elements (flattened), and the chunk each rank owns (`ceil(len / world)`).
    len: i64,
    chunk: i64,
    /// Where this bucket's chunk starts in every rank's part.
    part_offset: i64,
}

/// How the flattened trainable parameters are cut among `world` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub world: usize,
    pub rank: usize,
    /// Parameter names in sync order, and their element counts.
    names: Vec<String>,
    numels: Vec<i64>,
    buckets: Vec<Bucket>,
}

impl ShardLayout {
    /// The cut of `buckets` (whose parameters are `trainable`) among `world` ranks, seen
    /// from `rank`.
    pub fn new(buckets: &GradBuckets, trainable: &[(&str, &Tensor)], world: usize, rank: usize) -> Result<Self, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::Invalid(format!("rank {rank} of a world of {world}")));
        }
        let params = buckets.ordered(trainable)?;
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let mut part_offset = 0;
        let cut = buckets
            .ranges()
            .iter()
            .map(|r| {
                let len: i64 = numels[r.clone()].iter().sum();
                let chunk = (len + world as i64 - 1) / world as i64;
                let b = Bucket { params: r.clone(), len, chunk, part_offset };
                part_offset += chunk;
                b
            })
            .collect();
        Ok(Self { world, rank, names: buckets.names().to_vec(), numels, buckets: cut })
    }

    /// The same cut seen from another rank.
    pub fn for_rank(&self, rank: usize) -> Self {
        Self { rank, ..self.clone() }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Elements of each moment a rank holds (every rank the same, padding included).
    pub fn part_len(&self) -> i64 {
        self.buckets.iter().map(|b| b.chunk).sum()
    }

    /// The pieces of parameters in this rank's chunk of bucket `b`.
    fn pieces_of(&self, b: usize) -> Vec<Piece> {
        let bucket = &self.buckets[b];
        let lo = self.rank as i64 * bucket.chunk;
        let hi = (lo + bucket.chunk).min(bucket.len);
        let mut start = 0;
        let mut out = Vec::new();
        for param in bucket.params.clone() {
            let end = start + self.numels[param];
            let (a, z) = (lo.max(start), hi.min(end));
            if a < z {
                out.push(Piece { param, param_offset: a - start, part_offset: bucket.part_offset + (a - lo), len: z - a });
            }
            start = end;
        }
        out
    }

    /// Every piece this rank owns, bucket by bucket.
    pub fn pieces(&self) -> Vec<Piece> {
        (0..self.buckets.len()).flat_map(|b| self.pieces_of(b)).collect()
    }
}

/// A flattened view of parameter `p`'s elements `offset..offset + len` (writes go through).
fn flat_piece(p: &Tensor, offset: i64, len: i64) -> Tensor {
    tch::no_grad(|| p.view([-1]).narrow(0, offset, len))
}

/// AdamW whose moments cover one rank's part of the parameters ([`ShardLayout`]).
pub struct ShardedAdamW {
    pub layout: ShardLayout,
    /// The gradient buckets the layout cuts.
    buckets: GradBuckets,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The step's gradient part (kept between steps: no fresh allocation per step).
    grads: Tensor,
    updates: u64,
}

impl ShardedAdamW {
    /// Zero moments (a fresh optimizer) for rank `rank` of `world`'s part of `buckets`
    /// (whose parameters are `trainable`), on their device.
    pub fn zeros(buckets: &GradBuckets, trainable: &[(&str, &Tensor)], world: usize, rank: usize) -> Result<Self, CommError> {
        let layout = ShardLayout::new(buckets, trainable, world, rank)?;
        let device = trainable.first().map_or(Device::Cpu, |(_, t)| t.device());
        let n = layout.part_len();
        let zeros = || Tensor::zeros([n], (Kind::Float, device));
        Ok(Self { exp_avg: zeros(), exp_avg_sq: zeros(), grads: zeros(), updates: 0, layout, buckets: buckets.clone() })
    }

    /// `trainable` in the layout's order.
    pub fn ordered<'t>(&self, trainable: &[(&str, &'t Tensor)]) -> Result<Vec<&'t Tensor>, CommError> {
        self.buckets.ordered(trainable)
    }

    /// Bytes of the moments this rank holds.
    pub fn state_bytes(&self) -> u64 {
        2 * self.layout.part_len() as u64 * 4
    }

    /// This rank's part of the moments (`exp_avg`, `exp_avg_sq`).
    pub fn part(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Takes this rank's pieces of parameter `name`'s full moments (a checkpoint's or an
    /// unsharded optimizer's); false if `name` is not in the layout.
    pub fn load_full(&mut self, name: &str, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> bool {
        let Some(param) = self.layout.names.iter().position(|n| n == name) else { return false };
        tch::no_grad(|| {
            for piece in self.layout.pieces().into_iter().filter(|p| p.param == param) {
                for (part, full) in [(&self.exp_avg, exp_avg), (&self.exp_avg_sq, exp_avg_sq)] {
                    let src = full.reshape([-1]).narrow(0, piece.param_offset, piece.len).to_device(part.device());
                    part.narrow(0, piece.part_offset, piece.len).copy_(&src);
                }
            }
        });
        true
    }

    /// Takes the pieces of this rank's part found in another rank's part (`theirs`, of the
    /// cut `their_layout` of the same parameters, e.g. the previous generation's): how
    /// the parts are re-cut when the world changes.
    pub fn take_from_part(&mut self, their_layout: &ShardLayout, theirs: (&Tensor, &Tensor)) {
        let mine = self.layout.pieces();
        tch::no_grad(|| {
            for t in their_layout.pieces() {
                for m in mine.iter().filter(|m| m.param == t.param) {
                    let (a, z) = (t.param_offset.max(m.param_offset), (t.param_offset + t.len).min(m.param_offset + m.len));
                    if a >= z {
                        continue;
                    }
                    for (part, src) in [(&self.exp_avg, theirs.0), (&self.exp_avg_sq, theirs.1)] {
                        let from = src.narrow(0, t.part_offset + (a - t.param_offset), z - a).to_device(part.device());
                        part.narrow(0, m.part_offset + (a - m.param_offset), z - a).copy_(&from);
                    }
                }
            }
        });
    }

    /// The full moments of the parameters in `want`, gathered from every rank's part
    /// bucket by bucket (a bucket's worth of extra memory at a time): what a checkpoint
    /// writes for the parameters this rank saves. Every rank must call it, with its own
    /// `want`.
    pub fn gather_full<C: TensorCollective + ?Sized>(&self, params: &[&Tensor], want: &BTreeSet<String>, comm: &mut C) -> Result<BTreeMap<String, Moments>, CommError> {
        let world = self.layout.world as i64;
        let mut out = BTreeMap::new();
        for bucket in &self.layout.buckets {
            let mut full = Vec::new();
            for part in [&self.exp_avg, &self.exp_avg_sq] {
                let mine = part.narrow(0, bucket.part_offset, bucket.chunk).contiguous();
                let mut all = Tensor::zeros([bucket.chunk * world], (Kind::Float, part.device()));
                if world == 1 {
                    all.copy_(&mine);
                } else {
                    comm.all_gather_tensor(&mine, &mut all)?;
                }
                full.push(all);
            }
            let mut start = 0;
            for param in bucket.params.clone() {
                let n = self.layout.numels[param];
                let name = &self.layout.names[param];
                if want.contains(name) {
                    let shape = params[param].size();
                    let take = |t: &Tensor| t.narrow(0, start, n).reshape(shape.as_slice()).copy();
                    out.insert(name.clone(), Moments { exp_avg: take(&full[0]), exp_avg_sq: take(&full[1]) });
                }
                start += n;
            }
        }
        Ok(out)
    }

    /// The step's gradients (`params`' `.grad`, in layout order, every one defined) as the
    /// mean over the group of this rank's part: reduce-scattered bucket by bucket into the
    /// part's gradient buffer, which [`Self::clip`] and [`Self::update`] then use.
    pub fn reduce_scatter_grads<C: TensorCollective + ?Sized>(&mut self, params: &[&Tensor], comm: Option<&mut C>) -> Result<(), CommError> {
        let world = self.layout.world as i64;
        let device = self.exp_avg.device();
        let mut comm = comm;
        let _g = tch::no_grad_guard();
        for (b, bucket) in self.layout.buckets.iter().enumerate() {
            let flat = self.buckets.flatten(params, b).to_device(device);
            let padded = Tensor::cat(&[flat, Tensor::zeros([bucket.chunk * world - bucket.len], (Kind::Float, device))], 0);
            let mut out = self.grads.narrow(0, bucket.part_offset, bucket.chunk);
            match comm.as_deref_mut() {
                Some(c) if world > 1 => {
                    let mut summed = Tensor::zeros([bucket.chunk], (Kind::Float, device));
                    c.reduce_scatter_sum_tensor(&padded, &mut summed)?;
                    out.copy_(&(summed / world as f64));
                }
                _ => {
                    out.copy_(&padded.narrow(0, self.layout.rank as i64 * bucket.chunk, bucket.chunk));
                }
            }
        }
        Ok(())
    }

    /// `torch.nn.utils.clip_grad_norm_` over the whole group: the global norm is the
    /// square root of the sum over ranks of each part's squared norm (padding is zeros).
    /// Scales the gradient part in place; returns the norm before clipping.
    pub fn clip<C: TensorCollective + ?Sized>(&mut self, max_norm: f64, comm: Option<&mut C>) -> Result<f64, CommError> {
        let _g = tch::no_grad_guard();
        // As torch sums: a norm per parameter (here per piece), then the norm of those.
        let norms: Vec<Tensor> = self.layout.pieces().iter().map(|p| self.grads.narrow(0, p.part_offset, p.len).norm()).collect();
        let local = if norms.is_empty() { Tensor::zeros([], (Kind::Float, self.grads.device())) } else { Tensor::stack(&norms, 0).norm() };
        let mut sq = [local.square().reshape([1])];
        if let Some(c) = comm.filter(|_| self.layout.world > 1) {
            c.all_reduce_mean_tensors(&mut sq)?;
        }
        let total = (sq[0].double_value(&[0]) * self.layout.world as f64).sqrt();
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            let _ = self.grads.g_mul_scalar_(coef);
        }
        Ok(total)
    }

    /// The AdamW update, with the step's gradient part ([`Self::reduce_scatter_grads`],
    /// clipped), of this rank's pieces of `params` (in place) and of its moments at
    /// optimizer step `step` (already counted): after it, the part is at `step`
    /// updates ([`Self::updates`]) while the parameters outside this rank's pieces still
    /// wait for [`Self::all_gather_params`].
    pub fn update(&mut self, cfg: AdamWConfig, step: u64, lr: f64, params: &[&Tensor]) {
        let pieces = self.layout.pieces();
        let slots: Vec<Slot<'_>> = tch::no_grad(|| {
            pieces
                .iter()
                .map(|p| Slot {
                    name: &self.layout.names[p.param],
                    param: flat_piece(params[p.param], p.param_offset, p.len),
                    grad: self.grads.narrow(0, p.part_offset, p.len),
                    exp_avg: self.exp_avg.narrow(0, p.part_offset, p.len),
                    exp_avg_sq: self.exp_avg_sq.narrow(0, p.part_offset, p.len),
                })
                .collect()
        });
        optim::update(cfg, step, lr, &slots);
        self.updates = step;
    }

    /// Brings every rank's updated pieces into every rank's `params`: an all-gather per
    /// bucket (a bucket's worth of buffers at a time).
    pub fn all_gather_params<C: TensorCollective + ?Sized>(&self, params: &[&Tensor], comm: Option<&mut C>) -> Result<(), CommError> {
        let world = self.layout.world as i64;
        let Some(comm) = comm.filter(|_| world > 1) else { return Ok(()) };
        let _g = tch::no_grad_guard();
        for (b, bucket) in self.layout.buckets.iter().enumerate() {
            let device = params[bucket.params.start].device();
            let mut flat: Vec<Tensor> = self.layout.pieces_of(b).iter().map(|p| flat_piece(params[p.param], p.param_offset, p.len)).collect();
            let have: i64 = flat.iter().map(|t| t.numel() as i64).sum();
            flat.push(Tensor::zeros([bucket.chunk - have], (Kind::Float, device)));
            let mine = Tensor::cat(&flat, 0);
            let mut all = Tensor::zeros([bucket.chunk * world], (Kind::Float, device));
            comm.all_gather_tensor(&mine, &mut all)?;
            let mut start = 0;
            for param in bucket.params.clone() {
                let n = self.layout.numels[param];
                let mut p = params[param].shallow_clone();
                p.copy_(&all.narrow(0, start, n).view_as(&p));
                start += n;
            }
        }
        Ok(())
    }

    /// Optimizer updates the part has had (the trainer's step count after its last).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Declares the part to be at `updates` updates (a fresh, restored or re-cut part for
    /// a generation that starts there).
    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharded(sizes: &[i64], bucket_bytes: usize, world: usize, rank: usize) -> (ShardedAdamW, Vec<Tensor>) {
        let ts: Vec<Tensor> = sizes.iter().map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu))).collect();
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("perceiver.p{i}")).collect();
        let named: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(ts.iter()).collect();
        let buckets = GradBuckets::new(&named, bucket_bytes);
        (ShardedAdamW::zeros(&buckets, &named, world, rank).unwrap(), ts)
    }

    fn layout(sizes: &[i64], bucket_bytes: usize, world: usize, rank: usize) -> (ShardLayout, Vec<Tensor>) {
        let (s, ts) = sharded(sizes, bucket_bytes, world, rank);
        (s.layout, ts)
    }

    /// Every element of every parameter is owned by exactly one rank, and a rank's part
    /// is 1/world of the elements up to one padding element per bucket.
    #[test]
    fn the_ranks_parts_cover_every_element_once() {
        for world in 1..=5 {
            let (l0, ts) = layout(&[7, 13, 1, 40, 3], 64, world, 0);
            let total: i64 = ts.iter().map(|t| t.numel() as i64).sum();
            let mut owned: Vec<Vec<u32>> = ts.iter().map(|t| vec![0; t.numel()]).collect();
            for r in 0..world {
                let l = l0.for_rank(r);
                let mut in_part = vec![false; l.part_len() as usize];
                for p in l.pieces() {
                    // Pieces index the layout's (sync) order; `ts` is in creation order.
                    let t = l.names()[p.param].trim_start_matches("perceiver.p").parse::<usize>().unwrap();
                    assert_eq!(ts[t].numel(), l.numels[p.param] as usize);
                    for i in 0..p.len {
                        owned[t][(p.param_offset + i) as usize] += 1;
                        assert!(!std::mem::replace(&mut in_part[(p.part_offset + i) as usize], true), "two pieces share a slot of the part");
                    }
                }
                assert!(l.part_len() * world as i64 - total < (world * l.buckets.len()) as i64);
                assert!(l.part_len() * world as i64 >= total);
            }
            assert!(owned.iter().flatten().all(|&n| n == 1), "world {world}: {owned:?}");
        }
    }

    /// Re-cutting a part from the previous world's parts gives what loading the full
    /// moments gives.
    #[test]
    fn a_part_recut_from_another_worlds_parts_equals_the_full_moments_cut_anew() {
        let sizes = [7i64, 13, 1, 40, 3];
        let full: Vec<(Tensor, Tensor)> = sizes.iter().map(|&n| (Tensor::randn([n], (Kind::Float, Device::Cpu)), Tensor::rand([n], (Kind::Float, Device::Cpu)))).collect();
        let load = |world: usize, rank: usize| {
            let (mut s, _) = sharded(&sizes, 64, world, rank);
            for (i, (a, b)) in full.iter().enumerate() {
                assert!(s.load_full(&format!("perceiver.p{i}"), a, b));
            }
            s
        };
        for (old, new) in [(3, 2), (2, 3), (4, 1), (1, 4)] {
            for r in 0..new {
                let want = load(new, r);
                let (mut got, _) = sharded(&sizes, 64, new, r);
                for k in 0..old {
                    let theirs = load(old, k);
                    got.take_from_part(&theirs.layout, theirs.part());
                }
                assert!(got.exp_avg.equal(&want.exp_avg) && got.exp_avg_sq.equal(&want.exp_avg_sq), "{old} -> {new}, rank {r}");
            }
        }
    }
}
