// The ring words of internode normal mode (internode.cuh's RingWords) and
// what the pipeline kernels do with them (docs/internode.md, "Rings and flow
// control"; tests/protocol/internode_ring.py models them):
//
//   chunk flag  set by the put of an RDMA chunk, in the receiving rank, to
//               tag(call, k + 1) for chunk k (a put-with-signal: the flag
//               lands after the chunk's rows);
//   head        a reader's position in a ring (tag(call, rows passed)),
//               stored into the writer's memory on whole chunks or at the
//               stream's end;
//   credit      RDMA credits: cumulative over every call of the half, signal
//               adds of whole chunks; this call's credit is word - base, and
//               the base advances by the stream's length at the end of the
//               call, so a credit of an older call that lands late only
//               makes this one look smaller.
//
// A tag carries the call number (mod 2^32, compared for equality: no wrap),
// so a word left by an older call of the half reads as nothing yet; no word
// is ever reset.
#pragma once

#include <climits>

#include "internode.cuh"

#ifdef __CUDACC__
namespace jax_ep {
namespace internode {
namespace ring {

__host__ __device__ constexpr unsigned long long tag(unsigned long long call, unsigned long long value) {
  return ((call + 1ull) << 32) | value;
}
// The value of a tagged word written in `call`, 0 for an older call.
__device__ __forceinline__ unsigned tagged_value(unsigned long long word, unsigned long long call) {
  return (word >> 32) == ((call + 1ull) & 0xffffffffull) ? static_cast<unsigned>(word & 0xffffffffull) : 0u;
}

// The ring words of half `h` at `base` (this rank's copy, or a node peer's mapped copy).
__device__ __forceinline__ RingWords* words(char* base, int h) {
  return reinterpret_cast<RingWords*>(base + ring_words_offset(h));
}
// Symmetric offsets (for puts and signal ops).
__device__ __forceinline__ std::size_t flag_offset(int h, int c, int n, int slot) {
  return ring_words_offset(h) + offsetof(RingWords, flag) + ((static_cast<std::size_t>(c) * kMaxRanks + n) *
                                                                 kMaxRingChunks + slot) * 8;
}
__device__ __forceinline__ std::size_t credit_offset(int h, int c, int n) {
  return ring_words_offset(h) + offsetof(RingWords, credit) + (static_cast<std::size_t>(c) * kMaxRanks + n) * 8;
}

// Rows of chunk k of a stream of `len` rows.
__device__ __forceinline__ int chunk_rows(const Shape& s, int len, int k) {
  return min(s.rdma_chunk, len - k * s.rdma_chunk);
}
__device__ __forceinline__ int num_chunks(const Shape& s, int len) { return (len + s.rdma_chunk - 1) / s.rdma_chunk; }

// A warp's loop that polls several things: each round calls
// `go_on(progressed)` (lane-uniform), which is false, recorded naming
// `peer` (lane 0's), after timeout_ns without progress or once the abort
// word is raised.
struct PollClock {
  unsigned long long since;
  __device__ __forceinline__ PollClock() : since(global_timer_ns()) {}
  __device__ __forceinline__ bool go_on(const Args& a, bool progressed, int peer, int op, unsigned long long call) {
    WaitOutcome o = kWaitReady;
    if (progressed) {
      since = global_timer_ns();
    } else if (ld_volatile(&reinterpret_cast<ll_put::Control*>(a.put.peers.local)->abort) != 0) {
      o = kWaitAborted;
    } else if (global_timer_ns() - since > a.put.timeout_ns) {
      o = kWaitTimeout;
    }
    o = static_cast<WaitOutcome>(__shfl_sync(kFullWarpMask, static_cast<int>(o), 0));
    if (o == kWaitReady) return true;
    if (threadIdx.x % 32 == 0) detail::wait_failed(a, o, peer, op, call + 1);
    return false;
  }
};

// A warp waits until `ready()` holds, polled by lane 0 alone (an acquire in
// every lane would invalidate the SM's L1 32 times per poll); the warp
// barrier after it orders the other lanes' later reads after lane 0's
// acquire. False (recorded) on a timeout or an abort, naming `peer`.
template <typename Ready>
__device__ __forceinline__ bool warp_wait(const Args& a, Ready ready, int peer, int op, unsigned long long call) {
  const bool lane0 = (threadIdx.x % 32) == 0;
  const WaitOutcome w = wait_until(
      [&] {
        bool v = false;
        if (lane0) v = ready();
        return __shfl_sync(kFullWarpMask, v, 0);
      },
      &reinterpret_cast<ll_put::Control*>(a.put.peers.local)->abort, a.put.timeout_ns,
      [](bool b) { return __shfl_sync(kFullWarpMask, b, 0); });
  __syncwarp();
  if (w == kWaitReady) return true;
  if (lane0) detail::wait_failed(a, w, peer, op, call + 1);
  return false;
}

// This call's RDMA credit of stream (c, n) in this rank: credits returned for
// it so far (the word minus the base read at the kernel's start).
__device__ __forceinline__ long long credit(const RingWords* w, int c, int n, unsigned long long base) {
  return static_cast<long long>(ld_acquire_sys(&w->credit[c][n]) - base);
}

// This rank's streams of channel c as a source (the tokens it sends to
// node m: consecutive rows of that node's table, rdma_slot): r0[m] and
// len[m], and the base of each credit word (dispatch: its own credits;
// combine: the same streams as the receiving end). Every thread of the
// block calls it. False in every thread (recorded, kFailBadHandle) when a
// stream's rows are not one row per token without gaps: the chunk counts
// would not return to 0 and would corrupt the next call of the half.
__device__ __forceinline__ bool source_streams(const Args& a, const int* rdma_slot, int c, const RingWords* w, int* r0,
                                               int* len, unsigned long long* base, int op) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, Cn = s.node_capacity, T = s.num_tokens;
  const int t0 = min(c * s.channel_tokens(), T), t1 = min(t0 + s.channel_tokens(), T);
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  for (int m = threadIdx.x; m < N; m += blockDim.x) {
    r0[m] = INT_MAX;
    len[m] = 0;   // the end row until the fix-up below
    base[m] = 0;  // the rows until the fix-up below
  }
  __syncthreads();
  for (int v = threadIdx.x; v < (t1 - t0) * N; v += blockDim.x) {
    const int m = v % N, row = rdma_slot[static_cast<std::size_t>(t0) * N + v];
    if (row < 0 || row >= Cn) continue;
    atomicMin(&r0[m], row);
    atomicMax(&len[m], row + 1);
    atomicAdd(&base[m], 1ull);
  }
  __syncthreads();
  for (int m = threadIdx.x; m < N; m += blockDim.x) {
    len[m] = max(len[m] - r0[m], 0);
    if (base[m] != static_cast<unsigned long long>(len[m])) {
      ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, op, static_cast<unsigned long long>(t0), m);
      bad = 1;
    }
    base[m] = w->base[c][m];  // this rank's own word (a combine's receivers read it and do not use it)
  }
  __syncthreads();
  return bad == 0;
}

// The RDMA coordinator (one warp) of the streams this rank sends (dispatch:
// as a source, to each node; combine: as a forwarder, to each source node):
// each chunk of the send ring (c, m), in order, once all its rows are
// written (`filled`): reset the count, put the chunk into the same slots of
// the receive ring (c, this node) of rank (m, this rail), with its flag (own
// node: the rows are already in the receive ring; only the flag). At the
// end, the credit bases of the next call of this half.
__device__ __forceinline__ void rdma_coordinator(const Args& a, const Layout& l, unsigned long long call, int c,
                                                 const int* len, const unsigned long long* base, int op) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, me = a.put.peers.rank, n_me = me / L, lane = threadIdx.x % 32;
  const int h = static_cast<int>(call & 1ull);
  char* half = detail::my_half(a, l, call);
  RingWords* w = words(a.put.peers.local, h);
  const std::size_t half_off = kHeaderBytes + static_cast<std::size_t>(h) * l.half_bytes;
  __shared__ int next[kMaxRanks];
  for (int m = lane; m < N; m += 32) next[m] = 0;
  __syncwarp();
  PollClock clock;
  for (;;) {
    bool pending = false, progressed = false;
    int waiting_on = -1;
    for (int m = 0; m < N; ++m) {
      const int k = next[m];
      if (k >= num_chunks(s, len[m])) continue;
      pending = true;
      const int rows = chunk_rows(s, len[m], k), slot = k % s.ring_chunks();
      int* count = &w->filled[c][m][slot];
      const bool full = __shfl_sync(kFullWarpMask, lane == 0 && *reinterpret_cast<volatile int*>(count) == rows, 0);
      if (!full) {
        if (waiting_on < 0) waiting_on = m;
        continue;
      }
      // The slot's next chunk is written only after this one's credit (after its reader passed it); the
      // reset is visible before the flag or put that starts that round trip.
      if (lane == 0) {
        *count = 0;
        next[m] = k + 1;
      }
      __syncwarp();
      __threadfence_system();  // the writers' rows (fenced before their counts) and the reset, before the put or flag
      const int q0 = k * s.rdma_chunk;
      if (m == n_me) {
        if (lane == 0) st_release_sys(&w->flag[c][n_me][slot], tag(call, k + 1));
      } else {
        transport::warp_put_signal<transport::SignalOp::kSet>(
            a.put.peers, m * L + me % L, half_off + l.rdma_row(l.recv_ring, s, c, n_me, q0),
            half + l.rdma_row(l.send_ring, s, c, m, q0), rows * l.ring_stride, flag_offset(h, c, n_me, slot),
            tag(call, k + 1), lane);
      }
      progressed = true;
    }
    if (!pending) break;
    if (!clock.go_on(a, progressed, (waiting_on < 0 ? 0 : waiting_on) * L + me % L, op, call)) return;
  }
  for (int m = lane; m < N; m += 32) w->base[c][m] = base[m] + len[m];
}

}  // namespace ring
}  // namespace internode
}  // namespace jax_ep
#endif
