//! Strict loading of HF safetensors checkpoints (one file, or sharded with
//! `model.safetensors.index.json`).
//!
//! Files are memory-mapped. Frozen weights that need no conversion become tensors over
//! the mapped pages themselves: no host copy, and processes on one node share the page
//! cache. Each such tensor's storage holds a reference to its map (`at::from_blob` with a
//! deleter, src/model/mapped_tensor.cpp), so no clone of it, wherever it goes, can outlive
//! the mapping; the pages are mapped read-only, so an in-place write to a frozen weight
//! faults at once (SIGSEGV) instead of changing it. Trainable weights are always copied
//! into owned f32 master tensors with `requires_grad`. Loading checks every key against
//! [`parameter_specs`](super::spec::parameter_specs) and reports *all* missing,
//! unexpected and mis-shaped keys at once before failing.

use super::config::OtterConfig;
use super::spec::{parameter_specs, ParamSpec};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{0}")]
    Mismatch(KeyMismatch),
    #[error("{path}: tensor `{name}` has dtype {dtype:?}; only floating-point weights are supported")]
    Dtype { path: PathBuf, name: String, dtype: Dtype },
    #[error("torch error while loading `{name}`: {source}")]
    Torch { name: String, source: tch::TchError },
}

/// Every way a checkpoint's keys disagree with the model's schema.
#[derive(Debug, Default, Clone)]
pub struct KeyMismatch {
    pub origin: String,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, expected shape, shape in the checkpoint)
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl KeyMismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty()
    }
}

impl fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: checkpoint does not match the model config ({} missing, {} unexpected, {} mis-shaped)",
            self.origin,
            self.missing.len(),
            self.unexpected.len(),
            self.misshaped.len()
        )?;
        for k in &self.missing {
            writeln!(f, "  missing key: {k}")?;
        }
        for k in &self.unexpected {
            writeln!(f, "  unexpected key: {k}")?;
        }
        for (k, want, got) in &self.misshaped {
            writeln!(f, "  mis-shaped key: {k}: expected {want:?}, checkpoint has {got:?}")?;
        }
        Ok(())
    }
}

/// Where a named tensor lives in the mapped files.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files with an index of their tensors.
pub struct MappedCheckpoint {
    paths: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    entries: BTreeMap<String, Entry>,
}

impl MappedCheckpoint {
    /// Opens a model directory (`model.safetensors.index.json` or `model.safetensors`)
    /// or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let files = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.exists() {
                read_index(&index)?.into_iter().map(|f| path.join(f)).collect()
            } else {
                vec![path.join("model.safetensors")]
            }
        } else {
            vec![path.to_path_buf()]
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, LoadError> {
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let io = |source| LoadError::Io { path: path.clone(), source };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: checkpoints are treated as immutable while training runs; the map is
            // read-only, so a writer elsewhere is the only hazard, as with any mmap.
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| LoadError::Format { path: path.clone(), message: e.to_string() })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(LoadError::Format {
                        path: path.clone(),
                        message: format!("tensor `{name}` appears in more than one file"),
                    });
                }
            }
            maps.push(Arc::new(map));
        }
        Ok(Self { paths: files.to_vec(), maps, entries })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Compares the checkpoint's keys and shapes with `specs`.
    pub fn check(&self, specs: &[ParamSpec]) -> KeyMismatch {
        let mut m = KeyMismatch {
            origin: self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            ..Default::default()
        };
        let wanted: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
        for s in specs {
            match self.entries.get(&s.name) {
                None => m.missing.push(s.name.clone()),
                Some(e) if e.shape != s.shape => m.misshaped.push((s.name.clone(), s.shape.clone(), e.shape.clone())),
                Some(_) => {}
            }
        }
        for name in self.entries.keys() {
            if !wanted.contains_key(name.as_str()) {
                m.unexpected.push(name.clone());
            }
        }
        m
    }

    /// The tensor `name` as stored, as a CPU tensor viewing the mapped bytes (no copy);
    /// its storage keeps the map alive. The pages are read-only: writing to it faults.
    fn view(&self, name: &str) -> Result<Tensor, LoadError> {
        let e = &self.entries[name];
        let kind = kind_of(e.dtype).ok_or_else(|| LoadError::Dtype {
            path: self.paths[e.file].clone(),
            name: name.to_string(),
            dtype: e.dtype,
        })?;
        let bytes = &self.maps[e.file][e.start..e.end];
        let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        if (bytes.as_ptr() as usize) % kind.elt_size_in_bytes() == 0 {
            view_owned(&self.maps[e.file], bytes, &shape, kind).map_err(|message| LoadError::Format { path: self.paths[e.file].clone(), message: format!("`{name}`: {message}") })
        } else {
            Tensor::f_from_data_size(bytes, &shape, kind)
                .map_err(|source| LoadError::Torch { name: name.to_string(), source })
        }
    }
}

extern "C" {
    fn otter_from_blob_owned(
        data: *mut std::ffi::c_void,
        sizes: *const i64,
        ndim: usize,
        scalar_type: std::ffi::c_int,
        owner: *mut std::ffi::c_void,
        release: extern "C" fn(*mut std::ffi::c_void),
        fault: std::ffi::c_int,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
}

/// Drops the map reference a tensor's storage held (its deleter).
extern "C" fn release_map(owner: *mut std::ffi::c_void) {
    // SAFETY: `owner` came from `Arc::into_raw` in `view_owned`, and the shim calls this
    // exactly once for it: from the storage's deleter, or itself when it fails.
    drop(unsafe { Arc::from_raw(owner as *const Mmap) });
}

/// c10's ScalarType of the float kinds a checkpoint may hold.
fn scalar_type(kind: Kind) -> Option<std::ffi::c_int> {
    Some(match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        _ => return None,
    })
}

/// A CPU tensor over `bytes` (inside `map`) whose storage holds a reference to `map`.
fn view_owned(map: &Arc<Mmap>, bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor, String> {
    view_owned_with(map, bytes, shape, kind, false)
}

/// [`view_owned`]; `fault` (tests) makes the shim fail after the storage exists.
fn view_owned_with(map: &Arc<Mmap>, bytes: &[u8], shape: &[i64], kind: Kind, fault: bool) -> Result<Tensor, String> {
    let st = scalar_type(kind).ok_or_else(|| format!("{kind:?} cannot be mapped"))?;
    let owner = Arc::into_raw(map.clone()) as *mut std::ffi::c_void;
    let mut err = [0 as std::ffi::c_char; 256];
    // SAFETY: `bytes` is a valid, aligned tensor of this kind and shape (checked by the
    // safetensors parser) inside the map `owner` keeps alive; the shim takes `owner` in
    // every case (released by the storage's deleter, or by the shim when it returns null).
    let t = unsafe {
        otter_from_blob_owned(bytes.as_ptr() as *mut _, shape.as_ptr(), shape.len(), st, owner, release_map, fault as std::ffi::c_int, err.as_mut_ptr(), err.len())
    };
    if t.is_null() {
        // SAFETY: the shim NUL-terminates `err` (a local buffer) when it returns null.
        return Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned());
    }
    // SAFETY: `t` is a fresh heap `at::Tensor` nobody else owns (tch frees it on drop).
    Ok(unsafe { Tensor::from_ptr(t) })
}

fn read_index(path: &Path) -> Result<Vec<String>, LoadError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| LoadError::Index { path: path.to_path_buf(), message: e.to_string() })?;
    let mut files: Vec<String> = index.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(LoadError::Index { path: path.to_path_buf(), message: "weight_map is empty".into() });
    }
    Ok(files)
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// Where and in which precision to hold the weights.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    /// Precision of frozen weights (f32 on CPU; bf16 halves GPU memory). Trainable
    /// master weights are always f32.
    pub frozen_kind: Kind,
}

impl LoadOptions {
    /// Weights for a run on `device` in `dtype` (a run config's `train.device` /
    /// `train.dtype`).
    pub fn for_run(device: crate::train::config::DeviceSpec, dtype: crate::train::config::Precision) -> Self {
        Self { device: tch_device(device), frozen_kind: tch_kind(dtype) }
    }
}

/// libtorch's device for a parsed device.
pub fn tch_device(d: crate::train::config::DeviceSpec) -> Device {
    match d {
        crate::train::config::DeviceSpec::Cpu => Device::Cpu,
        crate::train::config::DeviceSpec::Cuda(n) => Device::Cuda(n),
    }
}

/// libtorch's kind for a precision.
pub fn tch_kind(p: crate::train::config::Precision) -> Kind {
    match p {
        crate::train::config::Precision::F32 => Kind::Float,
        crate::train::config::Precision::Bf16 => Kind::BFloat16,
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, frozen_kind: Kind::Float }
    }
}

/// The model's parameters by name.
pub struct Params {
    tensors: BTreeMap<String, Tensor>,
    trainable: BTreeMap<String, bool>,
    /// Address ranges of the maps frozen tensors view (for [`Params::mapped_bytes`]; the
    /// tensors themselves keep the maps alive).
    mapped: Vec<(usize, usize)>,
}

impl Params {
    /// Strictly loads every parameter of `cfg` from `ckpt`.
    pub fn load(cfg: &OtterConfig, ckpt: &MappedCheckpoint, opts: LoadOptions) -> Result<Self, LoadError> {
        let specs = parameter_specs(cfg);
        let mismatch = ckpt.check(&specs);
        if !mismatch.is_empty() {
            return Err(LoadError::Mismatch(mismatch));
        }
        let mut tensors = BTreeMap::new();
        let mut trainable = BTreeMap::new();
        for s in &specs {
            let torch = |source| LoadError::Torch { name: s.name.clone(), source };
            let view = ckpt.view(&s.name)?;
            let t = if s.trainable {
                // Owned f32 master copy, on the target device.
                let t = view.f_to_device(opts.device).map_err(torch)?.f_to_kind(Kind::Float).map_err(torch)?;
                let t = if t.data_ptr() == view.data_ptr() { t.copy() } else { t };
                t.set_requires_grad(true)
            } else if opts.device == Device::Cpu && view.kind() == opts.frozen_kind {
                view // zero-copy over the mapped file
            } else {
                view.f_to_device(opts.device).map_err(torch)?.f_to_kind(opts.frozen_kind).map_err(torch)?
            };
            trainable.insert(s.name.clone(), s.trainable);
            tensors.insert(s.name.clone(), t);
        }
        let mapped = ckpt.maps.iter().map(|m| (m.as_ptr() as usize, m.as_ptr() as usize + m.len())).collect();
        Ok(Self { tensors, trainable, mapped })
    }

    /// Randomly initialised parameters (upstream-like init: normal(0, 0.02) weights,
    /// unit norms, zero biases and gates), for synthetic models in tests and benchmarks.
    pub fn random(cfg: &OtterConfig, seed: i64, opts: LoadOptions) -> Self {
        tch::manual_seed(seed);
        let mut tensors = BTreeMap::new();
        let mut trainable = BTreeMap::new();
        for s in parameter_specs(cfg) {
            let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
            let kind = if s.trainable { Kind::Float } else { opts.frozen_kind };
            let opt = (kind, opts.device);
            let leaf = s.name.rsplit('.').next().unwrap_or("");
            let is_norm = s.name.contains("norm") || s.name.contains("feed_forward.0.") || s.name.contains("layer_norm");
            let t = if leaf == "bias" || leaf == "attn_gate" || leaf == "ff_gate" {
                Tensor::zeros(&shape, opt)
            } else if is_norm && leaf == "weight" {
                Tensor::ones(&shape, opt)
            } else {
                Tensor::randn(&shape, opt) * 0.02
            };
            let t = if s.trainable { t.set_requires_grad(true) } else { t };
            trainable.insert(s.name.clone(), s.trainable);
            tensors.insert(s.name, t);
        }
        Self { tensors, trainable, mapped: Vec::new() }
    }

    /// Bytes of parameters whose storage is the memory-mapped checkpoint itself
    /// (zero-copy frozen weights).
    pub fn mapped_bytes(&self) -> u64 {
        let ranges = &self.mapped;
        self.tensors
            .values()
            .filter(|t| t.device() == Device::Cpu)
            .filter(|t| {
                let p = t.data_ptr() as usize;
                ranges.iter().any(|&(lo, hi)| p >= lo && p < hi)
            })
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }

    /// Every parameter by name (frozen ones may view a mapped file: never write to them).
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        self.trainable.get(name).copied().unwrap_or(false)
    }

    pub fn get(&self, name: &str) -> Tensor {
        // Keys were checked against the schema when `Params` was built, and modules ask
        // only for schema keys: a miss here is a bug in this crate, not bad input.
        self.tensors.get(name).unwrap_or_else(|| panic!("parameter `{name}` not in schema")).shallow_clone()
    }

    /// Trainable parameters in name order (the order every rank agrees on).
    pub fn trainable(&self) -> Vec<(&str, &Tensor)> {
        self.tensors.iter().filter(|(n, _)| self.trainable[*n]).map(|(n, t)| (n.as_str(), t)).collect()
    }
}

/// A view of [`Params`] under a name prefix (candle's `VarBuilder::pp`).
#[derive(Clone)]
pub struct Vb<'a> {
    params: &'a Params,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub fn root(params: &'a Params) -> Self {
        Self { params, prefix: String::new() }
    }

    /// The full checkpoint key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.params.get(&self.key(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.tensors.contains_key(&self.key(name))
    }

    pub fn pp(&self, path: impl fmt::Display) -> Vb<'a> {
        Vb { params: self.params, prefix: self.key(&path.to_string()) }
    }
}

#[cfg(test)]
mod mapped_tests {
    use super::*;
    use std::io::Write;

    /// Issue 45: the shim takes the map's reference in every case and releases it exactly
    /// once: a tensor holds it until dropped, and a failure after `from_blob` made the
    /// storage (whose deleter then runs while unwinding) neither leaks it nor releases it
    /// a second time (the caller used to release it again on null).
    #[test]
    fn a_mapped_tensor_releases_its_map_once_on_success_and_on_a_failure_inside_the_shim() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 64]).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map = Arc::new(unsafe { Mmap::map(&f) }.unwrap());
        let t = view_owned_with(&map, &map[..16], &[4], Kind::Float, false).unwrap();
        assert_eq!(Arc::strong_count(&map), 2, "the tensor's storage holds the map");
        drop(t);
        assert_eq!(Arc::strong_count(&map), 1, "released when the tensor went");
        let e = view_owned_with(&map, &map[..16], &[4], Kind::Float, true).unwrap_err();
        assert!(e.contains("injected fault"), "{e}");
        assert_eq!(Arc::strong_count(&map), 1, "released once: neither leaked nor released twice");
    }
}
