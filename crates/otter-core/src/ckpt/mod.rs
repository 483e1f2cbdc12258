//! Sharded, asynchronous, exactly-resumable checkpoints.
//!
//! ```text
//! ckpt_dir/step-N/
//!   shard-00000-of-00002.safetensors   rank 0's share: param.<name>, exp_avg.<name>, exp_avg_sq.<name>
//!   shard-00001-of-00002.safetensors
//!   manifest.json                      written LAST (temp file, fsync, rename, fsync dir)
//! ```
//!
//! * A `step-N` without `manifest.json` does not exist: [`latest_committed`] skips it.
//! * The partition is a pure function of the parameter names and sizes and the world size
//!   ([`partition`]): names sorted, each given to the rank with the fewest bytes so far.
//! * Saving is asynchronous ([`AsyncSaver`], [`ShardSaver`]): the training thread only
//!   hands its share's tensor handles to a background thread, which stages them to host
//!   memory (the trainer's next in-place update waits for that, via
//!   [`crate::train::ReadFence`], so staging overlaps the next forward and backward), then
//!   checksums (CRC-32 per shard), writes and fsyncs; a new save first waits for the
//!   previous one.
//! * Loading reads whatever shards hold the names it needs, so any world size can resume
//!   from any other (resharding); every shard read is checked against its checksum and a
//!   mismatch names the file.
//! * Frozen weights are never copied: the manifest records their files, sizes and
//!   checksums.
//! * Retention ([`retain`]) uncommits old steps (manifest first) and moves their shard
//!   files into `ckpt_dir/.recycle/`; a later shard write overwrites one of them in place
//!   instead of growing a new file ([`take_recycled`]).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// Where a manifest goes when its checkpoint proved unreadable (a shard's checksum): the
/// step no longer exists, its files stay for inspection until retention removes them.
pub const UNREADABLE_MANIFEST: &str = "manifest.json.unreadable";

#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: checksum mismatch (expected crc32 {expected:08x}, found {found:08x}): the shard is corrupt or truncated")]
    Checksum { path: PathBuf, expected: u32, found: u32 },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{dir}: no committed checkpoint (no step-N/manifest.json)")]
    NoCheckpoint { dir: PathBuf },
    #[error("checkpoint write failed: {0}")]
    Background(String),
    #[error("{path}: not enough free space for a {needed}-byte shard ({available} bytes available): this checkpoint is skipped")]
    NoSpace { path: PathBuf, needed: u64, available: u64 },
}

impl CkptError {
    /// A short name of the failure for metrics: `no_space`, `io`, or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            CkptError::NoSpace { .. } => "no_space",
            CkptError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) || source.kind() == std::io::ErrorKind::StorageFull => "no_space",
            CkptError::Io { .. } => "io",
            _ => "other",
        }
    }
}

/// Bytes available to this (unprivileged) process on the filesystem holding `path` (or
/// its nearest existing ancestor).
pub fn available_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we pass; the path is a valid C string.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrozenFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimizer steps contained (the next step to run has this index).
    pub step: u64,
    pub epoch: u64,
    pub world_size: usize,
    /// By rank: the parameter names whose weights and AdamW moments its shard holds.
    pub partition: Vec<Vec<String>>,
    /// By rank.
    pub shards: Vec<ShardInfo>,
    /// LR schedule position: `lr(step)` with this peak, warmup and length.
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Seeds of everything random (model init, data order).
    pub model_seed: u64,
    pub data_seed: u64,
    /// Where the data is: the loader cursor (single process) or the ledger position.
    pub data: serde_json::Value,
    /// The resolved run config.
    pub config: serde_json::Value,
    /// Frozen weights by path and checksum, as manifests before model identities recorded
    /// them (read, no longer written: `identity` covers them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<FrozenFile>,
    /// What every rank shared: the frozen weights, model config and tokenizer
    /// (`model::identity`). A resume against a model that differs is refused, naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::model::identity::ModelIdentity>,
    /// Coordinator generation that committed it (distributed jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl Manifest {
    /// A manifest of `step` for `world_size` ranks with nothing else recorded yet (no
    /// partition, shards, data position, config or frozen files; LR fields zero): the
    /// savers fill in the partition, shards and frozen files, callers the rest.
    pub fn new(step: u64, world_size: usize) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            epoch: 0,
            world_size,
            partition: Vec::new(),
            shards: Vec::new(),
            lr: 0.0,
            warmup_steps: 0,
            total_steps: 0,
            model_seed: 0,
            data_seed: 0,
            data: serde_json::Value::Null,
            config: serde_json::Value::Null,
            frozen: Vec::new(),
            identity: None,
            generation: None,
        }
    }
}

/// Rank `r`'s parameter names: names sorted, each to the rank with the fewest bytes so
/// far (ties: lowest rank). Deterministic and balanced.
pub fn partition(sizes: &[(String, u64)], world: usize) -> Vec<Vec<String>> {
    let mut named: Vec<&(String, u64)> = sizes.iter().collect();
    named.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut parts = vec![Vec::new(); world.max(1)];
    let mut load = vec![0u64; world.max(1)];
    for (name, bytes) in named {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("world >= 1");
        load[r] += bytes;
        parts[r].push(name.clone());
    }
    for p in &mut parts {
        p.sort();
    }
    parts
}

pub fn shard_file(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

pub fn step_dir(ckpt_dir: &Path, step: u64) -> PathBuf {
    ckpt_dir.join(format!("step-{step}"))
}

/// Writes `bytes` to `path` durably: temp file, fsync, rename (the temp file is removed
/// if any of it fails, so a full disk leaves nothing behind).
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), CkptError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

/// Commits a step: the manifest, written last.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), CkptError> {
    write_durable(&dir.join(MANIFEST), &serde_json::to_vec_pretty(m).expect("manifest serializes"))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, CkptError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| CkptError::Format { path: path.clone(), message: e.to_string() })?;
    if m.format_version != FORMAT_VERSION {
        return Err(CkptError::Format { path, message: format!("format version {} (this build reads {FORMAT_VERSION})", m.format_version) });
    }
    Ok(m)
}

/// Committed steps in `ckpt_dir`, oldest first.
pub fn committed_steps(ckpt_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(ckpt_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .filter(|s| step_dir(ckpt_dir, *s).join(MANIFEST).is_file())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

pub fn latest_committed(ckpt_dir: &Path) -> Option<u64> {
    committed_steps(ckpt_dir).pop()
}

/// Keeps the newest `keep_last` committed steps (and `protect`, the one being resumed
/// from); removes older committed steps and uncommitted leftovers older than the newest
/// committed one. The shard files of a removed committed step are not deleted but moved
/// into the recycle pool ([`RECYCLE`]), where the next save overwrites them in place
/// (see [`take_recycled`]); its manifest goes first, so the step stops existing before any
/// of its files is touched.
pub fn retain(ckpt_dir: &Path, keep_last: usize, protect: Option<u64>) -> Result<Vec<u64>, CkptError> {
    let committed = committed_steps(ckpt_dir);
    let keep: Vec<u64> = committed.iter().rev().take(keep_last.max(1)).copied().chain(protect).collect();
    let newest = committed.last().copied();
    let mut removed = Vec::new();
    let mut recycled = 0usize;
    let entries = std::fs::read_dir(ckpt_dir).map_err(io(ckpt_dir))?;
    for e in entries.flatten() {
        let Some(step) = e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<u64>().ok()) else { continue };
        let is_committed = committed.contains(&step);
        let retired = is_committed && !keep.contains(&step);
        let stale_partial = !is_committed && newest.is_some_and(|n| step < n);
        if retired {
            recycled = recycled.max(recycle_shards(ckpt_dir, &e.path(), step)?);
        }
        if retired || stale_partial {
            std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
            removed.push(step);
        }
    }
    if recycled > 0 {
        trim_pool(ckpt_dir, recycled)?;
    }
    removed.sort_unstable();
    Ok(removed)
}

/// The recycle pool, `ckpt_dir/.recycle/`: shard files of steps retention removed, kept
/// so the next save can overwrite them in place. Writing over a file's cached pages costs
/// a copy; writing a new file first has the kernel allocate (and on this project's
/// machines often reclaim) as many fresh page-cache pages, which measured 1-15x slower
/// (BENCHMARKS.md). PostgreSQL recycles its WAL segments for the same reason. Pool files
/// belong to no step: nothing reads them.
pub const RECYCLE: &str = ".recycle";

/// Uncommits `dir` (step `step`: manifest removed, durably) and moves its shard files
/// into the pool. Returns how many it moved.
fn recycle_shards(ckpt_dir: &Path, dir: &Path, step: u64) -> Result<usize, CkptError> {
    let manifest = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest) {
        Ok(()) => std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&manifest)(e)),
    }
    let pool = ckpt_dir.join(RECYCLE);
    std::fs::create_dir_all(&pool).map_err(io(&pool))?;
    let mut moved = 0;
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("shard-") && n.ends_with(".safetensors")) else { continue };
        let to = pool.join(format!("step-{step}-{name}"));
        std::fs::rename(e.path(), &to).map_err(io(&to))?;
        moved += 1;
    }
    Ok(moved)
}

/// Bounds the pool to `cap` files (one save's worth), deleting the rest.
fn trim_pool(ckpt_dir: &Path, cap: usize) -> Result<(), CkptError> {
    let pool = ckpt_dir.join(RECYCLE);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pool).map_err(io(&pool))?.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files.iter().skip(cap) {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // a writer took it meanwhile
            Err(e) => return Err(io(f)(e)),
        }
    }
    Ok(())
}

/// Takes a file from `ckpt_dir`'s recycle pool by renaming it to `dest` (atomic: when
/// ranks race for the same file, one wins and the others try the next) and opens it for
/// overwriting (not truncated: the writer sets the final length). `None`: the pool is
/// empty (or absent), write a new file.
pub fn take_recycled(ckpt_dir: &Path, dest: &Path) -> Option<std::fs::File> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(ckpt_dir.join(RECYCLE)).ok()?.flatten().map(|e| e.path()).collect();
    files.sort();
    files.into_iter().find_map(|f| {
        std::fs::rename(&f, dest).ok()?;
        std::fs::OpenOptions::new().write(true).open(dest).ok()
    })
}

/// Bytes of the largest file in `ckpt_dir`'s recycle pool (a save overwrites one in place).
pub fn recyclable_bytes(ckpt_dir: &Path) -> u64 {
    std::fs::read_dir(ckpt_dir.join(RECYCLE))
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).max().unwrap_or(0))
        .unwrap_or(0)
}

/// Size and CRC-32 of a file (frozen weights in the manifest).
pub fn file_crc(path: &Path) -> Result<FrozenFile, CkptError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FrozenFile { path: path.to_path_buf(), bytes, crc32: h.finalize() })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_balanced_deterministic_and_complete() {
        let sizes: Vec<(String, u64)> = (0..37).map(|i| (format!("p{i:02}"), (i * 7919 % 101 + 1) as u64)).collect();
        for world in 1..6 {
            let a = partition(&sizes, world);
            let mut shuffled = sizes.clone();
            shuffled.reverse();
            assert_eq!(a, partition(&shuffled, world), "independent of input order");
            let mut all: Vec<&String> = a.iter().flatten().collect();
            all.sort();
            assert_eq!(all.len(), sizes.len());
            all.dedup();
            assert_eq!(all.len(), sizes.len(), "each name exactly once");
            let loads: Vec<u64> = a.iter().map(|p| p.iter().map(|n| sizes.iter().find(|s| &s.0 == n).unwrap().1).sum()).collect();
            let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
            assert!(max - min <= 101, "world {world}: loads {loads:?}");
        }
    }

    #[test]
    fn only_steps_with_a_manifest_exist_and_retention_keeps_k() {
        let d = tempfile::tempdir().unwrap();
        for s in [2u64, 4, 6, 8] {
            std::fs::create_dir_all(step_dir(d.path(), s)).unwrap();
            if s != 8 {
                std::fs::write(step_dir(d.path(), s).join(MANIFEST), "{}").unwrap();
            }
        }
        assert_eq!(committed_steps(d.path()), vec![2, 4, 6]);
        assert_eq!(latest_committed(d.path()), Some(6), "step-8 has no manifest: it does not exist");
        let removed = retain(d.path(), 2, Some(2)).unwrap();
        assert_eq!(removed, Vec::<u64>::new(), "keeps 4 and 6, and 2 which is being resumed from");
        std::fs::write(step_dir(d.path(), 2).join(shard_file(0, 1)), "shard").unwrap();
        let removed = retain(d.path(), 2, None).unwrap();
        assert_eq!(removed, vec![2]);
        assert!(step_dir(d.path(), 8).exists(), "an in-progress newer step is left alone");
        let pooled = d.path().join(RECYCLE).join("step-2-shard-00000-of-00001.safetensors");
        assert_eq!(std::fs::read_to_string(&pooled).unwrap(), "shard", "the removed step's shard is recycled");
        let taken = d.path().join("taken");
        assert!(take_recycled(d.path(), &taken).is_some());
        assert!(!pooled.exists() && taken.exists(), "taking moves it out of the pool");
        assert!(take_recycled(d.path(), &d.path().join("again")).is_none(), "the pool is empty");
    }

    #[test]
    fn the_recycle_pool_holds_one_saves_worth_of_files() {
        let d = tempfile::tempdir().unwrap();
        for s in [1u64, 2, 3] {
            let dir = step_dir(d.path(), s);
            std::fs::create_dir_all(&dir).unwrap();
            for r in 0..2 {
                std::fs::write(dir.join(shard_file(r, 2)), format!("{s}/{r}")).unwrap();
            }
            std::fs::write(dir.join(MANIFEST), "{}").unwrap();
        }
        assert_eq!(retain(d.path(), 1, None).unwrap(), vec![1, 2]);
        let pool: Vec<_> = std::fs::read_dir(d.path().join(RECYCLE)).unwrap().flatten().collect();
        assert_eq!(pool.len(), 2, "two steps of 2 shards retired, one save's worth (2) kept");
        assert_eq!(committed_steps(d.path()), vec![3]);
    }
}
