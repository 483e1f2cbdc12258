//! The coordinator's group commit: a change bumps the state version and marks it dirty;
//! one flusher saves the newest snapshot through the [`StateStore`](super::store::StateStore);
//! a reply that depends on a change waits (with the state lock released) until a save holds
//! its version (contract 4). A fenced save (another replica took over) deposes this
//! coordinator: nothing is saved any more and its server stops.

use super::server::{Coordinator, Persisted};
use super::store::StoreError;
use std::time::Duration;

/// zstd's frame magic: a saved state that starts with it is compressed.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The most a saved state may decompress to.
const MAX_STATE_BYTES: u64 = 1 << 30;

/// What a save writes: the state as JSON, zstd-compressed at level 1 (a few hundred MB/s;
/// the JSON of a thousand nodes' membership compresses about 10x).
///
/// A save runs at every step, so its working buffers (the JSON, zstd's context of about a
/// megabyte, the compression bound) are kept and reused: allocated and freed afresh each
/// time, blocks of those varying sizes fragmented glibc's heap until the coordinator's
/// resident memory grew with the step count while its live data did not (issue 50).
pub fn encode_state(s: &Persisted) -> Vec<u8> {
    struct Encoder {
        json: Vec<u8>,
        out: Vec<u8>,
        zstd: zstd::bulk::Compressor<'static>,
    }
    static ENCODER: std::sync::Mutex<Option<Encoder>> = std::sync::Mutex::new(None);
    let mut guard = ENCODER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let e = guard.get_or_insert_with(|| Encoder { json: Vec::new(), out: Vec::new(), zstd: zstd::bulk::Compressor::new(1).expect("a zstd context") });
    e.json.clear();
    serde_json::to_writer(&mut e.json, s).expect("state serializes");
    e.out.clear();
    e.out.reserve(zstd::zstd_safe::compress_bound(e.json.len()));
    e.zstd.compress_to_buffer(&e.json, &mut e.out).expect("the buffer holds the compression bound");
    e.out.clone()
}

/// A saved state: compressed (this version) or plain JSON (the previous version's).
pub fn decode_state(bytes: &[u8], location: &str) -> Result<Persisted, StoreError> {
    use std::io::Read;
    let unreadable = |message: String| StoreError::Unreadable { location: location.to_string(), message };
    let json = if bytes.starts_with(&ZSTD_MAGIC) {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .and_then(|d| d.take(MAX_STATE_BYTES + 1).read_to_end(&mut out))
            .map_err(|e| unreadable(format!("zstd: {e}")))?;
        if out.len() as u64 > MAX_STATE_BYTES {
            return Err(unreadable(format!("decompresses to more than {MAX_STATE_BYTES} bytes")));
        }
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(bytes)
    };
    serde_json::from_slice(&json).map_err(|e| unreadable(e.to_string()))
}

/// Why a change could not be made durable (a handler answers UNAVAILABLE: the caller
/// retries, against this coordinator or the one that took over).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PersistError {
    #[error("coordinator shutting down")]
    ShuttingDown,
    #[error("coordinator could not persist its state: {0}")]
    Failed(String),
}

/// The state saves so far: how many, the largest and the last size, and their durations
/// in a log-bucketed histogram (constant memory however long the job runs; a percentile
/// is exact to within a bucket, 2%).
#[derive(Debug, Clone)]
pub struct SaveStats {
    pub saves: u64,
    pub bytes_last: usize,
    pub bytes_max: usize,
    buckets: Vec<u64>,
}

/// Bucket `i` holds durations in [`BUCKET_BASE_US` * `BUCKET_RATIO`^i, ..^(i+1)).
const BUCKET_BASE_US: f64 = 1.0;
const BUCKET_RATIO: f64 = 1.02;
const BUCKETS: usize = 1200; // 1 us x 1.02^1200: beyond 10 hours

impl Default for SaveStats {
    fn default() -> Self {
        Self { saves: 0, bytes_last: 0, bytes_max: 0, buckets: vec![0; BUCKETS] }
    }
}

impl SaveStats {
    pub fn record(&mut self, took: Duration, bytes: usize) {
        let us = took.as_secs_f64() * 1e6;
        let i = if us <= BUCKET_BASE_US { 0 } else { ((us / BUCKET_BASE_US).ln() / BUCKET_RATIO.ln()) as usize };
        self.buckets[i.min(BUCKETS - 1)] += 1;
        self.saves += 1;
        self.bytes_last = bytes;
        self.bytes_max = self.bytes_max.max(bytes);
    }

    /// The `q` quantile (0..=1) of the save durations (the upper edge of its bucket); zero
    /// before the first save.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.saves == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.saves as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_secs_f64(BUCKET_BASE_US * BUCKET_RATIO.powi(i as i32 + 1) / 1e6);
            }
        }
        Duration::MAX
    }
}

/// How often, at most, the flusher hands the heap's free pages back after a save, where
/// the process asked for it ([`release_heap_after_saves`]).
const RELEASE_EVERY: Duration = Duration::from_secs(1);

static RELEASE_AFTER_SAVES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on the flusher hands the heap's free pages back to the system after a save, at
/// most once a second: `otter-coord`'s decision (libraries do not change their host
/// process; a test process running a coordinator beside its ranks keeps its allocator's
/// pages).
pub fn release_heap_after_saves() {
    RELEASE_AFTER_SAVES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// What the flusher has made durable: the newest state version saved, and the newest
/// version whose save failed (with why).
#[derive(Debug, Clone, Default)]
pub(super) struct Durable {
    pub(super) saved: u64,
    pub(super) failed: Option<(u64, String)>,
}

impl Coordinator {
    /// Saves the newest state whenever it is dirty; ends with the coordinator.
    pub(super) async fn flusher(c: std::sync::Weak<Self>) {
        use std::sync::atomic::Ordering;
        let mut released: Option<std::time::Instant> = None;
        loop {
            let Some(dirty) = c.upgrade().map(|c| async move { c.dirty.notified().await }) else { return };
            // A stored permit (notify_one before we waited) makes this return at once.
            if tokio::time::timeout(Duration::from_secs(1), dirty).await.is_err() {
                continue; // re-check that the coordinator still exists
            }
            let Some(c) = c.upgrade() else { return };
            // A copy is taken under the lock; it is serialized and written off it, so
            // requests go on while the save runs.
            let (snapshot, version) = {
                let s = c.state.lock().await;
                (s.clone(), c.version.load(Ordering::SeqCst))
            };
            let t = std::time::Instant::now();
            let release = RELEASE_AFTER_SAVES.load(Ordering::Relaxed) && released.is_none_or(|r| t.duration_since(r) >= RELEASE_EVERY);
            if release {
                released = Some(t);
            }
            // Encoding takes milliseconds at a thousand nodes: not on a runtime thread,
            // where it would hold up heartbeats and replies.
            let bytes = match tokio::task::spawn_blocking(move || {
                let bytes = encode_state(&snapshot);
                drop(snapshot);
                // The heap's free pages go back to the system, at most once a second. The
                // live heap is flat over a job (heaptrack: 1.69 MB live at step 2,500 and
                // 1.68 MB at 7,000 of the soak), but a save's copy of the state, freed on
                // another thread than the one that made it, and the requests' buffers
                // leave free chunks between long-lived ones: glibc's heap grew by its
                // top now and then (+236 KB once in 6k steps), and its freed pages inside
                // stayed resident (issue 50).
                if release {
                    crate::heap::release_free_memory();
                }
                bytes
            })
            .await
            {
                Ok(bytes) => bytes,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            let len = bytes.len();
            let saved = c.store.save(bytes).await;
            if saved.is_ok() {
                c.record_save(t.elapsed(), len);
            }
            match saved {
                Ok(()) => c.durable.send_modify(|d| d.saved = d.saved.max(version)),
                Err(StoreError::Fenced(e)) => {
                    // Another replica is active: acting on anything now could fork the job.
                    // Nothing is saved any more, every waiting reply fails, and whoever
                    // runs this coordinator stops serving (see `deposed`).
                    c.durable.send_modify(|d| d.failed = Some((u64::MAX, format!("deposed: {e}"))));
                    c.deposed.send_replace(Some(e));
                    return;
                }
                Err(e) => c.durable.send_modify(|d| d.failed = Some((version, e.to_string()))),
            }
        }
    }

    fn record_save(&self, took: Duration, bytes: usize) {
        self.save_stats.lock().expect("not poisoned").record(took, bytes);
        self.metrics.state_bytes.set(bytes as i64);
        self.metrics.state_save.observe(took.as_secs_f64());
    }

    /// The state saves so far (the benchmark's numbers).
    pub fn save_stats(&self) -> SaveStats {
        self.save_stats.lock().expect("not poisoned").clone()
    }

    /// Resolves (with why) once another replica has taken over: this coordinator must stop
    /// serving at once.
    pub async fn deposed(&self) -> String {
        let mut rx = self.deposed.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Waits until a save includes state version `v`.
    pub(super) async fn durable(&self, v: u64) -> Result<(), PersistError> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.saved >= v || d.failed.as_ref().is_some_and(|(f, _)| *f >= v))
            .await
            .map_err(|_| PersistError::ShuttingDown)?
            .clone();
        if d.saved >= v {
            return Ok(());
        }
        let why = d.failed.map(|(_, e)| e).unwrap_or_default();
        Err(PersistError::Failed(why))
    }

    pub(super) async fn persist(&self, s: &Persisted) -> Result<(), StoreError> {
        self.store.save(encode_state(s)).await
    }

    /// Waits until the state as it is now is saved (before the process exits).
    pub async fn flush(&self) -> Result<(), PersistError> {
        // A manifest being written finishes first (up to a minute: it is a few fsyncs), so
        // a checkpoint whose shards are all durable is not lost to the exit.
        let t = std::time::Instant::now();
        while self.manifest_in_flight.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.durable(self.current_version()).await
    }

    /// The version of the state as it is now (for replies that only read it).
    pub(super) fn current_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_quantiles_are_within_a_bucket_of_the_truth() {
        let mut s = SaveStats::default();
        assert_eq!(s.quantile(0.5), Duration::ZERO);
        // 1..=1000 ms, once each: p50 is 500 ms, p99 990 ms.
        for ms in 1..=1000u64 {
            s.record(Duration::from_millis(ms), ms as usize);
        }
        let close = |got: Duration, want: f64| (got.as_secs_f64() / want - 1.0).abs() <= 0.021;
        assert!(close(s.quantile(0.5), 0.5), "{:?}", s.quantile(0.5));
        assert!(close(s.quantile(0.99), 0.99), "{:?}", s.quantile(0.99));
        assert!(close(s.quantile(1.0), 1.0), "{:?}", s.quantile(1.0));
        assert_eq!((s.saves, s.bytes_max, s.bytes_last), (1000, 1000, 1000));
        s.record(Duration::from_millis(1), 10);
        assert_eq!((s.bytes_max, s.bytes_last), (1000, 10));
    }

    #[test]
    fn a_saved_state_is_compressed_and_the_previous_versions_plain_json_still_loads() {
        let machine = crate::coord::machine::Machine::new(crate::coord::CoordConfig::new(1, 4), vec![100]).unwrap();
        let state = Persisted { machine, total_steps: None };
        let json = serde_json::to_vec(&state).unwrap();
        let saved = encode_state(&state);
        assert!(saved.starts_with(&ZSTD_MAGIC) && saved.len() < json.len(), "{} compressed bytes for {} of JSON", saved.len(), json.len());
        let back = decode_state(&saved, "mem").unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), json);
        let old = decode_state(&json, "mem").unwrap();
        assert_eq!(serde_json::to_vec(&old).unwrap(), json, "what the previous version saved (plain JSON) loads");
        let mut torn = saved.clone();
        torn.truncate(saved.len() / 2);
        let e = decode_state(&torn, "etcd key otter/state").unwrap_err().to_string();
        assert!(e.starts_with("etcd key otter/state: unreadable state"), "{e}");
    }

    /// Issue 46: a restarted coordinator reloads its state, and the losses in it (f64s of
    /// f32 values) must come back bit for bit, or a deterministic job's loss history parts
    /// from the uninterrupted one's after a restart (measured: one f64 ulp on 61 of 3000
    /// steps, the window the restart reloaded). serde_json's default float parser is off by
    /// one ulp on ~19% of such values; its `float_roundtrip` feature parses them exactly.
    #[test]
    fn every_f64_the_state_holds_comes_back_bit_for_bit() {
        let mut changed = Vec::new();
        let mut bits: u32 = 0x3c00_0000; // f32 values from 2^-7 to 2^8, every 97th
        while bits < 0x4380_0000 {
            let v = f32::from_bits(bits) as f64;
            let back: f64 = serde_json::from_slice(&serde_json::to_vec(&v).unwrap()).unwrap();
            if back.to_bits() != v.to_bits() {
                changed.push((v, back));
            }
            bits += 97;
        }
        assert!(changed.is_empty(), "{} values changed through JSON, e.g. {:?}", changed.len(), &changed[..changed.len().min(3)]);
    }

    #[test]
    fn the_encoders_kept_buffers_never_leak_one_state_into_the_next() {
        // A large state, then a small one, then the large one again: each save holds
        // exactly its own state, whatever the reused buffers held before.
        let state = |nodes: usize| {
            let mut c = crate::coord::CoordConfig::new(1, 4096);
            c.min_nodes = nodes.max(1);
            Persisted { machine: crate::coord::machine::Machine::new(c, vec![100 * nodes as u64 + 1]).unwrap(), total_steps: Some(nodes as u64) }
        };
        for n in [3000, 1, 3000, 2] {
            let s = state(n);
            let back = decode_state(&encode_state(&s), "mem").unwrap();
            assert_eq!(serde_json::to_vec(&back).unwrap(), serde_json::to_vec(&s).unwrap(), "state of {n}");
        }
    }
}
