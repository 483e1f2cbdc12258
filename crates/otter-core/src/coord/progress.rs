//! What the status page and `otter-coord status --watch` show beyond the machine's state:
//! the time, samples and tokens of every committed step, the job's goodput, each rank's
//! last compute and data-wait time, the size of each committed checkpoint. Observed, never
//! decided on, not persisted (a restarted coordinator starts counting again); pure: times
//! are passed in.
//!
//! **Goodput** (the one definition, docs/metrics.md): the time the job spent in optimizer
//! steps that were committed, over the wall time since it started. A committed step's time
//! is the longest its ranks reported for it (every rank waits for the slowest in the
//! all-reduce); the clock starts when the first generation forms, so rendezvous,
//! recovery, restores, steps of a generation that failed before committing them and
//! steps rolled back all count against it.

use super::Millis;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// Committed steps whose timing is kept (for the status page's throughput, on the latest
/// steps; goodput counts every one). Bounded so the coordinator's memory stops growing
/// early in a run (at 4096 a 10k-step soak still saw it grow past its warm-up: issue 50).
pub const STEPS_KEPT: usize = 1024;
/// Committed checkpoints whose time and size are kept.
pub const CHECKPOINTS_KEPT: usize = 64;

/// What one rank said about one step (`StepDone`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepReport {
    pub rank: usize,
    pub step_seconds: f64,
    pub compute_seconds: f64,
    pub data_wait_seconds: f64,
    pub samples: u64,
    pub tokens: u64,
    pub mfu: Option<f64>,
}

/// A committed step as measured: the slowest rank's time, every rank's samples and tokens,
/// the ranks' mean MFU where they know it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTiming {
    pub seconds: f64,
    pub samples: u64,
    pub tokens: u64,
    pub mfu: Option<f64>,
}

impl StepTiming {
    fn add(&mut self, r: &StepReport, mfu_n: &mut u32) {
        self.seconds = self.seconds.max(r.step_seconds);
        self.samples += r.samples;
        self.tokens += r.tokens;
        if let Some(m) = r.mfu.filter(|m| m.is_finite()) {
            let n = f64::from(*mfu_n);
            self.mfu = Some((self.mfu.unwrap_or(0.0) * n + m) / (n + 1.0));
            *mfu_n += 1;
        }
    }
}

/// One rank's last step, in the current generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RankTiming {
    pub compute_seconds: f64,
    pub data_wait_seconds: f64,
}

/// A committed checkpoint: `step-N`, when its manifest was written, its shards' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub at: Millis,
    pub bytes: u64,
}

/// Goodput so far: `useful_seconds / wall_seconds` since `since`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Goodput {
    pub ratio: f64,
    pub useful_seconds: f64,
    pub wall_seconds: f64,
    pub since: Millis,
}

#[derive(Debug, Default)]
pub struct Progress {
    started: Option<Millis>,
    /// When the job ended: the clock stops.
    ended: Option<Millis>,
    /// Reported, not yet committed: by (step, generation), with the MFU reports counted.
    pending: BTreeMap<(u64, u64), (StepTiming, u32)>,
    committed: BTreeMap<u64, StepTiming>,
    /// Steps committed when last told (`None` until first told: a resumed coordinator
    /// does not count the steps it found committed).
    steps_seen: Option<u64>,
    useful_seconds: f64,
    generation: u64,
    ranks: Vec<Option<RankTiming>>,
    checkpoints: VecDeque<CheckpointRecord>,
}

impl Progress {
    /// The job's clock starts (the first generation formed); later calls change nothing.
    pub fn start(&mut self, at: Millis) {
        self.started.get_or_insert(at);
    }

    /// The job finished or failed: the clock stops (the first call counts).
    pub fn stop(&mut self, at: Millis) {
        self.ended.get_or_insert(at);
    }

    pub fn started(&self) -> Option<Millis> {
        self.started
    }

    /// A rank of `generation` finished `step`.
    pub fn reported(&mut self, generation: u64, world: usize, step: u64, r: &StepReport) {
        if generation > self.generation || self.ranks.len() != world {
            self.generation = generation;
            self.ranks = vec![None; world];
        }
        if generation == self.generation {
            if let Some(slot) = self.ranks.get_mut(r.rank) {
                *slot = Some(RankTiming { compute_seconds: r.compute_seconds, data_wait_seconds: r.data_wait_seconds });
            }
        }
        let (t, n) = self.pending.entry((step, generation)).or_default();
        t.add(r, n);
    }

    /// `steps` are committed now (steps `0..steps`). New ones take the timing of the newest
    /// generation that reported them; fewer than before (a rollback) drops the steps given
    /// back from the useful time.
    pub fn committed(&mut self, steps: u64) {
        let Some(before) = self.steps_seen.replace(steps) else {
            self.pending.retain(|&(s, _), _| s >= steps);
            return;
        };
        if steps < before {
            for (_, t) in self.committed.split_off(&steps) {
                self.useful_seconds -= t.seconds;
            }
            self.useful_seconds = self.useful_seconds.max(0.0);
            return;
        }
        for step in before..steps {
            let newest = self.pending.range((step, 0)..=(step, u64::MAX)).next_back().map(|(_, (t, _))| *t);
            if let Some(t) = newest {
                self.useful_seconds += t.seconds;
                self.committed.insert(step, t);
            }
        }
        self.pending.retain(|&(s, _), _| s >= steps);
        while self.committed.len() > STEPS_KEPT {
            self.committed.pop_first();
        }
    }

    pub fn step(&self, step: u64) -> Option<&StepTiming> {
        self.committed.get(&step)
    }

    /// Goodput at `now` (`None` before the clock started or at its first millisecond).
    pub fn goodput(&self, now: Millis) -> Option<Goodput> {
        let since = self.started?;
        let until = self.ended.map_or(now, |e| e.min(now));
        let wall_seconds = until.0.saturating_sub(since.0) as f64 / 1000.0;
        // Step times are the ranks' clocks, the wall the coordinator's: a failure-free job
        // can come out a hair above 1.
        (wall_seconds > 0.0).then(|| Goodput { ratio: (self.useful_seconds / wall_seconds).min(1.0), useful_seconds: self.useful_seconds, wall_seconds, since })
    }

    /// Each rank of the current generation: its last step's timing, if it reported one.
    pub fn ranks(&self) -> &[Option<RankTiming>] {
        &self.ranks
    }

    pub fn checkpoint_committed(&mut self, c: CheckpointRecord) {
        self.checkpoints.retain(|x| x.step != c.step);
        self.checkpoints.push_back(c);
        while self.checkpoints.len() > CHECKPOINTS_KEPT {
            self.checkpoints.pop_front();
        }
    }

    pub fn checkpoints(&self) -> impl Iterator<Item = &CheckpointRecord> {
        self.checkpoints.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(rank: usize, secs: f64) -> StepReport {
        StepReport { rank, step_seconds: secs, compute_seconds: secs * 0.8, data_wait_seconds: 0.01, samples: 2, tokens: 100, mfu: None }
    }

    #[test]
    fn goodput_is_committed_step_time_over_wall_time_since_the_first_generation() {
        let mut p = Progress::default();
        assert_eq!(p.goodput(Millis(5_000)), None, "no clock before the first generation");
        p.start(Millis(1_000));
        p.committed(0);
        // Steps 0 and 1 by generation 1 (2 ranks): a step takes its slowest rank's time.
        for step in 0..2 {
            p.reported(1, 2, step, &rep(0, 1.0));
            p.reported(1, 2, step, &rep(1, 1.5));
        }
        p.committed(2);
        // Step 2 is trained by generation 1, which fails before committing it...
        p.reported(1, 2, 2, &rep(0, 1.0));
        // ...and again by generation 2 (1 rank), which commits it.
        p.reported(2, 1, 2, &rep(0, 2.0));
        p.committed(3);
        let g = p.goodput(Millis(11_000)).unwrap();
        assert_eq!((g.useful_seconds, g.wall_seconds, g.ratio), (1.5 + 1.5 + 2.0, 10.0, 0.5));
        assert_eq!(p.step(0), Some(&StepTiming { seconds: 1.5, samples: 4, tokens: 200, mfu: None }));
        assert_eq!(p.step(2).unwrap().samples, 2, "the committing generation's report");
        assert_eq!(p.ranks().len(), 1, "ranks of the current generation only");
        p.start(Millis(9_000));
        assert_eq!(p.started(), Some(Millis(1_000)), "the clock starts once");
        p.stop(Millis(21_000));
        assert_eq!(p.goodput(Millis(99_000)).unwrap().wall_seconds, 20.0, "and stops when the job ends");
    }

    #[test]
    fn a_rollback_takes_the_steps_given_back_out_of_the_useful_time() {
        let mut p = Progress::default();
        p.start(Millis(0));
        p.committed(0);
        for step in 0..4 {
            p.reported(1, 1, step, &rep(0, 1.0));
        }
        p.committed(4);
        p.committed(2);
        assert_eq!(p.goodput(Millis(8_000)).unwrap().useful_seconds, 2.0);
        assert_eq!(p.step(3), None);
        p.reported(2, 1, 2, &rep(0, 3.0));
        p.committed(3);
        assert_eq!(p.goodput(Millis(8_000)).unwrap().useful_seconds, 5.0, "the redone step counts once, with its new time");
    }

    #[test]
    fn a_resumed_coordinator_counts_only_the_steps_it_saw_committed() {
        let mut p = Progress::default();
        p.committed(100);
        p.start(Millis(0));
        p.reported(3, 1, 100, &rep(0, 1.0));
        p.committed(101);
        assert_eq!(p.goodput(Millis(4_000)).unwrap().useful_seconds, 1.0);
    }

    #[test]
    fn mfu_is_the_mean_of_the_ranks_that_know_it() {
        let mut p = Progress::default();
        p.committed(0);
        p.reported(1, 3, 0, &StepReport { mfu: Some(0.4), ..rep(0, 1.0) });
        p.reported(1, 3, 0, &StepReport { mfu: Some(0.5), ..rep(1, 1.0) });
        p.reported(1, 3, 0, &StepReport { mfu: None, ..rep(2, 1.0) });
        p.committed(1);
        assert!((p.step(0).unwrap().mfu.unwrap() - 0.45).abs() < 1e-12);
    }

    #[test]
    fn checkpoints_keep_the_newest_record_per_step() {
        let mut p = Progress::default();
        p.checkpoint_committed(CheckpointRecord { step: 10, at: Millis(1), bytes: 5 });
        p.checkpoint_committed(CheckpointRecord { step: 10, at: Millis(2), bytes: 6 });
        p.checkpoint_committed(CheckpointRecord { step: 20, at: Millis(3), bytes: 7 });
        let got: Vec<(u64, u64)> = p.checkpoints().map(|c| (c.step, c.bytes)).collect();
        assert_eq!(got, [(10, 6), (20, 7)]);
    }
}
