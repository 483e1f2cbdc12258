// CUDA autocast with its dtype (issue 43): tch only switches CUDA autocast on
// (`at_autocast_set_enabled`), and libtorch's CUDA autocast dtype defaults to Half, so
// "bf16" ran in fp16. These entry points set and read the enabled flag and the dtype
// together. Both are thread-local state in libtorch (autograd's own threads included),
// readable without a device, which is what lets a CPU test check every autocast entry.
#include <ATen/autocast_mode.h>

#include "../ffi_guard.h"

extern "C" {

// The CUDA autocast state of this thread: enabled (0/1) and dtype (c10::ScalarType).
int otter_autocast_state(int* enabled, int* dtype, char* err, size_t err_len) {
  return otter::guarded(err, err_len, [&] {
    *enabled = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
  });
}

// Sets this thread's CUDA autocast state. Entering (`enter` = 1) increments autocast's
// nesting count; leaving (0) decrements it and clears the cast cache at the outermost
// level, as torch.autocast does.
int otter_autocast_set(int enabled, int dtype, int enter, char* err, size_t err_len) {
  return otter::guarded(err, err_len, [&] {
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(dtype));
    if (enter) {
      at::autocast::increment_nesting();
    } else if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
  });
}
}
