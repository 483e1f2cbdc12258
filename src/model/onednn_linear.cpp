// `y = x W^T + b` on the CPU through oneDNN's f32 GEMM, with its own backward.
//
// libtorch runs f32 `linear`/`addmm` on the CPU through MKL, whose AMD code path (the
// "zen" AVX2 kernels) leaves AVX-512 unused; oneDNN (bundled in libtorch, what PyTorch
// uses for bf16 and for convolutions) picks AVX-512 kernels on the same machines: 1.1x to
// 1.45x the GEMM throughput on this project's CI kind (BENCHMARKS.md). Same math, f32
// throughout; only the summation order inside each dot product differs.
//
// `at::native::mkldnn_matmul` (exported by libtorch_cpu, declared in a header the wheel
// does not ship) multiplies dense tensors in place, contiguous or transposed, without
// layout conversions. The autograd node below is what `linear` would record: grad_x =
// g W, grad_W = g^T x (only when W is trainable: frozen weights save no activation);
// the bias is a plain autograd add after it.
//
// Handles are tch's (`C_tensor` = `at::Tensor*`, torch-sys' torch_api.h).
#include <ATen/Context.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>

#include "../ffi_guard.h"

// Pinned by the linker: the mangled name carries every parameter type, so a libtorch whose
// signature differs fails the link (an undefined symbol), never a call at run time.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta, float alpha);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// a @ b for 2-D a (m x k) and b (k x n), each contiguous or a transposed contiguous view.
at::Tensor dnn_mm(const at::Tensor& a, const at::Tensor& b) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    at::native::mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
    return out;
}

at::Tensor rows(const at::Tensor& t, int64_t cols) {
    auto r = t.reshape({-1, cols});
    return r.is_contiguous() ? r : r.contiguous();
}

struct OneDnnLinear : public torch::autograd::Function<OneDnnLinear> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
        auto x2 = rows(x, x.size(-1));
        auto y = dnn_mm(x2, w.t());
        // The input is only needed for W's gradient.
        ctx->save_for_backward({w.requires_grad() ? x2 : at::Tensor(), w});
        ctx->saved_data["x_shape"] = x.sizes().vec();
        auto shape = x.sizes().vec();
        shape.back() = w.size(0);
        return y.view(shape);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto& x2 = saved[0];
        const auto& w = saved[1];
        auto g = rows(grads[0], w.size(0));
        at::Tensor gx, gw;
        if (ctx->needs_input_grad(0)) {
            gx = dnn_mm(g, w).view(ctx->saved_data["x_shape"].toIntVector());
        }
        if (ctx->needs_input_grad(1)) {
            gw = dnn_mm(g.t(), x2);
        }
        return {gx, gw};
    }
};

}  // namespace

extern "C" int otter_onednn_available() {
    return at::hasMKLDNN() ? 1 : 0;
}

// Returns a new tensor handle (freed by tch), or null with the message in `err`.
extern "C" at::Tensor* otter_onednn_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b, char* err,
                                           size_t err_len) {
    at::Tensor* out = nullptr;
    if (otter::guarded(err, err_len, [&] {
            auto y = OneDnnLinear::apply(*x, *w);
            // The bias outside the node (autograd's own add): an undefined optional input
            // cannot pass through a custom Function.
            out = new at::Tensor(b ? at::add(y, *b) : y);
        }) != 0) {
        return nullptr;
    }
    return out;
}
