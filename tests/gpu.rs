//! Checks that need a CUDA device. Ignored in the default (CPU) run; `scripts/gpu-check.sh`
//! runs them with `--ignored` and fails if no GPU is visible. Each prints its numbers.
#![cfg(feature = "torch")]

mod common;

use common::*;
use otter::cmd::eval::evaluate;
use otter::model::weights::LoadOptions;
use otter::model::Otter;
use otter::tensors::TensorFile;
use tch::{Device, Kind};

fn cuda() -> Device {
    otter::cuda::load().expect("libtorch_cuda loads");
    assert!(tch::Cuda::is_available(), "no CUDA device visible (these checks need a GPU)");
    Device::Cuda(0)
}

/// Same tolerances as the CPU parity tests (fixtures README), on CUDA in f32.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn gpu_parity_f32_matches_upstream() {
    let model = Otter::load_dir(&tiny_model(), LoadOptions { device: cuda(), frozen_kind: Kind::Float }).unwrap();
    for case in ["incontext", "pretext"] {
        let want = TensorFile::read(&fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
        let out = evaluate(&model, &want, true).unwrap();
        let dl = max_abs_diff(&out.logits.to_device(Device::Cpu), want.get("logits").unwrap());
        let loss = out.loss.unwrap().to_device(Device::Cpu);
        let dloss = max_abs_diff(&loss.reshape([1]), want.get("loss").unwrap());
        let mut worst = 0f64;
        for (name, g) in &out.grads {
            let w = want.get(name).unwrap();
            let rel = max_abs_diff(&g.to_device(Device::Cpu), w) / max_abs(w).max(1.0);
            worst = worst.max(rel);
        }
        println!("gpu f32 {case}: logits max|diff| {dl:.3e}, loss |diff| {dloss:.3e}, worst grad rel diff {worst:.3e}");
        assert!(dl <= 1e-4 && dloss <= 1e-5 && worst <= 1e-4, "{case}: outside the fixture tolerances");
    }
}

/// bf16 frozen weights + autocast, f32 master weights: loss within 2e-2 of upstream f32.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn gpu_bf16_loss_tracks_upstream_f32() {
    let model = Otter::load_dir(&tiny_model(), LoadOptions { device: cuda(), frozen_kind: Kind::BFloat16 }).unwrap();
    for (name, p) in &model.params.tensors {
        let want = if p.requires_grad() { Kind::Float } else { Kind::BFloat16 };
        assert_eq!(p.kind(), want, "{name}: trainable master weights f32, frozen bf16");
    }
    for case in ["incontext", "pretext"] {
        let want = TensorFile::read(&fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
        let out = evaluate(&model, &want, true).unwrap();
        let dl = max_abs_diff(&out.logits.to_device(Device::Cpu), want.get("logits").unwrap());
        let loss = out.loss.unwrap().to_device(Device::Cpu).double_value(&[]);
        let expected = want.get("loss").unwrap().double_value(&[0]);
        let finite = out.grads.iter().all(|(_, g)| g.isfinite().all().int64_value(&[]) == 1);
        println!("gpu bf16 {case}: loss {loss:.6} vs upstream f32 {expected:.6} (|diff| {:.3e}), logits max|diff| {dl:.3e}, grads finite: {finite}", (loss - expected).abs());
        assert!((loss - expected).abs() <= 2e-2 && finite, "{case}: bf16 loss off by {}", (loss - expected).abs());
    }
}
