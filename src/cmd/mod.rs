//! `otter` subcommands. Each takes its parsed arguments and returns `anyhow::Result`.

pub mod bench;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod model_info;
pub mod overfit;

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `--device cpu|cuda[:N]`.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s if s.starts_with("cuda:") => Device::Cuda(s[5..].parse()?),
        other => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    })
}

/// `--dtype f32|bf16`: precision of frozen weights and of compute (bf16 = autocast).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("unknown dtype `{other}` (f32, bf16)"),
    })
}

/// Fails clearly instead of letting libtorch abort when CUDA is asked for but absent.
/// Loads CUDA first when a CUDA device is asked for (see `crate::cuda`).
pub fn check_device(device: Device) -> Result<()> {
    if device.is_cuda() {
        crate::cuda::load().map_err(anyhow::Error::msg)?;
    }
    if device.is_cuda() && !tch::Cuda::is_available() {
        bail!("--device {device:?}: CUDA is not available on this machine");
    }
    Ok(())
}
