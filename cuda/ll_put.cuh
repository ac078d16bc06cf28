// Low-latency dispatch and combine over the transport seam (transport.cuh):
// every (token, expert) message, and every expert output row, is written
// straight into the receiver's slot with a put-with-signal (or, for a peer
// with a pointer, stores and a release add), so peers in other nodes are
// reached without a pointer and a send only issues puts.
//
// Dispatch. The send casts each token once (FP8 when asked) into this
// rank's staging half, the put source, and a warp per (token, expert)
// writes it to slot [local expert][source][index] of the expert's rank,
// index = the source's earlier tokens naming that expert, adding 1 to the
// (local expert, source) signal word there; one thread per expert then adds
// signal_final_value(count) to that word. The receive waits until every word
// of its half reads done, packs the messages into [E/R, R*M, H] ordered by
// (source, token) with the handle (source rank, token, first top-k slot
// naming the expert), resets the words and ends the call.
//
// Combine. The send returns each valid row of y to its token's owner, slot
// [token][first top-k slot naming the expert], adding 1 to the owner's
// (source) word, then the final add per owner; rows for put peers are first
// copied into this rank's staging (a put source must be symmetric memory).
// The receive waits for every source's word and sums the rows with the top-k
// weights in float32 (the arithmetic of low_latency.cu's combine receive).
//
// Calls alternate between two halves (call % 2); a rank writes half h of a
// peer only after its own receive of the previous call, which needed that
// peer's messages of the previous call, sent after the peer's receive of
// the call before (the same half) had read and reset it. The same argument
// covers the staging halves: a put's source is rewritten two calls later,
// after the put was delivered. tests/protocol/ll_put_model.py models it.
//
// These kernels link NVSHMEM device code (JAX_EP_WITH_NVSHMEM): they live in
// the jax_ep._nvshmem module; xla_ffi/ll_put.cc holds their FFI handlers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "low_latency.cuh"
#include "sync.cuh"
#include "transport.cuh"

namespace jax_ep {
namespace ll_put {

using low_latency::Payload;
using low_latency::Shape;

// A message: the token (int32), K (int32), the token's K expert ids (int32),
// padded to 16 bytes; then the values (BF16, or FP8) and, FP8, the scales.
// The receiver takes the top-k slot from the ids.
__host__ __device__ inline std::size_t header_bytes(const Shape& s) {
  return intranode::align_up(8 + 4 * static_cast<std::size_t>(s.num_topk), 16);
}
__host__ __device__ inline std::size_t message_stride(const Shape& s) {
  return intranode::align_up(header_bytes(s) + s.value_bytes() + (s.fp8() ? s.scale_bytes() : 0), 16);
}

inline constexpr int kMaxWords = 2048;  // dispatch signal words per half: (E/R) * R = E

// This rank's control words, at the start of its buffer (never written by peers).
struct Control {
  unsigned long long dispatch_call;  // calls received so far: the next call's number
  unsigned long long combine_call;
  unsigned int blocks_done[2];       // finished pack / sum blocks (dispatch, combine)
};
inline constexpr std::size_t kControlBytes = 256;
static_assert(sizeof(Control) <= kControlBytes);

// Regions of every rank's symmetric buffer (identical on every rank), each
// [2] halves; offsets from the buffer's start.
struct Layout {
  std::size_t dispatch_words, dispatch_words_half;  // [E/R][R] uint64, written by sources
  std::size_t combine_words, combine_words_half;    // [R] uint64, written by expert ranks
  std::size_t dispatch_stage, dispatch_stage_half;  // [M] messages: this rank's tokens (put source)
  std::size_t dispatch_rows, dispatch_rows_half;    // [E/R][R][M] messages, written by sources
  std::size_t combine_stage, combine_stage_half;    // [E/R][R*M] rows of H bf16: y's rows for put peers
  std::size_t combine_rows, combine_rows_half;      // [M][K] rows of H bf16, written by expert ranks
  std::size_t total;

  __host__ __device__ static Layout make(const Shape& s, int R) {
    using intranode::align_up;
    using intranode::kAlign;
    const std::size_t le = s.local_experts(R), m = s.max_tokens, row = static_cast<std::size_t>(s.hidden) * 2;
    Layout l{};
    std::size_t o = kControlBytes;
    auto region = [&](std::size_t& at, std::size_t& half, std::size_t bytes) {
      at = align_up(o, kAlign);
      half = align_up(bytes, kAlign);
      o = at + 2 * half;
    };
    region(l.dispatch_words, l.dispatch_words_half, le * R * 8);
    region(l.combine_words, l.combine_words_half, static_cast<std::size_t>(R) * 8);
    region(l.dispatch_stage, l.dispatch_stage_half, m * message_stride(s));
    region(l.dispatch_rows, l.dispatch_rows_half, le * R * m * message_stride(s));
    region(l.combine_stage, l.combine_stage_half, le * R * m * row);
    region(l.combine_rows, l.combine_rows_half, m * s.num_topk * row);
    l.total = o;
    return l;
  }
};

// What every kernel takes.
struct Args {
  transport::Peers peers;
  Shape shape;
  unsigned long long timeout_ns;  // how long a receive waits for a peer's signal
  int* status;                    // device word: 1 + the peer a receive gave up on (first wins); null: none
  const bool* rank_mask;          // device bool[R], true: a masked rank (never written to nor waited for); null: none
};

// Bytes of the symmetric buffer for these shapes (both halves of everything).
std::size_t buffer_bytes(const Shape& s, int num_ranks);
// Whether these shapes fit the kernels (E <= kMaxWords, K <= kMaxTopk, BF16 combine).
bool supported(const Shape& s, int num_ranks);

// x [T, H] bf16, topk_idx [T, K] int32 (-1 masks a slot).
cudaError_t launch_dispatch_send(const Args& a, const void* x, const int* topk_idx, int num_blocks,
                                 cudaStream_t stream);
// recv_x [E/R, R*M, H] (bf16, or fp8 values); recv_scales [E/R, R*M, G] (fp8
// only: float32 G = H/128, or UE8M0 bytes packed 4 to an int32); recv_count
// [E/R]; recv_src_{rank,token,slot} [E/R, R*M] (-1 on padding rows).
cudaError_t launch_dispatch_recv(const Args& a, void* recv_x, void* recv_scales, int* recv_count,
                                 int* recv_src_rank, int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream);
// y [E/R, R*M, H] bf16 with the dispatch's handle.
cudaError_t launch_combine_send(const Args& a, const void* y, const int* recv_src_rank, const int* recv_src_token,
                                const int* recv_src_slot, int num_blocks, cudaStream_t stream);
// out [T, H] bf16 = sum_k w[t, k] * row(t, first slot naming topk_idx[t, k]).
cudaError_t launch_combine_recv(const Args& a, const int* topk_idx, const float* topk_weights, void* out,
                                int num_blocks, cudaStream_t stream);

#ifdef __CUDACC__
namespace detail {

__device__ __forceinline__ Control* control(const Args& a) { return reinterpret_cast<Control*>(a.peers.local); }

// Whether rank `r` is masked for this call. A masked rank's own calls send
// and wait for nothing (its routing is all -1), and no rank writes to or
// waits for it, so no signal word can change after its reader reset it.
__device__ __forceinline__ bool masked(const Args& a, int r) { return a.rank_mask != nullptr && a.rank_mask[r]; }
__device__ __forceinline__ bool skips(const Args& a, int peer) { return masked(a, a.peers.rank) || masked(a, peer); }

// A receive gave up waiting for `peer`: record it, then stop the kernel.
__device__ __forceinline__ void give_up(const Args& a, int peer) {
  if (a.status != nullptr) atomicCAS(a.status, 0, 1 + peer);
  __threadfence_system();
  __trap();
}

// Spin until the signal word at `word` (this rank's memory) reads done;
// returns it. The acquire orders the rows it counts before later reads.
__device__ __forceinline__ unsigned long long wait_done(const Args& a, const unsigned long long* word, int peer) {
  unsigned long long v = ld_acquire_sys(word);
  if (transport::signal_done(v)) return v;
  const unsigned long long start = global_timer_ns();
  while (!transport::signal_done(v = ld_acquire_sys(word))) {
    if (global_timer_ns() - start > a.timeout_ns) give_up(a, peer);
  }
  return v;
}

// True in every thread of the block that finished last (and resets the counter).
__device__ __forceinline__ bool last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) + 1 == gridDim.x;
    if (last) *counter = 0;
  }
  __syncthreads();
  return last;
}

// Whether slot k of token row `ids` is the first naming its expert.
__device__ __forceinline__ bool first_slot(const int* ids, int k) {
  for (int j = 0; j < k; ++j) {
    if (ids[j] == ids[k]) return false;
  }
  return true;
}

}  // namespace detail
#endif

}  // namespace ll_put
}  // namespace jax_ep
