#include "runtime.h"

#include "xla_memory.h"
#include "../cuda/low_latency.cuh"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace jax_ep {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep runtime: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Zeroes a fresh buffer: every epoch, call counter, count slot and flag
// starts at 0. Test hook: JAX_EP_TEST_COUNTER_START=n (the same on every
// rank) starts the call counters at n instead, with every protocol word
// reading as call n (low_latency::fresh_header), so that a test reaches the
// 2^32 wrap of the serials in protocol words (cuda/serial.cuh) in a few calls.
void clear_buffer(char* local, std::size_t num_bytes) {
  check(cudaMemset(local, 0, num_bytes), "cudaMemset");
  const char* env = std::getenv("JAX_EP_TEST_COUNTER_START");
  const unsigned long long start = env != nullptr ? std::strtoull(env, nullptr, 0) : 0;
  if (start != 0) {
    const std::vector<unsigned long long> header = low_latency::fresh_header(start);
    check(cudaMemcpy(local, header.data(), header.size() * 8, cudaMemcpyHostToDevice), "cudaMemcpy of the counters");
  }
}

// Restores the calling thread's current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

}  // namespace

IntranodeBuffer::IntranodeBuffer(int device, int rank, int num_ranks, std::size_t num_bytes,
                                 double timeout_s)
    : device_(device), rank_(rank), num_ranks_(num_ranks), num_bytes_(num_bytes),
      timeout_s_(timeout_s), peers_(num_ranks, nullptr), peer_is_ipc_(num_ranks, false),
      peer_same_gpu_(num_ranks, false) {
  if (num_ranks < 1 || num_ranks > intranode::kMaxRanks || rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("jax_ep runtime: need 0 <= rank < num_ranks <= 64, got rank " +
                                std::to_string(rank) + " of " + std::to_string(num_ranks));
  }
  const std::size_t minimum = workspace::kMinBufferBytes;
  if (num_bytes < minimum) {
    throw std::invalid_argument("jax_ep runtime: num_bytes must be at least " +
                                std::to_string(minimum));
  }
  DeviceGuard guard(device);
  check(cudaMalloc(&local_, num_bytes), "cudaMalloc of the communication buffer");
  clear_buffer(local_, num_bytes);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  peers_[rank] = local_;
  start_watcher();
}

IntranodeBuffer::IntranodeBuffer(int device, int rank, int num_ranks, std::size_t num_bytes,
                                 double timeout_s, char* local, const std::vector<char*>& peers)
    : device_(device), rank_(rank), num_ranks_(num_ranks), num_bytes_(num_bytes),
      timeout_s_(timeout_s), local_(local), owns_memory_(false), peers_(peers),
      peer_is_ipc_(num_ranks, false), peer_same_gpu_(num_ranks, false) {
  if (num_ranks < 1 || num_ranks > intranode::kMaxRanks || rank < 0 || rank >= num_ranks ||
      static_cast<int>(peers.size()) != num_ranks) {
    throw std::invalid_argument("jax_ep runtime: need 0 <= rank < num_ranks <= 64 and one pointer per rank");
  }
  for (int r = 0; r < num_ranks; ++r) {
    if (peers[r] == nullptr) {
      throw std::invalid_argument("jax_ep runtime: rank " + std::to_string(r) +
                                  " is not reachable through a peer pointer (RDMA is not supported here)");
    }
  }
  DeviceGuard guard(device);
  clear_buffer(local_, num_bytes);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  start_watcher();
}

int IntranodeBuffer::ranks_on_gpu() const {
  int n = 1;
  for (int r = 0; r < num_ranks_; ++r) n += r != rank_ && peer_same_gpu_[r];
  return n;
}

void IntranodeBuffer::start_watcher() {
  check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "cudaDeviceGetAttribute");
  check(cudaHostAlloc(reinterpret_cast<void**>(&timeout_host_), sizeof(intranode::TimeoutRecord),
                      cudaHostAllocMapped),
        "cudaHostAlloc of the timeout record");
  std::memset(timeout_host_, 0, sizeof(intranode::TimeoutRecord));
  check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&timeout_device_), timeout_host_, 0),
        "cudaHostGetDevicePointer");
  // A kernel whose wait failed records why and returns (its call's outputs
  // are then not valid); this thread prints the record as soon as it exists,
  // so every rank's log says what happened even where nobody asks.
  watcher_ = std::thread([this] {
    while (!stop_watch_.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      const auto* rec = reinterpret_cast<volatile intranode::TimeoutRecord*>(timeout_host_);
      if (rec->code > 0) {
        const std::string msg = timeout_message(failure());
        std::fprintf(stderr, "%s\n", msg.c_str());
        std::fflush(stderr);
        return;
      }
    }
  });
}

intranode::TimeoutRecord IntranodeBuffer::failure() const {
  intranode::TimeoutRecord rec{};
  if (timeout_host_ == nullptr) return rec;
  // The kernel writes the code last (after a system fence): a nonzero code
  // means the rest is there, except -1 (being written): read again shortly.
  for (int tries = 0; tries < 100; ++tries) {
    const int code = reinterpret_cast<volatile intranode::TimeoutRecord*>(timeout_host_)->code;
    if (code >= 0) {
      std::atomic_thread_fence(std::memory_order_acquire);
      std::memcpy(&rec, timeout_host_, sizeof(rec));
      rec.code = code;
      return rec;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  rec.code = -1;
  return rec;
}

void IntranodeBuffer::close_imports() {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_);
  cudaDeviceSynchronize();  // this rank's kernels no longer touch any peer
  for (int r = 0; r < num_ranks_; ++r) {
    if (peer_is_ipc_[r] && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
    if (peer_is_ipc_[r]) peers_[r] = nullptr;
    peer_is_ipc_[r] = false;
  }
  for (int r = 0; xla_imported_ && r < static_cast<int>(xla_base_.size()); ++r) {
    if (r != rank_ && xla_base_[r] != nullptr) xla_memory::unmap(xla_base_[r], xla_size_[r]);
    if (r != rank_) xla_base_[r] = nullptr;
  }
  xla_enabled_ = false;
  cudaSetDevice(previous);
}

IntranodeBuffer::~IntranodeBuffer() {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_);
  // Kernels may still write the mapped timeout record: wait for them before
  // the watcher stops and the record is freed.
  cudaDeviceSynchronize();
  stop_watch_.store(true);
  if (watcher_.joinable()) watcher_.join();
  if (timeout_host_ != nullptr) cudaFreeHost(timeout_host_);
  for (int kind = 0; kind < 2; ++kind) {
    if (send_stream_.fork[kind] != nullptr) cudaEventDestroy(send_stream_.fork[kind]);
    if (send_stream_.done[kind] != nullptr) cudaEventDestroy(send_stream_.done[kind]);
  }
  if (send_stream_.stream != nullptr) cudaStreamDestroy(send_stream_.stream);
  close_imports();
  if (local_ != nullptr && owns_memory_) cudaFree(local_);
  cudaSetDevice(previous);
}

cudaError_t IntranodeBuffer::send_stream(SendStream** out) {
  std::lock_guard<std::mutex> lock(send_stream_mutex_);
  if (send_stream_.stream == nullptr) {
    int previous = 0;
    cudaGetDevice(&previous);
    cudaError_t err = cudaSetDevice(device_);
    // Highest priority: the send's blocks go ahead of queued compute blocks.
    int least = 0, greatest = 0;
    if (err == cudaSuccess) err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    cudaStream_t stream = nullptr;
    if (err == cudaSuccess) err = cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest);
    for (int kind = 0; kind < 2 && err == cudaSuccess; ++kind) {
      err = cudaEventCreateWithFlags(&send_stream_.fork[kind], cudaEventDisableTiming);
      if (err == cudaSuccess) err = cudaEventCreateWithFlags(&send_stream_.done[kind], cudaEventDisableTiming);
    }
    cudaSetDevice(previous);
    if (err != cudaSuccess) {
      if (stream != nullptr) cudaStreamDestroy(stream);  // the events, if any, go with the buffer
      return err;
    }
    send_stream_.stream = stream;
  }
  *out = &send_stream_;
  return cudaSuccess;
}

namespace {
std::string device_uuid(int device) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return std::string(prop.uuid.bytes, sizeof(prop.uuid.bytes));
}
}  // namespace

// The IPC handle followed by the 16-byte UUID of the GPU that holds the
// buffer (peers on the same GPU can order their signals at GPU scope).
std::string IntranodeBuffer::ipc_handle() const {
  DeviceGuard guard(device_);
  cudaIpcMemHandle_t handle;
  check(cudaIpcGetMemHandle(&handle, local_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)) + device_uuid(device_);
}

void IntranodeBuffer::open_peer_ipc(int peer, const std::string& handle) {
  if (peer < 0 || peer >= num_ranks_ || peer == rank_) {
    throw std::invalid_argument("jax_ep runtime: bad peer rank " + std::to_string(peer));
  }
  constexpr std::size_t kBytes = sizeof(cudaIpcMemHandle_t) + 16;
  if (handle.size() != kBytes) {
    throw std::invalid_argument("jax_ep runtime: an IPC handle has " + std::to_string(kBytes) +
                                " bytes, got " + std::to_string(handle.size()));
  }
  if (peers_[peer] != nullptr) return;
  DeviceGuard guard(device_);
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* ptr = nullptr;
  check(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess),
        "cudaIpcOpenMemHandle of a peer's buffer");
  peers_[peer] = static_cast<char*>(ptr);
  peer_is_ipc_[peer] = true;
  peer_same_gpu_[peer] = handle.compare(sizeof(h), 16, device_uuid(device_)) == 0;
}

void IntranodeBuffer::open_peer_local(int peer, const IntranodeBuffer& other) {
  if (peer < 0 || peer >= num_ranks_ || other.rank() != peer || other.num_bytes() != num_bytes_) {
    throw std::invalid_argument("jax_ep runtime: buffer of rank " + std::to_string(other.rank()) +
                                " does not match peer " + std::to_string(peer));
  }
  if (other.device() != device_) {
    DeviceGuard guard(device_);
    int can = 0;
    check(cudaDeviceCanAccessPeer(&can, device_, other.device()), "cudaDeviceCanAccessPeer");
    if (!can) {
      throw std::runtime_error("jax_ep runtime: device " + std::to_string(device_) +
                               " cannot access device " + std::to_string(other.device()) +
                               " (no peer access)");
    }
    const cudaError_t err = cudaDeviceEnablePeerAccess(other.device(), 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
    else check(err, "cudaDeviceEnablePeerAccess");
  }
  peers_[peer] = other.local();
  peer_same_gpu_[peer] = other.device() == device_;
}

int IntranodeBuffer::export_xla_memory(std::uintptr_t any_xla_ptr, std::size_t* size) {
  const xla_memory::Allocation a = xla_memory::find(device_, reinterpret_cast<const void*>(any_xla_ptr));
  const int fd = xla_memory::export_fd(device_, a);
  xla_base_.assign(num_ranks_, nullptr);
  xla_size_.assign(num_ranks_, 0);
  xla_base_[rank_] = a.base;
  xla_size_[rank_] = a.size;
  *size = a.size;
  return fd;
}

void IntranodeBuffer::open_peer_xla_memory(int peer, int fd, std::size_t size) {
  if (peer < 0 || peer >= num_ranks_ || peer == rank_ || xla_base_.empty()) {
    throw std::invalid_argument("jax_ep runtime: cannot map XLA memory of peer " + std::to_string(peer) +
                                " (bad rank, or this rank's memory was not exported first)");
  }
  if (xla_base_[peer] != nullptr) return;
  xla_base_[peer] = xla_memory::import_fd(device_, fd, size);
  xla_size_[peer] = size;
}

void IntranodeBuffer::adopt_xla_memory(const std::vector<char*>& bases, const std::vector<std::size_t>& sizes) {
  if (static_cast<int>(bases.size()) != num_ranks_ || sizes.size() != bases.size()) {
    throw std::invalid_argument("jax_ep runtime: XLA memory of " + std::to_string(bases.size()) + " ranks for a buffer of " +
                                std::to_string(num_ranks_));
  }
  xla_imported_ = false;
  xla_base_ = bases;
  xla_size_ = sizes;
}

bool IntranodeBuffer::all_xla_mapped() const {
  for (char* p : xla_base_) {
    if (p == nullptr) return false;
  }
  return true;
}

long long IntranodeBuffer::xla_memory_offset(const void* p, std::size_t bytes) const {
  if (!xla_enabled_) return -1;
  const char* c = static_cast<const char*>(p);
  const char* base = xla_base_[rank_];
  if (c < base || c + bytes > base + xla_size_[rank_]) return -1;
  // The peers mapped the allocation probed when the buffer was created: read
  // in place only while p still lies in that very allocation.
  if (!xla_memory::still_holds(xla_memory::Allocation{const_cast<char*>(base), xla_size_[rank_]}, p)) return -1;
  return c - base;
}

bool IntranodeBuffer::ready() const {
  for (char* p : peers_) {
    if (p == nullptr) return false;
  }
  return true;
}

std::size_t IntranodeBuffer::staging_half_bytes() const {
  return workspace::staging_half_bytes(num_bytes_);
}

intranode::PeerTable IntranodeBuffer::peer_table() const {
  intranode::PeerTable t{};
  for (int r = 0; r < num_ranks_; ++r) t.base[r] = peers_[r];
  t.rank = rank_;
  t.num_ranks = num_ranks_;
  t.staging_half_bytes = staging_half_bytes();
  t.timeout_ns = static_cast<unsigned long long>(timeout_s_ * 1e9);
  t.timeout_record = timeout_device_;
  t.gpu_scope = 1;
  for (int r = 0; r < num_ranks_; ++r) {
    if (r != rank_ && !peer_same_gpu_[r]) t.gpu_scope = 0;
  }
  return t;
}

Runtime& Runtime::get() {
  static Runtime* runtime = new Runtime();  // never destroyed: handlers may run at exit
  return *runtime;
}

int Runtime::add(std::unique_ptr<IntranodeBuffer> buffer) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int id = next_id_++;
  buffers_[id] = std::move(buffer);
  return id;
}

int Runtime::create(int device, int rank, int num_ranks, std::size_t num_bytes,
                    double timeout_s) {
  return add(std::make_unique<IntranodeBuffer>(device, rank, num_ranks, num_bytes, timeout_s));
}

int Runtime::create_external(int device, int rank, int num_ranks, std::size_t num_bytes,
                             double timeout_s, char* local, const std::vector<char*>& peers) {
  return add(std::make_unique<IntranodeBuffer>(device, rank, num_ranks, num_bytes, timeout_s, local, peers));
}

int Runtime::create_group(const std::vector<int>& devices, std::size_t num_bytes, double timeout_s) {
  const int n = static_cast<int>(devices.size());
  if (n < 1 || n > intranode::kMaxRanks) {
    throw std::invalid_argument("jax_ep runtime: a group needs 1 to 64 devices, got " + std::to_string(n));
  }
  std::vector<int> ids;
  try {
    for (int r = 0; r < n; ++r) ids.push_back(create(devices[r], r, n, num_bytes, timeout_s));
    for (int r = 0; r < n; ++r) {
      for (int p = 0; p < n; ++p) {
        if (p != r) at(ids[r])->open_peer_local(p, *at(ids[p]));
      }
    }
  } catch (...) {
    for (int id : ids) destroy(id);
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const int id = next_id_++;
  groups_[id] = ids;
  return id;
}

std::vector<int> Runtime::members(int id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = groups_.find(id);
  return it == groups_.end() ? std::vector<int>{} : it->second;
}

void Runtime::share_group_xla_memory(int group_id, const std::vector<std::uintptr_t>& probes) {
  const std::vector<int> ids = members(group_id);
  if (ids.empty()) throw std::invalid_argument("jax_ep runtime: " + std::to_string(group_id) + " is not a buffer group");
  if (probes.size() != ids.size()) {
    throw std::invalid_argument("jax_ep runtime: " + std::to_string(probes.size()) + " XLA buffers for a group of " +
                                std::to_string(ids.size()));
  }
  const int n = static_cast<int>(ids.size());
  std::vector<xla_memory::Allocation> all(n);
  for (int r = 0; r < n; ++r) all[r] = xla_memory::find(at(ids[r])->device(), reinterpret_cast<const void*>(probes[r]));
  for (int r = 0; r < n; ++r) {
    for (int p = 0; p < n; ++p) {
      const int owner = at(ids[r])->device(), reader = at(ids[p])->device();
      if (owner != reader) xla_memory::grant_access(owner, all[r], reader);
    }
  }
  std::vector<char*> bases(n);
  std::vector<std::size_t> sizes(n);
  for (int r = 0; r < n; ++r) {
    bases[r] = all[r].base;
    sizes[r] = all[r].size;
  }
  for (int id : ids) {
    at(id)->adopt_xla_memory(bases, sizes);
    at(id)->enable_xla_memory(true);
  }
}

bool Runtime::xla_memory_enabled(int id) {
  const std::vector<int> ids = members(id);
  if (ids.empty()) return at(id)->xla_memory_enabled();
  for (int member : ids) {
    if (!at(member)->xla_memory_enabled()) return false;
  }
  return true;
}

void Runtime::destroy(int id) {
  // A group: every member's device finishes its work (whose kernels may
  // write any member's memory) before any member's memory is freed.
  const std::vector<int> ids = members(id);
  for (int member : ids) at(member)->close_imports();
  for (int member : ids) destroy(member);
  std::shared_ptr<IntranodeBuffer> buffer;  // freed here, or by the last handler still holding it
  {
    std::lock_guard<std::mutex> lock(mutex_);
    groups_.erase(id);
    auto it = buffers_.find(id);
    if (it == buffers_.end()) return;
    buffer = std::move(it->second);
    buffers_.erase(it);
  }
  // A handler still holding it only launches work and lets go shortly: wait
  // for that, so that the destructor (which synchronizes the device) runs
  // here and never on XLA's thread, in a launch or a CUDA graph capture.
  for (int i = 0; i < 10000 && buffer.use_count() > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

std::shared_ptr<IntranodeBuffer> Runtime::find(int64_t id, int device, int64_t run, std::string* error) {
  std::shared_ptr<IntranodeBuffer> found = find_ready(id, device, error);
  // Outside the lock: reading a record being written may take a moment.
  if (found != nullptr) {
    if (const intranode::TimeoutRecord rec = found->failure(); !found->gate().admit(rec.code != 0, run)) {
      *error = "jax_ep buffer " + std::string(members(static_cast<int>(id)).empty() ? "" : "group ") +
               std::to_string(id) + " failed earlier: " + timeout_message(rec);
      return nullptr;
    }
  }
  return found;
}

std::shared_ptr<IntranodeBuffer> Runtime::find_ready(int64_t id, int device, std::string* error) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto group = groups_.find(static_cast<int>(id));
  if (group != groups_.end()) {
    std::shared_ptr<IntranodeBuffer> found;
    for (int member : group->second) {
      const std::shared_ptr<IntranodeBuffer>& b = buffers_.at(member);
      if (b->device() != device) continue;
      if (found != nullptr) {
        *error = "jax_ep buffer group " + std::to_string(id) + " has several ranks on device " +
                 std::to_string(device) + "; a handler cannot tell them apart";
        return nullptr;
      }
      found = b;
    }
    if (found == nullptr) *error = "jax_ep buffer group " + std::to_string(id) + " has no rank on device " +
                                   std::to_string(device);
    return found;
  }
  auto it = buffers_.find(static_cast<int>(id));
  if (it == buffers_.end()) {
    *error = "jax_ep buffer " + std::to_string(id) +
             " does not exist in this process (destroyed, or created in another process)";
    return nullptr;
  }
  if (!it->second->ready()) {
    *error = "jax_ep buffer " + std::to_string(id) + " has not mapped every peer yet";
    return nullptr;
  }
  return it->second;
}

void group_barrier_selftest(int group_id) {
  Runtime& runtime = Runtime::get();
  const std::vector<int> ids = runtime.members(group_id);
  if (ids.empty()) throw std::invalid_argument("jax_ep runtime: " + std::to_string(group_id) + " is not a group");
  std::vector<cudaStream_t> streams(ids.size());
  for (std::size_t r = 0; r < ids.size(); ++r) {
    const std::shared_ptr<IntranodeBuffer> held = runtime.at(ids[r]);
    IntranodeBuffer& b = *held;
    DeviceGuard guard(b.device());
    check(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking), "cudaStreamCreate");
    check(intranode::launch_barrier(b.peer_table(), 0, streams[r]), "barrier launch");
  }
  for (std::size_t r = 0; r < ids.size(); ++r) {
    const std::shared_ptr<IntranodeBuffer> held = runtime.at(ids[r]);
    IntranodeBuffer& b = *held;
    DeviceGuard guard(b.device());
    check(cudaStreamSynchronize(streams[r]), "barrier of the group self-test");
    cudaStreamDestroy(streams[r]);
    intranode::Signals signals{};
    check(cudaMemcpy(&signals, b.local(), sizeof(signals), cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (std::size_t p = 0; p < ids.size(); ++p) {
      if (signals.arrived[p] < signals.epoch || signals.epoch == 0) {
        throw std::runtime_error("jax_ep runtime: group self-test: rank " + std::to_string(r) +
                                 " did not see rank " + std::to_string(p) + " arrive");
      }
    }
  }
}

std::shared_ptr<IntranodeBuffer> Runtime::find_any(int64_t id, int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto group = groups_.find(static_cast<int>(id));
  if (group != groups_.end()) {
    for (int member : group->second) {
      std::shared_ptr<IntranodeBuffer> b = buffers_.at(member);
      if (b->device() == device) return b;
    }
    return nullptr;
  }
  auto it = buffers_.find(static_cast<int>(id));
  return it == buffers_.end() ? nullptr : it->second;
}

intranode::TimeoutRecord Runtime::failure(int id) {
  const std::vector<int> ids = members(id);
  if (ids.empty()) return at(id)->failure();
  for (int member : ids) {
    const intranode::TimeoutRecord rec = at(member)->failure();
    if (rec.code != 0) return rec;
  }
  return intranode::TimeoutRecord{};
}

std::shared_ptr<IntranodeBuffer> Runtime::at(int id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = buffers_.find(id);
  if (it == buffers_.end()) {
    throw std::invalid_argument("jax_ep runtime: no buffer with id " + std::to_string(id));
  }
  return it->second;
}

}  // namespace jax_ep
