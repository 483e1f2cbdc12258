//! The `data` section of a run config: which MIMIC-IT datasets, how samples are built,
//! batched, ordered and prefetched. Validated once at load.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Upstream's task groups; they decide the prompt layout and the (T, F) of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskGroup {
    /// One image, one turn: T = 1, F = 1.
    ImageText,
    /// In-context examples then the query, one image each along T: T = 1 + #examples.
    ImageTextInContext,
    /// One `<image>` over `video_frames` frames along F, several turns: T = 1, F = frames.
    VideoText,
    /// No image: a blank (T = 1, F = 1) image no token attends to.
    TextOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Drop the sample, count it by kind, summarize at the end (default).
    #[default]
    Skip,
    /// Stop with the sample's error.
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Short name used in errors and counts (e.g. `LA`).
    pub name: String,
    pub group: TaskGroup,
    /// `XX_instructions.json`.
    pub instructions: PathBuf,
    /// `XX.json` (id -> base64) or `XX.parquet` (index id, column `base64`). Not for TEXT_ONLY.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// `XX_train.json` (query -> in-context ids). Without it every instruction is a query
    /// with no in-context examples.
    #[serde(default)]
    pub train_config: Option<PathBuf>,
    /// Sampling weight: each epoch takes round(weight * #queries) samples of this dataset
    /// (below 1: a seeded subset; above 1: repeats). Default 1.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// HF `tokenizer.json`.
    pub tokenizer: PathBuf,
    pub datasets: Vec<DatasetConfig>,
    /// Square side images are resized to (224 for CLIP ViT-L/14).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Longer samples are dropped and counted (never cut: cutting could leave an
    /// `<image>` token without its image or an answer without its end).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Frames per VIDEO_TEXT sample (uniformly resampled).
    #[serde(default = "default_frames")]
    pub video_frames: usize,
    /// Samples per batch (per rank).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Batches per shard (the unit the coordinator leases to ranks).
    #[serde(default = "default_shard")]
    pub shard_batches: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub on_bad_sample: OnBadSample,
    /// Background threads decoding and preprocessing. Default: 2 for `otter train`; a rank
    /// of a distributed job takes its share of the host's usable cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Batches prepared ahead of the training thread.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_image_size() -> usize {
    224
}
fn default_max_seq_len() -> usize {
    2048
}
fn default_frames() -> usize {
    8
}
fn default_batch() -> usize {
    4
}
fn default_shard() -> usize {
    16
}
fn default_prefetch() -> usize {
    4
}

impl DataConfig {
    /// Checks values and resolves relative paths against `base` (the YAML's folder).
    pub fn validate(&mut self, base: &Path) -> Result<(), (String, String)> {
        let err = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.datasets.is_empty() {
            return err("data.datasets", "lists no dataset");
        }
        for (f, v) in [
            ("data.image_size", self.image_size),
            ("data.max_seq_len", self.max_seq_len),
            ("data.video_frames", self.video_frames),
            ("data.batch_size", self.batch_size),
            ("data.shard_batches", self.shard_batches),
            ("data.workers", self.workers.unwrap_or(1)),
            ("data.prefetch", self.prefetch),
        ] {
            if v == 0 {
                return err(f, "must be positive");
            }
        }
        let abs = |p: &PathBuf| if p.is_absolute() { p.clone() } else { base.join(p) };
        self.tokenizer = abs(&self.tokenizer);
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.datasets.iter_mut().enumerate() {
            let f = |x: &str| format!("data.datasets[{i}].{x}");
            if !names.insert(d.name.clone()) {
                return Err((f("name"), format!("`{}` is used twice", d.name)));
            }
            if !(d.weight.is_finite() && d.weight >= 0.0) {
                return Err((f("weight"), format!("{} must be a finite number >= 0", d.weight)));
            }
            match (d.group, &d.images) {
                (TaskGroup::TextOnly, Some(_)) => return Err((f("images"), "TEXT_ONLY datasets take no images".into())),
                (g, None) if g != TaskGroup::TextOnly => return Err((f("images"), format!("{g:?} needs an images file"))),
                _ => {}
            }
            d.instructions = abs(&d.instructions);
            d.images = d.images.as_ref().map(abs);
            d.train_config = d.train_config.as_ref().map(abs);
        }
        Ok(())
    }
}
