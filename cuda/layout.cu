// Dispatch layout kernel.
//
// One pass over the routing table: each thread takes a token, reads its top-k
// expert ids, counts its distinct valid experts into a block-local expert
// histogram in shared memory, builds the token's rank mask in a register,
// writes its `is_token_in_rank` row and counts the mask into a block-local
// rank histogram. Each block then
// adds its non-zero histogram entries to the global counts, which the launcher
// zeroed on the same stream.
#include "layout.cuh"

#include <algorithm>

#include "utils.cuh"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 128;
// Enough blocks to cover every SM of current GPUs a few times; the grid-stride
// loop handles the rest, and a bounded grid bounds the global atomics.
constexpr int kLayoutMaxBlocks = 512;

// The four `bool` bytes for ranks r .. r + 3 of `mask`, little-endian.
__device__ __forceinline__ uint32_t rank_mask_bytes(uint64_t mask, int r) {
  const uint32_t bits = static_cast<uint32_t>(mask >> r) & 0xfu;
  return (bits & 1u) | ((bits & 2u) << 7) | ((bits & 4u) << 14) |
         ((bits & 8u) << 21);
}

// Writes the `is_token_in_rank` row of one token, kRankVec bytes per store.
template <int kRankVec>
__device__ __forceinline__ void store_rank_row(bool* row, uint64_t mask,
                                               int num_ranks) {
  if constexpr (kRankVec == 16) {
    for (int r = 0; r < num_ranks; r += 16) {
      *reinterpret_cast<uint4*>(row + r) =
          make_uint4(rank_mask_bytes(mask, r), rank_mask_bytes(mask, r + 4),
                     rank_mask_bytes(mask, r + 8), rank_mask_bytes(mask, r + 12));
    }
  } else if constexpr (kRankVec == 8) {
    for (int r = 0; r < num_ranks; r += 8) {
      *reinterpret_cast<uint2*>(row + r) =
          make_uint2(rank_mask_bytes(mask, r), rank_mask_bytes(mask, r + 4));
    }
  } else if constexpr (kRankVec == 4) {
    for (int r = 0; r < num_ranks; r += 4) {
      *reinterpret_cast<uint32_t*>(row + r) = rank_mask_bytes(mask, r);
    }
  } else {
    for (int r = 0; r < num_ranks; ++r) row[r] = (mask >> r) & 1u;
  }
}

// Reads the top-k ids of one token; kTopkVec == 4 reads them as int4.
template <int kTopkVec>
__device__ __forceinline__ void load_topk_row(const int32_t* row, int num_topk,
                                              int32_t (&ids)[kLayoutMaxTopk]) {
  if constexpr (kTopkVec == 4) {
#pragma unroll
    for (int k = 0; k < kLayoutMaxTopk; k += 4) {
      if (k < num_topk) {
        const int4 v = __ldg(reinterpret_cast<const int4*>(row + k));
        ids[k] = v.x;
        ids[k + 1] = v.y;
        ids[k + 2] = v.z;
        ids[k + 3] = v.w;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLayoutMaxTopk; ++k) {
      if (k < num_topk) ids[k] = __ldg(row + k);
    }
  }
}

template <int kTopkVec, int kRankVec>
__global__ void __launch_bounds__(kLayoutThreads)
    get_dispatch_layout_kernel(const int32_t* __restrict__ topk_idx,
                               int num_tokens, int num_topk, int num_experts,
                               int num_ranks, int experts_per_rank,
                               int32_t* __restrict__ num_tokens_per_rank,
                               int32_t* __restrict__ num_tokens_per_expert,
                               bool* __restrict__ is_token_in_rank) {
  // Block-local histograms: experts first, then ranks.
  extern __shared__ int32_t block_counts[];
  int32_t* expert_counts = block_counts;
  int32_t* rank_counts = block_counts + num_experts;
  const int num_counts = num_experts + num_ranks;
  for (int i = threadIdx.x; i < num_counts; i += blockDim.x) block_counts[i] = 0;
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       token < num_tokens; token += stride) {
    int32_t ids[kLayoutMaxTopk];
    load_topk_row<kTopkVec>(topk_idx + token * num_topk, num_topk, ids);

    uint64_t rank_mask = 0;
#pragma unroll
    for (int k = 0; k < kLayoutMaxTopk; ++k) {
      if (k < num_topk) {
        const int32_t expert = ids[k];
        if (expert >= 0 && expert < num_experts) {
          // Only the first slot naming an expert counts it.
          bool repeated = false;
#pragma unroll
          for (int j = 0; j < k; ++j) repeated |= ids[j] == expert;
          if (!repeated) atomicAdd_block(&expert_counts[expert], 1);
          rank_mask |= uint64_t{1} << (expert / experts_per_rank);
        }
      }
    }
    for (uint64_t m = rank_mask; m != 0; m &= m - 1) {
      atomicAdd_block(&rank_counts[__ffsll(static_cast<long long>(m)) - 1], 1);
    }
    store_rank_row<kRankVec>(is_token_in_rank + token * num_ranks, rank_mask,
                             num_ranks);
  }
  __syncthreads();

  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) {
    if (expert_counts[i] != 0) atomicAdd(&num_tokens_per_expert[i], expert_counts[i]);
  }
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) {
    if (rank_counts[i] != 0) atomicAdd(&num_tokens_per_rank[i], rank_counts[i]);
  }
}

template <int kTopkVec>
cudaError_t launch_with_topk_vec(int rank_vec, dim3 grid, size_t smem,
                                 cudaStream_t stream, const int32_t* topk_idx,
                                 int num_tokens, int num_topk, int num_experts,
                                 int num_ranks, int32_t* num_tokens_per_rank,
                                 int32_t* num_tokens_per_expert,
                                 bool* is_token_in_rank) {
  const int experts_per_rank = num_experts / num_ranks;
#define JAX_EP_LAUNCH_LAYOUT(kRankVec)                                        \
  get_dispatch_layout_kernel<kTopkVec, kRankVec>                              \
      <<<grid, kLayoutThreads, smem, stream>>>(                               \
          topk_idx, num_tokens, num_topk, num_experts, num_ranks,             \
          experts_per_rank, num_tokens_per_rank, num_tokens_per_expert,       \
          is_token_in_rank)
  switch (rank_vec) {
    case 16: JAX_EP_LAUNCH_LAYOUT(16); break;
    case 8: JAX_EP_LAUNCH_LAYOUT(8); break;
    case 4: JAX_EP_LAUNCH_LAYOUT(4); break;
    default: JAX_EP_LAUNCH_LAYOUT(1); break;
  }
#undef JAX_EP_LAUNCH_LAYOUT
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_get_dispatch_layout(const int32_t* topk_idx, int num_tokens,
                                       int num_topk, int num_experts,
                                       int num_ranks,
                                       int32_t* num_tokens_per_rank,
                                       int32_t* num_tokens_per_expert,
                                       bool* is_token_in_rank,
                                       cudaStream_t stream) {
  if (num_tokens < 0 || num_topk < 1 || num_topk > kLayoutMaxTopk ||
      num_ranks < 1 || num_ranks > kLayoutMaxRanks || num_experts < 1 ||
      num_experts > kLayoutMaxExperts || num_experts % num_ranks != 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(num_tokens_per_rank, 0,
                                    sizeof(int32_t) * num_ranks, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(num_tokens_per_expert, 0,
                        sizeof(int32_t) * num_experts, stream);
  if (err != cudaSuccess || num_tokens == 0) return err;

  // Widest access that the row lengths and base pointers allow.
  const bool topk_vec4 = num_topk % 4 == 0 && is_aligned(topk_idx, 16);
  int rank_vec = 1;
  for (int width : {16, 8, 4}) {
    if (num_ranks % width == 0 && is_aligned(is_token_in_rank, width)) {
      rank_vec = width;
      break;
    }
  }

  const dim3 grid(static_cast<unsigned>(
      std::min<int64_t>(ceil_div<int64_t>(num_tokens, kLayoutThreads),
                       kLayoutMaxBlocks)));
  const size_t smem = sizeof(int32_t) * (num_experts + num_ranks);
  if (topk_vec4) {
    return launch_with_topk_vec<4>(rank_vec, grid, smem, stream, topk_idx,
                                   num_tokens, num_topk, num_experts, num_ranks,
                                   num_tokens_per_rank, num_tokens_per_expert,
                                   is_token_in_rank);
  }
  return launch_with_topk_vec<1>(rank_vec, grid, smem, stream, topk_idx,
                                 num_tokens, num_topk, num_experts, num_ranks,
                                 num_tokens_per_rank, num_tokens_per_expert,
                                 is_token_in_rank);
}

}  // namespace jax_ep
