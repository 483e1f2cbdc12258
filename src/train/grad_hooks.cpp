// Autograd post-accumulate-grad hooks for the Rust side (tch does not bind them): the
// hook libtorch runs on a leaf once its `.grad` is final for the current backward, the
// one `Tensor.register_post_accumulate_grad_hook` registers in Python and DDP-style
// overlap waits for. A hook calls back `cb(ctx, index)` on the thread that runs the
// backward (for CPU tensors: the caller of `backward`). A leaf holds at most one such
// hook: setting replaces, clearing removes.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "../ffi_guard.h"

#include <cstring>
#include <memory>

namespace {
using Callback = void (*)(void* ctx, size_t index);

struct RustHook : torch::autograd::PostAccumulateGradHook {
  RustHook(Callback cb, void* ctx, size_t index) : cb(cb), ctx(ctx), index(index) {}
  void operator()(const torch::autograd::Variable&) override { cb(ctx, index); }
  Callback cb;
  void* ctx;
  size_t index;
};
}  // namespace

extern "C" {

// Returns 0, or 1 with a message in `err` (the tensor is not a leaf that requires grad).
int otter_set_post_acc_grad_hook(at::Tensor* t, Callback cb, void* ctx, size_t index, char* err, size_t len) {
  return otter::guarded(err, len, [&] {
    TORCH_CHECK(t->is_leaf() && t->requires_grad(), "a post-accumulate-grad hook needs a leaf that requires grad");
    torch::autograd::impl::set_post_acc_grad_hooks(*t, std::make_unique<RustHook>(cb, ctx, index));
  });
}

void otter_clear_post_acc_grad_hook(at::Tensor* t) {
  try {
    torch::autograd::impl::post_acc_grad_hooks(*t).reset();
  } catch (...) {
  }
}
}
