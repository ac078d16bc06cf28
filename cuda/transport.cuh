// The device-side transport seam: how a kernel writes a row, or adds to a
// signal word, in a peer's copy of a symmetric buffer. Each peer has a path,
// chosen at buffer creation (jax_ep/topology.py builds the table):
//
//   kPointer  the peer's memory is mapped here (itself, NVLink / PCIe peer
//             mapping, CUDA IPC): plain 16-byte stores, then a system-scope
//             release add on the signal word;
//   kPut      any other peer (another node, real or virtual): NVSHMEM device
//             puts, nvshmemx_putmem_signal_nbi_warp with NVSHMEM_SIGNAL_ADD,
//             so the signal lands after the row's data. Needs NVSHMEM device
//             code (JAX_EP_WITH_NVSHMEM; the jax_ep._nvshmem module) and a
//             source in symmetric memory.
//
// Signal words count arrivals. A sender adds 1 per row (after its data) and,
// once, signal_final_value(count) in any order with the rows; the word then
// reads signal_done only when the final add and every one of the `count`
// rows arrived, and signal_count gives count. No fence or quiet is needed
// between rows and the final add, so a send only issues puts and returns
// (IBGDA and the proxy transports order nothing between separate puts without
// one). The reader sets the word back to 0 before it can be written again
// (tests/protocol/ll_put_model.py models the protocol).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "intranode.cuh"

#if defined(JAX_EP_WITH_NVSHMEM) && defined(__CUDACC__)
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jax_ep {
namespace transport {

// How a rank reaches a peer; the codes of jax_ep.topology.PATH_POINTER / PATH_PUT.
enum class PeerPath : std::uint8_t { kPointer = 0, kPut = 1 };

inline constexpr int kMaxPeers = intranode::kMaxRanks;

// What a kernel needs to reach every peer of one symmetric buffer.
struct Peers {
  char* local;               // this rank's copy (the symmetric address NVSHMEM puts name)
  char* mapped[kMaxPeers];   // pointer peers: their copy in this address space; put peers: nullptr
  PeerPath path[kMaxPeers];
  int rank;
  int num_ranks;
};

// Signal words (uint64 in the receiver's copy).
inline constexpr unsigned long long kSignalDone = 1ull << 63;

// The final add of a sender that sent `count` rows (each adding 1): the word
// becomes kSignalDone | count << 32 once all have arrived, and not before
// (low 32 bits stay non-zero while rows are missing; bit 63 is clear until
// the final add lands). count < 2^31.
__host__ __device__ constexpr unsigned long long signal_final_value(unsigned int count) {
  return kSignalDone + (static_cast<unsigned long long>(count) << 32) - count;
}
__host__ __device__ constexpr bool signal_done(unsigned long long word) {
  return (word & kSignalDone) != 0 && (word & 0xffffffffull) == 0;
}
__host__ __device__ constexpr unsigned int signal_count(unsigned long long word) {
  return static_cast<unsigned int>((word >> 32) & 0x7fffffffull);
}
static_assert(signal_done(signal_final_value(0)) && signal_count(signal_final_value(0)) == 0);
static_assert(signal_done(signal_final_value(5) + 5) && signal_count(signal_final_value(5) + 5) == 5);
static_assert(!signal_done(signal_final_value(5) + 4) && !signal_done(5));

#ifdef __CUDACC__

// Every user of the device half (the put kernels) is built into the
// jax_ep._nvshmem module, which defines JAX_EP_WITH_NVSHMEM: a put peer can
// only be reached with NVSHMEM device code, so a build without it is refused
// here rather than trapping at run time.
#ifndef JAX_EP_WITH_NVSHMEM
#error "cuda/transport.cuh's device code needs NVSHMEM (JAX_EP_WITH_NVSHMEM): build it into jax_ep._nvshmem"
#endif

__device__ __forceinline__ void red_add_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// How the signal word of a put changes once its data is there: an add
// (arrival counts), or a set (words that only grow, such as
// internode_ring.cuh's chunk flags, where a set that arrives late is an
// older value).
enum class SignalOp { kAdd, kSet };

// A warp writes `bytes` (a multiple of 16) from `src` to `offset` of `peer`'s
// copy, then adds `value` to (or sets it in) the signal word at
// `signal_offset` of that copy, after the data. Every lane calls it with the
// same arguments. Put peers: `src` must lie in this rank's symmetric buffer
// (registered with the NIC), and must not change until the row has been
// delivered.
template <SignalOp kOp = SignalOp::kAdd>
__device__ __forceinline__ void warp_put_signal(const Peers& p, int peer, std::size_t offset, const void* src,
                                                std::size_t bytes, std::size_t signal_offset,
                                                unsigned long long value, int lane) {
  if (p.path[peer] == PeerPath::kPointer) {
    auto* to = reinterpret_cast<int4*>(p.mapped[peer] + offset);
    const auto* from = reinterpret_cast<const int4*>(src);
    for (std::size_t v = lane; v < bytes / 16; v += 32) to[v] = from[v];
    __threadfence_system();  // each lane's stores, before the warp's release
    __syncwarp();
    if (lane == 0) {
      auto* word = reinterpret_cast<unsigned long long*>(p.mapped[peer] + signal_offset);
      if constexpr (kOp == SignalOp::kSet) {
        st_release_sys(word, value);
      } else {
        red_add_release_sys(word, value);
      }
    }
    return;
  }
  nvshmemx_putmem_signal_nbi_warp(p.local + offset, src, bytes,
                                  reinterpret_cast<std::uint64_t*>(p.local + signal_offset), value,
                                  kOp == SignalOp::kSet ? NVSHMEM_SIGNAL_SET : NVSHMEM_SIGNAL_ADD, peer);
}

// One thread's warp_put_signal: `bytes` (a multiple of 16, a few of them)
// from `src` to `offset` of `peer`'s copy, then `add` on the signal word.
__device__ __forceinline__ void thread_put_signal(const Peers& p, int peer, std::size_t offset, const void* src,
                                                  std::size_t bytes, std::size_t signal_offset,
                                                  unsigned long long add) {
  if (p.path[peer] == PeerPath::kPointer) {
    auto* to = reinterpret_cast<int4*>(p.mapped[peer] + offset);
    const auto* from = reinterpret_cast<const int4*>(src);
    for (std::size_t v = 0; v < bytes / 16; ++v) to[v] = from[v];
    __threadfence_system();
    red_add_release_sys(reinterpret_cast<unsigned long long*>(p.mapped[peer] + signal_offset), add);
    return;
  }
  nvshmem_putmem_signal_nbi(p.local + offset, src, bytes, reinterpret_cast<std::uint64_t*>(p.local + signal_offset),
                            add, NVSHMEM_SIGNAL_ADD, peer);
}

// One thread adds `value` to the signal word at `signal_offset` of `peer`'s
// copy, unordered with this rank's earlier rows (arrival counting does not
// need an order).
__device__ __forceinline__ void signal_add(const Peers& p, int peer, std::size_t signal_offset,
                                           unsigned long long value) {
  if (p.path[peer] == PeerPath::kPointer) {
    red_add_release_sys(reinterpret_cast<unsigned long long*>(p.mapped[peer] + signal_offset), value);
    return;
  }
  nvshmemx_signal_op(reinterpret_cast<std::uint64_t*>(p.local + signal_offset), value, NVSHMEM_SIGNAL_ADD, peer);
}

// One thread sets the word at `offset` of `peer`'s copy to `value` (nonzero)
// unless it is already nonzero there: the abort word. Pointer peers (and this
// rank): a check, then a volatile store (the first failure is what each
// keeps). Put peers: an NVSHMEM signal set, which does not read the remote
// word (a fetching atomic would wait for a peer that may be gone), so of two
// ranks failing at once the later set wins there; either names a rank that
// failed.
__device__ __forceinline__ void signal_set(const Peers& p, int peer, std::size_t offset, unsigned long long value) {
  if (p.path[peer] == PeerPath::kPointer) {
    auto* w = reinterpret_cast<volatile unsigned long long*>(p.mapped[peer] + offset);
    if (*w == 0) *w = value;
    return;
  }
  nvshmemx_signal_op(reinterpret_cast<std::uint64_t*>(p.local + offset), value, NVSHMEM_SIGNAL_SET, peer);
}

#endif  // __CUDACC__

}  // namespace transport
}  // namespace jax_ep
