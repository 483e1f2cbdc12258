//! Small building blocks shared by the model files: bias-optional linear layers, layer
//! norms, the `feed_forward` stack used by the perceiver and cross-attention, and the
//! KV cache of both language-model backbones.

use super::weights::Vb;
use tch::{Kind, Tensor};

/// `nn.Linear` with upstream's parameter names (`weight`, optional `bias`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: &Vb) -> Self {
        let bias = vb.contains("bias").then(|| vb.get("bias"));
        Self { weight: vb.get("weight"), bias }
    }

    pub fn no_bias(vb: &Vb) -> Self {
        Self { weight: vb.get("weight"), bias: None }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `x W^T + b`. On the CPU in f32, GEMMs of at least [`ONEDNN_MIN_MACS`] multiply-adds
/// run on oneDNN (src/model/onednn_linear.cpp: its AVX-512 kernels against MKL's AVX2 path
/// on AMD CPUs), with the same autograd semantics; everything else, and any run with
/// `OTTER_CPU_GEMM=mkl`, is libtorch's `linear`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let cpu_f32 = x.device() == tch::Device::Cpu && x.kind() == Kind::Float && w.kind() == Kind::Float && w.dim() == 2;
    if cpu_f32 && onednn() {
        let (k, n) = (x.size().last().copied().unwrap_or(0), w.size()[0]);
        let m = if k > 0 { x.numel() as i64 / k } else { 0 };
        if m * n * k >= ONEDNN_MIN_MACS {
            return onednn_linear(x, w, b);
        }
    }
    x.linear(w, b)
}

/// Bounds oneDNN's caches of compiled kernels. They are keyed by shape, and a training
/// step's GEMM shapes follow its token count, which varies from batch to batch: with the
/// default capacities (1024 primitives in oneDNN, 1024 in ideep's) a process keeps adding
/// compiled kernels for its first thousands of steps. Call before any thread starts (it
/// sets environment variables the libraries read once, at their first use); an operator's
/// own settings win.
pub fn bound_kernel_caches() {
    for (var, value) in [("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256"), ("LRU_CACHE_CAPACITY", "256")] {
        if std::env::var_os(var).is_none() {
            // SAFETY (set_var): called from `main` before any other thread exists.
            std::env::set_var(var, value);
        }
    }
}

/// Below this many multiply-adds a GEMM stays on libtorch's path: oneDNN's per-call set-up
/// outweighs its faster kernel (the tiny model's layers).
pub const ONEDNN_MIN_MACS: i64 = 1 << 21;

/// Whether CPU linear layers go through oneDNN: libtorch was built with it, its matmul
/// runs on this CPU (libtorch refuses it without AVX-512 BW/VL/DQ or AVX-NE-CONVERT; then
/// MKL's kernels are the fast ones anyway), and `OTTER_CPU_GEMM` is not `mkl` (the switch
/// the training benchmark flips to report both).
fn onednn() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        // SAFETY: a query without arguments.
        let built = unsafe { otter_onednn_available() } == 1;
        built && std::env::var("OTTER_CPU_GEMM").map_or(true, |v| v != "mkl") && onednn_runs_here()
    })
}

/// Tries one tiny oneDNN matmul.
fn onednn_runs_here() -> bool {
    let opts = (Kind::Float, tch::Device::Cpu);
    let (x, w) = (Tensor::ones([1, 2], opts), Tensor::ones([1, 2], opts));
    match try_onednn_linear(&x, &w, None) {
        Ok(_) => true,
        Err(why) => {
            tracing::info!("oneDNN matmul is not usable on this CPU ({}); linear layers use libtorch's", why.lines().next().unwrap_or(""));
            false
        }
    }
}

extern "C" {
    fn otter_onednn_available() -> std::ffi::c_int;
    fn otter_onednn_linear(
        x: *const torch_sys::C_tensor,
        w: *const torch_sys::C_tensor,
        b: *const torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> *mut torch_sys::C_tensor;
}

fn onednn_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    // Shapes were checked by the caller's model and the kernel by `onednn()`: a failure
    // here is a bug, as a failing `linear` would be.
    try_onednn_linear(x, w, b).unwrap_or_else(|why| panic!("oneDNN linear {:?} x {:?}: {why}", x.size(), w.size()))
}

fn try_onednn_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor, String> {
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: x, w and b (or null) are live tch handles for the call; the shim returns a
    // new `at::Tensor*` that the returned Tensor owns (tch frees it with `delete`), or null
    // with a NUL-terminated message in `err`.
    let y = unsafe { otter_onednn_linear(x.as_ptr(), w.as_ptr(), b.map_or(std::ptr::null(), |b| b.as_ptr()), err.as_mut_ptr(), err.len()) };
    if y.is_null() {
        // SAFETY: the shim NUL-terminates `err` (a local buffer) when it returns null.
        return Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned());
    }
    // SAFETY: `y` is a fresh heap `at::Tensor` nobody else owns.
    Ok(unsafe { Tensor::from_ptr(y) })
}

/// `nn.LayerNorm(dim)` with weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &Vb, eps: f64) -> Self {
        Self { weight: vb.get("weight"), bias: vb.get("bias"), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer norm input has a last dim");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Upstream's `FeedForward`: `[LayerNorm, Linear(D, D*mult), GELU, Linear(D*mult, D)]`,
/// stored as `feed_forward.{0,1,3}`; no biases on the linears, exact (erf) GELU.
#[derive(Debug)]
pub struct FeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub fn new(vb: &Vb) -> Self {
        Self { norm: LayerNorm::new(&vb.pp(0), 1e-5), up: Linear::no_bias(&vb.pp(1)), down: Linear::no_bias(&vb.pp(3)) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(&self.norm.forward(x)).gelu("none"))
    }
}

/// Keys and values (B, heads, S, head_dim) of the positions seen so far, per layer, for
/// incremental decoding (both backbones).
#[derive(Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl KvCache {
    /// Appends this call's keys and values (B, H, L, dh) to the cached ones and keeps the
    /// result; returns the keys and values to attend over (cached + new).
    pub fn extend(&mut self, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
            _ => (k, v),
        };
        self.k = Some(k.shallow_clone());
        self.v = Some(v.shallow_clone());
        (k, v)
    }

    pub fn len(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `torch.finfo(kind).max`, the magnitude upstream fills masked attention scores with.
pub fn finfo_max(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 3.3895313892515355e38,
        Kind::Half => 65504.0,
        Kind::Double => f64::MAX,
        _ => f32::MAX as f64,
    }
}

/// `torch.finfo(kind).min` (HF's additive attention-mask value).
pub fn finfo_min(kind: Kind) -> f64 {
    -finfo_max(kind)
}

#[cfg(test)]
mod onednn_tests {
    use super::*;

    /// The oneDNN path computes libtorch's `linear`: output and every gradient (input,
    /// weight, bias) agree within f32 rounding, for a 3-D input, with a trainable weight
    /// and with a frozen one (which then gets no gradient).
    #[test]
    fn onednn_linear_equals_libtorch_linear() {
        // SAFETY: a query without arguments or state.
        assert!(unsafe { otter_onednn_available() } == 1, "libtorch is built with oneDNN");
        if !onednn_runs_here() {
            // This CPU cannot run it (no AVX-512): `linear` must fall back, not panic.
            let opts = (Kind::Float, tch::Device::Cpu);
            let (x, w) = (Tensor::randn([64, 256], opts), Tensor::randn([256, 256], opts));
            assert!(64 * 256 * 256 >= ONEDNN_MIN_MACS && !onednn());
            assert_eq!(linear(&x, &w, None), x.linear(&w, None::<&Tensor>), "the fallback is libtorch's linear");
            println!("skipped the oneDNN comparison: oneDNN matmul does not run on this CPU; checked the fallback");
            return;
        }
        tch::manual_seed(3);
        let opts = (Kind::Float, tch::Device::Cpu);
        for w_trainable in [true, false] {
            let x = Tensor::randn([2, 33, 96], opts).set_requires_grad(true);
            let w = Tensor::randn([80, 96], opts).set_requires_grad(w_trainable);
            let b = Tensor::randn([80], opts).set_requires_grad(true);
            let g = Tensor::randn([2, 33, 80], opts);
            let run = |dnn: bool| {
                for t in [&x, &w, &b] {
                    let mut t = t.shallow_clone();
                    t.zero_grad();
                }
                let y = if dnn { onednn_linear(&x, &w, Some(&b)) } else { x.linear(&w, Some(&b)) };
                (&y * &g).sum(Kind::Float).backward();
                let gw = w.grad();
                (y.detach(), x.grad().copy(), gw.defined().then(|| gw.copy()), b.grad().copy())
            };
            let (y1, gx1, gw1, gb1) = run(true);
            let (y2, gx2, gw2, gb2) = run(false);
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d <= 1e-4, "{what} (trainable weight: {w_trainable}): max |diff| {d:e}");
            };
            close(&y1, &y2, "output");
            close(&gx1, &gx2, "input gradient");
            close(&gb1, &gb2, "bias gradient");
            assert_eq!(gw1.is_some(), w_trainable, "a weight gets a gradient exactly when trainable");
            if let (Some(gw1), Some(gw2)) = (gw1, gw2) {
                close(&gw1, &gw2, "weight gradient");
            }
        }
    }
}

/// Whether attention on `q`'s device goes through libtorch's fused
/// `scaled_dot_product_attention` (flash or memory-efficient kernels): on CUDA, unless
/// `OTTER_ATTENTION=eager` (the upstream-shaped path every device can take, kept for
/// parity checks). On the CPU the eager path is the faster one at Otter's shapes.
pub fn fused_attention(q: &Tensor) -> bool {
    static EAGER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    q.device().is_cuda() && !*EAGER.get_or_init(|| std::env::var("OTTER_ATTENTION").is_ok_and(|v| v == "eager"))
}

/// `softmax(q k^T * scale + mask) v` through libtorch's fused kernels; `mask` is
/// additive (broadcast to (B, h, L, S)) and cast to `q`'s kind, `causal` a top-left causal
/// mask without a tensor (which lets the flash kernel run).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: Option<f64>) -> Tensor {
    let mask = mask.map(|m| m.to_kind(q.kind()));
    Tensor::scaled_dot_product_attention(q, k, v, mask.as_ref(), 0.0, causal, scale, false)
}
