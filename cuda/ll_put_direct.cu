// Direct calls of the put kernels (ll_put.cuh) from the host, outside XLA:
// copy the inputs to the GPU, run one dispatch (or combine) on a symmetric
// buffer, copy the outputs back. For GPU tests of the kernels before an FFI
// handler calls them (tests/gpu/multirank_ll_put_direct.py, through ctypes on
// the jax_ep._nvshmem module, whose device code NVSHMEM registered).
//
// Every entry point returns 0, or a CUDA error code. All ranks must make the
// same calls in the same order (they are collective, like the FFI calls).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "ll_put.cuh"

namespace jax_ep {
namespace ll_put {
namespace {

struct Device {
  std::vector<void*> blocks;
  cudaError_t err = cudaSuccess;
  void* alloc(std::size_t bytes) {
    void* p = nullptr;
    if (err == cudaSuccess) err = cudaMalloc(&p, bytes > 0 ? bytes : 16);
    if (err == cudaSuccess) blocks.push_back(p);
    return p;
  }
  void* upload(const void* host, std::size_t bytes) {
    void* p = alloc(bytes);
    if (err == cudaSuccess && bytes > 0) err = cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    return p;
  }
  void download(void* host, const void* dev, std::size_t bytes) {
    if (err == cudaSuccess && bytes > 0) err = cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost);
  }
  // A zeroed failure record in device memory.
  intranode::TimeoutRecord* record() {
    auto* r = static_cast<intranode::TimeoutRecord*>(alloc(sizeof(intranode::TimeoutRecord)));
    if (err == cudaSuccess) err = cudaMemset(r, 0, sizeof(intranode::TimeoutRecord));
    return r;
  }
  // *out = 0, or 1 + the rank at fault (the peer waited for, or the rank that raised the abort).
  void download_status(int* out, const intranode::TimeoutRecord* r) {
    intranode::TimeoutRecord host{};
    download(&host, r, sizeof(host));
    *out = host.code == 0 ? 0 : 1 + host.peer;
  }
  ~Device() {
    for (void* p : blocks) cudaFree(p);
  }
};

// shape: {T, M, K, E, H, payload}; mapped: per peer, its copy here (0 for put
// peers); paths: per peer, 0 pointer / 1 put.
Args make_args(void* local, const std::uint64_t* mapped, const std::uint8_t* paths, int rank, int num_ranks,
               const int* shape, double timeout_s, intranode::TimeoutRecord* record) {
  Args a{};
  a.peers.local = static_cast<char*>(local);
  for (int r = 0; r < num_ranks && r < transport::kMaxPeers; ++r) {
    a.peers.mapped[r] = reinterpret_cast<char*>(static_cast<std::uintptr_t>(mapped[r]));
    a.peers.path[r] = static_cast<transport::PeerPath>(paths[r]);
  }
  a.peers.rank = rank;
  a.peers.num_ranks = num_ranks;
  a.shape = Shape{shape[0], shape[1], shape[2], shape[3], shape[4], static_cast<Payload>(shape[5])};
  a.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  a.record = record;
  return a;
}

}  // namespace
}  // namespace ll_put
}  // namespace jax_ep

namespace lp = jax_ep::ll_put;

extern "C" {

__attribute__((visibility("default"))) std::uint64_t jax_ep_ll_put_buffer_bytes(const int* shape, int num_ranks) {
  const lp::Shape s{shape[0], shape[1], shape[2], shape[3], shape[4], static_cast<lp::Payload>(shape[5])};
  return lp::supported(s, num_ranks) ? lp::buffer_bytes(s, num_ranks) : 0;
}

// x [T, H] bf16 (as uint16), topk_idx [T, K]; outputs sized as launch_dispatch_recv's.
__attribute__((visibility("default"))) int jax_ep_ll_put_dispatch(
    void* local, const std::uint64_t* mapped, const std::uint8_t* paths, int rank, int num_ranks, const int* shape,
    double timeout_s, int num_blocks, const void* x, const int* topk_idx, void* recv_x, std::uint64_t recv_x_bytes,
    void* recv_scales, std::uint64_t recv_scales_bytes, int* recv_count, int* src_rank, int* src_token, int* src_slot,
    int* status_out) {
  lp::Device d;
  jax_ep::intranode::TimeoutRecord* record = d.record();
  const lp::Args a = lp::make_args(local, mapped, paths, rank, num_ranks, shape, timeout_s, record);
  const lp::Shape& s = a.shape;
  const std::size_t le = s.local_experts(num_ranks), rows = le * num_ranks * s.max_tokens;
  const void* dx = d.upload(x, static_cast<std::size_t>(s.num_tokens) * s.hidden * 2);
  const int* di = static_cast<const int*>(d.upload(topk_idx, static_cast<std::size_t>(s.num_tokens) * s.num_topk * 4));
  void* drx = d.alloc(recv_x_bytes);
  void* drs = d.alloc(recv_scales_bytes);
  int* dc = static_cast<int*>(d.alloc(le * 4));
  int* dr = static_cast<int*>(d.alloc(rows * 4));
  int* dt = static_cast<int*>(d.alloc(rows * 4));
  int* dsl = static_cast<int*>(d.alloc(rows * 4));
  if (d.err == cudaSuccess) d.err = lp::launch_dispatch_send(a, dx, di, num_blocks, nullptr);
  if (d.err == cudaSuccess) d.err = lp::launch_dispatch_recv(a, drx, drs, dc, dr, dt, dsl, num_blocks, nullptr);
  if (d.err == cudaSuccess) d.err = cudaDeviceSynchronize();
  d.download(recv_x, drx, recv_x_bytes);
  d.download(recv_scales, drs, recv_scales_bytes);
  d.download(recv_count, dc, le * 4);
  d.download(src_rank, dr, rows * 4);
  d.download(src_token, dt, rows * 4);
  d.download(src_slot, dsl, rows * 4);
  d.download_status(status_out, record);
  return static_cast<int>(d.err);
}

// y [E/R, R*M, H] bf16 with the dispatch's handle; out [T, H] bf16.
__attribute__((visibility("default"))) int jax_ep_ll_put_combine(
    void* local, const std::uint64_t* mapped, const std::uint8_t* paths, int rank, int num_ranks, const int* shape,
    double timeout_s, int num_blocks, const void* y, const int* src_rank, const int* src_token, const int* src_slot,
    const int* topk_idx, const float* topk_weights, void* out, int* status_out) {
  lp::Device d;
  jax_ep::intranode::TimeoutRecord* record = d.record();
  const lp::Args a = lp::make_args(local, mapped, paths, rank, num_ranks, shape, timeout_s, record);
  const lp::Shape& s = a.shape;
  const std::size_t le = s.local_experts(num_ranks), rows = le * num_ranks * s.max_tokens;
  const std::size_t tk = static_cast<std::size_t>(s.num_tokens) * s.num_topk;
  const void* dy = d.upload(y, rows * s.hidden * 2);
  const int* dr = static_cast<const int*>(d.upload(src_rank, rows * 4));
  const int* dt = static_cast<const int*>(d.upload(src_token, rows * 4));
  const int* dsl = static_cast<const int*>(d.upload(src_slot, rows * 4));
  const int* di = static_cast<const int*>(d.upload(topk_idx, tk * 4));
  const float* dw = static_cast<const float*>(d.upload(topk_weights, tk * 4));
  void* dout = d.alloc(static_cast<std::size_t>(s.num_tokens) * s.hidden * 2);
  if (d.err == cudaSuccess) d.err = lp::launch_combine_send(a, dy, dr, dt, dsl, num_blocks, nullptr);
  if (d.err == cudaSuccess) d.err = lp::launch_combine_recv(a, di, dw, dout, num_blocks, nullptr);
  if (d.err == cudaSuccess) d.err = cudaDeviceSynchronize();
  d.download(out, dout, static_cast<std::size_t>(s.num_tokens) * s.hidden * 2);
  d.download_status(status_out, record);
  return static_cast<int>(d.err);
}

}  // extern "C"
