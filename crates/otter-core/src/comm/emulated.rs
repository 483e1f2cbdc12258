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
//! And as c10d's `ProcessGroupNCCL` does, a collective that the abort interrupted then
//! *returns success*, with whatever partial data its buffers hold: once a communicator is
//! aborted, `WorkNCCL::isCompleted` stops checking for errors and the kernel exits, so
//! `wait()` returns normally (issue 43). Callers must not take that for a result: the
//! training side wraps every group of a generation so that any collective that ends after
//! the generation's abort is an error (`otter::comm::GenerationGroup`).
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

    /// `result` as NCCL through c10d reports it: a failure blocks until the communicator
    /// is aborted (or the timeout), and a collective the abort ended then reports success
    /// (its buffers hold whatever arrived before).
    fn as_nccl(&self, result: Result<(), CommError>) -> Result<(), CommError> {
        if result.is_ok() {
            return Ok(());
        }
        let until = Instant::now() + self.timeout;
        while !self.communicator.is_aborted() {
            if Instant::now() >= until {
                return Err(CommError::Timeout { rank: self.ring.rank(), what: "an NCCL-like collective", timeout: self.timeout, peer: None });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
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

    fn all_reduce_sum_i64(&mut self, buf: &mut [i64]) -> Result<(), CommError> {
        let r = self.ring.all_reduce_sum_i64(buf);
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
        let mut buf = [1.0f32; 1024];
        let r = g.all_reduce_mean(&mut [&mut buf[..]]);
        let returned = Instant::now();
        released.join().unwrap();
        let aborted_at = aborted_at.lock().unwrap().expect("aborted");
        assert!(returned >= aborted_at, "the collective returned before the abort: {r:?}");
        // As c10d's aborted work does: "done", with nothing reduced. Only the caller's check
        // of the generation's abort tells (otter::comm::GenerationGroup).
        assert!(r.is_ok(), "{r:?}");
        assert!(buf.iter().all(|&x| x == 1.0), "no peer's data arrived");
    }
}
