// A CPU tensor over bytes someone else owns (a memory-mapped checkpoint file), whose
// storage keeps that owner alive: `at::from_blob` with a deleter that releases it when the
// last tensor sharing the storage is gone. tch binds `from_blob` only without a deleter,
// which leaves the lifetime to the caller; with this one no tensor can outlive its map.
//
// Handles are tch's (`C_tensor` = `at::Tensor*`, torch-sys' torch_api.h).
#include <ATen/ops/from_blob.h>
#include <c10/core/TensorOptions.h>

#include <cstring>
#include <exception>

// Returns a new tensor handle (freed by tch), or null with the message in `err`; on null
// `release` was not called (the caller still owns `owner`).
extern "C" at::Tensor* otter_from_blob_owned(void* data, const int64_t* sizes, size_t ndim, int scalar_type, void* owner,
                                             void (*release)(void*), char* err, size_t err_len) {
    try {
        auto opts = at::TensorOptions().dtype(static_cast<c10::ScalarType>(scalar_type)).device(at::kCPU);
        auto t = at::from_blob(data, c10::IntArrayRef(sizes, ndim), [owner, release](void*) { release(owner); }, opts);
        return new at::Tensor(std::move(t));
    } catch (const std::exception& e) {
        if (err_len > 0) {
            std::strncpy(err, e.what(), err_len - 1);
            err[err_len - 1] = '\0';
        }
        return nullptr;
    }
}
