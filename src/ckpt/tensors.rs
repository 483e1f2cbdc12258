//! The tensor side of checkpoints: staging a rank's share to host memory, writing shards
//! in the background, loading (with resharding) into whatever holds the state: anything
//! [`Stateful`] (the trainer; next, a sharded optimizer).

use super::*;
use super::fence::ReadFence;
use safetensors::tensor::Dtype;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// One rank's share in host memory: (key, shape, little-endian f32 bytes).
pub struct Staged {
    pub rank: usize,
    pub world: usize,
    pub items: Vec<(String, Vec<usize>, Vec<u8>)>,
}

/// Copies `t` (as contiguous little-endian f32 on the host) into `buf`, reusing its
/// allocation when the size matches: staging buffers kept from the previous save are
/// already faulted in, so a steady-state save is one memcpy per tensor.
fn copy_to_host(t: &Tensor, buf: &mut Vec<u8>) -> Vec<usize> {
    let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let n = t.numel() * 4;
    if buf.len() != n {
        *buf = vec![0u8; n];
    }
    if n == 0 {
        return shape; // an empty tensor's data pointer may be null: nothing to copy
    }
    // SAFETY: `t` is a contiguous f32 CPU tensor of exactly `n > 0` bytes (little-endian
    // host, as safetensors wants), so its data pointer is valid; alive for the copy; `buf`
    // holds `n` bytes.
    unsafe { std::ptr::copy_nonoverlapping(t.data_ptr() as *const u8, buf.as_mut_ptr(), n) };
    shape
}

/// What a checkpoint saves and restores, whatever holds it: a set of *units* (a
/// trainable parameter with its optimizer moments), each a few f32 tensors under their
/// checkpoint keys (`param.<unit>`, `exp_avg.<unit>`, `exp_avg_sq.<unit>`). The partition
/// spreads units over ranks by bytes; a load reads each unit from whichever shard holds
/// it, so any world size resumes any other. The state changes only in place, and only
/// after [`Stateful::wait_for_readers`], so a background save can read it meanwhile.
/// (The data position is not tensors: the caller puts it in the manifest.)
pub trait Stateful {
    /// Every unit, by name, with the bytes the partition balances.
    fn units(&self) -> Vec<(String, u64)>;
    /// The tensors of `unit` under their checkpoint keys, as handles (no copy).
    fn unit_tensors(&self, unit: &str) -> Vec<(String, Tensor)>;
    /// Overwrites `unit`'s tensors in place with `read(key, like)`, which returns the
    /// checkpoint's tensor of that key, checked against `like`'s shape. An unknown unit
    /// is an error naming it.
    fn load_unit(&mut self, unit: &str, read: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor, String>) -> Result<(), String>;
    /// The optimizer steps the state holds (after a load: the checkpoint's).
    fn set_steps(&mut self, steps: u64);
    /// A background reader is copying the state: the next in-place write waits for `fence`.
    fn hold_writes_until(&mut self, fence: ReadFence);
    /// Waits for background readers before writing the state.
    fn wait_for_readers(&mut self);
}

/// Bytes of each unit (the partition's weights).
pub fn param_sizes(state: &dyn Stateful) -> Vec<(String, u64)> {
    state.units()
}

/// Copies this rank's share (the tensors of `names`) to host memory, on the calling
/// thread. `reuse`: the buffers of the previous save (same share: no allocation, no page
/// faults). The savers do this on their background thread instead.
pub fn stage(state: &dyn Stateful, names: &[String], rank: usize, world: usize, reuse: Option<Staged>) -> Staged {
    stage_tensors(&share(state, names), rank, world, reuse)
}

/// This rank's share as tensor handles (no copy): what a background stager reads.
fn share(state: &dyn Stateful, names: &[String]) -> Vec<(String, Tensor)> {
    names.iter().flat_map(|n| state.unit_tensors(n)).collect()
}

/// Stages `items` on the calling (background) thread, then releases `fence`: from then on
/// the trainer may update the tensors again.
fn stage_then_release(items: &[(String, Tensor)], rank: usize, world: usize, reuse: Option<Staged>, fence: &ReadFence) -> Staged {
    let _release = fence.release_on_drop();
    stage_tensors(items, rank, world, reuse)
}

/// [`stage`] for named tensors (keys as they go into the shard).
pub fn stage_tensors(items: &[(String, Tensor)], rank: usize, world: usize, reuse: Option<Staged>) -> Staged {
    let mut old: std::collections::HashMap<String, Vec<u8>> =
        reuse.map(|s| s.items.into_iter().map(|(k, _, b)| (k, b)).collect()).unwrap_or_default();
    Staged {
        rank,
        world,
        items: items
            .iter()
            .map(|(k, t)| {
                let mut buf = old.remove(k).unwrap_or_default();
                let shape = copy_to_host(t, &mut buf);
                (k.clone(), shape, buf)
            })
            .collect(),
    }
}

/// The safetensors header of a staged shard (tensors laid out in order, F32).
fn header(staged: &Staged) -> Vec<u8> {
    let mut meta = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape, bytes) in &staged.items {
        meta.insert(k.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes.len()]}));
        offset += bytes.len();
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(meta)).expect("header serializes");
    while h.len() % 8 != 0 {
        h.push(b' '); // safetensors pads the header with spaces to 8-byte alignment
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}

/// Checksums and durably writes a staged shard into `dir` as safetensors, streaming the
/// staged buffers straight to the file (no second in-memory copy).
pub fn write_shard(dir: &Path, staged: &Staged) -> Result<ShardInfo, CkptError> {
    write_shard_timed(dir, staged).map(|(info, _)| info)
}

/// [`write_shard`], also returning how long it took until the data was written (in the
/// page cache, where `torch.save` leaves it), before the fsyncs that make it durable.
pub fn write_shard_timed(dir: &Path, staged: &Staged) -> Result<(ShardInfo, Duration), CkptError> {
    let start = Instant::now();
    let file = shard_file(staged.rank, staged.world);
    let path = dir.join(&file);
    std::fs::create_dir_all(dir).map_err(|source| CkptError::Io { path: dir.to_path_buf(), source })?;
    let tmp = path.with_extension("tmp");
    let head = header(staged);
    let needed = head.len() as u64 + staged.items.iter().map(|(_, _, b)| b.len() as u64).sum::<u64>();
    // A save that cannot fit is skipped before it fills the disk (and every later save
    // with it). A retired shard file in the recycle pool is overwritten in place, so its
    // blocks count as free.
    let reusable = dir.parent().map_or(0, recyclable_bytes);
    if let Some(available) = available_bytes(dir) {
        if available.saturating_add(reusable) < needed {
            return Err(CkptError::NoSpace { path: path.clone(), needed, available });
        }
    }
    let written = write_shard_file(dir, &tmp, &head, staged, start);
    let (crc, total, written) = match written {
        Ok(x) => x,
        Err(e) => {
            // Leave nothing behind: a partial shard only fills the disk.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path).map_err(|source| CkptError::Io { path: path.clone(), source })?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| CkptError::Io { path: dir.to_path_buf(), source })?;
    Ok((ShardInfo { file, bytes: total, crc32: crc }, written))
}

/// Writes header and staged buffers to `tmp` (a recycled file or a new one) and fsyncs
/// it. Returns the CRC, the length and the time until the data was written.
fn write_shard_file(dir: &Path, tmp: &Path, head: &[u8], staged: &Staged, start: Instant) -> Result<(u32, u64, Duration), CkptError> {
    use std::io::Write;
    let err = |source| CkptError::Io { path: tmp.to_path_buf(), source };
    // Overwrite a shard file retention retired (its pages are likely cached: no fresh
    // page-cache allocation), else start a new one. `dir` is `ckpt_dir/step-N`.
    let recycled = dir.parent().and_then(|root| take_recycled(root, tmp));
    let mut f = match recycled {
        Some(f) => f,
        None => std::fs::File::create(tmp).map_err(err)?,
    };
    let mut crc = crc32fast::Hasher::new();
    let mut total = head.len() as u64;
    crc.update(head);
    f.write_all(head).map_err(err)?;
    for (_, _, bytes) in &staged.items {
        crc.update(bytes);
        f.write_all(bytes).map_err(err)?;
        total += bytes.len() as u64;
    }
    f.set_len(total).map_err(err)?; // a recycled file may have been longer
    let written = start.elapsed();
    f.sync_all().map_err(err)?;
    Ok((crc.finalize(), total, written))
}

/// Background writer: at most one save in flight; a new save waits for the previous.
#[derive(Default)]
pub struct AsyncSaver {
    pending: Option<JoinHandle<(Result<u64, CkptError>, Staged)>>,
    /// The last save's staging buffers, reused by the next.
    spare: Option<Staged>,
}

impl AsyncSaver {
    /// Waits for the save in flight, if any; returns the step it committed.
    pub fn wait(&mut self) -> Result<Option<u64>, CkptError> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => {
                let (res, staged) = h.join().map_err(|_| CkptError::Background("writer thread panicked".into()))?;
                self.spare = Some(staged);
                res.map(Some)
            }
        }
    }

    /// Single-process save of the whole trainable state as one shard. In the background:
    /// stages it (overlapping the next step's forward and backward; the trainer's next
    /// update waits for it, see [`ReadFence`]), then writes the shard, the manifest (last)
    /// and applies retention. Returns the hand-off time. `manifest` supplies everything
    /// but the partition and shards.
    pub fn save(&mut self, state: &mut dyn Stateful, ckpt_dir: &Path, manifest: Manifest, keep_last: usize) -> Result<Duration, CkptError> {
        self.wait()?;
        let t = Instant::now();
        let mut names: Vec<String> = state.units().into_iter().map(|(n, _)| n).collect();
        names.sort();
        let items = share(state, &names);
        let fence = ReadFence::new();
        state.hold_writes_until(fence.clone());
        let spare = self.spare.take();
        let dir = step_dir(ckpt_dir, manifest.step);
        let ckpt_dir = ckpt_dir.to_path_buf();
        self.pending = Some(std::thread::spawn(move || {
            let staged = stage_then_release(&items, 0, 1, spare, &fence);
            drop(items);
            let write = || {
                let shard = write_shard(&dir, &staged)?;
                let m = Manifest { world_size: 1, partition: vec![names], shards: vec![shard], ..manifest };
                write_manifest(&dir, &m)?;
                retain(&ckpt_dir, keep_last, None)?;
                Ok(m.step)
            };
            let res = write();
            (res, staged)
        }));
        Ok(t.elapsed())
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("checkpoint: {e}");
        }
    }
}

/// One rank's shard of a distributed checkpoint, durable on disk (not yet committed: the
/// coordinator writes the manifest once every rank's shard is).
#[derive(Debug, Clone)]
pub struct ShardWritten {
    /// The checkpoint: `step-{steps}`.
    pub steps: u64,
    pub info: ShardInfo,
    pub names: Vec<String>,
    /// Staging (the loop's blocking time) plus the background write.
    pub total: Duration,
}

type ShardJob = JoinHandle<(Result<ShardWritten, CkptError>, Staged)>;

/// A distributed rank's background shard writer: at most one write in flight, a new save
/// first waits for the previous one; each write carries a caller's tag (the generation
/// that ran the step) back with its result.
#[derive(Default)]
pub struct ShardSaver {
    pending: Option<(u64, ShardJob)>,
    /// The checkpoint (`step-N`) of the last save handed off.
    last_steps: Option<u64>,
    /// The last save's staging buffers, reused by the next (same share).
    spare: Option<Staged>,
    /// A test's fault: stall (for an hour) before writing the shard of `step-N`.
    stall_at: Option<u64>,
}

impl ShardSaver {
    /// The fault injection end-to-end tests use to kill or freeze a rank in the middle of
    /// a checkpoint write: the writer of `step-{steps}` stalls for an hour before writing.
    /// Never set by the library itself (the worker binary sets it from a test's variable).
    pub fn stall_before_writing(&mut self, steps: Option<u64>) {
        self.stall_at = steps;
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// Saves this rank's share of the state after `steps` steps in the background:
    /// stages it (overlapping the next step's forward and backward; the trainer's next
    /// update waits for it, see [`ReadFence`]), then writes it. Returns the hand-off time
    /// and, having waited for it first, the previous write's result.
    #[allow(clippy::type_complexity)]
    pub fn save(
        &mut self,
        state: &mut dyn Stateful,
        ckpt_dir: &Path,
        steps: u64,
        rank: usize,
        world: usize,
        tag: u64,
    ) -> (Duration, Option<(u64, Result<ShardWritten, CkptError>)>) {
        let previous = self.wait();
        self.last_steps = Some(steps);
        let t = Instant::now();
        let names = partition(&state.units(), world).swap_remove(rank);
        let spare = self.spare.take().filter(|s| s.rank == rank && s.world == world);
        let items = share(state, &names);
        let fence = ReadFence::new();
        state.hold_writes_until(fence.clone());
        let blocked = t.elapsed();
        let dir = step_dir(ckpt_dir, steps);
        let stall = self.stall_at == Some(steps);
        self.pending = Some((
            tag,
            std::thread::spawn(move || {
                let t_write = Instant::now();
                let staged = stage_then_release(&items, rank, world, spare, &fence);
                drop(items);
                if stall {
                    eprintln!("checkpoint step-{steps}: stalling the shard write (test fault injection)");
                    std::thread::sleep(Duration::from_secs(3600));
                }
                let write = || {
                    let info = write_shard(&dir, &staged)?;
                    Ok(ShardWritten { steps, info, names, total: blocked + t_write.elapsed() })
                };
                let res = write();
                (res, staged)
            }),
        ));
        (blocked, previous)
    }

    /// The checkpoint (`step-N`) of the last save handed off: the one a result from
    /// [`ShardSaver::poll`] or [`ShardSaver::wait`] belongs to.
    pub fn last_steps(&self) -> Option<u64> {
        self.last_steps
    }

    /// The finished write, if the one in flight is done.
    pub fn poll(&mut self) -> Option<(u64, Result<ShardWritten, CkptError>)> {
        if self.pending.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            self.wait()
        } else {
            None
        }
    }

    /// Waits for the write in flight, if any.
    pub fn wait(&mut self) -> Option<(u64, Result<ShardWritten, CkptError>)> {
        let (tag, h) = self.pending.take()?;
        match h.join() {
            Ok((res, staged)) => {
                self.spare = Some(staged);
                Some((tag, res))
            }
            Err(_) => Some((tag, Err(CkptError::Background("writer thread panicked".into())))),
        }
    }
}

/// Reads and checks one shard file.
pub fn read_shard(dir: &Path, info: &ShardInfo) -> Result<Vec<u8>, CkptError> {
    let path = dir.join(&info.file);
    let bytes = std::fs::read(&path).map_err(|source| CkptError::Io { path: path.clone(), source })?;
    let found = crc32fast::hash(&bytes);
    if found != info.crc32 || bytes.len() as u64 != info.bytes {
        return Err(CkptError::Checksum { path, expected: info.crc32, found });
    }
    Ok(bytes)
}

/// Every tensor of one shard (read once, checksum verified), by key.
pub fn shard_tensors(dir: &Path, info: &ShardInfo) -> Result<Vec<(String, Tensor)>, CkptError> {
    let bytes = read_shard(dir, info)?;
    let path = dir.join(&info.file);
    let format = |message: String| CkptError::Format { path: path.clone(), message };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            let kind = match v.dtype() {
                Dtype::F32 => Kind::Float,
                other => return Err(format(format!("`{k}`: {other:?}, expected F32"))),
            };
            Tensor::f_from_data_size(v.data(), &shape, kind).map(|t| (k, t)).map_err(|e| format(e.to_string()))
        })
        .collect()
}

/// Loads a committed step into `state`, whatever world size wrote it: every shard that
/// holds a unit is read (and checked against its CRC). Sets the optimizer step.
pub fn load(dir: &Path, state: &mut dyn Stateful) -> Result<Manifest, CkptError> {
    state.wait_for_readers(); // a save still staging the state it is about to overwrite
    let m = read_manifest(dir)?;
    let units: usize = state.units().len();
    let _g = tch::no_grad_guard();
    let mut seen = 0usize;
    for (rank, (names, info)) in m.partition.iter().zip(&m.shards).enumerate() {
        if names.is_empty() {
            continue;
        }
        let bytes = read_shard(dir, info)?;
        let path = dir.join(&info.file);
        let format = |message: String| CkptError::Format { path: path.clone(), message };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
        let mut read = |key: &str, like: &Tensor| -> Result<Tensor, String> {
            let v = st.tensor(key).map_err(|_| format!("rank {rank}'s shard lacks `{key}`"))?;
            let want: Vec<usize> = like.size().iter().map(|&d| d as usize).collect();
            if v.dtype() != Dtype::F32 || v.shape() != want.as_slice() {
                return Err(format!("`{key}`: {:?} {:?}, expected F32 {want:?}", v.dtype(), v.shape()));
            }
            Tensor::f_from_data_size(v.data(), &like.size(), Kind::Float).map_err(|e| e.to_string())
        };
        for n in names {
            state.load_unit(n, &mut read).map_err(format)?;
            seen += 1;
        }
    }
    if seen != units {
        return Err(CkptError::Format { path: dir.join(MANIFEST), message: format!("holds {seen} of the model's {units} trainable parameters") });
    }
    state.set_steps(m.step);
    Ok(m)
}
