// Device helpers of the dispatch receive and send that both dispatch paths
// use: the push path (low_latency_dispatch.cu) and the pulled path
// (low_latency_pull.cu). Scale writes, the packed receive layout and the
// per-expert token index. Internal linkage, as low_latency_common.cuh.
#pragma once

#include "low_latency_common.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

// Writes the scale of 128-channel group g: a float, or its UE8M0 exponent byte.
__device__ __forceinline__ void write_group_scale(const Shape& s, char* scales, int g, float scale) {
  fp8_store_group_scale(scales, g, scale, s.payload == Payload::kFP8UE8M0);
}

// A warp copies a message's values (and, FP8, the scales after them) into
// packed row o of recv_x (and recv_scales).
__device__ __forceinline__ void copy_message(const Shape& s, const char* values, char* recv_x, char* recv_scales,
                                             long long o, int lane) {
  warp_copy<true>(reinterpret_cast<const int4*>(values), reinterpret_cast<int4*>(recv_x + o * s.value_bytes()),
                  s.value_bytes() / 16, lane);
  const int words = s.fp8() ? s.scale_bytes() / 4 : 0;
  for (int w = lane; w < words; w += 32) {
    reinterpret_cast<int*>(recv_scales + o * s.scale_bytes())[w] = reinterpret_cast<const int*>(values + s.value_bytes())[w];
  }
}

// The grid writes -1 as the routing of every padding row (past each
// expert's count, start[e * (R + 1) + R]); the valid rows' warps write theirs.
__device__ __forceinline__ void mark_padding_rows(const int* start, int le, int R, int rows_out, int* src_rank,
                                                  int* src_token, int* src_slot) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
       i < static_cast<long long>(le) * rows_out; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int e = static_cast<int>(i / rows_out), j = static_cast<int>(i % rows_out);
    if (j < start[e * (R + 1) + R]) continue;
    src_rank[i] = -1;
    src_token[i] = -1;
    src_slot[i] = -1;
  }
}

// The packed layout of a dispatch receive, in shared memory. On entry
// start[e * (R + 1) + r + 1] holds how many rows source r has for local
// expert e. Afterwards start[e * (R + 1) + r] is the first of them among e's
// rows (start[e * (R + 1) + R]: e's count, which block 0 writes to
// recv_count), and first[e] the rows of the experts before e (first[le]: all
// valid rows). Ends at a barrier.
__device__ __forceinline__ void lay_out_rows(int* start, int* first, int le, int R, int* recv_count) {
  for (int e = threadIdx.x; e < le; e += blockDim.x) {
    int* st = start + e * (R + 1);
    st[0] = 0;
    for (int r = 1; r <= R; ++r) st[r] += st[r - 1];
    first[e + 1] = st[R];
    if (blockIdx.x == 0) recv_count[e] = st[R];
  }
  __syncthreads();
  scan_expert_counts(first, le);
}

// Packed row `flat` of lay_out_rows' layout: its local expert e, source r
// (the last whose rows start at or before it: sources with none are skipped)
// and row q among e's rows.
__device__ __forceinline__ void locate_row(const int* start, const int* first, int le, int R, int flat, int* e,
                                           int* r, int* q) {
  *e = last_at_or_below(first, le, flat);
  *q = flat - first[*e];
  *r = last_at_or_below(start + *e * (R + 1), R, *q);
}

// How many of a source's tokens before t name expert e (ids: that source's
// [tokens][K] top-k ids, global or shared memory), counted by a warp, 32
// tokens per step: the index of token t among the source's tokens for e.
// kVectors (for ids in shared memory): with K % 4 == 0 and aligned ids, each
// lane reads its token's ids as 16-byte vectors, a quarter of the bank
// conflicts of reading them one by one.
template <bool kVectors = false>
__device__ __forceinline__ int earlier_tokens_naming(const int* ids, int t, int K, int e, int lane) {
  const bool vectors = kVectors && K % 4 == 0 && reinterpret_cast<std::uintptr_t>(ids) % 16 == 0;
  int idx = 0;
  for (int base = 0; base < t; base += 32) {
    bool names = false;
    if (base + lane < t) {
      const int* other = ids + static_cast<long long>(base + lane) * K;
      if (vectors) {
        for (int j = 0; j < K / 4; ++j) {
          const int4 v = reinterpret_cast<const int4*>(other)[j];
          names |= (v.x == e) | (v.y == e) | (v.z == e) | (v.w == e);
        }
      } else {
        for (int j = 0; j < K; ++j) names |= other[j] == e;
      }
    }
    idx += __popc(__ballot_sync(kFullWarpMask, names));
  }
  return idx;
}

// Whether top-k slot k of a token sends: a valid id its earlier slots do not repeat.
__device__ __forceinline__ bool first_slot(const int* ids, int k, int num_experts) {
  const int id = ids[k];
  bool first = id >= 0 && id < num_experts;
  for (int j = 0; j < k; ++j) first &= ids[j] != id;
  return first;
}

}  // namespace
}  // namespace low_latency
}  // namespace jax_ep
