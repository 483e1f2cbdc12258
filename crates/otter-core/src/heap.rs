//! The process's heap as its allocator sees it: what is live, what it holds free, what it
//! got from the system. RSS alone cannot tell a leak (live bytes grow) from fragmentation
//! (bytes held but free grow); these numbers can (issue 50). Served as
//! `otter_process_heap_bytes{kind}` by every binary's metrics.
//!
//! The training binaries run on TCMalloc (linked by the `otter` package's build script),
//! read through its C API (`MallocExtension_GetNumericProperty`, looked up at run time);
//! the coordinator runs on glibc's malloc, read through `mallinfo2`.

/// One reading of the allocator's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Which allocator answered.
    pub allocator: Allocator,
    /// Bytes in live allocations.
    pub in_use: u64,
    /// Bytes the allocator holds free, still mapped (its caches, free chunks in arenas).
    pub free: u64,
    /// Bytes the allocator obtained from the system and has not returned: its footprint
    /// (in use + free; what fragmentation grows).
    pub footprint: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Allocator {
    #[default]
    Unknown,
    Glibc,
    Tcmalloc,
}

type NumericProperty = unsafe extern "C" fn(*const std::ffi::c_char, *mut usize) -> i32;

/// The address of TCMalloc's C API function `name`, looked up once into `cell` (`None`
/// where TCMalloc does not serve this process).
fn tcmalloc_symbol(cell: &'static std::sync::OnceLock<Option<usize>>, name: &std::ffi::CStr) -> Option<usize> {
    *cell.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    })
}

/// TCMalloc's `MallocExtension_GetNumericProperty`, if TCMalloc serves this process.
fn tcmalloc() -> Option<NumericProperty> {
    static F: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    // SAFETY: the symbol, where present, is TCMalloc's function of this signature.
    tcmalloc_symbol(&F, c"MallocExtension_GetNumericProperty").map(|a| unsafe { std::mem::transmute::<usize, NumericProperty>(a) })
}

fn tc_property(f: NumericProperty, name: &std::ffi::CStr) -> u64 {
    let mut v: usize = 0;
    // SAFETY: a NUL-terminated property name and a valid out pointer.
    let ok = unsafe { f(name.as_ptr(), &mut v) };
    if ok != 0 {
        v as u64
    } else {
        0
    }
}

/// TCMalloc's `MallocExtension_SetNumericProperty(name, value)`: whether TCMalloc took it,
/// `None` where TCMalloc does not serve this process.
fn tc_set_property(name: &std::ffi::CStr, value: usize) -> Option<bool> {
    static F: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let a = tcmalloc_symbol(&F, c"MallocExtension_SetNumericProperty")?;
    // SAFETY: TCMalloc's `int MallocExtension_SetNumericProperty(const char*, size_t)`,
    // called with a NUL-terminated name.
    let f = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(*const std::ffi::c_char, usize) -> i32>(a) };
    Some(unsafe { f(name.as_ptr(), value) } != 0)
}

/// The allocator's statistics now.
pub fn stats() -> HeapStats {
    if let Some(f) = tcmalloc() {
        let in_use = tc_property(f, c"generic.current_allocated_bytes");
        let heap = tc_property(f, c"generic.heap_size");
        let unmapped = tc_property(f, c"tcmalloc.pageheap_unmapped_bytes");
        let footprint = heap.saturating_sub(unmapped);
        return HeapStats { allocator: Allocator::Tcmalloc, in_use, free: footprint.saturating_sub(in_use), footprint };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters and returns them by value.
        let m = unsafe { libc::mallinfo2() };
        let in_use = (m.uordblks + m.hblkhd) as u64;
        HeapStats { allocator: Allocator::Glibc, in_use, free: m.fordblks as u64, footprint: (m.arena + m.hblkhd) as u64 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        HeapStats::default()
    }
}

/// Returns the allocator's free memory to the system (TCMalloc's
/// `MallocExtension_ReleaseFreeMemory`, else glibc's `malloc_trim`), so that what is
/// resident afterwards is what is live: for measurements of a step's peak from RSS.
pub fn release_free_memory() {
    static F: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    if let Some(a) = tcmalloc_symbol(&F, c"MallocExtension_ReleaseFreeMemory") {
        // SAFETY: TCMalloc's `void MallocExtension_ReleaseFreeMemory(void)`.
        let f = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn()>(a) };
        unsafe { f() };
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// From now on, memory freed goes back to the system at once (TCMalloc's aggressive
/// decommit; glibc: a fixed 128 KB mmap threshold and no trim slack), so that a peak of
/// resident memory is a peak of live bytes: for measurements, never for training (a
/// step would fault its activations in again each time).
pub fn return_freed_memory_at_once() {
    if tc_set_property(c"tcmalloc.aggressive_memory_decommit", 1).is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc tuning calls.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 0);
    }
}

/// The bytes all threads' TCMalloc caches may hold together in a training process (its
/// default is 32 MiB). A rank's threads (intra-op, data loading, comm, the async runtime)
/// each fill a cache with the sizes it frees, and the caches grow toward the cap over
/// thousands of steps: in the 10k-step soak they were ~40 MB of a rank's anonymous memory,
/// growing ~1 MB per 1k steps in steps of a few MB, while the live heap stayed flat
/// (issue 50; with 4 MiB: 40 MB less and flat, and the step time did not move, see
/// BENCHMARKS.md).
pub const THREAD_CACHE_BYTES: usize = 4 << 20;

/// Caps TCMalloc's thread caches at `bytes` in all (see [`THREAD_CACHE_BYTES`]). Returns
/// whether TCMalloc took it (false under another allocator).
pub fn limit_thread_caches(bytes: usize) -> bool {
    tc_set_property(c"tcmalloc.max_total_thread_cache_bytes", bytes) == Some(true)
}

/// [`limit_thread_caches`] at [`THREAD_CACHE_BYTES`], unless the operator set TCMalloc's
/// own variable (`TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES`): the training binaries' `main`.
pub fn bound_thread_caches() {
    if std::env::var_os("TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES").is_none() {
        limit_thread_caches(THREAD_CACHE_BYTES);
    }
}

/// The thread caches' cap now (`None` where TCMalloc does not serve this process).
pub fn thread_cache_limit() -> Option<u64> {
    tcmalloc().map(|f| tc_property(f, c"tcmalloc.max_total_thread_cache_bytes"))
}

/// The glibc tunable the coordinator runs with: no per-thread cache of freed chunks.
/// glibc keeps up to 7 freed chunks of each small size in every thread's cache, counted as
/// in use; across the coordinator's threads (the runtime's, the blocking pool's that save
/// the state) those caches filled slowly with the sizes its requests and saves free, and
/// its heap grew by ~30 KB per 1k steps for 10k steps (issue 50), while its live heap was
/// flat (heaptrack). Without them, freed chunks go back to the arena at once.
pub const COORDINATOR_TUNABLE: &str = "glibc.malloc.tcache_count=0";

/// `GLIBC_TUNABLES` with `tunable` (`name=value`) added, or `None` if `current` already
/// sets that name (an operator's setting wins).
pub fn with_tunable(current: Option<&str>, tunable: &str) -> Option<String> {
    let name = tunable.split('=').next().unwrap_or(tunable);
    match current.filter(|c| !c.is_empty()) {
        Some(c) if c.split(':').any(|t| t.split('=').next() == Some(name)) => None,
        Some(c) => Some(format!("{c}:{tunable}")),
        None => Some(tunable.to_string()),
    }
}

/// Runs this program again, from its start and with the same arguments and process id,
/// with `tunable` in `GLIBC_TUNABLES`: glibc reads its tunables once, when a program
/// starts, so a program that wants one set for itself re-executes. Call first thing in
/// `main`. Returns (and the program goes on as it is) where the variable already sets the
/// tunable, or where the re-execution could not start (with why).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn reexec_with_tunable(tunable: &str) -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let value = with_tunable(current.as_deref(), tunable)?;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(argv0) = args.next() {
        cmd.arg0(argv0);
    }
    // `exec` returns only on failure.
    Some(cmd.args(args).env("GLIBC_TUNABLES", value).exec())
}

/// Sets `gauge{..labels, kind}` from [`stats`].
pub fn export(gauge: &prometheus::IntGaugeVec, labels: &[&str]) {
    let s = stats();
    for (kind, v) in [("in_use", s.in_use), ("free", s.free), ("footprint", s.footprint)] {
        let mut l: Vec<&str> = labels.to_vec();
        l.push(kind);
        gauge.with_label_values(&l).set(v as i64);
    }
}

pub const HEAP_HELP: &str = "The process's heap as its allocator sees it (kind: in_use = live allocations, free = bytes the allocator holds free and mapped, footprint = bytes obtained from the system and not returned; TCMalloc in the training processes, glibc malloc in the coordinator).";

#[cfg(test)]
mod tests {
    #[test]
    fn a_live_allocation_shows_in_use_and_goes_when_freed() {
        let before = super::stats();
        assert_ne!(before.allocator, super::Allocator::Unknown);
        let v: Vec<u8> = vec![1; 64 << 20];
        let during = super::stats();
        assert!(during.in_use >= before.in_use + (64 << 20), "{before:?} -> {during:?}");
        assert!(during.footprint >= during.in_use);
        drop(std::hint::black_box(v));
        assert!(super::stats().in_use < during.in_use - (32 << 20));
    }

    #[test]
    fn a_tunable_is_added_to_what_the_operator_set_and_never_overrides_it() {
        use super::with_tunable;
        let t = "glibc.malloc.tcache_count=0";
        assert_eq!(with_tunable(None, t).as_deref(), Some(t));
        assert_eq!(with_tunable(Some(""), t).as_deref(), Some(t));
        assert_eq!(with_tunable(Some("glibc.malloc.arena_max=2"), t).as_deref(), Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"));
        assert_eq!(with_tunable(Some("glibc.malloc.tcache_count=7"), t), None, "the operator's value stays");
        assert_eq!(with_tunable(Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=3"), t), None);
        assert_eq!(with_tunable(Some("glibc.malloc.tcache_count_x=1"), t).as_deref(), Some("glibc.malloc.tcache_count_x=1:glibc.malloc.tcache_count=0"));
    }
}
