//! `otter plan`: the memory one data-parallel rank needs for a job, from its config alone
//! (no weights), and whether it fits a device (`otter_core::train::plan`).

use crate::run_config::{ModelSource, RunConfig};
use crate::train::plan::{largest_micro_batch, plan, PlanInput, FIT_FRACTION};
use anyhow::{Context, Result};
use otter_core::train::config::{DeviceSpec, Precision};
use std::path::Path;

pub struct PlanArgs<'a> {
    pub config: &'a Path,
    /// A preset or model directory instead of the job's `model` section.
    pub model: Option<&'a str>,
    pub world: u64,
    pub gpu_mem_gb: Option<f64>,
    pub media_per_sample: u64,
    pub json: bool,
}

pub fn input(a: &PlanArgs) -> Result<PlanInput> {
    let cfg = RunConfig::from_file(a.config)?;
    let model = match a.model {
        Some(m) => ModelSource::from_arg(m)?.config()?,
        None => cfg.model_source(a.config)?.config()?,
    };
    let tc = cfg.train.clone().with_context(|| format!("{}: no `train` section", a.config.display()))?;
    let data = cfg.data.clone().with_context(|| format!("{}: no `data` section", a.config.display()))?;
    let cuda = matches!(tc.device, DeviceSpec::Cuda(_));
    anyhow::ensure!(a.world >= 1, "--world must be at least 1");
    Ok(PlanInput {
        model,
        bf16: cuda && tc.dtype == Precision::Bf16,
        fused_attention: cuda,
        micro_batch: data.batch_size as u64,
        seq_len: data.max_seq_len as u64,
        media_per_sample: a.media_per_sample,
        frames: 1,
        world: a.world,
        optimizer_sharding: tc.optimizer_sharding,
        checkpointing: tc.activation_checkpointing,
        bucket_bytes: (cfg.comm.bucket_mb * (1u64 << 20) as f64) as u64,
        overlap: cfg.comm.overlap,
        device_bytes: a.gpu_mem_gb.map(|g| (g * 1e9) as u64),
    })
}

pub fn run(a: PlanArgs) -> Result<()> {
    let input = input(&a)?;
    let p = plan(&input);
    let fits = input.device_bytes.map(|d| (p.fits(d), largest_micro_batch(&input, d)));
    if a.json {
        let v = serde_json::json!({
            "plan": p,
            "micro_batch": input.micro_batch,
            "world": input.world,
            "device_bytes": input.device_bytes,
            "fits": fits.map(|f| f.0),
            "largest_micro_batch": fits.and_then(|f| f.1),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let gb = |b: u64| format!("{:>8.2} GB", b as f64 / 1e9);
    println!(
        "per rank: world {}, micro-batch {} x {} tokens, {} media/sample, {}, attention {}, activation checkpointing {}",
        input.world,
        input.micro_batch,
        input.seq_len,
        input.media_per_sample,
        if input.bf16 { "bf16 (autocast)" } else { "f32" },
        match (input.fused_attention, input.model.backbone()) {
            (false, _) => "eager",
            (true, crate::model::config::Backbone::Llama) => "fused",
            // ALiBi's bias is added in f32: MPT's self-attention is always the eager path.
            (true, crate::model::config::Backbone::Mpt) => "fused (cross-attention; MPT self-attention eager)",
        },
        input.checkpointing
    );
    for (what, b) in [
        ("frozen weights", p.frozen_weights),
        ("trainable weights (f32)", p.trainable_weights),
        ("autocast bf16 copies", p.autocast_copies),
        ("gradients (f32)", p.gradients),
        ("optimizer state (AdamW)", p.optimizer_state),
        ("communication buckets", p.comm_buckets),
        ("activations (estimate)", p.activations),
    ] {
        println!("  {what:<26} {}", gb(b));
    }
    println!("  {:<26} {}", "total", gb(p.total));
    if let (Some(d), Some((ok, largest))) = (input.device_bytes, fits) {
        let verdict = if ok { "fits" } else { "does NOT fit" };
        println!("device {:.0} GB (usable {:.0}%): {verdict}", d as f64 / 1e9, FIT_FRACTION * 100.0);
        match largest {
            Some(b) => println!("largest micro-batch that fits: {b}"),
            None => println!("not even a micro-batch of 1 fits"),
        }
    }
    Ok(())
}
