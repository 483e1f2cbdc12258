// Activation checkpointing: a segment of the model (a LLaMA decoder layer with its
// cross-attention block, a perceiver layer) runs its forward without keeping activations,
// and runs it again in backward to get its gradients, as `torch.utils.checkpoint` does in
// its reentrant form. tch binds no custom autograd functions, so the node lives here and
// the segment itself stays in Rust: a callback `call(closure, inputs, n)` runs it, and
// `drop(closure)` frees it when the autograd graph lets go of the node.
//
// Forward: the segment runs with autograd off (a custom Function's forward always does);
// its inputs are saved (not its activations). Backward: the saved inputs are detached
// (each requiring grad where autograd needs its gradient), the segment runs again with
// autograd on, and a nested `backward` through that small graph accumulates the
// trainable weights' gradients (post-accumulate-grad hooks fire as usual) and the inputs'
// gradients, which are returned. Autocast is the segment's own business (the Rust
// closure enters it), since backward may run on another thread. The segments have no
// randomness (no dropout in Otter's training), so the recomputation is exact.
//
// Handles are tch's (`C_tensor` = `at::Tensor*`).
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/ivalue.h>

#include <vector>

#include "../ffi_guard.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Returns a new heap tensor (owned by the caller) or null if the segment failed (a Rust
// panic, caught on that side).
using SegmentCall = at::Tensor* (*)(void* closure, const at::Tensor* const* inputs, size_t n);
using SegmentDrop = void (*)(void* closure);

struct Segment : torch::CustomClassHolder {
  void* closure;
  SegmentCall call;
  SegmentDrop drop;
  Segment(void* c, SegmentCall f, SegmentDrop d) : closure(c), call(f), drop(d) {}
  ~Segment() override { drop(closure); }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  at::Tensor run(const std::vector<at::Tensor>& inputs) const {
    std::vector<const at::Tensor*> ptrs;
    for (const auto& t : inputs) ptrs.push_back(&t);
    at::Tensor* out = call(closure, ptrs.data(), ptrs.size());
    TORCH_CHECK(out != nullptr, "a checkpointed segment failed (see the panic above)");
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

c10::intrusive_ptr<Segment> segment_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<Segment>(ctx->saved_data["segment"].toCapsule());
}

variable_list recompute_and_backward(AutogradContext* ctx, const variable_list& grads, size_t n) {
  auto saved = ctx->get_saved_variables();
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < n; ++i) {
    inputs.push_back(saved[i].detach().requires_grad_(ctx->needs_input_grad(i)));
  }
  at::Tensor out;
  {
    at::AutoGradMode on(true);
    out = segment_of(ctx)->run(inputs);
  }
  if (out.requires_grad() && grads[0].defined()) {
    torch::autograd::backward({out}, {grads[0]});
  }
  variable_list result;
  for (size_t i = 0; i < n; ++i) {
    result.push_back(ctx->needs_input_grad(i) ? inputs[i].grad() : at::Tensor());
  }
  return result;
}

at::Tensor run_without_grad(AutogradContext* ctx, const c10::intrusive_ptr<Segment>& seg,
                            const std::vector<at::Tensor>& inputs) {
  ctx->saved_data["segment"] = c10::IValue::make_capsule(seg);
  ctx->save_for_backward(inputs);
  return seg->run(inputs);
}

struct Checkpoint1 : public torch::autograd::Function<Checkpoint1> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, c10::intrusive_ptr<Segment> seg) {
    return run_without_grad(ctx, seg, {a});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = recompute_and_backward(ctx, grads, 1);
    g.push_back(at::Tensor());  // the segment argument
    return g;
  }
};

struct Checkpoint2 : public torch::autograd::Function<Checkpoint2> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            c10::intrusive_ptr<Segment> seg) {
    return run_without_grad(ctx, seg, {a, b});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = recompute_and_backward(ctx, grads, 2);
    g.push_back(at::Tensor());
    return g;
  }
};

}  // namespace

// Runs `call(closure, inputs)` as a checkpointed segment of one or two tensor inputs and
// one output, written to `*out` (a new handle freed by tch). `drop(closure)` runs exactly
// once: when the autograd node is freed, or before returning when no node was made (or on
// an error). Returns 0, or 1 with the message in `err`.
extern "C" int otter_checkpoint(const at::Tensor* const* inputs, size_t n, void* closure, SegmentCall call,
                                SegmentDrop drop, at::Tensor** out, char* err, size_t err_len) {
  // Owns the closure from here on, whatever happens: the segment drops it, or this
  // function does if the segment could not be made.
  c10::intrusive_ptr<Segment> seg;
  if (otter::guarded(err, err_len, [&] { seg = c10::make_intrusive<Segment>(closure, call, drop); }) != 0) {
    drop(closure);
    return 1;
  }
  return otter::guarded(err, err_len, [&] {
    TORCH_CHECK(n == 1 || n == 2, "a checkpointed segment takes 1 or 2 tensors, got ", n);
    at::Tensor y = n == 1 ? Checkpoint1::apply(*inputs[0], seg) : Checkpoint2::apply(*inputs[0], *inputs[1], seg);
    *out = new at::Tensor(y);
  });
}

extern "C" int otter_grad_enabled() {
  return at::GradMode::is_enabled() ? 1 : 0;
}
