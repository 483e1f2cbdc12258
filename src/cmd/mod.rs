//! `otter` subcommands. Each takes its parsed arguments and returns `anyhow::Result`.

pub mod bench;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod model_info;
pub mod overfit;
pub mod plan;

use anyhow::Result;
use tch::{Device, Kind};

/// `--device cpu|cuda[:N]`.
pub fn parse_device(s: &str) -> Result<Device> {
    let spec: crate::train::config::DeviceSpec = s.parse().map_err(anyhow::Error::msg)?;
    Ok(crate::model::weights::tch_device(spec))
}

/// `--dtype f32|bf16`: precision of frozen weights and of compute (bf16 = autocast).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    let p: crate::train::config::Precision = s.parse().map_err(anyhow::Error::msg)?;
    Ok(crate::model::weights::tch_kind(p))
}

/// Fails clearly instead of letting libtorch abort when CUDA is asked for but absent.
/// Loads CUDA first when a CUDA device is asked for (see `crate::cuda`).
pub fn check_device(device: Device) -> Result<()> {
    crate::cuda::ensure(device).map_err(|e| anyhow::anyhow!("--device {device:?}: {e}"))
}

/// The model differences between what checkpoint `step_dir` recorded and `model_dir` (with
/// the tokenizer the checkpoint's run used, or `model_dir/tokenizer.json`), as warnings
/// for commands that pair the two (`export`, `eval --ckpt`): nothing if the manifest
/// recorded no identity or they are equal.
pub fn model_warnings(step_dir: &std::path::Path, manifest: &crate::ckpt::Manifest, model_dir: &std::path::Path) -> Vec<String> {
    use otter_core::model::identity::{compute, first_difference, Source};
    let Some(recorded) = &manifest.identity else { return Vec::new() };
    let tokenizer = manifest.config["data"]["tokenizer"].as_str().map(std::path::PathBuf::from).filter(|p| p.exists()).unwrap_or_else(|| model_dir.join("tokenizer.json"));
    let now = match compute(Source::Dir(model_dir), &tokenizer) {
        Ok((id, _)) => id,
        Err(e) => return vec![format!("warning: the model identity of {} could not be computed: {e}", model_dir.display())],
    };
    let mut out = Vec::new();
    if let Some(d) = first_difference(recorded, &now) {
        out.push(format!(
            "warning: {} was trained with another model than {}: {d} (parts that differ: {})",
            step_dir.display(),
            model_dir.display(),
            recorded.parts_differing(&now).iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        ));
    }
    out
}
