//! Synthetic datasets in the MIMIC-IT layout, any size: for demos, tests and benchmarks.
//!
//! Writes `SYN_instructions.json`, `SYN.json` (id -> base64, mostly URL-safe alphabet,
//! every 7th standard) or `SYN.parquet` (pandas layout: index column `id`, column
//! `base64`, small row groups), and `SYN_train.json` (each query gets 0-2 in-context
//! examples, so batches of several (T, F) shapes occur). Images are photo-like PNGs and
//! JPEGs of `image_px` pixels (a pool of distinct images reused across ids).

use super::order::SplitMix64;
use base64::Engine;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagesFormat {
    Json,
    Parquet,
}

#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub samples: usize,
    pub format: ImagesFormat,
    pub seed: u64,
    pub image_px: usize,
    /// Distinct encoded images; ids cycle through them.
    pub distinct_images: usize,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthFiles {
    pub instructions: PathBuf,
    pub images: PathBuf,
    pub train_config: PathBuf,
    pub image_bytes: u64,
}

const WORDS: &[&str] = &[
    "red", "car", "dog", "the", "a", "sky", "blue", "man", "holding", "two", "people", "walk", "beach", "table",
    "apples", "three", "what", "is", "on", "left", "right", "green", "tree", "house", "window", "cat", "sleeping",
    "under", "chair", "bright", "sunny", "day", "clouds", "river", "bridge", "city", "street", "night",
];

fn sentence(r: &mut SplitMix64, min: usize, max: usize) -> String {
    let n = min + r.below((max - min + 1) as u64) as usize;
    let mut s: Vec<&str> = (0..n).map(|_| WORDS[r.below(WORDS.len() as u64) as usize]).collect();
    let first = s[0].to_string();
    let cap = first[..1].to_uppercase() + &first[1..];
    s[0] = &cap;
    s.join(" ")
}

/// A photo-like image: a smooth two-colour gradient, a few filled ellipses and mild
/// per-pixel noise (so it compresses roughly like a natural photo, not like pure noise).
fn synthetic_photo(r: &mut SplitMix64, px: usize, jpeg: bool) -> Vec<u8> {
    let c = |r: &mut SplitMix64| [r.below(256) as f32, r.below(256) as f32, r.below(256) as f32];
    let (a, b) = (c(r), c(r));
    let blobs: Vec<(f32, f32, f32, f32, [f32; 3])> = (0..6)
        .map(|_| {
            let f = |r: &mut SplitMix64| r.below(1000) as f32 / 1000.0;
            (f(r) * px as f32, f(r) * px as f32, (0.05 + 0.25 * f(r)) * px as f32, (0.05 + 0.25 * f(r)) * px as f32, c(r))
        })
        .collect();
    let mut data = Vec::with_capacity(px * px * 3);
    for y in 0..px {
        for x in 0..px {
            let t = (x + y) as f32 / (2 * px) as f32;
            let mut p = [0f32; 3];
            for k in 0..3 {
                p[k] = a[k] * (1.0 - t) + b[k] * t;
            }
            for &(cx, cy, rx, ry, col) in &blobs {
                let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
                if dx * dx + dy * dy < 1.0 {
                    p = col;
                }
            }
            let noise = (r.below(17) as f32) - 8.0;
            data.extend(p.iter().map(|v| (v + noise).clamp(0.0, 255.0) as u8));
        }
    }
    let img = image::RgbImage::from_raw(px as u32, px as u32, data).expect("sized buffer");
    let mut out = std::io::Cursor::new(Vec::new());
    let fmt = if jpeg { image::ImageFormat::Jpeg } else { image::ImageFormat::Png };
    img.write_to(&mut out, fmt).expect("in-memory encode");
    out.into_inner()
}

pub fn synth(dir: &Path, spec: &SynthSpec) -> std::io::Result<SynthFiles> {
    std::fs::create_dir_all(dir)?;
    let mut r = SplitMix64::new(spec.seed);
    let n = spec.samples;
    let id = |i: usize| format!("SYN_INS_{i:08}");
    let img_id = |i: usize| format!("SYN_IMG_{i:08}");

    // Instructions.
    let mut data = serde_json::Map::new();
    for i in 0..n {
        let q = sentence(&mut r, 3, 8) + "?";
        let a = sentence(&mut r, 2, 12) + ".";
        data.insert(
            id(i),
            serde_json::json!({"instruction": q, "answer": a, "image_ids": [img_id(i)], "rel_ins_ids": []}),
        );
    }
    let instructions = dir.join("SYN_instructions.json");
    let doc = serde_json::json!({"meta": {"version": "synthetic", "seed": spec.seed}, "data": data});
    std::fs::write(&instructions, serde_json::to_vec(&doc)?)?;

    // Train config: 0..=2 in-context examples per query.
    let mut train = serde_json::Map::new();
    for i in 0..n {
        let k = if n > 1 { r.below(3) as usize } else { 0 };
        let ctx: Vec<String> = (0..k).map(|_| id(r.below(n as u64) as usize)).collect();
        train.insert(id(i), serde_json::json!(ctx));
    }
    let train_config = dir.join("SYN_train.json");
    std::fs::write(&train_config, serde_json::to_vec(&serde_json::Value::Object(train))?)?;

    // Images.
    let pool: Vec<Vec<u8>> = (0..spec.distinct_images.max(1)).map(|k| synthetic_photo(&mut r, spec.image_px, k % 2 == 1)).collect();
    let encode = |i: usize| {
        let bytes = &pool[i % pool.len()];
        if i % 7 == 3 {
            base64::engine::general_purpose::STANDARD.encode(bytes)
        } else {
            base64::engine::general_purpose::URL_SAFE.encode(bytes)
        }
    };
    let (images, image_bytes) = match spec.format {
        ImagesFormat::Json => {
            let path = dir.join("SYN.json");
            let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
            w.write_all(b"{")?;
            for i in 0..n {
                if i > 0 {
                    w.write_all(b", ")?;
                }
                write!(w, "\"{}\": \"{}\"", img_id(i), encode(i))?;
            }
            w.write_all(b"}")?;
            w.flush()?;
            let len = std::fs::metadata(&path)?.len();
            (path, len)
        }
        ImagesFormat::Parquet => {
            let path = dir.join("SYN.parquet");
            write_parquet(&path, n, img_id, encode)?;
            let len = std::fs::metadata(&path)?.len();
            (path, len)
        }
    };
    Ok(SynthFiles { instructions, images, train_config, image_bytes })
}

fn write_parquet(
    path: &Path,
    n: usize,
    id: impl Fn(usize) -> String,
    encode: impl Fn(usize) -> String,
) -> std::io::Result<()> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;
    let io = |e: parquet::errors::ParquetError| std::io::Error::other(e.to_string());
    let pandas = serde_json::json!({"index_columns": ["id"], "column_indexes": [], "columns": [
        {"name": "base64", "field_name": "base64", "pandas_type": "unicode", "numpy_type": "object", "metadata": null},
        {"name": "id", "field_name": "id", "pandas_type": "unicode", "numpy_type": "object", "metadata": null}]});
    let schema = Arc::new(
        Schema::new(vec![Field::new("base64", DataType::Utf8, false), Field::new("id", DataType::Utf8, false)])
            .with_metadata(std::collections::HashMap::from([("pandas".to_string(), pandas.to_string())])),
    );
    let rows_per_group = 64;
    let props = WriterProperties::builder().set_max_row_group_row_count(Some(rows_per_group)).build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path)?, schema.clone(), Some(props)).map_err(io)?;
    for start in (0..n).step_by(rows_per_group) {
        let end = (start + rows_per_group).min(n);
        let b64: ArrayRef = Arc::new(StringArray::from((start..end).map(&encode).collect::<Vec<_>>()));
        let ids: ArrayRef = Arc::new(StringArray::from((start..end).map(&id).collect::<Vec<_>>()));
        let batch = RecordBatch::try_new(schema.clone(), vec![b64, ids]).map_err(|e| std::io::Error::other(e.to_string()))?;
        w.write(&batch).map_err(io)?;
    }
    w.close().map_err(io)?;
    Ok(())
}
