// The CUDA caching allocator's own accounting (feature `nccl`, which builds against the
// CUDA headers): the peak of bytes handed to tensors since the last reset, what it holds
// from the driver, and a cap on what it may take (`setMemoryFraction`, which makes a
// larger card behave as a smaller one for a fit check). Same numbers as
// `torch.cuda.max_memory_allocated` / `memory_reserved` / `set_per_process_memory_fraction`.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <dlfcn.h>

#include "ffi_guard.h"

// [allocated now, peak allocated, reserved now, peak reserved, device total] in bytes.
extern "C" int otter_cuda_memory(int device, int64_t* out, char* err, size_t len) {
  return otter::guarded(err, len, [&] {
    auto idx = static_cast<c10::DeviceIndex>(device);
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(idx);
    constexpr size_t all = 0;  // StatType::AGGREGATE
    // cudaMemGetInfo from the CUDA runtime libtorch_cuda already loaded (not linked here:
    // the wheel's runtime is the one that must answer).
    using MemGetInfo = int (*)(size_t*, size_t*);
    auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
    TORCH_CHECK(mem_get_info != nullptr, "cudaMemGetInfo not found in the loaded CUDA runtime");
    c10::cuda::SetDevice(idx);
    size_t free_b = 0, total_b = 0;
    TORCH_CHECK(mem_get_info(&free_b, &total_b) == 0, "cudaMemGetInfo failed");
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.allocated_bytes[all].peak;
    out[2] = s.reserved_bytes[all].current;
    out[3] = s.reserved_bytes[all].peak;
    out[4] = static_cast<int64_t>(total_b);
  });
}

extern "C" int otter_cuda_reset_peak(int device, char* err, size_t len) {
  return otter::guarded(err, len, [&] { c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device)); });
}

extern "C" int otter_cuda_set_memory_fraction(int device, double fraction, char* err, size_t len) {
  return otter::guarded(err, len, [&] {
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, static_cast<c10::DeviceIndex>(device));
  });
}
