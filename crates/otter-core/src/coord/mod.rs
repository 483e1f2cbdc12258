//! The coordinator's core: a pure, synchronous state machine for elastic data-parallel
//! training. No tokio, no clock, no I/O: a thin gRPC shell feeds it events with the time
//! (`now`), carries out its replies, and persists the whole state (it is serde) after
//! every event so that a restarted coordinator resumes where it stopped.
//!
//! * [`machine`]: membership, generations, rendezvous, step commit ([`Machine`]).
//! * [`ledger`]: which data batches each step leased and committed ([`Ledger`]).
//! * [`server`]: the async shell: tonic service, ticker, persistence; [`rpc`]: generated
//!   types and conversions; [`store`]: the state store seam (memory, embedded file, etcd).
//! * here: [`Millis`] and the `coord:` config section ([`CoordConfig`]).
//!
//! # Model
//!
//! A *node* (one per machine) joins with `local_ranks` training processes. A *generation*
//! is one fixed membership: global ranks are the nodes sorted by id, ranks contiguous per
//! node in local-rank order, so the same membership always gives the same ranks. Every
//! membership change (and every recovery) starts a new generation with a *rendezvous*:
//! each rank of each member checks in with the last optimizer step its model state
//! contains, and once all have, the generation gets its ranks, the ring addresses, the step
//! to start at, the rank to copy state from, and its first data leases. Calls carry the
//! generation they believe in; calls from an older one are refused
//! ([`Refusal::StaleGeneration`]) except `join` and `rendezvous`, which are how a process
//! re-enters.
//!
//! # Data: leases, and the commit rule (exactly once)
//!
//! The data is one ordered stream of batches `(epoch, batch)` over all epochs. Step `s` of
//! a generation of `W` ranks leases the next `W * k` batches from the front of the pending
//! pool (`k` = `batches_per_rank_step`, the gradient accumulation): rank `r` gets the
//! `r`-th run of `k`. Without failures step `s` rank `r` trains stream positions
//! `s*W*k + r*k ..+k`, so `W` ranks with accumulation `k` see, step by step, exactly the
//! batches one process with accumulation `W*k` would. Leases are handed out
//! `lease_ahead_steps` ahead so a rank never waits for the coordinator.
//!
//! A step is *committed* (its batches count as trained) when every rank of its generation
//! reported it done. When a generation breaks, the next rendezvous settles the rest with
//! one rule: let `A` be the highest `applied_step` among the checked-in ranks that hold the
//! live model lineage (ranks of the last generation that trained). A rank that applied
//! step `s` finished the all-reduce of `s`, which needed the gradients of *every* rank of
//! that generation, dead ones included; so every lease of every step `<= A` is committed,
//! and the leases of steps `> A` go back to the *front* of the pending pool in their
//! original order, to be leased again first. The new generation starts at `A + 1` from the
//! state of the lowest rank holding `A` (`sync_from`), or without a copy when every rank
//! already holds it. If no rank holds the state of steps already committed (every holder
//! is gone), those steps are rolled back to the pool too: the ledger always describes the
//! model state the job continues from. Consequently the committed batches are always a
//! prefix of the stream, in order, and [`Ledger::check_exactly_once`] proves it.
//!
//! # Epoch tail policy
//!
//! Epochs are concatenated: a step may take the last batches of epoch `e` and the first of
//! `e + 1`, so every batch of every epoch is trained exactly once. Only at the end of the
//! *last* epoch can a remainder smaller than one step (`W * k` batches) be left; it is not
//! trained and is reported as `dropped_tail` (never silently lost).
//!
//! # Contracts the shell and the workers keep
//!
//! 1. `now` never goes backwards, also across coordinator restarts (persisted times are
//!    compared with it): use wall-clock milliseconds or a persisted offset.
//! 2. A rank reads the reply to `step_done(s)` before it enters the all-reduce of step
//!    `s + 1`. This is what makes a stop step chosen as "highest reported step + 1"
//!    reachable by every rank and passed by none.
//! 3. `applied_step` is the truth: the last step whose update the process's state holds,
//!    reached in this job, or `None` for a fresh process (which initialises from the seed).
//!    A process of a node that was dropped must restart fresh before it checks in again.
//! 4. The shell persists the state after every call that changed it, before acting on the
//!    reply; calls may be retried (`step_done`, `rendezvous`, `join` are idempotent).

pub mod bench;
pub mod client;
pub mod etcd;
pub mod frozen;
pub mod model_check;
pub mod http;
pub mod job;
pub mod ledger;
pub mod machine;
pub mod rpc;
pub mod manifests;
pub mod persist;
pub mod progress;
pub mod server;
pub mod simnode;
pub mod service;
pub mod telemetry;
pub mod view;
pub mod store;
pub mod straggler;

pub use ledger::{BatchRef, CommittedStep, Coverage, LeasedStep, Ledger, LedgerEnd, LedgerError, StepLease};
pub use machine::{
    Assignment, Checkin, Event, EventKind, Finish, Machine, Member, NodeReply, NodeStatus, Phase, PhaseReply, Refusal,
    RendezvousReply, Slot, StepReply, Summary,
};

pub mod config;
pub use config::{default_join_timeout, default_last_call, duration, ConfigError, CoordConfig, Millis, MAX_LOCAL_RANKS, MAX_NODES};
