//! `otter train --config RUN.yaml [--resume]`: the full single-process run.
//!
//! Reads top to bottom: build model and data, then for each optimizer step take
//! `grad_accum` batches from the loader, step, log, and every `save_every` steps save a
//! checkpoint (`crate::ckpt`: trainable weights, AdamW moments and step, data cursor,
//! schedule, config, frozen-weight checksums) under `out_dir/checkpoints/step-N/`,
//! asynchronously: the loop only waits while the state is copied to host memory. At the end, `final_weights.safetensors` holds the trainable weights
//! under upstream names (what upstream's `load_state_dict(strict=False)` takes).

use super::config::TrainConfig;
use super::optim::AdamWConfig;
use super::schedule::warmup_steps;
use super::{StepConfig, TensorBatch, Trainer};
use crate::ckpt;
use crate::data::order::Cursor;
use crate::data::{DataSource, Loader};
use crate::model::weights::{LoadOptions, Params};
use crate::model::Otter;
use crate::run_config::{ModelSource, RunConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
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
    /// The run's reduction (`comm.deterministic`): a resumed run keeps the one its
    /// checkpoint was trained with (absent in older checkpoints: the float one).
    #[serde(default)]
    pub deterministic: bool,
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
    /// With `resume`: this committed step instead of the newest.
    pub resume_step: Option<u64>,
    /// With `resume`: parts of the model allowed to differ from the checkpoint's record.
    pub accept_model_change: Vec<otter_core::model::identity::Part>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    // --- configuration --------------------------------------------------------------
    let run_cfg = RunConfig::from_file(args.config)?;
    let source_kind = run_cfg.model_source(args.config)?;
    let tc: TrainConfig = run_cfg.train.clone().with_context(|| format!("{}: no `train` section", args.config.display()))?;
    let data_cfg = run_cfg.data.clone().with_context(|| format!("{}: no `data` section", args.config.display()))?;
    let opts = LoadOptions::for_run(tc.device, tc.dtype);
    let device = opts.device;
    crate::cuda::ensure(device).map_err(|e| anyhow::anyhow!("{}: train.device {}: {e}", args.config.display(), tc.device))?;

    // --- model and data -------------------------------------------------------------
    let mut model = match &source_kind {
        ModelSource::Dir(dir) => Otter::load_dir(dir, opts)?,
        ModelSource::Preset(_) => {
            let cfg = source_kind.config()?;
            let params = Params::random(&cfg, tc.seed as i64, opts);
            Otter::new(cfg, params, opts)
        }
    };
    model.set_activation_checkpointing(tc.activation_checkpointing);
    if tc.optimizer_sharding {
        eprintln!("{}: train.optimizer_sharding shards over a distributed job's ranks; one process keeps all the state", args.config.display());
    }
    if data_cfg.image_size != model.cfg.vision.image_size {
        bail!(
            "{}: field `data.image_size`: {} does not match the model's vision image_size {}",
            args.config.display(),
            data_cfg.image_size,
            model.cfg.vision.image_size
        );
    }
    let source = Arc::new(DataSource::open(&data_cfg, Some(model.cfg.text.vocab_size()))?);
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
    // One process, the same reduction as a job's ranks: its run is theirs, bit for bit.
    trainer.deterministic = run_cfg.comm.deterministic;

    // --- resume ---------------------------------------------------------------------
    std::fs::create_dir_all(&tc.out_dir).with_context(|| tc.out_dir.display().to_string())?;
    let ckpt_dir = tc.out_dir.join("checkpoints");
    let mut state = RunState { step: 0, epoch: 0, cursor: Cursor::default(), total_steps, deterministic: trainer.deterministic };
    // What every save records and every resume checks (cached: a stat per file after the
    // first run on this copy of the model).
    let (identity, _) = run_cfg.model_identity(args.config)?;
    if args.resume {
        let step = match args.resume_step {
            Some(s) => Some(s),
            None => ckpt::latest_committed(&ckpt_dir),
        };
        match step {
            Some(step) => {
                let dir = ckpt::step_dir(&ckpt_dir, step);
                let recorded = ckpt::read_manifest(&dir)?;
                match otter_core::model::identity::check_change(recorded.identity.as_ref(), &identity, &args.accept_model_change) {
                    Ok(Some(note)) => println!("{}: {note}", dir.display()),
                    Ok(None) => {}
                    Err(why) => bail!("{}: {why}", dir.join(ckpt::MANIFEST).display()),
                }
                let m = ckpt::load(&dir, &mut trainer)?;
                // Manifests from before model identities recorded the frozen files' CRCs.
                for f in m.frozen.iter().filter(|_| m.identity.is_none()) {
                    let now = ckpt::file_crc(&f.path)?;
                    if now.crc32 != f.crc32 {
                        bail!("{}: frozen weights changed since the checkpoint (crc32 {:08x}, was {:08x})", f.path.display(), now.crc32, f.crc32);
                    }
                }
                state = serde_json::from_value(m.data.clone()).with_context(|| format!("{}: field `data`", ckpt::step_dir(&ckpt_dir, step).join(ckpt::MANIFEST).display()))?;
                println!("resuming from step {} (epoch {}) of {}", state.step, state.epoch, ckpt::step_dir(&ckpt_dir, step).display());
                if state.deterministic != trainer.deterministic {
                    println!(
                        "the checkpoint was trained with comm.deterministic: {}; the run keeps it (the job file says {})",
                        state.deterministic, trainer.deterministic
                    );
                    trainer.deterministic = state.deterministic;
                }
            }
            None => println!("no committed checkpoint in {}: starting fresh", ckpt_dir.display()),
        }
    } else if ckpt::latest_committed(&ckpt_dir).is_some() {
        bail!("{} already holds a run; pass --resume to continue it or choose another train.out_dir", tc.out_dir.display());
    }
    let mut saver = ckpt::AsyncSaver::default();
    let config_json = serde_json::to_value(&run_cfg)?;
    let save = |saver: &mut ckpt::AsyncSaver, trainer: &mut Trainer, state: &RunState| -> Result<()> {
        let m = ckpt::Manifest {
            format_version: ckpt::FORMAT_VERSION,
            step: state.step,
            epoch: state.epoch,
            world_size: 1,
            partition: Vec::new(),
            shards: Vec::new(),
            lr: trainer.cfg.lr,
            warmup_steps: trainer.cfg.warmup_steps,
            total_steps: trainer.cfg.total_steps,
            model_seed: tc.seed,
            data_seed: data_cfg.seed,
            data: serde_json::to_value(state)?,
            config: config_json.clone(),
            frozen: Vec::new(),
            identity: Some(identity.clone()),
            generation: None,
        };
        saver.save(trainer, &ckpt_dir, m, tc.keep_last)?;
        Ok(())
    };
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
            let _step_span = tracing::info_span!("step", step = state.step).entered();
            let t0 = Instant::now();
            let wait0 = loader.wait;
            let mut micro = Vec::new();
            let mut tokens = 0;
            let data_span = tracing::info_span!("data").entered();
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
            drop(data_span);
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
                let _span = tracing::info_span!("checkpoint", step = state.step).entered();
                save(&mut saver, &mut trainer, &state)?;
            }
            if stop {
                saver.wait()?;
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
    if ckpt::latest_committed(&ckpt_dir) != Some(state.step) {
        save(&mut saver, &mut trainer, &state)?;
    }
    saver.wait()?;
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

