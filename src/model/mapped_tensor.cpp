// A CPU tensor over bytes someone else owns (a memory-mapped checkpoint file), whose
// storage keeps that owner alive: `at::from_blob` with a deleter that releases it when the
// last tensor sharing the storage is gone. tch binds `from_blob` only without a deleter,
// which leaves the lifetime to the caller; with this one no tensor can outlive its map.
//
// Handles are tch's (`C_tensor` = `at::Tensor*`, torch-sys' torch_api.h).
#include <ATen/ops/from_blob.h>
#include <c10/core/TensorOptions.h>

#include <atomic>
#include <memory>
#include <stdexcept>

#include "../ffi_guard.h"

namespace {

// `owner`, released exactly once: by the storage's deleter, or by the shim when it fails.
// A failure after `from_blob` made the storage (unwinding then runs the deleter) and one
// before it (no deleter exists) look alike from outside; the flag makes both safe.
struct Owner {
    void* p;
    void (*release)(void*);
    std::atomic<bool> released{false};
    void once() {
        if (!released.exchange(true)) release(p);
    }
};

}  // namespace

// Takes `owner` in every case. Returns a new tensor handle (freed by tch) whose storage
// calls `release(owner)` when freed; or null, with the message in `err` and `owner`
// already released. `fault` != 0 (tests only) throws after the storage exists.
extern "C" at::Tensor* otter_from_blob_owned(void* data, const int64_t* sizes, size_t ndim, int scalar_type, void* owner,
                                             void (*release)(void*), int fault, char* err, size_t err_len) {
    at::Tensor* out = nullptr;
    std::shared_ptr<Owner> o;
    int failed = otter::guarded(err, err_len, [&] {
        o = std::make_shared<Owner>();
        o->p = owner;
        o->release = release;
        auto opts = at::TensorOptions().dtype(static_cast<c10::ScalarType>(scalar_type)).device(at::kCPU);
        auto t = at::from_blob(data, c10::IntArrayRef(sizes, ndim), [o](void*) { o->once(); }, opts);
        if (fault) throw std::runtime_error("injected fault after from_blob");
        out = new at::Tensor(std::move(t));
    });
    if (failed) {
        if (o) {
            o->once();  // a no-op if unwinding freed the storage (its deleter ran)
        } else {
            release(owner);  // make_shared itself threw: nothing else holds `owner`
        }
        return nullptr;
    }
    return out;
}
