// Dispatch layout: how many tokens each rank and each expert receives.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace jax_ep {

inline constexpr int kLayoutMaxTopk = 16;
inline constexpr int kLayoutMaxRanks = 64;
inline constexpr int kLayoutMaxExperts = 1024;

// Computes the dispatch layout of a routing table.
//
// topk_idx:              int32 [num_tokens, num_topk], expert id per slot; an id
//                        outside [0, num_experts) (such as -1) marks an unused slot.
// num_tokens_per_rank:   int32 [num_ranks], tokens that send at least one slot
//                        to an expert of the rank.
// num_tokens_per_expert: int32 [num_experts], tokens routed to the expert; a
//                        token naming an expert in several slots counts once
//                        (it is sent to the expert once).
// is_token_in_rank:      bool [num_tokens, num_ranks].
//
// Rank r owns experts [r * E / R, (r + 1) * E / R). Requires 1 <= num_topk <= 16,
// 1 <= num_ranks <= 64, num_experts <= 1024 and num_experts % num_ranks == 0.
// All outputs are written (the counts are zeroed on `stream` first); nothing
// synchronises with the host.
cudaError_t launch_get_dispatch_layout(const int32_t* topk_idx, int num_tokens,
                                       int num_topk, int num_experts,
                                       int num_ranks,
                                       int32_t* num_tokens_per_rank,
                                       int32_t* num_tokens_per_expert,
                                       bool* is_token_in_rank,
                                       cudaStream_t stream);

}  // namespace jax_ep
