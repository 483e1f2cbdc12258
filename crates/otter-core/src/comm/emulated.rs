//! A test double that fails the way NCCL does, for testing on CPUs the release path an
//! NCCL group depends on.
//!
//! NCCL does not fail a collective when a peer dies: it blocks (until its own timeout, by
//! default minutes). A rank is released only when something aborts the communicator from
//! another thread. [`NcclLike`] runs its collectives over a ring formed with an abort of
//! its own that nothing but the generation's [`Abort`] hook fires; when the ring fails (a
//! peer died), the collective does not return the error but blocks until that hook has
//! run, or the group's timeout. So a rank blocked on a dead or hung peer gets out exactly
//! as an NCCL rank does: through [`Abort::on_abort`], not through its sockets.
//!
//! Selected only by the rank binary's `OTTER_TEST_EMULATE_NCCL=1` (tests).

use super::ring::{RingGroup, RingTimeouts};
use super::{Abort, CommError, Collective};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub struct NcclLike {
    ring: RingGroup,
    /// Fired only by the generation's abort (the hook), as `ProcessGroupNCCL::abort()` is.
    communicator: Abort,
    timeout: Duration,
}

impl NcclLike {
    /// Forms the group like [`RingGroup::form`]; `generation` releases it.
    pub fn form(rank: usize, addrs: &[SocketAddr], listener: &TcpListener, timeouts: RingTimeouts, tag: u64, secret: &[u8], generation: &Abort) -> Result<Self, CommError> {
        let communicator = Abort::new();
        let ring = RingGroup::form(rank, addrs, listener, timeouts, tag, secret, communicator.clone())?;
        let c = communicator.clone();
        generation.on_abort(Box::new(move || c.abort("the communicator was aborted")));
        Ok(Self { ring, communicator, timeout: timeouts.op })
    }

    /// `result`, except that a failure other than the abort blocks until the abort (or
    /// the timeout), as an NCCL collective with a dead peer does.
    fn as_nccl<T>(&self, result: Result<T, CommError>) -> Result<T, CommError> {
        let e = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let until = Instant::now() + self.timeout;
        while !self.communicator.is_aborted() {
            if Instant::now() >= until {
                return Err(CommError::Timeout { rank: self.ring.rank(), what: "an NCCL-like collective", timeout: self.timeout, peer: None });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let reason = self.communicator.reason().unwrap_or_default();
        Err(CommError::Aborted { rank: self.ring.rank(), reason: format!("{reason} (blocked on: {e})") })
    }
}

impl Collective for NcclLike {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world(&self) -> usize {
        self.ring.world()
    }

    fn all_reduce_mean(&mut self, buffers: &mut [&mut [f32]]) -> Result<(), CommError> {
        let r = self.ring.all_reduce_mean(buffers);
        self.as_nccl(r)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let r = self.ring.broadcast(buf, root);
        self.as_nccl(r)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let r = self.ring.barrier();
        self.as_nccl(r)
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let r = self.ring.reduce_scatter_sum(input, output);
        self.as_nccl(r)
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let r = self.ring.all_gather(input, output);
        self.as_nccl(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_peer_blocks_the_collective_until_the_generation_is_aborted() {
        let ls: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let t = RingTimeouts::uniform(Duration::from_secs(30));
        let generation = Abort::new();
        let peer = {
            let (addrs, l) = (addrs.clone(), ls[1].try_clone().unwrap());
            std::thread::spawn(move || RingGroup::form(1, &addrs, &l, t, 7, b"job", Abort::new()).unwrap())
        };
        let mut g = NcclLike::form(0, &addrs, &ls[0], t, 7, b"job", &generation).unwrap();
        drop(peer.join().unwrap()); // the peer dies: its sockets close
        let aborted_at = std::sync::Arc::new(std::sync::Mutex::new(None));
        let released = {
            let (generation, at) = (generation.clone(), aborted_at.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                *at.lock().unwrap() = Some(Instant::now());
                generation.abort("the coordinator formed generation 8");
            })
        };
        let e = g.all_reduce_mean(&mut [&mut [1.0f32; 1024][..]]).expect_err("no peer");
        let returned = Instant::now();
        released.join().unwrap();
        let aborted_at = aborted_at.lock().unwrap().expect("aborted");
        assert!(returned >= aborted_at, "the collective returned before the abort: {e}");
        assert!(matches!(&e, CommError::Aborted { reason, .. } if reason.contains("the communicator was aborted")), "{e}");
    }
}
