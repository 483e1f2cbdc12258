//! The order of an epoch, as a pure function of (seed, epoch), and its shards.
//!
//! 1. Each dataset contributes round(weight * #queries) samples: whole seeded
//!    permutations of its queries, repeated, cut to length.
//! 2. Samples are bucketed by (T, F) (a batch stacks images), each bucket shuffled and cut
//!    into batches of `batch_size`; a bucket's last batch may be smaller (tail policy:
//!    nothing is dropped or repeated, so every sample is consumed exactly once).
//! 3. The batches are shuffled; shard k is batches `[k*S, (k+1)*S)`.
//!
//! No hash-map order, no platform RNG: SplitMix64 and Fisher-Yates, stable forever.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SplitMix64 (Steele et al., 2014): tiny, well-mixed, and fully specified here.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) without modulo bias (rejection sampling).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// A stream seed derived from (seed, epoch, purpose, index), so streams don't overlap.
fn derive(seed: u64, parts: &[u64]) -> u64 {
    let mut r = SplitMix64::new(seed);
    let mut s = r.next_u64();
    for &p in parts {
        s = SplitMix64::new(s ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64();
    }
    s
}

/// One sample of the epoch: query `query` of dataset `dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SampleRef {
    pub dataset: u32,
    pub query: u32,
}

/// What the planner needs to know about each dataset.
#[derive(Debug, Clone)]
pub struct DatasetShape {
    pub weight: f64,
    /// (T, F) of each query, by query index.
    pub shapes: Vec<(usize, usize)>,
}

/// The batches of one epoch, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    pub epoch: u64,
    pub batches: Vec<Vec<SampleRef>>,
    pub shard_batches: usize,
}

impl EpochPlan {
    pub fn new(seed: u64, epoch: u64, datasets: &[DatasetShape], batch_size: usize, shard_batches: usize) -> Self {
        assert!(batch_size > 0 && shard_batches > 0);
        // 1. weighted selection per dataset
        let mut buckets: BTreeMap<(usize, usize), Vec<SampleRef>> = BTreeMap::new();
        for (d, ds) in datasets.iter().enumerate() {
            let n = ds.shapes.len();
            let want = (ds.weight * n as f64).round() as usize;
            let mut taken = 0;
            let mut round = 0u64;
            while taken < want && n > 0 {
                let mut perm: Vec<u32> = (0..n as u32).collect();
                SplitMix64::new(derive(seed, &[epoch, 1, d as u64, round])).shuffle(&mut perm);
                for &q in perm.iter().take(want - taken) {
                    buckets.entry(ds.shapes[q as usize]).or_default().push(SampleRef { dataset: d as u32, query: q });
                }
                taken += n.min(want - taken);
                round += 1;
            }
        }
        // 2. shape buckets -> batches
        let mut batches = Vec::new();
        for (i, (_, mut samples)) in buckets.into_iter().enumerate() {
            SplitMix64::new(derive(seed, &[epoch, 2, i as u64])).shuffle(&mut samples);
            batches.extend(samples.chunks(batch_size).map(<[SampleRef]>::to_vec));
        }
        // 3. batch order
        SplitMix64::new(derive(seed, &[epoch, 3])).shuffle(&mut batches);
        Self { epoch, batches, shard_batches }
    }

    pub fn num_samples(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }

    pub fn num_shards(&self) -> usize {
        self.batches.len().div_ceil(self.shard_batches)
    }

    /// Batch indices of shard `k`.
    pub fn shard(&self, k: usize) -> std::ops::Range<usize> {
        let start = k * self.shard_batches;
        start.min(self.batches.len())..((k + 1) * self.shard_batches).min(self.batches.len())
    }

    /// A static assignment (round-robin by shard) for runs without a coordinator.
    pub fn shards_of_rank(&self, rank: usize, world: usize) -> Vec<usize> {
        (0..self.num_shards()).filter(|k| k % world == rank).collect()
    }
}

/// Where a rank is in its epoch: serialized into checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// The batch indices this rank still has to produce this epoch, in order, counted
    /// from `done` (i.e. `batches[done..]` remain).
    pub batches: Vec<usize>,
    pub done: usize,
}

impl Cursor {
    /// A cursor over the given shards of `plan`.
    pub fn over_shards(plan: &EpochPlan, shards: &[usize]) -> Self {
        let batches = shards.iter().flat_map(|&k| plan.shard(k)).collect();
        Self { epoch: plan.epoch, batches, done: 0 }
    }

    pub fn remaining(&self) -> &[usize] {
        &self.batches[self.done.min(self.batches.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn shapes() -> Vec<DatasetShape> {
        vec![
            DatasetShape { weight: 1.0, shapes: (0..37).map(|i| (1 + i % 3, 1)).collect() },
            DatasetShape { weight: 0.5, shapes: vec![(1, 8); 20] },
            DatasetShape { weight: 2.0, shapes: vec![(1, 1); 5] },
        ]
    }

    #[test]
    fn the_order_is_a_pure_function_of_seed_and_epoch() {
        let a = EpochPlan::new(7, 3, &shapes(), 4, 2);
        assert_eq!(a, EpochPlan::new(7, 3, &shapes(), 4, 2));
        assert_ne!(a.batches, EpochPlan::new(7, 4, &shapes(), 4, 2).batches);
        assert_ne!(a.batches, EpochPlan::new(8, 3, &shapes(), 4, 2).batches);
    }

    #[test]
    fn weights_select_and_repeat_and_batches_have_one_shape() {
        let ds = shapes();
        let p = EpochPlan::new(1, 0, &ds, 4, 2);
        assert_eq!(p.num_samples(), 37 + 10 + 10);
        let mut count = std::collections::BTreeMap::new();
        for b in &p.batches {
            assert!(!b.is_empty() && b.len() <= 4);
            let s = ds[b[0].dataset as usize].shapes[b[0].query as usize];
            assert!(b.iter().all(|r| ds[r.dataset as usize].shapes[r.query as usize] == s));
            for r in b {
                *count.entry(*r).or_insert(0) += 1;
            }
        }
        assert!((0..37).all(|q| count[&SampleRef { dataset: 0, query: q }] == 1));
        assert_eq!(count.keys().filter(|r| r.dataset == 1).count(), 10, "half of dataset 1, each once");
        assert!((0..5).all(|q| count[&SampleRef { dataset: 2, query: q }] == 2), "dataset 2 twice");
    }

    #[test]
    fn shards_are_disjoint_and_complete_for_any_world_size() {
        let p = EpochPlan::new(3, 1, &shapes(), 3, 2);
        for world in [1, 2, 3, 4, 7, 64] {
            let mut seen = BTreeSet::new();
            for rank in 0..world {
                for b in Cursor::over_shards(&p, &p.shards_of_rank(rank, world)).batches {
                    assert!(seen.insert(b), "batch {b} given twice (world {world})");
                }
            }
            assert_eq!(seen, (0..p.batches.len()).collect(), "world {world}");
        }
    }

    #[test]
    fn a_saved_cursor_resumes_the_same_remaining_order() {
        let p = EpochPlan::new(5, 2, &shapes(), 4, 3);
        let mut c = Cursor::over_shards(&p, &p.shards_of_rank(1, 2));
        c.done = 2;
        let saved = serde_json::to_string(&c).unwrap();
        let back: Cursor = serde_json::from_str(&saved).unwrap();
        assert_eq!(back.remaining(), &c.batches[2..]);
        let replanned = EpochPlan::new(5, back.epoch, &shapes(), 4, 3);
        let r: Vec<_> = back.remaining().iter().map(|&i| replanned.batches[i].clone()).collect();
        let o: Vec<_> = c.batches[2..].iter().map(|&i| p.batches[i].clone()).collect();
        assert_eq!(r, o);
    }

    #[test]
    fn splitmix_matches_its_reference_values() {
        // First outputs for seed 1234567 (reference implementation by Vigna).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }
}
