//! Building one training sample exactly as upstream: prompt, ids, labels, images.

use super::config::{DataConfig, DatasetConfig, TaskGroup};
use super::images::{open_store, ImageStore, ImageStoreError};
use super::mimicit::{clean_answer, read_train_config, turn, Instruction, Instructions, MetaError};
use super::tokenize::TextTokenizer;
use super::transform::preprocess;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a sample was dropped; counted per kind in summaries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadKind {
    MissingRecord,
    MalformedRecord,
    NoImage,
    MissingImage,
    BadBase64,
    UndecodableImage,
    EmptyAnswer,
    TooLong,
    Tokenizer,
    /// Building the batch panicked (a defect, never skipped): the run fails with it.
    Internal,
}

/// A sample that cannot be built, naming dataset, file and record.
#[derive(Debug, Clone, thiserror::Error)]
#[error("dataset {dataset}: {file}: record {id}: {message}")]
pub struct SampleError {
    pub dataset: String,
    pub file: PathBuf,
    pub id: String,
    pub kind: BadKind,
    pub message: String,
}

/// A dataset opened for sampling: metadata in memory, images lazily.
pub struct Dataset {
    pub cfg: DatasetConfig,
    pub instructions: Instructions,
    pub images: Option<Arc<dyn ImageStore>>,
    /// (query id, in-context ids), sorted by query id.
    pub queries: Vec<(String, Vec<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Images(#[from] ImageStoreError),
    #[error(transparent)]
    Tokenizer(#[from] super::tokenize::TokenizerError),
}

impl Dataset {
    pub fn open(cfg: &DatasetConfig) -> Result<Self, OpenError> {
        let mut d = Self::open_metadata(cfg)?;
        d.images = cfg.images.as_ref().map(|p| open_store(p)).transpose()?;
        Ok(d)
    }

    /// The instructions and the train config only (no image index): enough to plan the
    /// epochs, not to build samples.
    pub fn open_metadata(cfg: &DatasetConfig) -> Result<Self, OpenError> {
        let instructions = Instructions::open(&cfg.instructions)?;
        let images = None;
        let queries: Vec<(String, Vec<String>)> = match &cfg.train_config {
            Some(p) => read_train_config(p)?.into_iter().collect(),
            None => {
                let mut ids: Vec<String> = instructions.ids().cloned().collect();
                ids.sort();
                ids.into_iter().map(|id| (id, vec![])).collect()
            }
        };
        Ok(Self { cfg: cfg.clone(), instructions, images, queries })
    }

    /// (T, F) of query `q`, known from metadata alone (batches group equal shapes).
    pub fn shape(&self, q: usize, video_frames: usize) -> (usize, usize) {
        match self.cfg.group {
            TaskGroup::ImageText | TaskGroup::TextOnly => (1, 1),
            TaskGroup::ImageTextInContext => (1 + self.queries[q].1.len(), 1),
            TaskGroup::VideoText => (1, video_frames),
        }
    }
}

/// A built sample. `pixels` is (T, F, 3, S, S) row-major.
#[derive(Debug, Clone)]
pub struct Sample {
    pub dataset: usize,
    pub id: String,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub t: usize,
    pub f: usize,
    pub pixels: Vec<f32>,
}

/// `np.linspace(0, n - 1, k).astype(int)`: uniform frame resampling.
pub fn linspace_indices(n: usize, k: usize) -> Vec<usize> {
    if k == 1 {
        return vec![0];
    }
    let step = (n as f64 - 1.0) / (k as f64 - 1.0);
    (0..k).map(|i| if i == k - 1 { n - 1 } else { (i as f64 * step) as usize }).collect()
}

pub struct SampleBuilder {
    pub tokenizer: Arc<TextTokenizer>,
    pub image_size: usize,
    pub max_seq_len: usize,
    pub video_frames: usize,
}

impl SampleBuilder {
    pub fn new(cfg: &DataConfig, tokenizer: Arc<TextTokenizer>) -> Self {
        Self { tokenizer, image_size: cfg.image_size, max_seq_len: cfg.max_seq_len, video_frames: cfg.video_frames }
    }

    /// The prompt text and the image ids (in `<image>` order) of query `q`.
    pub fn prompt(&self, ds: &Dataset, q: usize) -> Result<(String, Vec<String>), SampleError> {
        let (qid, ctx) = &ds.queries[q];
        let bad = |kind: BadKind, message: String| SampleError {
            dataset: ds.cfg.name.clone(),
            file: ds.instructions.path.clone(),
            id: qid.clone(),
            kind,
            message,
        };
        let get = |id: &str| -> Result<Instruction, SampleError> {
            let kind = if ds.instructions.contains(id) { BadKind::MalformedRecord } else { BadKind::MissingRecord };
            let ins = ds.instructions.get(id).map_err(|m| bad(kind, m))?;
            if clean_answer(&ins.answer).is_empty() {
                return Err(bad(BadKind::EmptyAnswer, format!("record `{id}` has an empty answer")));
            }
            Ok(ins)
        };
        let first_image = |id: &str, ins: &Instruction| {
            ins.image_ids.first().cloned().ok_or_else(|| bad(BadKind::NoImage, format!("record `{id}` has no image_ids")))
        };
        let mut chain: Vec<&str> = match ds.cfg.group {
            TaskGroup::ImageText => vec![],
            _ => ctx.iter().map(String::as_str).collect(),
        };
        chain.push(qid);
        let mut text = String::new();
        let mut images = Vec::new();
        match ds.cfg.group {
            TaskGroup::ImageText | TaskGroup::ImageTextInContext => {
                for id in chain {
                    let ins = get(id)?;
                    images.push(first_image(id, &ins)?);
                    text.push_str("<image>");
                    text.push_str(&turn(&ins));
                }
            }
            TaskGroup::VideoText => {
                let query = get(qid)?;
                if query.image_ids.is_empty() {
                    return Err(bad(BadKind::NoImage, format!("record `{qid}` has no frames")));
                }
                images = linspace_indices(query.image_ids.len(), self.video_frames)
                    .into_iter()
                    .map(|i| query.image_ids[i].clone())
                    .collect();
                text.push_str("<image>");
                for id in chain {
                    text.push_str(&turn(&get(id)?));
                }
            }
            TaskGroup::TextOnly => {
                for id in chain {
                    text.push_str(&turn(&get(id)?));
                }
            }
        }
        Ok((text, images))
    }

    /// Builds query `q` of dataset number `dsi`.
    pub fn build(&self, dsi: usize, ds: &Dataset, q: usize) -> Result<Sample, SampleError> {
        let qid = &ds.queries[q].0;
        let (text, image_ids) = self.prompt(ds, q)?;
        let err = |file: PathBuf, kind: BadKind, message: String| SampleError {
            dataset: ds.cfg.name.clone(),
            file,
            id: qid.clone(),
            kind,
            message,
        };
        let ins_file = ds.instructions.path.clone();
        let (input_ids, labels) =
            self.tokenizer.sample_ids(&text).map_err(|e| err(ins_file.clone(), BadKind::Tokenizer, e.to_string()))?;
        if input_ids.len() > self.max_seq_len {
            return Err(err(
                ins_file,
                BadKind::TooLong,
                format!("{} tokens exceed max_seq_len {} (dropped, not truncated)", input_ids.len(), self.max_seq_len),
            ));
        }
        let (t, f) = ds.shape(q, self.video_frames);
        let s = self.image_size;
        let mut pixels = Vec::with_capacity(t * f * 3 * s * s);
        match &ds.images {
            None => pixels.resize(t * f * 3 * s * s, 0.0),
            Some(store) => {
                for id in &image_ids {
                    let bytes = store.get(id).map_err(|e| {
                        let kind = match e {
                            ImageStoreError::Missing { .. } => BadKind::MissingImage,
                            ImageStoreError::Base64 { .. } => BadKind::BadBase64,
                            _ => BadKind::UndecodableImage,
                        };
                        err(store.path().to_path_buf(), kind, e.to_string())
                    })?;
                    preprocess(&bytes, s, &mut pixels).map_err(|e| {
                        err(store.path().to_path_buf(), BadKind::UndecodableImage, format!("image `{id}`: {e}"))
                    })?;
                }
            }
        }
        debug_assert_eq!(pixels.len(), t * f * 3 * s * s);
        Ok(Sample { dataset: dsi, id: qid.clone(), input_ids, labels, t, f, pixels })
    }
}

/// Samples of equal (T, F) collated, right-padded with `<PAD>`; attention mask 0 on
/// padding, labels -100 there.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Position of this batch in its epoch plan.
    pub index: usize,
    /// (dataset, query id) of each row.
    pub ids: Vec<(usize, String)>,
    pub b: usize,
    pub l: usize,
    pub t: usize,
    pub f: usize,
    pub image_size: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    /// (B, T, F, 3, S, S)
    pub pixels: Vec<f32>,
    /// Samples of this batch that were dropped (bad input), with why.
    pub dropped: Vec<SampleError>,
}

impl Batch {
    pub fn collate(index: usize, samples: Vec<Sample>, pad: i64, image_size: usize, dropped: Vec<SampleError>) -> Self {
        let b = samples.len();
        let l = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
        let (t, f) = samples.first().map_or((0, 0), |s| (s.t, s.f));
        let mut batch = Batch { index, b, l, t, f, image_size, dropped, ..Default::default() };
        for s in samples {
            assert_eq!((s.t, s.f), (t, f), "a batch groups samples of equal (T, F)");
            let n = s.input_ids.len();
            batch.input_ids.extend(&s.input_ids);
            batch.input_ids.extend(std::iter::repeat_n(pad, l - n));
            batch.attention_mask.extend(std::iter::repeat_n(1, n));
            batch.attention_mask.extend(std::iter::repeat_n(0, l - n));
            batch.labels.extend(&s.labels);
            batch.labels.extend(std::iter::repeat_n(-100, l - n));
            batch.pixels.extend(s.pixels);
            batch.ids.push((s.dataset, s.id));
        }
        batch
    }

    /// Non-padding tokens.
    pub fn tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_resampled_like_numpy_linspace() {
        assert_eq!(linspace_indices(10, 4), vec![0, 3, 6, 9]);
        assert_eq!(linspace_indices(3, 5), vec![0, 0, 1, 1, 2]);
        assert_eq!(linspace_indices(7, 1), vec![0]);
        assert_eq!(linspace_indices(100, 8), vec![0, 14, 28, 42, 56, 70, 84, 99]);
    }

    #[test]
    fn collate_right_pads_and_masks() {
        let s = |id: &str, n: usize| Sample {
            dataset: 0,
            id: id.into(),
            input_ids: (0..n as i64).collect(),
            labels: vec![5; n],
            t: 1,
            f: 1,
            pixels: vec![0.5; 3],
        };
        let b = Batch::collate(7, vec![s("a", 3), s("b", 1)], 99, 1, vec![]);
        assert_eq!((b.b, b.l, b.index), (2, 3, 7));
        assert_eq!(b.input_ids, vec![0, 1, 2, 0, 99, 99]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(b.labels, vec![5, 5, 5, 5, -100, -100]);
        assert_eq!(b.tokens(), 4);
    }
}
