// C ABI over libtorch's own c10d::TCPStore (in libtorch_cpu: no CUDA needed), the
// key-value store a generation's NCCL group bootstraps through. Rank 0 serves it on the
// listening socket it already reported to the coordinator (`masterListenFd` takes over a
// duplicate of that socket, so there is no port to race for); the other ranks connect as
// clients. Every entry point catches C++ exceptions and returns them as a message.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "../ffi_guard.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>


extern "C" {

// A store handle (`c10::intrusive_ptr<c10d::Store>*`), or null with a message. A server
// (`listen_fd >= 0`) takes over a duplicate of that bound, listening socket.
void* otter_store_new(const char* host, uint16_t port, int listen_fd, int64_t timeout_ms, char* err, size_t len) {
  c10::intrusive_ptr<c10d::Store>* out = nullptr;
  int rc = otter::guarded(err, len, [&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = listen_fd >= 0;
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    if (listen_fd >= 0) {
      int fd = dup(listen_fd);
      if (fd < 0) {
        throw std::runtime_error("dup of the listening socket failed");
      }
      o.masterListenFd = fd;
    }
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    out = new c10::intrusive_ptr<c10d::Store>(store);
  });
  return rc == 0 ? out : nullptr;
}

int otter_store_set(void* h, const char* key, const uint8_t* value, size_t n, char* err, size_t len) {
  auto* s = static_cast<c10::intrusive_ptr<c10d::Store>*>(h);
  return otter::guarded(err, len, [&] { (*s)->set(std::string(key), std::vector<uint8_t>(value, value + n)); });
}

// Blocks until `key` exists (or the store's timeout): copies at most `cap` bytes of its
// value to `out` and its full length to `*n`.
int otter_store_get(void* h, const char* key, uint8_t* out, size_t cap, size_t* n, char* err, size_t len) {
  auto* s = static_cast<c10::intrusive_ptr<c10d::Store>*>(h);
  return otter::guarded(err, len, [&] {
    auto v = (*s)->get(std::string(key));
    *n = v.size();
    std::memcpy(out, v.data(), std::min(cap, v.size()));
  });
}

void otter_store_free(void* h) {
  auto* s = static_cast<c10::intrusive_ptr<c10d::Store>*>(h);
  try {
    delete s;
  } catch (...) {
  }
}
}
