//! How many CPU threads a training process should run. Ranks that share a host split its
//! usable cores (torchrun sets `OMP_NUM_THREADS=1` for the same reason): two ranks that
//! each size libtorch's pool to every core run twice as many compute threads as there are
//! cores and spend their time contending.
//!
//! [`plan`] is a pure function of the usable cores, the ranks sharing them and the
//! configured overrides; [`usable_cores`] reads the first from the process (its CPU
//! affinity and its cgroup's quota, as `std::thread::available_parallelism` does).

use std::net::SocketAddr;

/// The threads a rank runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankThreads {
    /// libtorch's intra-op pool (`at::set_num_threads`).
    pub intra_op: usize,
    /// Threads preparing batches (decode, resize, tokenize) beside the training thread.
    pub data: usize,
    /// Where `intra_op` came from, for the log line.
    pub source: ThreadSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadSource {
    /// The host's usable cores divided among the ranks sharing it.
    Shared,
    /// `train.cpu_threads`.
    Config,
    /// `OMP_NUM_THREADS` in the environment (what torchrun and users set).
    Environment,
}

/// What the operator said, if anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `train.cpu_threads`.
    pub intra_op: Option<usize>,
    /// `OMP_NUM_THREADS`.
    pub omp_num_threads: Option<usize>,
    /// `data.workers`.
    pub data: Option<usize>,
}

/// Threads for one of `colocated` ranks sharing `usable` cores: each gets an equal share
/// (at least one) for its compute, and its data preparation gets the same share, since
/// the two alternate more than they overlap on a CPU rank (a GPU rank's host threads are
/// data preparation and launching kernels: the same split keeps eight ranks of a node
/// from each starting a thread per core).
pub fn plan(usable: usize, colocated: usize, o: Overrides) -> RankThreads {
    let share = (usable.max(1) / colocated.max(1)).max(1);
    let (intra_op, source) = match (o.intra_op, o.omp_num_threads) {
        (Some(n), _) => (n.max(1), ThreadSource::Config),
        (None, Some(n)) => (n.max(1), ThreadSource::Environment),
        (None, None) => (share, ThreadSource::Shared),
    };
    RankThreads { intra_op, data: o.data.unwrap_or(share).max(1), source }
}

/// Cores this process may use: its affinity mask, bounded by its cgroup's CPU quota.
pub fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `OMP_NUM_THREADS`, when set to a positive number.
pub fn omp_num_threads() -> Option<usize> {
    std::env::var("OMP_NUM_THREADS").ok()?.trim().parse().ok().filter(|&n| n > 0)
}

/// Ranks of a group whose collective address is on the same host as rank `me`'s.
pub fn colocated(addrs: &[SocketAddr], me: usize) -> usize {
    let Some(mine) = addrs.get(me) else { return 1 };
    addrs.iter().filter(|a| a.ip() == mine.ip()).count().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn co_located_ranks_split_the_usable_cores() {
        // (usable cores, ranks on the host) -> threads each
        for (usable, ranks, want) in [(2, 1, 2), (2, 2, 1), (2, 3, 1), (8, 1, 8), (8, 2, 4), (8, 3, 2), (16, 3, 5), (96, 8, 12), (1, 3, 1)] {
            let t = plan(usable, ranks, Overrides::default());
            assert_eq!((t.intra_op, t.data, t.source), (want, want, ThreadSource::Shared), "{usable} cores, {ranks} ranks");
            assert!(t.intra_op * ranks <= usable.max(ranks), "never more compute threads than cores (or one each)");
        }
    }

    #[test]
    fn the_config_then_the_environment_win_over_the_share() {
        let o = Overrides { intra_op: Some(3), omp_num_threads: Some(1), data: None };
        assert_eq!((plan(8, 2, o).intra_op, plan(8, 2, o).source), (3, ThreadSource::Config));
        let o = Overrides { intra_op: None, omp_num_threads: Some(1), data: Some(6) };
        let t = plan(8, 2, o);
        assert_eq!((t.intra_op, t.data, t.source), (1, 6, ThreadSource::Environment));
        assert_eq!(plan(8, 2, Overrides { intra_op: Some(0), ..Default::default() }).intra_op, 1);
    }

    #[test]
    fn ranks_on_the_same_host_are_counted_from_the_group_addresses() {
        let addrs: Vec<SocketAddr> = ["10.0.0.1:5000", "10.0.0.1:5001", "10.0.0.2:5000", "10.0.0.1:5002"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(colocated(&addrs, 0), 3);
        assert_eq!(colocated(&addrs, 2), 1);
        assert_eq!(colocated(&addrs, 9), 1, "not in the group: alone");
    }
}
