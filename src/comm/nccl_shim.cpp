// C ABI over libtorch's own c10d (feature `nccl`): a ProcessGroupNCCL bootstrapped through
// a generation's TCPStore (store_shim.cpp, under a PrefixStore of the generation's
// prefix), so the Rust side gets NCCL without a separate binding crate.
// Tensors arrive as `at::Tensor*` (tch's `Tensor::as_ptr`). Every entry point catches
// C++ exceptions and returns them as a message; a failed or timed-out collective aborts
// the communicator so no rank is left hanging inside NCCL.
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "../ffi_guard.h"

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
  std::chrono::milliseconds timeout;
};

// otter::guarded, and a failure aborts the communicator so no rank is left hanging.
template <class F>
int guarded(Group* g, char* err, size_t len, F&& f) {
  if (otter::guarded(err, len, std::forward<F>(f)) == 0) {
    return 0;
  }
  if (g && g->pg) {
    try {
      g->pg->abort();
    } catch (...) {
    }
  }
  return 1;
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& w) {
  if (!w->wait(g->timeout)) {
    throw std::runtime_error("NCCL collective timed out");
  }
}
}  // namespace

extern "C" {

// `store`: a `c10::intrusive_ptr<c10d::Store>*` from otter_store_new (shared, not taken
// over); `prefix`: the generation's key prefix. The communicator is created eagerly on
// CUDA device `device`, so a failing init surfaces here, not at the first collective.
void* otter_nccl_new(void* store, const char* prefix, int rank, int world, int device, int64_t timeout_ms, char* err, size_t len) {
  Group* g = nullptr;
  int rc = guarded(nullptr, err, len, [&] {
    g = new Group();
    g->timeout = std::chrono::milliseconds(timeout_ms);
    auto* base = static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    g->store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), *base);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = g->timeout;
    g->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store, rank, world, opts);
    at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    g->pg->setBoundDeviceId(dev);
    g->pg->eagerConnectSingleDevice(dev);
  });
  if (rc != 0) {
    delete g;
    return nullptr;
  }
  return g;
}

int otter_nccl_all_reduce_mean(void* h, at::Tensor** ts, size_t n, char* err, size_t len) {
  auto* g = static_cast<Group*>(h);
  return guarded(g, err, len, [&] {
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::AVG);
    o.timeout = g->timeout;
    for (size_t i = 0; i < n; i++) {
      std::vector<at::Tensor> v{*ts[i]};
      wait(g, g->pg->allreduce(v, o));
    }
  });
}

int otter_nccl_broadcast(void* h, at::Tensor* t, int root, char* err, size_t len) {
  auto* g = static_cast<Group*>(h);
  return guarded(g, err, len, [&] {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    std::vector<at::Tensor> v{*t};
    wait(g, g->pg->broadcast(v, o));
  });
}

int otter_nccl_reduce_scatter_sum(void* h, at::Tensor* input, at::Tensor* output, char* err, size_t len) {
  auto* g = static_cast<Group*>(h);
  return guarded(g, err, len, [&] {
    c10d::ReduceScatterOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    o.timeout = g->timeout;
    wait(g, g->pg->_reduce_scatter_base(*output, *input, o));
  });
}

int otter_nccl_all_gather(void* h, at::Tensor* input, at::Tensor* output, char* err, size_t len) {
  auto* g = static_cast<Group*>(h);
  return guarded(g, err, len, [&] {
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait(g, g->pg->_allgather_base(*output, *input, o));
  });
}

int otter_nccl_barrier(void* h, char* err, size_t len) {
  auto* g = static_cast<Group*>(h);
  return guarded(g, err, len, [&] {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g, g->pg->barrier(o));
  });
}

void otter_nccl_abort(void* h) {
  auto* g = static_cast<Group*>(h);
  try {
    g->pg->abort();
  } catch (...) {
  }
}

void otter_nccl_free(void* h) {
  auto* g = static_cast<Group*>(h);
  try {
    g->pg->shutdown();
  } catch (...) {
  }
  delete g;
}
}
