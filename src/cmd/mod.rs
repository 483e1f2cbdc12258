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
