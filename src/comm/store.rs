//! A generation's bootstrap store: libtorch's own `c10d::TCPStore` (through
//! `store_shim.cpp`), the key-value store an NCCL group exchanges its unique id through.
//!
//! Rank 0 of generation `g` serves it on the listening socket it reported to the
//! coordinator at rendezvous (the `comm_addr` every rank's assignment lists, so there is
//! no extra port to hand out or race for) and writes `g` under `otter/generation`. The
//! other ranks connect to that address and wait until it serves *their* generation: a
//! store of a newer generation refuses them (they are stale), a store of an older one
//! (rank 0 not yet re-served) is waited out. Every other key lives under the prefix
//! `g<g>/`, and the NCCL group reads the store through a `c10d::PrefixStore` of the same
//! prefix, so a rank of an older generation can never complete a newer group's bootstrap.

use super::CommError;
use std::ffi::{c_char, c_void, CString};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

extern "C" {
    fn otter_store_new(host: *const c_char, port: u16, listen_fd: i32, timeout_ms: i64, err: *mut c_char, len: usize) -> *mut c_void;
    fn otter_store_set(h: *mut c_void, key: *const c_char, value: *const u8, n: usize, err: *mut c_char, len: usize) -> i32;
    fn otter_store_get(h: *mut c_void, key: *const c_char, out: *mut u8, cap: usize, n: *mut usize, err: *mut c_char, len: usize) -> i32;
    fn otter_store_free(h: *mut c_void);
}

const GENERATION_KEY: &str = "otter/generation";

/// One process's handle on generation `generation`'s store.
pub struct GenerationStore {
    raw: *mut c_void,
    rank: usize,
    generation: u64,
}

// SAFETY: a c10d::TCPStore handle is used from one thread at a time (&mut self or &self
// calls that the store itself serializes on its socket).
unsafe impl Send for GenerationStore {}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn c_string(rank: usize, s: &str) -> Result<CString, CommError> {
    CString::new(s).map_err(|_| CommError::Protocol { rank, message: format!("store key or host {s:?} contains a NUL byte") })
}

impl GenerationStore {
    fn open(rank: usize, generation: u64, addr: SocketAddr, listen_fd: Option<i32>, timeout: Duration) -> Result<Self, CommError> {
        let host = c_string(rank, &addr.ip().to_string())?;
        let mut err = vec![0u8; 1024];
        // SAFETY: valid C string and error buffer; `listen_fd`, when given, is a bound,
        // listening socket that outlives the call (the shim serves on a duplicate of it);
        // the shim catches every C++ exception.
        let raw = unsafe {
            otter_store_new(host.as_ptr(), addr.port(), listen_fd.unwrap_or(-1), timeout.as_millis() as i64, err.as_mut_ptr() as *mut c_char, err.len())
        };
        if raw.is_null() {
            return Err(CommError::Protocol { rank, message: format!("generation {generation}'s store at {addr}: {}", message(&err)) });
        }
        Ok(Self { raw, rank, generation })
    }

    /// Rank 0: serves generation `generation`'s store on `listener` (bound and listening;
    /// nothing else may accept on it while the store lives).
    pub fn serve(listener: &TcpListener, generation: u64, timeout: Duration) -> Result<Self, CommError> {
        let addr = listener.local_addr().map_err(|e| CommError::Invalid(format!("the store's listener: {e}")))?;
        let store = Self::open(0, generation, addr, Some(listener.as_raw_fd()), timeout)?;
        store.set_raw(GENERATION_KEY, generation.to_string().as_bytes())?;
        Ok(store)
    }

    /// Rank `rank` (> 0): joins generation `generation`'s store served at `addr` by rank
    /// 0, waiting (up to `timeout`) until it serves this generation. A store that already
    /// serves a newer one refuses this rank: [`CommError::StaleGeneration`].
    pub fn join(addr: SocketAddr, rank: usize, generation: u64, timeout: Duration) -> Result<Self, CommError> {
        Self::join_watching(addr, rank, generation, timeout, |_| {})
    }

    /// [`GenerationStore::join`], calling `waiting(served)` each time it finds rank 0 not
    /// serving `generation` yet (`served`: the older generation it serves, if any).
    pub fn join_watching(addr: SocketAddr, rank: usize, generation: u64, timeout: Duration, mut waiting: impl FnMut(Option<u64>)) -> Result<Self, CommError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let served = Self::open(rank, generation, addr, None, left.max(Duration::from_millis(1)))
                .and_then(|s| s.get_raw(GENERATION_KEY).map(|v| (s, v)))
                .map(|(s, v)| (s, String::from_utf8_lossy(&v).parse::<u64>().ok()));
            match served {
                Ok((s, Some(g))) if g == generation => return Ok(s),
                Ok((_, Some(g))) if g > generation => return Err(CommError::StaleGeneration { rank, mine: generation, current: g }),
                Ok((_, older)) if Instant::now() < deadline => {
                    waiting(older);
                    std::thread::sleep(Duration::from_millis(50));
                }
                // An older generation's store (or none yet): rank 0 has not re-served.
                _ if Instant::now() >= deadline => {
                    return Err(CommError::Timeout { rank, what: "waiting for rank 0 to serve this generation's store", timeout, peer: Some((0, addr.to_string())) })
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The prefix of this generation's keys (the NCCL group's `PrefixStore` uses it too).
    pub fn prefix(&self) -> String {
        format!("g{}/", self.generation)
    }

    /// Sets `key` of this generation.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        self.set_raw(&format!("{}{key}", self.prefix()), value)
    }

    /// `key` of this generation, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, CommError> {
        self.get_raw(&format!("{}{key}", self.prefix()))
    }

    fn set_raw(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let k = c_string(self.rank, key)?;
        let mut err = vec![0u8; 1024];
        // SAFETY: live handle; valid key, value and error buffers for the call.
        let rc = unsafe { otter_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len(), err.as_mut_ptr() as *mut c_char, err.len()) };
        match rc {
            0 => Ok(()),
            _ => Err(CommError::Protocol { rank: self.rank, message: format!("store set {key}: {}", message(&err)) }),
        }
    }

    fn get_raw(&self, key: &str) -> Result<Vec<u8>, CommError> {
        let k = c_string(self.rank, key)?;
        let mut out = vec![0u8; 256];
        loop {
            let (mut n, mut err) = (0usize, vec![0u8; 1024]);
            // SAFETY: live handle; `out` holds `out.len()` bytes; `n` and `err` are valid.
            let rc = unsafe {
                otter_store_get(self.raw, k.as_ptr(), out.as_mut_ptr(), out.len(), &mut n, err.as_mut_ptr() as *mut c_char, err.len())
            };
            if rc != 0 {
                return Err(CommError::Protocol { rank: self.rank, message: format!("store get {key}: {}", message(&err)) });
            }
            if n <= out.len() {
                out.truncate(n);
                return Ok(out);
            }
            out = vec![0u8; n]; // larger than the buffer: read again with room for it
        }
    }

    /// The `c10::intrusive_ptr<c10d::Store>*` behind this handle, for the NCCL shim.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn raw(&self) -> *mut c_void {
        self.raw
    }
}

impl Drop for GenerationStore {
    fn drop(&mut self) {
        // SAFETY: handle from otter_store_new, freed once.
        unsafe { otter_store_free(self.raw) }
    }
}
