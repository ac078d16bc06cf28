// Buffers of the low-latency put path (cuda/ll_put.cuh), registered in the
// jax_ep._nvshmem module: an NVSHMEM symmetric allocation, each peer's path
// (pointer or put, from jax_ep.topology) and mapped copy, and a failure record (the pointer path's
// intranode::TimeoutRecord, in mapped host memory).
//
// The FFI handlers of xla_ffi/ll_put.cc find a buffer by its id (a static
// attribute). Ids start at kFirstPutBufferId so they never collide with the
// ids of jax_ep._C's buffers (both name a buffer in LowLatencyOptions.buffer_id).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../cuda/ll_put.cuh"
#include "failure_gate.h"

namespace jax_ep {
namespace ll_put {

inline constexpr int kFirstPutBufferId = 1 << 20;

class PutBuffer {
 public:
  // `local`: this rank's copy of a symmetric allocation of `num_bytes`;
  // `mapped[r]`: rank r's copy as this process sees it (0 where the path is
  // a put); `paths[r]`: 0 pointer, 1 put (jax_ep.topology.PATH_*).
  PutBuffer(int device, int rank, int num_ranks, std::uintptr_t local, std::size_t num_bytes,
            const std::vector<std::uintptr_t>& mapped, const std::vector<int>& paths, double timeout_s);
  ~PutBuffer();
  PutBuffer(const PutBuffer&) = delete;
  PutBuffer& operator=(const PutBuffer&) = delete;

  // The kernels' arguments for a call of `shape` with `rank_mask` (device bool[R] or null).
  Args args(const Shape& shape, const bool* rank_mask) const;
  int device() const { return device_; }
  int num_ranks() const { return peers_.num_ranks; }
  std::size_t num_bytes() const { return num_bytes_; }
  // The failure record (code 0: none), read as the pointer path reads its
  // own: the kernel writes the code last; -1 (being written) is read again
  // for up to 100 ms, then returned as is.
  intranode::TimeoutRecord failure() const;
  // Which executions' handlers may still launch on it once it failed.
  FailureGate& gate() { return gate_; }

 private:
  int device_;
  transport::Peers peers_{};
  std::size_t num_bytes_;
  double timeout_s_;
  intranode::TimeoutRecord* record_host_ = nullptr;    // pinned, mapped
  intranode::TimeoutRecord* record_device_ = nullptr;  // its device address
  FailureGate gate_;
};

// Registers a buffer (throws std::runtime_error on bad arguments or a CUDA error); its id.
int create_put_buffer(int device, int rank, int num_ranks, std::uintptr_t local, std::size_t num_bytes,
                      const std::vector<std::uintptr_t>& mapped, const std::vector<int>& paths, double timeout_s);
void destroy_put_buffer(int id);
// The buffer, or null with *error set (unknown id, or on another device).
std::shared_ptr<PutBuffer> find_put_buffer(int64_t id, int device, std::string* error);
// The buffer for a handler of XLA execution `run`: find_put_buffer, and
// refused (null, *error naming the failure) when it failed before `run`
// (FailureGate). `kind` names the buffer in the message ("put-path", "internode").
std::shared_ptr<PutBuffer> find_live_put_buffer(int64_t id, int device, int64_t run, const char* kind,
                                                std::string* error);
// PutBuffer::failure of a live buffer (a zero record when unknown).
intranode::TimeoutRecord put_buffer_failure(int id);

}  // namespace ll_put
}  // namespace jax_ep
