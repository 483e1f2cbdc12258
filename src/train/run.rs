//! `otter train --config RUN.yaml [--resume]`: the full single-process run.
//!
//! Reads top to bottom: build model and data, then for each optimizer step take
//! `grad_accum` batches from the loader, step, log, and every `save_every` steps save a
//! resumable state (trainable weights, AdamW moments and step, data cursor) under
//! `out_dir/state/`. At the end, `final_weights.safetensors` holds the trainable weights
//! under upstream names (what upstream's `load_state_dict(strict=False)` takes).

use super::config::TrainConfig;
use super::optim::AdamWConfig;
use super::schedule::warmup_steps;
use super::{StepConfig, TensorBatch, Trainer};
use crate::data::order::Cursor;
use crate::data::{DataSource, Loader};
use crate::model::weights::{LoadOptions, Params};
use crate::model::Otter;
use crate::run_config::{ModelSource, RunConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// Where a run is, besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub step: u64,
    pub epoch: u64,
    pub cursor: Cursor,
    pub total_steps: u64,
}

#[derive(Debug, Clone, Serialize)]
struct MetricsLine {
    step: u64,
    epoch: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: usize,
    tokens_per_s: f64,
    step_time_s: f64,
    data_wait_s: f64,
}

pub struct TrainArgs<'a> {
    pub config: &'a Path,
    pub resume: bool,
    /// Stop (after saving) once this many optimizer steps are done: for tests and for
    /// splitting a run across allocations.
    pub stop_after: Option<u64>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    // --- configuration --------------------------------------------------------------
    let run_cfg = RunConfig::from_file(args.config)?;
    let source_kind = run_cfg.model_source(args.config)?;
    let tc: TrainConfig = run_cfg.train.clone().with_context(|| format!("{}: no `train` section", args.config.display()))?;
    let data_cfg = run_cfg.data.clone().with_context(|| format!("{}: no `data` section", args.config.display()))?;
    let device = crate::cmd::parse_device(&tc.device)?;
    crate::cmd::check_device(device)?;
    let opts = LoadOptions { device, frozen_kind: crate::cmd::parse_dtype(&tc.dtype)? };

    // --- model and data -------------------------------------------------------------
    let model = match &source_kind {
        ModelSource::Dir(dir) => Otter::load_dir(dir, opts)?,
        ModelSource::Preset(_) => {
            let cfg = source_kind.config()?;
            let params = Params::random(&cfg, tc.seed as i64, opts);
            Otter::new(cfg, params, opts)
        }
    };
    if data_cfg.image_size != model.cfg.vision.image_size {
        bail!(
            "{}: field `data.image_size`: {} does not match the model's vision image_size {}",
            args.config.display(),
            data_cfg.image_size,
            model.cfg.vision.image_size
        );
    }
    let source = Arc::new(DataSource::open(&data_cfg, Some(model.cfg.text.vocab_size))?);
    let batches_per_epoch = source.plan(0).batches.len() as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(tc.grad_accum);
    let total_steps = tc.max_steps.unwrap_or(steps_per_epoch * tc.epochs);
    let step_cfg = StepConfig {
        lr: tc.lr,
        warmup_steps: warmup_steps(tc.warmup_ratio, total_steps),
        total_steps,
        clip: (tc.clip > 0.0).then_some(tc.clip),
        adamw: AdamWConfig { weight_decay: tc.weight_decay, ..Default::default() },
    };
    let mut trainer = Trainer::new(model, step_cfg);

    // --- resume ---------------------------------------------------------------------
    std::fs::create_dir_all(&tc.out_dir).with_context(|| tc.out_dir.display().to_string())?;
    let state_dir = tc.out_dir.join("state");
    let mut state = RunState { step: 0, epoch: 0, cursor: Cursor::default(), total_steps };
    if args.resume {
        match load_state(&state_dir, &mut trainer)? {
            Some(s) => {
                println!("resuming from step {} (epoch {})", s.step, s.epoch);
                state = s;
            }
            None => println!("no saved state in {}: starting fresh", state_dir.display()),
        }
    } else if state_dir.join("latest").exists() {
        bail!("{} already holds a run; pass --resume to continue it or choose another train.out_dir", tc.out_dir.display());
    }
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(tc.out_dir.join("metrics.jsonl"))?;

    // --- the loop -------------------------------------------------------------------
    let bar = indicatif::ProgressBar::new(total_steps).with_position(state.step);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("static template"),
    );
    let mut last_loss = f64::NAN;
    let (started, first_step) = (Instant::now(), state.step);
    let (mut samples, mut bad) = (0usize, 0usize);
    'epochs: while state.step < total_steps {
        let plan = Arc::new(source.plan(state.epoch));
        if state.cursor.batches.is_empty() || state.cursor.epoch != state.epoch {
            state.cursor = Cursor::over_shards(&plan, &(0..plan.num_shards()).collect::<Vec<_>>());
        }
        let mut loader = Loader::new(source.clone(), plan.clone(), state.cursor.clone());
        loop {
            let t0 = Instant::now();
            let wait0 = loader.wait;
            let mut micro = Vec::new();
            let mut tokens = 0;
            while (micro.len() as u64) < tc.grad_accum {
                match loader.next() {
                    None => break,
                    Some(b) => {
                        let b = b?;
                        samples += b.b;
                        if b.b > 0 {
                            tokens += b.tokens();
                            micro.push(TensorBatch::from_batch(&b, device));
                        }
                    }
                }
            }
            if micro.is_empty() {
                break; // epoch done
            }
            let s = trainer.step(&micro);
            state.step = trainer.step_count();
            state.cursor = loader.cursor().clone();
            last_loss = s.loss;
            let dt = t0.elapsed().as_secs_f64();
            let line = MetricsLine {
                step: state.step,
                epoch: state.epoch,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
                tokens,
                tokens_per_s: tokens as f64 / dt,
                step_time_s: dt,
                data_wait_s: (loader.wait - wait0).as_secs_f64(),
            };
            writeln!(metrics, "{}", serde_json::to_string(&line)?)?;
            bar.set_message(format!("loss {:.4}  lr {:.2e}  {:.0} tok/s", s.loss, s.lr, line.tokens_per_s));
            bar.set_position(state.step);
            let stop = args.stop_after.is_some_and(|n| state.step >= n);
            if state.step % tc.save_every == 0 || state.step >= total_steps || stop {
                save_state(&state_dir, &trainer, &state)?;
            }
            if stop {
                bar.abandon_with_message(format!("stopped after step {} (resume with --resume)", state.step));
                return Ok(());
            }
            if state.step >= total_steps {
                break 'epochs;
            }
        }
        bad += loader.bad.total();
        if loader.bad.total() > 0 {
            eprintln!("epoch {}: {}", state.epoch, loader.bad.report());
        }
        state.epoch += 1;
        state.cursor = Cursor::default();
    }
    bar.finish_with_message(format!("done: {} steps, final loss {last_loss:.4}", state.step));
    save_state(&state_dir, &trainer, &state)?;
    let final_path = tc.out_dir.join("final_weights.safetensors");
    let weights: Vec<(String, Tensor)> = trainer.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.detach())).collect();
    crate::tensors::write(&final_path, &weights)?;
    println!(
        "done: {} steps ({} this run) in {:.1}s, {samples} samples, {bad} bad samples skipped, final loss {last_loss:.4}",
        state.step,
        state.step - first_step,
        started.elapsed().as_secs_f64()
    );
    println!("wrote {} ({} trainable tensors)", final_path.display(), weights.len());
    Ok(())
}

/// Writes `state/step-N/{tensors.safetensors, state.json}` then points `state/latest` at
/// it (atomic rename), so a crash mid-save leaves the previous state in force.
fn save_state(dir: &Path, trainer: &Trainer, state: &RunState) -> Result<()> {
    let step_dir = dir.join(format!("step-{}", state.step));
    std::fs::create_dir_all(&step_dir)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, p) in trainer.model.trainable() {
        tensors.push((format!("param.{name}"), p.detach()));
    }
    for (name, m) in &trainer.opt.state {
        tensors.push((format!("exp_avg.{name}"), m.exp_avg.shallow_clone()));
        tensors.push((format!("exp_avg_sq.{name}"), m.exp_avg_sq.shallow_clone()));
    }
    crate::tensors::write(&step_dir.join("tensors.safetensors"), &tensors)?;
    std::fs::write(step_dir.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let tmp = dir.join("latest.tmp");
    std::fs::write(&tmp, format!("step-{}", state.step))?;
    std::fs::rename(&tmp, dir.join("latest"))?;
    // Keep the newest two states.
    let keep = [format!("step-{}", state.step)];
    let mut old: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let s = n.strip_prefix("step-")?.parse().ok()?;
            (!keep.contains(&n)).then_some((s, e.path()))
        })
        .collect();
    old.sort();
    while old.len() > 1 {
        let (_, p) = old.remove(0);
        std::fs::remove_dir_all(p)?;
    }
    Ok(())
}

fn load_state(dir: &Path, trainer: &mut Trainer) -> Result<Option<RunState>> {
    let latest = dir.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest)?;
    let step_dir = dir.join(name.trim());
    let state: RunState = serde_json::from_slice(&std::fs::read(step_dir.join("state.json"))?)
        .with_context(|| step_dir.join("state.json").display().to_string())?;
    let file = step_dir.join("tensors.safetensors");
    let all = crate::tensors::TensorFile::read(&file)?.tensors;
    let get = |key: String| all.get(&key).with_context(|| format!("{}: missing `{key}`", file.display()));
    tch::no_grad(|| -> Result<()> {
        for (name, p) in trainer.model.trainable() {
            let mut p = p.shallow_clone();
            p.copy_(get(format!("param.{name}"))?);
        }
        for (name, m) in trainer.opt.state.iter_mut() {
            m.exp_avg.copy_(get(format!("exp_avg.{name}"))?);
            m.exp_avg_sq.copy_(get(format!("exp_avg_sq.{name}"))?);
        }
        Ok(())
    })?;
    trainer.opt.step = state.step;
    Ok(Some(state))
}
