//! Re-cutting ZeRO-1's optimizer parts for a new generation, from the parts the members
//! hold (the sharded state itself is `zero.rs`).

use super::grad_sync::{GradBuckets, TensorCollective};
use super::step::Trainer;
use super::zero::{ShardLayout, ShardedAdamW};
use crate::comm::CommError;
use tch::{Device, Kind, Tensor};

/// Why the optimizer's parts could not be re-cut for a generation.
#[derive(Debug)]
pub enum Recut {
    /// A collective failed (or was aborted): the generation fails as any would. Nothing of
    /// this rank's state changed.
    Comm(CommError),
    /// A part is gone: the process restarts fresh (and the job restores a checkpoint).
    Lost(String),
}

impl From<CommError> for Recut {
    fn from(e: CommError) -> Self {
        Recut::Comm(e)
    }
}

impl Trainer {
    /// With `train.optimizer_sharding`: cuts this rank's part (rank `rank` of `world`) of
    /// the optimizer state out of the parts the members hold, for a generation starting at
    /// step `start`. Every member tells every other what it holds (the previous cut's world
    /// and rank, and how many updates its part has had); if the members' parts at `start`
    /// make up every part of one previous cut, each is broadcast by its holder and every
    /// rank keeps the pieces of its new part (nothing moves when the cut is unchanged). A
    /// checkpoint to restore (`restoring`), or a job at step 0, starts from empty parts. A
    /// part lost with its rank cannot be rebuilt: every member sees that alike
    /// ([`Recut::Lost`]) and restarts fresh, so the job restores its newest checkpoint.
    /// The new part is installed only once every broadcast succeeded. Returns the previous
    /// cut's world when parts moved.
    pub fn recut_optimizer(
        &mut self,
        buckets: &GradBuckets,
        group: &mut (dyn TensorCollective + Send),
        rank: usize,
        world: usize,
        start: u64,
        restoring: bool,
    ) -> Result<Option<usize>, Recut> {
        let device = self.model.device();
        self.wait_for_readers();
        let held = self.zero.as_ref().map(|z| (z.layout.world, z.layout.rank, z.updates()));
        // Small integers, and the update count split in 24-bit halves: exact in f32.
        let (hw, hr, hu) = held.unwrap_or((0, 0, 0));
        let fields = [held.is_some() as u8 as f32, hw as f32, hr as f32, (hu & 0xff_ffff) as f32, (hu >> 24) as f32];
        let mine = Tensor::from_slice(&fields).to_device(device);
        let mut all = Tensor::zeros([5 * world as i64], (Kind::Float, device));
        group.all_gather_tensor(&mine, &mut all)?;
        let all = Vec::<f32>::try_from(all.to_device(Device::Cpu)).map_err(|e| Recut::Comm(CommError::Invalid(e.to_string())))?;
        // What each member holds: (previous world, previous rank) of a part at `start` updates.
        let parts: Vec<Option<(usize, usize)>> =
            all.chunks(5).map(|m| (m[0] == 1.0 && (m[3] as u64 | (m[4] as u64) << 24) == start).then_some((m[1] as usize, m[2] as usize))).collect();
        if restoring || start == 0 {
            // The checkpoint fills the parts, or nothing has been trained yet.
            self.zero = None;
            self.opt.state.clear();
            self.shard_optimizer(buckets, world, rank)?;
            return Ok(None);
        }
        let holders: Vec<(usize, (usize, usize))> = parts.iter().enumerate().filter_map(|(i, p)| Some((i, (*p)?))).collect();
        let Some(&(_, (old_world, _))) = holders.first() else {
            return Err(Recut::Lost(format!("no member holds a part of the optimizer state after {start} updates")));
        };
        let mut holder_of = vec![None; old_world];
        for &(member, (w, r)) in &holders {
            if w != old_world || r >= old_world {
                return Err(Recut::Lost(format!("the members' optimizer parts after {start} updates are of different cuts ({w} and {old_world} ranks)")));
            }
            holder_of[r].get_or_insert(member);
        }
        if let Some(lost) = holder_of.iter().position(Option::is_none) {
            return Err(Recut::Lost(format!(
                "part {lost} of the optimizer state (of {old_world}) after {start} updates was lost with its rank; only a checkpoint can bring it back"
            )));
        }
        let holder_of: Vec<usize> = holder_of.into_iter().flatten().collect();
        if old_world == world && holder_of.iter().enumerate().all(|(k, &m)| k == m) {
            return Ok(None); // the same cut, each part where it was
        }
        let trainable = self.model.trainable();
        let old_cut = ShardLayout::new(buckets, &trainable, old_world, 0)?;
        let mut part = ShardedAdamW::zeros(buckets, &trainable, world, rank)?;
        drop(trainable);
        let n = old_cut.part_len();
        for (k, &from) in holder_of.iter().enumerate() {
            let (mut m, mut v) = match (&self.zero, from == rank) {
                (Some(z), true) => (z.part().0.copy(), z.part().1.copy()),
                _ => (Tensor::zeros([n], (Kind::Float, device)), Tensor::zeros([n], (Kind::Float, device))),
            };
            group.broadcast_tensor(&mut m, from)?;
            group.broadcast_tensor(&mut v, from)?;
            part.take_from_part(&old_cut.for_rank(k), (&m, &v));
        }
        part.set_updates(start);
        self.zero = Some(part);
        Ok(Some(old_world))
    }
}
