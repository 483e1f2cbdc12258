//! Collective communication (data parallelism all-reduces only trainable gradients).
//!
//! * [`Collective`]: the seam: all-reduce (mean) of buckets, broadcast, barrier,
//!   reduce-scatter and all-gather, each bounded by a timeout. A group is torn down by
//!   dropping it and rebuilt with a new membership without restarting the process.
//! * [`ring::RingGroup`]: our CPU ring over TCP (reduce-scatter then all-gather, chunked
//!   and pipelined so sending, receiving and reducing overlap). No libtorch.
//!
//! * `otter::comm::nccl::NcclGroup` (the `otter` crate, feature `nccl`): NCCL through
//!   libtorch's c10d, on device tensors, bootstrapped through a generation's store
//!   (`otter::comm::store`).
//! * [`shm`]: the ring's same-host all-reduce through shared memory.
//! * [`emulated::NcclLike`]: a test double that fails the way NCCL does (a collective
//!   with a dead peer blocks until the group is aborted), so the release path NCCL needs
//!   is tested on CPUs.
//!
//! Buffers are plain `f32` slices here; the training side flattens gradients into buckets.

pub mod auth;
pub mod emulated;
pub mod ring;
pub mod shm;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: peer {peer} ({addr}): {what}: {source}")]
    Peer { rank: usize, peer: usize, addr: String, what: &'static str, source: std::io::Error },
    #[error("rank {rank}: {what} timed out after {timeout:?}{}", on_peer(.peer))]
    Timeout { rank: usize, what: &'static str, timeout: Duration, peer: Option<(usize, String)> },
    #[error("rank {rank}: {message}")]
    Protocol { rank: usize, message: String },
    /// Another thread released this rank from the group ([`Abort`]): the coordinator
    /// formed a new generation, so this one's operations can never complete.
    #[error("rank {rank}: aborted: {reason}")]
    Aborted { rank: usize, reason: String },
    /// This rank's generation is older than the one its group's store already serves:
    /// it may not join (it rendezvouses again).
    #[error("rank {rank}: generation {mine} is stale: the group's store serves generation {current}")]
    StaleGeneration { rank: usize, mine: u64, current: u64 },
    #[error("invalid group: {0}")]
    Invalid(String),
}

fn on_peer(peer: &Option<(usize, String)>) -> String {
    peer.as_ref().map_or(String::new(), |(p, addr)| format!(" waiting on peer {p} ({addr})"))
}

impl CommError {
    /// The peer this failure blames: one this rank could not reach or hear from (a
    /// timeout, an unreachable host). `None` when the peer closed its connection (it died
    /// or gave up: its own node is reported through the coordinator) or nobody is known.
    pub fn blamed_peer(&self) -> Option<usize> {
        use std::io::ErrorKind::*;
        match self {
            CommError::Timeout { peer: Some((p, _)), .. } => Some(*p),
            CommError::Peer { peer, source, .. } if matches!(source.kind(), TimedOut | WouldBlock | HostUnreachable | NetworkUnreachable) => Some(*peer),
            _ => None,
        }
    }
}

/// Releases a rank from its group's operations from another thread: every socket the
/// group registered is shut down (a blocked read or write returns at once) and the
/// shared-memory waits see the flag. One per group incarnation; cloning shares it.
#[derive(Clone, Default)]
pub struct Abort(Arc<AbortInner>);

#[derive(Default)]
struct AbortInner {
    aborted: AtomicBool,
    reason: Mutex<Option<String>>,
    sockets: Mutex<Vec<TcpStream>>,
    /// Releases a group that is not made of our sockets (NCCL's communicator).
    hooks: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl Abort {
    pub fn new() -> Self {
        Self::default()
    }

    /// Aborts (idempotent; the first reason is kept).
    pub fn abort(&self, reason: impl Into<String>) {
        {
            let mut r = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
            r.get_or_insert_with(|| reason.into());
        }
        if self.0.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in self.0.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for hook in self.0.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook();
        }
    }

    /// Runs `hook` on abort (at once if already aborted): how a group that is not made of
    /// registered sockets is released, e.g. `ProcessGroupNCCL::abort()`, which fails the
    /// collective blocked on another thread. Runs once, on the aborting thread.
    pub fn on_abort(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let mut hooks = self.0.hooks.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_aborted() {
            drop(hooks);
            hook();
            return;
        }
        hooks.push(hook);
    }

    pub fn is_aborted(&self) -> bool {
        self.0.aborted.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Registers a socket to shut down on abort (at once if already aborted).
    pub fn register(&self, s: &TcpStream) -> std::io::Result<()> {
        let handle = s.try_clone()?;
        let mut sockets = self.0.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_aborted() {
            let _ = handle.shutdown(std::net::Shutdown::Both);
        }
        sockets.push(handle);
        Ok(())
    }

    /// `e`, unless this abort explains it (an operation failing on a socket it shut).
    pub fn explain(&self, rank: usize, e: CommError) -> CommError {
        match self.reason() {
            Some(reason) if self.is_aborted() && !matches!(e, CommError::Aborted { .. }) => CommError::Aborted { rank, reason },
            _ => e,
        }
    }
}

/// The collective operations every backend provides. All ranks must call the same
/// operations in the same order with buffers of the same sizes.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: every buffer becomes the element-wise mean over ranks.
    fn all_reduce_mean(&mut self, buffers: &mut [&mut [f32]]) -> Result<(), CommError>;
    /// In place: every rank's `buf` becomes `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    fn barrier(&mut self) -> Result<(), CommError>;
    /// `input` (same length on all ranks) is summed over ranks and split into `world`
    /// contiguous parts ([`split`]); this rank's part is written to `output`.
    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Concatenation of every rank's `input` (lengths given by [`split`] of `output.len()`)
    /// in rank order.
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// In place: `buf` becomes the element-wise sum over ranks, in wrapping i64 arithmetic:
    /// exact and independent of the order (the deterministic reduction, issue 46).
    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CommError>;
}

/// How `len` elements are cut into `world` contiguous parts: the first `len % world` parts
/// get one extra element. Returns (start, len) of part `i`.
pub fn split(len: usize, world: usize, i: usize) -> (usize, usize) {
    let base = len / world;
    let extra = len % world;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreachable_or_silent_peers_are_blamed() {
        let peer = |kind| CommError::Peer { rank: 0, peer: 3, addr: "h:1".into(), what: "receive", source: std::io::Error::from(kind) };
        assert_eq!(peer(std::io::ErrorKind::TimedOut).blamed_peer(), Some(3));
        assert_eq!(peer(std::io::ErrorKind::HostUnreachable).blamed_peer(), Some(3));
        assert_eq!(peer(std::io::ErrorKind::UnexpectedEof).blamed_peer(), None, "it closed its connection: it died or gave up");
        assert_eq!(peer(std::io::ErrorKind::ConnectionRefused).blamed_peer(), None, "nothing listens: the process is gone");
        let t = CommError::Timeout { rank: 0, what: "receive", timeout: Duration::from_secs(1), peer: Some((2, "h:2".into())) };
        assert_eq!(t.blamed_peer(), Some(2));
        assert!(t.to_string().contains("waiting on peer 2 (h:2)"), "{t}");
        assert_eq!(CommError::Aborted { rank: 0, reason: "x".into() }.blamed_peer(), None);
    }

    #[test]
    fn an_abort_explains_later_failures_and_shuts_registered_sockets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let a = Abort::new();
        a.register(&c).unwrap();
        let e = CommError::Protocol { rank: 1, message: "eof".into() };
        assert!(matches!(a.explain(1, e), CommError::Protocol { .. }), "not aborted yet");
        let reader = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || std::io::Read::read(&mut c, &mut [0u8; 8]))
        };
        a.abort("generation 3 formed");
        a.abort("a second reason is ignored");
        assert_eq!(reader.join().unwrap().unwrap(), 0, "a blocked read returns at once");
        assert_eq!(std::io::Read::read(&mut server, &mut [0u8; 8]).unwrap(), 0, "the peer sees the close");
        let e = a.explain(1, CommError::Protocol { rank: 1, message: "eof".into() });
        assert_eq!(e.to_string(), "rank 1: aborted: generation 3 formed");
        let late = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        a.register(&late).unwrap();
        assert!(std::io::Write::write_all(&mut &late, &[1u8; 1 << 20]).is_err(), "registered after the abort: shut at once");
    }

    #[test]
    fn an_abort_runs_each_release_hook_once_and_late_hooks_at_once() {
        use std::sync::atomic::AtomicUsize;
        let a = Abort::new();
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        a.on_abort(Box::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(fired.load(Ordering::SeqCst), 0, "not before the abort");
        a.abort("generation 4 formed");
        a.abort("again");
        assert_eq!(fired.load(Ordering::SeqCst), 1, "once");
        let f = fired.clone();
        a.on_abort(Box::new(move || {
            f.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(fired.load(Ordering::SeqCst), 11, "a hook added after the abort runs at once");
    }

    #[test]
    fn split_covers_everything_once() {
        for len in [0, 1, 2, 5, 7, 64, 1001] {
            for world in 1..6 {
                let mut next = 0;
                for i in 0..world {
                    let (s, n) = split(len, world, i);
                    assert_eq!(s, next);
                    next += n;
                }
                assert_eq!(next, len);
            }
        }
    }
}
