//! Training follows upstream's recipe exactly.
//!
//! Reference: tests/fixtures/train/adamw_cosine.* (8 steps of torch AdamW + cosine warmup
//! + clip_grad_norm_ on one batch). Tolerances (fixtures README): losses |diff| <= 1e-4,
//! final params max|diff| <= 1e-4. Also: stop + resume of `otter train` is exact.

use crate::common;

use common::*;
use otter::tensors::TensorFile;

/// The trainer `otter overfit` uses, from a model with no gradients (as the fixture's
/// generator started), follows upstream's 8-step trajectory.
#[test]
fn trainer_reproduces_upstream_adamw_cosine_trajectory() {
    use otter::model::weights::LoadOptions;
    use otter::model::Otter;
    use otter::train::optim::AdamWConfig;
    use otter::train::{StepConfig, TensorBatch, Trainer};
    let fixture = TensorFile::read(&fixtures().join("train/adamw_cosine.safetensors")).unwrap();
    let model = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    let cfg = StepConfig { lr: 1e-3, warmup_steps: 2, total_steps: 8, clip: Some(1.0), adamw: AdamWConfig::default() };
    let mut trainer = Trainer::new(model, cfg);
    let batch = TensorBatch {
        vision_x: fixture.get("vision_x").unwrap().shallow_clone(),
        input_ids: fixture.get("input_ids").unwrap().shallow_clone(),
        attention_mask: fixture.get("attention_mask").unwrap().shallow_clone(),
        labels: fixture.get("labels").unwrap().shallow_clone(),
    };
    let want_losses = Vec::<f64>::try_from(fixture.get("losses").unwrap()).unwrap();
    let want_lrs = Vec::<f64>::try_from(fixture.get("lrs").unwrap()).unwrap();
    let mut worst_loss = 0f64;
    for step in 0..8 {
        let s = trainer.step(std::slice::from_ref(&batch));
        let d = (s.loss - want_losses[step]).abs();
        worst_loss = worst_loss.max(d);
        assert!(d <= 1e-4, "step {step}: loss {} vs upstream {}", s.loss, want_losses[step]);
        assert!((s.lr - want_lrs[step]).abs() <= 1e-12, "step {step}: lr {} vs {}", s.lr, want_lrs[step]);
    }
    let mut worst = 0f64;
    for (name, p) in trainer.model.trainable() {
        let d = max_abs_diff(p, fixture.get(&format!("final.{name}")).unwrap());
        worst = worst.max(d);
        assert!(d <= 1e-4, "{name}: final value differs by {d}");
    }
    println!("losses max|diff| {worst_loss:.2e}, final params max|diff| {worst:.2e}");
}

/// `otter overfit` runs the same trainer: its losses, lrs and final parameters follow the
/// fixture within its tolerances, and the whole run equals the in-process trainer, bit for
/// bit.
#[test]
fn otter_overfit_command_runs_the_same_trainer() {
    use otter::model::weights::LoadOptions;
    use otter::model::Otter;
    use otter::train::optim::AdamWConfig;
    use otter::train::{StepConfig, TensorBatch, Trainer};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("overfit.safetensors");
    let batch = fixtures().join("train/adamw_cosine.safetensors");
    let (ok, stdout, err) = run_otter(&[
        "overfit", "--model", tiny_model().to_str().unwrap(), "--batch", batch.to_str().unwrap(), "--steps", "8",
        "--lr", "1e-3", "--warmup-steps", "2", "--weight-decay", "0.1", "--clip", "1.0", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}\n{stdout}");
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(&batch).unwrap();
    let gl = Vec::<f64>::try_from(got.get("losses").unwrap()).unwrap();
    let wl = Vec::<f64>::try_from(want.get("losses").unwrap()).unwrap();
    assert_eq!(gl.len(), 8);
    for (step, (g, w)) in gl.iter().zip(&wl).enumerate() {
        assert!((g - w).abs() <= 1e-4, "step {step}: loss {g} vs upstream {w}\n{gl:?}\n{wl:?}");
    }
    assert_eq!(Vec::<f64>::try_from(got.get("lrs").unwrap()).unwrap().len(), 8);
    for (g, w) in Vec::<f64>::try_from(got.get("lrs").unwrap()).unwrap().iter().zip(Vec::<f64>::try_from(want.get("lrs").unwrap()).unwrap()) {
        assert!((g - w).abs() <= 1e-12);
    }
    let cfg = StepConfig { lr: 1e-3, warmup_steps: 2, total_steps: 8, clip: Some(1.0), adamw: AdamWConfig::default() };
    let mut trainer = Trainer::new(Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap(), cfg);
    let tb = TensorBatch {
        vision_x: want.get("vision_x").unwrap().shallow_clone(),
        input_ids: want.get("input_ids").unwrap().shallow_clone(),
        attention_mask: want.get("attention_mask").unwrap().shallow_clone(),
        labels: want.get("labels").unwrap().shallow_clone(),
    };
    for step in 0..8 {
        assert_eq!(trainer.step(std::slice::from_ref(&tb)).loss, gl[step], "step {step}");
    }
    for (name, p) in trainer.model.trainable() {
        assert!(p.equal(got.get(&format!("final.{name}")).unwrap()), "{name}");
    }
    assert!(gl[7] < gl[0] - 0.3, "the loss falls on a fixed batch: {gl:?}");
}

fn write_run(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    if !data.exists() {
        let (ok, _, err) = run_otter(&[
            "data", "synth", "--out", data.to_str().unwrap(), "--samples", "24", "--image-px", "40", "--seed", "2",
        ]);
        assert!(ok, "{err}");
    }
    let yaml = format!(
        "model: {{dir: {}}}\ndata:\n  tokenizer: {}\n  image_size: 32\n  batch_size: 2\n  shard_batches: 2\n  seed: 4\n  datasets:\n    - {{name: SYN, group: IMAGE_TEXT_IN_CONTEXT, instructions: data/SYN_instructions.json, images: data/SYN.json, train_config: data/SYN_train.json}}\ntrain:\n  epochs: 2\n  lr: 1.0e-3\n  warmup_ratio: 0.1\n  grad_accum: 2\n  save_every: 2\n  out_dir: {name}\n",
        tiny_model().display(),
        tiny_model().join("tokenizer.json").display()
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn stopping_and_resuming_otter_train_gives_the_same_losses_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let full = write_run(dir.path(), "full");
    let split = write_run(dir.path(), "split");
    let (ok, out, err) = run_otter(&["train", "--config", full.to_str().unwrap()]);
    assert!(ok, "{err}\n{out}");
    let (ok, _, err) = run_otter(&["train", "--config", split.to_str().unwrap(), "--stop-after", "5"]);
    assert!(ok, "{err}");
    assert_eq!(losses(&dir.path().join("split")).len(), 5);
    let (ok, out, err) = run_otter(&["train", "--config", split.to_str().unwrap(), "--resume"]);
    assert!(ok, "{err}");
    assert!(out.contains("resuming from step 5"), "{out}");
    let a = losses(&dir.path().join("full"));
    let b = losses(&dir.path().join("split"));
    assert!(a.len() >= 10, "two epochs of 24 samples: {} steps", a.len());
    assert_eq!(a, b, "per-step losses after resume must equal the uninterrupted run's");
    assert!(a.last().unwrap().1 < a.first().unwrap().1, "training reduces the loss");
    let fa = TensorFile::read(&dir.path().join("full/final_weights.safetensors")).unwrap();
    let fb = TensorFile::read(&dir.path().join("split/final_weights.safetensors")).unwrap();
    assert_eq!(fa.tensors.len(), 49);
    for (k, v) in &fa.tensors {
        assert!(v.equal(fb.get(k).unwrap()), "{k} differs after resume");
    }
    // Without --resume an existing run is not overwritten.
    let (ok, _, err) = run_otter(&["train", "--config", full.to_str().unwrap()]);
    assert!(!ok && err.contains("--resume"), "{err}");
}

/// Issue 46: a run trained with `comm.deterministic` records it in its checkpoints, and a
/// resume keeps it even when the job file no longer says so: the resumed run equals the
/// uninterrupted deterministic run bit for bit (and the float reduction, the control, does
/// not).
#[test]
fn a_resumed_run_keeps_the_reduction_its_checkpoint_was_trained_with() {
    let dir = tempfile::tempdir().unwrap();
    let deterministic = |name: &str| {
        let p = write_run(dir.path(), name);
        let y = std::fs::read_to_string(&p).unwrap() + "  cpu_threads: 1\ncomm:\n  deterministic: true\n";
        std::fs::write(&p, y).unwrap();
        p
    };
    let train = |config: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["train", "--config", config.to_str().unwrap()];
        args.extend(extra);
        let (ok, out, err) = run_otter(&args);
        assert!(ok, "{err}\n{out}");
        out
    };
    train(&deterministic("full"), &[]);
    train(&deterministic("split"), &["--stop-after", "5"]);
    let out = train(&write_run(dir.path(), "split"), &["--resume"]);
    assert!(out.contains("comm.deterministic: true; the run keeps it"), "{out}");
    let float = write_run(dir.path(), "float");
    std::fs::write(&float, std::fs::read_to_string(&float).unwrap() + "  cpu_threads: 1\n").unwrap();
    train(&float, &[]);
    let (a, b, f) = (losses(&dir.path().join("full")), losses(&dir.path().join("split")), losses(&dir.path().join("float")));
    assert_eq!(a, b, "the resumed run is the deterministic one");
    let weights = |name: &str| TensorFile::read(&dir.path().join(name).join("final_weights.safetensors")).unwrap();
    let (wa, wb, wf) = (weights("full"), weights("split"), weights("float"));
    for (k, v) in &wa.tensors {
        assert!(v.equal(wb.get(k).unwrap()), "{k} differs after resume");
    }
    let float_differs = a != f || wa.tensors.iter().any(|(k, v)| !v.equal(wf.get(k).unwrap()));
    assert!(float_differs, "the control: the float reduction's run is another run");
}

/// The MPT backbone follows the same recipe: tests/fixtures/mpt/train/adamw_cosine.* (8
/// steps of torch AdamW + cosine warmup + clip_grad_norm_ on one batch, from a model with
/// no gradients; weight decay only on cross-attention weights, so `wte` gets none).
/// Tolerances (fixtures README): losses |diff| <= 1e-4, final params max|diff| <= 1e-4.
mod mpt {
    use super::*;
    use otter::model::weights::LoadOptions;
    use otter::model::Otter;
    use otter::train::optim::AdamWConfig;
    use otter::train::{StepConfig, TensorBatch, Trainer};

    fn fixture() -> std::path::PathBuf {
        mpt_fixtures().join("train/adamw_cosine.safetensors")
    }

    fn batch(f: &TensorFile) -> TensorBatch {
        TensorBatch {
            vision_x: f.get("vision_x").unwrap().shallow_clone(),
            input_ids: f.get("input_ids").unwrap().shallow_clone(),
            attention_mask: f.get("attention_mask").unwrap().shallow_clone(),
            labels: f.get("labels").unwrap().shallow_clone(),
        }
    }

    fn trainer() -> Trainer {
        let cfg = StepConfig { lr: 1e-3, warmup_steps: 2, total_steps: 8, clip: Some(1.0), adamw: AdamWConfig::default() };
        Trainer::new(Otter::load_dir(&tiny_mpt_model(), LoadOptions::default()).unwrap(), cfg)
    }

    #[test]
    fn trainer_reproduces_upstream_mpt_adamw_cosine_trajectory() {
        let want = TensorFile::read(&fixture()).unwrap();
        let mut trainer = trainer();
        assert_eq!(AdamWConfig::default().weight_decay, 0.1);
        let b = batch(&want);
        let want_losses = Vec::<f64>::try_from(want.get("losses").unwrap()).unwrap();
        let want_lrs = Vec::<f64>::try_from(want.get("lrs").unwrap()).unwrap();
        let mut worst_loss = 0f64;
        for step in 0..8 {
            let s = trainer.step(std::slice::from_ref(&b));
            let d = (s.loss - want_losses[step]).abs();
            worst_loss = worst_loss.max(d);
            assert!(d <= 1e-4, "step {step}: loss {} vs upstream {}", s.loss, want_losses[step]);
            assert!((s.lr - want_lrs[step]).abs() <= 1e-12, "step {step}: lr {} vs {}", s.lr, want_lrs[step]);
        }
        let mut worst = 0f64;
        let trained = trainer.model.trainable();
        assert_eq!(trained.len(), want.tensors.keys().filter(|k| k.starts_with("final.")).count());
        for (name, p) in trained {
            let d = max_abs_diff(p, want.get(&format!("final.{name}")).unwrap());
            worst = worst.max(d);
            assert!(d <= 1e-4, "{name}: final value differs by {d}");
        }
        println!("mpt: losses max|diff| {worst_loss:.2e} (<= 1e-4), final params max|diff| {worst:.2e} (<= 1e-4)");
    }

    /// `otter overfit` on the MPT model matches the fixture (no leftover gradients here, so
    /// every step is comparable) and equals the in-process trainer bit for bit.
    #[test]
    fn otter_overfit_command_reproduces_the_mpt_trajectory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("overfit.safetensors");
        let (ok, stdout, err) = run_otter(&[
            "overfit", "--model", tiny_mpt_model().to_str().unwrap(), "--batch", fixture().to_str().unwrap(), "--steps", "8",
            "--lr", "1e-3", "--warmup-steps", "2", "--weight-decay", "0.1", "--clip", "1.0", "--out", out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}\n{stdout}");
        let got = TensorFile::read(&out).unwrap();
        let want = TensorFile::read(&fixture()).unwrap();
        let gl = Vec::<f64>::try_from(got.get("losses").unwrap()).unwrap();
        let wl = Vec::<f64>::try_from(want.get("losses").unwrap()).unwrap();
        assert_eq!(gl.len(), 8);
        for (step, (g, w)) in gl.iter().zip(&wl).enumerate() {
            assert!((g - w).abs() <= 1e-4, "step {step}: {g} vs upstream {w}");
        }
        for (name, _) in trainer().model.trainable() {
            let key = format!("final.{name}");
            let d = max_abs_diff(got.get(&key).unwrap(), want.get(&key).unwrap());
            assert!(d <= 1e-4, "{name}: final value differs by {d}");
        }
        let mut trainer = trainer();
        let b = batch(&want);
        for (step, l) in gl.iter().enumerate() {
            assert_eq!(trainer.step(std::slice::from_ref(&b)).loss, *l, "step {step}");
        }
        for (name, p) in trainer.model.trainable() {
            assert!(p.equal(got.get(&format!("final.{name}")).unwrap()), "{name}");
        }
    }
}
