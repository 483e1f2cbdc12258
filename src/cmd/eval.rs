//! `otter eval`: one forward (and optionally backward) pass on saved inputs.
//!
//! Reads `vision_x`, `input_ids`, `attention_mask` and optionally `labels` from a
//! safetensors file; writes `logits`, `loss` (when labels are given) and, with `--grads`,
//! `grad.<name>` for every trainable parameter. This is the interface users and checks
//! verify a model with: keep it stable.

use crate::model::weights::LoadOptions;
use crate::model::{causal_lm_loss, Otter};
use crate::tensors::{self, TensorFile};
use anyhow::{Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct EvalArgs<'a> {
    pub model: &'a Path,
    /// A committed checkpoint step (DIR/step-N) whose trained weights replace the model's.
    pub ckpt: Option<&'a Path>,
    pub inputs: &'a Path,
    pub out: &'a Path,
    pub grads: bool,
    pub device: Device,
    pub dtype: Kind,
}

/// What one eval produced (also used in-process by tests).
pub struct EvalOutput {
    pub logits: Tensor,
    pub loss: Option<Tensor>,
    pub grads: Vec<(String, Tensor)>,
}

pub fn evaluate(model: &Otter, inputs: &TensorFile, grads: bool) -> Result<EvalOutput> {
    let vision_x = inputs.get("vision_x")?;
    let input_ids = inputs.get("input_ids")?;
    let attention_mask = inputs.get("attention_mask")?;
    model.check_inputs(vision_x, input_ids, attention_mask).with_context(|| inputs.path.display().to_string())?;
    let labels = inputs.tensors.get("labels");
    if let Some(l) = labels {
        if l.size() != input_ids.size() {
            anyhow::bail!("{}: input `labels`: expected shape {:?}, got {:?}", inputs.path.display(), input_ids.size(), l.size());
        }
    }
    let run = || {
        let logits = model.forward(vision_x, input_ids, attention_mask);
        let loss = labels.map(|l| causal_lm_loss(&logits, l));
        (logits, loss)
    };
    if !grads {
        let (logits, loss) = tch::no_grad(run);
        return Ok(EvalOutput { logits, loss, grads: vec![] });
    }
    let (logits, loss) = run();
    let loss = loss.context("--grads needs `labels` in the inputs")?;
    for (_, p) in model.trainable() {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
    loss.backward();
    let grads = model
        .trainable()
        .into_iter()
        .map(|(n, p)| {
            let g = p.grad();
            let g = if g.defined() { g } else { p.zeros_like() };
            (format!("grad.{n}"), g)
        })
        .collect();
    Ok(EvalOutput { logits: logits.detach(), loss: Some(loss.detach()), grads })
}

pub fn run(args: EvalArgs) -> Result<()> {
    super::check_device(args.device)?;
    let opts = LoadOptions { device: args.device, frozen_kind: args.dtype };
    let model = Otter::load_dir(args.model, opts)?;
    if let Some(step_dir) = args.ckpt {
        let m = crate::ckpt::read_manifest(step_dir)?;
        for w in super::model_warnings(step_dir, &m, args.model) {
            eprintln!("{w}");
        }
        let trained = super::export::trained_weights(step_dir)?;
        let _g = tch::no_grad_guard();
        let mut replaced = 0;
        for (name, p) in model.trainable() {
            if let Some(w) = trained.get(name) {
                if w.size() != p.size() {
                    anyhow::bail!("{}: tensor {name}: shape {:?}, the model's is {:?}", step_dir.display(), w.size(), p.size());
                }
                p.shallow_clone().copy_(&w.to_kind(p.kind()).to_device(p.device()));
                replaced += 1;
            }
        }
        println!("{} trained tensors from {}", replaced, step_dir.display());
    }
    let inputs = TensorFile::read(args.inputs)?;
    let out = evaluate(&model, &inputs, args.grads)?;
    let mut tensors = vec![("logits".to_string(), out.logits)];
    if let Some(loss) = &out.loss {
        println!("loss {:.6}", loss.double_value(&[]));
        tensors.push(("loss".into(), loss.reshape([1])));
    }
    tensors.extend(out.grads);
    tensors::write(args.out, &tensors)?;
    println!("wrote {} tensors to {}", tensors.len(), args.out.display());
    Ok(())
}
