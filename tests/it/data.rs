//! The data pipeline builds exactly upstream's samples, lazily and deterministically.
//!
//! References: tests/fixtures/mimicit/expected_samples.* and images/expected_224 (upstream
//! + PIL). Tolerances (fixtures README): ids and labels exact; PNG max|diff| <= 0.02;
//! JPEG max|diff| <= 0.06 and mean|diff| <= 0.005. We hold ourselves to more: pixels equal
//! PIL's up to float rounding of the normalization (1e-6), JPEGs included, since we decode
//! with the same libjpeg-turbo and resize with a port of Pillow's fixed-point bicubic.

use crate::common;

use common::*;
use otter::data::transform::preprocess;
use otter::tensors::TensorFile;
use tch::Tensor;

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

fn check_image(name: &str, jpeg: bool, got: &Tensor, want: &Tensor) -> (f64, f64) {
    let d = (got - want).abs();
    let (max, mean) = (d.max().double_value(&[]), d.mean(tch::Kind::Double).double_value(&[]));
    if jpeg {
        assert!(max <= 0.06 && mean <= 0.005, "{name}: JPEG max {max} mean {mean}");
    } else {
        assert!(max <= 0.02, "{name}: PNG max {max}");
    }
    assert!(max <= 1e-6, "{name}: not PIL's pixels (max|diff| {max}, mean {mean})");
    (max, mean)
}

#[test]
fn preprocessing_matches_pil_bicubic_and_normalize() {
    let want = TensorFile::read(&fixtures().join("images/expected_224.safetensors")).unwrap();
    for name in ["img0.png", "img1.png", "img2.jpeg", "img3.jpeg"] {
        let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
        let mut px = Vec::new();
        preprocess(&bytes, 224, &mut px).unwrap();
        let got = Tensor::from_slice(&px).reshape([3, 224, 224]);
        let (max, mean) = check_image(name, is_jpeg(&bytes), &got, want.get(name).unwrap());
        println!("{name}: max|diff| {max:.4} mean|diff| {mean:.5}");
    }
}

#[test]
fn otter_data_dump_reproduces_upstream_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump.safetensors");
    let m = fixtures().join("mimicit");
    let (ok, _, err) = run_otter(&[
        "data",
        "dump",
        "--instructions",
        m.join("LA_instructions.json").to_str().unwrap(),
        "--images",
        m.join("LA.json").to_str().unwrap(),
        "--train-config",
        m.join("LA_train.json").to_str().unwrap(),
        "--tokenizer",
        tiny_model().join("tokenizer.json").to_str().unwrap(),
        "--image-size",
        "32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(&m.join("expected_samples.safetensors")).unwrap();
    assert_eq!(got.tensors.keys().collect::<Vec<_>>(), want.tensors.keys().collect::<Vec<_>>());
    // Which images are JPEG decides the tolerance of each sample's vision_x.
    let images: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA.json")).unwrap()).unwrap();
    let instr: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA_instructions.json")).unwrap()).unwrap();
    let train: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA_train.json")).unwrap()).unwrap();
    for (name, w) in &want.tensors {
        let g = got.get(name).unwrap();
        if name.ends_with(".vision_x") {
            let qid = name.trim_end_matches(".vision_x");
            let mut chain: Vec<String> = train[qid].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            chain.push(qid.to_string());
            for (t, id) in chain.iter().enumerate() {
                let img = instr["data"][id]["image_ids"][0].as_str().unwrap();
                let b64 = images[img].as_str().unwrap();
                let jpeg = b64.starts_with("/9j/") || b64.starts_with("_9j_");
                check_image(&format!("{name}[{t}] ({img})"), jpeg, &g.get(t as i64), &w.get(t as i64));
            }
        } else {
            assert!(g.equal(w), "{name}: got {:?} want {:?}", Vec::<i64>::try_from(g).unwrap(), Vec::<i64>::try_from(w).unwrap());
        }
    }
}

mod pipeline {
    use super::common::*;
    use otter::data::config::OnBadSample;
    use otter::data::loader::{DataSource, Loader};
    use otter::data::order::Cursor;
    use otter::data::sample::BadKind;
    use otter::data::synth::{synth, ImagesFormat, SynthSpec};
    use otter::run_config::RunConfig;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    fn synth_config(dir: &Path, format: ImagesFormat, samples: usize) -> otter::data::DataConfig {
        let spec = SynthSpec { samples, format, seed: 3, image_px: 40, distinct_images: 8 };
        let f = synth(dir, &spec).unwrap();
        let yaml = format!(
            "model: {{preset: tiny}}\ndata:\n  tokenizer: {}\n  image_size: 32\n  batch_size: 3\n  shard_batches: 2\n  workers: 2\n  prefetch: 3\n  seed: 11\n  datasets:\n    - {{name: SYN, group: IMAGE_TEXT_IN_CONTEXT, instructions: {}, images: {}, train_config: {}}}\n",
            tiny_model().join("tokenizer.json").display(),
            f.instructions.display(),
            f.images.display(),
            f.train_config.display()
        );
        let p = dir.join("run.yaml");
        std::fs::write(&p, yaml).unwrap();
        RunConfig::from_file(&p).unwrap().data.unwrap()
    }

    #[test]
    fn loader_delivers_every_sample_once_in_plan_order_and_resumes_from_a_cursor() {
        for format in [ImagesFormat::Json, ImagesFormat::Parquet] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = synth_config(dir.path(), format, 40);
            let source = Arc::new(DataSource::open(&cfg, Some(304)).unwrap());
            let plan = Arc::new(source.plan(0));
            let full = Cursor::over_shards(&plan, &(0..plan.num_shards()).collect::<Vec<_>>());
            let batches: Vec<_> = Loader::new(source.clone(), plan.clone(), full.clone()).map(Result::unwrap).collect();
            assert_eq!(batches.len(), plan.batches.len());
            let mut seen = BTreeMap::new();
            for (i, b) in batches.iter().enumerate() {
                assert_eq!(b.index, i, "delivered in cursor order");
                assert!(b.dropped.is_empty(), "{format:?}: {:?}", b.dropped);
                let direct = source.build_batch(&plan, i).unwrap();
                assert_eq!((&b.input_ids, &b.labels, &b.pixels), (&direct.input_ids, &direct.labels, &direct.pixels));
                assert_eq!(b.input_ids.len(), b.b * b.l);
                assert_eq!(b.pixels.len(), b.b * b.t * b.f * 3 * 32 * 32);
                for id in &b.ids {
                    *seen.entry(id.clone()).or_insert(0) += 1;
                }
            }
            assert_eq!(seen.len(), 40, "{format:?}: every query once");
            assert!(seen.values().all(|&n| n == 1));

            // Stop after 5 batches, save the cursor, resume: same remaining batches.
            let mut l = Loader::new(source.clone(), plan.clone(), full.clone());
            for _ in 0..5 {
                l.next().unwrap().unwrap();
            }
            let saved = serde_json::to_string(l.cursor()).unwrap();
            drop(l);
            let cursor: Cursor = serde_json::from_str(&saved).unwrap();
            let rest: Vec<_> = Loader::new(source.clone(), plan.clone(), cursor).map(|b| b.unwrap().ids).collect();
            let want: Vec<_> = batches[5..].iter().map(|b| b.ids.clone()).collect();
            assert_eq!(rest, want);
        }
    }

    #[test]
    fn parquet_and_json_stores_agree_under_concurrent_lookups() {
        use otter::data::images::open_store;
        let (dj, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spec = |format| SynthSpec { samples: 150, format, seed: 9, image_px: 24, distinct_images: 150 };
        let fj = synth(dj.path(), &spec(ImagesFormat::Json)).unwrap();
        let fp = synth(dp.path(), &spec(ImagesFormat::Parquet)).unwrap();
        let (json, parquet) = (open_store(&fj.images).unwrap(), open_store(&fp.images).unwrap());
        assert_eq!(parquet.len(), 150);
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (json, parquet) = (&json, &parquet);
                s.spawn(move || {
                    for k in 0..150usize {
                        let id = format!("SYN_IMG_{:08}", (k * 37 + t * 11) % 150);
                        assert_eq!(parquet.get(&id).unwrap(), json.get(&id).unwrap(), "{id} (thread {t})");
                    }
                });
            }
        });
    }

    /// A copy of the fixture dataset with one bad record of each kind added.
    fn corrupted(dir: &Path) -> otter::data::DataConfig {
        let m = fixtures().join("mimicit");
        let mut ins: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA_instructions.json")).unwrap()).unwrap();
        let mut images: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA.json")).unwrap()).unwrap();
        let mut train: serde_json::Value = serde_json::from_slice(&std::fs::read(m.join("LA_train.json")).unwrap()).unwrap();
        let d = ins["data"].as_object_mut().unwrap();
        let rec = |q: &str, a: serde_json::Value, img: &str| serde_json::json!({"instruction": q, "answer": a, "image_ids": [img]});
        d.insert("BAD_MISSING_IMAGE".into(), rec("Where?", "Here.".into(), "NO_SUCH_IMAGE"));
        d.insert("BAD_MALFORMED".into(), rec("Where?", 42.into(), "LA_IMG_00000"));
        d.insert("BAD_UNDECODABLE".into(), rec("Where?", "Here.".into(), "GARBAGE"));
        d.insert("BAD_EMPTY".into(), rec("Where?", "  ".into(), "LA_IMG_00000"));
        d.insert("BAD_LONG".into(), rec(&"very ".repeat(400), "Yes.".into(), "LA_IMG_00000"));
        images["GARBAGE"] = "bm90IGFuIGltYWdl".into(); // "not an image"
        for id in ["BAD_MISSING_IMAGE", "BAD_MALFORMED", "BAD_UNDECODABLE", "BAD_EMPTY", "BAD_LONG"] {
            train[id] = serde_json::json!([]);
        }
        train["BAD_NO_RECORD"] = serde_json::json!([]);
        std::fs::write(dir.join("LA_instructions.json"), ins.to_string()).unwrap();
        std::fs::write(dir.join("LA.json"), images.to_string()).unwrap();
        std::fs::write(dir.join("LA_train.json"), train.to_string()).unwrap();
        let yaml = format!(
            "model: {{preset: tiny}}\ndata:\n  tokenizer: {}\n  image_size: 32\n  max_seq_len: 256\n  batch_size: 2\n  datasets:\n    - {{name: LA, group: IMAGE_TEXT_IN_CONTEXT, instructions: LA_instructions.json, images: LA.json, train_config: LA_train.json}}\n",
            tiny_model().join("tokenizer.json").display()
        );
        std::fs::write(dir.join("run.yaml"), yaml).unwrap();
        RunConfig::from_file(&dir.join("run.yaml")).unwrap().data.unwrap()
    }

    #[test]
    fn bad_samples_are_skipped_counted_and_named_or_fail_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = corrupted(dir.path());
        let source = Arc::new(DataSource::open(&cfg, Some(304)).unwrap());
        let plan = Arc::new(source.plan(0));
        let cursor = Cursor::over_shards(&plan, &(0..plan.num_shards()).collect::<Vec<_>>());
        let mut loader = Loader::new(source.clone(), plan.clone(), cursor.clone());
        let good: usize = loader.by_ref().map(|b| b.unwrap().b).sum();
        assert_eq!(good, 4, "the four good fixture queries survive");
        let kinds: BTreeMap<BadKind, usize> = loader.bad.counts.iter().map(|((_, k), n)| (k.clone(), *n)).collect();
        let want: BTreeMap<BadKind, usize> = [
            BadKind::MissingImage,
            BadKind::MalformedRecord,
            BadKind::UndecodableImage,
            BadKind::EmptyAnswer,
            BadKind::TooLong,
            BadKind::MissingRecord,
        ]
        .into_iter()
        .map(|k| (k, 1))
        .collect();
        assert_eq!(kinds, want);
        let report = loader.bad.report();
        for id in ["BAD_MISSING_IMAGE", "BAD_MALFORMED", "BAD_UNDECODABLE", "BAD_EMPTY", "BAD_LONG", "BAD_NO_RECORD"] {
            let line = report.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("{id} not named:\n{report}"));
            assert!(line.contains("dataset LA") && (line.contains("LA_instructions.json") || line.contains("LA.json")), "{line}");
        }

        let mut strict = cfg.clone();
        strict.on_bad_sample = OnBadSample::Fail;
        let source = Arc::new(DataSource::open(&strict, Some(304)).unwrap());
        let err = Loader::new(source, plan, cursor).find_map(|b| b.err()).expect("fail mode stops on a bad sample");
        assert!(err.to_string().contains("BAD_"), "{err}");
    }

    #[test]
    fn malformed_top_level_files_are_clear_errors_with_nonzero_exit() {
        let dir = tempfile::tempdir().unwrap();
        corrupted(dir.path());
        std::fs::write(dir.path().join("LA_instructions.json"), r#"{"meta": {}, "data": [1, 2]}"#).unwrap();
        let (ok, _, err) = run_otter(&["data", "validate", "--config", dir.path().join("run.yaml").to_str().unwrap()]);
        assert!(!ok);
        assert!(err.contains("LA_instructions.json") && err.contains("data"), "{err}");

        corrupted(dir.path());
        std::fs::write(dir.path().join("LA.json"), r#"{"LA_IMG_00000": 5}"#).unwrap();
        let (ok, _, err) = run_otter(&["data", "validate", "--config", dir.path().join("run.yaml").to_str().unwrap()]);
        assert!(!ok);
        assert!(err.contains("LA.json") && err.contains("LA_IMG_00000"), "{err}");
    }

    #[test]
    fn validate_reports_problems_and_tokenizer_ids_are_checked_against_the_vocab() {
        let dir = tempfile::tempdir().unwrap();
        corrupted(dir.path());
        let (ok, out, err) = run_otter(&["data", "validate", "--config", dir.path().join("run.yaml").to_str().unwrap()]);
        assert!(ok, "{err}");
        assert!(out.contains("missing images: 1"), "{out}");
        assert!(out.contains("bad records: 3"), "{out}"); // malformed, empty answer, no record
        assert!(out.contains("over max_seq_len (256): 1"), "{out}");
        let cfg = corrupted(dir.path());
        let err = DataSource::open(&cfg, Some(300)).err().expect("<|endofchunk|>=300 is outside a 300-token vocab");
        assert!(err.to_string().contains("outside the model's vocabulary"), "{err}");
    }
}
