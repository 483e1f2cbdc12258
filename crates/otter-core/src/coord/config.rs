//! The coordinator's section of the job config (`coord:`), its defaults and validation;
//! the shell's clock (`Millis`); durations as text or seconds in YAML.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A point in time, in milliseconds, as given by the shell (see contract 1 in `coord/mod.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Time from `earlier` to `self`; zero if `earlier` is later (a clock that stepped
    /// back must not make anything expire early or panic).
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} s", self.0 as f64 / 1000.0)
    }
}

/// The most nodes a job may have (`coord.max_nodes`) and the most ranks (GPUs) per node:
/// the largest world is their product. The saved state's size grows with the world (the
/// members and their leases), never with the step count; the etcd store keeps every value
/// bounded whatever the world (see `etcd.rs`).
pub const MAX_NODES: usize = 4096;
pub const MAX_LOCAL_RANKS: u32 = 16;

/// The `coord:` section of a run config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordConfig {
    /// Fewest nodes the job runs with: the first rendezvous waits for them, and losing
    /// nodes below it fails the job.
    pub min_nodes: usize,
    /// Most nodes: the first rendezvous starts at once when this many joined; more joins
    /// are refused.
    pub max_nodes: usize,
    /// How long the first nodes may take to reach `min_nodes` (from the first join), and
    /// how long a member rank may take to check in to a rendezvous before its node is
    /// dropped.
    #[serde(with = "duration", default = "default_join_timeout")]
    pub join_timeout: Duration,
    /// With `min_nodes` joined, the first rendezvous waits this long after the last join
    /// for more nodes.
    #[serde(with = "duration", default = "default_last_call")]
    pub last_call: Duration,
    /// A node not heard from for this long is lost.
    #[serde(with = "duration", default = "default_heartbeat_timeout")]
    pub heartbeat_timeout: Duration,
    /// Data batches each rank consumes per optimizer step (its gradient accumulation) in
    /// the first generation, when `global_batches` is not given: a step then takes the
    /// first generation's world x this many, for the whole job.
    #[serde(default = "one")]
    pub batches_per_rank_step: u64,
    /// Data batches every optimizer step consumes, whatever the world (the job's global
    /// batch over the data's batch size): split over the ranks, unevenly when they do not
    /// divide it.
    #[serde(default)]
    pub global_batches: Option<u64>,
    /// How many steps of data leases each rank holds beyond the step it finished.
    #[serde(default = "default_lease_ahead")]
    pub lease_ahead_steps: u64,
    /// Stop after this many optimizer steps, if the data lasts that long.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Passes over the data.
    #[serde(default = "one")]
    pub epochs: u64,
    /// A node left out because a failed generation blamed it (two nodes that cannot reach
    /// each other: see the README's partition rule) stays out this long; each further
    /// exclusion of the same node doubles it, up to 16 times.
    #[serde(with = "duration", default = "default_exclusion_backoff")]
    pub exclusion_backoff: Duration,
    /// This many generations in a row that fail without committing a step end the job: a
    /// fault that regrouping cannot fix must not loop forever.
    #[serde(default = "default_max_failed_generations")]
    pub max_failed_generations: u32,
    /// Committed checkpoints kept (`train.keep_last`). Every step after the oldest kept one
    /// stays rollback-able, so an unreadable newest checkpoint falls back to an older one.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// This many checkpoint saves failing in a row (a full disk, an I/O error) mark the job
    /// degraded: it trains on, but an error is logged at every further failure and the
    /// status page says what the newest restorable state is.
    #[serde(default = "default_max_failed_saves")]
    pub max_failed_saves: u32,
}

fn one() -> u64 {
    1
}
/// The one default of `coord.join_timeout` (the job YAML's and the machine's).
pub fn default_join_timeout() -> Duration {
    Duration::from_secs(300)
}
/// The one default of `coord.last_call` (the job YAML's and the machine's).
pub fn default_last_call() -> Duration {
    Duration::from_secs(1)
}
// The defaults below are also the job YAML's (`run_config::CoordSection` names them): one
// default per setting.
pub fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn default_lease_ahead() -> u64 {
    4
}
pub fn default_exclusion_backoff() -> Duration {
    Duration::from_secs(60)
}
pub fn default_max_failed_generations() -> u32 {
    10
}
fn default_keep_checkpoints() -> usize {
    2
}
pub fn default_max_failed_saves() -> u32 {
    3
}

/// A config value that cannot work, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coord.{field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

impl CoordConfig {
    /// `min_nodes` to `max_nodes` nodes, every other setting its default (what a job YAML
    /// that names only those two gets).
    pub fn new(min_nodes: usize, max_nodes: usize) -> Self {
        Self {
            min_nodes,
            max_nodes,
            join_timeout: default_join_timeout(),
            last_call: default_last_call(),
            heartbeat_timeout: default_heartbeat_timeout(),
            batches_per_rank_step: 1,
            global_batches: None,
            lease_ahead_steps: default_lease_ahead(),
            max_steps: None,
            epochs: 1,
            exclusion_backoff: default_exclusion_backoff(),
            max_failed_generations: default_max_failed_generations(),
            keep_checkpoints: default_keep_checkpoints(),
            max_failed_saves: default_max_failed_saves(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, message: &str| Err(ConfigError { field, message: message.to_string() });
        if self.min_nodes == 0 {
            return err("min_nodes", "must be at least 1");
        }
        if self.max_nodes < self.min_nodes {
            return err("max_nodes", &format!("must be at least min_nodes ({})", self.min_nodes));
        }
        if self.max_nodes > MAX_NODES {
            return err("max_nodes", &format!("at most {MAX_NODES} nodes per job"));
        }
        for (field, d) in [
            ("join_timeout", self.join_timeout),
            ("last_call", self.last_call),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("exclusion_backoff", self.exclusion_backoff),
        ] {
            if d.is_zero() {
                return err(field, "must be positive");
            }
        }
        if self.global_batches == Some(0) {
            return err("global_batches", "must be at least 1");
        }
        if self.batches_per_rank_step == 0 {
            return err("batches_per_rank_step", "must be at least 1");
        }
        if self.lease_ahead_steps == 0 {
            return err("lease_ahead_steps", "must be at least 1 (a rank needs its next step's data)");
        }
        if self.max_steps == Some(0) {
            return err("max_steps", "must be positive when given");
        }
        if self.epochs == 0 {
            return err("epochs", "must be at least 1");
        }
        if self.max_failed_generations == 0 {
            return err("max_failed_generations", "must be at least 1");
        }
        if self.keep_checkpoints == 0 {
            return err("keep_checkpoints", "must be at least 1");
        }
        if self.max_failed_saves == 0 {
            return err("max_failed_saves", "must be at least 1");
        }
        Ok(())
    }
}

/// Serde for `Duration` as a human string (`"10s"`, `"1500ms"`, `"2m"`, `"1h"`, also
/// `us` and `ns`) or a plain number of seconds. Serializes to the largest exact unit.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(x) => {
                Duration::try_from_secs_f64(x).map_err(|e| serde::de::Error::custom(format!("{x}: {e}")))
            }
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    pub fn format(d: Duration) -> String {
        let ns = d.as_nanos();
        for (unit, per) in [
            ("h", 3_600_000_000_000u128),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
        ] {
            if ns % per == 0 && ns > 0 {
                return format!("{}{unit}", ns / per);
            }
        }
        format!("{ns}ns")
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        let nanos_per: u64 = match unit {
            "h" => 3_600_000_000_000,
            "m" | "min" => 60_000_000_000,
            "s" | "" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            _ => return Err(format!("{text:?}: unknown unit {unit:?} (use h, m, s, ms, us, ns)")),
        };
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(nanos_per).map(Duration::from_nanos).ok_or_else(|| format!("{text:?}: too long"));
        }
        let x: f64 = num.parse().map_err(|_| format!("{text:?}: expected a number and a unit, like 10s"))?;
        Duration::try_from_secs_f64(x * nanos_per as f64 / 1e9).map_err(|e| format!("{text:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CoordConfig {
        serde_yaml_ng::from_str("min_nodes: 2\nmax_nodes: 4\n").unwrap()
    }

    #[test]
    fn defaults_fill_in_and_validate() {
        let c = base();
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(10));
        assert_eq!(c.lease_ahead_steps, 4);
        assert_eq!((c.batches_per_rank_step, c.epochs, c.max_steps), (1, 1, None));
        c.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        type Break = fn(&mut CoordConfig);
        let cases: [(&str, Break); 14] = [
            ("min_nodes", |c| c.min_nodes = 0),
            ("max_nodes", |c| c.max_nodes = 1),
            ("max_nodes", |c| c.max_nodes = MAX_NODES + 1),
            ("join_timeout", |c| c.join_timeout = Duration::ZERO),
            ("last_call", |c| c.last_call = Duration::ZERO),
            ("heartbeat_timeout", |c| c.heartbeat_timeout = Duration::ZERO),
            ("batches_per_rank_step", |c| c.batches_per_rank_step = 0),
            ("lease_ahead_steps", |c| c.lease_ahead_steps = 0),
            ("max_steps", |c| c.max_steps = Some(0)),
            ("epochs", |c| c.epochs = 0),
            ("exclusion_backoff", |c| c.exclusion_backoff = Duration::ZERO),
            ("max_failed_generations", |c| c.max_failed_generations = 0),
            ("keep_checkpoints", |c| c.keep_checkpoints = 0),
            ("max_failed_saves", |c| c.max_failed_saves = 0),
        ];
        for (field, break_it) in cases {
            let mut c = base();
            break_it(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.to_string().starts_with(&format!("coord.{field}: ")), "{e}");
        }
    }

    #[test]
    fn durations_read_as_text_or_seconds_and_round_trip() {
        for (text, want) in [
            ("10s", Duration::from_secs(10)),
            ("1.5s", Duration::from_millis(1500)),
            ("1500ms", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("250us", Duration::from_micros(250)),
            ("3", Duration::from_secs(3)),
        ] {
            assert_eq!(duration::parse(text), Ok(want), "{text}");
            assert_eq!(duration::parse(&duration::format(want)), Ok(want));
        }
        assert!(duration::parse("10 parsecs").is_err());
        assert!(duration::parse("s").is_err());
        let c: CoordConfig =
            serde_yaml_ng::from_str("min_nodes: 1\nmax_nodes: 1\njoin_timeout: 2.5\nlast_call: 90s\n").unwrap();
        assert_eq!((c.join_timeout, c.last_call), (Duration::from_millis(2500), Duration::from_secs(90)));
        let back: CoordConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_yaml_ng::from_str::<CoordConfig>("min_nodes: 1\nmax_nodes: 1\nlast_call: -1\n").is_err());
    }

    #[test]
    fn time_never_runs_backwards() {
        assert_eq!(Millis(5).since(Millis(9)), Duration::ZERO);
        assert_eq!(Millis(1500).since(Millis(500)), Duration::from_secs(1));
    }
}
