//! What the coordinator observes but does not decide on: Prometheus metrics refreshed from
//! the machine's state after every change, straggler flags from per-rank step times, the
//! ETA, step timings and goodput ([`super::progress`]). Nothing here is persisted or feeds
//! back into a decision.

use super::server::{Coordinator, Persisted};

/// What the coordinator observes but does not decide on: metrics, straggler flags,
/// per-rank step times (not persisted).
pub struct Telemetry {
    pub stragglers: super::straggler::Detector,
    event_mark: u64,
    /// Blame reports counted into the metrics so far.
    blame_mark: u64,
    metrics_generation: u64,
    samples_per_batch: u64,
    /// (when, steps committed) at each change, the latest few (for the ETA).
    progress: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// Committed steps' timings, goodput, per-rank data wait, checkpoint sizes.
    pub steps: super::progress::Progress,
}

impl Telemetry {
    pub(super) fn new() -> Self {
        Self {
            stragglers: super::straggler::Detector::new(Default::default()),
            event_mark: 0,
            blame_mark: 0,
            metrics_generation: 0,
            samples_per_batch: 1,
            progress: Default::default(),
            steps: Default::default(),
        }
    }
}

impl Coordinator {
    /// Straggler thresholds and samples per data batch (for the samples metric).
    pub fn set_telemetry(&self, stragglers: super::straggler::StragglerConfig, samples_per_batch: u64) {
        let mut t = self.telemetry.lock().expect("not poisoned");
        t.stragglers = super::straggler::Detector::new(stragglers);
        t.samples_per_batch = samples_per_batch.max(1);
    }

    /// Brings the metrics up to date with the job state (after every change).
    pub(super) fn refresh_metrics(&self, s: &Persisted) {
        use crate::metrics::counter_to;
        use super::machine::EventKind;
        let m = &s.machine;
        let x = &self.metrics;
        let mut t = self.telemetry.lock().expect("not poisoned");
        x.generation.set(m.generation() as i64);
        x.members.set(m.members().len() as i64);
        x.world_size.set(m.world() as i64);
        let steps = m.ledger().steps_committed();
        x.committed_step.set(steps as i64);
        let progressed = t.progress.back().is_none_or(|&(_, n)| n != steps);
        if progressed {
            t.progress.push_back((std::time::Instant::now(), steps));
            if t.progress.len() > 64 {
                t.progress.pop_front();
            }
        }
        let (events, mark) = m.events_since(t.event_mark);
        // The job's clock (goodput) starts with its first generation; a coordinator resumed
        // into a running job starts it when it resumed.
        if let Some(e) = events.iter().find(|e| matches!(e.kind, EventKind::GenerationFormed)) {
            t.steps.start(e.at);
        } else if matches!(m.phase(), super::machine::Phase::Running { .. } | super::machine::Phase::Rendezvous { .. }) {
            t.steps.start(self.now());
        }
        if progressed {
            t.steps.committed(steps);
        }
        if let Some(e) = events.iter().find(|e| matches!(e.kind, EventKind::Finished | EventKind::Failed)) {
            t.steps.stop(e.at);
        }
        if let Some(g) = t.steps.goodput(self.now()) {
            x.goodput.set(g.ratio);
        }
        // The rest changes only with a committed step or a logged event: it is skipped on
        // the thousand StepDones of a step that change neither (each would cost O(nodes +
        // uncompacted steps), a step O(world x that)).
        if !progressed && events.is_empty() {
            return;
        }
        x.epoch.set(m.ledger().last_committed().map_or(0, |c| c.epoch) as i64);
        counter_to(&x.samples_committed, m.ledger().committed_batches() * t.samples_per_batch);
        let summary = m.summary();
        counter_to(&x.recoveries, summary.recoveries);
        if let Some(&n) = m.checkpoints().last() {
            x.checkpoint_last_step.set(n as i64);
        }
        for (kind, &n) in m.save_failures() {
            counter_to(&x.checkpoint_failures.with_label_values(&[kind]), n);
        }
        x.checkpoint_failed_in_a_row.set(i64::from(summary.failed_saves));
        x.degraded.set(i64::from(summary.degraded.is_some()));
        x.failed_generations.set(i64::from(summary.failed_generations));
        x.waiting_for_nodes.set(i64::from(summary.waiting.is_some()));
        x.excluded_nodes.set(summary.excluded.len() as i64);
        let (blame, total) = m.blame();
        let new = (total.saturating_sub(t.blame_mark) as usize).min(blame.len());
        for b in blame.iter().skip(blame.len() - new) {
            x.peer_failures.with_label_values(&[&b.reporter, &b.blamed]).inc();
        }
        t.blame_mark = total;
        t.event_mark = mark;
        for e in events {
            match e.kind {
                EventKind::NodeLost => x.node_failures.with_label_values(&["node_lost"]).inc(),
                EventKind::RankFailed => x.node_failures.with_label_values(&["rank_failed"]).inc(),
                EventKind::PeerUnreachable => x.node_failures.with_label_values(&["peer_unreachable"]).inc(),
                EventKind::CheckpointCommitted => x.checkpoints_committed.inc(),
                EventKind::RendezvousComplete => {
                    if let Some((d, recovery)) = m.last_rendezvous() {
                        x.rendezvous_duration.set(d.as_secs_f64());
                        x.rendezvous.observe(d.as_secs_f64());
                        if recovery {
                            x.recovery_duration.set(d.as_secs_f64());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Remaining time at the recent commit rate, as text for the status page.
    pub fn eta(&self, status: &serde_json::Value) -> String {
        let t = self.telemetry.lock().expect("not poisoned");
        let (Some(total), Some(&(t1, n1)), Some(&(t0, n0))) = (status["total_steps"].as_u64(), t.progress.back(), t.progress.front()) else {
            return "unknown".into();
        };
        if n1 >= total {
            return "done".into();
        }
        let secs = t1.duration_since(t0).as_secs_f64();
        if n1 <= n0 || secs <= 0.0 {
            return "unknown".into();
        }
        let left = (total - n1) as f64 * secs / (n1 - n0) as f64;
        format!("{:.0} s ({:.2} steps/s)", left, (n1 - n0) as f64 / secs)
    }

    /// A rank finished a step (its `StepDone` was accepted): its timing for the status
    /// views, the per-rank gauges and straggler detection.
    pub(super) fn observe_step(&self, generation: u64, world: usize, step: u64, r: &super::progress::StepReport) {
        self.telemetry.lock().expect("not poisoned").steps.reported(generation, world, step, r);
        self.observe_step_time(generation, world, r.rank, step, r.compute_seconds);
    }

    /// A rank's step timing: per-rank gauges and straggler detection (a log line when a
    /// rank is flagged or cleared).
    fn observe_step_time(&self, generation: u64, world: usize, rank: usize, step: u64, compute_seconds: f64) {
        use super::straggler::Flag;
        if !(compute_seconds > 0.0) {
            return;
        }
        let mut t = self.telemetry.lock().expect("not poisoned");
        let flags = t.stragglers.observe(generation, world, rank, step, compute_seconds);
        let x = &self.metrics;
        if t.metrics_generation != generation {
            // Ranks are renumbered each generation: drop the old ranks' series.
            t.metrics_generation = generation;
            x.rank_step_seconds.reset();
            x.rank_straggler.reset();
            for r in 0..world {
                x.rank_straggler.with_label_values(&[&r.to_string()]).set(0);
            }
        }
        x.rank_step_seconds.with_label_values(&[&rank.to_string()]).set(compute_seconds);
        for f in flags {
            match f {
                Flag::Raised { rank, step, seconds, median } => {
                    tracing::warn!("straggler: rank {rank} computed step {step} in {seconds:.3} s, the median rank in {median:.3} s");
                    x.rank_straggler.with_label_values(&[&rank.to_string()]).set(1);
                }
                Flag::Cleared { rank, step } => {
                    tracing::info!("straggler cleared: rank {rank} is back within the factor at step {step}");
                    x.rank_straggler.with_label_values(&[&rank.to_string()]).set(0);
                }
            }
        }
        x.stragglers.set(t.stragglers.flagged().iter().filter(|&&f| f).count() as i64);
    }
}
