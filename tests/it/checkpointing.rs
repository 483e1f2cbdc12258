//! Activation checkpointing (`train.activation_checkpointing`) changes memory, not math:
//! recomputing each decoder layer (with its cross-attention block), and the perceiver's
//! layers too, in backward gives the gradients of the plain forward, also when the
//! gradient sync is overlapped with backward (its hooks fire inside the recomputation).

use crate::common;

use common::*;
use otter::cmd::eval::evaluate;
use otter::model::checkpoint::{recomputed_segments, ActivationCheckpointing};
use otter::model::weights::LoadOptions;
use otter::model::Otter;
use otter::tensors::TensorFile;
use std::collections::BTreeMap;
use tch::Tensor;

/// The recomputation counter is per process: tests that run checkpointed segments take
/// turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny(mode: ActivationCheckpointing) -> Otter {
    tiny_at(&tiny_model(), mode)
}

fn tiny_at(dir: &std::path::Path, mode: ActivationCheckpointing) -> Otter {
    let mut m = Otter::load_dir(dir, LoadOptions::default()).expect("tiny fixture loads");
    m.set_activation_checkpointing(mode);
    m
}

/// Loss and every trainable gradient on a parity case (several images per sample,
/// padding, text before the first image).
/// Also the number of segments recomputed in backward.
/// `fixtures` holds `tiny_otter/` and `parity/` (the LLaMA or the MPT ones).
fn loss_and_grads(fixtures: &std::path::Path, mode: ActivationCheckpointing, case: &str) -> (f64, BTreeMap<String, Tensor>, u64) {
    let inputs = TensorFile::read(&fixtures.join(format!("parity/{case}.safetensors"))).unwrap();
    let before = recomputed_segments();
    let out = evaluate(&tiny_at(&fixtures.join("tiny_otter"), mode), &inputs, true).unwrap();
    (out.loss.unwrap().double_value(&[]), out.grads.into_iter().collect(), recomputed_segments() - before)
}

#[test]
fn checkpointed_layers_give_the_gradients_of_the_plain_forward() {
    use ActivationCheckpointing::*;
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Both backbones: LLaMA (RoPE tables and mask) and MPT (ALiBi bias) segments.
    for (fixtures, name) in [(fixtures(), "incontext"), (fixtures(), "pretext"), (mpt_fixtures(), "incontext"), (mpt_fixtures(), "pretext")] {
        let case = format!("{} {name}", tiny_at(&fixtures.join("tiny_otter"), None).cfg.backbone().name());
        let (loss, want, none) = loss_and_grads(&fixtures, None, name);
        assert_eq!(none, 0, "{case}: nothing is recomputed without checkpointing");
        let cfg = tiny_at(&fixtures.join("tiny_otter"), None).cfg;
        for (mode, segments) in [(DecoderLayers, cfg.text.num_layers()), (All, cfg.text.num_layers() + cfg.perceiver.depth)] {
            let (l, got, recomputed) = loss_and_grads(&fixtures, mode, name);
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

/// A group whose other rank computed exactly what this one did: the mean is the tensor
/// itself, but every bucket still goes through the sync path (flatten, launch on the
/// communication thread when overlapped, write back).
struct Mirror;

impl otter::train::grad_sync::TensorCollective for Mirror {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        2
    }
    fn all_reduce_mean_tensors(&mut self, _: &mut [Tensor]) -> Result<(), otter::comm::CommError> {
        Ok(())
    }
    fn broadcast_tensor(&mut self, _: &mut Tensor, _: usize) -> Result<(), otter::comm::CommError> {
        Ok(())
    }
}

/// The overlapped sync launches a bucket once its gradients are final; with checkpointing
/// they become final inside the recomputation's nested backward. A bucket launched too
/// early would carry a partial gradient: the updated weights would differ.
#[test]
fn overlapped_sync_with_checkpointing_updates_the_weights_as_without() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use otter::train::grad_sync::GradBuckets;
    use otter::train::optim::AdamWConfig;
    use otter::train::{GradSync, StepConfig, TensorBatch, Trainer};
    let inputs = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    let batch = TensorBatch {
        vision_x: inputs.get("vision_x").unwrap().shallow_clone(),
        input_ids: inputs.get("input_ids").unwrap().shallow_clone(),
        attention_mask: inputs.get("attention_mask").unwrap().shallow_clone(),
        labels: inputs.get("labels").unwrap().shallow_clone(),
    };
    let weights_after_steps = |mode: ActivationCheckpointing, overlap: bool| {
        let step_cfg = StepConfig { lr: 1e-3, warmup_steps: 0, total_steps: 10, clip: Some(1.0), adamw: AdamWConfig::default() };
        let mut trainer = Trainer::new(tiny(mode), step_cfg);
        // Small buckets: many launches, interleaved with the recomputed layers' backward.
        let buckets = GradBuckets::new(&trainer.model.trainable(), 16 << 10);
        assert!(buckets.num_buckets() > 8);
        for _ in 0..2 {
            let sync = GradSync { buckets: &buckets, comm: &mut Mirror, overlap, step_micro_batches: 2 };
            trainer.step_synced(std::slice::from_ref(&batch), Some(sync)).unwrap();
        }
        trainer.model.trainable().into_iter().map(|(n, t)| (n.to_string(), t.copy())).collect::<Vec<_>>()
    };
    let want = weights_after_steps(ActivationCheckpointing::None, false);
    for (mode, overlap) in [(ActivationCheckpointing::None, true), (ActivationCheckpointing::All, true), (ActivationCheckpointing::All, false)] {
        let got = weights_after_steps(mode, overlap);
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let d = max_abs_diff(g, w);
            assert!(d <= 1e-6, "{mode}, overlap {overlap}: {name} differs by {d} after two steps");
        }
    }
}

/// Issue 43: "bf16" must compute in bf16. `tch::autocast` only switched CUDA autocast on and
/// left libtorch's default dtype, fp16. CUDA autocast's state is thread-local and readable
/// without a device: every entry of the model (the forward, each perceiver block, each
/// decoder layer, and their recomputation in backward on autograd's thread) must see it
/// on, in bf16.
#[test]
fn every_autocast_entry_runs_in_bf16_including_the_recompute_in_backward() {
    use otter::model::precision::{cuda_autocast_state, probe, Site};
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inputs = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    let mut model = tiny(ActivationCheckpointing::All);
    model.set_autocast_for_tests(true);
    let seen = probe(|| drop(evaluate(&model, &inputs, true).unwrap()));
    let count = |site: Site, recompute: bool| seen.iter().filter(|s| s.0 == site && s.3 == recompute).count();
    let cfg = &model.cfg;
    assert_eq!(seen.iter().filter(|s| s.0 == Site::Forward).count(), 1, "{seen:?}");
    assert_eq!(count(Site::PerceiverBlock, false), cfg.perceiver.depth, "forward, without a graph");
    assert_eq!(count(Site::PerceiverBlock, true), cfg.perceiver.depth, "recomputed in backward");
    assert_eq!(count(Site::DecoderLayer, false), cfg.text.num_layers());
    assert_eq!(count(Site::DecoderLayer, true), cfg.text.num_layers());
    for (site, on, dtype, recompute) in &seen {
        assert!(*on && *dtype == tch::Kind::BFloat16, "{site:?} (recompute {recompute}) ran with autocast {on}, {dtype:?}");
    }
    assert_eq!(cuda_autocast_state(), (false, tch::Kind::Half), "the state is restored after the forward");
    // Without autocast (f32 training), nothing turns it on.
    model.set_autocast_for_tests(false);
    let plain = probe(|| drop(evaluate(&model, &inputs, true).unwrap()));
    assert!(!plain.is_empty() && plain.iter().all(|s| !s.1), "{plain:?}");
}
