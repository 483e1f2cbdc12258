//! Strict loading, config errors and parameter counts: every problem is named.

use crate::common;

use common::*;
use otter::model::weights::{LoadError, LoadOptions};
use otter::model::Otter;
use otter::tensors::TensorFile;
use std::path::Path;
use tch::Tensor;

/// A copy of the tiny model dir whose weights went through `edit`.
fn edited_model(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let full = TensorFile::read(&tiny_model().join("model.safetensors")).unwrap();
    let mut tensors: Vec<_> = full.tensors.into_iter().collect();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::copy(tiny_model().join("config.json"), dir.join("config.json")).unwrap();
}

const GATE: &str = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate";
const Q: &str = "lang_encoder.model.layers.2.decoder_layer.self_attn.q_proj.weight";

#[test]
fn every_missing_unexpected_and_misshaped_key_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    edited_model(dir.path(), |t| {
        t.retain(|(n, _)| n != GATE);
        for (n, v) in t.iter_mut() {
            if n == Q {
                *v = Tensor::zeros([64, 32], (tch::Kind::Float, tch::Device::Cpu));
            }
        }
        t.push(("lang_encoder.model.layers.9.extra".into(), Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu))));
    });
    let err = match Otter::load_dir(dir.path(), LoadOptions::default()) {
        Err(otter::model::otter::ModelError::Load(LoadError::Mismatch(m))) => m,
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a broken checkpoint loaded"),
    };
    assert_eq!(err.missing, vec![GATE.to_string()]);
    assert_eq!(err.unexpected, vec!["lang_encoder.model.layers.9.extra".to_string()]);
    assert_eq!(err.misshaped, vec![(Q.to_string(), vec![64, 64], vec![64, 32])]);
    let msg = err.to_string();
    assert!(msg.contains(&format!("missing key: {GATE}")), "{msg}");
    assert!(msg.contains(&format!("mis-shaped key: {Q}: expected [64, 64], checkpoint has [64, 32]")), "{msg}");
}

#[test]
fn otter_eval_on_a_broken_checkpoint_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    edited_model(dir.path(), |t| t.retain(|(n, _)| n != GATE));
    let out = dir.path().join("out.safetensors");
    let inputs = fixtures().join("parity/incontext.safetensors");
    let (ok, _, err) = run_otter(&[
        "eval", "--model", dir.path().to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(!ok, "eval must fail");
    assert!(err.contains(GATE), "stderr must name the key: {err}");
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn malformed_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny_model().join("config.json")).unwrap();
    let text = text.replacen("\"num_hidden_layers\": 4", "\"num_hidden_layers\": \"four\"", 1);
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let (ok, _, err) = run_otter(&["model-info", "--config", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("text_config.num_hidden_layers"), "{err}");
}

#[test]
fn inputs_that_do_not_fit_the_model_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let full = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    let mut t: Vec<_> = full.tensors.into_iter().filter(|(n, _)| !n.starts_with("grad.")).collect();
    for (n, v) in t.iter_mut() {
        if n == "vision_x" {
            *v = v.narrow(1, 0, 1).contiguous(); // one image, but samples have two <image> tokens
        }
    }
    let inputs = dir.path().join("in.safetensors");
    Tensor::write_safetensors(&t, &inputs).unwrap();
    let (ok, _, err) = run_otter(&[
        "eval", "--model", tiny_model().to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("input_ids") && err.contains("<image>"), "{err}");
}

/// OTTER-Image-MPT7B under upstream's rule (fixtures/mpt README): perceiver, cross-attention
/// and the tied `wte` train.
#[test]
fn model_info_prints_upstream_mpt7b_counts() {
    let (ok, out, err) = run_otter(&["model-info", "--config", "otter_mpt7b"]);
    assert!(ok, "{err}");
    assert!(out.contains("trainable: 1,385,404,432 of 8,131,301,392"), "{out}");
    assert!(out.contains("MPT backbone") && out.contains("wte (tied output)"), "{out}");
    let (ok, out, err) = run_otter(&["model-info", "--config", tiny_mpt_model().to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["total"].as_u64(), v["trainable"].as_u64()), (Some(256_612), Some(183_236)), "the fixture's trainable.json");
}

#[test]
fn model_info_prints_upstream_7b_counts() {
    let (ok, out, err) = run_otter(&["model-info", "--config", "otter_llama7b"]);
    assert!(ok, "{err}");
    let total = out.lines().find(|l| l.starts_with("total")).expect("total line");
    assert!(total.trim_end().ends_with("1,441,011,728"), "{out}");
    let (ok, out, _) = run_otter(&["model-info", "--config", tiny_model().to_str().unwrap(), "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // tiny fixture: the 49 trainable tensors' sizes, counted independently from the file.
    let file = TensorFile::read(&tiny_model().join("model.safetensors")).unwrap();
    let trainable: i64 = file
        .tensors
        .iter()
        .filter(|(n, _)| otter::model::spec::is_trainable(n))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert_eq!(v["trainable"].as_i64().unwrap(), trainable);
    assert_eq!(v["total"].as_i64().unwrap(), file.tensors.values().map(|t| t.numel() as i64).sum::<i64>());
}

#[test]
fn cuda_is_loaded_on_demand_not_linked() {
    // libtorch_cuda is dlopen'ed only when a CUDA device is asked for (src/cuda.rs), so a
    // CPU process does not pay for it; the binary must still resolve everything else
    // without LD_LIBRARY_PATH.
    let out = std::process::Command::new("ldd").arg(otter_bin()).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libtorch_cpu.so"), "links libtorch_cpu:\n{text}");
    assert!(!text.contains("libtorch_cuda.so"), "libtorch_cuda must not be linked:\n{text}");
    assert!(!text.contains("not found"), "unresolved libraries without LD_LIBRARY_PATH:\n{text}");
    // And on demand it loads (on a machine without a GPU, CUDA then reports unavailable).
    let (ok, _, err) = run_otter(&["eval", "--model", "x", "--inputs", "y", "--out", "z", "--device", "cuda"]);
    assert!(!ok);
    assert!(err.contains("CUDA is not available") || err.contains("cannot read"), "{err}");
    assert!(!err.contains("cannot load libtorch_cuda"), "{err}");
}
