//! `otter export --ckpt DIR/step-N --out PATH [--format final-weights|hf]`.
//!
//! * `final-weights`: the trainable weights under upstream names in one safetensors file
//!   (what upstream's `load_state_dict(strict=False)` takes).
//! * `hf`: a complete model directory: `config.json` (and `tokenizer.json`) of the run's
//!   model, its safetensors files with the trained tensors substituted (same file split as
//!   the source, so memory stays bounded by one file), and
//!   `model.safetensors.index.json`. Loadable by `otter eval` and by upstream code.

use crate::ckpt;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Trainable weights of a committed step, by upstream name (checksums verified).
pub fn trained_weights(step_dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let m = ckpt::read_manifest(step_dir)?;
    let mut out = BTreeMap::new();
    for (names, info) in m.partition.iter().zip(&m.shards) {
        if names.is_empty() {
            continue;
        }
        for (k, t) in ckpt::shard_tensors(step_dir, info)? {
            if let Some(name) = k.strip_prefix("param.") {
                out.insert(name.to_string(), t);
            }
        }
    }
    Ok(out)
}

pub fn run(step_dir: &Path, out: &Path, format: &str) -> Result<()> {
    let weights = trained_weights(step_dir)?;
    match format {
        "final-weights" => {
            let list: Vec<(String, Tensor)> = weights.into_iter().collect();
            crate::tensors::write(out, &list)?;
            println!("wrote {} ({} trainable tensors)", out.display(), list.len());
        }
        "hf" => {
            let m = ckpt::read_manifest(step_dir)?;
            let dir = m.config["model"]["dir"]
                .as_str()
                .map(PathBuf::from)
                .context("`hf` export needs the run's model directory (the run used a preset: export final-weights instead)")?;
            for w in super::model_warnings(step_dir, &m, &dir) {
                eprintln!("{w}");
            }
            std::fs::create_dir_all(out)?;
            for f in ["config.json", "tokenizer.json"] {
                if dir.join(f).exists() {
                    std::fs::copy(dir.join(f), out.join(f)).with_context(|| dir.join(f).display().to_string())?;
                }
            }
            let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
            sources.sort();
            let mut weight_map = BTreeMap::new();
            let mut replaced = 0;
            for src in &sources {
                let name = src.file_name().expect("file").to_string_lossy().into_owned();
                let mut tensors = Tensor::read_safetensors(src).with_context(|| src.display().to_string())?;
                for (k, t) in tensors.iter_mut() {
                    if let Some(w) = weights.get(k) {
                        *t = w.to_kind(t.kind());
                        replaced += 1;
                    }
                    weight_map.insert(k.clone(), name.clone());
                }
                crate::tensors::write(&out.join(&name), &tensors)?;
            }
            if replaced != weights.len() {
                bail!("{} of {} trained tensors found in {}", replaced, weights.len(), dir.display());
            }
            let index = serde_json::json!({"metadata": {"otter_checkpoint": step_dir.display().to_string(), "step": m.step}, "weight_map": weight_map});
            std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
            println!("wrote {} ({} files, {} trained tensors substituted)", out.display(), sources.len(), replaced);
        }
        other => bail!("--format {other}: expected final-weights or hf"),
    }
    Ok(())
}
