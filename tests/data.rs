//! The data pipeline builds exactly upstream's samples, lazily and deterministically.
//!
//! References: tests/fixtures/mimicit/expected_samples.* and images/expected_224 (upstream
//! + PIL). Tolerances (fixtures README): ids and labels exact; PNG max|diff| <= 0.02;
//! JPEG max|diff| <= 0.06 and mean|diff| <= 0.005.
#![cfg(feature = "torch")]

mod common;

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
