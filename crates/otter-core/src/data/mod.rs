//! MIMIC-IT data pipeline (no libtorch): exact samples, lazy images, deterministic
//! order and shards, a prefetching loader.
//!
//! | file          | what                                                          |
//! |---------------|---------------------------------------------------------------|
//! | `config.rs`   | the `data` section: datasets, task groups, sizes, policies     |
//! | `mimicit.rs`  | instructions / train-config files, prompt turns                |
//! | `images.rs`   | lazy image stores: JSON byte ranges, parquet rows, base64      |
//! | `transform.rs`| decode + Pillow-exact bicubic resize + normalize               |
//! | `tokenize.rs` | HF tokenizer, Otter special tokens, labels                     |
//! | `sample.rs`   | one sample (prompt, ids, labels, pixels), batches, bad samples |
//! | `order.rs`    | epoch plan as a pure function of (seed, epoch), shards, cursor |
//! | `loader.rs`   | data source, background pool + bounded prefetch, wait time     |
//! | `synth.rs`    | synthetic MIMIC-IT datasets of any size                        |

pub mod config;
pub mod images;
pub mod loader;
pub mod mimicit;
pub mod order;
pub mod sample;
pub mod synth;
pub mod tokenize;
pub mod transform;

pub use config::{DataConfig, DatasetConfig, OnBadSample, TaskGroup};
pub use loader::{epoch_batches, DataSource, Loader};
pub use order::{Cursor, EpochPlan};
pub use sample::{Batch, Sample, SampleError};
