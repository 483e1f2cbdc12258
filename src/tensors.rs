//! Named-tensor files (safetensors) for command inputs and outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: tch::TchError },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: tch::TchError },
    #[error("{path}: missing tensor `{name}`")]
    Missing { path: PathBuf, name: String },
}

/// All tensors of a safetensors file, by name.
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self, TensorFileError> {
        let tensors = Tensor::read_safetensors(path)
            .map_err(|source| TensorFileError::Read { path: path.to_path_buf(), source })?
            .into_iter()
            .collect();
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, TensorFileError> {
        self.tensors
            .get(name)
            .ok_or_else(|| TensorFileError::Missing { path: self.path.clone(), name: name.to_string() })
    }
}

/// Writes `tensors` (moved to CPU, made contiguous) to `path`.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TensorFileError> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path).map_err(|source| TensorFileError::Write { path: path.to_path_buf(), source })
}
