// The jax_ep runtime: registered communication buffers and their peers.
//
// A buffer is one device allocation per EP rank. Peers' buffers are mapped
// into this process through CUDA IPC (one process per rank; handles travel
// over the jax.distributed key-value store) or, when one process drives
// several GPUs, used directly with peer access. Handlers find a buffer by its
// id (a static attribute) and pass its PeerTable to the kernels by value, so
// a CUDA graph captured once stays valid for the buffer's lifetime.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <atomic>
#include <initializer_list>
#include <utility>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_runtime_api.h>

#include "../cuda/intranode.cuh"
#include "failure_gate.h"

namespace jax_ep {

class IntranodeBuffer {
 public:
  IntranodeBuffer(int device, int rank, int num_ranks, std::size_t num_bytes, double timeout_s);
  // Over memory someone else owns and maps (an NVSHMEM symmetric allocation:
  // `local` is this rank's copy, `peers[r]` rank r's copy as this process sees it).
  IntranodeBuffer(int device, int rank, int num_ranks, std::size_t num_bytes, double timeout_s,
                  char* local, const std::vector<char*>& peers);
  ~IntranodeBuffer();
  IntranodeBuffer(const IntranodeBuffer&) = delete;
  IntranodeBuffer& operator=(const IntranodeBuffer&) = delete;

 private:
  void start_watcher();

 public:

  std::string ipc_handle() const;                   // 64 bytes of cudaIpcMemHandle_t
  void open_peer_ipc(int peer, const std::string& handle);
  void open_peer_local(int peer, const IntranodeBuffer& other);  // same process
  bool ready() const;                               // every peer mapped
  intranode::PeerTable peer_table() const;

  // Every rank's XLA device memory mapped into this process, for the
  // zero-copy low-latency combine (xla_memory.h): export this rank's
  // allocation (the one holding `any_xla_ptr`; a descriptor the caller
  // closes, and its size), map each peer's, then enable once every rank has
  // mapped every peer. Throws when this rank's memory cannot be shared.
  int export_xla_memory(std::uintptr_t any_xla_ptr, std::size_t* size);
  void open_peer_xla_memory(int peer, int fd, std::size_t size);
  void enable_xla_memory(bool on) { xla_enabled_ = on && !xla_base_.empty() && all_xla_mapped(); }
  // Teardown, first half: waits for this rank's work, then unmaps every
  // peer's memory (IPC buffers, XLA memory). Collective teardown runs it on
  // every rank between two barriers, and frees (the destructor) only after
  // the second: no rank frees memory a peer still has mapped or may write.
  void close_imports();
  bool xla_memory_enabled() const { return xla_enabled_; }
  // Offset of [p, p + bytes) from this rank's XLA allocation, or -1 when
  // zero copy is off or the range lies elsewhere.
  long long xla_memory_offset(const void* p, std::size_t bytes) const;
  const std::vector<char*>& xla_bases() const { return xla_base_; }
  // A group member (one process driving several GPUs): every rank's XLA
  // allocation as this process has it (Runtime::share_group_xla_memory),
  // owned by XLA, so never unmapped here.
  void adopt_xla_memory(const std::vector<char*>& bases, const std::vector<std::size_t>& sizes);

  // A kernel of this buffer recorded a failure (a timeout, a mismatch, an
  // abort): the record, read from mapped host memory (code 0: none). The
  // buffer is then unusable (its kernels return at once) until re-created.
  intranode::TimeoutRecord failure() const;
  // Which executions' handlers may still launch on it once it failed.
  FailureGate& gate() { return gate_; }

  // Ranks whose buffer is on this rank's GPU (this one included), and that
  // GPU's SM count: kernels that spin need blocks x ranks <= SMs.
  int ranks_on_gpu() const;
  int sm_count() const { return sm_count_; }

  int device() const { return device_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  std::size_t num_bytes() const { return num_bytes_; }
  std::size_t staging_half_bytes() const;
  char* local() const { return local_; }

  // What an asynchronous send runs on: a high-priority stream of this
  // buffer's device, and per kind of call (0 dispatch, 1 combine) an event
  // the send records there before its receive waits for it. Created on first
  // use; an error names the CUDA call that failed.
  struct SendStream {
    cudaStream_t stream = nullptr;
    cudaEvent_t fork[2] = {nullptr, nullptr};  // recorded on XLA's stream at the send
    cudaEvent_t done[2] = {nullptr, nullptr};  // recorded on `stream` after the send
  };
  cudaError_t send_stream(SendStream** out);

 private:
  int device_, rank_, num_ranks_;
  int sm_count_ = 0;
  std::mutex send_stream_mutex_;
  SendStream send_stream_{};
  std::size_t num_bytes_;
  double timeout_s_;
  char* local_ = nullptr;
  bool owns_memory_ = true;
  std::vector<char*> peers_;
  std::vector<bool> peer_is_ipc_;
  std::vector<bool> peer_same_gpu_;  // the peer's memory is on this rank's GPU
  bool all_xla_mapped() const;
  std::vector<char*> xla_base_;         // per rank: its XLA allocation here (empty until exported)
  std::vector<std::size_t> xla_size_;   // its bytes
  bool xla_imported_ = true;            // peers' entries are this buffer's own mappings (unmapped at the end)
  bool xla_enabled_ = false;
  intranode::TimeoutRecord* timeout_host_ = nullptr;    // mapped, pinned
  intranode::TimeoutRecord* timeout_device_ = nullptr;  // its device address
  std::atomic<bool> stop_watch_{false};
  std::thread watcher_;  // prints a timeout record as soon as a kernel writes it
  FailureGate gate_;
};

// Runs one barrier across the members of a group, each on its own stream,
// and checks every member saw every other one (a self-test of peer mapping
// inside one process; works with several members on one GPU).
void group_barrier_selftest(int group_id);

// Message of a timeout record (empty when none).
std::string timeout_message(const intranode::TimeoutRecord& rec);

// Name of a signature field (intranode::SigField) of a call of `op`, e.g.
// "T (tokens per rank)".
const char* signature_field_name(int field, int op);

// Whether calls publish and check signatures: on unless the environment
// sets JAX_EP_CALL_SIGNATURES=0 (a benchmark knob, to measure their cost;
// it must be the same on every rank).
inline bool call_signatures_on() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_EP_CALL_SIGNATURES");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

// The signature of a call: `op` and the listed fields (the rest 0), hashed
// (hash 0, unchecked, when signatures are off).
inline intranode::CallSignature sign_call(int op, std::initializer_list<std::pair<int, int64_t>> fields) {
  intranode::CallSignature s{};
  s.field[intranode::kSigOp] = static_cast<unsigned int>(op);
  for (const auto& f : fields) s.field[f.first] = static_cast<unsigned int>(f.second);
  s.hash = call_signatures_on() ? intranode::signature_hash(s.field) : 0;
  return s;
}

// Process-wide registry of buffers, keyed by id.
class Runtime {
 public:
  static Runtime& get();
  int create(int device, int rank, int num_ranks, std::size_t num_bytes, double timeout_s);
  int create_external(int device, int rank, int num_ranks, std::size_t num_bytes, double timeout_s,
                      char* local, const std::vector<char*>& peers);
  // One process driving several GPUs: one buffer per listed device (rank i
  // on devices[i]), every pair mapped through peer access. Returns the id of
  // the group; a handler finds the member of the device it runs on.
  int create_group(const std::vector<int>& devices, std::size_t num_bytes, double timeout_s);
  // Member buffer ids in rank order (empty when `id` is not a group).
  std::vector<int> members(int id);
  // The zero-copy combine for a group: `probes[r]` is any XLA buffer on
  // member r's device; each device's XLA allocation is made readable by the
  // other members' devices and every member learns all of them. Throws
  // (nothing enabled) when an allocation cannot be found or shared.
  void share_group_xla_memory(int group_id, const std::vector<std::uintptr_t>& probes);
  // A buffer's xla_memory_enabled, or for a group whether every member's is.
  bool xla_memory_enabled(int id);
  void destroy(int id);  // a buffer, or every member of a group
  // The buffer (a group's member on `device`) for a handler of XLA execution
  // `run`, or null with *error set when the id is unknown, not ready, the
  // group has no member there, or it failed before `run` (FailureGate).
  // Shared ownership: a concurrent destroy frees it only after the caller is done.
  std::shared_ptr<IntranodeBuffer> find(int64_t id, int device, int64_t run, std::string* error);
  std::shared_ptr<IntranodeBuffer> at(int id);  // throws when unknown
  // Like find, but also a buffer that failed (null when absent).
  std::shared_ptr<IntranodeBuffer> find_any(int64_t id, int device);
  // The failure record of a buffer, or of the first failed member of a group.
  intranode::TimeoutRecord failure(int id);

 private:
  int add(std::unique_ptr<IntranodeBuffer> buffer);  // registers it under a new id
  // find without the failure check (under the lock).
  std::shared_ptr<IntranodeBuffer> find_ready(int64_t id, int device, std::string* error);

  std::mutex mutex_;
  int next_id_ = 1;
  std::unordered_map<int, std::shared_ptr<IntranodeBuffer>> buffers_;
  std::unordered_map<int, std::vector<int>> groups_;
};

}  // namespace jax_ep
