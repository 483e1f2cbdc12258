//! Scenario tests: a simulated cluster drives the machine with time passed in.

use super::*;
use crate::coord::ledger::BatchRef;
use std::time::Duration;

const SEC: u64 = 1000;

fn cfg(min: usize, max: usize) -> CoordConfig {
    CoordConfig {
        join_timeout: Duration::from_secs(60),
        last_call: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_secs(10),
        lease_ahead_steps: 2,
        ..CoordConfig::new(min, max)
    }
}

/// The model every simulated node joins with.
fn model() -> ModelIdentity {
    ModelIdentity::synthetic("model")
}

fn slot(node: &str, local_rank: u32) -> Slot {
    Slot { node_id: node.into(), local_rank }
}

/// Batches at stream positions `range` of a single-epoch stream.
fn positions(range: std::ops::Range<u64>) -> Vec<BatchRef> {
    range.map(|batch| BatchRef { epoch: 0, batch }).collect()
}

/// A simulated training process.
#[derive(Debug, Clone, Default, PartialEq)]
struct Proc {
    applied: Option<u64>,
    generation: u64,
    rank: usize,
    next: u64,
    running: bool,
    leases: BTreeMap<u64, Vec<BatchRef>>,
}

/// A simulated cluster: the machine, the clock, the processes, and what they trained.
#[derive(Debug, Clone)]
struct Sim {
    m: Machine,
    now: u64,
    procs: BTreeMap<Slot, Proc>,
    /// (generation, step, rank, batches) for every step a process ran.
    trained: Vec<(u64, u64, usize, Vec<BatchRef>)>,
    /// Persist and reload the machine after every event (a coordinator restart each time).
    restart_every_event: bool,
}

fn round_trip(m: &Machine) -> Machine {
    serde_json::from_str(&serde_json::to_string(m).unwrap()).unwrap()
}

impl Sim {
    fn new(cfg: CoordConfig, epoch_batches: Vec<u64>) -> Self {
        Self {
            m: Machine::new(cfg, epoch_batches).unwrap(),
            now: 0,
            procs: BTreeMap::new(),
            trained: Vec::new(),
            restart_every_event: false,
        }
    }

    fn t(&self) -> Millis {
        Millis(self.now)
    }

    fn after_event(&mut self) {
        if self.restart_every_event {
            self.m = round_trip(&self.m);
        }
    }

    fn join(&mut self, node: &str, local_ranks: u32) -> NodeReply {
        let r = self.m.join(self.t(), node, local_ranks, &model()).unwrap();
        for lr in 0..local_ranks {
            self.procs.entry(slot(node, lr)).or_default();
        }
        self.after_event();
        r
    }

    /// Member processes in rank order.
    fn slots(&self) -> Vec<Slot> {
        self.m.members().iter().flat_map(|m| (0..m.local_ranks).map(|lr| slot(&m.node_id, lr))).collect()
    }

    fn check_in(&mut self, s: &Slot) -> RendezvousReply {
        let applied = self.procs[s].applied;
        let r = self.m.rendezvous(self.t(), &s.node_id, s.local_rank, applied, &s.to_string()).unwrap();
        self.procs.get_mut(s).unwrap().running = false;
        self.after_event();
        r
    }

    /// Processes not running in the current generation check in (once), then every
    /// process adopts its assignment.
    fn check_in_all(&mut self) {
        for s in self.slots() {
            let p = &self.procs[&s];
            let current = p.running && p.generation == self.m.generation();
            if !current && !self.m.checked_in(&s.node_id, s.local_rank) {
                self.check_in(&s);
            }
        }
        self.adopt();
    }

    fn adopt(&mut self) {
        for s in self.slots() {
            let Some(a) = self.m.assignment(&s.node_id, s.local_rank) else { continue };
            let p = self.procs.get_mut(&s).unwrap();
            if p.running && p.generation == a.generation {
                continue;
            }
            if a.sync_from.is_some() || a.restore_step.is_some() {
                p.applied = a.start_step.checked_sub(1);
            } else {
                assert_eq!(p.applied, a.start_step.checked_sub(1), "{s} was not told to sync but holds another state");
            }
            *p = Proc {
                applied: p.applied,
                generation: a.generation,
                rank: a.rank,
                next: a.start_step,
                running: true,
                leases: a.leases.into_iter().map(|l| (l.step, l.items)).collect(),
            };
        }
    }

    /// Process `s` runs its next step (it must hold the lease) and reports it.
    fn step(&mut self, s: &Slot) -> StepReply {
        let p = &self.procs[s];
        let (step, rank, generation) = (p.next, p.rank, p.generation);
        let items = p.leases.get(&step).cloned().unwrap_or_else(|| panic!("{s} holds no lease for step {step}"));
        let reply = self.m.step_done(self.t(), generation, rank, step, step as f64, 1e-3).unwrap();
        let p = self.procs.get_mut(s).unwrap();
        p.applied = Some(step);
        p.next = step + 1;
        p.leases.remove(&step);
        for l in &reply.leases {
            assert!(l.step > step);
            p.leases.insert(l.step, l.items.clone());
        }
        if reply.stop_after == Some(step) {
            p.running = false;
        }
        self.trained.push((generation, step, rank, items));
        self.after_event();
        reply
    }

    fn step_all(&mut self) -> Vec<StepReply> {
        self.slots().iter().map(|s| self.step(s)).collect()
    }

    /// Rank 0 of the finishing generation wrote the final weights.
    fn write_final_weights(&mut self) {
        let g = self.m.generation();
        self.m.final_weights(self.t(), g, 0, Ok("out/final_weights.safetensors".into())).unwrap();
        self.after_event();
    }

    fn run_to_end(&mut self) {
        for _ in 0..10_000 {
            match self.m.phase().clone() {
                Phase::Running { .. } if self.m.summary().finish.is_none() && self.finishing() => self.write_final_weights(),
                Phase::Running { .. } => {
                    self.step_all();
                }
                Phase::Rendezvous { .. } => self.check_in_all(),
                Phase::Finished => return,
                other => panic!("unexpected phase {other}"),
            }
        }
        panic!("did not finish");
    }

    /// Every step is committed and the job waits for the final weights.
    fn finishing(&self) -> bool {
        self.m.run.as_ref().is_some_and(|r| r.finishing)
    }

    fn assignment(&self, node: &str, local_rank: u32) -> Assignment {
        self.m.assignment(node, local_rank).unwrap_or_else(|| panic!("no assignment for {node}/{local_rank}"))
    }

    fn last_event(&self, kind: EventKind) -> &Event {
        self.m.events().iter().rev().find(|e| e.kind == kind).unwrap_or_else(|| panic!("no {kind:?} event"))
    }
}

/// Nodes `names` (one rank each) join a job with max = their count and all check in.
fn running(cfg: CoordConfig, epoch_batches: Vec<u64>, names: &[&str]) -> Sim {
    let mut sim = Sim::new(cfg, epoch_batches);
    for n in names {
        sim.join(n, 1);
    }
    if sim.m.phase() == &Phase::WaitingForNodes {
        sim.now += sim.m.config().last_call.as_millis() as u64;
        sim.m.tick(sim.t());
    }
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 1 });
    sim.check_in_all();
    assert_eq!(sim.m.phase(), &Phase::Running { generation: 1 });
    sim
}

#[test]
fn the_first_rendezvous_starts_at_max_nodes_or_after_last_call_and_fails_below_min() {
    enum Op {
        Join(u64, &'static str),
        Tick(u64),
    }
    use Op::*;
    #[derive(Debug)]
    enum Want {
        Waiting,
        Rendezvous { world: usize },
        Failed(&'static str),
    }
    let cases: Vec<(&str, usize, usize, Vec<Op>, Want)> = vec![
        (
            "max nodes start at once",
            2,
            3,
            vec![Join(0, "a"), Join(100, "b"), Join(200, "c")],
            Want::Rendezvous { world: 3 },
        ),
        ("min nodes wait for last call", 2, 4, vec![Join(0, "a"), Join(SEC, "b"), Tick(6 * SEC - 1)], Want::Waiting),
        ("last call expires", 2, 4, vec![Join(0, "a"), Join(SEC, "b"), Tick(6 * SEC)], Want::Rendezvous { world: 2 }),
        (
            "a later join restarts last call",
            2,
            4,
            vec![Join(0, "a"), Join(SEC, "b"), Join(5 * SEC, "c"), Tick(6 * SEC)],
            Want::Waiting,
        ),
        (
            "... until it expires",
            2,
            4,
            vec![Join(0, "a"), Join(SEC, "b"), Join(5 * SEC, "c"), Tick(10 * SEC)],
            Want::Rendezvous { world: 3 },
        ),
        ("below min before join timeout", 3, 4, vec![Join(0, "a"), Join(10, "b"), Tick(60 * SEC - 1)], Want::Waiting),
        (
            "below min at join timeout",
            3,
            4,
            vec![Join(0, "a"), Join(10, "b"), Tick(60 * SEC)],
            Want::Failed("only 2 of min_nodes 3 nodes joined within join_timeout (60.0 s)"),
        ),
        (
            "min reached late still starts",
            2,
            4,
            vec![Join(0, "a"), Join(58 * SEC, "b"), Tick(63 * SEC)],
            Want::Rendezvous { world: 2 },
        ),
        ("no nodes, no timeout", 1, 1, vec![Tick(1000 * SEC)], Want::Waiting),
    ];
    for (name, min, max, ops, want) in cases {
        let mut c = cfg(min, max);
        c.heartbeat_timeout = Duration::from_secs(1000);
        let mut m = Machine::new(c, vec![10]).unwrap();
        for op in ops {
            match op {
                Join(t, id) => drop(m.join(Millis(t), id, 1, &model()).unwrap()),
                Tick(t) => drop(m.tick(Millis(t))),
            }
        }
        match (&want, m.phase()) {
            (Want::Waiting, Phase::WaitingForNodes) => {}
            (Want::Rendezvous { world }, Phase::Rendezvous { generation: 1 }) => {
                assert_eq!(m.world(), *world, "{name}")
            }
            (Want::Failed(why), Phase::Failed { reason }) => {
                assert!(reason.contains(why), "{name}: {reason}");
                assert!(matches!(m.join(Millis(0), "z", 1, &model()), Err(Refusal::JobOver { .. })), "{name}");
            }
            (want, got) => panic!("{name}: want {want:?}, got {got}"),
        }
    }
}

#[test]
fn ranks_are_stable_whatever_the_join_order() {
    let nodes = [("c", 3), ("a", 2), ("b", 1)];
    for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
        let mut sim = Sim::new(cfg(3, 3), vec![100]);
        for i in order {
            sim.join(nodes[i].0, nodes[i].1);
        }
        sim.check_in_all();
        let want = ["a/0", "a/1", "b/0", "c/0", "c/1", "c/2"];
        for (rank, s) in sim.slots().iter().enumerate() {
            let a = sim.assignment(&s.node_id, s.local_rank);
            assert_eq!((a.rank, a.world, s.to_string()), (rank, 6, want[rank].to_string()), "order {order:?}");
            assert_eq!(a.comm_addrs, want, "addresses in rank order");
            assert_eq!((a.start_step, a.sync_from), (0, None), "fresh processes need no sync");
        }
    }
}

#[test]
fn refusals_name_the_problem_and_change_nothing() {
    type Call = fn(&mut Machine) -> Result<(), Refusal>;
    let t = Millis(SEC);
    let cases: Vec<(&str, Call, Refusal)> = vec![
        ("join beyond max", |m| m.join(Millis(SEC), "c", 1, &model()).map(drop), Refusal::Full { max_nodes: 2 }),
        ("no local ranks", |m| m.join(Millis(SEC), "c", 0, &model()).map(drop), Refusal::NoLocalRanks { node_id: "c".into() }),
        (
            "too many local ranks",
            |m| m.join(Millis(SEC), "c", 17, &model()).map(drop),
            Refusal::TooManyLocalRanks { node_id: "c".into(), local_ranks: 17, max: 16 },
        ),
        (
            "local ranks changed",
            |m| m.join(Millis(SEC), "a", 4, &model()).map(drop),
            Refusal::LocalRanksChanged { node_id: "a".into(), registered: 1, got: 4 },
        ),
        (
            "stale generation",
            |m| m.step_done(Millis(SEC), 0, 0, 0, 1.0, 1e-3).map(drop),
            Refusal::StaleGeneration { got: 0, current: 1 },
        ),
        (
            "future generation",
            |m| m.step_done(Millis(SEC), 2, 0, 0, 1.0, 1e-3).map(drop),
            Refusal::FutureGeneration { got: 2, current: 1 },
        ),
        (
            "future heartbeat",
            |m| m.heartbeat(Millis(SEC), "a", 7).map(drop),
            Refusal::FutureGeneration { got: 7, current: 1 },
        ),
        (
            "stale failure report",
            |m| m.rank_failed(Millis(SEC), 0, 0, "x", None).map(drop),
            Refusal::StaleGeneration { got: 0, current: 1 },
        ),
        (
            "no such rank",
            |m| m.step_done(Millis(SEC), 1, 2, 0, 1.0, 1e-3).map(drop),
            Refusal::UnknownRank { rank: 2, world: 2, generation: 1 },
        ),
        (
            "skipped step",
            |m| m.step_done(Millis(SEC), 1, 0, 1, 1.0, 1e-3).map(drop),
            Refusal::UnexpectedStep { rank: 0, expected: 0, got: 1 },
        ),
        (
            "unknown node",
            |m| m.heartbeat(Millis(SEC), "zz", 1).map(drop),
            Refusal::UnknownNode { node_id: "zz".into() },
        ),
        (
            "unknown local rank",
            |m| m.rendezvous(Millis(SEC), "a", 1, None, "x").map(drop),
            Refusal::UnknownLocalRank { node_id: "a".into(), local_rank: 1, local_ranks: 1 },
        ),
        (
            "leave below min",
            |m| m.leave(Millis(SEC), "b").map(drop),
            Refusal::WouldGoBelowMin { node_id: "b".into(), remaining: 1, min_nodes: 2 },
        ),
        (
            "state from beyond the leases",
            |m| m.rendezvous(Millis(SEC), "a", 0, Some(9), "x").map(drop),
            Refusal::UnknownAppliedStep { applied_step: 9, last_step: Some(1) },
        ),
    ];
    for (name, call, want) in cases {
        let mut sim = running(cfg(2, 2), vec![20], &["a", "b"]);
        sim.now = t.0;
        let before = sim.m.clone();
        assert_eq!(call(&mut sim.m), Err(want), "{name}");
        assert_eq!(sim.m, before, "{name}: a refusal must not change the state");
    }

    // After a re-form, the old generation's reports are stale.
    let mut sim = running(cfg(2, 2), vec![20], &["a", "b"]);
    sim.m.rank_failed(t, 1, 1, "peer closed", None).unwrap();
    assert_eq!(sim.m.step_done(t, 1, 0, 0, 1.0, 1e-3), Err(Refusal::StaleGeneration { got: 1, current: 2 }));
    assert_eq!(
        sim.m.step_done(t, 2, 0, 0, 1.0, 1e-3),
        Err(Refusal::NotRunning { phase: Phase::Rendezvous { generation: 2 } })
    );
    // Before anything ran, no process can hold a trained state.
    let mut m = Machine::new(cfg(1, 2), vec![5]).unwrap();
    m.join(t, "a", 1, &model()).unwrap();
    assert_eq!(
        m.rendezvous(t, "a", 0, Some(0), "x"),
        Err(Refusal::UnknownAppliedStep { applied_step: 0, last_step: None })
    );
}

#[test]
fn w_ranks_with_k_batches_train_what_one_process_with_w_times_k_trains() {
    for (ranks, k) in [(3u32, 2u64), (4, 1), (2, 3)] {
        let run = |local_ranks: u32, k: u64| {
            let mut c = cfg(1, 1);
            c.batches_per_rank_step = k;
            c.epochs = 2;
            let mut sim = Sim::new(c, vec![50, 47]);
            sim.join("n", local_ranks);
            sim.check_in_all();
            sim.run_to_end();
            sim
        };
        let (many, one) = (run(ranks, k), run(1, ranks as u64 * k));
        let (a, b) = (many.m.ledger().committed(), one.m.ledger().committed());
        assert_eq!(a.len(), b.len());
        assert!(a.len() > 10);
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.batches.world(), ranks as usize);
            assert_eq!(x.batches.ranks().concat(), y.batches.ranks().concat(), "step {}", x.step);
        }
        // What the processes trained is what the ledger committed.
        let mut trained = many.trained.clone();
        trained.sort_by_key(|&(_, step, rank, _)| (step, rank));
        let committed: Vec<_> = a.iter().flat_map(|c| c.batches.ranks()).collect();
        assert_eq!(trained.into_iter().map(|t| t.3).collect::<Vec<_>>(), committed);
        assert_eq!(many.m.summary().dropped_tail, Some(97 % (ranks as u64 * k)));
        many.m.check_exactly_once().unwrap();
    }
}

/// 3 nodes run steps 0 and 1; node c dies during step 2, when a may or may not have
/// applied step 2 (and b too, without having reported it).
fn kill_during_step_2(a_applied: bool, b_applied: bool) -> Sim {
    let mut c = cfg(2, 3);
    c.batches_per_rank_step = 2;
    let mut sim = running(c, vec![40], &["a", "b", "c"]);
    sim.step_all();
    sim.step_all();
    if a_applied {
        let r = sim.step(&slot("a", 0));
        assert_eq!(r.committed_through, Some(1), "b and c have not reported step 2");
    }
    if b_applied {
        sim.procs.get_mut(&slot("b", 0)).unwrap().applied = Some(2);
    }
    sim.now += SEC;
    sim.m.node_lost(sim.t(), "c", "training process exited with signal 9").unwrap();
    sim.procs.remove(&slot("c", 0));
    sim
}

#[test]
fn a_node_killed_mid_step_commits_exactly_what_the_survivors_applied() {
    // (a applied 2, b applied 2, start step, sync from, committed through, dropped tail)
    let cases = [
        (true, false, 3, Some(0), Some(2), 4),
        (true, true, 3, None, Some(2), 4),
        (false, true, 3, Some(1), Some(2), 4),
        (false, false, 2, None, Some(1), 4),
    ];
    for (a_applied, b_applied, start, sync, through, tail) in cases {
        let name = format!("a applied 2: {a_applied}, b applied 2: {b_applied}");
        let mut sim = kill_during_step_2(a_applied, b_applied);
        assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 }, "{name}");
        assert!(sim
            .last_event(EventKind::NodeLost)
            .reason
            .contains("generation 1: node c lost (training process exited"));
        assert!(sim.last_event(EventKind::NodeLost).reason.contains("2 of 3 nodes remain (min 2)"));
        assert_eq!(sim.last_event(EventKind::NodeLost).node.as_deref(), Some("c"), "the event names its node as a field");
        if b_applied {
            let refused = sim.m.step_done(sim.t(), 1, 1, 2, 0.5, 1e-3);
            assert_eq!(refused, Err(Refusal::StaleGeneration { got: 1, current: 2 }), "{name}");
        }
        sim.check_in_all();
        let a = sim.assignment("a", 0);
        assert_eq!((a.generation, a.world, a.start_step, a.sync_from), (2, 2, start, sync), "{name}");
        assert_eq!(sim.m.ledger().committed_through(), through, "{name}");
        if start == 3 {
            let step2 = &sim.m.ledger().committed()[2];
            assert_eq!(step2.generation, 1);
            assert_eq!(step2.batches.world(), 3, "{name}: the dead rank's lease is committed too");
            assert_eq!(step2.batches.ranks().concat(), positions(12..18));
            assert_eq!(a.leases[0].items, positions(18..21), "{name}: the next batches follow on, a step still takes 6");
        } else {
            assert_eq!(
                a.leases[0],
                StepLease { step: 2, items: positions(12..15) },
                "{name}: step 2 is leased again first, the same 6 batches over 2 ranks"
            );
            assert_eq!(sim.assignment("b", 0).leases[0].items, positions(15..18));
        }
        sim.run_to_end();
        let cover = sim.m.check_exactly_once().unwrap();
        assert_eq!(cover.dropped_tail, Some(tail), "{name}");
        assert_eq!(cover.committed_batches + tail, 40);
        let s = sim.m.summary();
        assert_eq!((s.recoveries, s.rollbacks, s.dropped_tail), (1, 0, Some(tail)), "{name}");
    }
}

#[test]
fn a_coordinator_restart_mid_run_continues_identically() {
    let mut sim = kill_during_step_2(true, false);
    let json = serde_json::to_string(&sim.m).unwrap();
    let restored: Machine = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, sim.m);
    let mut twin = sim.clone();
    twin.m = restored;
    // And one that restarts after every single event from here on.
    let mut flaky = sim.clone();
    flaky.restart_every_event = true;
    for s in [&mut sim, &mut twin, &mut flaky] {
        s.check_in_all();
        s.now += SEC;
        s.join("d", 2);
        s.run_to_end();
    }
    assert_eq!(twin.m, sim.m);
    assert_eq!(flaky.m, sim.m);
    assert_eq!(twin.trained, sim.trained);
    assert_eq!(flaky.trained, sim.trained);
    assert_eq!(sim.m.summary().generation, 3, "d was admitted");
    sim.m.check_exactly_once().unwrap();
}

/// A standby elected long after the active one's last save (its lease TTL, the election,
/// loading the state) must not judge the members on heartbeat times from before: each gets
/// a full `heartbeat_timeout` from the takeover to find the new leader (issue 51).
#[test]
fn a_coordinator_taking_over_gives_every_member_a_full_heartbeat_timeout_to_find_it() {
    let mut sim = running(cfg(2, 2), vec![100], &["a", "b"]);
    sim.step_all();
    // The old leader saved this state at 5 s and died; the standby loads it at 14 s.
    sim.now = 5 * SEC;
    for n in ["a", "b"] {
        sim.m.heartbeat(sim.t(), n, 1).unwrap();
    }
    let mut standby = round_trip(&sim.m);
    standby.resume(Millis(14 * SEC));
    assert!(standby.tick(Millis(14 * SEC + 1)).is_empty(), "nobody is judged on the old leader's clock");
    assert!(standby.tick(Millis(24 * SEC - 1)).is_empty(), "a full heartbeat_timeout (10 s) from the takeover");
    standby.heartbeat(Millis(20 * SEC), "a", 1).unwrap();
    let events = standby.tick(Millis(24 * SEC));
    assert_eq!(events.first().map(|e| (e.kind, e.node.clone())), Some((EventKind::NodeLost, Some("b".to_string()))), "{events:?}");
    // Negative control: without the resume, both would be lost at once.
    let mut careless = round_trip(&sim.m);
    let lost = careless.tick(Millis(15 * SEC)).iter().filter(|e| e.kind == EventKind::NodeLost).count();
    assert_eq!(lost, 2);
}

/// A node whose copy of the model differs (one frozen tensor) is refused by name when the
/// first generation forms, and the others train; once the identity is fixed, a later node
/// with another model is refused at join; with identical copies the job forms as always
/// (issue 42).
#[test]
fn a_node_with_another_model_is_refused_by_name_and_the_others_train() {
    use crate::model::identity::{TensorDigest, WeightFile};
    let with = |w: u64| {
        let f = WeightFile { name: "model.safetensors".into(), bytes: 8, header: "h".into(), tensors: vec![TensorDigest { name: "vision_encoder.w".into(), xxh3: w }] };
        ModelIdentity::new("c".into(), "t".into(), vec![f])
    };
    let (good, bad) = (with(1), with(2));
    let mut c = cfg(1, 2);
    c.last_call = Duration::from_secs(1);
    let mut m = Machine::new(c.clone(), vec![20]).unwrap();
    m.join(Millis(0), "a", 1, &good).unwrap();
    m.join(Millis(0), "b", 1, &bad).unwrap();
    assert_eq!(m.phase(), &Phase::Rendezvous { generation: 1 }, "max_nodes reached");
    assert_eq!(m.members().iter().map(|x| x.node_id.as_str()).collect::<Vec<_>>(), vec!["a"], "b is not a member");
    let refused = m.events().iter().find(|e| e.kind == EventKind::NodeRefused).expect("a refusal event");
    assert_eq!(refused.node.as_deref(), Some("b"));
    assert!(refused.reason.contains("weight file model.safetensors: tensor vision_encoder.w differs"), "{}", refused.reason);
    assert_eq!(m.model_identity(), Some(&good));
    let r = m.rendezvous(Millis(1), "a", 0, None, "a:1").unwrap();
    assert_eq!(r.assignment.map(|a| a.world), Some(1), "a trains on alone");
    // b's agent and rank hear why, not just that b is unknown.
    assert_eq!(m.heartbeat(Millis(2), "b", 1).unwrap_err().code(), "model-mismatch");
    assert_eq!(m.rendezvous(Millis(2), "b", 0, None, "b:1").unwrap_err().code(), "model-mismatch");
    // b registers again: refused at join now.
    let e = m.join(Millis(2), "b", 1, &bad).unwrap_err();
    assert_eq!(e.code(), "model-mismatch");
    assert!(e.to_string().contains("node \"b\" is refused: its model differs from the job's: weight file model.safetensors: tensor vision_encoder.w differs"), "{e}");
    // Negative control: identical copies form the job of two as before.
    let mut same = Machine::new(c, vec![20]).unwrap();
    same.join(Millis(0), "a", 1, &good).unwrap();
    same.join(Millis(0), "b", 1, &with(1)).unwrap();
    assert_eq!(same.members().len(), 2);
    assert!(same.events().iter().all(|e| e.kind != EventKind::NodeRefused));
}

#[test]
fn a_silent_node_is_lost_and_below_min_nodes_the_job_waits_then_fails_at_join_timeout() {
    let mut sim = running(cfg(2, 3), vec![100], &["a", "b", "c"]);
    sim.step_all();
    sim.now = 5 * SEC;
    for n in ["a", "b"] {
        sim.m.heartbeat(sim.t(), n, 1).unwrap();
    }
    assert!(sim.m.tick(Millis(10 * SEC - 1)).is_empty());
    let events = sim.m.tick(Millis(10 * SEC));
    assert_eq!(events[0].kind, EventKind::NodeLost);
    assert_eq!(events[0].reason, "generation 1: node c lost (no heartbeat for 10.0 s); 2 of 3 nodes remain (min 2)");
    assert_eq!(events[1].kind, EventKind::GenerationFormed);
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    let hb = sim.m.heartbeat(Millis(11 * SEC), "a", 1).unwrap();
    assert_eq!(
        (hb.generation, hb.status),
        (2, NodeStatus::Member),
        "a stale heartbeat is answered, so the node notices"
    );
    assert_eq!(sim.m.heartbeat(Millis(11 * SEC), "c", 1), Err(Refusal::UnknownNode { node_id: "c".into() }));
    let events = sim.m.tick(Millis(15 * SEC + 1));
    assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), vec![EventKind::NodeLost, EventKind::WaitingForNodes]);
    assert_eq!(sim.m.phase(), &Phase::WaitingForNodes, "below min_nodes is a wait, not a verdict");
    assert!(sim.m.summary().waiting.is_some_and(|w| w.contains("1 nodes available, below min_nodes 2")));
    assert!(sim.m.waiting_for(sim.t()).starts_with("waiting for nodes"), "{}", sim.m.waiting_for(sim.t()));
    // Nobody comes back within join_timeout (60 s): now the job fails, and says why.
    sim.m.heartbeat(Millis(70 * SEC), "a", 2).unwrap();
    assert!(sim.m.tick(Millis(75 * SEC)).is_empty());
    let events = sim.m.tick(Millis(75 * SEC + 1));
    assert_eq!(events.iter().map(|e| e.kind).collect::<Vec<_>>(), vec![EventKind::Failed]);
    let Phase::Failed { reason } = sim.m.phase() else { panic!("{}", sim.m.phase()) };
    assert!(reason.contains("only 1 of min_nodes 2 nodes available within join_timeout (60.0 s)"), "{reason}");
    assert!(reason.contains("lost node b"), "{reason}");
    assert_eq!(sim.m.summary().steps_committed, 1);
}

#[test]
fn losing_every_node_waits_and_the_returning_nodes_resume_from_the_newest_checkpoint() {
    let mut c = cfg(1, 2);
    c.last_call = Duration::from_secs(1);
    let mut sim = running(c, vec![40], &["a", "b"]);
    for _ in 0..4 {
        sim.step_all();
    }
    checkpoint(&mut sim, 1);
    sim.step_all();
    sim.now = 10 * SEC;
    sim.m.node_lost(sim.t(), "a", "killed").unwrap();
    sim.m.node_lost(sim.t(), "b", "killed").unwrap();
    assert_eq!(sim.m.phase(), &Phase::WaitingForNodes);
    assert_eq!(sim.m.summary().steps_committed, 5, "nothing is given back while the job waits");
    // The same nodes come back with fresh processes 30 s later: both are there at once
    // (max_nodes), so the generation forms without a last call.
    sim.now = 40 * SEC;
    sim.procs.clear();
    sim.join("a", 1);
    assert_eq!(sim.m.phase(), &Phase::WaitingForNodes, "one node (min 1): waits for last call");
    sim.join("b", 1);
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 3 });
    sim.check_in_all();
    let a = sim.assignment("a", 0);
    assert_eq!((a.restore_step, a.start_step, a.sync_from), (Some(2), 2, None));
    assert_eq!(sim.m.summary().waiting, None);
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn a_fresh_process_of_a_running_slot_gets_no_stale_assignment_and_re_forms() {
    let mut sim = running(cfg(2, 2), vec![40], &["a", "b"]);
    sim.step_all();
    sim.step_all();
    // The coordinator still believes generation 1 runs (it restarted on its state); the
    // nodes restarted too: their fresh processes listen elsewhere and hold no state.
    assert!(sim.m.assignment_of_checkin("a", 0, Some(1), "a/0").is_none(), "not the state it was formed from");
    assert!(sim.m.assignment_of_checkin("a", 0, None, "a/0#2").is_none(), "another process");
    let formed = sim.m.assignment_of_checkin("a", 0, None, "a/0").expect("the very check-in it was formed from");
    assert_eq!(formed.generation, 1);
    let r = sim.m.rendezvous(sim.t(), "a", 0, None, "a/0#2").unwrap();
    assert_eq!((r.generation, r.assignment), (2, None));
    sim.m.rendezvous(sim.t(), "b", 0, None, "b/0#2").unwrap();
    let a = sim.m.assignment_of_checkin("a", 0, None, "a/0#2").expect("assigned");
    assert_eq!((a.generation, a.start_step, a.comm_addrs.clone()), (2, 0, vec!["a/0#2".to_string(), "b/0#2".to_string()]));
    assert!(sim.m.summary().rollbacks == 1, "no checkpoint: the fresh processes start over, and the ledger with them");
    sim.m.check_exactly_once().unwrap();
}

/// Generation 1 on a and b runs 6 steps with checkpoints step-2 and step-4 (keep 2), then
/// every process dies and comes back fresh: the rendezvous restores step-4.
fn restoring_step_4() -> Sim {
    let mut sim = running(cfg(2, 2), vec![40], &["a", "b"]);
    for _ in 0..6 {
        sim.step_all();
    }
    checkpoint(&mut sim, 1);
    checkpoint(&mut sim, 3);
    assert_eq!(sim.m.checkpoints(), &[2, 4]);
    assert_eq!(sim.m.ledger().compacted().count(), 2, "the oldest kept checkpoint bounds compaction");
    every_process_dies(&mut sim);
    assert_eq!(sim.assignment("a", 0).restore_step, Some(4));
    sim
}

#[test]
fn an_unreadable_checkpoint_falls_back_to_the_previous_one_and_is_never_offered_again() {
    let mut sim = restoring_step_4();
    let g = sim.m.generation();
    let what = "step-4/shard-00000-of-00002.safetensors: checksum mismatch";
    assert_eq!(sim.m.checkpoint_unreadable(sim.t(), g, 0, 2, what), Err(Refusal::NotRestored { steps: 2, generation: g }));
    sim.m.checkpoint_unreadable(sim.t(), g, 0, 4, what).unwrap();
    assert!(sim.last_event(EventKind::CheckpointUnreadable).reason.contains(what));
    assert_eq!(sim.m.checkpoints(), &[2]);
    assert!(matches!(sim.m.checkpoint_unreadable(sim.t(), g, 1, 4, what), Err(Refusal::StaleGeneration { .. })), "reported once");
    for p in sim.procs.values_mut() {
        *p = Proc::default(); // a failed load leaves no usable state: the processes restart
    }
    sim.check_in_all();
    let a = sim.assignment("a", 0);
    assert_eq!((a.restore_step, a.start_step), (Some(2), 2));
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
    assert_eq!(sim.m.unreadable_checkpoints().len(), 1);
}

#[test]
fn with_no_readable_checkpoint_left_the_job_stops_naming_the_shards() {
    let mut sim = restoring_step_4();
    sim.m.checkpoint_unreadable(sim.t(), sim.m.generation(), 0, 4, "step-4/shard-00001: checksum mismatch").unwrap();
    for p in sim.procs.values_mut() {
        *p = Proc::default();
    }
    sim.check_in_all();
    sim.m.checkpoint_unreadable(sim.t(), sim.m.generation(), 1, 2, "step-2/shard-00000: No such file").unwrap();
    for p in sim.procs.values_mut() {
        *p = Proc::default();
    }
    for s in sim.slots() {
        sim.check_in(&s);
    }
    let Phase::Failed { reason } = sim.m.phase() else { panic!("{}", sim.m.phase()) };
    assert!(reason.contains("step-4/shard-00001: checksum mismatch") && reason.contains("step-2/shard-00000: No such file"), "{reason}");
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn a_partition_leaves_out_one_node_of_the_pair_for_the_back_off_then_admits_it_again() {
    let mut c = cfg(1, 3);
    c.exclusion_backoff = Duration::from_secs(30);
    let mut sim = Sim::new(c, vec![400]);
    sim.join("a", 1);
    sim.now = SEC;
    sim.join("b", 1);
    sim.now = 2 * SEC;
    sim.join("c", 1);
    sim.check_in_all();
    sim.step_all();
    let rank = |sim: &Sim, node: &str| sim.assignment(node, 0).rank;
    // b timed out receiving from a: the two cannot talk. a is blamed (by b), b by nobody:
    // a is left out.
    sim.now = 10 * SEC;
    sim.m.rank_failed(sim.t(), 1, rank(&sim, "b"), "receive timed out", Some(rank(&sim, "a"))).unwrap();
    let e = sim.last_event(EventKind::PeerUnreachable);
    assert!(e.reason.contains("nodes b and a cannot reach each other"), "{}", e.reason);
    assert!(sim.last_event(EventKind::NodeExcluded).reason.contains("leaving node a out for 30 s (exclusion 1"));
    assert_eq!((e.node.as_deref(), sim.last_event(EventKind::NodeExcluded).node.as_deref()), (Some("b"), Some("a")), "reporter, excluded");
    assert_eq!(sim.m.summary().excluded, vec![("a".to_string(), Millis(40 * SEC))]);
    assert_eq!(sim.m.members().iter().map(|m| m.node_id.as_str()).collect::<Vec<_>>(), vec!["b", "c"]);
    assert!(sim.m.rendezvous(sim.t(), "a", 0, None, "a/0").is_ok(), "a's process may wait, it is not admitted");
    sim.check_in_all();
    assert_eq!(sim.m.world(), 2);
    for _ in 0..3 {
        sim.step_all();
    }
    // Heartbeats keep a registered while it is out; when its time is up it is admitted at
    // the next step boundary.
    for n in ["a", "b", "c"] {
        sim.m.heartbeat(Millis(35 * SEC), n, 2).unwrap();
    }
    assert_eq!(sim.m.heartbeat(Millis(35 * SEC), "a", 2).unwrap().status, NodeStatus::Excluded);
    let readmit = |sim: &mut Sim, at: u64, node: &str| {
        sim.now = at;
        for n in ["a", "b", "c"] {
            sim.m.heartbeat(sim.t(), n, sim.m.generation()).unwrap();
        }
        sim.m.tick(sim.t());
        let replies = sim.step_all();
        assert!(replies.iter().all(|r| r.stop_after.is_some()), "a boundary is scheduled for the returning node");
        // The left-out process restarted fresh (its state is untracked).
        sim.procs.insert(slot(node, 0), Proc::default());
        sim.check_in_all();
        assert_eq!(sim.m.world(), 3, "back");
    };
    readmit(&mut sim, 40 * SEC, "a");
    // The same pair fails the same way: a is blamed again (still only by b): out again,
    // for twice as long.
    sim.m.rank_failed(sim.t(), sim.m.generation(), rank(&sim, "b"), "receive timed out", Some(rank(&sim, "a"))).unwrap();
    assert!(sim.last_event(EventKind::NodeExcluded).reason.contains("leaving node a out for 60 s (exclusion 2"));
    sim.check_in_all();
    sim.step_all();
    readmit(&mut sim, 101 * SEC, "a");
    // Now a blames b: each is blamed by one peer, so the one that joined last (b) goes.
    sim.m.rank_failed(sim.t(), sim.m.generation(), rank(&sim, "a"), "send timed out", Some(rank(&sim, "b"))).unwrap();
    assert!(sim.last_event(EventKind::NodeExcluded).reason.contains("leaving node b out for 30 s (exclusion 1"));
    assert_eq!(sim.m.blame().1, 3);
    sim.check_in_all();
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn a_failure_without_blame_or_on_the_same_node_leaves_nobody_out() {
    let mut sim = Sim::new(cfg(1, 2), vec![50]);
    sim.join("a", 2);
    sim.join("b", 1);
    sim.check_in_all();
    sim.step_all();
    sim.m.rank_failed(sim.t(), 1, 0, "peer closed its connection", None).unwrap();
    assert_eq!(sim.m.summary().excluded, vec![]);
    sim.check_in_all();
    sim.m.rank_failed(sim.t(), 2, 0, "shared-memory barrier timed out", Some(1)).unwrap();
    assert_eq!(sim.m.summary().excluded, vec![], "ranks 0 and 1 are both on node a");
    assert_eq!(sim.m.world(), 3);
}

#[test]
fn generations_that_keep_failing_without_progress_end_the_job() {
    let mut c = cfg(2, 2);
    c.max_failed_generations = 3;
    let mut sim = running(c, vec![50], &["a", "b"]);
    sim.step_all();
    // The first failure follows progress: it does not count.
    sim.m.rank_failed(sim.t(), 1, 0, "receive timed out", None).unwrap();
    assert_eq!(sim.m.summary().failed_generations, 0);
    for n in 1..3 {
        sim.check_in_all();
        sim.m.rank_failed(sim.t(), sim.m.generation(), 0, "receive timed out", None).unwrap();
        assert_eq!(sim.m.summary().failed_generations, n);
    }
    // A committed step resets the count.
    sim.check_in_all();
    sim.step_all();
    assert_eq!(sim.m.summary().failed_generations, 0);
    // The generation that committed it fails (not counted), then three that commit nothing.
    for n in 0..4 {
        sim.m.rank_failed(sim.t(), sim.m.generation(), 0, "receive timed out", None).unwrap();
        if n < 3 {
            assert_eq!(sim.m.summary().failed_generations, n, "{}", sim.m.phase());
            sim.check_in_all();
        }
    }
    let Phase::Failed { reason } = sim.m.phase() else { panic!("{}", sim.m.phase()) };
    assert!(reason.contains("3 generations in a row failed without committing a step (max_failed_generations)"), "{reason}");
}

#[test]
fn a_node_joining_a_running_job_is_admitted_at_one_step_boundary_for_all_ranks() {
    let mut c = cfg(2, 3);
    c.global_batches = Some(6);
    let mut sim = Sim::new(c, vec![100]);
    sim.join("a", 1);
    sim.join("b", 1);
    sim.now = 5 * SEC;
    sim.m.tick(sim.t());
    sim.check_in_all();
    sim.step_all();
    sim.step_all();
    let (a, b, c) = (slot("a", 0), slot("b", 0), slot("c", 0));
    assert_eq!(sim.step(&a).stop_after, None);
    sim.join("c", 1);
    assert!(sim.last_event(EventKind::StopScheduled).reason.contains("every rank stops after step 3"));
    assert_eq!(sim.m.phase(), &Phase::Running { generation: 1 });
    // b reports step 2 later than a, yet gets the same stop.
    assert_eq!(sim.step(&b).stop_after, Some(3));
    // c's process checks in early: it waits for the boundary.
    assert_eq!(sim.check_in(&c).assignment, None);
    let ra = sim.step(&a);
    assert_eq!((ra.stop_after, ra.job_ends), (Some(3), false));
    assert!(ra.leases.is_empty(), "no leases past the stop");
    sim.check_in(&a);
    assert_eq!(sim.m.phase(), &Phase::Running { generation: 1 }, "b has not reached the boundary");
    assert_eq!(sim.step(&b).stop_after, Some(3));
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    assert_eq!(sim.m.ledger().committed_through(), Some(3));
    sim.check_in_all();
    let (aa, ac) = (sim.assignment("a", 0), sim.assignment("c", 0));
    assert_eq!((aa.world, aa.start_step, aa.sync_from), (3, 4, Some(0)), "c is fresh and copies rank 0's state");
    assert_eq!((ac.rank, ac.leases[0].clone()), (2, StepLease { step: 4, items: positions(28..30) }), "a step still takes 6: 2 a rank now");
    assert_eq!(sim.m.summary().recoveries, 0, "a join is not a failure");
    sim.run_to_end();
    assert_eq!(sim.m.check_exactly_once().unwrap().dropped_tail, Some(4), "16 steps of 6 batches, whatever the world");
}

#[test]
fn a_graceful_leave_takes_effect_at_the_boundary() {
    let mut sim = running(cfg(2, 3), vec![60], &["a", "b", "c"]);
    sim.step_all();
    sim.m.leave(sim.t(), "c").unwrap();
    assert_eq!(
        sim.m.leave(sim.t(), "b"),
        Err(Refusal::WouldGoBelowMin { node_id: "b".into(), remaining: 1, min_nodes: 2 })
    );
    let replies = sim.step_all();
    assert!(replies.iter().all(|r| r.stop_after == Some(1)));
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    assert!(sim.m.events().iter().any(|e| e.kind == EventKind::NodeLeft && e.reason.contains("node c left")));
    sim.check_in_all();
    assert_eq!((sim.m.world(), sim.assignment("b", 0).sync_from), (2, None));
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn a_boundary_check_in_counts_as_the_missing_step_report() {
    let mut sim = running(cfg(2, 3), vec![60], &["a", "b"]);
    sim.step_all();
    sim.join("c", 1);
    sim.step(&slot("a", 0));
    // b applied step 1 but its report was lost; it goes straight to the rendezvous.
    sim.procs.get_mut(&slot("b", 0)).unwrap().applied = Some(1);
    sim.check_in(&slot("b", 0));
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    assert_eq!(sim.m.ledger().committed_through(), Some(1));
    sim.check_in_all();
    assert_eq!(sim.assignment("c", 0).start_step, 2);
}

#[test]
fn a_failure_report_re_forms_and_a_rank_that_never_checks_in_loses_its_node() {
    let mut sim = running(cfg(2, 3), vec![60], &["a", "b", "c"]);
    sim.step_all();
    sim.now = SEC;
    sim.m.rank_failed(sim.t(), 1, 0, "recv from rank 2: connection reset", None).unwrap();
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    assert_eq!(sim.m.world(), 3, "nobody is dropped on a report");
    sim.check_in(&slot("a", 0));
    sim.check_in(&slot("b", 0));
    for n in ["a", "b"] {
        sim.m.heartbeat(Millis(55 * SEC), n, 2).unwrap();
    }
    // c's node keeps heartbeating, but its process never checks in.
    sim.m.heartbeat(Millis(55 * SEC), "c", 2).unwrap();
    assert!(sim.m.tick(Millis(61 * SEC - 1)).is_empty());
    sim.now = 61 * SEC;
    sim.m.tick(sim.t());
    assert!(sim.last_event(EventKind::NodeLost).reason.contains("node c lost (local ranks [0] did not check in"));
    assert_eq!(sim.m.phase(), &Phase::Running { generation: 3 }, "a and b's check-ins carry over");
    sim.adopt();
    assert_eq!((sim.assignment("a", 0).start_step, sim.m.summary().recoveries), (1, 2));
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn a_rank_re_entering_without_a_stop_re_forms_the_generation() {
    let mut sim = running(cfg(1, 2), vec![30], &["a", "b"]);
    sim.step_all();
    let a = slot("a", 0);
    // Repeating a check-in before any step is idempotent...
    let mut sim2 = running(cfg(1, 2), vec![30], &["a", "b"]);
    let before = sim2.m.clone();
    assert_eq!(sim2.check_in(&a).assignment.map(|x| x.rank), Some(0));
    assert_eq!(sim2.m, before);
    // ...but after steps, it means the process left the collective.
    sim.check_in(&a);
    assert_eq!(sim.m.phase(), &Phase::Rendezvous { generation: 2 });
    assert!(sim.m.checked_in("a", 0) && !sim.m.checked_in("b", 0));
    sim.check_in_all();
    assert_eq!(sim.assignment("b", 0).start_step, 1);
}

#[test]
fn retried_reports_are_answered_again_without_counting_twice() {
    let mut sim = running(cfg(2, 2), vec![30], &["a", "b"]);
    let first = sim.step(&slot("a", 0));
    let again = sim.m.step_done(sim.t(), 1, 0, 0, 9.0, 1e-3).unwrap();
    assert_eq!(again, first);
    sim.step(&slot("b", 0));
    assert_eq!(sim.m.ledger().committed()[0].mean_loss, Some(0.0), "the retried loss did not count");
}

#[test]
fn when_every_holder_of_the_state_is_gone_committed_steps_roll_back() {
    let mut sim = running(cfg(2, 3), vec![30], &["a", "b"]);
    sim.step_all();
    sim.step_all();
    every_process_dies(&mut sim);
    assert_eq!(sim.assignment("a", 0).start_step, 0);
    assert_eq!(sim.m.ledger().committed_through(), None);
    assert!(sim.last_event(EventKind::RolledBack).reason.contains("committed steps 0..=1"));
    // A node that was not in the last running generation cannot bring in a state.
    sim.join("c", 1);
    let refused = sim.m.rendezvous(sim.t(), "c", 0, Some(0), "c/0");
    assert!(matches!(refused, Err(Refusal::UntrackedState { applied_step: 0, .. })), "{refused:?}");
    sim.run_to_end();
    assert_eq!(sim.m.summary().rollbacks, 1);
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn the_job_ends_at_max_steps() {
    let mut c = cfg(2, 2);
    c.max_steps = Some(3);
    let mut sim = running(c, vec![100], &["a", "b"]);
    for _ in 0..3 {
        let replies = sim.step_all();
        assert!(replies.iter().all(|r| r.stop_after == Some(2) && r.job_ends), "{replies:?}");
    }
    assert!(sim.finishing(), "every step is committed: the final weights are next");
    sim.write_final_weights();
    assert_eq!(sim.m.phase(), &Phase::Finished);
    let s = sim.m.summary();
    assert_eq!(s.final_weights.as_deref(), Some("out/final_weights.safetensors"));
    assert_eq!((s.steps_committed, s.finish, s.dropped_tail), (3, Some(Finish::MaxSteps { steps: 3 }), None));
    assert_eq!(sim.m.check_exactly_once().unwrap().pending_batches, 94);
    assert!(matches!(sim.m.step_done(sim.t(), 1, 0, 3, 1.0, 1e-3), Err(Refusal::JobOver { .. })));
    assert_eq!(sim.m.heartbeat(sim.t(), "a", 1).unwrap().phase, Phase::Finished, "agents learn the end");
}

#[test]
fn the_job_ends_when_the_epochs_run_out_and_counts_the_dropped_tail() {
    let mut c = cfg(2, 2);
    c.epochs = 2;
    c.batches_per_rank_step = 2;
    let mut sim = running(c, vec![5, 4], &["a", "b"]);
    sim.run_to_end();
    let committed = sim.m.ledger().committed();
    let b = |epoch, batch| BatchRef { epoch, batch };
    assert_eq!(committed.len(), 2);
    assert_eq!(
        committed[1].batches.ranks(),
        vec![vec![b(0, 4), b(1, 0)], vec![b(1, 1), b(1, 2)]],
        "a step spans the epoch boundary"
    );
    assert_eq!(sim.m.summary().finish, Some(Finish::DataExhausted { dropped_tail: 1 }));
    assert_eq!(sim.m.check_exactly_once().unwrap().dropped_tail, Some(1));
    assert!(sim.last_event(EventKind::Finished).reason.contains("1 batches of the last epoch's tail dropped"));
    assert!(sim
        .m
        .events()
        .iter()
        .any(|e| e.kind == EventKind::StopScheduled && e.reason.contains("step 1 is the last")));
}

#[test]
fn the_event_log_keeps_the_latest_events() {
    let mut log = EventLog::default();
    for i in 0..EVENT_LOG_LEN as u64 + 5 {
        log.push(Event { at: Millis(i), generation: 0, kind: EventKind::NodeJoined, reason: String::new(), node: None });
    }
    assert_eq!(log.events.len(), EVENT_LOG_LEN);
    assert_eq!(log.events.front().unwrap().at, Millis(5));
    assert_eq!(log.since(log.appended - 2).iter().map(|e| e.at.0).collect::<Vec<_>>(), vec![EVENT_LOG_LEN as u64 + 3, EVENT_LOG_LEN as u64 + 4]);
}

fn shard(rank: usize) -> ShardReport {
    ShardReport { file: format!("shard-{rank}"), bytes: 10, crc32: 7, names: vec![format!("p{rank}")] }
}

/// Both ranks of generation 1 report their shards of the checkpoint after `step`; the
/// coordinator "writes the manifest".
fn checkpoint(sim: &mut Sim, step: u64) -> u64 {
    assert_eq!(sim.m.checkpoint_done(sim.t(), 1, 0, step, shard(0)).unwrap(), None, "one shard of two is not a checkpoint");
    let c = sim.m.checkpoint_done(sim.t(), 1, 1, step, shard(1)).unwrap().expect("all shards in, step committed");
    assert_eq!((c.steps, c.generation, c.shards.len()), (step + 1, 1, 2));
    sim.m.checkpoint_committed(sim.t(), c.steps);
    c.steps
}

#[test]
fn a_checkpoint_commits_only_when_every_shard_is_durable_and_its_step_is_committed() {
    let mut sim = running(cfg(2, 2), vec![40], &["a", "b"]);
    sim.step(&slot("a", 0)); // step 0: only rank 0 reported
    assert_eq!(sim.m.checkpoint_done(sim.t(), 1, 0, 0, shard(0)).unwrap(), None);
    assert_eq!(sim.m.checkpoint_done(sim.t(), 1, 1, 0, shard(1)).unwrap(), None, "step 0 is not committed yet");
    sim.step(&slot("b", 0));
    let ready = sim.m.ready_checkpoint().expect("ready once step 0 is committed");
    assert_eq!(ready.steps, 1);
    // Refusals: another generation, a rank it did not have, a step nobody leased.
    let wrong_gen = sim.m.checkpoint_done(sim.t(), 2, 0, 0, shard(0));
    assert!(matches!(&wrong_gen, Err(Refusal::CheckpointShard { why, .. }) if why.contains("generation 1")), "{wrong_gen:?}");
    assert!(matches!(sim.m.checkpoint_done(sim.t(), 1, 2, 0, shard(2)), Err(Refusal::CheckpointShard { .. })));
    assert!(matches!(sim.m.checkpoint_done(sim.t(), 1, 0, 99, shard(0)), Err(Refusal::CheckpointShard { .. })));
    sim.m.checkpoint_committed(sim.t(), ready.steps);
    assert_eq!(sim.m.checkpoints(), &[1]);
    assert_eq!(sim.m.ready_checkpoint(), None, "committed once");
    assert!(round_trip(&sim.m) == sim.m, "checkpoint state persists");
}

/// Both rank processes of generation 1 crash and come back with no state; they check in.
fn every_process_dies(sim: &mut Sim) {
    sim.m.rank_failed(sim.t(), 1, 0, "both processes crashed", None).unwrap();
    for p in sim.procs.values_mut() {
        *p = Proc::default();
    }
    sim.check_in_all();
}

/// Generation 1 on nodes a and b runs 4 steps and commits the checkpoint after step 1.
fn four_steps_and_checkpoint_2() -> Sim {
    let mut sim = running(cfg(2, 2), vec![40], &["a", "b"]);
    for _ in 0..4 {
        sim.step_all();
    }
    assert_eq!(checkpoint(&mut sim, 1), 2);
    sim
}

#[test]
fn with_every_holder_gone_the_job_restores_its_newest_checkpoint_instead_of_rolling_back_to_zero() {
    let mut sim = four_steps_and_checkpoint_2();
    assert_eq!(sim.m.ledger().compacted().count(), 2, "the steps the checkpoint holds are compacted");
    assert!(matches!(sim.m.checkpoint_done(sim.t(), 1, 0, 0, shard(0)), Ok(None)), "a late shard of a compacted step is ignored");
    // A checkpoint after step 3 that rank 1 never finished writing (killed mid-write).
    sim.m.checkpoint_done(sim.t(), 1, 0, 3, shard(0)).unwrap();
    every_process_dies(&mut sim);
    let a = sim.assignment("a", 0);
    assert_eq!((a.restore_step, a.start_step, a.sync_from), (Some(2), 2, None));
    assert_eq!(sim.m.ledger().committed_through(), Some(1), "steps 0 and 1 stay committed");
    assert!(sim.last_event(EventKind::RolledBack).reason.contains("committed steps 2..=3"));
    assert!(sim.last_event(EventKind::Restored).reason.contains("step-2"));
    sim.run_to_end();
    sim.m.check_exactly_once().unwrap();
    // Steps 0 and 1 ran once; 2 and 3 twice (before the crash and after the restore).
    let runs = |step| sim.trained.iter().filter(|t| t.1 == step && t.2 == 0).count();
    assert_eq!((runs(0), runs(1), runs(2), runs(3)), (1, 1, 2, 2));
}

#[test]
fn a_checkpoint_whose_steps_roll_back_while_its_manifest_is_written_is_not_recorded() {
    let mut sim = four_steps_and_checkpoint_2();
    // step-4 becomes ready; the shell starts writing its manifest (off the lock) ...
    sim.m.checkpoint_done(sim.t(), 1, 0, 3, shard(0)).unwrap();
    let c = sim.m.checkpoint_done(sim.t(), 1, 1, 3, shard(1)).unwrap().expect("ready");
    assert!(sim.m.checkpoint_still_ready(c.steps, c.generation));
    assert!(!sim.m.checkpoint_still_ready(c.steps, c.generation + 1), "another generation's");
    // ... and meanwhile every process dies: the job goes back to step-2.
    every_process_dies(&mut sim);
    assert_eq!(sim.m.ledger().committed_through(), Some(1));
    assert!(!sim.m.checkpoint_still_ready(c.steps, c.generation), "its steps were given back");
}

#[test]
fn a_live_state_newer_than_the_checkpoint_wins_over_it() {
    let mut sim = running(cfg(1, 3), vec![40], &["a", "b"]);
    for _ in 0..3 {
        sim.step_all();
    }
    checkpoint(&mut sim, 1);
    sim.m.node_lost(sim.t(), "b", "killed").unwrap();
    sim.join("c", 1);
    sim.check_in_all();
    let a = sim.assignment("a", 0);
    assert_eq!((a.restore_step, a.start_step, a.sync_from), (None, 3, Some(0)));
}

#[test]
fn a_fresh_coordinator_takes_over_from_a_checkpoint_manifests_ledger() {
    let mut sim = running(cfg(2, 2), vec![40], &["a", "b"]);
    for _ in 0..3 {
        sim.step_all();
    }
    sim.m.checkpoint_done(sim.t(), 1, 0, 1, shard(0)).unwrap();
    let c = sim.m.checkpoint_done(sim.t(), 1, 1, 1, shard(1)).unwrap().unwrap();
    // Another job's data is refused, naming both sizes.
    let mut other = Machine::new(cfg(2, 2), vec![50]).unwrap();
    let err = other.restore_from_checkpoint(Millis(0), c.ledger.clone(), c.steps, &[], None).unwrap_err();
    assert!(err.message.contains("[40]") && err.message.contains("[50]"), "{err}");

    let mut fresh = Sim::new(cfg(2, 2), vec![40]);
    fresh.m.restore_from_checkpoint(Millis(0), c.ledger.clone(), c.steps, &[], Some(model())).unwrap();
    assert_eq!(fresh.m.ledger().committed_through(), Some(1));
    fresh.join("x", 1);
    fresh.join("y", 1);
    fresh.check_in_all();
    assert_eq!(fresh.assignment("x", 0).restore_step, Some(2));
    assert_eq!(fresh.assignment("y", 0).start_step, 2);
    fresh.run_to_end();
    fresh.m.check_exactly_once().unwrap();
    assert!(fresh.trained.iter().all(|t| t.1 >= 2), "steps held by the checkpoint are not trained again");
}

#[test]
fn a_long_jobs_saved_state_stops_growing() {
    // 2 ranks, a checkpoint every 5 steps (so that the event log, 1000 events, fills too):
    // once the history window and the event log are full, what the coordinator saves after
    // every change no longer grows with the steps run.
    let mut sim = running(cfg(2, 2), vec![40_000], &["a", "b"]);
    let size = |m: &Machine| serde_json::to_vec(m).unwrap().len();
    let mut sizes = Vec::new();
    for step in 0..12_000u64 {
        sim.step_all();
        if (step + 1) % 5 == 0 {
            checkpoint(&mut sim, step);
        }
        if step + 1 == 6000 || step + 1 == 12_000 {
            sizes.push(size(&sim.m));
        }
    }
    println!("saved state: {} bytes after 6000 steps, {} after 12000", sizes[0], sizes[1]);
    assert!(sizes[1] <= sizes[0] + sizes[0] / 50, "{sizes:?}");
    assert_eq!(sim.m.summary().steps_committed, 12_000);
    sim.m.check_exactly_once().unwrap();
}

#[test]
fn the_schedule_length_is_fixed_at_the_first_rendezvous_and_a_manifest_records_what_it_must() {
    let mut c = cfg(2, 3);
    c.max_steps = Some(30);
    let mut sim = running(c, vec![40], &["a", "b"]);
    // 40 batches, 2 ranks x 1 a step: 20 steps by the data, under max_steps.
    assert_eq!(sim.m.total_steps(), Some(20));
    for _ in 0..3 {
        sim.step_all();
    }
    sim.m.checkpoint_done(sim.t(), 1, 0, 1, shard(0)).unwrap();
    let commit = sim.m.checkpoint_done(sim.t(), 1, 1, 1, shard(1)).unwrap().unwrap();
    let mut template = crate::ckpt::Manifest::new(0, 0);
    template.model_seed = 11;
    let m = sim.m.checkpoint_manifest(&commit, &template, 0.1);
    assert_eq!((m.step, m.world_size, m.total_steps, m.warmup_steps, m.generation, m.model_seed), (2, 2, 20, 2, Some(1), 11));
    assert_eq!(m.partition, vec![vec!["p0".to_string()], vec!["p1".to_string()]]);
    assert_eq!(m.shards.iter().map(|s| (s.file.as_str(), s.bytes, s.crc32)).collect::<Vec<_>>(), vec![("shard-0", 10, 7), ("shard-1", 10, 7)]);
    assert_eq!(m.identity.as_ref(), Some(&model()), "the job's model identity, fixed by its first generation");
    let ledger: Ledger = serde_json::from_value(m.data["ledger"].clone()).unwrap();
    assert_eq!(ledger.committed_through(), Some(2), "the ledger as of the commit");
    // A node that joins later does not change the schedule.
    sim.join("c", 1);
    sim.step_all();
    sim.check_in_all();
    assert_eq!(sim.m.world(), 3);
    assert_eq!(sim.m.total_steps(), Some(20));
}

/// Rank 0 hears that its last step ends the job as soon as it reports it, and may write and
/// report the final weights before the other ranks have reported that step. Refusing the
/// report then left the job waiting forever (rank 0 had nothing more to do); the weights
/// are kept and the job ends once the last step is committed.
#[test]
fn final_weights_reported_before_the_last_step_is_committed_end_the_job_once_it_is() {
    let mut c = CoordConfig::new(2, 2);
    c.max_steps = Some(3);
    let mut sim = running(c, vec![100], &["a", "b"]);
    sim.step_all();
    sim.step_all();
    let slots = sim.slots();
    let last = sim.step(&slots[0]);
    assert_eq!((last.stop_after, last.job_ends), (Some(2), true), "rank 0 learns that step 2 is the last");
    let g = sim.m.generation();
    assert_eq!(sim.m.final_weights(sim.t(), g, 1, Ok("x".into())).unwrap_err(), Refusal::NotFinishing { generation: g, rank: 1 }, "only rank 0 writes them");
    sim.m.final_weights(sim.t(), g, 0, Ok("out/final.safetensors".into())).unwrap();
    assert!(matches!(sim.m.phase(), Phase::Running { .. }), "step 2 is not committed yet");
    let round_tripped = round_trip(&sim.m);
    for m in [&mut sim.m, &mut round_tripped.clone()] {
        m.step_done(Millis(SEC), g, 1, 2, 2.0, 1e-3).unwrap();
        assert_eq!(*m.phase(), Phase::Finished);
        assert_eq!(m.summary().final_weights.as_deref(), Some("out/final.safetensors"));
        assert_eq!(m.ledger().steps_committed(), 3);
        m.check_exactly_once().unwrap();
    }
}

/// The step counts that replace scanning every rank answer what the scans answered, through
/// any order of reports, and the saved form stays the plain per-rank list.
#[test]
fn reports_answer_what_a_scan_of_every_rank_answers() {
    let world = 7;
    let mut reports = Reports::none(world);
    let mut plain: Vec<Option<u64>> = vec![None; world];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let rank = (seed >> 33) as usize % world;
        // A rank reports its next step, as the machine allows.
        let step = plain[rank].map_or(10, |s| s + 1);
        reports.set(rank, step);
        plain[rank] = Some(step);
        assert_eq!(reports.all_through(), plain.iter().min().copied().flatten());
        assert_eq!(reports.highest(), plain.iter().flatten().max().copied());
        let top = plain.iter().flatten().max().copied();
        assert_eq!(reports.all_at(top), plain.iter().all(|&r| r == top));
        assert_eq!(reports.all_at(None), plain.iter().all(Option::is_none));
        assert!((0..world).all(|r| reports.get(r) == plain[r]));
    }
    let saved = serde_json::to_string(&reports).unwrap();
    assert_eq!(saved, serde_json::to_string(&plain).unwrap());
    assert_eq!(serde_json::from_str::<Reports>(&saved).unwrap(), reports);
    assert!(Reports::none(3).all_at(None) && !Reports::none(3).all_at(Some(0)));
}
