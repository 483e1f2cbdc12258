//! The `train` section of a run config.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the data (upstream: 3-6).
    #[serde(default = "one")]
    pub epochs: u64,
    /// Stop after this many optimizer steps (and schedule the LR over them) instead of
    /// `epochs` full passes.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Peak learning rate (upstream: 1e-5).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Fraction of the steps spent in linear warmup (upstream: 1%).
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    /// AdamW weight decay on cross-attention weights (upstream: 0.1).
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Global-norm gradient clipping (upstream: 1.0); 0 disables.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Micro-batches per optimizer step (per rank, in a distributed job's first
    /// generation, unless `global_batch` is given).
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// Distributed jobs: samples every optimizer step trains on, whatever the number of
    /// ranks (a multiple of `data.batch_size`). Default: `batch_size x grad_accum x` the
    /// first generation's world. A node lost or joined changes how the step's batches are
    /// split over the ranks, never the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch: Option<u64>,
    /// Seed for random initialisation (presets).
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// `f32`, or `bf16` (frozen weights + autocast on CUDA; masters stay f32).
    #[serde(default)]
    pub dtype: Precision,
    /// Run directory: metrics.jsonl, state/, final_weights.safetensors. Relative to the
    /// YAML file.
    pub out_dir: PathBuf,
    /// Save a checkpoint every this many optimizer steps (and at the end).
    #[serde(default = "default_save")]
    pub save_every: u64,
    /// Committed checkpoints kept (older ones are deleted in the background; the step being
    /// resumed from is never deleted).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// libtorch's intra-op threads per process. Default: `OMP_NUM_THREADS` if set, else
    /// the usable cores (affinity, cgroup quota) divided among the ranks sharing the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// `none`, `decoder_layers` (each LLaMA decoder layer, with its cross-attention block,
    /// runs again in backward instead of keeping its activations) or `all` (the perceiver's
    /// layers too). The frozen CLIP encoder runs without autograd and keeps nothing either
    /// way.
    #[serde(default, skip_serializing_if = "ActivationCheckpointing::is_none")]
    pub activation_checkpointing: ActivationCheckpointing,
    /// Distributed jobs: each rank keeps AdamW's moments for only its 1/world part of the
    /// trainable parameters (ZeRO-1): gradients are reduce-scattered, each rank updates its
    /// part, the parameters are all-gathered. The same optimization as without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optimizer_sharding: bool,
}

fn default_keep() -> usize {
    2
}

fn one() -> u64 {
    1
}
fn default_lr() -> f64 {
    1e-5
}
fn default_warmup() -> f64 {
    0.01
}
fn default_wd() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn default_save() -> u64 {
    100
}

/// Where a process computes: `cpu`, `cuda` (GPU 0) or `cuda:N`. Parsed once, where the
/// config or the command line is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("unknown device `{s}` (cpu, cuda, cuda:N)")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Precision of frozen weights and of compute: `f32`, or `bf16` (on CUDA: bf16 frozen
/// weights and autocast; trainable master weights stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype `{s}` (f32, bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// Which model segments recompute their activations in backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationCheckpointing {
    #[default]
    None,
    DecoderLayers,
    All,
}

impl ActivationCheckpointing {
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }

    /// Whether each decoder layer (with its cross-attention block) is checkpointed.
    pub fn decoder_layers(self) -> bool {
        self != Self::None
    }

    /// Whether each perceiver layer is checkpointed.
    pub fn perceiver_layers(self) -> bool {
        self == Self::All
    }
}

impl std::str::FromStr for ActivationCheckpointing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "decoder_layers" => Ok(Self::DecoderLayers),
            "all" => Ok(Self::All),
            _ => Err(format!("unknown activation_checkpointing `{s}` (none, decoder_layers, all)")),
        }
    }
}

impl std::fmt::Display for ActivationCheckpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::DecoderLayers => "decoder_layers",
            Self::All => "all",
        })
    }
}

/// Serde as the text form (`cpu`, `cuda:1`, `bf16`), with the parse error as the message.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(DeviceSpec);
serde_as_text!(Precision);
serde_as_text!(ActivationCheckpointing);

impl TrainConfig {
    pub fn validate(&mut self, base: &std::path::Path) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if self.epochs == 0 {
            return err("train.epochs", "must be positive".into());
        }
        if self.max_steps == Some(0) {
            return err("train.max_steps", "must be positive when given".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return err("train.lr", format!("{} must be a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return err("train.warmup_ratio", format!("{} must be in [0, 1)", self.warmup_ratio));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return err("train.weight_decay", format!("{} must be >= 0", self.weight_decay));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return err("train.clip", format!("{} must be >= 0", self.clip));
        }
        if self.grad_accum == 0 {
            return err("train.grad_accum", "must be positive".into());
        }
        if self.save_every == 0 {
            return err("train.save_every", "must be positive".into());
        }
        if self.out_dir.is_relative() {
            self.out_dir = base.join(&self.out_dir);
        }
        Ok(())
    }
}
