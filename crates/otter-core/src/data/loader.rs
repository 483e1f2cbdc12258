//! The loader: builds the batches a rank needs on a bounded pool of background threads,
//! at most `prefetch` batches ahead, delivered in cursor order. The training thread waits
//! only when data is slower than compute; that wait is measured.

use super::config::{DataConfig, OnBadSample};
use super::order::{Cursor, DatasetShape, EpochPlan};
use super::sample::{BadKind, Batch, Dataset, OpenError, SampleBuilder, SampleError};
use super::tokenize::TextTokenizer;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the epoch plans are made from: each dataset's weight and its queries' (T, F).
fn shapes(datasets: &[Dataset], video_frames: usize) -> Vec<DatasetShape> {
    datasets
        .iter()
        .map(|d| DatasetShape { weight: d.cfg.weight, shapes: (0..d.queries.len()).map(|q| d.shape(q, video_frames)).collect() })
        .collect()
}

/// The number of batches of each of `epochs` epochs, from the instructions and
/// train-config files alone (no tokenizer, no image index): what the coordinator needs to
/// lease the data, without the images mounted.
pub fn epoch_batches(cfg: &DataConfig, epochs: u64) -> Result<Vec<u64>, OpenError> {
    let datasets = cfg.datasets.iter().map(Dataset::open_metadata).collect::<Result<Vec<_>, _>>()?;
    let shapes = shapes(&datasets, cfg.video_frames);
    Ok((0..epochs).map(|e| EpochPlan::new(cfg.seed, e, &shapes, cfg.batch_size, cfg.shard_batches).batches.len() as u64).collect())
}

/// Everything needed to build samples: datasets, tokenizer, builder.
pub struct DataSource {
    pub cfg: DataConfig,
    pub datasets: Vec<Dataset>,
    pub builder: SampleBuilder,
}

impl DataSource {
    /// Opens every dataset (metadata and image indexes; no image is decoded) and the
    /// tokenizer, checking special-token ids against `vocab_size` when given.
    pub fn open(cfg: &DataConfig, vocab_size: Option<usize>) -> Result<Self, OpenError> {
        let tokenizer = Arc::new(TextTokenizer::from_file(&cfg.tokenizer, vocab_size)?);
        let datasets = cfg.datasets.iter().map(Dataset::open).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { cfg: cfg.clone(), datasets, builder: SampleBuilder::new(cfg, tokenizer) })
    }

    pub fn plan(&self, epoch: u64) -> EpochPlan {
        EpochPlan::new(self.cfg.seed, epoch, &shapes(&self.datasets, self.cfg.video_frames), self.cfg.batch_size, self.cfg.shard_batches)
    }

    /// Builds batch `index` of `plan`: bad samples are dropped (and reported in
    /// `Batch::dropped`) or, with `on_bad_sample: fail`, returned as the error.
    pub fn build_batch(&self, plan: &EpochPlan, index: usize) -> Result<Batch, SampleError> {
        let mut samples = Vec::new();
        let mut dropped = Vec::new();
        for r in &plan.batches[index] {
            let d = r.dataset as usize;
            match self.builder.build(d, &self.datasets[d], r.query as usize) {
                Ok(s) => samples.push(s),
                Err(e) if self.cfg.on_bad_sample == OnBadSample::Skip => dropped.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok(Batch::collate(index, samples, self.builder.tokenizer.ids.pad, self.cfg.image_size, dropped))
    }
}

/// Bad samples seen so far, by (dataset, kind), with the first few messages.
#[derive(Debug, Default, Clone)]
pub struct BadSampleSummary {
    pub counts: BTreeMap<(String, BadKind), usize>,
    pub examples: Vec<String>,
}

impl BadSampleSummary {
    pub fn add(&mut self, e: &SampleError) {
        *self.counts.entry((e.dataset.clone(), e.kind.clone())).or_default() += 1;
        if self.examples.len() < 10 {
            self.examples.push(e.to_string());
        }
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn report(&self) -> String {
        if self.counts.is_empty() {
            return "no bad samples".into();
        }
        let mut s = format!("{} bad samples skipped:\n", self.total());
        for ((d, k), n) in &self.counts {
            s += &format!("  {d}: {k:?}: {n}\n");
        }
        for e in &self.examples {
            s += &format!("  e.g. {e}\n");
        }
        s
    }
}

struct State {
    /// Next position (into the cursor's remaining list) to hand to a worker.
    next: usize,
    /// Positions consumed by the training thread.
    consumed: usize,
    ready: HashMap<usize, Result<Batch, SampleError>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

/// Prefetching, order-preserving batch iterator over a [`Cursor`].
pub struct Loader {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    cursor: Cursor,
    total: usize,
    /// Time the consumer spent waiting for data.
    pub wait: Duration,
    pub bad: BadSampleSummary,
}

impl Loader {
    pub fn new(source: Arc<DataSource>, plan: Arc<EpochPlan>, cursor: Cursor) -> Self {
        let todo: Arc<Vec<usize>> = Arc::new(cursor.remaining().to_vec());
        let shared = Arc::new(Shared {
            state: Mutex::new(State { next: 0, consumed: 0, ready: HashMap::new(), shutdown: false }),
            cond: Condvar::new(),
        });
        let prefetch = source.cfg.prefetch;
        let threads = (0..source.cfg.workers.unwrap_or(2))
            .map(|_| {
                let (shared, source, plan, todo) = (shared.clone(), source.clone(), plan.clone(), todo.clone());
                std::thread::spawn(move || loop {
                    let pos = {
                        let mut st = shared.state.lock().unwrap();
                        while !st.shutdown && st.next < todo.len() && st.next >= st.consumed + prefetch {
                            st = shared.cond.wait(st).unwrap();
                        }
                        if st.shutdown || st.next >= todo.len() {
                            return;
                        }
                        st.next += 1;
                        st.next - 1
                    };
                    let batch = guarded(todo[pos], || source.build_batch(&plan, todo[pos]));
                    shared.state.lock().unwrap().ready.insert(pos, batch);
                    shared.cond.notify_all();
                })
            })
            .collect();
        let total = todo.len();
        Self { shared, threads, cursor, total, wait: Duration::ZERO, bad: BadSampleSummary::default() }
    }

    /// The position to save in a checkpoint: batches handed out so far are done.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }
}

/// `build()` of batch `index`, with a panic turned into the batch's error: the consumer
/// waiting for that batch gets the message instead of waiting forever.
fn guarded(index: usize, build: impl FnOnce() -> Result<Batch, SampleError>) -> Result<Batch, SampleError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).unwrap_or_else(|p| {
        let what = crate::panic::message(&*p);
        Err(SampleError {
            dataset: String::new(),
            file: std::path::PathBuf::new(),
            id: format!("batch {index}"),
            kind: BadKind::Internal,
            message: format!("the data thread building it panicked: {what}"),
        })
    })
}

impl Iterator for Loader {
    type Item = Result<Batch, SampleError>;

    fn next(&mut self) -> Option<Self::Item> {
        let offset = self.cursor.batches.len() - self.total;
        let pos = self.cursor.done - offset;
        if pos >= self.total {
            return None;
        }
        let start = Instant::now();
        let mut st = self.shared.state.lock().unwrap();
        let item = loop {
            if let Some(b) = st.ready.remove(&pos) {
                break b;
            }
            st = self.shared.cond.wait(st).unwrap();
        };
        st.consumed = pos + 1;
        drop(st);
        self.shared.cond.notify_all();
        self.wait += start.elapsed();
        self.cursor.done += 1;
        if let Ok(b) = &item {
            for e in &b.dropped {
                self.bad.add(e);
            }
        }
        Some(item)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().shutdown = true;
        self.shared.cond.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn a_panicking_data_thread_fails_its_batch_with_the_message() {
        let e = guarded(7, || panic!("index out of bounds: the len is 3")).unwrap_err();
        assert_eq!(e.kind, BadKind::Internal);
        assert!(e.to_string().contains("record batch 7: the data thread building it panicked: index out of bounds: the len is 3"), "{e}");
        assert!(guarded(1, || Err(e.clone())).is_err_and(|x| x.message == e.message));
    }
    use crate::data::synth::{synth, ImagesFormat, SynthSpec};

    #[test]
    fn the_epochs_are_counted_from_the_metadata_alone() {
        let d = tempfile::tempdir().unwrap();
        let files = synth(d.path(), &SynthSpec { samples: 37, format: ImagesFormat::Json, seed: 3, image_px: 8, distinct_images: 4 }).unwrap();
        let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_otter/tokenizer.json");
        let yaml = format!(
            "tokenizer: {}\nimage_size: 8\nbatch_size: 3\nshard_batches: 2\nseed: 5\ndatasets:\n  - {{name: SYN, group: IMAGE_TEXT_IN_CONTEXT, instructions: {}, images: {}, train_config: {}}}\n",
            tokenizer.display(),
            files.instructions.display(),
            files.images.display(),
            files.train_config.display()
        );
        let cfg: DataConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        let full = DataSource::open(&cfg, None).unwrap();
        let want: Vec<u64> = (0..3).map(|e| full.plan(e).batches.len() as u64).collect();
        // What the coordinator sees: no images (and no tokenizer) where it runs.
        std::fs::remove_file(&files.images).unwrap();
        assert!(DataSource::open(&cfg, None).is_err(), "building samples needs the images");
        assert_eq!(epoch_batches(&cfg, 3).unwrap(), want);
        assert!(want.iter().all(|&n| n > 0));
    }
}
