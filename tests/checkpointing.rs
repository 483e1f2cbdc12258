//! Activation checkpointing (`train.activation_checkpointing`) changes memory, not math:
//! recomputing each decoder layer (with its cross-attention block), and the perceiver's
//! layers too, in backward gives the gradients of the plain forward, also when the
//! gradient sync is overlapped with backward (its hooks fire inside the recomputation).

mod common;

use common::*;
use otter::cmd::eval::evaluate;
use otter::model::checkpoint::{recomputed_segments, ActivationCheckpointing};
use otter::model::weights::LoadOptions;
use otter::model::Otter;
use otter::tensors::TensorFile;
use std::collections::BTreeMap;
use tch::Tensor;

fn tiny(mode: ActivationCheckpointing) -> Otter {
    let mut m = Otter::load_dir(&tiny_model(), LoadOptions::default()).expect("tiny fixture loads");
    m.set_activation_checkpointing(mode);
    m
}

/// Loss and every trainable gradient on a parity case (several images per sample,
/// padding, text before the first image).
/// Also the number of segments recomputed in backward.
fn loss_and_grads(mode: ActivationCheckpointing, case: &str) -> (f64, BTreeMap<String, Tensor>, u64) {
    let inputs = TensorFile::read(&fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
    let before = recomputed_segments();
    let out = evaluate(&tiny(mode), &inputs, true).unwrap();
    (out.loss.unwrap().double_value(&[]), out.grads.into_iter().collect(), recomputed_segments() - before)
}

#[test]
fn checkpointed_layers_give_the_gradients_of_the_plain_forward() {
    use ActivationCheckpointing::*;
    for case in ["incontext", "pretext"] {
        let (loss, want, none) = loss_and_grads(None, case);
        assert_eq!(none, 0, "{case}: nothing is recomputed without checkpointing");
        let cfg = tiny(None).cfg;
        for (mode, segments) in [(DecoderLayers, cfg.text.num_hidden_layers), (All, cfg.text.num_hidden_layers + cfg.perceiver.depth)] {
            let (l, got, recomputed) = loss_and_grads(mode, case);
            assert_eq!(recomputed, segments as u64, "{case} {mode}: each checkpointed segment runs again in backward once");
            assert!((l - loss).abs() <= 1e-6, "{case} {mode}: loss {l} vs {loss}");
            assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{case} {mode}: the same gradients exist");
            for (name, w) in &want {
                let d = max_abs_diff(&got[name], w);
                assert!(d <= 1e-6, "{case} {mode}: {name} differs by {d}");
                assert!(max_abs(w) > 0.0 || name.contains("gate"), "{case}: {name} has a zero gradient: the check would be empty");
            }
        }
    }
}

#[test]
fn checkpointing_is_read_from_the_train_config() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = |v: &str| format!("model:\n  preset: tiny\ntrain:\n  out_dir: out\n  activation_checkpointing: {v}\n");
    for (text, want) in [("none", ActivationCheckpointing::None), ("decoder_layers", ActivationCheckpointing::DecoderLayers), ("all", ActivationCheckpointing::All)] {
        let p = dir.path().join(format!("{text}.yaml"));
        std::fs::write(&p, yaml(text)).unwrap();
        let cfg = otter::run_config::RunConfig::from_file(&p).unwrap();
        assert_eq!(cfg.train.unwrap().activation_checkpointing, want);
    }
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, yaml("layers")).unwrap();
    let err = otter::run_config::RunConfig::from_file(&p).unwrap_err().to_string();
    assert!(err.contains("activation_checkpointing") && err.contains("decoder_layers"), "{err}");
}
