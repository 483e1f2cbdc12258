//! The process's heap as the allocator (glibc malloc) sees it: what is live, what it holds
//! free, what it mapped. RSS alone cannot tell a leak (live bytes grow) from fragmentation
//! (free bytes held by the allocator grow); these numbers can (issue 50). Served as
//! `otter_process_heap_bytes{kind}` by every binary's metrics.

/// One reading of glibc's `mallinfo2`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes in live allocations (`uordblks` + `hblkhd`: arenas and large mmapped blocks).
    pub in_use: u64,
    /// Bytes free inside the arenas, held by the allocator (`fordblks`).
    pub free: u64,
    /// Bytes of large blocks served by mmap (`hblkhd`, part of `in_use`).
    pub mmapped: u64,
    /// Bytes of the arenas obtained from the system (`arena`).
    pub arena: u64,
}

/// The allocator's statistics now (zeros where glibc's `mallinfo2` is not available).
pub fn stats() -> HeapStats {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters and returns them by value.
        let m = unsafe { libc::mallinfo2() };
        HeapStats { in_use: (m.uordblks + m.hblkhd) as u64, free: m.fordblks as u64, mmapped: m.hblkhd as u64, arena: m.arena as u64 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        HeapStats::default()
    }
}

/// Sets `gauge{kind=...}` (with `labels` before the kind) from [`stats`].
pub fn export(gauge: &prometheus::IntGaugeVec, labels: &[&str]) {
    let s = stats();
    for (kind, v) in [("in_use", s.in_use), ("free", s.free), ("mmapped", s.mmapped), ("arena", s.arena)] {
        let mut l: Vec<&str> = labels.to_vec();
        l.push(kind);
        gauge.with_label_values(&l).set(v as i64);
    }
}

pub const HEAP_HELP: &str = "The process's heap as glibc malloc sees it (kind: in_use = live allocations, free = free bytes the allocator holds in its arenas, mmapped = large blocks served by mmap, arena = arena bytes obtained from the system).";

#[cfg(test)]
mod tests {
    #[test]
    fn a_live_allocation_shows_in_use_and_goes_when_freed() {
        let before = super::stats().in_use;
        let v: Vec<u8> = vec![1; 64 << 20];
        let during = super::stats().in_use;
        assert!(during >= before + (64 << 20), "{before} -> {during}");
        drop(std::hint::black_box(v));
        assert!(super::stats().in_use < during - (32 << 20));
    }
}
