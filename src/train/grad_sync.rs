//! The data-parallel gradient sync point: only trainable parameters take part; their
//! gradients are flattened into buckets (default 25 MiB, DDP's default) in one order that
//! is identical on every rank (the order backward finishes them,
//! [`otter_core::model::spec::backward_order`], a function of the names alone, never
//! hash-map order), averaged over ranks by a [`TensorCollective`], and written back.
//!
//! Two ways to run it, with bit-identical results (same buckets, same collectives):
//! - after backward ([`GradBuckets::all_reduce_mean`]);
//! - overlapped with backward ([`GradBuckets::backward_and_sync`]), as PyTorch DDP's
//!   Reducer does: an autograd post-accumulate-grad hook on every trainable parameter marks
//!   its gradient final; a bucket whose gradients are all final is flattened and handed to
//!   a communication thread, strictly in bucket order (so every rank issues the same
//!   collectives in the same order), while backward goes on. What is left when backward
//!   returns (buckets holding a parameter this step never reached) follows in order.
//!
//! A gradient that is undefined this step (a parameter the local batch never reached, e.g.
//! the media layers on a text-only batch) is materialized as zeros first, so every rank
//! issues exactly the same collectives with the same sizes.

use crate::comm::{CommError, Collective};
use std::ffi::{c_char, c_void};
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

pub use crate::comm::TensorCollective;

/// Runs `f` on `t`'s f32 data as a host slice: in place for a contiguous f32 CPU tensor,
/// through a host copy otherwise.
fn with_host_slice(t: &mut Tensor, f: &mut dyn FnMut(&mut [f32]) -> Result<(), CommError>) -> Result<(), CommError> {
    let direct = t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous();
    let host = if direct { t.shallow_clone() } else { t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous() };
    let n = host.numel();
    if n == 0 {
        // An empty tensor's data pointer may be null, which no slice may hold: every rank
        // still takes part in the collective, with nothing.
        return f(&mut []);
    }
    // SAFETY: `host` is a contiguous f32 CPU tensor of `n > 0` elements (so its data
    // pointer is valid and aligned) that nothing else touches while `f` runs.
    let data = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut f32, n) };
    f(data)?;
    if !direct {
        t.copy_(&host);
    }
    Ok(())
}

impl<C: Collective + ?Sized> TensorCollective for C {
    fn rank(&self) -> usize {
        Collective::rank(self)
    }

    fn world(&self) -> usize {
        Collective::world(self)
    }

    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError> {
        for t in tensors {
            with_host_slice(t, &mut |s| self.all_reduce_mean(&mut [s]))?;
        }
        Ok(())
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        with_host_slice(t, &mut |s| self.broadcast(s, root))
    }

    fn reduce_scatter_sum_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let mut input = input.shallow_clone();
        with_host_slice(&mut input, &mut |i| with_host_slice(output, &mut |o| self.reduce_scatter_sum(i, o)))
    }

    fn all_gather_tensor(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CommError> {
        let mut input = input.shallow_clone();
        with_host_slice(&mut input, &mut |i| with_host_slice(output, &mut |o| self.all_gather(i, o)))
    }

    fn all_reduce_sum_i64_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError> {
        for t in tensors {
            let direct = t.device() == Device::Cpu && t.kind() == Kind::Int64 && t.is_contiguous();
            let host = if direct { t.shallow_clone() } else { t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous() };
            let n = host.numel();
            if n == 0 {
                self.all_reduce_sum_i64(&mut [])?;
                continue;
            }
            // SAFETY: `host` is a contiguous i64 CPU tensor of `n > 0` elements (a valid,
            // aligned data pointer) that nothing else touches meanwhile.
            let data = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut i64, n) };
            self.all_reduce_sum_i64(data)?;
            if !direct {
                t.copy_(&host);
            }
        }
        Ok(())
    }
}

/// The bucket layout of a model's trainable parameters (same on every rank).
#[derive(Debug, Clone)]
pub struct GradBuckets {
    /// Parameter names in sync order ([`backward_order`](otter_core::model::spec::backward_order)).
    names: Vec<String>,
    /// Each bucket: a range of `names`.
    buckets: Vec<std::ops::Range<usize>>,
}

/// What a step's gradient sync cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncTimes {
    /// Time the collectives ran (on the communication thread when overlapped).
    pub comm: Duration,
    /// Time the step waited for them after backward: all of `comm` when not overlapped,
    /// what backward did not hide when overlapped.
    pub exposed: Duration,
}

impl GradBuckets {
    /// Parameters are taken in backward order and packed greedily: a bucket is closed when
    /// the next parameter would take it past `bucket_bytes` (a larger parameter gets its
    /// own).
    pub fn new(trainable: &[(&str, &Tensor)], bucket_bytes: usize) -> Self {
        let mut named: Vec<(&str, i64)> = trainable.iter().map(|(n, t)| (*n, t.numel() as i64)).collect();
        named.sort_by_key(|(n, _)| otter_core::model::spec::backward_order(n));
        let mut buckets = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (i, (_, numel)) in named.iter().enumerate() {
            let b = *numel as usize * 4;
            if i > start && bytes + b > bucket_bytes {
                buckets.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += b;
        }
        if start < named.len() {
            buckets.push(start..named.len());
        }
        Self { names: named.into_iter().map(|(n, _)| n.to_string()).collect(), buckets }
    }

    /// Bytes one all-reduce moves per rank (every bucket, f32).
    pub fn bytes(&self, trainable: &[(&str, &Tensor)]) -> u64 {
        let want: std::collections::HashSet<&str> = self.names.iter().map(String::as_str).collect();
        trainable.iter().filter(|(n, _)| want.contains(n)).map(|(_, t)| t.numel() as u64 * 4).sum()
    }

    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Parameter names in sync order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Each bucket: a range of [`Self::names`].
    pub fn ranges(&self) -> &[std::ops::Range<usize>] {
        &self.buckets
    }

    /// The parameter names of each bucket, in sync order.
    pub fn layout(&self) -> Vec<Vec<&str>> {
        self.buckets.iter().map(|r| self.names[r.clone()].iter().map(String::as_str).collect()).collect()
    }

    /// `trainable` in sync order; an error unless it is exactly this layout's set.
    pub(crate) fn ordered<'t>(&self, trainable: &[(&str, &'t Tensor)]) -> Result<Vec<&'t Tensor>, CommError> {
        let by_name: std::collections::HashMap<&str, &Tensor> = trainable.iter().copied().collect();
        let params: Vec<&Tensor> = self
            .names
            .iter()
            .map(|n| by_name.get(n.as_str()).copied().ok_or_else(|| CommError::Invalid(format!("parameter {n} is not in this model"))))
            .collect::<Result<_, _>>()?;
        if params.len() != trainable.len() {
            return Err(CommError::Invalid(format!("{} trainable parameters, bucket layout has {}", trainable.len(), params.len())));
        }
        Ok(params)
    }

    /// Bucket `b`'s gradients as one flat f32 tensor (a copy).
    pub(crate) fn flatten(&self, params: &[&Tensor], b: usize) -> Tensor {
        let _guard = tch::no_grad_guard();
        let flat: Vec<Tensor> = params[self.buckets[b].clone()].iter().map(|p| p.grad().to_kind(Kind::Float).reshape([-1])).collect();
        Tensor::cat(&flat, 0)
    }

    /// Writes the reduced `flat` back into bucket `b`'s gradients.
    fn write_back(&self, params: &[&Tensor], b: usize, flat: &Tensor) {
        let _guard = tch::no_grad_guard();
        let mut offset = 0;
        for p in &params[self.buckets[b].clone()] {
            let mut g = p.grad();
            let n = g.numel() as i64;
            g.copy_(&flat.narrow(0, offset, n).view_as(&g));
            offset += n;
        }
    }

    /// Averages the gradients of `trainable` over the group, in place, after backward.
    pub fn all_reduce_mean(&self, trainable: &[(&str, &Tensor)], comm: &mut dyn TensorCollective) -> Result<(), CommError> {
        let params = self.ordered(trainable)?;
        materialize_grads(&params);
        if comm.world() == 1 {
            return Ok(());
        }
        for b in 0..self.buckets.len() {
            let mut bucket = [self.flatten(&params, b)];
            comm.all_reduce_mean_tensors(&mut bucket)?;
            self.write_back(&params, b, &bucket[0]);
        }
        Ok(())
    }

    /// Runs `backward` (the step's last) with the gradient sync overlapped: each bucket's
    /// all-reduce starts on a communication thread as soon as backward has finished all of
    /// its gradients, in bucket order. Returns once every gradient holds the mean over the
    /// group: the same bits as `backward` followed by [`Self::all_reduce_mean`].
    pub fn backward_and_sync(
        &self,
        trainable: &[(&str, &Tensor)],
        comm: &mut (dyn TensorCollective + Send),
        backward: &mut dyn FnMut(),
    ) -> Result<SyncTimes, CommError> {
        let params = self.ordered(trainable)?;
        if comm.world() == 1 {
            backward();
            materialize_grads(&params);
            return Ok(SyncTimes::default());
        }
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Tensor)>();
        let launcher = Mutex::new(Launcher::new(self, &params, tx));
        std::thread::scope(|s| {
            let reducer = std::thread::Builder::new()
                .name("grad-allreduce".into())
                .spawn_scoped(s, move || -> Result<(Vec<(usize, Tensor)>, Duration), CommError> {
                    let (mut reduced, mut busy) = (Vec::new(), Duration::ZERO);
                    for (b, t) in rx {
                        let t0 = Instant::now();
                        let mut one = [t];
                        comm.all_reduce_mean_tensors(&mut one)?;
                        busy += t0.elapsed();
                        let [t] = one;
                        reduced.push((b, t));
                    }
                    Ok((reduced, busy))
                })
                .map_err(|e| CommError::Invalid(format!("starting the all-reduce thread: {e}")))?;
            let hooks_failed = match Hooks::install(&params, &launcher) {
                Ok(hooks) => {
                    backward();
                    drop(hooks);
                    None
                }
                Err(e) => Some(e),
            };
            let backward_done = Instant::now();
            // Parameters this step never reached get zero gradients; then every bucket not
            // launched yet goes, in order; closing the queue ends the thread.
            materialize_grads(&params);
            {
                let mut l = launcher.lock().unwrap_or_else(|e| e.into_inner());
                if hooks_failed.is_none() {
                    l.launch_rest();
                }
                l.close();
            }
            let outcome = reducer.join().unwrap_or_else(|_| Err(CommError::Invalid("the all-reduce thread panicked".into())));
            if let Some(e) = hooks_failed {
                return Err(e);
            }
            let (reduced, busy) = outcome?;
            let exposed = backward_done.elapsed();
            for (b, flat) in &reduced {
                self.write_back(&params, *b, flat);
            }
            Ok(SyncTimes { comm: busy, exposed })
        })
    }
}

/// The overlap's bookkeeping, shared by the hooks (on the thread that runs backward):
/// which gradients are final, and the next bucket to launch.
struct Launcher<'p> {
    buckets: &'p GradBuckets,
    params: &'p [&'p Tensor],
    bucket_of: Vec<usize>,
    final_: Vec<bool>,
    /// Gradients each bucket still waits for.
    waiting: Vec<usize>,
    next: usize,
    queue: Option<Sender<(usize, Tensor)>>,
}

impl<'p> Launcher<'p> {
    fn new(buckets: &'p GradBuckets, params: &'p [&'p Tensor], queue: Sender<(usize, Tensor)>) -> Self {
        let mut bucket_of = vec![0; params.len()];
        for (b, r) in buckets.buckets.iter().enumerate() {
            bucket_of[r.clone()].fill(b);
        }
        let waiting = buckets.buckets.iter().map(|r| r.len()).collect();
        Self { buckets, params, bucket_of, final_: vec![false; params.len()], waiting, next: 0, queue: Some(queue) }
    }

    /// Parameter `i`'s gradient is final for this backward.
    fn ready(&mut self, i: usize) {
        if i >= self.final_.len() || std::mem::replace(&mut self.final_[i], true) {
            return;
        }
        self.waiting[self.bucket_of[i]] -= 1;
        self.launch_ready();
    }

    /// Launches, in order, every bucket from `next` on whose gradients are all final.
    fn launch_ready(&mut self) {
        while self.next < self.waiting.len() && self.waiting[self.next] == 0 {
            let flat = self.buckets.flatten(self.params, self.next);
            if let Some(q) = &self.queue {
                // A closed queue means the thread has failed: its error is reported.
                let _ = q.send((self.next, flat));
            }
            self.next += 1;
        }
    }

    /// Backward is over: every gradient is final (undefined ones were materialized).
    fn launch_rest(&mut self) {
        self.waiting.fill(0);
        self.launch_ready();
    }

    fn close(&mut self) {
        self.queue = None;
    }
}

extern "C" {
    fn otter_set_post_acc_grad_hook(
        t: *mut c_void,
        cb: extern "C" fn(*mut c_void, usize),
        ctx: *mut c_void,
        index: usize,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn otter_clear_post_acc_grad_hook(t: *mut c_void);
}

/// The hook's entry: parameter `index`'s gradient is final.
extern "C" fn on_grad_final(ctx: *mut c_void, index: usize) {
    // SAFETY: `ctx` is the `&Mutex<Launcher>` given to `Hooks::install`, which removes
    // every hook before that borrow ends (its Drop), so the launcher outlives every call.
    let launcher = unsafe { &*(ctx as *const Mutex<Launcher<'_>>) };
    // A panic must not unwind into libtorch's C++; a bucket it left unlaunched goes after
    // backward.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        launcher.lock().unwrap_or_else(|e| e.into_inner()).ready(index);
    }));
}

/// Post-accumulate-grad hooks on a step's parameters, removed on drop.
struct Hooks<'a> {
    params: &'a [&'a Tensor],
}

impl<'a> Hooks<'a> {
    fn install(params: &'a [&'a Tensor], launcher: &'a Mutex<Launcher<'_>>) -> Result<Self, CommError> {
        // Drops (removes the hooks set so far) on an early return.
        let mut installed = Self { params: &params[..0] };
        for (i, p) in params.iter().enumerate() {
            let mut err = vec![0u8; 512];
            // SAFETY: `p` is a live tensor handle (`at::Tensor*`); `launcher` outlives the
            // hook (removed in `Drop` of the returned value, which borrows it); the shim
            // catches every C++ exception.
            let rc = unsafe {
                otter_set_post_acc_grad_hook(
                    p.as_ptr() as *mut c_void,
                    on_grad_final,
                    launcher as *const _ as *mut c_void,
                    i,
                    err.as_mut_ptr() as *mut c_char,
                    err.len(),
                )
            };
            if rc != 0 {
                let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
                return Err(CommError::Invalid(format!("gradient hook on parameter {i}: {}", String::from_utf8_lossy(&err[..end]))));
            }
            installed.params = &params[..=i];
        }
        Ok(installed)
    }
}

impl Drop for Hooks<'_> {
    fn drop(&mut self) {
        for p in self.params {
            // SAFETY: live tensor handle; removing a hook is always allowed.
            unsafe { otter_clear_post_acc_grad_hook(p.as_ptr() as *mut c_void) }
        }
    }
}

/// Gives every parameter without a gradient a zero one: backward of `sum(p) * 0` through
/// just those parameters (tch cannot assign `.grad` directly).
pub fn materialize_grads(params: &[&Tensor]) {
    let missing: Vec<&&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
    if missing.is_empty() {
        return;
    }
    let z = missing.iter().map(|p| p.sum(Kind::Float) * 0.0).reduce(|a, b| a + b).expect("non-empty");
    z.backward();
}
