//! Checkpoint commits: once every shard of a committed step is durable, the manifest (the
//! commit point) is prepared under the state lock and written off it (shard sizes checked
//! on the shared volume, fsyncs), one at a time; recorded in the machine only if its steps
//! are still committed by the generation that wrote it. Then retention, the step history
//! file, and the removal of abandoned checkpoints.

use super::server::{Coordinator, Persisted};
use std::sync::Arc;

/// Where the coordinator commits checkpoints: it writes each manifest once every shard is
/// durable and the step is committed.
pub struct CheckpointSink {
    pub dir: std::path::PathBuf,
    pub keep_last: usize,
    /// What the ranks do not report: LR schedule, seeds, the resolved config. `step`,
    /// `epoch`, `world_size`, `partition`, `shards`, `warmup_steps`, `total_steps`, `data`,
    /// `frozen` and `generation` are filled in per checkpoint.
    pub template: crate::ckpt::Manifest,
    pub warmup_ratio: f64,
    /// Where the summaries of compacted steps go once they leave the state's window (one
    /// JSON line per step, appended): the job's full step history, off the saved state.
    pub history: Option<std::path::PathBuf>,
}

/// Appends step summaries to the history file (JSON lines).
fn append_history(path: &std::path::Path, steps: &[super::ledger::StepSummary]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?; // with etcd as the store, nothing else creates it
    }
    let mut out = Vec::new();
    for s in steps {
        serde_json::to_writer(&mut out, s).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(&out)
}

/// A checkpoint manifest prepared under the state lock, written off it.
pub(super) struct ManifestWrite {
    steps: u64,
    generation: u64,
    dir: std::path::PathBuf,
    manifest: crate::ckpt::Manifest,
}

impl ManifestWrite {
    /// Checks every shard on the (shared) checkpoint volume, then writes the manifest. A
    /// shard missing or of the wrong size (a volume not shared, a rank that lied) blocks the
    /// commit, loudly.
    fn write(self) -> Result<(), String> {
        for sh in &self.manifest.shards {
            let path = self.dir.join(&sh.file);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == sh.bytes => {}
                Ok(m) => return Err(format!("{} has {} bytes, its rank reported {}", path.display(), m.len(), sh.bytes)),
                Err(e) => return Err(format!("{}: {e} (is the checkpoint directory shared with the coordinator?)", path.display())),
            }
        }
        crate::ckpt::write_manifest(&self.dir, &self.manifest).map_err(|e| format!("writing the manifest: {e}"))
    }
}

impl Coordinator {
    /// Enables checkpoint commits (once, before serving).
    pub fn set_checkpoints(&self, sink: CheckpointSink) {
        let _ = self.ckpt.set(sink);
    }

    /// The manifest of the checkpoint that became ready, if any and if no other manifest
    /// is being written, to write with [`Coordinator::write_manifests`] once the state lock
    /// is released: the write (and its fsyncs) must not stall every other request.
    pub(super) fn prepare_manifest(&self, s: &Persisted) -> Option<ManifestWrite> {
        use crate::ckpt;
        use std::sync::atomic::Ordering;
        let sink = self.ckpt.get()?;
        let c = s.machine.ready_checkpoint()?;
        if self.manifest_in_flight.swap(true, Ordering::SeqCst) {
            return None; // the writer in flight looks again when it is done
        }
        let dir = ckpt::step_dir(&sink.dir, c.steps);
        let manifest = s.machine.checkpoint_manifest(&c, &sink.template, sink.warmup_ratio);
        Some(ManifestWrite { steps: c.steps, generation: c.generation, dir, manifest })
    }

    /// Writes `first` (the commit point) off the state lock, then records it in the machine
    /// if its steps are still committed by the generation that wrote it, and goes on with
    /// any checkpoint that became ready meanwhile. Returns the first one's `step-N` if it
    /// was committed.
    pub(super) fn write_manifests(self: &Arc<Self>, first: ManifestWrite) -> tokio::task::JoinHandle<Option<u64>> {
        let c = self.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            let mut first_committed = None;
            let mut next = Some(first);
            let mut is_first = true;
            while let Some(w) = next.take() {
                let (steps, generation, dir) = (w.steps, w.generation, w.dir.clone());
                let shards = w.manifest.shards.len();
                let bytes: u64 = w.manifest.shards.iter().map(|s| s.bytes).sum();
                let written = tokio::task::spawn_blocking(move || w.write()).await.unwrap_or_else(|e| Err(format!("the manifest writer panicked: {e}")));
                let mut s = c.state.lock().await;
                let mut message = String::new();
                let ok = written.is_ok();
                match written {
                    Ok(()) if s.machine.checkpoint_still_ready(steps, generation) => {
                        let left = s.machine.checkpoint_committed(c.now(), steps);
                        let record = super::progress::CheckpointRecord { step: steps, at: c.now(), bytes };
                        c.telemetry.lock().expect("not poisoned").steps.checkpoint_committed(record);
                        tracing::info!("checkpoint step-{steps} committed ({shards} shards, generation {generation})");
                        message = format!("checkpoint step-{steps} committed");
                        if is_first {
                            first_committed = Some(steps);
                        }
                        let sink = c.ckpt.get().expect("a manifest implies a sink");
                        let (root, keep, history) = (sink.dir.clone(), sink.keep_last, sink.history.clone());
                        std::thread::spawn(move || {
                            if let Err(e) = crate::ckpt::retain(&root, keep, None) {
                                tracing::warn!("checkpoint retention: {e}");
                            }
                            if let (Some(path), false) = (history, left.is_empty()) {
                                if let Err(e) = append_history(&path, &left) {
                                    tracing::warn!("{}: step history: {e}", path.display());
                                }
                            }
                        });
                    }
                    Ok(()) => {
                        // Its steps were given back while the manifest was being written: the
                        // job continues from an older state, so this one must not exist.
                        tracing::warn!("checkpoint step-{steps}: its steps were rolled back while its manifest was written; removed");
                        let _ = std::fs::remove_file(dir.join(crate::ckpt::MANIFEST));
                    }
                    Err(e) => tracing::error!("checkpoint step-{steps}: {e}: not committed"),
                }
                let v = c.commit(&mut s, message);
                // Cleared after the commit bumped the version, so `flush` (which waits for
                // this flag) saves the checkpoint's record too.
                c.manifest_in_flight.store(false, Ordering::SeqCst);
                // After a failure the next StepDone or CheckpointDone tries again, not a loop.
                next = if ok { c.prepare_manifest(&s) } else { None };
                drop(s);
                let _ = c.durable(v).await;
                is_first = false;
            }
            first_committed
        })
    }

    /// Removes the files of the checkpoint after `step` that was abandoned (a rank could not
    /// write its shard), unless it is committed after all: a failed save must not leave
    /// the disk fuller than it found it.
    pub(super) async fn remove_abandoned(&self, step: u64) {
        let Some(sink) = self.ckpt.get() else { return };
        let dir = crate::ckpt::step_dir(&sink.dir, step + 1);
        let _ = tokio::task::spawn_blocking(move || {
            if !dir.join(crate::ckpt::MANIFEST).exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::info!("removed the abandoned checkpoint {}", dir.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("{}: could not remove the abandoned checkpoint: {e}", dir.display()),
                }
            }
        })
        .await;
    }
}
