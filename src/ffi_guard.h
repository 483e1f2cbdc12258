// The error convention of our C ABI shims over libtorch: an entry point runs its body
// through `otter::guarded`, which returns 0, or 1 with the C++ exception's message copied
// (NUL-terminated, truncated) into the caller's `err` buffer. No exception crosses into
// Rust.
#pragma once

#include <cstring>
#include <exception>

namespace otter {

inline void set_err(char* err, size_t len, const char* msg) {
  if (err && len) {
    std::strncpy(err, msg, len - 1);
    err[len - 1] = 0;
  }
}

template <class F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace otter
