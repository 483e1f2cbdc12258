//! Checkpoints: sharded by a deterministic partition, committed by a manifest written
//! last, checked on load, reshardable to any world size, resumed exactly.

use crate::common;

use common::*;
use otter::ckpt::{self, Manifest};
use otter::model::{weights::LoadOptions, Otter};
use otter::tensors::TensorFile;
use otter::train::{optim::AdamWConfig, StepConfig, TensorBatch, Trainer};

fn trainer() -> Trainer {
    let model = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    Trainer::new(model, StepConfig { lr: 1e-3, warmup_steps: 1, total_steps: 10, clip: Some(1.0), adamw: AdamWConfig::default() })
}

fn batch() -> TensorBatch {
    let f = TensorFile::read(&fixtures().join("train/adamw_cosine.safetensors")).unwrap();
    TensorBatch {
        vision_x: f.get("vision_x").unwrap().shallow_clone(),
        input_ids: f.get("input_ids").unwrap().shallow_clone(),
        attention_mask: f.get("attention_mask").unwrap().shallow_clone(),
        labels: f.get("labels").unwrap().shallow_clone(),
    }
}

fn trained(steps: usize) -> Trainer {
    let b = batch();
    let mut t = trainer();
    for _ in 0..steps {
        t.step(std::slice::from_ref(&b));
    }
    t
}

fn manifest(step: u64, world: usize) -> Manifest {
    Manifest { lr: 1e-3, warmup_steps: 1, total_steps: 10, ..Manifest::new(step, world) }
}

/// Saves `t` as `world` ranks would: each stages and writes its share; then the manifest.
fn save_as_world(t: &Trainer, dir: &std::path::Path, step: u64, world: usize) {
    let part = ckpt::partition(&ckpt::param_sizes(t), world);
    let shards: Vec<_> = (0..world).map(|r| ckpt::write_shard(dir, &ckpt::stage(t, &part[r], r, world, None)).unwrap()).collect();
    ckpt::write_manifest(dir, &Manifest { partition: part, shards, ..manifest(step, world) }).unwrap();
}

fn same_state(a: &Trainer, b: &Trainer) {
    for ((n, p), (_, q)) in a.model.trainable().iter().zip(b.model.trainable().iter()) {
        assert!(p.equal(q), "{n} differs");
        let (ma, mb) = (&a.opt.state[*n], &b.opt.state[*n]);
        assert!(ma.exp_avg.equal(&mb.exp_avg) && ma.exp_avg_sq.equal(&mb.exp_avg_sq), "moments of {n} differ");
    }
    assert_eq!(a.opt.step, b.opt.step);
}

#[test]
fn any_world_size_loads_a_checkpoint_written_by_any_other() {
    let t = trained(3);
    for (w_from, w_to) in [(2usize, 3usize), (3, 1), (1, 2)] {
        let d = tempfile::tempdir().unwrap();
        save_as_world(&t, d.path(), 3, w_from);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), w_from + 1, "{w_from} shards + manifest");
        // Each of `w_to` ranks loads the full state (it reads the shards it needs).
        for _ in 0..w_to {
            let mut fresh = trainer();
            let m = ckpt::load(d.path(), &mut fresh).unwrap();
            assert_eq!((m.world_size, m.step), (w_from, 3));
            same_state(&t, &fresh);
        }
    }
}

#[test]
fn a_flipped_byte_or_a_truncated_shard_is_detected_and_names_the_file() {
    let t = trained(2);
    let d = tempfile::tempdir().unwrap();
    save_as_world(&t, d.path(), 2, 2);
    let shard = d.path().join(ckpt::shard_file(1, 2));
    let mut bytes = std::fs::read(&shard).unwrap();
    let i = bytes.len() - 17;
    bytes[i] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let e = ckpt::load(d.path(), &mut trainer()).unwrap_err().to_string();
    assert!(e.contains("shard-00001-of-00002.safetensors") && e.contains("checksum"), "{e}");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = ckpt::load(d.path(), &mut trainer()).unwrap_err().to_string();
    assert!(e.contains("shard-00001-of-00002.safetensors"), "{e}");
}

fn write_run(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let (ok, _, err) = run_otter(&["data", "synth", "--out", data.to_str().unwrap(), "--samples", "24", "--image-px", "40", "--seed", "2"]);
    assert!(ok, "{err}");
    let yaml = format!(
        "model: {{dir: {}}}\ndata:\n  tokenizer: {}\n  image_size: 32\n  batch_size: 2\n  shard_batches: 2\n  seed: 4\n  datasets:\n    - {{name: SYN, group: IMAGE_TEXT_IN_CONTEXT, instructions: data/SYN_instructions.json, images: data/SYN.json, train_config: data/SYN_train.json}}\ntrain:\n  epochs: 1\n  lr: 1.0e-3\n  grad_accum: 1\n  save_every: 2\n  keep_last: 3\n  out_dir: run\n",
        tiny_model().display(),
        tiny_model().join("tokenizer.json").display()
    );
    let p = dir.join("run.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn an_uncommitted_step_does_not_exist_and_a_corrupt_one_falls_back_explicitly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_run(d.path());
    let cfg = cfg.to_str().unwrap();
    let run = d.path().join("run");
    let ck = run.join("checkpoints");
    let (ok, _, err) = run_otter(&["train", "--config", cfg, "--stop-after", "6"]);
    assert!(ok, "{err}");
    assert_eq!(ckpt::committed_steps(&ck), vec![2, 4, 6], "keep_last 3");
    let reference = losses(&run);

    // A rank killed while writing step 6: its shard is there, the manifest is not.
    std::fs::remove_file(ckpt::step_dir(&ck, 6).join(ckpt::MANIFEST)).unwrap();
    assert_eq!(ckpt::latest_committed(&ck), Some(4));
    std::fs::write(run.join("metrics.jsonl"), reference.iter().take(4).map(|(s, l)| format!("{{\"step\":{s},\"loss\":{l}}}\n")).collect::<String>()).unwrap();
    let (ok, out, err) = run_otter(&["train", "--config", cfg, "--resume", "--stop-after", "6"]);
    assert!(ok, "{err}");
    assert!(out.contains("resuming from step 4"), "{out}");
    assert_eq!(losses(&run), reference, "steps 5 and 6 again, with the same losses");

    // A flipped byte in the newest shard: a clear error naming it, then an explicit
    // fallback to the previous committed step.
    let shard = ckpt::step_dir(&ck, 6).join(ckpt::shard_file(0, 1));
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let (ok, _, err) = run_otter(&["train", "--config", cfg, "--resume"]);
    assert!(!ok && err.contains("shard-00000-of-00001.safetensors") && err.contains("checksum"), "{err}");
    let (ok, out, err) = run_otter(&["train", "--config", cfg, "--resume", "--resume-step", "4", "--stop-after", "6"]);
    assert!(ok && out.contains("resuming from step 4"), "{err}\n{out}");
}

#[test]
fn export_hf_round_trips_through_otter_eval() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_run(d.path());
    let (ok, _, err) = run_otter(&["train", "--config", cfg.to_str().unwrap(), "--stop-after", "4"]);
    assert!(ok, "{err}");
    let step = d.path().join("run/checkpoints/step-4");
    let hf = d.path().join("hf");
    let fw = d.path().join("final.safetensors");
    for (fmt, out) in [("hf", &hf), ("final-weights", &fw)] {
        let (ok, _, err) = run_otter(&["export", "--ckpt", step.to_str().unwrap(), "--out", out.to_str().unwrap(), "--format", fmt]);
        assert!(ok, "{err}");
    }
    let inputs = fixtures().join("parity/incontext.safetensors");
    let got = d.path().join("eval.safetensors");
    let (ok, _, err) = run_otter(&["eval", "--model", hf.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", got.to_str().unwrap()]);
    assert!(ok, "{err}");
    // The original model with the trained weights put in, in process.
    let model = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    let trained = TensorFile::read(&fw).unwrap();
    tch::no_grad(|| {
        for (n, p) in model.trainable() {
            let mut p = p.shallow_clone();
            p.copy_(trained.get(n).unwrap());
        }
    });
    let x = TensorFile::read(&inputs).unwrap();
    let want = tch::no_grad(|| model.forward(x.get("vision_x").unwrap(), x.get("input_ids").unwrap(), x.get("attention_mask").unwrap()));
    let got = TensorFile::read(&got).unwrap();
    let diff = max_abs_diff(got.get("logits").unwrap(), &want);
    assert!(diff == 0.0, "logits differ by {diff}");
    // ... and the trained weights really differ from the original ones.
    let orig = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    assert!(orig.trainable().iter().any(|(n, p)| !p.equal(trained.get(n).unwrap())));
}

#[test]
fn a_save_reusing_the_previous_saves_staging_buffers_writes_the_current_state() {
    let d = tempfile::tempdir().unwrap();
    let names: Vec<String> = ckpt::partition(&ckpt::param_sizes(&trained(1)), 1).swap_remove(0);
    let t1 = trained(1);
    let first = ckpt::stage(&t1, &names, 0, 1, None);
    // One more step changes every weight and moment; the reused buffers must follow.
    let t2 = trained(2);
    let reused = ckpt::write_shard(&d.path().join("reused"), &ckpt::stage(&t2, &names, 0, 1, Some(first))).unwrap();
    let fresh = ckpt::write_shard(&d.path().join("fresh"), &ckpt::stage(&t2, &names, 0, 1, None)).unwrap();
    let stale = ckpt::write_shard(&d.path().join("stale"), &ckpt::stage(&t1, &names, 0, 1, None)).unwrap();
    assert_eq!(reused, fresh, "same bytes as a save into new buffers");
    assert_ne!(reused.crc32, stale.crc32, "not the previous save's state");
}

/// Retention recycles: the shard file of a step it removes goes into the pool, the next
/// shard write overwrites it in place, and the result is byte for byte a fresh file's,
/// even though the recycled file was longer; the step then loads exactly.
#[test]
fn retention_recycles_shard_files_and_a_recycled_write_equals_a_fresh_one() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    let t2 = trained(2);
    save_as_world(&t2, &ckpt::step_dir(&ck, 1), 1, 1); // one shard: the whole state
    save_as_world(&t2, &ckpt::step_dir(&ck, 2), 2, 1);
    assert_eq!(ckpt::retain(&ck, 1, None).unwrap(), vec![1]);
    let pool = || -> Vec<std::path::PathBuf> { std::fs::read_dir(ck.join(ckpt::RECYCLE)).unwrap().flatten().map(|e| e.path()).collect() };
    assert_eq!(pool().len(), 1, "step 1's shard is in the pool");
    let recycled_len = std::fs::metadata(&pool()[0]).unwrap().len();

    // Step 3 on 2 ranks: rank 0's shard (about half the state) goes over the recycled file.
    let t3 = trained(3);
    let part = ckpt::partition(&ckpt::param_sizes(&t3), 2);
    let dir = ckpt::step_dir(&ck, 3);
    let shards: Vec<_> = (0..2).map(|r| ckpt::write_shard(&dir, &ckpt::stage(&t3, &part[r], r, 2, None)).unwrap()).collect();
    assert!(pool().is_empty(), "the write took the recycled file");
    let fresh = ckpt::write_shard(&d.path().join("elsewhere/step-3"), &ckpt::stage(&t3, &part[0], 0, 2, None)).unwrap();
    assert_eq!(shards[0], fresh, "same size and checksum as a new file");
    let len = std::fs::metadata(dir.join(&shards[0].file)).unwrap().len();
    assert!(len == fresh.bytes && len < recycled_len, "trimmed to its own length ({len} of {recycled_len})");
    ckpt::write_manifest(&dir, &Manifest { partition: part, shards, ..manifest(3, 2) }).unwrap();
    let mut loaded = trainer();
    ckpt::load(&dir, &mut loaded).unwrap();
    same_state(&loaded, &t3);
}

/// An asynchronous save stages in the background while the next step runs: the shard
/// holds the state at the save, byte for byte, not the one the next update wrote.
#[test]
fn an_async_save_holds_the_state_at_the_save_while_the_next_step_runs() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trained(1);
    let names: Vec<String> = ckpt::partition(&ckpt::param_sizes(&t), 1).swap_remove(0);
    let at_save = ckpt::write_shard(&d.path().join("expected"), &ckpt::stage(&t, &names, 0, 1, None)).unwrap();
    let ck = d.path().join("ck");
    let mut saver = ckpt::AsyncSaver::default();
    saver.save(&mut t, &ck, manifest(1, 1), 1).unwrap();
    t.step(std::slice::from_ref(&batch())); // its update waits for the staging
    assert_eq!(saver.wait().unwrap(), Some(1));
    let m = ckpt::read_manifest(&ckpt::step_dir(&ck, 1)).unwrap();
    assert_eq!(m.shards[0].crc32, at_save.crc32, "the state at the save");
    let after = ckpt::write_shard(&d.path().join("after"), &ckpt::stage(&t, &names, 0, 1, None)).unwrap();
    assert_ne!(after.crc32, at_save.crc32, "the step did update the state");
}

/// The trainer's update waits for a registered background reader: a reader that copies a
/// weight only once the update is blocked on it still sees it as before the update,
/// which runs after it.
#[test]
fn the_update_waits_for_a_background_reader_of_the_state() {
    let mut t = trained(1);
    let (name, p) = t.model.trainable().into_iter().next().map(|(n, p)| (n.to_string(), p.shallow_clone())).unwrap();
    let before = p.copy();
    let fence = otter::train::ReadFence::new();
    t.hold_updates_until(fence.clone());
    let reader = std::thread::spawn(move || {
        fence.wait_for_writer(); // forward and backward are done; the update is held back
        let seen = p.copy();
        fence.release();
        seen
    });
    let stats = t.step(std::slice::from_ref(&batch()));
    let seen = reader.join().unwrap();
    assert!(seen.equal(&before), "{name}: the reader saw the state before the update");
    assert!(!stats.checkpoint_wait.is_zero());
    let now = t.model.trainable().into_iter().find(|(n, _)| *n == name).unwrap().1.copy();
    assert!(!now.equal(&before), "{name}: the update then ran");
}
