//! Exact, order-free sums of f32 tensors: the deterministic reduction (issue 46).
//!
//! A float sum depends on its order: `(a + b) + c` and `a + (b + c)` may differ in the last
//! bit, and a data-parallel step sums its micro-batches' gradients in an order that depends
//! on how they are spread over ranks, the buckets and the ring's schedule. Training then
//! amplifies the difference. Integers add in any order to the same result, so each value is
//! turned into an integer on a fixed grid of 2^-64 ([`GRID_BITS`]), split into two i64
//! limbs of 52 bits (the high limb signed, the low one in `[0, 2^52)`), and the limbs are
//! summed as integers, locally and across ranks (`all_reduce_sum_i64`). Only the final
//! conversion back to f32 rounds, once, from a value that no longer depends on any order.
//!
//! Exactness: an f32 of magnitude at least 2^-41 lies on the 2^-64 grid (its last mantissa
//! bit is worth at least 2^-64), so every such value is summed exactly; smaller ones are
//! rounded to the grid (deterministically: the rounding depends on the value alone).
//! Range: values below [`MAX_ABS`] (2^39) and at most [`MAX_TERMS`] of them per element keep
//! both limbs' sums inside i64. A value outside (or not finite) is counted instead, and a
//! sum that counted any is all NaN, as a float sum with it would be.
//!
//! Chosen over a fixed reduction tree over micro-batch indices (every rank would keep one
//! gradient copy per micro-batch level, and the order would be the ring's no more) and over
//! binned (ReproBLAS-style) summation (several bins per element, a more complex kernel):
//! limbs cost two i64 per element, two extra passes per micro-batch, and work with any
//! collective that sums i64 (the ring; NCCL's ncclInt64). See ARCHITECTURE.md.

use tch::{Device, Kind, Tensor};

/// Values are summed as integers in units of 2^-GRID_BITS.
pub const GRID_BITS: i32 = 64;
/// The low limb's width: `q = hi * 2^LIMB_BITS + lo`, `0 <= lo < 2^LIMB_BITS`.
const LIMB_BITS: i32 = 52;
/// Values of this magnitude or more are out of range (|hi| < 2^51 per value).
pub const MAX_ABS: f64 = (1u64 << 39) as f64;
/// Most values summed per element (over all ranks): the limbs' sums stay below 2^63.
pub const MAX_TERMS: u64 = 1 << 11;

/// `v` on the 2^-64 grid, as an integer (rounded half to even, as libtorch's `round`);
/// `None` when out of range or not finite. Exact integer work on the f32's bits: a normal
/// f32 is m * 2^(e - 150) with a 24-bit m, a subnormal one m * 2^-149.
fn grid_integer(v: f32) -> Option<i128> {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = (bits & 0x7f_ffff) as i128;
    let (m, e2) = match exp {
        0xff => return None,
        0 => (frac, -149),
        _ => (frac | 0x80_0000, exp - 150),
    };
    // |v| < 2^39 (`MAX_ABS`): the largest exponent with m < 2^24 is e2 = 39 - 24 = 15.
    if e2 > 15 {
        return None;
    }
    let shift = e2 + GRID_BITS;
    let q = if shift >= 0 {
        m << shift
    } else {
        let s = -shift;
        if s > 25 {
            0 // below half a grid unit (m < 2^24)
        } else {
            let half = 1i128 << (s - 1);
            let (quot, rem) = (m >> s, m & ((1i128 << s) - 1));
            quot + i128::from(rem > half || (rem == half && quot & 1 == 1))
        }
    };
    Some(if bits >> 31 == 1 { -q } else { q })
}

/// A running exact sum of equally long f32 vectors, laid out for one collective: the
/// high limbs, the low limbs, and a count of out-of-range values (`2n + 1` i64).
pub struct ExactSum {
    n: i64,
    limbs: Tensor,
}

impl ExactSum {
    /// An empty sum of vectors of `n` elements, on `device`.
    pub fn zeros(n: i64, device: Device) -> Self {
        Self { n, limbs: Tensor::zeros([2 * n + 1], (Kind::Int64, device)) }
    }

    /// Adds `x` (f32 or any float kind, `n` elements, any shape).
    pub fn add(&mut self, x: &Tensor) {
        let n = self.n;
        assert_eq!(x.numel() as i64, n, "an exact sum of vectors of {n} elements");
        if self.limbs.device() == Device::Cpu && x.device() == Device::Cpu && x.kind() == Kind::Float {
            return self.add_cpu(&x.reshape([-1]).contiguous());
        }
        self.add_tensor_ops(x);
    }

    /// [`ExactSum::add`] in one pass of integer arithmetic on the f32 bits (CPU): the same
    /// limbs as the tensor-op path, several times faster.
    fn add_cpu(&mut self, x: &Tensor) {
        let n = self.n as usize;
        if n == 0 {
            return;
        }
        // SAFETY: `x` is a contiguous f32 CPU tensor of n > 0 elements and `limbs` a
        // contiguous i64 CPU tensor of 2n + 1 (made by `zeros`), neither touched elsewhere
        // while this runs.
        let (x, limbs) = unsafe {
            (std::slice::from_raw_parts(x.data_ptr() as *const f32, n), std::slice::from_raw_parts_mut(self.limbs.data_ptr() as *mut i64, 2 * n + 1))
        };
        let (hi, rest) = limbs.split_at_mut(n);
        let (lo, bad) = rest.split_at_mut(n);
        let mut out_of_range = 0i64;
        for ((v, h), l) in x.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
            match grid_integer(*v) {
                Some(q) => {
                    *h += (q >> LIMB_BITS) as i64;
                    *l += (q & ((1i128 << LIMB_BITS) - 1)) as i64;
                }
                None => out_of_range += 1,
            }
        }
        bad[0] += out_of_range;
    }

    /// [`ExactSum::add`] through libtorch's f64 ops (any device).
    fn add_tensor_ops(&mut self, x: &Tensor) {
        let n = self.n;
        let x = x.reshape([-1]).to_kind(Kind::Double);
        // NaN compares false: it counts as out of range.
        let ok = x.abs().lt(MAX_ABS);
        let bad = ok.logical_not().sum(Kind::Int64);
        let x = x.where_self(&ok, &x.zeros_like());
        // Integer-valued doubles all the way: scaling by powers of two, round and floor are
        // exact, and `q - hi * 2^52` is exact because the result is representable.
        let q = (x * 2f64.powi(GRID_BITS)).round();
        let hi = (&q * 2f64.powi(-LIMB_BITS)).floor();
        let lo = &q - &hi * 2f64.powi(LIMB_BITS);
        let _ = self.limbs.narrow(0, 0, n).g_add_(&hi.to_kind(Kind::Int64));
        let _ = self.limbs.narrow(0, n, n).g_add_(&lo.to_kind(Kind::Int64));
        let _ = self.limbs.narrow(0, 2 * n, 1).g_add_(&bad.reshape([1]));
    }

    /// The limbs, for a collective that sums i64 in place (`all_reduce_sum_i64_tensors`).
    pub fn limbs_mut(&mut self) -> &mut Tensor {
        &mut self.limbs
    }

    /// Values out of range or not finite, counted so far.
    pub fn out_of_range(&self) -> i64 {
        self.limbs.int64_value(&[2 * self.n])
    }

    /// The sum divided by `divisor`, as f32: rounded once from the exact sum (then to f32);
    /// all NaN if any value was out of range.
    pub fn finish(&self, divisor: f64) -> Tensor {
        let n = self.n;
        if self.limbs.device() == Device::Cpu && n > 0 {
            let nu = n as usize;
            // SAFETY: `limbs` is a contiguous i64 CPU tensor of 2n + 1 elements (made by
            // `zeros`, summed in place), only read here.
            let limbs = unsafe { std::slice::from_raw_parts(self.limbs.data_ptr() as *const i64, 2 * nu + 1) };
            if limbs[2 * nu] > 0 {
                return Tensor::full([n], f64::NAN, (Kind::Float, Device::Cpu));
            }
            let (hi, lo) = limbs[..2 * nu].split_at(nu);
            let mean: Vec<f32> = hi
                .iter()
                .zip(lo)
                .map(|(&h, &l)| {
                    let carry = l >> LIMB_BITS;
                    let (h, l) = (h + carry, l - (carry << LIMB_BITS));
                    let sum = h as f64 * 2f64.powi(LIMB_BITS) + l as f64;
                    (sum * 2f64.powi(-GRID_BITS) / divisor) as f32
                })
                .collect();
            return Tensor::from_slice(&mean);
        }
        self.finish_tensor_ops(divisor)
    }

    /// [`ExactSum::finish`] through libtorch's ops (any device).
    fn finish_tensor_ops(&self, divisor: f64) -> Tensor {
        let n = self.n;
        let hi = self.limbs.narrow(0, 0, n);
        let lo = self.limbs.narrow(0, n, n);
        // Carry the low limbs' overflow past 2^52 into the high ones (integers, exact).
        let carry = lo.bitwise_right_shift_tensor_scalar(LIMB_BITS as i64);
        let hi = &hi + &carry;
        let lo = &lo - carry * (1i64 << LIMB_BITS);
        let sum = hi.to_kind(Kind::Double) * 2f64.powi(LIMB_BITS) + lo.to_kind(Kind::Double);
        let mean = (sum * 2f64.powi(-GRID_BITS) / divisor).to_kind(Kind::Float);
        if self.out_of_range() > 0 {
            mean.full_like(f64::NAN)
        } else {
            mean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(t).unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Random f32 vectors spanning many binades (1e-9 to 1e3, both signs): summed in any
    /// order and any grouping (as ranks and micro-batches would split them), the result
    /// has the same bits; and it is the correctly rounded mean of the exact sum.
    #[test]
    fn the_sum_does_not_depend_on_order_or_grouping_and_is_the_exact_sum_rounded_once() {
        tch::manual_seed(3);
        let n = 10_000;
        let terms: Vec<Tensor> = (0..12).map(|_| Tensor::randn([n], (Kind::Float, Device::Cpu)) * (Tensor::rand([n], (Kind::Float, Device::Cpu)) * 27.0 - 20.0).exp()).collect();
        let sum_in = |order: &[usize], groups: usize| -> Tensor {
            // `groups` partial sums (ranks), then their limbs added (the collective).
            let mut parts: Vec<ExactSum> = (0..groups).map(|_| ExactSum::zeros(n, Device::Cpu)).collect();
            for (k, &i) in order.iter().enumerate() {
                parts[k % groups].add(&terms[i]);
            }
            let mut total = ExactSum::zeros(n, Device::Cpu);
            for p in &parts {
                let _ = total.limbs.g_add_(&p.limbs);
            }
            total.finish(order.len() as f64)
        };
        let forward: Vec<usize> = (0..12).collect();
        let backward: Vec<usize> = (0..12).rev().collect();
        let shuffled = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6];
        let want = sum_in(&forward, 1);
        for (order, groups) in [(&backward[..], 1), (&shuffled[..], 2), (&forward[..], 3), (&backward[..], 5)] {
            assert_eq!(bits(&sum_in(order, groups)), bits(&want), "order {order:?} in {groups} groups");
        }
        // The float sums in those orders do differ: the problem this solves.
        let float = |order: &[usize]| order.iter().fold(Tensor::zeros([n], (Kind::Float, Device::Cpu)), |a, &i| a + &terms[i]) / 12.0;
        assert_ne!(bits(&float(&forward)), bits(&float(&shuffled)), "float sums in two orders (the control)");
        // Against f64 (whose own rounding is far below f32's): within half an f32 ulp of the
        // result (6e-8 relative), plus the f64 sum's own error (12 roundings of terms up to
        // max|term|, and the grid's 2^-65 per term).
        let exact64 = forward.iter().fold(Tensor::zeros([n], (Kind::Double, Device::Cpu)), |a, &i| a + terms[i].to_kind(Kind::Double)) / 12.0;
        let largest = terms.iter().map(|t| t.abs().max().double_value(&[])).fold(0.0, f64::max);
        let err = (want.to_kind(Kind::Double) - &exact64).abs() - exact64.abs() * 6.0e-8;
        assert!(err.max().double_value(&[]) <= 12.0 * largest * 2f64.powi(-52), "error beyond half an ulp: {}", err.max().double_value(&[]));
    }

    /// The CPU fast path (integer work on the f32 bits) and the tensor-op path (what a
    /// CUDA rank runs) give the same limbs and the same result, for values from subnormal
    /// to 2^38, both signs, ties on the grid included.
    #[test]
    fn the_cpu_path_and_the_tensor_op_path_agree_bit_for_bit() {
        tch::manual_seed(5);
        let n = 50_000;
        let mut v: Vec<f32> = Vec::<f32>::try_from(Tensor::randn([n], (Kind::Float, Device::Cpu)) * (Tensor::rand([n], (Kind::Float, Device::Cpu)) * 130.0 - 100.0).exp2()).unwrap();
        v.extend([f32::from_bits(1), -f32::from_bits(3), 1.5 * 2f32.powi(-64), 2.5 * 2f32.powi(-64), -0.5 * 2f32.powi(-64), 0.0, -0.0, 2f32.powi(38), -3.0e11]);
        let x = Tensor::from_slice(&v);
        let (mut fast, mut ops) = (ExactSum::zeros(v.len() as i64, Device::Cpu), ExactSum::zeros(v.len() as i64, Device::Cpu));
        for _ in 0..3 {
            fast.add(&x);
            ops.add_tensor_ops(&x);
        }
        assert!(fast.limbs.equal(&ops.limbs), "the limbs differ");
        assert_eq!(bits(&fast.finish(3.0)), bits(&ops.finish_tensor_ops(3.0)));
    }

    #[test]
    fn a_value_out_of_range_or_not_finite_makes_the_sum_nan() {
        for bad in [f32::NAN, f32::INFINITY, 1e12] {
            let mut s = ExactSum::zeros(3, Device::Cpu);
            s.add(&Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
            s.add(&Tensor::from_slice(&[1.0f32, bad, 3.0]));
            assert_eq!(s.out_of_range(), 1, "{bad}");
            assert!(Vec::<f32>::try_from(s.finish(2.0)).unwrap().iter().all(|x| x.is_nan()), "{bad}");
        }
        let mut s = ExactSum::zeros(2, Device::Cpu);
        s.add(&Tensor::from_slice(&[-3.5f32, 1e-3]));
        s.add(&Tensor::from_slice(&[1.25f32, -2e-3]));
        assert_eq!(Vec::<f32>::try_from(s.finish(1.0)).unwrap(), vec![-2.25f32, (1e-3f32 as f64 - 2e-3f32 as f64) as f32]);
    }
}
