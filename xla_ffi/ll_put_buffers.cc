// The registry of put-path buffers (ll_put_buffers.h).
#include "ll_put_buffers.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unordered_map>

namespace jax_ep {
namespace ll_put {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep put buffer: ") + what + ": " + cudaGetErrorString(err));
  }
}

struct Registry {
  std::mutex mutex;
  int next_id = kFirstPutBufferId;
  std::unordered_map<int, std::shared_ptr<PutBuffer>> buffers;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: handlers may run during interpreter exit
  return *r;
}

}  // namespace

PutBuffer::PutBuffer(int device, int rank, int num_ranks, std::uintptr_t local, std::size_t num_bytes,
                     const std::vector<std::uintptr_t>& mapped, const std::vector<int>& paths, double timeout_s)
    : device_(device), num_bytes_(num_bytes), timeout_s_(timeout_s) {
  if (num_ranks < 1 || num_ranks > transport::kMaxPeers) {
    throw std::runtime_error("jax_ep put buffer: num_ranks must be in [1, " + std::to_string(transport::kMaxPeers) +
                             "], got " + std::to_string(num_ranks));
  }
  if (rank < 0 || rank >= num_ranks) throw std::runtime_error("jax_ep put buffer: rank outside [0, num_ranks)");
  if (static_cast<int>(mapped.size()) != num_ranks || static_cast<int>(paths.size()) != num_ranks) {
    throw std::runtime_error("jax_ep put buffer: one mapped pointer and one path per rank are needed");
  }
  if (local == 0) throw std::runtime_error("jax_ep put buffer: no local copy");
  peers_.local = reinterpret_cast<char*>(local);
  peers_.rank = rank;
  peers_.num_ranks = num_ranks;
  for (int r = 0; r < num_ranks; ++r) {
    if (paths[r] != 0 && paths[r] != 1) throw std::runtime_error("jax_ep put buffer: a path is 0 (pointer) or 1 (put)");
    const bool pointer = paths[r] == 0;
    if (pointer && mapped[r] == 0) {
      throw std::runtime_error("jax_ep put buffer: rank " + std::to_string(r) +
                               " has the pointer path but no mapped copy (nvshmem_ptr gave none)");
    }
    peers_.path[r] = pointer ? transport::PeerPath::kPointer : transport::PeerPath::kPut;
    peers_.mapped[r] = pointer ? reinterpret_cast<char*>(mapped[r]) : nullptr;
  }
  check(cudaSetDevice(device), "cudaSetDevice");
  check(cudaHostAlloc(reinterpret_cast<void**>(&record_host_), sizeof(intranode::TimeoutRecord), cudaHostAllocMapped),
        "cudaHostAlloc of the failure record");
  std::memset(record_host_, 0, sizeof(intranode::TimeoutRecord));
  check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&record_device_), record_host_, 0),
        "cudaHostGetDevicePointer of the failure record");
}

PutBuffer::~PutBuffer() {
  if (record_host_ != nullptr) cudaFreeHost(record_host_);
}

Args PutBuffer::args(const Shape& shape, const bool* rank_mask) const {
  Args a{};
  a.peers = peers_;
  a.shape = shape;
  a.timeout_ns = static_cast<unsigned long long>(timeout_s_ * 1e9);
  a.record = record_device_;
  a.rank_mask = rank_mask;
  return a;
}

intranode::TimeoutRecord PutBuffer::failure() const {
  intranode::TimeoutRecord rec{};
  for (int tries = 0; tries < 100; ++tries) {
    const int code = reinterpret_cast<volatile intranode::TimeoutRecord*>(record_host_)->code;
    if (code >= 0) {
      std::atomic_thread_fence(std::memory_order_acquire);
      std::memcpy(&rec, record_host_, sizeof(rec));
      rec.code = code;
      return rec;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  rec.code = -1;
  return rec;
}

int create_put_buffer(int device, int rank, int num_ranks, std::uintptr_t local, std::size_t num_bytes,
                      const std::vector<std::uintptr_t>& mapped, const std::vector<int>& paths, double timeout_s) {
  auto buffer = std::make_shared<PutBuffer>(device, rank, num_ranks, local, num_bytes, mapped, paths, timeout_s);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const int id = r.next_id++;
  r.buffers[id] = std::move(buffer);
  return id;
}

void destroy_put_buffer(int id) {
  std::shared_ptr<PutBuffer> gone;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.buffers.find(id);
    if (it == r.buffers.end()) return;
    gone = std::move(it->second);
    r.buffers.erase(it);
  }
  // This rank's kernels on the buffer finish before its symmetric memory is
  // freed (the caller frees it next, collectively), and before the failure
  // record (freed with `gone`, after this) is unmapped.
  if (cudaSetDevice(gone->device()) == cudaSuccess) cudaDeviceSynchronize();
  cudaGetLastError();
}

std::shared_ptr<PutBuffer> find_put_buffer(int64_t id, int device, std::string* error) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.buffers.find(static_cast<int>(id));
  if (it == r.buffers.end()) {
    *error = "no live jax_ep put-path buffer " + std::to_string(id) + " (destroyed, or created in another process?)";
    return nullptr;
  }
  if (it->second->device() != device) {
    *error = "put-path buffer " + std::to_string(id) + " lives on device " + std::to_string(it->second->device()) +
             ", the call runs on device " + std::to_string(device);
    return nullptr;
  }
  return it->second;
}

std::shared_ptr<PutBuffer> find_live_put_buffer(int64_t id, int device, int64_t run, const char* kind,
                                                std::string* error) {
  std::shared_ptr<PutBuffer> buf = find_put_buffer(id, device, error);
  if (buf == nullptr) return nullptr;
  // Outside the registry's lock: reading a record being written may take a moment.
  const intranode::TimeoutRecord rec = buf->failure();
  if (buf->gate().admit(rec.code != 0, run)) return buf;
  *error = "jax_ep " + std::string(kind) + " buffer " + std::to_string(id) + " failed earlier (" +
           std::string(intranode::op_name(rec.op)) + ", failure code " + std::to_string(rec.code) +
           ", rank at fault " + std::to_string(rec.peer) +
           "; Buffer.check() raises the whole message): destroy it and create a new one";
  return nullptr;
}

intranode::TimeoutRecord put_buffer_failure(int id) {
  std::shared_ptr<PutBuffer> buf;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.buffers.find(id);
    if (it == r.buffers.end()) return intranode::TimeoutRecord{};
    buf = it->second;
  }
  return buf->failure();  // may wait for a record being written: outside the lock
}

}  // namespace ll_put
}  // namespace jax_ep
