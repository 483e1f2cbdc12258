//! The etcd state store (`--etcd URL,...`, v3 API) for highly available coordinators.
//!
//! * Election: every replica campaigns on `PREFIX/leader` with a lease (TTL
//!   [`LEASE_TTL`], kept alive in the background); [`EtcdStore::connect`] returns only
//!   once this replica is the leader, so a standby waits there and takes over when the
//!   active one's lease expires (it died or was partitioned).
//! * Fencing: every save is a transaction conditioned on our leader key still existing
//!   at its creation revision; a deposed leader's save fails with
//!   [`StoreError::Fenced`] and it stops, so two coordinators never both write.
//! * Losing the lease: the keep-alive (every TTL/3) notices a lease that is revoked or
//!   expired (a response with TTL 0, an error, the stream ending) and
//!   [`StateStore::leadership_lost`] resolves: the coordinator stops answering at once,
//!   well within one TTL, instead of acting until its next save is fenced.
//! * Deadlines: every etcd request but the campaign (which waits for leadership by
//!   design) fails after [`ETCD_DEADLINE`].
//! * Bounded values: a state of at most [`CHUNK`] bytes is one value at `PREFIX/state`
//!   (the layout of the previous version, which loads as it is); a larger one is written
//!   as chunks of at most [`CHUNK`] bytes under `PREFIX/state-chunks/<id>/`, then a small
//!   header at `PREFIX/state` (naming the id, the chunk count, the length and a CRC32)
//!   commits it and removes every other id's chunks in the same transaction. No value
//!   exceeds [`CHUNK`] bytes whatever the world size, and no request exceeds
//!   [`CHUNKS_PER_TXN`] chunks (etcd refuses requests over 1.5 MiB by default).
//! * Compaction: every [`COMPACT_EVERY`] saves the store compacts etcd's history up to
//!   its last save, so a long job's revisions do not fill etcd's backend quota (2 GiB by
//!   default; a full quota refuses every write).

use super::store::{StateStore, StoreError, StoreFuture};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use std::time::Duration;
use tokio::sync::{watch, Mutex};

pub const LEASE_TTL: i64 = 3;
/// The largest value this store writes.
pub const CHUNK: usize = 128 * 1024;
/// Chunks written per transaction (1 MiB: under etcd's 1.5 MiB request limit).
pub const CHUNKS_PER_TXN: usize = 8;
/// Saves between two compactions of etcd's history.
pub const COMPACT_EVERY: u64 = 1000;
/// The longest any etcd request (but the campaign) may take.
pub const ETCD_DEADLINE: Duration = Duration::from_secs(5);

/// `f`, failing after [`ETCD_DEADLINE`] with an error naming `what`.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
    match tokio::time::timeout(ETCD_DEADLINE, f).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(StoreError::Etcd(format!("{what}: no answer within {ETCD_DEADLINE:?}"))),
    }
}

pub struct EtcdStore {
    client: Mutex<Client>,
    state_key: String,
    chunks_prefix: String,
    leader_key: Vec<u8>,
    leader_rev: i64,
    endpoints: String,
    /// Set by the keep-alive task when the lease is gone.
    lost: watch::Receiver<Option<String>>,
    /// Until when the lease is known to live: the TTL from when the last renewal etcd
    /// answered was sent (moved by the keep-alive task; read by [`StateStore::may_act`]).
    valid_until: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
    /// The id of the next chunked save (increasing; a new leader starts from its clock).
    next_id: std::sync::atomic::AtomicU64,
    saves_since_compaction: std::sync::atomic::AtomicU64,
}

/// The value at `PREFIX/state` when the state is written in chunks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChunkedHeader {
    pub otter_chunked_state: ChunkedState,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChunkedState {
    pub id: u64,
    pub chunks: u32,
    pub bytes: u64,
    pub crc32: u32,
}

const HEADER_MARK: &[u8] = b"{\"otter_chunked_state\":";

impl ChunkedHeader {
    pub fn of(id: u64, bytes: &[u8]) -> Self {
        Self { otter_chunked_state: ChunkedState { id, chunks: bytes.chunks(CHUNK).len() as u32, bytes: bytes.len() as u64, crc32: crc32fast::hash(bytes) } }
    }

    /// The header, if `value` (what `PREFIX/state` holds) is one; else the value is the
    /// state itself.
    pub fn parse(value: &[u8]) -> Option<Result<Self, String>> {
        value.starts_with(HEADER_MARK).then(|| serde_json::from_slice(value).map_err(|e| format!("chunked state header: {e}")))
    }

    /// The state from its chunks (in key order), checked against the header.
    pub fn assemble(&self, chunks: &[Vec<u8>]) -> Result<Vec<u8>, String> {
        let h = &self.otter_chunked_state;
        if chunks.len() != h.chunks as usize {
            return Err(format!("chunked state {}: {} of {} chunks present", h.id, chunks.len(), h.chunks));
        }
        let bytes = chunks.concat();
        if bytes.len() as u64 != h.bytes || crc32fast::hash(&bytes) != h.crc32 {
            return Err(format!("chunked state {}: {} bytes, CRC32 {:08x}; the header says {} bytes, {:08x}", h.id, bytes.len(), crc32fast::hash(&bytes), h.bytes, h.crc32));
        }
        Ok(bytes)
    }
}

/// The key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl EtcdStore {
    /// Connects and blocks until this replica is elected leader of `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new().with_connect_timeout(ETCD_DEADLINE);
        let mut client = bounded("connecting", Client::connect(endpoints, Some(opts))).await?;
        let asked = tokio::time::Instant::now();
        let lease = bounded("granting a lease", client.lease_grant(LEASE_TTL, None)).await?.id();
        let (mut keeper, mut responses) = bounded("keeping the lease alive", client.lease_keep_alive(lease)).await?;
        let (lost_tx, lost) = watch::channel(None);
        let valid = std::sync::Arc::new(std::sync::Mutex::new(asked.into_std() + Duration::from_secs(LEASE_TTL as u64)));
        let shared_valid = valid.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis((LEASE_TTL as u64 * 1000) / 3));
            // The lease is only known to live until `ttl` after the last renewal that etcd
            // answered was sent: past that, etcd may have expired it and elected another
            // leader (a partition from etcd looks like nothing more than silence), so the
            // wait for an answer ends there, not at the generic request deadline.
            let mut valid_until = asked + Duration::from_secs(LEASE_TTL as u64);
            let why = loop {
                every.tick().await;
                let sent = tokio::time::Instant::now();
                if let Err(e) = keeper.keep_alive().await {
                    break format!("etcd lease {lease:x} keep-alive failed: {e}");
                }
                match tokio::time::timeout_at(valid_until.min(sent + ETCD_DEADLINE), responses.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        valid_until = sent + Duration::from_secs(r.ttl() as u64);
                        *shared_valid.lock().unwrap_or_else(|e| e.into_inner()) = valid_until.into_std();
                        continue;
                    }
                    Ok(Ok(Some(_))) => break format!("etcd lease {lease:x} was revoked or has expired"),
                    Ok(Ok(None)) => break format!("etcd lease {lease:x}: the keep-alive stream ended"),
                    Ok(Err(e)) => break format!("etcd lease {lease:x} keep-alive failed: {e}"),
                    Err(_) => break format!("etcd lease {lease:x}: no keep-alive answer before the lease could have expired"),
                }
            };
            tracing::error!("{why}: this coordinator stops acting as leader");
            let _ = lost_tx.send(Some(why));
        });
        let me = format!("{}:{}", std::env::var("HOSTNAME").unwrap_or_default(), std::process::id());
        eprintln!("otter-coord: campaigning for leadership of {prefix} on etcd {}", endpoints.join(","));
        let resp = client.campaign(format!("{prefix}/leader"), me, lease).await.map_err(etcd_err)?;
        let leader = resp.leader().ok_or_else(|| StoreError::Etcd("campaign returned no leader key".into()))?;
        eprintln!("otter-coord: elected leader");
        Ok(Self {
            leader_key: leader.key().to_vec(),
            leader_rev: leader.rev(),
            client: Mutex::new(client),
            state_key: format!("{prefix}/state"),
            chunks_prefix: format!("{prefix}/state-chunks/"),
            endpoints: endpoints.join(","),
            lost,
            valid_until: valid,
            next_id: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64).into(),
            saves_since_compaction: 0.into(),
        })
    }

    fn chunk_key(&self, id: u64, i: usize) -> String {
        format!("{}{id:020}/{i:06}", self.chunks_prefix)
    }

    fn while_leader(&self) -> Compare {
        Compare::create_revision(self.leader_key.clone(), CompareOp::Equal, self.leader_rev)
    }

    fn fenced(&self) -> StoreError {
        StoreError::Fenced(format!("leader key {} is gone", String::from_utf8_lossy(&self.leader_key)))
    }

    /// One fenced transaction; returns the revision it made.
    async fn txn(&self, what: &str, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        let txn = Txn::new().when([self.while_leader()]).and_then(ops);
        let r = bounded(what, self.client.lock().await.txn(txn)).await?;
        if !r.succeeded() {
            return Err(self.fenced());
        }
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Deletes the chunks of every id but `keep` (all of them with `None`).
    fn delete_other_chunks(&self, keep: Option<u64>) -> Vec<TxnOp> {
        let all_end = prefix_end(&self.chunks_prefix);
        match keep {
            None => vec![TxnOp::delete(self.chunks_prefix.as_str(), Some(DeleteOptions::new().with_range(all_end)))],
            Some(id) => {
                let mine = format!("{}{id:020}/", self.chunks_prefix);
                vec![
                    TxnOp::delete(self.chunks_prefix.as_str(), Some(DeleteOptions::new().with_range(mine.as_str()))),
                    TxnOp::delete(prefix_end(&mine), Some(DeleteOptions::new().with_range(all_end))),
                ]
            }
        }
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let r = bounded("reading the state", self.client.lock().await.get(self.state_key.as_str(), None)).await?;
            let Some(value) = r.kvs().first().map(|kv| kv.value().to_vec()) else { return Ok(None) };
            let unreadable = |message: String| StoreError::Unreadable { location: self.describe(), message };
            let Some(header) = ChunkedHeader::parse(&value) else { return Ok(Some(value)) };
            let header = header.map_err(unreadable)?;
            let id = header.otter_chunked_state.id;
            let mine = format!("{}{id:020}/", self.chunks_prefix);
            let opts = GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Ascend);
            let r = bounded("reading the state's chunks", self.client.lock().await.get(mine.as_str(), Some(opts))).await?;
            let chunks: Vec<Vec<u8>> = r.kvs().iter().map(|kv| kv.value().to_vec()).collect();
            header.assemble(&chunks).map(Some).map_err(unreadable)
        })
    }

    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            let revision = if bytes.len() <= CHUNK {
                let mut ops = vec![TxnOp::put(self.state_key.as_str(), bytes, None)];
                ops.extend(self.delete_other_chunks(None));
                self.txn("saving the state", ops).await?
            } else {
                let id = self.next_id.fetch_add(1, Ordering::SeqCst);
                let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
                for (n, group) in chunks.chunks(CHUNKS_PER_TXN).enumerate() {
                    let ops = group.iter().enumerate().map(|(i, c)| TxnOp::put(self.chunk_key(id, n * CHUNKS_PER_TXN + i), c.to_vec(), None)).collect();
                    self.txn("saving the state's chunks", ops).await?;
                }
                let header = serde_json::to_vec(&ChunkedHeader::of(id, &bytes)).expect("a header serializes");
                let mut ops = vec![TxnOp::put(self.state_key.as_str(), header, None)];
                ops.extend(self.delete_other_chunks(Some(id)));
                self.txn("committing the state's chunks", ops).await?
            };
            if self.saves_since_compaction.fetch_add(1, Ordering::SeqCst) + 1 >= COMPACT_EVERY && revision > 0 {
                self.saves_since_compaction.store(0, Ordering::SeqCst);
                // Only history older than the save just made goes; a failure costs nothing
                // but space, and the next round tries again.
                if let Err(e) = bounded("compacting", self.client.lock().await.compact(revision, None)).await {
                    tracing::warn!("etcd compaction to revision {revision}: {e}");
                }
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!("etcd {} key {}", self.endpoints, self.state_key)
    }

    fn may_act(&self) -> Result<(), String> {
        if let Some(why) = self.lost.borrow().clone() {
            return Err(why);
        }
        let until = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if now >= until {
            return Err(format!("the etcd lease was last known to live {:.1} s ago: another replica may have been elected", (now - until).as_secs_f64()));
        }
        Ok(())
    }

    fn leadership_lost(&self) -> StoreFuture<'_, String> {
        let mut lost = self.lost.clone();
        Box::pin(async move {
            match lost.wait_for(Option::is_some).await {
                Ok(why) => Ok(why.clone().unwrap_or_default()),
                // The keep-alive task is gone without a word: nothing keeps the lease.
                Err(_) => Ok("the etcd lease keep-alive stopped".to_string()),
            }
        })
    }
}

/// A single-member etcd on free loopback ports, its data and log (`etcd.log`) in `dir`:
/// what `otter-coord bench --store etcd` and the HA tests run against. Killed when dropped.
pub struct LocalEtcd {
    child: std::process::Child,
    url: String,
}

impl LocalEtcd {
    /// Starts `etcd` (Debian's etcd-server) with `extra` arguments after ours and waits
    /// (at most 20 s) until it accepts connections.
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let (client, peer) = (free()?, free()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let child = std::process::Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url, "--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .context("starting `etcd` (Debian's etcd-server; scripts/setup.sh installs it)")?;
        // Constructed before the wait, so that a timeout kills the child on the way out.
        let etcd = Self { child, url };
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(20), "etcd did not start within 20 s; see {}", log.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_state_splits_into_bounded_chunks_and_assembles_back() {
        let state: Vec<u8> = (0..(5 * CHUNK + 17)).map(|i| (i % 251) as u8).collect();
        let header = ChunkedHeader::of(42, &state);
        let value = serde_json::to_vec(&header).unwrap();
        assert!(value.len() < 256, "the header is small: {} bytes", value.len());
        assert_eq!(ChunkedHeader::parse(&value), Some(Ok(header.clone())));
        let chunks: Vec<Vec<u8>> = state.chunks(CHUNK).map(<[u8]>::to_vec).collect();
        assert_eq!(chunks.len(), 6);
        assert!(chunks.iter().all(|c| c.len() <= CHUNK));
        assert_eq!(header.assemble(&chunks).unwrap(), state);
        // A lost chunk or a changed byte is refused, naming the save.
        assert!(header.assemble(&chunks[..5]).unwrap_err().contains("5 of 6 chunks"));
        let mut bad = chunks.clone();
        bad[3][7] ^= 1;
        assert!(header.assemble(&bad).unwrap_err().contains("CRC32"));
    }

    #[test]
    fn a_plain_state_is_not_taken_for_a_header() {
        // What the previous version wrote (the state itself) loads as it is.
        assert_eq!(ChunkedHeader::parse(br#"{"machine":{"generation":3}}"#), None);
        assert!(matches!(ChunkedHeader::parse(br#"{"otter_chunked_state":{"id":1}}"#), Some(Err(_))));
    }

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end("otter/state-chunks/"), b"otter/state-chunks0".to_vec());
        assert_eq!(prefix_end("k"), b"l".to_vec());
    }
}
