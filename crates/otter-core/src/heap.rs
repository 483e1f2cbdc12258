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
    static F: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    if let Some(a) = tcmalloc_symbol(&F, c"MallocExtension_SetNumericProperty") {
        // SAFETY: TCMalloc's `int MallocExtension_SetNumericProperty(const char*, size_t)`.
        let f = unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(*const std::ffi::c_char, usize) -> i32>(a) };
        unsafe { f(c"tcmalloc.aggressive_memory_decommit".as_ptr(), 1) };
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc tuning calls.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 0);
    }
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
}
