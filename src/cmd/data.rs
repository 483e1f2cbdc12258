//! `otter data synth | validate | dump`.

use crate::data::config::TaskGroup;
use crate::data::sample::{Dataset, SampleBuilder};
use crate::data::synth::{synth, ImagesFormat, SynthSpec};
use crate::data::tokenize::TextTokenizer;
use crate::data::{DataConfig, DatasetConfig, DataSource};
use crate::run_config::RunConfig;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

pub fn run_synth(out: &Path, samples: usize, format: &str, seed: u64, image_px: usize, tokenizer: Option<&Path>) -> Result<()> {
    let format = match format {
        "json" => ImagesFormat::Json,
        "parquet" => ImagesFormat::Parquet,
        other => bail!("--images-format `{other}`: expected json or parquet"),
    };
    if samples == 0 {
        bail!("--samples must be positive");
    }
    let spec = SynthSpec { samples, format, seed, image_px, distinct_images: 64 };
    let files = synth(out, &spec).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {samples} samples to {} (images: {}, {} bytes)", out.display(), files.images.display(), files.image_bytes);
    if let Some(tok) = tokenizer {
        let tok = std::fs::canonicalize(tok).with_context(|| format!("--tokenizer {}", tok.display()))?;
        let yaml = format!(
            "# Written by `otter data synth`.\ndata:\n  tokenizer: {}\n  datasets:\n    - name: SYN\n      group: IMAGE_TEXT_IN_CONTEXT\n      instructions: {}\n      images: {}\n      train_config: {}\n",
            tok.display(),
            file_name(&files.instructions),
            file_name(&files.images),
            file_name(&files.train_config),
        );
        std::fs::write(out.join("data.yaml"), yaml)?;
        println!("wrote {}", out.join("data.yaml").display());
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The data section of a run config (a YAML with a top-level `data:`).
pub fn load_data_config(path: &Path) -> Result<DataConfig> {
    let cfg = RunConfig::from_file(path)?;
    cfg.data.with_context(|| format!("{}: no `data` section", path.display()))
}

pub fn run_validate(config: &Path) -> Result<()> {
    let cfg = load_data_config(config)?;
    let tok = TextTokenizer::from_file(&cfg.tokenizer, None)?;
    let builder = SampleBuilder::new(&cfg, Arc::new(tok));
    let mut problems = 0usize;
    let mut hist: BTreeMap<usize, usize> = BTreeMap::new();
    let bucket = |n: usize| n.next_power_of_two().max(16);
    for d in &cfg.datasets {
        let ds = Dataset::open(d)?;
        println!("dataset {} ({:?}): {} queries, {} instructions", d.name, d.group, ds.queries.len(), ds.instructions.len());
        let (mut missing, mut bad_b64, mut too_long, mut bad_records) = (0, 0, 0, 0);
        let mut checked = std::collections::HashSet::new();
        for q in 0..ds.queries.len() {
            match builder.prompt(&ds, q) {
                Err(e) => {
                    bad_records += 1;
                    if bad_records <= 5 {
                        println!("  {e}");
                    }
                }
                Ok((text, images)) => {
                    let n = builder.tokenizer.sample_ids(&text)?.0.len();
                    *hist.entry(bucket(n)).or_default() += 1;
                    if n > cfg.max_seq_len {
                        too_long += 1;
                    }
                    if let Some(store) = &ds.images {
                        for id in images {
                            if !checked.insert(id.clone()) {
                                continue;
                            }
                            if !store.contains(&id) {
                                missing += 1;
                                if missing <= 5 {
                                    println!("  {}: missing image `{id}` (query {})", store.path().display(), ds.queries[q].0);
                                }
                            } else if let Err(e) = store.get(&id) {
                                bad_b64 += 1;
                                if bad_b64 <= 5 {
                                    println!("  {e}");
                                }
                            }
                        }
                    }
                }
            }
        }
        println!(
            "  bad records: {bad_records}, missing images: {missing}, bad base64: {bad_b64}, over max_seq_len ({}): {too_long}",
            cfg.max_seq_len
        );
        problems += bad_records + missing + bad_b64 + too_long;
    }
    let mut groups: BTreeMap<TaskGroup, usize> = BTreeMap::new();
    for d in &cfg.datasets {
        *groups.entry(d.group).or_default() += 1;
    }
    println!("datasets per group: {groups:?}");
    println!("token length histogram (upper bound: samples):");
    for (b, n) in &hist {
        println!("  <= {b:>6}: {n}");
    }
    println!("{problems} problems found");
    Ok(())
}

pub struct DumpArgs<'a> {
    pub instructions: &'a Path,
    pub images: &'a Path,
    pub train_config: &'a Path,
    pub tokenizer: &'a Path,
    pub image_size: usize,
    pub out: &'a Path,
}

/// Writes `<id>.input_ids`, `<id>.labels`, `<id>.vision_x` (T, F, 3, S, S) per query,
/// as IMAGE_TEXT_IN_CONTEXT samples; any bad sample is an error.
pub fn run_dump(a: DumpArgs) -> Result<()> {
    let ds_cfg = DatasetConfig {
        name: file_name(a.instructions),
        group: TaskGroup::ImageTextInContext,
        instructions: a.instructions.to_path_buf(),
        images: Some(a.images.to_path_buf()),
        train_config: Some(a.train_config.to_path_buf()),
        weight: 1.0,
    };
    let cfg = DataConfig {
        tokenizer: a.tokenizer.to_path_buf(),
        datasets: vec![ds_cfg],
        image_size: a.image_size,
        max_seq_len: usize::MAX,
        video_frames: 1,
        batch_size: 1,
        shard_batches: 1,
        seed: 0,
        on_bad_sample: crate::data::OnBadSample::Fail,
        workers: Some(1),
        prefetch: 1,
    };
    let source = DataSource::open(&cfg, None)?;
    let ds = &source.datasets[0];
    let mut tensors = Vec::new();
    let s = a.image_size as i64;
    for q in 0..ds.queries.len() {
        let sample = source.builder.build(0, ds, q)?;
        let id = &sample.id;
        tensors.push((format!("{id}.input_ids"), Tensor::from_slice(&sample.input_ids)));
        tensors.push((format!("{id}.labels"), Tensor::from_slice(&sample.labels)));
        let vx = Tensor::from_slice(&sample.pixels).reshape([sample.t as i64, sample.f as i64, 3, s, s]);
        tensors.push((format!("{id}.vision_x"), vx));
    }
    crate::tensors::write(a.out, &tensors)?;
    println!("wrote {} samples to {}", ds.queries.len(), a.out.display());
    Ok(())
}
