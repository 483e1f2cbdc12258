//! `otter overfit`: trains on one fixed batch, the classic sanity check. Writes `losses`
//! and `lrs` (f64, per step) and `final.<name>` for every trainable parameter.

use crate::model::weights::LoadOptions;
use crate::model::Otter;
use crate::tensors::{self, TensorFile};
use crate::train::optim::AdamWConfig;
use crate::train::{StepConfig, TensorBatch, Trainer};
use anyhow::{Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct OverfitArgs<'a> {
    pub model: &'a Path,
    pub batch: &'a Path,
    pub steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub clip: f64,
    pub out: &'a Path,
    pub device: Device,
    pub dtype: Kind,
}

pub fn run(a: OverfitArgs) -> Result<()> {
    super::check_device(a.device)?;
    let model = Otter::load_dir(a.model, LoadOptions { device: a.device, frozen_kind: a.dtype })?;
    let f = TensorFile::read(a.batch)?;
    let (vx, ids, mask, labels) = (f.get("vision_x")?, f.get("input_ids")?, f.get("attention_mask")?, f.get("labels")?);
    model.check_inputs(vx, ids, mask).with_context(|| a.batch.display().to_string())?;
    let batch = TensorBatch {
        vision_x: vx.to_device(a.device),
        input_ids: ids.to_device(a.device),
        attention_mask: mask.to_device(a.device),
        labels: labels.to_device(a.device),
    };
    let cfg = StepConfig {
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        total_steps: a.steps,
        clip: (a.clip > 0.0).then_some(a.clip),
        adamw: AdamWConfig { weight_decay: a.weight_decay, ..Default::default() },
    };
    let mut trainer = Trainer::new(model, cfg);
    let (mut losses, mut lrs) = (Vec::new(), Vec::new());
    for step in 0..a.steps {
        let s = trainer.step(std::slice::from_ref(&batch));
        println!("step {step:>4}  loss {:.6}  lr {:.3e}  grad_norm {:.4}", s.loss, s.lr, s.grad_norm);
        losses.push(s.loss);
        lrs.push(s.lr);
    }
    let mut out = vec![("losses".to_string(), Tensor::from_slice(&losses)), ("lrs".to_string(), Tensor::from_slice(&lrs))];
    for (name, p) in trainer.model.trainable() {
        out.push((format!("final.{name}"), p.detach()));
    }
    tensors::write(a.out, &out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
