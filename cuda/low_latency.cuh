// Low-latency dispatch and combine over peer-mapped memory (the packed
// per-expert layout of decoding), split into a send and a receive kernel so
// other work can run between them.
//
// Push, then pack. A sender writes each (token, expert) message straight into
// the receiving rank's buffer, in the slot [local expert][source rank][index
// of the token among the source's tokens for that expert], then publishes the
// count of that (expert, source) pair. The receiver waits for every source's
// count, packs the messages into [E/R, R*M, H] ordered by (source, token),
// and records where each row came from. Combine pushes each expert output
// back to its token's owner, into [token][first top-k slot naming the expert];
// the owner waits for every rank's flag and takes the weighted sum. The
// one-call combine can skip the push (zero copy, launch_combine_recv with a
// ZeroCopy): each rank publishes where its rows lie in its own XLA memory,
// which every rank has mapped, and the owners read them in place.
//
// Every call publishes a count (or flag) to every peer, even an empty one.
// Calls alternate between two halves of the buffer; a sender writes half
// n % 2 of a peer only after its own receive of call n-1 saw that peer's call
// n-1 messages, which the peer sent after it finished reading call n-2. So
// at most two calls' data are in flight, and none is overwritten early.
// Counts and flags carry the call number (its serial, cuda/serial.cuh), so
// nothing needs resetting.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "intranode.cuh"

namespace jax_ep {
namespace low_latency {

using intranode::PeerTable;

inline constexpr std::size_t kHeaderBytes = 16;  // token, slot, pad

enum class Payload : int { kBF16 = 0, kFP8 = 1, kFP8RoundScale = 2, kFP8UE8M0 = 3 };

// Per-call static shapes.
struct Shape {
  int num_tokens;   // T (<= M)
  int max_tokens;   // M
  int num_topk;     // K
  int num_experts;  // E
  int hidden;       // H
  Payload payload;
  bool combine_fp8 = false;  // combine rows travel as FP8 with a float scale per 128 channels

  __host__ __device__ int local_experts(int num_ranks) const { return num_experts / num_ranks; }
  // One combine row in the owner's buffer: BF16 values, or FP8 values then scales.
  __host__ __device__ std::size_t combine_row_bytes() const {
    return combine_fp8 ? intranode::align_up(static_cast<std::size_t>(hidden) + hidden / 128 * 4, 16)
                       : static_cast<std::size_t>(hidden) * 2;
  }
  __host__ __device__ bool fp8() const { return payload != Payload::kBF16; }
  __host__ __device__ int scale_bytes() const {
    return payload == Payload::kFP8UE8M0 ? hidden / 128 : hidden / 128 * 4;
  }
  __host__ __device__ int value_bytes() const { return fp8() ? hidden : hidden * 2; }
  // One dispatch message: header, values, scales.
  __host__ __device__ std::size_t message_stride() const {
    return intranode::align_up(kHeaderBytes + value_bytes() + (fp8() ? scale_bytes() : 0), 16);
  }
  // A pulled dispatch stages a rank's own messages [M] at the start of the
  // dispatch region of its own half, then its routing table [E][M] int32:
  // entry (e, i) is token * K + slot of the i-th of its tokens naming e.
  __host__ __device__ std::size_t stage_rows_offset() const {
    return intranode::align_up(static_cast<std::size_t>(max_tokens) * message_stride(), 16);
  }
  __host__ __device__ std::size_t stage_bytes() const {
    return stage_rows_offset() + static_cast<std::size_t>(num_experts) * max_tokens * 4;
  }
};

// Count slots and flags sit at fixed offsets of the buffer's workspace
// (cuda/workspace.cuh: workspace::kDispatchCounts and the rest, sized by
// kCountSlots >= (E/R) * R), not in the shape-dependent halves, so a call with
// other shapes never reads an earlier call's payload as a count. Their values
// carry the call number.
__host__ __device__ inline unsigned long long* dispatch_counts(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + workspace::kDispatchCounts) +
         half * kCountSlots;
}
// combine_flags(owner, half)[s] = serial_word(call, mode): rank s's rows of that
// call are ready for the owner, pushed into its buffer (mode 0) or published
// in s's own XLA memory (mode 1, the zero-copy combine).
__host__ __device__ inline unsigned long long* combine_flags(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + workspace::kCombineFlags) +
         half * intranode::kMaxRanks;
}
// combine_done(expert rank, half)[r] = serial_word(call, 0): rank r finished reading that
// call's rows, so the expert rank's XLA memory holding them may be reused.
__host__ __device__ inline unsigned long long* combine_done(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + workspace::kCombineDone) +
         half * intranode::kMaxRanks;
}

// Offsets inside one half of a rank's low-latency region (all ranks agree).
struct Layout {
  std::size_t dispatch_rows;    // [E/R][R][M] messages
  std::size_t combine_rows;     // [M][K] rows of H bf16
  std::size_t combine_index;    // [R][M][K] int64: where a zero-copy combine's rows lie (read by peers)
  std::size_t combine_ptrs;     // [M][K] pointers: the row each (token, slot) sums (this rank only)
  std::size_t half_bytes;

  __host__ __device__ static Layout make(const Shape& s, int R) {
    using intranode::align_up;
    using intranode::kAlign;
    Layout l{};
    std::size_t o = 0;
    const std::size_t le = s.local_experts(R);
    l.dispatch_rows = o;   o = align_up(o + le * R * s.max_tokens * s.message_stride(), kAlign);
    l.combine_rows = o;    o = align_up(o + static_cast<std::size_t>(s.max_tokens) * s.num_topk * s.hidden * 2, kAlign);
    l.combine_index = o;   o = align_up(o + static_cast<std::size_t>(R) * s.max_tokens * s.num_topk * 8, kAlign);
    l.combine_ptrs = o;    o = align_up(o + static_cast<std::size_t>(s.max_tokens) * s.num_topk * 8, kAlign);
    l.half_bytes = o;
    return l;
  }
};

// Bytes a buffer needs (both halves and the call counters).
std::size_t buffer_bytes(const Shape& s, int num_ranks);

// The signal block and workspace of a fresh buffer whose call counters (the
// intranode epoch, the low-latency dispatch and combine calls) start at
// `start`, as 64-bit words: all zeros for 0 (what cudaMemset leaves); a test
// starts them near 2^32 to run calls through the serials' wrap (serial.cuh).
std::vector<unsigned long long> fresh_header(unsigned long long start);

// Send: quantize (FP8) and push every (token, expert) message, publish counts;
// one kernel, which also zeroes the int32 `token` (the call's XLA result) unless null.
// With `per_slot` (BF16 only) x is [T, K, H] and each top-k slot sends its own
// row instead of the token's.
cudaError_t launch_dispatch_send(const PeerTable& peers, const Shape& s, const void* x,
                                 const int* topk_idx, int* token, int num_blocks, cudaStream_t stream,
                                 bool per_slot = false);

// Pull instead of push (the one-call dispatch): every rank stages its tokens
// (cast to FP8 when asked) in its own buffer with its routing (per expert,
// the count and the list of its tokens naming it) and flags every peer; each
// receiver reads its experts' counts from every source and copies the rows
// straight from the sources' staging into its packed output. One pass over
// the payload where a push then a receive copy take two: the receive copies
// into XLA's output anyway. Needs every peer mapped (no RDMA-only peers) and
// the rank's ids in shared memory: M*K <= kMaxPullIds.
inline constexpr int kMaxPullIds = 16384;
bool pull_supported(const Shape& s, int num_ranks);

cudaError_t launch_dispatch_stage(const PeerTable& peers, const Shape& s, const void* x, const int* topk_idx,
                                  int* token, int num_blocks, cudaStream_t stream);
// Same outputs as launch_dispatch_recv.
cudaError_t launch_dispatch_pull(const PeerTable& peers, const Shape& s, void* recv_x, void* recv_scales,
                                 int* recv_count, int* recv_src_rank, int* recv_src_token, int* recv_src_slot,
                                 int num_blocks, cudaStream_t stream);

// Receive: wait for every source's counts (one block), then pack rows and
// write the routing (a wider grid that never waits).
// recv_x [E/R, R*M, H] (bf16, or fp8 values); recv_scales [E/R, R*M, G] (fp8
// only); recv_count [E/R]; recv_src_{rank,token,slot} [E/R, R*M] (-1 padding).
cudaError_t launch_dispatch_recv(const PeerTable& peers, const Shape& s, void* recv_x,
                                 void* recv_scales, int* recv_count, int* recv_src_rank,
                                 int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream);

// Every rank's XLA device memory as this process maps it (xla_ffi/xla_memory.h).
struct XlaMemory {
  char* base[intranode::kMaxRanks];
};

// Combine send: push each valid row of y [E/R, R*M, H] (bf16) to its token's
// owner (valid rows: those whose recv_src_rank is not -1), cast to FP8 per
// 128 channels on the way with combine_fp8; zeroes `token` unless null.
cudaError_t launch_combine_send(const PeerTable& peers, const Shape& s, const void* y,
                                const int* recv_src_rank, const int* recv_src_token, const int* recv_src_slot,
                                int* token, int num_blocks, cudaStream_t stream);

// The zero-copy combine: no rows move. The send pushes nothing (its custom
// call only zeroes its token); the receive first publishes where each valid
// row of y [E/R, R*M, H] lies: y_offset is y's offset in this rank's XLA
// memory, the routing that of the dispatch's handle. y must then stay
// untouched until every rank has read its rows, which the receive waits for.
struct ZeroCopy {
  long long y_offset = -1;  // < 0: this rank's rows were pushed
  const int* src_rank = nullptr;
  const int* src_token = nullptr;
  const int* src_slot = nullptr;
};

// Combine receive: out [T, H] bf16 = sum_k w[t, k] * row(t, first slot of k's expert)
// (rows dequantized first with combine_fp8), each row read where its rank
// left it: pushed into this buffer, or published in that rank's XLA memory
// (`xla`). Then every rank learns this one is done reading.
cudaError_t launch_combine_recv(const PeerTable& peers, const Shape& s, const XlaMemory& xla,
                                const int* topk_idx, const float* topk_weights, void* out,
                                const ZeroCopy& zero_copy, int num_blocks, cudaStream_t stream);

// Combine receive without the sum: out [T, K, H] bf16 = row(t, first slot of
// k's expert), zeros on masked slots.
cudaError_t launch_combine_gather(const PeerTable& peers, const Shape& s, const int* topk_idx, void* out,
                                  int num_blocks, cudaStream_t stream);

}  // namespace low_latency
}  // namespace jax_ep
