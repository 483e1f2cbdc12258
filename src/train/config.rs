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
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// Seed for random initialisation (presets).
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32`, or `bf16` (frozen weights + autocast on CUDA; masters stay f32).
    #[serde(default = "default_dtype")]
    pub dtype: String,
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
fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_save() -> u64 {
    100
}

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
        for (f, v, ok) in [
            ("train.device", &self.device, self.device == "cpu" || self.device.starts_with("cuda")),
            ("train.dtype", &self.dtype, self.dtype == "f32" || self.dtype == "bf16"),
        ] {
            if !ok {
                return err(f, format!("`{v}` is not supported"));
            }
        }
        if self.out_dir.is_relative() {
            self.out_dir = base.join(&self.out_dir);
        }
        Ok(())
    }
}
