// Device helpers of every low-latency kernel (dispatch push and pull,
// combine): kernel shape, the per-buffer call counters and their order
// checks, the start of a send, waiting for a call's word, the last block of a
// grid, and the row-copy and scan building blocks. See low_latency.cuh for
// the protocol.
//
// Everything here has internal linkage (an anonymous namespace): each kernel
// file (low_latency_dispatch.cu, low_latency_pull.cu, low_latency_combine.cu)
// compiles its own copy, as when they were one file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fp8.cuh"
#include "low_latency.cuh"
#include "serial.cuh"
#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

using intranode::Signals;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Call counters live in the signal block's spare words.
constexpr int kDispatchCounterPad = 0, kCombineCounterPad = 1;
__device__ __forceinline__ unsigned long long* dispatch_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[kDispatchCounterPad];
}
__device__ __forceinline__ unsigned long long* combine_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[kCombineCounterPad];
}
// Finished-block counters, one per kernel kind (0 dispatch send, 1 combine
// send, 2 dispatch receive, 3 combine receive): a send on the send stream may
// run beside a call of the other kind on XLA's stream.
__device__ __forceinline__ unsigned int* blocks_done(const PeerTable& p, int which) {
  return reinterpret_cast<unsigned int*>(&reinterpret_cast<Signals*>(p.base[p.rank])->pad[2 + which]);
}

// The last call whose send this rank issued, per kind (0 dispatch, 1 combine):
// a send finding its own call number there follows an unreceived send; a
// receive finding another one has no send.
constexpr std::size_t kSentMarkOffset = intranode::kSignalBytes + workspace::kSentMarks;
__device__ __forceinline__ unsigned long long* sent_mark(const PeerTable& p, int which) {
  return reinterpret_cast<unsigned long long*>(p.base[p.rank] + kSentMarkOffset) + which;
}

// Called by one thread at the start of a send (`is_send`) or a receive;
// false (recorded, abort raised) when the calls are out of order.
__device__ __forceinline__ bool check_order(const PeerTable& p, int which, unsigned long long call, bool is_send) {
  unsigned long long* mark = sent_mark(p, which);
  const unsigned long long last = ld_volatile(mark);
  if (is_send ? last == call : last != call) {
    intranode::fail(p, intranode::kFailOrder, is_send ? 0 : 1, 3 + which, call, last);
    return false;
  }
  if (is_send) *mark = call;
  return true;
}

// Signature kind of low-latency dispatch (0) or combine (1) calls.
__device__ __forceinline__ int sig_kind(int which) { return 1 + which; }

// Block 0 of a send, at its start: this rank's signature of the call to
// every peer (its fields in its own header), ordered before the flags the
// last block raises by the same fences as the messages.
__device__ __forceinline__ void publish_call(const PeerTable& p, int which, unsigned long long call) {
  if (blockIdx.x == 0 && threadIdx.x < p.num_ranks) {
    intranode::publish_signature(p, sig_kind(which), call, threadIdx.x, threadIdx.x == 0);
  }
}

using intranode::skipped;  // ranks this call neither writes to nor waits for

__device__ __forceinline__ char* half_of(const PeerTable& p, int rank, unsigned long long call) {
  return intranode::staging_half(p.base[rank], static_cast<int>(call & 1ull), p.staging_half_bytes);
}

// Entry of a send kernel (every thread): false when the buffer is dead or
// (block 0) this send is out of order; the block then returns as a whole.
// Other blocks of an out-of-order send may already be writing.
__device__ __forceinline__ bool start_send(const PeerTable& p, int which, unsigned long long call, int* token) {
  __shared__ int stop;
  if (threadIdx.x == 0) {
    stop = intranode::aborted(p) || (blockIdx.x == 0 && !check_order(p, which, call, true));
    if (!stop && blockIdx.x == 0 && token != nullptr) *token = 0;
  }
  __syncthreads();
  if (stop) return false;
  publish_call(p, which, call);
  return true;
}

// Spin until *slot holds a word of call `call` (serial.cuh: a slot holds
// this call's word or an older one), leaving the word in *value; false when
// the wait failed (a timeout or a peer's abort: recorded, abort raised).
__device__ bool wait_call(const PeerTable& p, const unsigned long long* slot, unsigned long long call, int peer,
                          int op, unsigned long long* value) {
  unsigned long long v = 0;
  auto ready = [&] {
    v = ld_acquire_sys(slot);
    return word_in_call(v, call);
  };
  const WaitOutcome w = wait_until(ready, &reinterpret_cast<const Signals*>(p.base[p.rank])->abort, p.timeout_ns);
  *value = v;
  return !intranode::wait_failed(p, w, peer, op, call, call_near(word_serial(v), call));
}

// True in every thread of the block that finished last; that block resets
// the counter. kPublish: fence this block's writes at system scope first (a
// send whose last block then publishes them to peers).
template <bool kPublish>
__device__ __forceinline__ bool last_block_done(const PeerTable& p, int which) {
  __shared__ bool last;
  if (kPublish) __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(blocks_done(p, which), 1u) + 1 == gridDim.x;
    if (last) *blocks_done(p, which) = 0;
  }
  __syncthreads();
  return last;
}

// Ends a receive (its last block): the next send of this kind is the next
// call. True in every thread of that last block.
__device__ __forceinline__ bool advance(const PeerTable& p, int which) {
  unsigned long long* c = which == 0 ? dispatch_counter(p) : combine_counter(p);
  const bool last = last_block_done<false>(p, 2 + which);
  if (last && threadIdx.x == 0) *reinterpret_cast<volatile unsigned long long*>(c) = *c + 1;
  return last;
}

// A warp copies n 16-byte vectors of memory that does not change while the
// kernel runs, kUnroll loads in flight per lane (a row copy is latency-bound).
// kStream: streaming stores, for output rows (kept out of L2's way).
template <bool kStream = false>
__device__ __forceinline__ void warp_copy(const int4* from, int4* to, int n, int lane) {
  constexpr int kUnroll = 8;
  for (int v0 = lane; v0 < n; v0 += 32 * kUnroll) {
    int4 value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + 32 * u < n) value[u] = ld_nc_v4(from + v0 + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + 32 * u >= n) continue;
      if constexpr (kStream) st_cs_v4(to + v0 + 32 * u, value[u]);
      else to[v0 + 32 * u] = value[u];
    }
  }
}

// The largest i < n with a[i] <= x (a ascending, a[0] <= x).
__device__ __forceinline__ int last_at_or_below(const int* a, int n, int x) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (a[mid] <= x) lo = mid;
    else hi = mid;
  }
  return lo;
}

// On entry first[e + 1] holds local expert e's row count; afterwards first[e]
// is the rows of the experts before e (first[le]: all of them). Warp 0
// scans, a chunk of experts per lane. Ends at a barrier.
__device__ __forceinline__ void scan_expert_counts(int* first, int le) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, chunk = (le + 31) / 32, lo = min(le, lane * chunk), hi = min(le, lo + chunk);
    int mine = 0;
    for (int e = lo; e < hi; ++e) mine += first[e + 1];
    int before = mine;  // inclusive scan across the lanes
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(kFullWarpMask, before, off);
      if (lane >= off) before += v;
    }
    before -= mine;
    for (int e = lo; e < hi; ++e) {
      before += first[e + 1];
      first[e + 1] = before;
    }
    if (lane == 0) first[0] = 0;
  }
  __syncthreads();
}

// Kernels that never wait may take more blocks than the budget of waiting ones.
inline int copy_blocks_for(int num_blocks, long long items) {
  return static_cast<int>(std::max<long long>(1, std::min<long long>(4ll * num_blocks, items)));
}

}  // namespace
}  // namespace low_latency
}  // namespace jax_ep
