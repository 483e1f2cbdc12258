//! Membership, generations, rendezvous and step commit: [`Machine`].
//!
//! Each public method is one event from the shell, `(now, args) -> Result<Reply, Refusal>`.
//! A refusal changes nothing; an accepted event may change the state, and every decision
//! appends an [`Event`] with a readable reason to a bounded log. See the module docs of
//! [`crate::coord`] for the commit rule and the contracts.

use super::frozen::Frozen;
use crate::model::identity::ModelIdentity;
use super::ledger::{Ledger, LedgerEnd, StepLease};
use super::{ConfigError, CoordConfig, Millis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// The event log keeps this many of the latest events.
pub const EVENT_LOG_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Before the first generation: nodes are joining.
    WaitingForNodes,
    /// Waiting for every rank of every member node to check in.
    Rendezvous {
        generation: u64,
    },
    Running {
        generation: u64,
    },
    Finished,
    Failed {
        reason: String,
    },
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed { .. })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::WaitingForNodes => write!(f, "waiting for nodes"),
            Phase::Rendezvous { generation } => write!(f, "rendezvous of generation {generation}"),
            Phase::Running { generation } => write!(f, "running generation {generation}"),
            Phase::Finished => write!(f, "finished"),
            Phase::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Joined, not in a generation yet: admitted at the next rendezvous.
    Pending,
    Member,
    /// A member that asked to leave: goes at the next step boundary.
    Leaving,
    /// Left out of the job for a while: a failed generation blamed it (it and another node
    /// could not reach each other). Admitted again like a new node when that time is up.
    Excluded,
}

/// A member node of the current generation and its global ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node_id: String,
    pub local_ranks: u32,
    /// Its ranks are `first_rank .. first_rank + local_ranks`.
    pub first_rank: usize,
}

/// One training process, named by its node and local rank (stable across generations,
/// unlike its global rank).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub node_id: String,
    pub local_rank: u32,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node_id, self.local_rank)
    }
}

/// A process's check-in to a rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkin {
    pub slot: Slot,
    /// The last optimizer step whose update its model state holds; `None`: fresh.
    pub applied_step: Option<u64>,
    /// Where its collective listens.
    pub comm_addr: String,
    pub at: Millis,
}

/// What one rank does in a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub generation: u64,
    pub rank: usize,
    pub world: usize,
    /// By rank.
    pub comm_addrs: Vec<String>,
    /// The first step this generation runs; every rank's state must hold `start_step - 1`
    /// (or be fresh when it is 0) before it begins.
    pub start_step: u64,
    /// The rank whose model and optimizer state every rank loads by broadcast first;
    /// `None` when all already hold the same state.
    pub sync_from: Option<usize>,
    /// Load the committed checkpoint holding this many steps (`step-N`) before starting
    /// (then `start_step == N`): no member held a state as new as it.
    pub restore_step: Option<u64>,
    /// This rank's data for the first `lease_ahead_steps` steps.
    pub leases: Vec<StepLease>,
    /// Every step is already trained: bring the state to `start_step` (sync or restore),
    /// then rank 0 writes the final weights; nothing else to run.
    pub final_weights_only: bool,
}

/// Reply to `join`, `heartbeat`: where the job is and what this node is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReply {
    pub generation: u64,
    pub phase: Phase,
    pub status: NodeStatus,
}

/// Reply to `leave`, `rank_failed`, `node_lost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseReply {
    pub generation: u64,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RendezvousReply {
    pub generation: u64,
    pub phase: Phase,
    /// Present once the rendezvous this check-in counts for is complete.
    pub assignment: Option<Assignment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReply {
    pub committed_through: Option<u64>,
    /// This rank's leases for the next `lease_ahead_steps` steps (the whole window, not a
    /// delta, so a retried call gets the same answer); none beyond `stop_after`.
    pub leases: Vec<StepLease>,
    /// Run through this step, then stop: call `rendezvous` (or exit if `job_ends`).
    pub stop_after: Option<u64>,
    /// `stop_after` is the job's last step.
    pub job_ends: bool,
}

/// Why the job finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    MaxSteps {
        steps: u64,
    },
    /// Every epoch was consumed; `dropped_tail` batches at the end of the last one were
    /// fewer than one step and not trained.
    DataExhausted {
        dropped_tail: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Resumed,
    NodeJoined,
    NodeLeaving,
    NodeLeft,
    NodeLost,
    RankFailed,
    StopScheduled,
    GenerationFormed,
    RendezvousComplete,
    RolledBack,
    Restored,
    CheckpointCommitted,
    NonFiniteLoss,
    /// Too few nodes: the job waits for more (the same rendezvous as at the start).
    WaitingForNodes,
    /// A rank could not reach or hear from a peer on another node.
    PeerUnreachable,
    NodeExcluded,
    /// A node whose model (frozen weights, config, tokenizer) differs from the job's was
    /// refused, by name, with the first file or tensor that differs.
    NodeRefused,
    /// The operator allowed the model to change (`--accept-model-change`).
    ModelChangeAccepted,
    /// A checkpoint could not be read back (a shard's checksum, a missing file): it is
    /// no longer offered.
    CheckpointUnreadable,
    /// A rank could not write its shard of a checkpoint (a full disk, an I/O error).
    CheckpointFailed,
    Finished,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: Millis,
    /// The generation current when it happened (for `GenerationFormed`: the new one).
    pub generation: u64,
    pub kind: EventKind,
    pub reason: String,
    /// The node it is about, where it is about one (a join, a loss, a leave, an exclusion,
    /// a rank's failure: the failing rank's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Counts for status pages and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub phase: Phase,
    pub generation: u64,
    pub world: usize,
    pub nodes: usize,
    pub pending_nodes: usize,
    pub steps_committed: u64,
    pub batches_committed: u64,
    /// Batches neither leased nor committed.
    pub batches_pending: u64,
    /// Set when the data ran out: batches of the last epoch's tail not trained.
    pub dropped_tail: Option<u64>,
    /// Generations formed because something failed (lost node, failed rank, timeout).
    pub recoveries: u64,
    /// Rendezvous that had to give committed steps back (every holder of their state gone).
    pub rollbacks: u64,
    pub last_loss: Option<f64>,
    pub finish: Option<Finish>,
    /// Generations in a row that failed without committing a step (the job fails when this
    /// exceeds `max_failed_generations`).
    #[serde(default)]
    pub failed_generations: u32,
    /// Nodes left out for now (blamed for a failed generation), with when they may return.
    #[serde(default)]
    pub excluded: Vec<(String, Millis)>,
    /// Why the job is waiting for nodes, while it is.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Checkpoint saves in a row that failed (reset by a committed one).
    #[serde(default)]
    pub failed_saves: u32,
    /// Set once `max_failed_saves` saves failed in a row: the job trains on, but nothing
    /// newer than its last committed checkpoint could be restored.
    #[serde(default)]
    pub degraded: Option<String>,
    /// The final weights, once rank 0 reported them durable.
    #[serde(default)]
    pub final_weights: Option<String>,
}

/// Why a call was not accepted. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("stale generation {got}: the current generation is {current} (re-enter through rendezvous)")]
    StaleGeneration { got: u64, current: u64 },
    #[error("generation {got} is ahead of the coordinator's {current}: was the coordinator's state lost?")]
    FutureGeneration { got: u64, current: u64 },
    #[error("the job is over ({phase})")]
    JobOver { phase: Phase },
    #[error("not running ({phase})")]
    NotRunning { phase: Phase },
    #[error("node {node_id:?} is not registered (join first)")]
    UnknownNode { node_id: String },
    #[error("the job is full: {max_nodes} nodes (max_nodes)")]
    Full { max_nodes: usize },
    #[error("node {node_id:?} must have at least one local rank")]
    NoLocalRanks { node_id: String },
    #[error("node {node_id:?} asks for {local_ranks} local ranks; at most {max} per node")]
    TooManyLocalRanks { node_id: String, local_ranks: u32, max: u32 },
    #[error("node {node_id:?} is registered with {registered} local ranks, not {got} (leave first)")]
    LocalRanksChanged { node_id: String, registered: u32, got: u32 },
    #[error("node {node_id:?} has {local_ranks} local ranks; there is no local rank {local_rank}")]
    UnknownLocalRank { node_id: String, local_rank: u32, local_ranks: u32 },
    #[error("generation {generation} has {world} ranks; there is no rank {rank}")]
    UnknownRank { rank: usize, world: usize, generation: u64 },
    #[error("rank {rank} reported step {got}, expected step {expected}")]
    UnexpectedStep { rank: usize, expected: u64, got: u64 },
    #[error("rank {rank} reported step {step}, past its stop after step {stop_after}")]
    PastStop { rank: usize, step: u64, stop_after: u64 },
    #[error("step {step} is not leased")]
    NotLeased { step: u64 },
    #[error("applied step {applied_step} was never leased (last step: {last_step:?})")]
    UnknownAppliedStep { applied_step: u64, last_step: Option<u64> },
    #[error(
        "{node_id}/{local_rank} reports a state at step {applied_step}, but it was not a rank of the last generation \
         that trained, so that state may belong to batches that were given back: restart it fresh (it will be synced)"
    )]
    UntrackedState { node_id: String, local_rank: u32, applied_step: u64 },
    #[error("checkpoint shard of step {step} from generation {generation}: {why}")]
    CheckpointShard { step: u64, generation: u64, why: String },
    #[error("node {node_id:?} cannot leave: {remaining} nodes would remain, below min_nodes {min_nodes}")]
    WouldGoBelowMin { node_id: String, remaining: usize, min_nodes: usize },
    #[error("checkpoint step-{steps} was not the one generation {generation} restored")]
    NotRestored { steps: u64, generation: u64 },
    #[error("generation {generation} is not writing the final weights, or rank {rank} is not its rank 0")]
    NotFinishing { generation: u64, rank: usize },    #[error("node {node_id:?} is refused: {why}")]
    ModelMismatch { node_id: String, why: String },
}

impl Refusal {
    /// A stable, machine-readable name of the refusal (clients branch on this, never on
    /// the message text).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::StaleGeneration { .. } => "stale-generation",
            Refusal::FutureGeneration { .. } => "future-generation",
            Refusal::JobOver { .. } => "job-over",
            Refusal::NotRunning { .. } => "not-running",
            Refusal::UnknownNode { .. } => "unknown-node",
            Refusal::Full { .. } => "full",
            Refusal::NoLocalRanks { .. } => "no-local-ranks",
            Refusal::TooManyLocalRanks { .. } => "too-many-local-ranks",
            Refusal::LocalRanksChanged { .. } => "local-ranks-changed",
            Refusal::UnknownLocalRank { .. } => "unknown-local-rank",
            Refusal::UnknownRank { .. } => "unknown-rank",
            Refusal::UnexpectedStep { .. } => "unexpected-step",
            Refusal::PastStop { .. } => "past-stop",
            Refusal::NotLeased { .. } => "not-leased",
            Refusal::UnknownAppliedStep { .. } => "unknown-applied-step",
            Refusal::UntrackedState { .. } => "untracked-state",
            Refusal::CheckpointShard { .. } => "checkpoint-shard",
            Refusal::WouldGoBelowMin { .. } => "would-go-below-min",
            Refusal::NotRestored { .. } => "not-restored",
            Refusal::NotFinishing { .. } => "not-finishing",
            Refusal::ModelMismatch { .. } => "model-mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Node {
    local_ranks: u32,
    last_seen: Millis,
    status: NodeStatus,
    /// When it (last) registered: the partition rule leaves out the later joiner.
    #[serde(default)]
    joined_at: Millis,
    /// While `Excluded`: when it may come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    out_until: Option<Millis>,
    /// How often it was excluded (the back-off doubles each time).
    #[serde(default, skip_serializing_if = "is_zero")]
    exclusions: u32,    /// The digest of the model identity it joined with (`model_check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<crate::model::identity::Digest>,
}

/// One failure report that named a peer: `reporter` could not reach or hear from
/// `blamed` (node ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blame {
    pub at: Millis,
    pub generation: u64,
    pub reporter: String,
    pub blamed: String,
}

/// The job went back to waiting for nodes (too few left).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Waiting {
    since: Millis,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RendezvousState {
    started_at: Millis,
    /// Formed because something failed (for the recovery-time metric).
    #[serde(default)]
    recovery: bool,
    checkins: Vec<Checkin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    start_step: u64,
    /// By rank: the check-ins the generation was formed from (fixed while it runs).
    checkins: Frozen<Vec<Checkin>>,
    sync_from: Option<usize>,
    #[serde(default)]
    restore_step: Option<u64>,
    /// By rank: the last step it reported done in this generation.
    reported: Reports,
    /// Chosen once, when a membership change became pending.
    membership_stop: Option<u64>,
    /// The first step the data cannot fill at this world size, once leasing found it.
    data_end: Option<u64>,
    /// The job's last step is committed: rank 0 writes the final weights, and the job is
    /// over once it reports them durable (every other rank waits at the rendezvous, so a
    /// new generation can take over if rank 0 is lost meanwhile).
    #[serde(default)]
    finishing: bool,
    /// Rank 0 reported the final weights after its last step, before every other rank
    /// reported that step: applied once they have (its state after the last step is the
    /// final one whichever rank reports last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    early_final_weights: Option<Result<String, String>>,
}

/// The member of `layout` (in rank order) that holds `rank`.
fn member_of(layout: &[Member], rank: usize) -> Option<&Member> {
    let i = layout.partition_point(|m| m.first_rank + m.local_ranks as usize <= rank);
    layout.get(i).filter(|m| rank >= m.first_rank)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// By rank, the last step it reported done, with how many ranks stand at each step, so
/// that a step's `StepDone` asks "has every rank reported?" in O(log) instead of
/// scanning the world (O(world^2) per step). Saved as the plain list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "Vec<Option<u64>>", into = "Vec<Option<u64>>")]
struct Reports {
    by_rank: Vec<Option<u64>>,
    /// How many ranks stand at each value of `by_rank` (no entry with a zero count).
    counts: BTreeMap<Option<u64>, usize>,
}

impl From<Vec<Option<u64>>> for Reports {
    fn from(by_rank: Vec<Option<u64>>) -> Self {
        let mut counts = BTreeMap::new();
        for &r in &by_rank {
            *counts.entry(r).or_insert(0) += 1;
        }
        Reports { by_rank, counts }
    }
}

impl From<Reports> for Vec<Option<u64>> {
    fn from(r: Reports) -> Self {
        r.by_rank
    }
}

impl Reports {
    fn none(world: usize) -> Self {
        vec![None; world].into()
    }

    fn get(&self, rank: usize) -> Option<u64> {
        self.by_rank[rank]
    }

    fn set(&mut self, rank: usize, step: u64) {
        let old = self.by_rank[rank].replace(step);
        if let Some(n) = self.counts.get_mut(&old) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&old);
            }
        }
        *self.counts.entry(Some(step)).or_insert(0) += 1;
    }

    /// The step every rank has reported (None while one has reported nothing).
    fn all_through(&self) -> Option<u64> {
        self.counts.keys().next().copied().flatten()
    }

    /// The highest step any rank reported.
    fn highest(&self) -> Option<u64> {
        self.counts.keys().next_back().copied().flatten()
    }

    /// Every rank stands at `at` (vacuously true for an empty world).
    fn all_at(&self, at: Option<u64>) -> bool {
        self.counts.keys().all(|&k| k == at)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct EventLog {
    events: VecDeque<Event>,
    /// Events ever appended (the log drops the oldest).
    appended: u64,
}

impl EventLog {
    fn push(&mut self, e: Event) {
        if self.events.len() >= EVENT_LOG_LEN {
            self.events.pop_front();
        }
        self.events.push_back(e);
        self.appended += 1;
    }

    fn since(&self, mark: u64) -> Vec<Event> {
        let n = (self.appended.saturating_sub(mark) as usize).min(self.events.len());
        self.events.iter().skip(self.events.len() - n).cloned().collect()
    }
}

/// One rank's shard of a checkpoint, written and fsynced (reported by the rank).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReport {
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
    /// The parameter names it holds (weights and AdamW moments).
    pub names: Vec<String>,
}

/// Shards of a checkpoint reported so far, by rank of the generation that ran its step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PendingCheckpoint {
    generation: u64,
    shards: Vec<Option<ShardReport>>,
    /// A rank could not write its shard: this checkpoint will never be committed.
    #[serde(default)]
    failed: Option<String>,
}

/// A checkpoint whose shards are all durable and whose steps are all committed: the shell
/// writes its manifest (the commit point) and then calls
/// [`Machine::checkpoint_committed`].
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointCommit {
    /// Steps it holds (`step-N`): the state after step `steps - 1`.
    pub steps: u64,
    pub generation: u64,
    /// By rank.
    pub shards: Vec<ShardReport>,
    /// The ledger (the data position) to resume from.
    pub ledger: Ledger,
}

/// The shards of a checkpoint, and what the coordinator adds, as its manifest records them:
/// a pure function, so the tables can test what a commit point says.
impl Machine {
    /// The manifest of `c`: `template` supplies what the ranks do not report (seeds, peak
    /// LR, the resolved config); the rest is the checkpoint's (step, epoch, world size,
    /// partition, shards with CRCs, frozen weights, generation) and the job's (schedule
    /// length and warmup from `warmup_ratio`, the ledger to resume from).
    pub fn checkpoint_manifest(&self, c: &CheckpointCommit, template: &crate::ckpt::Manifest, warmup_ratio: f64) -> crate::ckpt::Manifest {
        let total = self.total_steps().unwrap_or(0);
        crate::ckpt::Manifest {
            step: c.steps,
            epoch: c.ledger.last_committed().map_or(0, |st| st.epoch),
            world_size: c.shards.len(),
            partition: c.shards.iter().map(|sh| sh.names.clone()).collect(),
            shards: c.shards.iter().map(|sh| crate::ckpt::ShardInfo { file: sh.file.clone(), bytes: sh.bytes, crc32: sh.crc32 }).collect(),
            warmup_steps: crate::train::schedule::warmup_steps(warmup_ratio, total),
            total_steps: total,
            data: serde_json::json!({ "ledger": c.ledger }),
            frozen: Vec::new(),
            identity: self.model.job().cloned(),
            generation: Some(c.generation),
            ..template.clone()
        }
    }
}

/// The coordinator's whole state. Serialize it after every event; deserialize to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    config: CoordConfig,
    phase: Phase,
    generation: u64,
    nodes: BTreeMap<String, Node>,
    /// The current generation's members, by node id (fixed while it runs).
    layout: Frozen<Vec<Member>>,
    world: usize,
    first_join_at: Option<Millis>,
    last_join_at: Option<Millis>,
    /// Check-ins for the next rendezvous that arrived before it was formed (ranks at a
    /// step boundary, processes of nodes waiting to be admitted).
    early: Vec<Checkin>,
    rendezvous: Option<RendezvousState>,
    run: Option<RunState>,
    /// Ranks of the last generation that completed its rendezvous: only their states are
    /// of the live model lineage (`None`: nothing ran yet, everyone is fresh).
    voters: Option<Frozen<BTreeSet<Slot>>>,
    ledger: Ledger,
    finish: Option<Finish>,
    recoveries: u64,
    rollbacks: u64,
    /// (Changes only with an event: shared by the saves in between.)
    log: Frozen<EventLog>,
    /// Committed checkpoints (`step-N`), by N, ascending.
    #[serde(default)]
    checkpoints: Vec<u64>,
    /// Checkpoints being written, by the step they follow.
    #[serde(default)]
    pending_checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// The last completed rendezvous: how long it took from its generation forming to
    /// every rank assigned, and whether it was a recovery.
    #[serde(default)]
    last_rendezvous: Option<(u64, bool)>,
    /// Set while the job waits for nodes after falling below `min_nodes`.
    #[serde(default)]
    waiting: Option<Waiting>,
    /// Recent failure reports that named a peer on another node (the latest
    /// [`BLAME_LOG_LEN`]), and how many there were in all.
    #[serde(default)]
    blame: VecDeque<Blame>,
    #[serde(default)]
    blame_total: u64,
    /// Recovery generations in a row whose predecessor committed nothing beyond
    /// `progress_mark` (steps committed when it formed): bounded by `max_failed_generations`.
    #[serde(default)]
    failed_generations: u32,
    #[serde(default)]
    progress_mark: u64,
    /// Checkpoints found unreadable (`step-N`, what was wrong): never offered again.
    #[serde(default)]
    unreadable_checkpoints: Vec<(u64, String)>,
    /// Checkpoint saves that failed since the last one committed, failures by kind (ever),
    /// and the last failure.
    #[serde(default)]
    failed_saves: u32,
    #[serde(default)]
    save_failures: BTreeMap<String, u64>,
    #[serde(default)]
    last_save_failure: Option<String>,
    /// Where rank 0 wrote the final weights (durably), once it did.
    #[serde(default)]
    final_weights: Option<String>,
    /// Optimizer steps of the whole job (the LR schedule's length), fixed when the first
    /// generation completes its rendezvous.
    #[serde(default)]
    total_steps: Option<u64>,
    /// Data batches (micro-batches) every step consumes, whatever the world: the job's
    /// global batch, fixed with `total_steps`.
    #[serde(default)]
    batches_per_step: Option<u64>,
    /// The job's model identity: what every rank must share (frozen weights, config,
    /// tokenizer), fixed by the first generation.
    #[serde(default)]
    model: super::model_check::ModelCheck,
}

/// The blame log keeps this many of the latest reports.
pub const BLAME_LOG_LEN: usize = 64;

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn steps(list: &[u64]) -> String {
    match list {
        [] => "none".into(),
        [one] => format!("{one}"),
        [first, .., last] => format!("{first}..={last}"),
    }
}

fn opt_step(s: Option<u64>) -> String {
    s.map_or("none (fresh)".into(), |s| s.to_string())
}

impl Machine {
    /// `epoch_batches[e]`: the number of data batches in epoch `e` (one per epoch).
    pub fn new(config: CoordConfig, epoch_batches: Vec<u64>) -> Result<Self, ConfigError> {
        config.validate()?;
        if epoch_batches.len() as u64 != config.epochs {
            return Err(ConfigError {
                field: "epochs",
                message: format!(
                    "{} epochs, but batch counts for {} epochs were given",
                    config.epochs,
                    epoch_batches.len()
                ),
            });
        }
        if epoch_batches.iter().try_fold(0u64, |a, &b| a.checked_add(b)).is_none() {
            return Err(ConfigError { field: "epochs", message: "the batch count overflows".into() });
        }
        Ok(Self {
            config,
            phase: Phase::WaitingForNodes,
            generation: 0,
            nodes: BTreeMap::new(),
            layout: Frozen::default(),
            world: 0,
            first_join_at: None,
            last_join_at: None,
            early: Vec::new(),
            rendezvous: None,
            run: None,
            voters: None,
            ledger: Ledger::new(epoch_batches),
            finish: None,
            recoveries: 0,
            rollbacks: 0,
            log: Frozen::default(),
            checkpoints: Vec::new(),
            pending_checkpoints: BTreeMap::new(),
            last_rendezvous: None,
            waiting: None,
            blame: VecDeque::new(),
            blame_total: 0,
            failed_generations: 0,
            progress_mark: 0,
            unreadable_checkpoints: Vec::new(),
            failed_saves: 0,
            save_failures: BTreeMap::new(),
            last_save_failure: None,
            final_weights: None,
            total_steps: None,
            batches_per_step: None,
            model: Default::default(),
        })
    }

    // ----------------------------------------------------------------------------------
    // Queries
    // ----------------------------------------------------------------------------------

    /// The job's model identity, once the first generation fixed it.
    pub fn model_identity(&self) -> Option<&ModelIdentity> {
        self.model.job()
    }

    /// The operator allows `parts` of the model to change (`otter-coord start
    /// --accept-model-change`): the next generation fixes the identity again.
    pub fn accept_model_change(&mut self, now: Millis, parts: &[crate::model::identity::Part]) {
        if self.model.accept_change(parts) {
            let names: Vec<&str> = parts.iter().map(|p| p.name()).collect();
            self.log(now, EventKind::ModelChangeAccepted, format!("the operator allows the model's {} to change: the next generation fixes its identity again", names.join(", ")));
        }
    }

    /// Records that a node was refused for its model (an event the operator sees; the
    /// refusal itself changes nothing).
    pub fn note_refused(&mut self, now: Millis, node_id: &str, why: &str) {
        let g = self.generation;
        self.model.note_refused(node_id, why);
        self.log_node(now, EventKind::NodeRefused, node_id, format!("generation {g}: node {node_id} refused: {why}"));
    }

    /// An unknown node's refusal: why it was refused for its model, if it was.
    fn unknown_node(&self, node_id: &str) -> Refusal {
        match self.model.refused(node_id) {
            Some(why) => Refusal::ModelMismatch { node_id: node_id.into(), why: why.into() },
            None => Refusal::UnknownNode { node_id: node_id.into() },
        }
    }

    pub fn config(&self) -> &CoordConfig {
        &self.config
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// 0 before the first generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current (or last) generation's member nodes, by node id.
    pub fn members(&self) -> &[Member] {
        &self.layout
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// A rank's assignment, once its generation's rendezvous is complete (while it runs).
    pub fn assignment(&self, node_id: &str, local_rank: u32) -> Option<Assignment> {
        let Phase::Running { generation } = self.phase else { return None };
        let run = self.run.as_ref()?;
        let rank = self.rank_of(&Slot { node_id: node_id.to_string(), local_rank })?;
        let window = run.start_step..run.start_step.saturating_add(self.config.lease_ahead_steps);
        Some(Assignment {
            generation,
            rank,
            world: self.world,
            comm_addrs: run.checkins.iter().map(|c| c.comm_addr.clone()).collect(),
            start_step: run.start_step,
            sync_from: run.sync_from,
            restore_step: run.restore_step,
            leases: window.filter_map(|s| self.ledger.lease_of(s, rank)).collect(),
            final_weights_only: run.finishing && run.reported.all_at(None),
        })
    }

    /// The assignment of the process that checked in with exactly this state and listener
    /// (a retried call), or `None`: in particular a fresh process of the same slot (its
    /// node restarted) gets nothing from a generation formed from its predecessor's
    /// check-in, and must check in itself.
    pub fn assignment_of_checkin(&self, node_id: &str, local_rank: u32, applied_step: Option<u64>, comm_addr: &str) -> Option<Assignment> {
        let a = self.assignment(node_id, local_rank)?;
        let c = self.run.as_ref()?.checkins.get(a.rank)?;
        (c.comm_addr == comm_addr && c.applied_step == applied_step).then_some(a)
    }

    /// Whether this process's check-in counts for the open (or next) rendezvous. A process
    /// polling [`Machine::assignment`] that sees `None` here must call `rendezvous` again
    /// (its check-in was for a generation that is gone).
    pub fn checked_in(&self, node_id: &str, local_rank: u32) -> bool {
        let is = |c: &Checkin| c.slot.node_id == node_id && c.slot.local_rank == local_rank;
        self.early.iter().any(is) || self.rendezvous.as_ref().is_some_and(|r| r.checkins.iter().any(is))
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The latest events, oldest first (at most [`EVENT_LOG_LEN`]).
    pub fn events(&self) -> &VecDeque<Event> {
        &self.log.events
    }

    pub fn summary(&self) -> Summary {
        Summary {
            phase: self.phase.clone(),
            generation: self.generation,
            world: self.world,
            nodes: self.nodes.len(),
            pending_nodes: self.nodes.values().filter(|n| n.status == NodeStatus::Pending).count(),
            steps_committed: self.ledger.steps_committed(),
            batches_committed: self.ledger.committed_batches(),
            batches_pending: self.ledger.pending_batches(),
            dropped_tail: match self.finish {
                Some(Finish::DataExhausted { dropped_tail }) => Some(dropped_tail),
                _ => None,
            },
            recoveries: self.recoveries,
            rollbacks: self.rollbacks,
            last_loss: self.ledger.last_committed().and_then(|c| c.mean_loss),
            finish: self.finish,
            failed_generations: self.failed_generations,
            failed_saves: self.failed_saves,
            degraded: self.degraded(),
            final_weights: self.final_weights.clone(),
            excluded: self.nodes.iter().filter_map(|(id, n)| Some((id.clone(), n.out_until?))).collect(),
            waiting: self.waiting.as_ref().map(|w| w.reason.clone()),
        }
    }

    /// Recent failure reports that named a peer on another node, oldest first, and how
    /// many there were in all (for metrics).
    pub fn blame(&self) -> (&VecDeque<Blame>, u64) {
        (&self.blame, self.blame_total)
    }

    /// Optimizer steps of the whole job (the LR schedule's length): the data's batches over
    /// a step's ([`Machine::batches_per_step`]), capped by `max_steps`; fixed when the first
    /// generation completes its rendezvous, never changed by later world sizes.
    pub fn total_steps(&self) -> Option<u64> {
        self.total_steps
    }

    /// Data batches every step consumes, whatever the world (the job's global batch):
    /// `global_batches`, or else the first generation's world x `batches_per_rank_step`;
    /// fixed when the first generation completes its rendezvous.
    pub fn batches_per_step(&self) -> Option<u64> {
        self.batches_per_step
    }

    /// A step's batches (before the first rendezvous fixes them: the current world's).
    fn step_batches(&self) -> u64 {
        self.batches_per_step.unwrap_or(self.world as u64 * self.config.batches_per_rank_step)
    }

    /// Adopts the schedule length a state saved by the previous version kept beside the
    /// machine.
    pub fn adopt_total_steps(&mut self, total: Option<u64>) {
        self.total_steps = self.total_steps.or(total);
    }

    /// Why the job is degraded, if it is: `max_failed_saves` checkpoint saves in a row
    /// failed.
    pub fn degraded(&self) -> Option<String> {
        (self.failed_saves >= self.config.max_failed_saves).then(|| {
            let last = self.checkpoints.last().map_or("none".to_string(), |n| format!("step-{n}"));
            format!(
                "{} checkpoint saves in a row failed (last: {}); the newest restorable state is checkpoint {last}",
                self.failed_saves,
                self.last_save_failure.as_deref().unwrap_or("?")
            )
        })
    }

    /// Failed checkpoint saves by kind (`no_space`, `io`, ...), since the job started.
    pub fn save_failures(&self) -> &BTreeMap<String, u64> {
        &self.save_failures
    }

    /// Checkpoints found unreadable, with what was wrong.
    pub fn unreadable_checkpoints(&self) -> &[(u64, String)] {
        &self.unreadable_checkpoints
    }

    /// What a process that checked in is waiting for, in words (the long poll's answer
    /// while its assignment does not exist yet).
    pub fn waiting_for(&self, now: Millis) -> String {
        let (min, n) = (self.config.min_nodes, self.available_nodes());
        match &self.phase {
            Phase::WaitingForNodes => {
                let since = self.waiting.as_ref().map(|w| w.since).or(self.first_join_at);
                let left = since.map_or(String::new(), |t| {
                    let left = self.config.join_timeout.saturating_sub(now.since(t));
                    format!("; the job fails if still too few in {:.0} s (join_timeout)", left.as_secs_f64())
                });
                let why = self.waiting.as_ref().map_or(String::new(), |w| format!(" ({})", w.reason));
                let out = self.nodes.values().filter(|x| x.status == NodeStatus::Excluded).count();
                let excluded = if out > 0 { format!(", {out} excluded for now") } else { String::new() };
                format!("waiting for nodes{why}: {n} available of min_nodes {min}{excluded}{left}")
            }
            Phase::Rendezvous { generation } => {
                let Some(r) = &self.rendezvous else { return format!("rendezvous of generation {generation}") };
                let missing: Vec<String> = self
                    .layout
                    .iter()
                    .flat_map(|m| (0..m.local_ranks).map(move |lr| Slot { node_id: m.node_id.clone(), local_rank: lr }))
                    .filter(|s| !r.checkins.iter().any(|c| &c.slot == s))
                    .map(|s| s.to_string())
                    .collect();
                let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
                let more = if missing.len() > shown.len() { format!(" and {} more", missing.len() - shown.len()) } else { String::new() };
                format!(
                    "rendezvous of generation {generation}: {} of {} ranks checked in; waiting for {}{more}",
                    self.world - missing.len(),
                    self.world,
                    shown.join(", ")
                )
            }
            Phase::Running { generation } => match self.stop_after() {
                Some(b) => format!("generation {generation} runs; new nodes are admitted after step {b}"),
                None => format!("generation {generation} runs; waiting to be admitted at the next step boundary"),
            },
            Phase::Finished | Phase::Failed { .. } => format!("the job is over ({})", self.phase),
        }
    }

    // ----------------------------------------------------------------------------------
    // Events
    // ----------------------------------------------------------------------------------

    /// Registers a node, or re-registers it (idempotent; also withdraws a pending leave).
    /// Before the first generation it counts towards the initial rendezvous; during a
    /// rendezvous it re-forms it at once; while running it is admitted at the next step
    /// boundary.
    pub fn join(&mut self, now: Millis, node_id: &str, local_ranks: u32, identity: &ModelIdentity) -> Result<NodeReply, Refusal> {
        self.refuse_if_over()?;
        self.model.admit(identity).map_err(|m| Refusal::ModelMismatch { node_id: node_id.into(), why: m.0 })?;
        if local_ranks == 0 {
            return Err(Refusal::NoLocalRanks { node_id: node_id.into() });
        }
        if local_ranks > super::MAX_LOCAL_RANKS {
            return Err(Refusal::TooManyLocalRanks { node_id: node_id.into(), local_ranks, max: super::MAX_LOCAL_RANKS });
        }
        if let Some(node) = self.nodes.get_mut(node_id) {
            if node.local_ranks != local_ranks {
                return Err(Refusal::LocalRanksChanged {
                    node_id: node_id.into(),
                    registered: node.local_ranks,
                    got: local_ranks,
                });
            }
            node.last_seen = now;
            node.identity = Some(identity.digest.clone());
            self.model.admitted(node_id, identity);
            if node.status == NodeStatus::Leaving {
                node.status = NodeStatus::Member;
                let g = self.generation;
                self.log_node(now, EventKind::NodeJoined, node_id, format!("generation {g}: node {node_id} joined again and stays"));
            }
            return Ok(self.node_reply(node_id));
        }
        let active = self.active_nodes();
        if active >= self.config.max_nodes {
            return Err(Refusal::Full { max_nodes: self.config.max_nodes });
        }
        self.nodes.insert(
            node_id.into(),
            Node { local_ranks, last_seen: now, status: NodeStatus::Pending, joined_at: now, out_until: None, exclusions: 0, identity: Some(identity.digest.clone()) },
        );
        self.model.admitted(node_id, identity);
        let (g, n, min, max) = (self.generation, self.available_nodes(), self.config.min_nodes, self.config.max_nodes);
        let joined = format!("node {node_id} joined with {local_ranks} local ranks");
        match self.phase {
            Phase::WaitingForNodes => {
                self.first_join_at.get_or_insert(now);
                self.last_join_at = Some(now);
                self.log_node(now, EventKind::NodeJoined, node_id, format!("{joined}; {n} nodes (min {min}, max {max})"));
                if n >= max {
                    self.form_generation(now, &format!("{n} nodes joined, max_nodes reached"), false);
                }
            }
            Phase::Rendezvous { .. } => {
                self.log_node(now, EventKind::NodeJoined, node_id, format!("generation {g}: {joined} during the rendezvous"));
                self.form_generation(now, &joined, false);
            }
            Phase::Running { .. } => {
                self.log_node(
                    now,
                    EventKind::NodeJoined,
                    node_id,
                    format!("generation {g}: {joined}; admitted at the next step boundary"),
                );
                self.schedule_membership_stop(now, &joined);
            }
            Phase::Finished | Phase::Failed { .. } => {}
        }
        Ok(self.node_reply(node_id))
    }

    /// Liveness. Accepted from any generation up to the current one: a node that has not
    /// noticed a change yet is still alive, and the reply is how it notices.
    pub fn heartbeat(&mut self, now: Millis, node_id: &str, generation: u64) -> Result<NodeReply, Refusal> {
        if generation > self.generation {
            return Err(Refusal::FutureGeneration { got: generation, current: self.generation });
        }
        if !self.nodes.contains_key(node_id) {
            return Err(self.unknown_node(node_id));
        }
        let node = self.nodes.get_mut(node_id).expect("checked");
        node.last_seen = now;
        Ok(self.node_reply(node_id))
    }

    /// Time-driven decisions: lost nodes (heartbeat timeout), the initial rendezvous's
    /// last call and join timeout, ranks that miss a rendezvous. Returns the events it
    /// appended.
    pub fn tick(&mut self, now: Millis) -> Vec<Event> {
        let mark = self.log.appended;
        if !self.phase.is_over() {
            self.expire_heartbeats(now);
            self.expire_exclusions(now);
            match self.phase {
                Phase::WaitingForNodes => self.check_waiting(now),
                Phase::Rendezvous { .. } => self.check_rendezvous_timeout(now),
                _ => {}
            }
        }
        self.log.since(mark)
    }

    /// A training process checks in for the current (or next) generation. Call it once and
    /// poll [`Machine::assignment`], or call it again with the same arguments (idempotent).
    ///
    /// While a generation runs, a check-in from one of its ranks is expected only at the
    /// scheduled stop, with `applied_step == stop_after` (it also counts as that step's
    /// report); any other means the process left the collective, and the generation is
    /// re-formed with the same members.
    pub fn rendezvous(
        &mut self,
        now: Millis,
        node_id: &str,
        local_rank: u32,
        applied_step: Option<u64>,
        comm_addr: &str,
    ) -> Result<RendezvousReply, Refusal> {
        self.refuse_if_over()?;
        let node = self.nodes.get(node_id).ok_or_else(|| self.unknown_node(node_id))?;
        if local_rank >= node.local_ranks {
            return Err(Refusal::UnknownLocalRank {
                node_id: node_id.into(),
                local_rank,
                local_ranks: node.local_ranks,
            });
        }
        let slot = Slot { node_id: node_id.into(), local_rank };
        self.validate_state(&slot, applied_step)?;
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.last_seen = now;
        }
        let checkin = Checkin { slot: slot.clone(), applied_step, comm_addr: comm_addr.into(), at: now };
        match self.phase {
            Phase::WaitingForNodes => upsert(&mut self.early, checkin),
            // A node waiting to be admitted (left out for now): counts for a later rendezvous.
            Phase::Rendezvous { .. } if self.rank_of(&slot).is_none() => upsert(&mut self.early, checkin),
            Phase::Rendezvous { .. } => {
                if let Some(r) = self.rendezvous.as_mut() {
                    upsert(&mut r.checkins, checkin);
                }
                self.try_complete_rendezvous(now);
            }
            Phase::Running { generation } => match (self.rank_of(&slot), self.run.as_ref()) {
                // Every step is done: ranks wait here while rank 0 writes the final weights
                // (should it be lost, these check-ins form the generation that finishes).
                (Some(_), Some(run)) if run.finishing => upsert(&mut self.early, checkin),
                (Some(rank), Some(run)) => {
                    let formed = &run.checkins[rank];
                    let repeat = run.reported.get(rank).is_none()
                        && formed.applied_step == applied_step
                        && formed.comm_addr == comm_addr;
                    if !repeat {
                        let reported = run.reported.get(rank);
                        let expected = reported.map_or(run.start_step, |s| s + 1);
                        let stop = self.stop_after();
                        upsert(&mut self.early, checkin);
                        match stop {
                            Some(b) if applied_step == Some(b) && reported == Some(b) => {}
                            Some(b) if applied_step == Some(b) && expected == b => {
                                drop(self.record_step(now, rank, b, None))
                            }
                            _ => {
                                let why = format!(
                                    "rank {rank} ({slot}) re-entered the rendezvous with applied step {} while generation \
                                     {generation} runs (stop: {}): it left the collective",
                                    opt_step(applied_step),
                                    stop.map_or("none".into(), |b| format!("after step {b}")),
                                );
                                self.log_node(now, EventKind::RankFailed, node_id, format!("generation {generation}: {why}"));
                                self.form_generation(now, &why, true);
                            }
                        }
                    }
                }
                // A node waiting to be admitted: counts for the next rendezvous.
                _ => upsert(&mut self.early, checkin),
            },
            Phase::Finished | Phase::Failed { .. } => {}
        }
        Ok(RendezvousReply {
            generation: self.generation,
            phase: self.phase.clone(),
            assignment: self.assignment(node_id, local_rank),
        })
    }

    /// Rank `rank` finished the optimizer update of `step`. When every rank has, the step
    /// is committed. The reply carries the rank's lease window and the stop, if any.
    pub fn step_done(
        &mut self,
        now: Millis,
        generation: u64,
        rank: usize,
        step: u64,
        loss: f64,
        lr: f64,
    ) -> Result<StepReply, Refusal> {
        self.check_generation(generation)?;
        let (Phase::Running { .. }, Some(run)) = (&self.phase, self.run.as_ref()) else {
            return Err(Refusal::NotRunning { phase: self.phase.clone() });
        };
        if rank >= self.world {
            return Err(Refusal::UnknownRank { rank, world: self.world, generation });
        }
        let reported = run.reported.get(rank);
        if reported == Some(step) {
            self.touch_rank(now, rank);
            return Ok(self.step_reply(rank, step));
        }
        let expected = reported.map_or(run.start_step, |s| s + 1);
        if step != expected {
            return Err(Refusal::UnexpectedStep { rank, expected, got: step });
        }
        if let Some(stop_after) = self.stop_after().filter(|&b| step > b) {
            return Err(Refusal::PastStop { rank, step, stop_after });
        }
        if !self.ledger.leased().contains_key(&step) {
            return Err(Refusal::NotLeased { step });
        }
        self.touch_rank(now, rank);
        if !loss.is_finite() {
            self.log(
                now,
                EventKind::NonFiniteLoss,
                format!("generation {generation}: rank {rank} reported loss {loss} at step {step}"),
            );
        }
        let reply_before_boundary = self.record_step(now, rank, step, Some((loss, lr)));
        Ok(reply_before_boundary)
    }

    /// A rank's collective failed. Without `blamed` (a peer closed its connections: it
    /// died or gave up) the culprit is unknown, so nobody is dropped here: the same members
    /// re-form, and whoever does not check in within `join_timeout` is dropped then. With
    /// `blamed`, the rank of this generation it could not reach or hear from (a timeout, an
    /// unreachable host), on another node: the two nodes cannot talk, and re-forming the
    /// same group would fail the same way, so one of the two is left out for a while (the
    /// partition rule: the node blamed by more distinct peers in the recent reports, else
    /// the one that joined last, else the greater id).
    pub fn rank_failed(
        &mut self,
        now: Millis,
        generation: u64,
        rank: usize,
        reason: &str,
        blamed: Option<usize>,
    ) -> Result<PhaseReply, Refusal> {
        self.check_generation(generation)?;
        if !matches!(self.phase, Phase::Running { .. }) {
            return Err(Refusal::NotRunning { phase: self.phase.clone() });
        }
        let slot = self.slot_of(rank).ok_or(Refusal::UnknownRank { rank, world: self.world, generation })?;
        self.touch_rank(now, rank);
        let peer = blamed.and_then(|p| Some((p, self.slot_of(p)?))).filter(|(_, ps)| ps.node_id != slot.node_id);
        let Some((p, peer)) = peer else {
            let why = format!("rank {rank} ({slot}) reported a collective failure: {reason}");
            self.log_node(now, EventKind::RankFailed, &slot.node_id, format!("generation {generation}: {why}"));
            self.form_generation(now, &why, true);
            return Ok(self.phase_reply());
        };
        let (a, b) = (slot.node_id.clone(), peer.node_id.clone());
        let why = format!("nodes {a} and {b} cannot reach each other: rank {rank} ({slot}) failed on rank {p} ({peer}): {reason}");
        self.log_node(now, EventKind::PeerUnreachable, &a, format!("generation {generation}: {why}"));
        if self.blame.len() >= BLAME_LOG_LEN {
            self.blame.pop_front();
        }
        self.blame.push_back(Blame { at: now, generation, reporter: a.clone(), blamed: b.clone() });
        self.blame_total += 1;
        let out = self.partition_rule(&a, &b);
        self.exclude(now, &out, &why);
        self.form_generation(now, &why, true);
        Ok(self.phase_reply())
    }

    /// Which of two nodes that cannot reach each other to leave out: the one blamed by
    /// more distinct reporters in the blame log, else the one that joined last, else the
    /// greater node id.
    fn partition_rule(&self, a: &str, b: &str) -> String {
        let blamers = |x: &str| self.blame.iter().filter(|e| e.blamed == x).map(|e| e.reporter.as_str()).collect::<BTreeSet<_>>().len();
        let joined = |x: &str| self.nodes.get(x).map_or(Millis(0), |n| n.joined_at);
        let key = |x: &str| (blamers(x), joined(x));
        let (ka, kb) = (key(a), key(b));
        let pick_a = ka > kb || (ka == kb && a > b);
        if pick_a { a } else { b }.to_string()
    }

    /// Leaves node `id` out of the job for the back-off (doubling per exclusion, at most
    /// 16x); it comes back as a new node would once that is over.
    fn exclude(&mut self, now: Millis, id: &str, why: &str) {
        let base = self.config.exclusion_backoff;
        let g = self.generation;
        let Some(node) = self.nodes.get_mut(id) else { return };
        node.exclusions += 1;
        let backoff = base.saturating_mul(1 << (node.exclusions - 1).min(4));
        node.out_until = Some(Millis(now.0.saturating_add(backoff.as_millis() as u64)));
        node.status = NodeStatus::Excluded;
        let n = node.exclusions;
        self.early.retain(|c| c.slot.node_id != id);
        self.log_node(
            now,
            EventKind::NodeExcluded,
            id,
            format!(
                "generation {g}: leaving node {id} out for {:.0} s (exclusion {n}; partition rule: blamed by more peers, \
                 else joined last): {why}",
                backoff.as_secs_f64()
            ),
        );
    }

    /// The shell knows a node is gone (its agent saw a training process exit, or the node
    /// shut down): drop it now rather than after a heartbeat timeout.
    pub fn node_lost(&mut self, now: Millis, node_id: &str, reason: &str) -> Result<PhaseReply, Refusal> {
        self.refuse_if_over()?;
        if !self.nodes.contains_key(node_id) {
            return Err(Refusal::UnknownNode { node_id: node_id.into() });
        }
        self.drop_nodes(now, vec![(node_id.to_string(), reason.to_string())]);
        Ok(self.phase_reply())
    }

    /// Graceful leave: a member goes at the next step boundary (at once if no generation
    /// is running); a node not yet admitted goes at once. Refused if the members would fall
    /// below `min_nodes`.
    /// A coordinator resumed this state (restart, or failover to another replica). It
    /// cannot know which nodes stayed alive while it was away, so every node gets a full
    /// heartbeat timeout from `now` instead of being judged on times from before.
    pub fn resume(&mut self, now: Millis) {
        for node in self.nodes.values_mut() {
            node.last_seen = node.last_seen.max(now);
        }
        let reason = format!("coordinator resumed with {} nodes in {}; heartbeat clocks restarted", self.nodes.len(), self.phase);
        self.log(now, EventKind::Resumed, reason);
    }

    /// The last completed rendezvous: its duration (generation formed to every rank
    /// assigned) and whether it was a recovery.
    pub fn last_rendezvous(&self) -> Option<(std::time::Duration, bool)> {
        self.last_rendezvous.map(|(ms, rec)| (std::time::Duration::from_millis(ms), rec))
    }

    /// Events appended after `mark` (an earlier return value), oldest first, and the new
    /// mark. Events that fell off the log are skipped.
    pub fn events_since(&self, mark: u64) -> (Vec<Event>, u64) {
        (self.log.since(mark), self.log.appended)
    }

    /// Committed checkpoints (`step-N`), by N, ascending.
    pub fn checkpoints(&self) -> &[u64] {
        &self.checkpoints
    }

    /// Rank `rank` of the generation that ran `step` wrote and fsynced its shard of the
    /// checkpoint taken after `step`. Accepted from that generation even after it ended
    /// (its ranks finish writing while the next one runs); refused from any other.
    /// Returns the checkpoint to commit once every shard is in and `step` is committed.
    pub fn checkpoint_done(
        &mut self,
        _now: Millis, // events take the time; this one logs nothing until the commit
        generation: u64,
        rank: usize,
        step: u64,
        shard: ShardReport,
    ) -> Result<Option<CheckpointCommit>, Refusal> {
        self.refuse_if_over()?;
        let refuse = |why: String| Refusal::CheckpointShard { step, generation, why };
        if self.checkpoints.last().is_some_and(|&n| n > step) {
            return Ok(None); // a newer checkpoint is already committed (and the step may be compacted)
        }
        let ran = match self.ledger.committed_step(step) {
            Some(c) => Some((c.generation, c.batches.world())),
            None => self.ledger.leased().get(&step).map(|l| (l.generation, l.batches.world())),
        };
        let Some((ran_by, world)) = ran else { return Err(refuse("that step is neither leased nor committed".into())) };
        if ran_by != generation {
            return Err(refuse(format!("the step was run by generation {ran_by}")));
        }
        if rank >= world {
            return Err(refuse(format!("generation {generation} had {world} ranks; there is no rank {rank}")));
        }
        let pending = self.pending_checkpoints.entry(step).or_insert_with(|| PendingCheckpoint { generation, shards: vec![None; world], failed: None });
        if pending.failed.is_some() {
            return Ok(None); // another rank's shard failed: this one is garbage (the shell removes it)
        }
        pending.shards[rank] = Some(shard);
        Ok(self.ready_checkpoint())
    }

    /// Whether the checkpoint after `step` failed (a rank could not write its shard): it
    /// will never be committed, and its files are garbage.
    pub fn checkpoint_abandoned(&self, step: u64) -> bool {
        self.pending_checkpoints.get(&step).is_some_and(|p| p.failed.is_some())
    }

    /// Rank `rank` of the generation that ran `step` could not write its shard of the
    /// checkpoint after it (`kind`: a short name such as `no_space` or `io`; `why`: the
    /// file and the error). The checkpoint is abandoned; it counts once towards the saves
    /// failed in a row, which make the job degraded at `max_failed_saves`. Returns whether
    /// this was the checkpoint's first failure.
    pub fn checkpoint_failed(&mut self, now: Millis, generation: u64, rank: usize, step: u64, kind: &str, why: &str) -> Result<bool, Refusal> {
        self.refuse_if_over()?;
        if self.checkpoints.last().is_some_and(|&n| n > step) {
            return Ok(false);
        }
        let world = match self.ledger.committed_step(step) {
            Some(c) if c.generation == generation => c.batches.world(),
            None => match self.ledger.leased().get(&step) {
                Some(l) if l.generation == generation => l.batches.world(),
                _ => self.pending_checkpoints.get(&step).filter(|p| p.generation == generation).map_or(0, |p| p.shards.len()),
            },
            _ => 0,
        };
        if rank >= world {
            return Err(Refusal::CheckpointShard { step, generation, why: format!("generation {generation} did not run step {step} with a rank {rank}") });
        }
        let pending = self.pending_checkpoints.entry(step).or_insert_with(|| PendingCheckpoint { generation, shards: vec![None; world], failed: None });
        if pending.failed.is_some() {
            return Ok(false);
        }
        let what = format!("checkpoint step-{}: rank {rank} could not write its shard ({kind}): {why}", step + 1);
        pending.failed = Some(what.clone());
        self.failed_saves += 1;
        *self.save_failures.entry(kind.to_string()).or_default() += 1;
        self.last_save_failure = Some(what.clone());
        let g = self.generation;
        let degraded = self.degraded().map_or(String::new(), |d| format!("; the job is DEGRADED: {d}"));
        self.log(now, EventKind::CheckpointFailed, format!("generation {g}: {what}; not committed{degraded}"));
        Ok(true)
    }

    /// Rank 0 of the finishing generation wrote the final weights to `written` (durably),
    /// or could not: the job is over, finished or failed (naming the checkpoint to resume
    /// or export from).
    pub fn final_weights(&mut self, now: Millis, generation: u64, rank: usize, written: Result<String, String>) -> Result<PhaseReply, Refusal> {
        self.check_generation(generation)?;
        if rank != 0 || !matches!(self.phase, Phase::Running { .. }) {
            return Err(Refusal::NotFinishing { generation, rank });
        }
        let finishing = self.run.as_ref().is_some_and(|r| r.finishing);
        if !finishing {
            // Rank 0 may hear that its last step ends the job before the other ranks have
            // reported it: its weights are final all the same, so they are kept until the
            // step is committed (rather than refused, leaving the job waiting forever).
            let last = self.stop_after().filter(|_| self.job_ends_at_stop());
            match (last, self.run.as_mut()) {
                (Some(last), Some(run)) if run.reported.by_rank.first() == Some(&Some(last)) => {
                    run.early_final_weights = Some(written);
                    return Ok(self.phase_reply());
                }
                _ => return Err(Refusal::NotFinishing { generation, rank }),
            }
        }
        self.apply_final_weights(now, generation, written);
        Ok(self.phase_reply())
    }

    fn apply_final_weights(&mut self, now: Millis, generation: u64, written: Result<String, String>) {
        match written {
            Ok(path) => {
                self.log(now, EventKind::StopScheduled, format!("generation {generation}: rank 0 wrote the final weights to {path}"));
                self.final_weights = Some(path);
                self.finish(now);
            }
            Err(e) => {
                let newest = self.checkpoints.last().map_or("none was committed".to_string(), |n| format!("step-{n}"));
                self.fail(
                    now,
                    format!(
                        "generation {generation}: every step is trained but the final weights could not be written: {e}; \
                         the newest committed checkpoint is {newest}: free the space, then resume the job, or `otter export` that checkpoint"
                    ),
                );
            }
        }
    }

    /// The newest checkpoint whose shards are all durable and whose step is committed.
    pub fn ready_checkpoint(&self) -> Option<CheckpointCommit> {
        let through = self.ledger.committed_through()?;
        let (&step, p) = self
            .pending_checkpoints
            .iter()
            .rev()
            .find(|(&step, p)| step <= through && p.failed.is_none() && p.shards.iter().all(Option::is_some))?;
        Some(CheckpointCommit {
            steps: step + 1,
            generation: p.generation,
            shards: p.shards.iter().flatten().cloned().collect(),
            ledger: self.ledger.clone(),
        })
    }

    /// Whether the checkpoint of `steps` steps written by `generation` can still be
    /// committed: all its shards are in and its last step is committed, by that generation
    /// (not given back while the shell wrote its manifest).
    pub fn checkpoint_still_ready(&self, steps: u64, generation: u64) -> bool {
        let Some(step) = steps.checked_sub(1) else { return false };
        self.pending_checkpoints.get(&step).is_some_and(|p| p.generation == generation && p.shards.iter().all(Option::is_some))
            && self.ledger.committed_step(step).is_some_and(|c| c.generation == generation)
    }

    /// The shell wrote the manifest of `step-{steps}`: it is now the job's newest state of
    /// record. The oldest of the `keep_checkpoints` newest is as far back as a restore can
    /// go (should the newer ones prove unreadable), so the ledger compacts the steps it holds.
    ///
    /// Returns the summaries of compacted steps that left the state's window, for the
    /// shell's history file.
    pub fn checkpoint_committed(&mut self, now: Millis, steps: u64) -> Vec<super::ledger::StepSummary> {
        let mut left = Vec::new();
        self.failed_saves = 0;
        if self.checkpoints.last().is_none_or(|&n| n < steps) {
            self.checkpoints.push(steps);
            let keep = self.config.keep_checkpoints.max(1);
            if self.checkpoints.len() > keep {
                self.checkpoints.drain(..self.checkpoints.len() - keep);
            }
            if let Some(&oldest) = self.checkpoints.first() {
                left = self.ledger.compact_through(oldest);
            }
        }
        self.pending_checkpoints.retain(|&step, _| step + 1 > steps);
        self.log(now, EventKind::CheckpointCommitted, format!("checkpoint step-{steps} committed (manifest written)"));
        left
    }

    /// Rank `rank` of the running `generation` could not read checkpoint `step-{steps}`,
    /// which its assignment told it to restore (`what`: the file and the fault, e.g. a
    /// shard's checksum). The checkpoint is never offered again and the generation
    /// re-forms: its rendezvous restores the newest readable one left, or the job stops
    /// (naming this one) when none is left from which the ledger can go on.
    pub fn checkpoint_unreadable(&mut self, now: Millis, generation: u64, rank: usize, steps: u64, what: &str) -> Result<PhaseReply, Refusal> {
        self.check_generation(generation)?;
        let (Phase::Running { .. }, Some(run)) = (&self.phase, self.run.as_ref()) else {
            return Err(Refusal::NotRunning { phase: self.phase.clone() });
        };
        if run.restore_step != Some(steps) {
            return Err(Refusal::NotRestored { steps, generation });
        }
        let slot = self.slot_of(rank).ok_or(Refusal::UnknownRank { rank, world: self.world, generation })?;
        self.touch_rank(now, rank);
        self.checkpoints.retain(|&n| n != steps);
        if self.unreadable_checkpoints.len() >= 16 {
            self.unreadable_checkpoints.remove(0);
        }
        self.unreadable_checkpoints.push((steps, what.to_string()));
        let why = format!("rank {rank} ({slot}) could not read checkpoint step-{steps}: {what}");
        self.log(now, EventKind::CheckpointUnreadable, format!("generation {generation}: {why}; it is no longer offered"));
        self.form_generation(now, &why, true);
        Ok(self.phase_reply())
    }

    /// A fresh coordinator takes over a job from its newest committed checkpoint: the
    /// ledger as the manifest recorded it, settled to the checkpoint's steps (later steps
    /// and leases go back to the pool). `on_disk`: every committed checkpoint found beside
    /// it; those its ledger can still go back to are kept as fallbacks. Only before
    /// anything has run.
    /// `identity`: the model identity the manifest records (the job keeps it: nodes whose
    /// model differs are refused).
    pub fn restore_from_checkpoint(&mut self, now: Millis, mut ledger: Ledger, steps: u64, on_disk: &[u64], identity: Option<ModelIdentity>) -> Result<(), ConfigError> {
        if self.generation != 0 || !self.checkpoints.is_empty() {
            return Err(ConfigError { field: "checkpoint", message: "only a fresh coordinator restores from a checkpoint".into() });
        }
        if ledger.epoch_batches() != self.ledger.epoch_batches() {
            return Err(ConfigError {
                field: "checkpoint",
                message: format!(
                    "its ledger has epochs of {:?} batches, this job's data gives {:?}: not the same data or batch settings",
                    ledger.epoch_batches(),
                    self.ledger.epoch_batches()
                ),
            });
        }
        if steps == 0 || ledger.committed_through().is_none_or(|c| c + 1 < steps) {
            return Err(ConfigError { field: "checkpoint", message: format!("its ledger does not hold the {steps} steps it claims") });
        }
        if ledger.compacted().count() > steps {
            return Err(ConfigError { field: "checkpoint", message: format!("its ledger is compacted beyond its own {steps} steps") });
        }
        ledger.settle(Some(steps - 1));
        let floor = ledger.compacted().count();
        let mut kept: Vec<u64> = on_disk.iter().copied().filter(|&n| n >= floor.max(1) && n < steps).chain([steps]).collect();
        kept.sort_unstable();
        kept.dedup();
        let keep = self.config.keep_checkpoints.max(1);
        if kept.len() > keep {
            kept.drain(..kept.len() - keep);
        }
        // Summaries leaving the window here were appended to the history by whichever
        // coordinator compacted them first.
        drop(ledger.compact_through(kept[0]));
        self.ledger = ledger;
        self.checkpoints = kept;
        if let Some(id) = identity {
            self.model = super::model_check::ModelCheck::fixed(id);
        }
        self.log(now, EventKind::Restored, format!("coordinator started from checkpoint step-{steps}: {steps} steps committed"));
        Ok(())
    }

    pub fn leave(&mut self, now: Millis, node_id: &str) -> Result<PhaseReply, Refusal> {
        self.refuse_if_over()?;
        let status = self.nodes.get(node_id).ok_or_else(|| Refusal::UnknownNode { node_id: node_id.into() })?.status;
        let g = self.generation;
        match status {
            NodeStatus::Leaving => {}
            NodeStatus::Pending | NodeStatus::Excluded => {
                self.nodes.remove(node_id);
                self.early.retain(|c| c.slot.node_id != node_id);
                self.log_node(
                    now,
                    EventKind::NodeLeft,
                    node_id,
                    format!("generation {g}: node {node_id} left before it was admitted"),
                );
            }
            NodeStatus::Member => {
                let remaining = self.active_nodes() - 1;
                if remaining < self.config.min_nodes {
                    return Err(Refusal::WouldGoBelowMin {
                        node_id: node_id.into(),
                        remaining,
                        min_nodes: self.config.min_nodes,
                    });
                }
                if let Some(node) = self.nodes.get_mut(node_id) {
                    node.status = NodeStatus::Leaving;
                }
                let why = format!("node {node_id} asked to leave");
                self.log_node(now, EventKind::NodeLeaving, node_id, format!("generation {g}: {why}"));
                if matches!(self.phase, Phase::Running { .. }) {
                    self.schedule_membership_stop(now, &why);
                } else {
                    self.form_generation(now, &why, false);
                }
            }
        }
        Ok(self.phase_reply())
    }

    /// The exactly-once proof over the ledger (see [`Ledger::check_exactly_once`]).
    pub fn check_exactly_once(&self) -> Result<super::Coverage, super::LedgerError> {
        self.ledger.check_exactly_once()
    }

    // ----------------------------------------------------------------------------------
    // Decisions
    // ----------------------------------------------------------------------------------

    /// Starts a new generation from the nodes still here (leavers go now), or fails the
    /// job if they are too few. Check-ins carry over only where they prove a live process
    /// that is waiting: those of the open rendezvous and the early ones. The running
    /// generation's are not carried: its processes may have died since.
    fn form_generation(&mut self, now: Millis, cause: &str, recovery: bool) {
        let g = self.generation;
        let leaving: Vec<String> =
            self.nodes.iter().filter(|(_, n)| n.status == NodeStatus::Leaving).map(|(id, _)| id.clone()).collect();
        for id in leaving {
            self.nodes.remove(&id);
            self.log_node(now, EventKind::NodeLeft, &id, format!("generation {g}: node {id} left"));
        }
        // The first generation fixes the job's model identity; nodes holding another are
        // refused before any of their ranks trains.
        let voters: BTreeMap<String, Option<crate::model::identity::Digest>> =
            self.nodes.iter().filter(|(_, n)| n.status != NodeStatus::Excluded).map(|(id, n)| (id.clone(), n.identity.clone())).collect();
        for (id, why) in self.model.fix(&voters) {
            self.nodes.remove(&id);
            self.log_node(now, EventKind::NodeRefused, &id, format!("generation {g}: node {id} refused: {why}"));
        }
        let mut carried = std::mem::take(&mut self.early);
        if let Some(r) = self.rendezvous.take() {
            for c in r.checkins {
                if !carried.iter().any(|e| e.slot == c.slot) {
                    carried.push(c);
                }
            }
        }
        self.run = None;
        // Coming back from waiting for nodes is the end of a recovery too.
        let recovery = self.waiting.take().is_some() || recovery;
        if recovery && self.count_failed_generation(now, cause) {
            return;
        }
        let (n, min) = (self.available_nodes(), self.config.min_nodes);
        if n < min {
            // Too few: wait for nodes (as at the start, bounded by join_timeout) instead of
            // failing; processes already checked in stay checked in.
            carried.retain(|c| self.nodes.contains_key(&c.slot.node_id));
            self.early = carried;
            self.layout = Frozen::default();
            self.world = 0;
            let reason = format!("{cause}; {n} nodes available, below min_nodes {min}");
            self.log(
                now,
                EventKind::WaitingForNodes,
                format!(
                    "generation {g}: {reason}: waiting up to join_timeout ({:.1} s) for nodes",
                    self.config.join_timeout.as_secs_f64()
                ),
            );
            self.waiting = Some(Waiting { since: now, reason });
            self.phase = Phase::WaitingForNodes;
            return;
        }
        self.generation += 1;
        let mut first_rank = 0;
        self.layout = Frozen::new(
            self.nodes
            .iter_mut()
            .filter(|(_, node)| node.status != NodeStatus::Excluded)
            .map(|(id, node)| {
                node.status = NodeStatus::Member;
                let m = Member { node_id: id.clone(), local_ranks: node.local_ranks, first_rank };
                first_rank += node.local_ranks as usize;
                m
            })
            .collect(),
        );
        self.world = first_rank;
        carried.retain(|c| self.rank_of(&c.slot).is_some());
        let checked = carried.len();
        self.rendezvous = Some(RendezvousState { started_at: now, recovery, checkins: carried });
        self.phase = Phase::Rendezvous { generation: self.generation };
        if recovery {
            self.recoveries += 1;
        }
        let names: Vec<&str> = self.layout.iter().map(|m| m.node_id.as_str()).collect();
        let (g, world) = (self.generation, self.world);
        self.log(
            now,
            EventKind::GenerationFormed,
            format!(
                "generation {g} formed ({cause}): nodes {}, world {world}; {checked} of {world} ranks checked in",
                names.join(", ")
            ),
        );
        self.try_complete_rendezvous(now);
    }

    /// A generation failed (a recovery is starting): counts it unless the job committed
    /// steps since the last one, and fails the job once `max_failed_generations` failed in
    /// a row. Returns whether the job failed.
    fn count_failed_generation(&mut self, now: Millis, cause: &str) -> bool {
        let steps = self.ledger.steps_committed();
        let progressed = steps > self.progress_mark;
        self.progress_mark = steps; // the next generation's starting point
        if progressed {
            self.failed_generations = 0;
            return false;
        }
        self.failed_generations += 1;
        let max = self.config.max_failed_generations;
        if self.failed_generations < max {
            return false;
        }
        let g = self.generation;
        self.fail(
            now,
            format!(
                "generation {g}: {cause}; {max} generations in a row failed without committing a step \
                 (max_failed_generations): regrouping does not fix this fault, see the events for what each reported"
            ),
        );
        true
    }

    /// Completes the rendezvous once every rank checked in: applies the commit rule (see
    /// the module docs), picks the state to sync from, and leases the first steps.
    fn try_complete_rendezvous(&mut self, now: Millis) {
        let Some(r) = &self.rendezvous else { return };
        // Check-ins are unique per slot and only members' (others wait in `early`).
        if r.checkins.len() < self.world {
            return;
        }
        let mut by_rank: Vec<Option<&Checkin>> = vec![None; self.world];
        for c in &r.checkins {
            if let Some(rank) = self.rank_of(&c.slot) {
                by_rank[rank] = Some(c);
            }
        }
        if by_rank.iter().any(Option::is_none) {
            return;
        }
        let checkins: Vec<Checkin> = by_rank.into_iter().flatten().cloned().collect();
        self.last_rendezvous = Some((now.since(r.started_at).as_millis() as u64, r.recovery));
        self.rendezvous = None;
        let (g, world) = (self.generation, self.world);
        let is_voter = |slot: &Slot| self.voters.as_ref().map_or(true, |v| v.contains(slot));
        let held = checkins.iter().filter(|c| is_voter(&c.slot)).filter_map(|c| c.applied_step).max();
        // The newest committed checkpoint wins over older (or no) live state: everyone
        // loads it, so nothing newer than it is ever given back.
        let restore_step = self.checkpoints.last().copied().filter(|&n| n > held.map_or(0, |a| a + 1));
        let (applied, sync_from) = match restore_step {
            Some(n) => (Some(n - 1), None),
            None => {
                // Non-voters are fresh (enforced at check-in), so with `held == None` they
                // hold the state too.
                let holders: Vec<usize> = (0..world)
                    .filter(|&r| checkins[r].applied_step == held && (held.is_none() || is_voter(&checkins[r].slot)))
                    .collect();
                (held, if holders.len() == world { None } else { holders.first().copied() })
            }
        };
        let floor = self.ledger.compacted().count();
        if applied.map_or(0, |a| a + 1) < floor {
            // Every holder of the state is gone and so is every readable checkpoint from
            // which the job could go on: continuing would retrain steps whose batches the
            // ledger no longer lists. Stop, naming what was unreadable.
            let bad: Vec<String> = self.unreadable_checkpoints.iter().map(|(n, why)| format!("step-{n}: {why}")).collect();
            self.fail(
                now,
                format!(
                    "generation {g}: no rank holds the job's state and no readable checkpoint at or after step-{floor} is left \
                     (unreadable: {}); restore a checkpoint's files or start the job again from an exported one",
                    if bad.is_empty() { "none".to_string() } else { bad.join("; ") }
                ),
            );
            return;
        }
        let settled = self.ledger.settle(applied);
        self.progress_mark = self.progress_mark.min(self.ledger.steps_committed());
        // Checkpoints of steps given back are of a lineage that is gone.
        let keep = applied.map_or(0, |a| a + 1);
        self.checkpoints.retain(|&n| n <= keep);
        self.pending_checkpoints.retain(|&step, _| step < keep);
        let start_step = applied.map_or(0, |a| a + 1);
        // (A state saved before the global batch existed adopts this world's.)
        let per_step = *self.batches_per_step.get_or_insert(self.config.global_batches.unwrap_or(world as u64 * self.config.batches_per_rank_step));
        if self.total_steps.is_none() {
            let by_data = self.ledger.total() / per_step.max(1);
            self.total_steps = Some(self.config.max_steps.map_or(by_data, |m| m.min(by_data)).max(1));
        }
        self.voters = Some(Frozen::new(checkins.iter().map(|c| c.slot.clone()).collect()));
        self.run = Some(RunState {
            start_step,
            checkins: Frozen::new(checkins),
            sync_from,
            restore_step,
            reported: Reports::none(world),
            membership_stop: None,
            data_end: None,
            finishing: false,
            early_final_weights: None,
        });
        self.phase = Phase::Running { generation: g };
        if !settled.rolled_back.is_empty() {
            self.rollbacks += 1;
            self.log(
                now,
                EventKind::RolledBack,
                format!(
                    "generation {g}: no rank holds the state of committed steps {} any more (highest applied step: {}); \
                     their batches go back to the pool and are trained again",
                    steps(&settled.rolled_back),
                    opt_step(applied)
                ),
            );
        }
        if let Some(n) = restore_step {
            self.log(
                now,
                EventKind::Restored,
                format!(
                    "generation {g}: restoring from checkpoint step-{n} (the newest state any rank holds: {})",
                    opt_step(held)
                ),
            );
        }
        let sync = match (restore_step, sync_from) {
            (Some(n), _) => format!("all ranks load checkpoint step-{n}"),
            (None, Some(r)) => format!("ranks sync from rank {r}"),
            (None, None) => "all ranks hold the same state".into(),
        };
        self.log(
            now,
            EventKind::RendezvousComplete,
            format!(
                "generation {g}: all {world} ranks checked in; highest applied step {}: committed steps {}, returned steps {} \
                 ({} batches) to the pool front; starting at step {start_step}, {sync}",
                opt_step(applied),
                steps(&settled.committed),
                steps(&settled.returned),
                settled.batches_back,
            ),
        );
        self.extend_leases(now, (start_step + self.config.lease_ahead_steps).saturating_sub(1));
        if self.end_excl().is_some_and(|e| e <= start_step) {
            self.begin_finishing(now);
        }
    }

    /// Records that `rank` applied `step`, commits what every rank has reported, extends
    /// the leases, and at the stop step (once all ranks reached it) ends the job or forms
    /// the next generation. Returns the rank's reply as of before that transition.
    fn record_step(&mut self, now: Millis, rank: usize, step: u64, loss: Option<(f64, f64)>) -> StepReply {
        let Some(run) = self.run.as_mut() else { return self.step_reply(rank, step) };
        run.reported.set(rank, step);
        let all_through = run.reported.all_through();
        let highest = run.reported.highest().unwrap_or(step);
        if let Some((loss, lr)) = loss {
            self.ledger.record_loss(step, rank, loss, lr);
        }
        if let Some(m) = all_through {
            while let Some(next) = self.ledger.committed_through().map_or(Some(0), |c| c.checked_add(1)) {
                if next > m || !self.ledger.commit(next) {
                    break;
                }
            }
            if self.ledger.steps_committed() > self.progress_mark {
                self.failed_generations = 0; // this generation made progress
            }
        }
        self.extend_leases(now, highest.saturating_add(self.config.lease_ahead_steps));
        let reply = self.step_reply(rank, step);
        if let (Some(stop), Some(run)) = (self.stop_after(), self.run.as_ref()) {
            if run.reported.all_at(Some(stop)) {
                if self.job_ends_at_stop() {
                    self.begin_finishing(now);
                } else {
                    let b = stop;
                    self.form_generation(now, &format!("membership change at the step boundary after step {b}"), false);
                }
            }
        }
        reply
    }

    fn step_reply(&self, rank: usize, step: u64) -> StepReply {
        let stop_after = self.stop_after();
        let through = step.saturating_add(self.config.lease_ahead_steps);
        let last = stop_after.map_or(through, |b| b.min(through));
        StepReply {
            committed_through: self.ledger.committed_through(),
            leases: (step + 1..=last).filter_map(|s| self.ledger.lease_of(s, rank)).collect(),
            stop_after,
            job_ends: stop_after.is_some() && self.job_ends_at_stop(),
        }
    }

    /// The job's last step is committed: rank 0 of this generation writes the final
    /// weights; [`Machine::final_weights`] ends the job.
    fn begin_finishing(&mut self, now: Millis) {
        let g = self.generation;
        let Some(run) = self.run.as_mut() else { return };
        run.finishing = true;
        let steps = self.ledger.steps_committed();
        self.log(
            now,
            EventKind::StopScheduled,
            format!("generation {g}: all {steps} steps are committed; rank 0 writes the final weights, then the job is over"),
        );
        if let Some(written) = self.run.as_mut().and_then(|r| r.early_final_weights.take()) {
            self.apply_final_weights(now, g, written);
        }
    }

    /// Leases steps through `through` (never past the stop) for the running generation;
    /// finding the data exhausted fixes the job's last step.
    fn extend_leases(&mut self, now: Millis, through: u64) {
        let limit = self.stop_after().map_or(through, |b| b.min(through));
        let (g, world) = (self.generation, self.world);
        let n = self.step_batches();
        let Some(run) = self.run.as_mut() else { return };
        let mut step = self.ledger.last_step().map_or(0, |s| s + 1).max(run.start_step);
        while step <= limit {
            if !self.ledger.lease(step, g, world, n) {
                run.data_end = Some(step);
                let left = self.ledger.pending_batches();
                let last = step.checked_sub(1).filter(|&l| l >= run.start_step);
                self.log(
                    now,
                    EventKind::StopScheduled,
                    format!(
                        "generation {g}: the data is exhausted: {left} batches left, a step takes {n}; {}",
                        last.map_or("no step left to run".into(), |l| format!("step {l} is the last")),
                    ),
                );
                break;
            }
            step += 1;
        }
    }

    /// A join or leave is pending: every rank runs through step B = (highest step any rank
    /// reported in this generation) + 1, then re-forms. Chosen once; see contract 2 in the
    /// module docs for why every rank can stop there and none is past it.
    fn schedule_membership_stop(&mut self, now: Millis, why: &str) {
        let g = self.generation;
        let Some(run) = self.run.as_mut() else { return };
        if let Some(b) = run.membership_stop {
            self.log(
                now,
                EventKind::StopScheduled,
                format!("generation {g}: {why}; joins the stop already scheduled after step {b}"),
            );
            return;
        }
        let b = run.reported.highest().map_or(run.start_step, |m| m + 1);
        run.membership_stop = Some(b);
        let mut reason =
            format!("generation {g}: {why}; every rank stops after step {b} (highest reported step + 1) to re-form");
        if self.job_ends_at_stop() {
            reason += &format!(" (but the job ends after step {} first)", self.stop_after().unwrap_or(b));
        }
        self.log(now, EventKind::StopScheduled, reason);
    }

    fn finish(&mut self, now: Millis) {
        let g = self.generation;
        let run = self.run.take();
        let data_end = run.as_ref().and_then(|r| r.data_end);
        let data_bound = data_end.is_some_and(|d| self.config.max_steps.map_or(true, |m| d <= m));
        let steps = self.ledger.steps_committed();
        let (finish, end, why) = if data_bound {
            let dropped_tail = self.ledger.pending_batches();
            let step_batches = self.step_batches();
            (
                Finish::DataExhausted { dropped_tail },
                LedgerEnd::DataExhausted { step_batches },
                format!("all {} epochs consumed; {dropped_tail} batches of the last epoch's tail dropped (a step takes {step_batches})", self.config.epochs),
            )
        } else {
            (
                Finish::MaxSteps { steps },
                LedgerEnd::MaxSteps,
                format!("max_steps {} reached", self.config.max_steps.unwrap_or(steps)),
            )
        };
        self.ledger.close(end);
        self.finish = Some(finish);
        self.phase = Phase::Finished;
        self.rendezvous = None;
        self.early.clear();
        self.log(
            now,
            EventKind::Finished,
            format!(
                "generation {g}: finished: {why}; {steps} steps, {} batches committed",
                self.ledger.committed_batches()
            ),
        );
    }

    fn fail(&mut self, now: Millis, reason: String) {
        self.phase = Phase::Failed { reason: reason.clone() };
        self.rendezvous = None;
        self.run = None;
        self.early.clear();
        self.log(now, EventKind::Failed, reason);
    }

    /// Removes nodes; if any was a member of the current generation, re-forms.
    fn drop_nodes(&mut self, now: Millis, lost: Vec<(String, String)>) {
        let g = self.generation;
        let mut members_lost = Vec::new();
        for (id, why) in lost {
            let Some(node) = self.nodes.remove(&id) else { continue };
            self.early.retain(|c| c.slot.node_id != id);
            let member = node.status != NodeStatus::Pending && self.layout.iter().any(|m| m.node_id == id);
            let reason = if member {
                members_lost.push(id.clone());
                let remain = self.layout.iter().filter(|m| self.nodes.contains_key(&m.node_id)).count();
                format!(
                    "generation {g}: node {id} lost ({why}); {remain} of {} nodes remain (min {})",
                    self.layout.len(),
                    self.config.min_nodes
                )
            } else if self.phase == Phase::WaitingForNodes {
                format!("node {id} lost before the first rendezvous ({why}); {} nodes joined", self.nodes.len())
            } else {
                format!("generation {g}: node {id}, not yet admitted, lost ({why})")
            };
            self.log_node(now, EventKind::NodeLost, &id, reason);
        }
        if !members_lost.is_empty() && matches!(self.phase, Phase::Rendezvous { .. } | Phase::Running { .. }) {
            self.form_generation(now, &format!("lost node {}", members_lost.join(", ")), true);
        }
    }

    fn expire_heartbeats(&mut self, now: Millis) {
        let timeout = self.config.heartbeat_timeout;
        let lost: Vec<(String, String)> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.since(n.last_seen) >= timeout)
            .map(|(id, n)| (id.clone(), format!("no heartbeat for {:.1} s", now.since(n.last_seen).as_secs_f64())))
            .collect();
        if !lost.is_empty() {
            self.drop_nodes(now, lost);
        }
    }

    /// Waiting for nodes (before the first generation, or after falling below
    /// `min_nodes`): form a generation once `min_nodes` are available and none joined for
    /// `last_call`; fail once `join_timeout` has passed without them.
    fn check_waiting(&mut self, now: Millis) {
        let (n, min) = (self.available_nodes(), self.config.min_nodes);
        let since = self.waiting.as_ref().map(|w| w.since).or(self.first_join_at);
        let quiet_from = match (self.last_join_at, self.waiting.as_ref().map(|w| w.since)) {
            (Some(j), Some(w)) => Some(j.max(w)),
            (j, w) => j.or(w),
        };
        let quiet = quiet_from.map(|t| now.since(t));
        if n >= min && quiet.is_some_and(|q| q >= self.config.last_call) {
            let why = format!(
                "last call: {n} nodes available (min {min}), none joined in the last {:.1} s",
                self.config.last_call.as_secs_f64()
            );
            self.form_generation(now, &why, false);
        } else if n < min && since.is_some_and(|t| now.since(t) >= self.config.join_timeout) {
            let t = self.config.join_timeout.as_secs_f64();
            let reason = match &self.waiting {
                Some(w) => format!(
                    "generation {}: only {n} of min_nodes {min} nodes available within join_timeout ({t:.1} s) after {}",
                    self.generation, w.reason
                ),
                None => format!("only {n} of min_nodes {min} nodes joined within join_timeout ({t:.1} s)"),
            };
            self.fail(now, reason);
        }
    }

    /// Excluded nodes whose back-off is over come back as new nodes do.
    fn expire_exclusions(&mut self, now: Millis) {
        let back: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.status == NodeStatus::Excluded && n.out_until.is_some_and(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        for id in back {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.status = NodeStatus::Pending;
                n.out_until = None;
                n.last_seen = n.last_seen.max(now);
            }
            let g = self.generation;
            let why = format!("node {id}'s exclusion is over");
            match self.phase {
                Phase::WaitingForNodes => {
                    self.last_join_at = Some(now);
                    self.log_node(now, EventKind::NodeJoined, &id, format!("generation {g}: {why}; it counts towards min_nodes again"));
                    if self.available_nodes() >= self.config.max_nodes {
                        self.form_generation(now, &why, false);
                    }
                }
                Phase::Rendezvous { .. } => {
                    self.log_node(now, EventKind::NodeJoined, &id, format!("generation {g}: {why}; the rendezvous re-forms with it"));
                    self.form_generation(now, &why, false);
                }
                Phase::Running { .. } => {
                    self.log_node(now, EventKind::NodeJoined, &id, format!("generation {g}: {why}; admitted at the next step boundary"));
                    self.schedule_membership_stop(now, &why);
                }
                Phase::Finished | Phase::Failed { .. } => {}
            }
        }
    }

    fn check_rendezvous_timeout(&mut self, now: Millis) {
        let Some(r) = &self.rendezvous else { return };
        let timeout = self.config.join_timeout;
        if now.since(r.started_at) < timeout {
            return;
        }
        let g = self.generation;
        let missing: Vec<(String, String)> = self
            .layout
            .iter()
            .filter_map(|m| {
                let absent: Vec<u32> = (0..m.local_ranks)
                    .filter(|&lr| !r.checkins.iter().any(|c| c.slot.node_id == m.node_id && c.slot.local_rank == lr))
                    .collect();
                (!absent.is_empty()).then(|| {
                    let why = format!(
                        "local ranks {absent:?} did not check in to the rendezvous of generation {g} within {:.1} s",
                        timeout.as_secs_f64()
                    );
                    (m.node_id.clone(), why)
                })
            })
            .collect();
        self.drop_nodes(now, missing);
    }

    // ----------------------------------------------------------------------------------
    // Helpers
    // ----------------------------------------------------------------------------------

    /// The running generation's stop: the membership stop or the job's last step,
    /// whichever is first.
    fn stop_after(&self) -> Option<u64> {
        let run = self.run.as_ref()?;
        min_some(run.membership_stop, self.end_excl().map(|e| e.saturating_sub(1)))
    }

    /// The first step the job will not run (from `max_steps` and the data), once known.
    fn end_excl(&self) -> Option<u64> {
        min_some(self.config.max_steps, self.run.as_ref().and_then(|r| r.data_end))
    }

    fn job_ends_at_stop(&self) -> bool {
        let last = self.end_excl().map(|e| e.saturating_sub(1));
        match (last, self.run.as_ref().and_then(|r| r.membership_stop)) {
            (Some(last), Some(b)) => last <= b,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// A reported state must be of the live lineage: from a rank of the last generation
    /// that trained, at a step that was leased.
    fn validate_state(&self, slot: &Slot, applied: Option<u64>) -> Result<(), Refusal> {
        let Some(applied_step) = applied else { return Ok(()) };
        if self.voters.as_ref().is_some_and(|v| !v.contains(slot)) {
            return Err(Refusal::UntrackedState {
                node_id: slot.node_id.clone(),
                local_rank: slot.local_rank,
                applied_step,
            });
        }
        match self.ledger.last_step() {
            Some(last) if applied_step <= last => Ok(()),
            last_step => Err(Refusal::UnknownAppliedStep { applied_step, last_step }),
        }
    }

    fn rank_of(&self, slot: &Slot) -> Option<usize> {
        // The layout is sorted by node id (it is built from the node map).
        let i = self.layout.binary_search_by(|m| m.node_id.as_str().cmp(&slot.node_id)).ok()?;
        let m = &self.layout[i];
        (slot.local_rank < m.local_ranks).then(|| m.first_rank + slot.local_rank as usize)
    }

    fn slot_of(&self, rank: usize) -> Option<Slot> {
        let m = member_of(&self.layout, rank)?;
        Some(Slot { node_id: m.node_id.clone(), local_rank: (rank - m.first_rank) as u32 })
    }

    fn touch_rank(&mut self, now: Millis, rank: usize) {
        if let Some(node) = member_of(&self.layout, rank).and_then(|m| self.nodes.get_mut(&m.node_id)) {
            node.last_seen = now;
        }
    }

    /// Registered nodes that hold a place in the job (not leaving).
    fn active_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.status != NodeStatus::Leaving).count()
    }

    /// Nodes a generation can be formed from now (not leaving, not excluded).
    fn available_nodes(&self) -> usize {
        self.nodes.values().filter(|n| !matches!(n.status, NodeStatus::Leaving | NodeStatus::Excluded)).count()
    }

    fn refuse_if_over(&self) -> Result<(), Refusal> {
        if self.phase.is_over() {
            return Err(Refusal::JobOver { phase: self.phase.clone() });
        }
        Ok(())
    }

    fn check_generation(&self, got: u64) -> Result<(), Refusal> {
        self.refuse_if_over()?;
        let current = self.generation;
        if got < current {
            return Err(Refusal::StaleGeneration { got, current });
        }
        if got > current {
            return Err(Refusal::FutureGeneration { got, current });
        }
        Ok(())
    }

    fn node_reply(&self, node_id: &str) -> NodeReply {
        NodeReply {
            generation: self.generation,
            phase: self.phase.clone(),
            status: self.nodes.get(node_id).map_or(NodeStatus::Pending, |n| n.status),
        }
    }

    fn phase_reply(&self) -> PhaseReply {
        PhaseReply { generation: self.generation, phase: self.phase.clone() }
    }

    fn log(&mut self, at: Millis, kind: EventKind, reason: String) {
        self.log.get_mut().push(Event { at, generation: self.generation, kind, reason, node: None });
    }

    /// An event about one node.
    fn log_node(&mut self, at: Millis, kind: EventKind, node: &str, reason: String) {
        self.log.get_mut().push(Event { at, generation: self.generation, kind, reason, node: Some(node.to_string()) });
    }
}

/// Replaces the check-in of the same process, or adds it.
fn upsert(list: &mut Vec<Checkin>, c: Checkin) {
    match list.iter_mut().find(|e| e.slot == c.slot) {
        Some(e) => *e = c,
        None => list.push(c),
    }
}

#[cfg(test)]
mod tests;
