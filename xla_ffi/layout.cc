// FFI handler of "jax_ep_get_dispatch_layout".
//
//   operand  topk_idx              s32[T, K]   (-1 or any id outside [0, E): unused slot)
//   attrs    num_experts: i64 (E), num_ranks: i64 (R)
//   results  num_tokens_per_rank   s32[R]
//            num_tokens_per_expert s32[E]
//            is_token_in_rank      pred[T, R]
#include "../cuda/layout.cuh"
#include "ffi_helpers.h"
#include "handlers.h"

namespace jax_ep {
namespace {

constexpr const char* kTarget = "jax_ep_get_dispatch_layout";

// Named so that the binding below, a macro argument, has no bare commas.
using TopkIdx = ffi::Buffer<ffi::S32, 2>;
using Counts = ffi::Buffer<ffi::S32, 1>;
using TokenInRank = ffi::Buffer<ffi::PRED, 2>;

ffi::Error GetDispatchLayout(cudaStream_t stream, TopkIdx topk_idx,
                             int64_t num_experts, int64_t num_ranks,
                             ffi::Result<Counts> num_tokens_per_rank,
                             ffi::Result<Counts> num_tokens_per_expert,
                             ffi::Result<TokenInRank> is_token_in_rank) {
  const int64_t num_tokens = topk_idx.dimensions()[0];
  const int64_t num_topk = topk_idx.dimensions()[1];
  if (!fits_int(num_tokens)) {
    return invalid_argument(kTarget, "too many tokens: " + std::to_string(num_tokens));
  }
  if (num_topk < 1 || num_topk > kLayoutMaxTopk) {
    return invalid_argument(kTarget, "num_topk must be in [1, 16], got " +
                                         std::to_string(num_topk));
  }
  if (num_ranks < 1 || num_ranks > kLayoutMaxRanks) {
    return invalid_argument(kTarget, "num_ranks must be in [1, 64], got " +
                                         std::to_string(num_ranks));
  }
  if (num_experts < 1 || num_experts > kLayoutMaxExperts ||
      num_experts % num_ranks != 0) {
    return invalid_argument(
        kTarget, "num_experts must be in [1, 1024] and a multiple of num_ranks (" +
                     std::to_string(num_ranks) + "), got " +
                     std::to_string(num_experts));
  }
  if (!has_shape(num_tokens_per_rank->dimensions(), {num_ranks})) {
    return shape_error(kTarget, "num_tokens_per_rank",
                       num_tokens_per_rank->dimensions(), {num_ranks});
  }
  if (!has_shape(num_tokens_per_expert->dimensions(), {num_experts})) {
    return shape_error(kTarget, "num_tokens_per_expert",
                       num_tokens_per_expert->dimensions(), {num_experts});
  }
  if (!has_shape(is_token_in_rank->dimensions(), {num_tokens, num_ranks})) {
    return shape_error(kTarget, "is_token_in_rank", is_token_in_rank->dimensions(),
                       {num_tokens, num_ranks});
  }

  return launch_status(
      kTarget, launch_get_dispatch_layout(
                   topk_idx.typed_data(), static_cast<int>(num_tokens),
                   static_cast<int>(num_topk), static_cast<int>(num_experts),
                   static_cast<int>(num_ranks), num_tokens_per_rank->typed_data(),
                   num_tokens_per_expert->typed_data(),
                   is_token_in_rank->typed_data(), stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GetDispatchLayoutHandler, GetDispatchLayout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<TopkIdx>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Ret<Counts>()
                                  .Ret<Counts>()
                                  .Ret<TokenInRank>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
