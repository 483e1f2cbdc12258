//! Same-host fast path for the ring's all-reduce: ranks of one machine reduce through a
//! shared-memory segment instead of loopback TCP (which copies every byte through the
//! kernel twice and burns the cores the reduction needs).
//!
//! Layout: a header page (barrier counter, futex word, abort flag, nonce) then two banks
//! of `world` slots of [`SLOT`] bytes. A buffer is processed in segments of one slot:
//!
//! 1. every rank copies its segment into its own slot of the bank;
//! 2. barrier;
//! 3. rank `r` sums part `r` (see [`split`]) over all slots, finishes it (f32: scaled to
//!    the mean; i64: the exact sum as is), and writes it back into its own slot's part `r`;
//! 4. barrier;
//! 5. every rank copies part `j` from slot `j`, for every `j`, into its output.
//!
//! Banks alternate between segments, so the barrier of step 2 of segment k+1 also
//! proves every rank has finished reading segment k-1's bank: two barriers per segment.
//!
//! Failure: every wait is bounded by the group timeout; a rank that sees its ring
//! neighbours' sockets close (a dead peer) or times out raises the shared abort flag, so
//! all waiters fail promptly instead of each waiting out its own timeout.

use super::{split, CommError};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the segment reduces: added over the ranks, then finished.
trait Reduce: Copy {
    fn add_into(mine: &mut [Self], other: &[Self]);
    fn finish(sum: &mut [Self], world: usize);
}

impl Reduce for f32 {
    fn add_into(mine: &mut [f32], other: &[f32]) {
        for (m, o) in mine.iter_mut().zip(other) {
            *m += *o;
        }
    }
    /// The mean.
    fn finish(sum: &mut [f32], world: usize) {
        let scale = 1.0 / world as f32;
        for m in sum.iter_mut() {
            *m *= scale;
        }
    }
}

impl Reduce for i64 {
    fn add_into(mine: &mut [i64], other: &[i64]) {
        for (m, o) in mine.iter_mut().zip(other) {
            *m = m.wrapping_add(*o);
        }
    }
    /// The sum, exact.
    fn finish(_: &mut [i64], _: usize) {}
}

/// Bytes per rank per segment.
pub const SLOT: usize = 4 << 20;
const HEADER: usize = 4096;
const MAGIC: u64 = 0x4f54_5445_5253_484d; // "OTTERSHM"

#[repr(C)]
struct Header {
    magic: AtomicU64,
    nonce: AtomicU64,
    world: AtomicU64,
    /// Total barrier arrivals since creation (monotonic, never reset).
    arrived: AtomicU64,
    /// Bumped by the last arriver of each barrier; waiters futex-wait on it.
    seq: AtomicU32,
    abort: AtomicU32,
}

pub struct ShmSegment {
    base: *mut u8,
    len: usize,
    rank: usize,
    world: usize,
    /// Barriers this rank has passed.
    barriers: u64,
    /// Segments processed (selects the bank).
    segments: u64,
}

// SAFETY: the mapping is owned by this value and only touched through &mut self; the
// cross-process synchronisation is done with atomics in the header.
unsafe impl Send for ShmSegment {}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: base/len come from a successful mmap in `open`.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

fn futex(word: &AtomicU32, op: libc::c_int, val: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as libc::c_long });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT/WAKE on a valid, aligned u32 in a shared mapping (not PRIVATE:
    // other processes map the same page).
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), op, val, tsp, std::ptr::null::<u32>(), 0u32);
    }
}

/// Size of the segment for `world` ranks.
pub fn segment_len(world: usize) -> usize {
    HEADER + 2 * world * SLOT
}

impl ShmSegment {
    /// Creates the backing file (rank 0) with a fresh nonce, readable and writable by this
    /// user only (mode 0600: the job's ranks run as one user). The caller tells the other
    /// ranks `(path, nonce)` and unlinks the file once everyone has mapped it.
    pub fn create(path: &std::path::Path, world: usize, nonce: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
        f.set_len(segment_len(world) as u64)?;
        let seg = Self::map(&f, 0, world)?;
        let h = seg.header();
        h.world.store(world as u64, Ordering::Relaxed);
        h.nonce.store(nonce, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Maps an existing segment; `Ok(None)` when it is not the one rank 0 created (another
    /// host, or another container's /dev/shm).
    pub fn open(path: &std::path::Path, rank: usize, world: usize, nonce: u64) -> std::io::Result<Option<Self>> {
        let f = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if f.metadata()?.len() != segment_len(world) as u64 {
            return Ok(None);
        }
        let seg = Self::map(&f, rank, world)?;
        let h = seg.header();
        let ok = h.magic.load(Ordering::Acquire) == MAGIC
            && h.nonce.load(Ordering::Relaxed) == nonce
            && h.world.load(Ordering::Relaxed) == world as u64;
        Ok(ok.then_some(seg))
    }

    fn map(f: &std::fs::File, rank: usize, world: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = segment_len(world);
        // SAFETY: mapping a file we opened read-write with the length we just checked/set.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { base: base as *mut u8, len, rank, world, barriers: 0, segments: 0 })
    }

    fn header(&self) -> &Header {
        // SAFETY: the header page is at the start of the mapping, aligned, all atomics.
        unsafe { &*(self.base as *const Header) }
    }

    /// Slot `j` of `bank` as `T`s.
    fn slot<T>(&self, bank: usize, j: usize) -> *mut T {
        // SAFETY (of later derefs): in bounds by construction; slots start at multiples of
        // SLOT after a page, so they are aligned for f32 and i64.
        unsafe { self.base.add(HEADER + (bank * self.world + j) * SLOT) as *mut T }
    }

    pub fn abort(&self) {
        let h = self.header();
        h.abort.store(1, Ordering::SeqCst);
        h.seq.fetch_add(1, Ordering::SeqCst);
        futex(&h.seq, libc::FUTEX_WAKE, i32::MAX as u32, None);
    }

    /// Waits until every rank has arrived at this rank's next barrier. `alive` is polled
    /// now and then while waiting: it returns an error when a peer is known dead.
    fn barrier(&mut self, timeout: Duration, alive: &mut dyn FnMut() -> Result<(), CommError>) -> Result<(), CommError> {
        let rank = self.rank;
        self.barriers += 1;
        let target = self.barriers * self.world as u64;
        let h = self.header();
        let seq = h.seq.load(Ordering::SeqCst);
        let now_arrived = h.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        if now_arrived == target {
            h.seq.fetch_add(1, Ordering::SeqCst);
            futex(&h.seq, libc::FUTEX_WAKE, i32::MAX as u32, None);
            return Ok(());
        }
        let start = Instant::now();
        let mut spins = 0u32;
        let mut last_check = start;
        let mut seq = seq;
        loop {
            // Arrival first: a peer that completed and left (its drop raises the abort
            // flag) must not fail a barrier everyone already reached.
            if h.arrived.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            if h.abort.load(Ordering::SeqCst) != 0 {
                return Err(CommError::Protocol { rank, message: "collective aborted by a peer (a rank failed)".into() });
            }
            if spins < 2000 {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(start) > timeout {
                self.abort();
                return Err(CommError::Timeout { rank, what: "shared-memory barrier", timeout, peer: None });
            }
            if now.duration_since(last_check) > Duration::from_millis(20) {
                last_check = now;
                if let Err(e) = alive() {
                    self.abort();
                    return Err(e);
                }
            }
            futex(&h.seq, libc::FUTEX_WAIT, seq, Some(Duration::from_millis(5)));
            seq = h.seq.load(Ordering::SeqCst);
        }
    }

    /// In place: `buf` becomes the element-wise mean over ranks (every rank passes a
    /// buffer of the same length).
    pub fn all_reduce_mean(&mut self, buf: &mut [f32], timeout: Duration, alive: &mut dyn FnMut() -> Result<(), CommError>) -> Result<(), CommError> {
        self.all_reduce(buf, timeout, alive)
    }

    /// In place: `buf` becomes the element-wise sum over ranks, exact (wrapping, as the
    /// TCP ring and NCCL add i64; `train::exact` keeps its sums in range).
    pub fn all_reduce_sum_i64(&mut self, buf: &mut [i64], timeout: Duration, alive: &mut dyn FnMut() -> Result<(), CommError>) -> Result<(), CommError> {
        self.all_reduce(buf, timeout, alive)
    }

    fn all_reduce<T: Reduce>(&mut self, buf: &mut [T], timeout: Duration, alive: &mut dyn FnMut() -> Result<(), CommError>) -> Result<(), CommError> {
        let (n, r) = (self.world, self.rank);
        for seg in buf.chunks_mut(SLOT / std::mem::size_of::<T>()) {
            let bank = (self.segments % 2) as usize;
            self.segments += 1;
            let len = seg.len();
            // SAFETY: slot pointers are in bounds and `len` <= SLOT/size_of::<T>(); this rank writes only
            // its own slot until the barrier, then only its own part of its own slot, and
            // reads other slots only after the barrier that publishes them.
            unsafe {
                std::ptr::copy_nonoverlapping(seg.as_ptr(), self.slot::<T>(bank, r), len);
            }
            self.barrier(timeout, alive)?;
            let (ps, pn) = split(len, n, r);
            // SAFETY: after the barrier every rank's slot of this bank is published; this
            // rank writes only part `r` of its own slot (in bounds: `ps + pn <= len <=
            // SLOT/size_of::<T>()`) and reads part `r` of the others', which nobody writes
            // until the next barrier.
            unsafe {
                let mine = std::slice::from_raw_parts_mut(self.slot::<T>(bank, r).add(ps), pn);
                for j in (0..n).filter(|&j| j != r) {
                    let other = std::slice::from_raw_parts(self.slot::<T>(bank, j).add(ps), pn);
                    T::add_into(mine, other);
                }
                T::finish(mine, n);
            }
            self.barrier(timeout, alive)?;
            for j in 0..n {
                let (s, k) = split(len, n, j);
                // SAFETY: after the second barrier part `j` of slot `j` is final; `s + k <=
                // len` fits both the slot and `seg`, which do not overlap (the slot is in
                // the shared mapping, `seg` in this process's buffer).
                unsafe {
                    std::ptr::copy_nonoverlapping(self.slot::<T>(bank, j).add(s), seg.as_mut_ptr().add(s), k);
                }
            }
        }
        Ok(())
    }
}

/// Whether the peer at the other end of `s` has closed its socket (it died). Only
/// meaningful while no data is expected on `s`.
pub fn peer_closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = matches!(s.peek(&mut b), Ok(0)) || matches!(s.peek(&mut b), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
    let _ = s.set_nonblocking(false);
    closed
}

/// Where rank 0 of this process creates segments: `/dev/shm/otter-ring-<pid>-<random>`.
pub const PREFIX: &str = "otter-ring-";

/// Removes segments left in `dir` by a creator that died between creating one and
/// unlinking it (its pid in the name is gone), this user's only. Returns how many.
pub fn remove_stale(dir: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let mine = e.metadata().is_ok_and(|m| m.uid() == me);
        if mine && pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}
