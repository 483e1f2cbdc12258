//! The data-parallel gradient sync point: only trainable parameters take part; their
//! gradients are flattened into buckets (default 25 MiB, DDP's default) in one order that
//! is identical on every rank (sorted by parameter name, never hash-map order), averaged
//! over ranks by a [`TensorCollective`], and written back.
//!
//! A gradient that is undefined this step (a parameter the local batch never reached, e.g.
//! the media layers on a text-only batch) is materialized as zeros first, so every rank
//! issues exactly the same collectives with the same sizes.

use crate::comm::{CommError, Collective};
use tch::{Device, Kind, Tensor};

pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Collectives on tensors, the training side's view: the CPU ring through host buffers
/// (any [`Collective`]), NCCL directly on device tensors (`comm::nccl`).
pub trait TensorCollective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// In place: each tensor (f32, contiguous) becomes the element-wise mean over ranks.
    fn all_reduce_mean_tensors(&mut self, tensors: &mut [Tensor]) -> Result<(), CommError>;
    /// In place: `t` becomes `root`'s.
    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError>;
}

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
}

/// The bucket layout of a model's trainable parameters (same on every rank).
#[derive(Debug, Clone)]
pub struct GradBuckets {
    /// Parameter names in sync order (sorted).
    names: Vec<String>,
    /// Each bucket: a range of `names`.
    buckets: Vec<std::ops::Range<usize>>,
}

impl GradBuckets {
    /// Parameters are taken in name order and packed greedily: a bucket is closed when the
    /// next parameter would take it past `bucket_bytes` (a larger parameter gets its own).
    pub fn new(trainable: &[(&str, &Tensor)], bucket_bytes: usize) -> Self {
        let mut named: Vec<(&str, i64)> = trainable.iter().map(|(n, t)| (*n, t.numel() as i64)).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
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

    /// Averages the gradients of `trainable` over the group, in place.
    pub fn all_reduce_mean(&self, trainable: &[(&str, &Tensor)], comm: &mut dyn TensorCollective) -> Result<(), CommError> {
        let by_name: std::collections::HashMap<&str, &Tensor> = trainable.iter().copied().collect();
        let params: Vec<&Tensor> = self
            .names
            .iter()
            .map(|n| by_name.get(n.as_str()).copied().ok_or_else(|| CommError::Invalid(format!("parameter {n} is not in this model"))))
            .collect::<Result<_, _>>()?;
        if params.len() != trainable.len() {
            return Err(CommError::Invalid(format!("{} trainable parameters, bucket layout has {}", trainable.len(), params.len())));
        }
        materialize_grads(&params);
        if comm.world() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for range in &self.buckets {
            let grads: Vec<Tensor> = params[range.clone()].iter().map(|p| p.grad()).collect();
            let flat: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).reshape([-1])).collect();
            let mut bucket = [Tensor::cat(&flat, 0)];
            comm.all_reduce_mean_tensors(&mut bucket)?;
            let mut offset = 0;
            for g in &grads {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.copy_(&bucket[0].narrow(0, offset, n).view_as(&g));
                offset += n;
            }
        }
        Ok(())
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
