//! Run configuration (`configs/*.yaml`): one typed tree, validated once at load, every
//! error naming the file and the field. Sections grow with the system (data, train,
//! comm, ckpt, coord, telemetry); each component receives only its own section.

use crate::model::config::{ConfigError, OtterConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Required by commands that build a model; data-only configs may omit it.
    #[serde(default)]
    pub model: ModelSection,
    /// MIMIC-IT data (see `data::DataConfig`); paths relative to the YAML file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataConfig>,
    /// Optimization and run settings (see `train::config::TrainConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<crate::train::config::TrainConfig>,
    /// Distributed jobs: rendezvous and liveness settings (`otter-coord start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coord: Option<CoordSection>,
    /// Collective settings of distributed jobs.
    #[serde(default)]
    pub comm: CommSection,
}

/// The `coord:` section. The data-related limits of the coordinator (epochs, max_steps,
/// gradient accumulation) come from `train:`, never from here. Two types, one default per
/// setting: this is what a user writes (with the shell's own settings: TLS, heartbeats,
/// stragglers, reconnection); [`crate::coord::CoordConfig`] is the machine's, made from
/// this and `train:` ([`CoordSection::machine_config`]) and saved in its state. The
/// settings both have take their defaults from `coord::config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordSection {
    /// Fewest nodes the job runs with (first rendezvous waits for them; fewer fails the job).
    pub min_nodes: usize,
    /// Most nodes: the first rendezvous completes at once when this many have joined.
    pub max_nodes: usize,
    /// How long the first nodes may take to reach min_nodes, and a member rank to check in.
    #[serde(with = "crate::coord::duration", default = "crate::coord::default_join_timeout")]
    pub join_timeout: std::time::Duration,
    /// With min_nodes joined, wait this long after the last join for more.
    #[serde(with = "crate::coord::duration", default = "crate::coord::default_last_call")]
    pub last_call: std::time::Duration,
    /// Workers send a heartbeat this often.
    #[serde(with = "crate::coord::duration", default = "d1")]
    pub heartbeat_interval: std::time::Duration,
    /// A node not heard from for this long is lost (a worker process that dies is noticed
    /// at once through its closed watch stream; this covers hangs and partitions).
    #[serde(with = "crate::coord::duration", default = "crate::coord::config::default_heartbeat_timeout")]
    pub heartbeat_timeout: std::time::Duration,
    /// Steps of data leases a rank holds ahead.
    #[serde(default = "crate::coord::config::default_lease_ahead")]
    pub lease_ahead_steps: u64,
    /// Serve the API over TLS (rustls) with this PEM certificate chain and key. Workers
    /// then need `OTTER_TLS_CA` (the CA's PEM) to verify it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// A rank whose compute time (its step minus the all-reduce wait) exceeds the median
    /// rank's by this factor ...
    #[serde(default = "straggler_factor")]
    pub straggler_factor: f64,
    /// ... for this many consecutive steps is flagged as a straggler (metric and log).
    #[serde(default = "straggler_steps")]
    pub straggler_steps: u32,
    /// A node left out because it and another node could not reach each other (the
    /// partition rule in the README) stays out this long, doubling per repeat (at most 16x).
    #[serde(with = "crate::coord::duration", default = "crate::coord::config::default_exclusion_backoff")]
    pub exclusion_backoff: std::time::Duration,
    /// Generations in a row that fail without committing a step before the job fails.
    #[serde(default = "crate::coord::config::default_max_failed_generations")]
    pub max_failed_generations: u32,
    /// Checkpoint saves failing in a row (a full disk) before the job is marked degraded.
    #[serde(default = "crate::coord::config::default_max_failed_saves")]
    pub max_failed_saves: u32,
    /// How long workers keep trying the coordinator's addresses when none answers (a
    /// restart, an HA failover: the lease TTL of 3 s plus the election) before a rank
    /// leaves the job, naming the addresses. A refusal by the coordinator ends a rank at once.
    #[serde(with = "crate::coord::duration", default = "d60")]
    pub reconnect_timeout: std::time::Duration,
}



fn straggler_factor() -> f64 {
    1.5
}
fn straggler_steps() -> u32 {
    5
}

fn d1() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}
fn d10() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn d60() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
fn bucket_mb() -> f64 {
    25.0
}

/// The `comm:` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommSection {
    /// A collective fails (instead of hanging) after waiting this long for a peer. It must
    /// exceed the step-time skew between ranks (a slow peer is not a dead one); a peer that
    /// dies is noticed at once through its closed connections, not through this timeout.
    #[serde(with = "crate::coord::duration", default = "d60")]
    pub timeout: std::time::Duration,
    /// Forming a generation's group (every peer connected and introduced) has its own,
    /// shorter deadline: peers start together right after the rendezvous.
    #[serde(with = "crate::coord::duration", default = "d30")]
    pub connect_timeout: std::time::Duration,
    /// A peer host that answers nothing at all for this long (no TCP acknowledgements, no
    /// answers to keepalive probes: a partition, a dead host) fails the collective at once,
    /// naming the peer, instead of after `timeout`. A slow peer still answers, so this
    /// can be far below the step-time skew.
    #[serde(with = "crate::coord::duration", default = "d10")]
    pub peer_timeout: std::time::Duration,
    /// Gradient bucket size in MiB (DDP's default: 25).
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f64,
    /// All-reduce each gradient bucket as soon as backward has finished it, on a
    /// communication thread, while backward goes on (DDP's overlap); `false`: after
    /// backward. The gradients are the same bits either way.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Which collectives a distributed job's ranks use: `auto` (NCCL on CUDA, the ring on
    /// CPUs), `nccl` (CUDA ranks only), or `ring` (our TCP ring on any device; on CUDA it
    /// stages each collective through host memory, slower than NCCL but it lets several
    /// ranks share one GPU, which NCCL refuses: how multi-rank GPU code is checked on a
    /// one-GPU machine).
    #[serde(default)]
    pub backend: CommBackend,
    /// The deterministic reduction (issue 46): a step's gradients and loss are summed
    /// exactly (as integers on a fixed grid) over its micro-batches and rounded once, so the
    /// parameters after each step are the same bits at any world size, however the
    /// micro-batches are spread over ranks, with or without overlap and for any bucket
    /// size. Needs `train.cpu_threads` on CPUs (libtorch's kernels give other bits with
    /// another thread count), the ring on CUDA (`comm.backend: ring`), and no optimizer
    /// sharding yet. Off by default until its cost is measured (BENCHMARKS.md).
    #[serde(default)]
    pub deterministic: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommBackend {
    #[default]
    Auto,
    Nccl,
    Ring,
}

fn yes() -> bool {
    true
}

impl Default for CommSection {
    fn default() -> Self {
        Self { timeout: d60(), connect_timeout: d30(), peer_timeout: d10(), bucket_mb: bucket_mb(), overlap: true, backend: CommBackend::Auto, deterministic: false }
    }
}

fn d30() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl CoordSection {
    pub fn straggler_config(&self) -> crate::coord::straggler::StragglerConfig {
        crate::coord::straggler::StragglerConfig { factor: self.straggler_factor, consecutive: self.straggler_steps }
    }

    /// The coordinator state machine's config: this section plus `train:`'s limits.
    /// `batch_size`: the data's (`global_batch` counts samples; the machine counts batches).
    pub fn machine_config(&self, train: &crate::train::config::TrainConfig, batch_size: u64) -> crate::coord::CoordConfig {
        crate::coord::CoordConfig {
            min_nodes: self.min_nodes,
            max_nodes: self.max_nodes,
            join_timeout: self.join_timeout,
            last_call: self.last_call,
            heartbeat_timeout: self.heartbeat_timeout,
            batches_per_rank_step: train.grad_accum,
            global_batches: train.global_batch.map(|g| g / batch_size.max(1)),
            lease_ahead_steps: self.lease_ahead_steps,
            max_steps: train.max_steps,
            epochs: train.epochs,
            exclusion_backoff: self.exclusion_backoff,
            max_failed_generations: self.max_failed_generations,
            keep_checkpoints: train.keep_last.max(1),
            max_failed_saves: self.max_failed_saves,
        }
    }
}

/// Which model to build: exactly one of a built-in preset or an HF model directory.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny` or `otter_llama7b` (architecture only: weights are random unless `dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Directory with `config.json`, safetensors weights and optionally `tokenizer.json`.
    /// Relative paths are relative to the YAML file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// A model source after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Preset(String),
    Dir(PathBuf),
}

impl ModelSource {
    pub fn config(&self) -> Result<OtterConfig, ConfigError> {
        match self {
            ModelSource::Preset(name) => OtterConfig::preset(name),
            ModelSource::Dir(dir) => OtterConfig::from_model_dir(dir),
        }
    }

    /// Interprets a command-line `--config` value: a run YAML, a model directory, an HF
    /// `config.json`, or a preset name.
    pub fn from_arg(arg: &str) -> Result<Self, ConfigError> {
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => RunConfig::from_file(path)?.model_source(path),
            Some("json") => Ok(ModelSource::Dir(path.parent().unwrap_or(Path::new(".")).to_path_buf())),
            _ if path.exists() => Err(ConfigError::Invalid {
                origin: arg.to_string(),
                field: "--config".into(),
                message: "expected a .yaml run config, a model directory, a config.json or a preset name".into(),
            }),
            _ => OtterConfig::preset(arg).map(|_| ModelSource::Preset(arg.to_string())),
        }
    }
}

impl RunConfig {
    /// The identity of the model this config trains (`model::identity`): its frozen
    /// weights, config and the data's tokenizer. `yaml_path` resolves a relative model dir.
    pub fn model_identity(
        &self,
        yaml_path: &Path,
    ) -> anyhow::Result<(crate::model::identity::ModelIdentity, crate::model::identity::ComputeStats)> {
        use crate::model::identity::{compute, Source};
        let data = self.data.as_ref().ok_or_else(|| anyhow::anyhow!("{}: no `data` section (its tokenizer is part of the model's identity)", yaml_path.display()))?;
        let source = self.model_source(yaml_path)?;
        let src = match &source {
            ModelSource::Dir(d) => Source::Dir(d),
            ModelSource::Preset(p) => Source::Preset(p),
        };
        Ok(compute(src, &data.tokenizer)?)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        let cfg: RunConfig = serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        let mut cfg = cfg;
        if cfg.model.preset.is_some() || cfg.model.dir.is_some() {
            cfg.model_source(path)?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        // Absolute, so the resolved config means the same from any working directory
        // (the coordinator ships it to workers as text).
        let base_abs = std::path::absolute(if base.as_os_str().is_empty() { Path::new(".") } else { base }).unwrap_or_else(|_| base.to_path_buf());
        let base = base_abs.as_path();
        let invalid = |(field, message): (String, String)| ConfigError::Invalid {
            origin: path.display().to_string(),
            field,
            message,
        };
        if let Some(data) = &mut cfg.data {
            data.validate(base).map_err(invalid)?;
        }
        if let Some(train) = &mut cfg.train {
            train.validate(base).map_err(invalid)?;
        }
        if let Some(coord) = &cfg.coord {
            let train = cfg.train.as_ref().ok_or_else(|| invalid(("train".into(), "a job with `coord:` needs a `train:` section".into())))?;
            let batch_size = cfg.data.as_ref().map_or(1, |d| d.batch_size as u64);
            if let Some(g) = train.global_batch {
                if g == 0 || g % batch_size != 0 {
                    return Err(invalid(("train.global_batch".into(), format!("{g} samples: must be a positive multiple of data.batch_size {batch_size}"))));
                }
            }
            coord.machine_config(train, batch_size).validate().map_err(|e| invalid((format!("coord.{}", e.field), e.message)))?;
            if coord.tls_cert.is_some() != coord.tls_key.is_some() {
                return Err(invalid(("coord.tls_key".into(), "give both tls_cert and tls_key, or neither".into())));
            }
            for (field, p) in [("coord.tls_cert", &coord.tls_cert), ("coord.tls_key", &coord.tls_key)] {
                if let Some(p) = p {
                    let abs = if p.is_absolute() { p.clone() } else { base.join(p) };
                    if !abs.is_file() {
                        return Err(invalid((field.into(), format!("{} is not a file", abs.display()))));
                    }
                }
            }
            if coord.heartbeat_interval >= coord.heartbeat_timeout {
                return Err(invalid(("coord.heartbeat_interval".into(), "must be shorter than coord.heartbeat_timeout".into())));
            }
        }
        if !(cfg.comm.bucket_mb > 0.0) {
            return Err(invalid(("comm.bucket_mb".into(), format!("must be positive, got {}", cfg.comm.bucket_mb))));
        }
        if cfg.comm.backend == CommBackend::Nccl && cfg.train.as_ref().is_some_and(|t| !matches!(t.device, crate::train::config::DeviceSpec::Cuda(_))) {
            return Err(invalid(("comm.backend".into(), "nccl needs `train.device: cuda` (CPU ranks use the ring: write `auto` or `ring`)".into())));
        }
        if cfg.comm.deterministic {
            if let Some(train) = &cfg.train {
                let cuda = matches!(train.device, crate::train::config::DeviceSpec::Cuda(_));
                if train.optimizer_sharding {
                    return Err(invalid(("comm.deterministic".into(), "does not shard the optimizer state yet: set train.optimizer_sharding: false".into())));
                }
                if !cuda && train.cpu_threads.is_none() {
                    return Err(invalid((
                        "train.cpu_threads".into(),
                        "comm.deterministic needs the job's intra-op thread count fixed (libtorch's CPU kernels give other bits with another count, and the default follows how many ranks share a host)".into(),
                    )));
                }
                if cuda && cfg.comm.backend != CommBackend::Ring {
                    return Err(invalid(("comm.backend".into(), "comm.deterministic on CUDA needs `ring` for now (its exact i64 sum is not wired to NCCL yet)".into())));
                }
            }
        }
        if cfg.comm.timeout.is_zero() {
            return Err(invalid(("comm.timeout".into(), "must be positive".into())));
        }
        // Ship-ready: every path absolute, so the YAML text means the same on any worker.
        if let Some(dir) = &cfg.model.dir {
            if dir.is_relative() {
                cfg.model.dir = Some(base.join(dir));
            }
        }
        Ok(cfg)
    }

    /// Validates the `model` section; relative dirs are taken from `yaml_path`'s folder.
    pub fn model_source(&self, yaml_path: &Path) -> Result<ModelSource, ConfigError> {
        let invalid = |message: &str| ConfigError::Invalid {
            origin: yaml_path.display().to_string(),
            field: "model".into(),
            message: message.into(),
        };
        match (&self.model.preset, &self.model.dir) {
            (Some(p), None) => {
                OtterConfig::preset(p).map_err(|e| ConfigError::Invalid {
                    origin: yaml_path.display().to_string(),
                    field: "model.preset".into(),
                    message: e.to_string(),
                })?;
                Ok(ModelSource::Preset(p.clone()))
            }
            (None, Some(d)) => {
                let base = yaml_path.parent().unwrap_or(Path::new("."));
                Ok(ModelSource::Dir(if d.is_absolute() { d.clone() } else { base.join(d) }))
            }
            (Some(_), Some(_)) => Err(invalid("give either `preset` or `dir`, not both")),
            (None, None) => Err(invalid("give `preset` (tiny, otter_llama7b) or `dir`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("run.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn preset_and_relative_dir_resolve() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "model:\n  preset: tiny\n");
        assert_eq!(ModelSource::from_arg(p.to_str().unwrap()).unwrap(), ModelSource::Preset("tiny".into()));
        let p = write(d.path(), "model:\n  dir: weights/tiny\n");
        assert_eq!(ModelSource::from_arg(p.to_str().unwrap()).unwrap(), ModelSource::Dir(d.path().join("weights/tiny")));
    }

    #[test]
    fn bad_yaml_names_the_field() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "model:\n  preset: tiny\n  layers: 3\n");
        let e = RunConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("model") && e.contains("layers"), "{e}");
        let p = write(d.path(), "model:\n  preset: huge\n");
        let e = RunConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("model.preset") && e.contains("huge"), "{e}");
        let p = write(d.path(), "model: {}\n");
        let cfg = RunConfig::from_file(&p).unwrap();
        assert!(cfg.model_source(&p).unwrap_err().to_string().contains("`model`"));
    }

    #[test]
    fn a_job_yaml_and_the_machine_share_one_default_for_each_timing() {
        let section: CoordSection = serde_yaml_ng::from_str("min_nodes: 2\nmax_nodes: 4\n").unwrap();
        let train: crate::train::config::TrainConfig = serde_yaml_ng::from_str("out_dir: /tmp/x\n").unwrap();
        let (from_yaml, machine) = (section.machine_config(&train, 2), crate::coord::CoordConfig::new(2, 4));
        assert_eq!((from_yaml.last_call, from_yaml.join_timeout), (machine.last_call, machine.join_timeout));
        assert_eq!((from_yaml.heartbeat_timeout, from_yaml.exclusion_backoff), (machine.heartbeat_timeout, machine.exclusion_backoff));
        assert_eq!(
            (from_yaml.lease_ahead_steps, from_yaml.max_failed_generations, from_yaml.max_failed_saves),
            (machine.lease_ahead_steps, machine.max_failed_generations, machine.max_failed_saves)
        );
    }

    #[test]
    fn the_global_batch_counts_samples_and_must_fill_whole_batches() {
        let d = tempfile::tempdir().unwrap();
        let job = |g: u64| {
            format!(
                "data:\n  tokenizer: t.json\n  batch_size: 4\n  datasets:\n    - {{name: T, group: TEXT_ONLY, instructions: t.json}}\ntrain:\n  out_dir: out\n  global_batch: {g}\ncoord:\n  min_nodes: 1\n  max_nodes: 2\n"
            )
        };
        let p = write(d.path(), &job(10));
        let e = RunConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("train.global_batch") && e.contains("multiple of data.batch_size 4"), "{e}");
        let p = write(d.path(), &job(12));
        let cfg = RunConfig::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
        let m = cfg.coord.as_ref().unwrap().machine_config(cfg.train.as_ref().unwrap(), 4);
        assert_eq!(m.global_batches, Some(3), "12 samples = 3 batches of 4");
    }

    #[test]
    fn the_collective_backend_is_auto_by_default_and_nccl_needs_cuda() {
        let d = tempfile::tempdir().unwrap();
        let job = |device: &str, backend: &str| format!("train:\n  out_dir: out\n  device: {device}\n{backend}");
        let cfg = RunConfig::from_file(&write(d.path(), &job("cpu", ""))).unwrap();
        assert_eq!(cfg.comm.backend, CommBackend::Auto);
        let e = RunConfig::from_file(&write(d.path(), &job("cpu", "comm:\n  backend: nccl\n"))).unwrap_err().to_string();
        assert!(e.contains("comm.backend") && e.contains("nccl needs `train.device: cuda`"), "{e}");
        let cfg = RunConfig::from_file(&write(d.path(), &job("cuda", "comm:\n  backend: ring\n"))).unwrap();
        assert_eq!(cfg.comm.backend, CommBackend::Ring, "ranks sharing one GPU over the ring");
        let e = RunConfig::from_file(&write(d.path(), &job("cpu", "comm:\n  backend: gloo\n"))).unwrap_err().to_string();
        assert!(e.contains("comm.backend") && e.contains("gloo"), "{e}");
    }

    #[test]
    fn the_deterministic_reduction_is_off_by_default_and_needs_a_fixed_thread_count_and_no_sharding() {
        let d = tempfile::tempdir().unwrap();
        let job = |train: &str, comm: &str| format!("train:\n  out_dir: out\n{train}comm:\n  deterministic: true\n{comm}");
        let cfg = RunConfig::from_file(&write(d.path(), "train:\n  out_dir: out\n")).unwrap();
        assert!(!cfg.comm.deterministic);
        let e = RunConfig::from_file(&write(d.path(), &job("", ""))).unwrap_err().to_string();
        assert!(e.contains("train.cpu_threads") && e.contains("thread count"), "{e}");
        let cfg = RunConfig::from_file(&write(d.path(), &job("  cpu_threads: 2\n", ""))).unwrap();
        assert!(cfg.comm.deterministic);
        let e = RunConfig::from_file(&write(d.path(), &job("  cpu_threads: 2\n  optimizer_sharding: true\n", ""))).unwrap_err().to_string();
        assert!(e.contains("comm.deterministic") && e.contains("optimizer_sharding"), "{e}");
        let e = RunConfig::from_file(&write(d.path(), &job("  device: cuda\n", ""))).unwrap_err().to_string();
        assert!(e.contains("comm.backend") && e.contains("ring"), "{e}");
        assert!(RunConfig::from_file(&write(d.path(), &job("  device: cuda\n", "  backend: ring\n"))).is_ok());
    }
}
