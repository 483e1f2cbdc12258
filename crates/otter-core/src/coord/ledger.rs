//! The data ledger: the one record of which batches were leased to which step and rank,
//! and which are committed (trained into the model state the job continues from).
//!
//! The stream is every `(epoch, batch)` of every epoch in order. Its state is kept small
//! enough to persist after every event: a position `next` in the stream (everything before
//! it was leased at some time), the batches that were leased and given back (`returned`,
//! always consumed first), the outstanding leases by step, and the committed steps.
//! Invariant: committed ++ leased ++ returned ++ stream[next..] is the stream itself, in
//! order ([`Ledger::check_exactly_once`] verifies it).
//!
//! Compaction keeps the state from growing with the length of the run: committed steps
//! that no restore can roll back any more (those covered by the oldest kept checkpoint)
//! are folded into a count of steps and of stream positions; their batch lists, world x k
//! entries per step, are dropped (their batches are implied: committed steps are a prefix
//! of the stream), and of their summaries (generation, world, epoch, loss) only the latest
//! [`HISTORY_WINDOW`] stay. [`Ledger::compact_through`] hands the others to the caller,
//! which appends them to a history file: the state a long job saves is bounded.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Summaries of compacted steps kept in the state (for the status page's recent curve).
pub const HISTORY_WINDOW: usize = 256;

/// One data batch: batch `batch` of the epoch plan of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchRef {
    pub epoch: u64,
    pub batch: u64,
}

impl std::fmt::Display for BatchRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(epoch {}, batch {})", self.epoch, self.batch)
    }
}

/// Consecutive batches of one epoch: `len` batches from `batch` on. Saved as
/// `[epoch, batch, len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run(pub u64, pub u64, pub u64);

impl Run {
    pub fn first(&self) -> BatchRef {
        BatchRef { epoch: self.0, batch: self.1 }
    }
    pub fn len(&self) -> u64 {
        self.2
    }
    pub fn is_empty(&self) -> bool {
        self.2 == 0
    }
    fn iter(self) -> impl Iterator<Item = BatchRef> {
        (self.1..self.1 + self.2).map(move |batch| BatchRef { epoch: self.0, batch })
    }
    /// The part from offset `from`, at most `n` batches.
    fn slice(self, from: u64, n: u64) -> Run {
        let from = from.min(self.2);
        Run(self.0, self.1 + from, n.min(self.2 - from))
    }
}

/// Appends `runs` to `to`, merging a run that continues the last one.
fn extend_runs(to: &mut Vec<Run>, runs: impl IntoIterator<Item = Run>) {
    for r in runs.into_iter().filter(|r| !r.is_empty()) {
        match to.last_mut() {
            Some(last) if last.0 == r.0 && last.1 + last.2 == r.1 => last.2 += r.2,
            _ => to.push(r),
        }
    }
}

/// The runs of `items`, in order.
pub fn runs_of(items: impl IntoIterator<Item = BatchRef>) -> Vec<Run> {
    let mut runs = Vec::new();
    extend_runs(&mut runs, items.into_iter().map(|b| Run(b.epoch, b.batch, 1)));
    runs
}

/// A step's batches, in stream order, split over the `world` ranks of the generation that
/// leased it: rank `r` takes part `r` of [`crate::comm::split`] (contiguous, the first
/// `len % world` ranks one more). Kept as runs of consecutive batches, so a step costs a
/// few dozen bytes whatever the world (not world x k entries); saved as
/// `{"world": W, "runs": [[epoch, batch, len], ...]}`. A state of the previous version
/// (a list of batches per rank) loads into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StepBatchesRepr")]
pub struct StepBatches {
    world: usize,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StepBatchesRepr {
    Runs { world: usize, runs: Vec<Run> },
    PerRank(Vec<Vec<BatchRef>>),
}

impl TryFrom<StepBatchesRepr> for StepBatches {
    type Error = String;
    fn try_from(r: StepBatchesRepr) -> Result<Self, String> {
        match r {
            StepBatchesRepr::Runs { world, runs } => Ok(Self { world, runs }),
            StepBatchesRepr::PerRank(lists) => {
                let b = Self::new(lists.iter().flatten().copied(), lists.len());
                if b.ranks() != lists {
                    return Err(format!("per_rank: the lists of {} ranks are not the contiguous split of their batches", lists.len()));
                }
                Ok(b)
            }
        }
    }
}

impl StepBatches {
    pub fn new(items: impl IntoIterator<Item = BatchRef>, world: usize) -> Self {
        Self { world, runs: runs_of(items) }
    }

    fn from_runs(runs: Vec<Run>, world: usize) -> Self {
        let mut merged = Vec::with_capacity(runs.len());
        extend_runs(&mut merged, runs);
        Self { world, runs: merged }
    }

    /// Ranks of the generation that leased the step.
    pub fn world(&self) -> usize {
        self.world
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Batches of the step, over all ranks.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(Run::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every batch, in order (rank 0's first).
    pub fn iter(&self) -> impl Iterator<Item = BatchRef> + '_ {
        self.runs.iter().flat_map(|r| r.iter())
    }

    /// Rank `rank`'s batches, in order.
    pub fn rank(&self, rank: usize) -> Vec<BatchRef> {
        if rank >= self.world {
            return Vec::new();
        }
        let (start, n) = crate::comm::split(self.len() as usize, self.world, rank);
        let (mut skip, mut left) = (start as u64, n as u64);
        let mut out = Vec::with_capacity(n);
        for r in &self.runs {
            if left == 0 {
                break;
            }
            if skip >= r.len() {
                skip -= r.len();
                continue;
            }
            let part = r.slice(skip, left);
            skip = 0;
            left -= part.len();
            out.extend(part.iter());
        }
        out
    }

    /// Every rank's batches.
    pub fn ranks(&self) -> Vec<Vec<BatchRef>> {
        (0..self.world).map(|r| self.rank(r)).collect()
    }

    /// The highest epoch among its batches.
    pub fn max_epoch(&self) -> u64 {
        self.runs.iter().filter(|r| !r.is_empty()).map(|r| r.0).max().unwrap_or(0)
    }
}

/// Batches given back (their steps were rolled back or never committed), in stream order,
/// as runs; they go out before the rest of the stream. A state of the previous version (a
/// list of batches) loads into it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ReturnedRepr")]
pub struct Returned(VecDeque<Run>);

#[derive(Deserialize)]
#[serde(untagged)]
enum ReturnedRepr {
    Runs(VecDeque<Run>),
    Batches(Vec<BatchRef>),
}

impl From<ReturnedRepr> for Returned {
    fn from(r: ReturnedRepr) -> Self {
        match r {
            ReturnedRepr::Runs(runs) => Self(runs),
            ReturnedRepr::Batches(items) => Self(runs_of(items).into()),
        }
    }
}

impl Returned {
    pub fn len(&self) -> u64 {
        self.0.iter().map(Run::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Run::is_empty)
    }

    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.0.iter()
    }

    /// Takes the first `n` batches (or all there are).
    fn take_front(&mut self, mut n: u64) -> Vec<Run> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.0.front_mut() else { break };
            if front.len() <= n {
                n -= front.len();
                out.push(*front);
                self.0.pop_front();
            } else {
                out.push(front.slice(0, n));
                *front = front.slice(n, u64::MAX);
                n = 0;
            }
        }
        out
    }

    /// Puts `runs` (in order) in front of what is there.
    fn push_front(&mut self, runs: Vec<Run>) {
        let mut all = Vec::with_capacity(runs.len() + self.0.len());
        extend_runs(&mut all, runs.into_iter().chain(self.0.drain(..)));
        self.0 = all.into();
    }
}

/// The batches one rank trains in one step (its `k` micro-batches, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLease {
    pub step: u64,
    pub items: Vec<BatchRef>,
}

/// A step leased by a generation and not yet settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedStep {
    pub generation: u64,
    /// Its batches, split over the ranks of `generation`.
    #[serde(alias = "per_rank")]
    pub batches: StepBatches,
    /// Loss each rank reported for this step, if it did (non-finite losses are not kept).
    pub losses: Vec<Option<f64>>,
    /// The learning rate the step was trained at (every rank reports the same).
    #[serde(default)]
    pub lr: Option<f64>,
}

/// A step whose batches are trained into the job's model state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedStep {
    pub step: u64,
    /// The generation that leased (and ran) it.
    pub generation: u64,
    /// Its batches, split over the ranks of `generation`, dead ranks included.
    #[serde(alias = "per_rank")]
    pub batches: StepBatches,
    /// Mean loss over its micro-batches: the ranks' reported means weighted by their
    /// batch counts (ranks that died before reporting are missing from it).
    pub mean_loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
}

/// What is kept of a committed step once it is compacted (and shown for every step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepSummary {
    pub step: u64,
    pub generation: u64,
    /// Ranks of the generation that ran it.
    pub world: u64,
    /// The highest epoch among its batches.
    pub epoch: u64,
    pub mean_loss: Option<f64>,
    /// The learning rate it was trained at.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Its micro-batches (data batches), over all ranks: the job's global batch.
    #[serde(default)]
    pub micro_batches: u64,
}

impl CommittedStep {
    pub fn summary(&self) -> StepSummary {
        StepSummary {
            step: self.step,
            generation: self.generation,
            world: self.batches.world() as u64,
            epoch: self.batches.max_epoch(),
            mean_loss: self.mean_loss,
            lr: self.lr,
            micro_batches: self.batches.len(),
        }
    }
}

/// The compacted prefix of the committed steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "CompactedRepr")]
pub struct Compacted {
    /// Steps `0..count` are compacted.
    count: u64,
    /// The summaries of the latest of them (at most [`HISTORY_WINDOW`]), in order.
    recent: VecDeque<StepSummary>,
    /// Stream positions they consumed: the stream's first `batches` batches.
    pub batches: u64,
}

/// What a saved state holds: this version's (`count`, `recent`), or an earlier one's
/// (every summary in `steps`), which loads into the same thing.
#[derive(Deserialize)]
struct CompactedRepr {
    #[serde(default)]
    count: u64,
    #[serde(default)]
    recent: VecDeque<StepSummary>,
    #[serde(default)]
    steps: Vec<StepSummary>,
    #[serde(default)]
    batches: u64,
}

impl From<CompactedRepr> for Compacted {
    fn from(r: CompactedRepr) -> Self {
        if r.steps.is_empty() {
            return Self { count: r.count, recent: r.recent, batches: r.batches };
        }
        let count = r.steps.len() as u64;
        let skip = r.steps.len().saturating_sub(HISTORY_WINDOW);
        Self { count, recent: r.steps.into_iter().skip(skip).collect(), batches: r.batches }
    }
}

impl Compacted {
    /// Steps compacted (`0..count`).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The summaries of the latest compacted steps (at most [`HISTORY_WINDOW`]).
    pub fn recent(&self) -> &VecDeque<StepSummary> {
        &self.recent
    }
}

/// How the job's data use ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerEnd {
    /// `max_steps` reached; the rest of the stream was never needed.
    MaxSteps,
    /// The last epoch ran out: what is still pending is the dropped tail, smaller than
    /// one step of `step_batches`.
    DataExhausted { step_batches: u64 },
}

/// What [`Ledger::check_exactly_once`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub committed_batches: u64,
    pub leased_batches: u64,
    pub pending_batches: u64,
    /// `Some` once the data ran out: the batches of the last epoch's tail not trained.
    pub dropped_tail: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("committed steps are not numbered 0, 1, 2, ...: position {index} holds step {step}")]
    StepGap { index: u64, step: u64 },
    #[error("{batch} committed twice: by step {first_step} and by step {second_step}")]
    DuplicateCommit { batch: BatchRef, first_step: u64, second_step: u64 },
    #[error("stream position {position}: expected {expected}, the ledger has {found}")]
    OutOfOrder { position: u64, expected: BatchRef, found: BatchRef },
    #[error("stream position {position}: the ledger holds a batch beyond the end of the data: {found}")]
    BeyondEnd { position: u64, found: BatchRef },
    #[error("batches lost: the ledger accounts for {accounted} of the {leased} batches leased so far")]
    Lost { accounted: u64, leased: u64 },
    #[error("the job ended with steps still leased: {steps:?}")]
    OpenLeasesAtEnd { steps: Vec<u64> },
    #[error("the data ran out with {pending} batches pending, but a step takes only {step_batches}")]
    TailTooLarge { pending: u64, step_batches: u64 },
}

/// What settling a generation did (for the event log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settlement {
    pub committed: Vec<u64>,
    pub returned: Vec<u64>,
    pub rolled_back: Vec<u64>,
    pub batches_back: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    epoch_batches: Vec<u64>,
    /// Stream position of the first batch never leased.
    next: u64,
    /// Leased once, given back; all precede `next` in stream order and go out first.
    returned: Returned,
    leased: BTreeMap<u64, LeasedStep>,
    /// Committed steps folded into a count (see the module docs); older states have none.
    #[serde(default)]
    compacted: Compacted,
    /// Committed steps after the compacted ones, with their batches.
    committed: Vec<CommittedStep>,
    end: Option<LedgerEnd>,
}

/// The stream from a position: epochs in order, batches in order, empty epochs skipped.
struct Stream<'a> {
    epoch_batches: &'a [u64],
    epoch: usize,
    batch: u64,
}

impl Iterator for Stream<'_> {
    type Item = BatchRef;
    fn next(&mut self) -> Option<BatchRef> {
        while self.epoch < self.epoch_batches.len() && self.batch >= self.epoch_batches[self.epoch] {
            self.epoch += 1;
            self.batch = 0;
        }
        let e = *self.epoch_batches.get(self.epoch)?;
        debug_assert!(self.batch < e);
        let item = BatchRef { epoch: self.epoch as u64, batch: self.batch };
        self.batch += 1;
        Some(item)
    }
}

impl Ledger {
    /// `epoch_batches[e]`: the number of batches in epoch `e`.
    pub fn new(epoch_batches: Vec<u64>) -> Self {
        Self {
            epoch_batches,
            next: 0,
            returned: Returned::default(),
            leased: BTreeMap::new(),
            compacted: Compacted::default(),
            committed: Vec::new(),
            end: None,
        }
    }

    /// Batches in all epochs.
    pub fn total(&self) -> u64 {
        self.epoch_batches.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    pub fn epoch_batches(&self) -> &[u64] {
        &self.epoch_batches
    }

    fn stream_from(&self, position: u64) -> Stream<'_> {
        let mut left = position;
        for (e, &n) in self.epoch_batches.iter().enumerate() {
            if left < n {
                return Stream { epoch_batches: &self.epoch_batches, epoch: e, batch: left };
            }
            left -= n;
        }
        Stream { epoch_batches: &self.epoch_batches, epoch: self.epoch_batches.len(), batch: 0 }
    }

    /// The `n` batches of the stream from `position` (fewer if it ends), as runs.
    fn stream_runs(&self, position: u64, mut n: u64) -> Vec<Run> {
        let mut s = self.stream_from(position);
        let mut runs = Vec::new();
        while n > 0 {
            while s.epoch < self.epoch_batches.len() && s.batch >= self.epoch_batches[s.epoch] {
                s.epoch += 1;
                s.batch = 0;
            }
            let Some(&e) = self.epoch_batches.get(s.epoch) else { break };
            let take = (e - s.batch).min(n);
            runs.push(Run(s.epoch as u64, s.batch, take));
            s.batch += take;
            n -= take;
        }
        runs
    }

    /// Committed steps not compacted yet, with their batches, in order: steps
    /// `compacted().count()` onwards.
    pub fn committed(&self) -> &[CommittedStep] {
        &self.committed
    }

    /// The compacted prefix of the committed steps.
    pub fn compacted(&self) -> &Compacted {
        &self.compacted
    }

    /// Committed step `step` with its batches, unless it is compacted.
    pub fn committed_step(&self, step: u64) -> Option<&CommittedStep> {
        let i = step.checked_sub(self.compacted.count)?;
        self.committed.get(usize::try_from(i).ok()?).filter(|c| c.step == step)
    }

    /// The committed steps the state still describes, in order: the latest compacted
    /// ones (the window) and every uncompacted one. Older ones are in the history file.
    pub fn history(&self) -> impl Iterator<Item = StepSummary> + '_ {
        self.compacted.recent.iter().copied().chain(self.committed.iter().map(CommittedStep::summary))
    }

    /// The newest committed step's summary.
    pub fn last_committed(&self) -> Option<StepSummary> {
        self.committed.last().map(CommittedStep::summary).or_else(|| self.compacted.recent.back().copied())
    }

    /// The number of committed steps (the next step to commit).
    pub fn steps_committed(&self) -> u64 {
        self.compacted.count + self.committed.len() as u64
    }

    /// Folds the committed steps below `steps` into the compacted prefix. Only for steps no
    /// restore can roll back (the machine calls it with the oldest kept checkpoint).
    /// Returns the summaries that left the window (for the history file), in order.
    pub(crate) fn compact_through(&mut self, steps: u64) -> Vec<StepSummary> {
        let n = steps.saturating_sub(self.compacted.count).min(self.committed.len() as u64) as usize;
        let mut out = Vec::new();
        for c in self.committed.drain(..n) {
            self.compacted.batches += c.batches.len();
            self.compacted.count += 1;
            self.compacted.recent.push_back(c.summary());
            if self.compacted.recent.len() > HISTORY_WINDOW {
                out.extend(self.compacted.recent.pop_front());
            }
        }
        out
    }

    /// Outstanding leases by step.
    pub fn leased(&self) -> &BTreeMap<u64, LeasedStep> {
        &self.leased
    }

    pub fn committed_through(&self) -> Option<u64> {
        self.steps_committed().checked_sub(1)
    }

    pub fn committed_batches(&self) -> u64 {
        self.compacted.batches + self.committed.iter().map(|c| c.batches.len()).sum::<u64>()
    }

    /// The last step leased or committed: the furthest any model state can be.
    pub fn last_step(&self) -> Option<u64> {
        self.leased.last_key_value().map(|(&s, _)| s).or(self.committed_through())
    }

    /// Batches not leased now (returned ones and the rest of the stream).
    pub fn pending_batches(&self) -> u64 {
        self.returned.len() + self.total().saturating_sub(self.next)
    }

    pub fn end(&self) -> Option<LedgerEnd> {
        self.end
    }

    /// Rank `rank`'s lease of `step`, whether still outstanding or committed (and not
    /// compacted).
    pub fn lease_of(&self, step: u64, rank: usize) -> Option<StepLease> {
        let batches = match self.leased.get(&step) {
            Some(l) => &l.batches,
            None => &self.committed_step(step)?.batches,
        };
        (rank < batches.world()).then(|| StepLease { step, items: batches.rank(rank) })
    }

    /// Leases `step` to `world` ranks of `generation`: the next `n` batches of the pending
    /// pool (a step's batches do not depend on the world), rank `r` taking part `r` of
    /// [`crate::comm::split`] (contiguous; the first `n % world` ranks one more). False
    /// (and nothing changes) if fewer than `n` batches are left: the data is exhausted.
    pub(crate) fn lease(&mut self, step: u64, generation: u64, world: usize, n: u64) -> bool {
        debug_assert!(self.leased.last_key_value().map_or(true, |(&s, _)| s < step));
        if world == 0 || n == 0 || self.pending_batches() < n {
            return false;
        }
        let mut runs = self.returned.take_front(n);
        let fresh = n - runs.iter().map(Run::len).sum::<u64>();
        runs.extend(self.stream_runs(self.next, fresh));
        self.next += fresh;
        let batches = StepBatches::from_runs(runs, world);
        self.leased.insert(step, LeasedStep { generation, batches, losses: vec![None; world], lr: None });
        true
    }

    pub(crate) fn record_loss(&mut self, step: u64, rank: usize, loss: f64, lr: f64) {
        if let Some(l) = self.leased.get_mut(&step) {
            if let Some(slot) = l.losses.get_mut(rank) {
                *slot = loss.is_finite().then_some(loss);
            }
            if lr.is_finite() {
                l.lr.get_or_insert(lr);
            }
        }
    }

    /// Commits outstanding `step` if it is the next one; false otherwise.
    pub(crate) fn commit(&mut self, step: u64) -> bool {
        if step != self.steps_committed() {
            return false;
        }
        let Some(l) = self.leased.remove(&step) else { return false };
        // Weighted by batch counts: the mean over the step's micro-batches, whatever the split.
        let (sum, n) = l
            .losses
            .iter()
            .enumerate()
            .filter_map(|(rank, loss)| Some((loss.as_ref()?, crate::comm::split(l.batches.len() as usize, l.batches.world(), rank).1 as f64)))
            .fold((0.0, 0.0), |(s, n), (loss, k)| (s + loss * k, n + k));
        // Ranks report the step's loss over the whole group (an all-reduced mean, the same
        // bits on every rank): taken as is when they agree, so that no arithmetic here
        // makes a deterministic run's loss depend on how its batches were split.
        let reported: Vec<f64> = l.losses.iter().flatten().copied().collect();
        let mean_loss = match reported.split_first() {
            Some((first, rest)) if rest.iter().all(|x| x.to_bits() == first.to_bits()) => Some(*first),
            _ => (n > 0.0).then(|| sum / n),
        };
        self.committed.push(CommittedStep { step, generation: l.generation, batches: l.batches, mean_loss, lr: l.lr });
        true
    }

    /// The commit rule at a rendezvous, given `applied` = the highest step the continuing
    /// model state holds (`None`: a fresh state). Steps `<= applied` become committed;
    /// every other leased or committed step goes back to the front of the pool, in order.
    pub(crate) fn settle(&mut self, applied: Option<u64>) -> Settlement {
        let keep = applied.map_or(0, |a| a.saturating_add(1));
        let mut s = Settlement::default();
        while let Some((&step, _)) = self.leased.first_key_value() {
            if step >= keep || !self.commit(step) {
                break;
            }
            s.committed.push(step);
        }
        let mut back: Vec<Run> = Vec::new();
        // Compacted steps are never rolled back: the machine compacts only what the oldest
        // kept checkpoint covers, and no settlement goes below that checkpoint.
        let compacted = self.compacted.count;
        debug_assert!(keep >= compacted, "settling to {keep} steps below the {compacted} compacted ones");
        let keep_tail = keep.saturating_sub(compacted);
        if (self.committed.len() as u64) > keep_tail {
            for c in self.committed.split_off(keep_tail as usize) {
                s.rolled_back.push(c.step);
                extend_runs(&mut back, c.batches.runs);
            }
        }
        for (step, l) in std::mem::take(&mut self.leased) {
            s.returned.push(step);
            extend_runs(&mut back, l.batches.runs);
        }
        s.batches_back = back.iter().map(Run::len).sum();
        self.returned.push_front(back);
        s
    }

    pub(crate) fn close(&mut self, end: LedgerEnd) {
        self.end = Some(end);
    }

    /// Proves the exactly-once property: committed steps are numbered without gaps, no
    /// batch is committed twice, and committed ++ leased ++ pending is the data stream in
    /// order (so nothing is lost, repeated or reordered). Once the job has ended, also that
    /// no lease is left open and, if the data ran out, that only a tail smaller than one
    /// step is left untrained.
    pub fn check_exactly_once(&self) -> Result<Coverage, LedgerError> {
        // The steps the state still describes are numbered on from the ones before them.
        let described = self.compacted.recent.len() as u64 + self.committed.len() as u64;
        let first = self.steps_committed().checked_sub(described).ok_or(LedgerError::StepGap { index: 0, step: self.steps_committed() })?;
        for (i, step) in self.history().map(|c| c.step).enumerate() {
            let index = first + i as u64;
            if step != index {
                return Err(LedgerError::StepGap { index, step });
            }
        }
        // No batch in two committed steps: the runs sorted by their first batch must not
        // overlap (run-level: a step is a few runs, whatever the world).
        let mut committed_runs: Vec<(Run, u64)> = self.committed.iter().flat_map(|c| c.batches.runs.iter().map(move |&r| (r, c.step))).filter(|(r, _)| !r.is_empty()).collect();
        committed_runs.sort_by_key(|&(r, step)| (r.0, r.1, step));
        for w in committed_runs.windows(2) {
            let ((a, a_step), (b, b_step)) = (w[0], w[1]);
            if a.0 == b.0 && b.1 < a.1 + a.2 {
                return Err(LedgerError::DuplicateCommit { batch: b.first(), first_step: a_step.min(b_step), second_step: a_step.max(b_step) });
            }
        }
        // committed ++ leased ++ returned is the stream from the compacted steps' end on,
        // run by run.
        let committed = self.committed.iter().flat_map(|c| c.batches.runs.iter());
        let leased = self.leased.values().flat_map(|l| l.batches.runs.iter());
        let mut position = self.compacted.batches;
        let mut stream = self.stream_from(position);
        for run in committed.chain(leased).chain(self.returned.runs()).filter(|r| !r.is_empty()) {
            let mut left = *run;
            while left.len() > 0 {
                while stream.epoch < self.epoch_batches.len() && stream.batch >= self.epoch_batches[stream.epoch] {
                    stream.epoch += 1;
                    stream.batch = 0;
                }
                let found = left.first();
                let Some(&in_epoch) = self.epoch_batches.get(stream.epoch) else { return Err(LedgerError::BeyondEnd { position, found }) };
                let expected = BatchRef { epoch: stream.epoch as u64, batch: stream.batch };
                if found != expected {
                    return Err(LedgerError::OutOfOrder { position, expected, found });
                }
                let take = left.len().min(in_epoch - stream.batch);
                stream.batch += take;
                position += take;
                left = left.slice(take, u64::MAX);
            }
        }
        if position != self.next {
            return Err(LedgerError::Lost { accounted: position, leased: self.next });
        }
        let pending = self.pending_batches();
        let mut dropped_tail = None;
        if let Some(end) = self.end {
            if !self.leased.is_empty() {
                return Err(LedgerError::OpenLeasesAtEnd { steps: self.leased.keys().copied().collect() });
            }
            if let LedgerEnd::DataExhausted { step_batches } = end {
                if pending >= step_batches {
                    return Err(LedgerError::TailTooLarge { pending, step_batches });
                }
                dropped_tail = Some(pending);
            }
        }
        Ok(Coverage {
            committed_batches: self.committed_batches(),
            leased_batches: self.leased.values().map(|l| l.batches.len()).sum(),
            pending_batches: pending,
            dropped_tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(epoch: u64, batch: u64) -> BatchRef {
        BatchRef { epoch, batch }
    }

    fn flat(l: &LeasedStep) -> Vec<BatchRef> {
        l.batches.iter().collect()
    }

    #[test]
    fn steps_take_consecutive_runs_and_span_epochs_and_skip_empty_ones() {
        let mut l = Ledger::new(vec![3, 0, 4]);
        assert_eq!(l.total(), 7);
        assert!(l.lease(0, 1, 2, 2));
        assert!(l.lease(1, 1, 2, 2));
        assert_eq!(l.leased[&0].batches.ranks(), vec![vec![b(0, 0)], vec![b(0, 1)]]);
        assert_eq!(l.leased[&1].batches.ranks(), vec![vec![b(0, 2)], vec![b(2, 0)]], "a step spans the boundary");
        assert!(l.lease(2, 1, 1, 3));
        assert_eq!(flat(&l.leased[&2]), vec![b(2, 1), b(2, 2), b(2, 3)]);
        assert!(!l.lease(3, 1, 1, 1), "nothing left");
        assert_eq!(l.check_exactly_once().unwrap().leased_batches, 7);
    }

    #[test]
    fn w_ranks_with_k_see_what_one_rank_with_w_times_k_sees() {
        for (world, k) in [(1, 1), (2, 1), (3, 2), (4, 3), (8, 1)] {
            let batches = 100;
            let (mut many, mut one) = (Ledger::new(vec![batches, batches]), Ledger::new(vec![batches, batches]));
            let mut step = 0;
            while many.lease(step, 1, world, world as u64 * k) {
                assert!(one.lease(step, 1, 1, world as u64 * k));
                assert_eq!(flat(&many.leased[&step]), flat(&one.leased[&step]), "step {step}, W={world}, k={k}");
                let r = world - 1;
                let pos = step * world as u64 * k + r as u64 * k;
                assert_eq!(many.leased[&step].batches.rank(r)[0], many.stream_from(pos).next().unwrap());
                step += 1;
            }
            assert!(!one.lease(step, 1, 1, world as u64 * k));
            assert_eq!(step, 2 * batches / (world as u64 * k));
        }
    }

    #[test]
    fn settle_commits_up_to_the_applied_step_and_returns_the_rest_in_order() {
        let mut l = Ledger::new(vec![20]);
        for s in 0..4 {
            assert!(l.lease(s, 1, 2, 4));
        }
        assert!(l.commit(0));
        assert!(!l.commit(2), "commits go in order");
        let s = l.settle(Some(1));
        assert_eq!((s.committed, s.returned, s.batches_back), (vec![1], vec![2, 3], 8));
        assert_eq!(l.committed_through(), Some(1));
        // Returned batches go out first, in their old order, cut to the new world's size.
        assert!(l.lease(2, 2, 3, 3));
        assert_eq!(flat(&l.leased[&2]), vec![b(0, 8), b(0, 9), b(0, 10)]);
        assert!(l.lease(3, 2, 3, 6));
        assert_eq!(flat(&l.leased[&3]), (11..17).map(|i| b(0, i)).collect::<Vec<_>>());
        l.check_exactly_once().unwrap();
    }

    #[test]
    fn batches_returned_twice_keep_their_order_ahead_of_older_returns() {
        let mut l = Ledger::new(vec![12]);
        for s in 0..3 {
            assert!(l.lease(s, 1, 2, 4));
        }
        assert!(l.commit(0));
        l.settle(Some(0)); // steps 1, 2 (batches 4..12) go back
        assert!(l.lease(1, 2, 1, 3)); // a smaller world takes 4..7; 7..12 stay returned
        l.settle(Some(0)); // 4..7 go back again, in front of 7..12
        assert!(l.lease(1, 3, 1, 8));
        assert_eq!(flat(&l.leased[&1]), (4..12).map(|i| b(0, i)).collect::<Vec<_>>());
        l.check_exactly_once().unwrap();
    }

    #[test]
    fn settling_below_the_committed_steps_rolls_them_back() {
        let mut l = Ledger::new(vec![10]);
        for s in 0..3 {
            assert!(l.lease(s, 1, 1, 2));
        }
        assert!(l.commit(0) && l.commit(1));
        let s = l.settle(None);
        assert_eq!((s.rolled_back, s.returned), (vec![0, 1], vec![2]));
        assert_eq!((l.committed_through(), l.pending_batches()), (None, 10));
        assert!(l.lease(0, 2, 1, 4));
        assert_eq!(flat(&l.leased[&0]), (0..4).map(|i| b(0, i)).collect::<Vec<_>>());
        l.check_exactly_once().unwrap();
    }

    #[test]
    fn a_step_takes_the_same_batches_whatever_the_world_split_unevenly() {
        let mut l = Ledger::new(vec![20]);
        assert!(l.lease(0, 1, 2, 5));
        let sizes: Vec<usize> = l.leased()[&0].batches.ranks().iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 2], "the first 5 % 2 ranks take one more");
        assert!(l.lease(1, 2, 3, 5));
        let sizes: Vec<usize> = l.leased()[&1].batches.ranks().iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        let batches: Vec<u64> = l.leased()[&1].batches.iter().map(|b| b.batch).collect();
        assert_eq!(batches, [5, 6, 7, 8, 9], "the next 5 of the stream, in order");
        // The step's loss is the mean over its micro-batches: rank 0's mean counts 3 times.
        l.record_loss(0, 0, 1.0, 2e-4);
        l.record_loss(0, 1, 2.0, 2e-4);
        assert!(l.commit(0));
        let s = l.committed[0].summary();
        assert_eq!((s.mean_loss, s.lr, s.micro_batches, s.world), (Some((3.0 * 1.0 + 2.0 * 2.0) / 5.0), Some(2e-4), 5, 2));
        // Ranks that agree (each reports the group's all-reduced loss) are taken as is: the
        // weighted mean (2, 2 and 1 batches) of three equal losses is not that loss in f64.
        let x = 0.123456789f64;
        assert_ne!((x * 2.0 + x * 2.0 + x * 1.0) / 5.0, x, "the control");
        for rank in 0..3 {
            l.record_loss(1, rank, x, 2e-4);
        }
        assert!(l.commit(1));
        assert_eq!(l.committed[1].summary().mean_loss, Some(x));
    }

    #[test]
    fn the_check_catches_what_it_claims_to() {
        let mut good = Ledger::new(vec![10]);
        for s in 0..3 {
            assert!(good.lease(s, 1, 2, 2));
            assert!(good.commit(s));
        }
        good.close(LedgerEnd::DataExhausted { step_batches: 2 });
        assert!(matches!(good.check_exactly_once(), Err(LedgerError::TailTooLarge { pending: 4, .. })));
        good.end = None;
        assert_eq!(good.check_exactly_once().unwrap().committed_batches, 6);

        let mut dup = good.clone();
        dup.committed[2].batches = StepBatches::new([b(0, 4), b(0, 1)], 2);
        assert!(matches!(
            dup.check_exactly_once(),
            Err(LedgerError::DuplicateCommit { first_step: 0, second_step: 2, .. })
        ));
        let mut swapped = good.clone();
        swapped.committed[1].batches = StepBatches::new([b(0, 3), b(0, 2)], 2);
        assert!(matches!(swapped.check_exactly_once(), Err(LedgerError::OutOfOrder { position: 2, .. })));
        let mut lost = good.clone();
        lost.committed[2].batches = StepBatches::new([b(0, 4)], 2);
        assert!(matches!(lost.check_exactly_once(), Err(LedgerError::Lost { accounted: 5, leased: 6 })));
        let mut gap = good.clone();
        gap.committed.remove(1);
        assert!(matches!(gap.check_exactly_once(), Err(LedgerError::StepGap { index: 1, step: 2 })));
        let mut open = good.clone();
        assert!(open.lease(3, 1, 2, 2));
        open.close(LedgerEnd::MaxSteps);
        assert!(matches!(open.check_exactly_once(), Err(LedgerError::OpenLeasesAtEnd { .. })));
    }

    #[test]
    fn losses_average_over_the_ranks_that_reported_finite_ones() {
        let mut l = Ledger::new(vec![8]);
        assert!(l.lease(0, 1, 3, 3));
        l.record_loss(0, 0, 1.0, 1e-3);
        l.record_loss(0, 1, f64::NAN, 1e-3);
        l.record_loss(0, 2, 3.0, 1e-3);
        l.record_loss(0, 7, 3.0, 1e-3);
        assert!(l.commit(0));
        assert_eq!(l.committed[0].mean_loss, Some(2.0));
    }

    /// Runs `steps` steps of `world` ranks x `k` batches, committing each, and compacts
    /// every `every` steps as the machine does when a checkpoint commits.
    fn long_run(l: &mut Ledger, steps: u64, world: usize, k: u64, every: u64) {
        for step in l.steps_committed()..steps {
            assert!(l.lease(step, 1, world, world as u64 * k));
            l.record_loss(step, 0, step as f64, 1e-3);
            assert!(l.commit(step));
            if (step + 1) % every == 0 {
                l.compact_through(step + 1);
            }
        }
    }

    #[test]
    fn compaction_keeps_exactly_once_counts_history_and_the_next_leases() {
        let (mut full, mut compact) = (Ledger::new(vec![500, 500]), Ledger::new(vec![500, 500]));
        long_run(&mut full, 60, 4, 2, u64::MAX);
        long_run(&mut compact, 60, 4, 2, 16);
        assert_eq!(compact.compacted().count(), 48);
        assert_eq!(compact.committed().len(), 12);
        let (a, b) = (full.check_exactly_once().unwrap(), compact.check_exactly_once().unwrap());
        assert_eq!(a, b);
        assert_eq!(b.committed_batches, 60 * 8);
        assert_eq!(full.history().collect::<Vec<_>>(), compact.history().collect::<Vec<_>>(), "all within the window");
        assert_eq!(compact.last_committed().unwrap().mean_loss, Some(59.0));
        assert!(compact.committed_step(47).is_none() && compact.lease_of(47, 0).is_none(), "compacted");
        assert_eq!(compact.lease_of(48, 3), full.lease_of(48, 3));
        // A recovery rolls back only what follows the compacted steps.
        full.settle(Some(49));
        compact.settle(Some(49));
        assert!(full.lease(50, 2, 3, 3) && compact.lease(50, 2, 3, 3));
        assert_eq!(full.leased()[&50], compact.leased()[&50]);
        compact.check_exactly_once().unwrap();
        // The compacted state survives the snapshot round trip.
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&compact).unwrap()).unwrap();
        assert_eq!(back, compact);
    }

    #[test]
    fn a_long_runs_persisted_ledger_is_bounded_and_the_history_leaves_in_order() {
        // 64 ranks x 2 batches a step, a checkpoint (and so compaction) every 50 steps.
        let mut l = Ledger::new(vec![10_000_000]);
        let size = |l: &Ledger| serde_json::to_vec(l).unwrap().len();
        let mut history = Vec::new();
        let mut run = |l: &mut Ledger, steps: u64| {
            for step in l.steps_committed()..steps {
                assert!(l.lease(step, 1, 64, 128));
                l.record_loss(step, 0, step as f64, 1e-3);
                assert!(l.commit(step));
                if (step + 1) % 50 == 0 {
                    history.extend(l.compact_through(step + 1));
                }
            }
        };
        run(&mut l, 1500);
        let at_1500 = size(&l);
        run(&mut l, 6000);
        let at_6000 = size(&l);
        println!("persisted ledger: {at_1500} bytes after 1500 steps, {at_6000} after 6000");
        assert!(at_6000 <= at_1500 + at_1500 / 20, "bounded: {at_1500} -> {at_6000} bytes");
        assert_eq!(history.iter().map(|s| s.step).collect::<Vec<_>>(), (0..6000 - HISTORY_WINDOW as u64).collect::<Vec<_>>(), "what left the window, in order");
        assert_eq!(l.compacted().recent().len(), HISTORY_WINDOW);
        assert_eq!(l.steps_committed(), 6000);
        l.check_exactly_once().unwrap();
        // An uncompacted step costs the same few bytes at 8 ranks and at 8192: its batches
        // are runs, not world x k entries.
        let per_step = |world: usize| {
            let mut l = Ledger::new(vec![100_000_000]);
            long_run(&mut l, 100, world, 2, u64::MAX);
            size(&l) / 100
        };
        let (small, large) = (per_step(8), per_step(8192));
        println!("an uncompacted step: {small} bytes at 8 ranks, {large} at 8192");
        assert!(large < 300 && large <= small + 16, "{small} -> {large} bytes a step");
    }

    #[test]
    fn a_state_saved_by_the_previous_version_loads() {
        // The previous version kept every compacted step's summary in `steps`.
        let mut l = Ledger::new(vec![40]);
        long_run(&mut l, 8, 2, 1, 4);
        let mut old = serde_json::to_value(&l).unwrap();
        let summaries: Vec<StepSummary> = l.history().take(8).collect();
        old["compacted"] = serde_json::json!({"steps": summaries, "batches": 16});
        let back: Ledger = serde_json::from_value(old).unwrap();
        assert_eq!((back.compacted().count(), back.compacted().recent().len()), (8, 8));
        assert_eq!(back, l);
        back.check_exactly_once().unwrap();
    }

    #[test]
    fn a_steps_batches_split_as_the_per_rank_lists_did_and_old_lists_load() {
        for (n, world) in [(5u64, 2usize), (5, 3), (16, 4), (3, 5), (1025, 1024)] {
            let items: Vec<BatchRef> = (0..n).map(|i| b(i / 7, i % 7)).collect(); // runs of 7 across epochs
            let batches = StepBatches::new(items.iter().copied(), world);
            let lists: Vec<Vec<BatchRef>> = (0..world)
                .map(|r| {
                    let (start, len) = crate::comm::split(items.len(), world, r);
                    items[start..start + len].to_vec()
                })
                .collect();
            assert_eq!(batches.ranks(), lists, "n={n} world={world}");
            assert_eq!(batches.iter().collect::<Vec<_>>(), items);
            // What the previous version saved: the lists themselves.
            let old: StepBatches = serde_json::from_value(serde_json::json!(lists)).unwrap();
            assert_eq!(old, batches);
            let back: StepBatches = serde_json::from_slice(&serde_json::to_vec(&batches).unwrap()).unwrap();
            assert_eq!(back, batches);
        }
        let uneven = serde_json::json!([[{"epoch": 0, "batch": 0}], [{"epoch": 0, "batch": 1}, {"epoch": 0, "batch": 2}]]);
        let e = serde_json::from_value::<StepBatches>(uneven).unwrap_err().to_string();
        assert!(e.contains("not the contiguous split"), "{e}");
    }

    #[test]
    fn returned_batches_leave_from_the_front_and_come_back_in_front() {
        let mut r = Returned::from(ReturnedRepr::Batches(vec![b(0, 4), b(0, 5), b(0, 6), b(1, 0)]));
        assert_eq!(r.len(), 4);
        assert_eq!(r.take_front(2), vec![Run(0, 4, 2)]);
        r.push_front(vec![Run(0, 1, 3)]);
        assert_eq!(r.runs().copied().collect::<Vec<_>>(), vec![Run(0, 1, 3), Run(0, 6, 1), Run(1, 0, 1)]);
        assert_eq!(r.take_front(10), vec![Run(0, 1, 3), Run(0, 6, 1), Run(1, 0, 1)]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_corrupt_compacted_prefix_is_caught() {
        let mut l = Ledger::new(vec![40]);
        long_run(&mut l, 6, 2, 1, 4);
        let mut gap = l.clone();
        gap.compacted.recent.remove(1);
        assert!(matches!(gap.check_exactly_once(), Err(LedgerError::StepGap { index: 1, .. })));
        let mut short = l.clone();
        short.compacted.batches -= 1; // the uncompacted steps no longer follow it in the stream
        assert!(matches!(short.check_exactly_once(), Err(LedgerError::OutOfOrder { .. })));
    }
}
