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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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

/// Writes `tensors` (moved to CPU, made contiguous) to `path`, so that `path` only ever
/// holds a complete, durable file: written to a temporary name beside it, fsynced, renamed
/// over `path`, and the directory fsynced. On any failure (a full disk) the temporary file
/// is removed and `path` is left as it was.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TensorFileError> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous())).collect();
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TensorFileError::Io { path: p, source }
    };
    let written = Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|source| TensorFileError::Write { path: path.to_path_buf(), source })
        .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_is_complete_or_absent() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("w.safetensors");
        let t = vec![("a".to_string(), Tensor::from_slice(&[1f32, 2.0, 3.0]))];
        write(&path, &t).unwrap();
        assert_eq!(TensorFile::read(&path).unwrap().get("a").unwrap().size(), vec![3]);
        // Into a directory that does not exist: an error, and nothing left anywhere.
        let bad = d.path().join("missing/w.safetensors");
        assert!(write(&bad, &t).is_err());
        assert!(!bad.exists());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("w.safetensors")], "no temporary file left behind");
    }
}
