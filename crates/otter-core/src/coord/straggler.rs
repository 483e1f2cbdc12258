//! Straggler detection, pure: a rank whose compute time (its step minus the time it
//! waited in the all-reduce: the slow rank makes everyone else wait there, so total step
//! times are all alike) exceeds the median of its generation's ranks by `factor` for
//! `consecutive` steps in a row is flagged; it is unflagged after one step within the
//! factor.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StragglerConfig {
    pub factor: f64,
    pub consecutive: u32,
}

impl Default for StragglerConfig {
    fn default() -> Self {
        Self { factor: 1.5, consecutive: 5 }
    }
}

/// A change in a rank's straggler flag.
#[derive(Debug, Clone, PartialEq)]
pub enum Flag {
    Raised { rank: usize, step: u64, seconds: f64, median: f64 },
    Cleared { rank: usize, step: u64 },
}

#[derive(Debug, Clone, Default)]
pub struct Detector {
    cfg: StragglerConfig,
    generation: u64,
    world: usize,
    /// step -> per-rank compute seconds reported so far.
    pending: BTreeMap<u64, Vec<Option<f64>>>,
    streak: Vec<u32>,
    flagged: Vec<bool>,
    /// Last compute time by rank.
    pub last: Vec<Option<f64>>,
}

impl Detector {
    pub fn new(cfg: StragglerConfig) -> Self {
        Self { cfg, ..Default::default() }
    }

    pub fn flagged(&self) -> &[bool] {
        &self.flagged
    }

    /// Rank `rank` of `generation` (of `world` ranks) spent `seconds` computing `step`.
    pub fn observe(&mut self, generation: u64, world: usize, rank: usize, step: u64, seconds: f64) -> Vec<Flag> {
        if generation != self.generation || world != self.world {
            *self = Self { cfg: self.cfg, generation, world, streak: vec![0; world], flagged: vec![false; world], last: vec![None; world], pending: BTreeMap::new() };
        }
        if rank >= world || !seconds.is_finite() {
            return Vec::new();
        }
        self.last[rank] = Some(seconds);
        let row = self.pending.entry(step).or_insert_with(|| vec![None; world]);
        row[rank] = Some(seconds);
        if row.iter().any(Option::is_none) {
            // Steps older than one still incomplete will never complete (a rank died).
            while self.pending.len() > 4 {
                self.pending.pop_first();
            }
            return Vec::new();
        }
        let times: Vec<f64> = self.pending.remove(&step).expect("present").into_iter().flatten().collect();
        self.pending.retain(|&s, _| s > step);
        if world < 2 {
            return Vec::new();
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if world % 2 == 1 { sorted[world / 2] } else { (sorted[world / 2 - 1] + sorted[world / 2]) / 2.0 };
        let mut flags = Vec::new();
        for (r, &t) in times.iter().enumerate() {
            if median > 0.0 && t > self.cfg.factor * median {
                self.streak[r] += 1;
                if self.streak[r] >= self.cfg.consecutive && !self.flagged[r] {
                    self.flagged[r] = true;
                    flags.push(Flag::Raised { rank: r, step, seconds: t, median });
                }
            } else {
                self.streak[r] = 0;
                if self.flagged[r] {
                    self.flagged[r] = false;
                    flags.push(Flag::Cleared { rank: r, step });
                }
            }
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(d: &mut Detector, step: u64, times: &[f64]) -> Vec<Flag> {
        times.iter().enumerate().flat_map(|(r, &t)| d.observe(1, times.len(), r, step, t)).collect()
    }

    #[test]
    fn a_rank_slower_than_factor_times_the_median_for_k_steps_is_flagged_then_cleared() {
        let mut d = Detector::new(StragglerConfig { factor: 1.5, consecutive: 3 });
        assert!(run(&mut d, 0, &[1.0, 1.0, 2.0, 1.1]).is_empty());
        assert!(run(&mut d, 1, &[1.0, 1.0, 2.0, 1.1]).is_empty(), "2 steps are not 3");
        let f = run(&mut d, 2, &[1.0, 1.0, 2.0, 1.1]);
        assert!(matches!(f.as_slice(), [Flag::Raised { rank: 2, step: 2, .. }]), "{f:?}");
        assert_eq!(d.flagged(), &[false, false, true, false]);
        assert!(run(&mut d, 3, &[1.0, 1.0, 2.0, 1.1]).is_empty(), "raised once");
        let f = run(&mut d, 4, &[1.0, 1.0, 1.2, 1.1]);
        assert_eq!(f, vec![Flag::Cleared { rank: 2, step: 4 }]);
    }

    #[test]
    fn a_streak_is_broken_by_one_normal_step_and_a_new_generation_starts_over() {
        let mut d = Detector::new(StragglerConfig { factor: 1.5, consecutive: 2 });
        run(&mut d, 0, &[1.0, 3.0, 1.0]);
        run(&mut d, 1, &[1.0, 1.0, 1.0]);
        assert!(run(&mut d, 2, &[1.0, 3.0, 1.0]).is_empty());
        // Generation 2: streaks reset.
        assert!(d.observe(2, 3, 1, 3, 3.0).is_empty());
        assert_eq!(d.flagged(), &[false, false, false]);
    }
}
