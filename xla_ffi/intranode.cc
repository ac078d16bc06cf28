// FFI handlers of the intranode normal-mode ops:
//
//   jax_ep_intranode_dispatch       x [T, ...], topk_idx s32[T, K], topk_weights f32[T, K]
//   jax_ep_intranode_dispatch_fp8   x_fp8 [T, H], scales [T, H/128], topk_idx, topk_weights
//       results: recv rows [C, ...] (one per payload part), recv_topk_idx s32[C, K],
//       recv_topk_weights f32[C, K], num_recv_tokens_per_expert s32[E/R],
//       expert_group_sizes s32[E/R], num_kept s32[], num_needed s32[],
//       recv_src_rank s32[C], recv_src_token s32[C], is_token_in_rank pred[T, R],
//       send_pos s32[T, S] (S = R rank-major, K expert-major)
//       attrs: buffer_id, num_experts, capacity, expert_alignment, layout (0 rank-major,
//       1 expert-major), num_sms
//   jax_ep_intranode_cached_dispatch  x [T, ...], recv_src_rank, recv_src_token -> [C, ...]
//   jax_ep_intranode_combine          y [C, H], recv_src_rank s32[C], recv_src_token s32[C],
//                                     send_pos s32[T, S] -> [T, H]
//       attrs: buffer_id, num_sms, layout, chunk_rows, ring_rows
//
// Row sizes must be multiples of 16 bytes (the Python side pads).
#include <string>

#include "../cuda/intranode.cuh"
#include "ffi_helpers.h"
#include "handlers.h"
#include "runtime.h"

namespace jax_ep {
namespace {

using intranode::RowParts;

constexpr int kBlocksPerSm = 4;  // copy-kernel blocks (256 threads) per SM of the budget

ffi::Error lookup(const char* target, int64_t buffer_id, int32_t device, int64_t run,
                  std::shared_ptr<IntranodeBuffer>* out) {
  std::string error;
  *out = Runtime::get().find(buffer_id, device, run, &error);
  if (*out == nullptr) return invalid_argument(target, error);
  return ffi::Error::Success();
}

int64_t rows_of(const ffi::AnyBuffer& b) {
  return b.dimensions().size() == 0 ? 1 : b.dimensions()[0];
}

int64_t row_bytes_of(const ffi::AnyBuffer& b) {
  const int64_t rows = rows_of(b);
  return rows == 0 ? 0 : static_cast<int64_t>(b.size_bytes()) / rows;
}

ffi::Error check_row_bytes(const char* target, const char* name, int64_t bytes) {
  if (bytes % 16 != 0 || bytes == 0) {
    return invalid_argument(target, std::string(name) + " rows must be a nonzero multiple of 16 bytes, got " +
                                        std::to_string(bytes));
  }
  return ffi::Error::Success();
}

ffi::Error check_fits(const char* target, const IntranodeBuffer& buf, std::size_t need) {
  if (need > buf.staging_half_bytes()) {
    return invalid_argument(target, "the jax_ep buffer is too small for this call: it needs " +
                                        std::to_string(need) + " bytes of staging per half, the buffer has " +
                                        std::to_string(buf.staging_half_bytes()) +
                                        "; create the Buffer with more num_nvl_bytes");
  }
  return ffi::Error::Success();
}

ffi::Error Dispatch(const char* target, cudaStream_t stream, int32_t device, int64_t run, RowParts parts, I32_2 topk_idx,
                    F32_2 topk_weights, int64_t buffer_id, int64_t num_experts, int64_t capacity,
                    int64_t expert_alignment, int64_t layout, int64_t num_sms,
                    I32_2* recv_topk_idx, F32_2* recv_topk_weights, I32_1* num_recv_per_expert,
                    I32_1* expert_group_sizes, I32_0* num_kept, I32_0* num_needed,
                    I32_1* recv_src_rank, I32_1* recv_src_token, Pred2* is_token_in_rank,
                    I32_2* send_pos) {
  std::shared_ptr<IntranodeBuffer> buf;
  if (auto err = lookup(target, buffer_id, device, run, &buf); err.failure()) return err;
  const int64_t T = topk_idx.dimensions()[0], K = topk_idx.dimensions()[1];
  const int R = buf->num_ranks();
  if (K < 1 || K > intranode::kMaxTopk) return invalid_argument(target, "num_topk must be in [1, 16]");
  if (num_experts < R || num_experts % R != 0 || num_experts > intranode::kMaxExperts) {
    return invalid_argument(target, "num_experts must be a positive multiple of the rank count " + std::to_string(R) +
                                        " and at most " + std::to_string(intranode::kMaxExperts) + ", got " +
                                        std::to_string(num_experts));
  }
  if (expert_alignment < 1 || !fits_int(expert_alignment)) {
    return invalid_argument(target, "expert_alignment must be a positive int, got " + std::to_string(expert_alignment));
  }
  if (!has_shape(topk_weights.dimensions(), {T, K})) {
    return shape_error(target, "topk_weights", topk_weights.dimensions(), {T, K});
  }
  if (!fits_int(T) || !fits_int(capacity) || capacity < 1) return invalid_argument(target, "bad sizes");
  // send_pos holds rank * capacity + row as an int32.
  if (!fits_int(static_cast<int64_t>(R) * capacity)) {
    return invalid_argument(target, "num_ranks * capacity must fit an int32: R = " + std::to_string(R) +
                                        ", capacity = " + std::to_string(capacity));
  }
  if (auto err = check_fits(target, *buf,
                            intranode::dispatch_staging_bytes(static_cast<int>(T), static_cast<int>(K), R,
                                                              static_cast<int>(num_experts), parts.row_bytes()));
      err.failure()) {
    return err;
  }
  intranode::DispatchArgs args{};
  args.topk_idx = topk_idx.typed_data();
  args.topk_weights = topk_weights.typed_data();
  args.num_tokens = static_cast<int>(T);
  args.num_topk = static_cast<int>(K);
  args.num_experts = static_cast<int>(num_experts);
  args.capacity = static_cast<int>(capacity);
  args.expert_alignment = static_cast<int>(expert_alignment);
  args.layout = layout == 1 ? intranode::Layout::kExpertMajor : intranode::Layout::kRankMajor;
  intranode::DispatchOutputs out{};
  out.recv_topk_idx = recv_topk_idx->typed_data();
  out.recv_topk_weights = recv_topk_weights->typed_data();
  out.num_recv_per_expert = num_recv_per_expert->typed_data();
  out.expert_group_sizes = expert_group_sizes->typed_data();
  out.num_kept = num_kept->typed_data();
  out.num_needed = num_needed->typed_data();
  out.recv_src_rank = recv_src_rank->typed_data();
  out.recv_src_token = recv_src_token->typed_data();
  out.is_token_in_rank = is_token_in_rank->typed_data();
  out.send_pos = send_pos->typed_data();
  if (args.layout == intranode::Layout::kRankMajor) {
    cudaMemsetAsync(out.expert_group_sizes, 0, sizeof(int) * (num_experts / R), stream);
  }
  const intranode::LaunchConfig cfg{static_cast<int>(num_sms) * kBlocksPerSm, stream};
  intranode::PeerTable peers = buf->peer_table();
  peers.call = sign_call(0, {{intranode::kSigTokens, T}, {intranode::kSigRows, capacity},
                             {intranode::kSigRowBytes, parts.row_bytes()}, {intranode::kSigTopk, K},
                             {intranode::kSigExperts, num_experts}, {intranode::kSigSms, num_sms},
                             {intranode::kSigLayout, layout}, {intranode::kSigDtype, parts.num_parts},
                             {intranode::kSigMode, expert_alignment}});
  return launch_status(target, intranode::launch_dispatch(peers, args, parts, out, cfg));
}

RowParts one_part(const ffi::AnyBuffer& src, ffi::Result<ffi::AnyBuffer>& dst) {
  RowParts p{};
  p.src[0] = static_cast<const char*>(src.untyped_data());
  p.dst[0] = static_cast<char*>(dst->untyped_data());
  p.part_bytes[0] = static_cast<int>(row_bytes_of(src));
  p.num_parts = 1;
  return p;
}

ffi::Error IntranodeDispatch(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, I32_2 topk_idx, F32_2 topk_weights,
                             int64_t buffer_id, int64_t num_experts, int64_t capacity,
                             int64_t expert_alignment, int64_t layout, int64_t num_sms,
                             ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<I32_2> recv_topk_idx,
                             ffi::Result<F32_2> recv_topk_weights, ffi::Result<I32_1> num_recv_per_expert,
                             ffi::Result<I32_1> expert_group_sizes, ffi::Result<I32_0> num_kept,
                             ffi::Result<I32_0> num_needed, ffi::Result<I32_1> recv_src_rank,
                             ffi::Result<I32_1> recv_src_token, ffi::Result<Pred2> is_token_in_rank,
                             ffi::Result<I32_2> send_pos) {
  constexpr const char* kTarget = "jax_ep_intranode_dispatch";
  if (auto err = check_row_bytes(kTarget, "x", row_bytes_of(x)); err.failure() && rows_of(x) > 0) return err;
  RowParts parts = one_part(x, recv_x);
  if (rows_of(x) == 0) parts.part_bytes[0] = static_cast<int>(row_bytes_of(*recv_x));
  return Dispatch(kTarget, stream, device, run.run_id, parts, topk_idx, topk_weights, buffer_id, num_experts, capacity,
                  expert_alignment, layout, num_sms, &*recv_topk_idx, &*recv_topk_weights,
                  &*num_recv_per_expert, &*expert_group_sizes, &*num_kept, &*num_needed,
                  &*recv_src_rank, &*recv_src_token, &*is_token_in_rank, &*send_pos);
}

ffi::Error IntranodeDispatchFp8(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                                I32_2 topk_idx, F32_2 topk_weights, int64_t buffer_id,
                                int64_t num_experts, int64_t capacity, int64_t expert_alignment,
                                int64_t layout, int64_t num_sms, ffi::Result<ffi::AnyBuffer> recv_x,
                                ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<I32_2> recv_topk_idx,
                                ffi::Result<F32_2> recv_topk_weights,
                                ffi::Result<I32_1> num_recv_per_expert,
                                ffi::Result<I32_1> expert_group_sizes, ffi::Result<I32_0> num_kept,
                                ffi::Result<I32_0> num_needed, ffi::Result<I32_1> recv_src_rank,
                                ffi::Result<I32_1> recv_src_token, ffi::Result<Pred2> is_token_in_rank,
                                ffi::Result<I32_2> send_pos) {
  constexpr const char* kTarget = "jax_ep_intranode_dispatch_fp8";
  RowParts parts = one_part(x, recv_x);
  parts.src[1] = static_cast<const char*>(scales.untyped_data());
  parts.dst[1] = static_cast<char*>(recv_scales->untyped_data());
  parts.part_bytes[0] = static_cast<int>(row_bytes_of(*recv_x));
  parts.part_bytes[1] = static_cast<int>(row_bytes_of(*recv_scales));
  parts.num_parts = 2;
  if (auto err = check_row_bytes(kTarget, "x_fp8", parts.part_bytes[0]); err.failure()) return err;
  if (auto err = check_row_bytes(kTarget, "scales", parts.part_bytes[1]); err.failure()) return err;
  return Dispatch(kTarget, stream, device, run.run_id, parts, topk_idx, topk_weights, buffer_id, num_experts, capacity,
                  expert_alignment, layout, num_sms, &*recv_topk_idx, &*recv_topk_weights,
                  &*num_recv_per_expert, &*expert_group_sizes, &*num_kept, &*num_needed,
                  &*recv_src_rank, &*recv_src_token, &*is_token_in_rank, &*send_pos);
}

ffi::Error IntranodeCachedDispatch(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, I32_1 recv_src_rank,
                                   I32_1 recv_src_token, int64_t buffer_id, int64_t num_sms,
                                   ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_intranode_cached_dispatch";
  std::shared_ptr<IntranodeBuffer> buf;
  if (auto err = lookup(kTarget, buffer_id, device, run.run_id, &buf); err.failure()) return err;
  RowParts parts = one_part(x, out);
  parts.part_bytes[0] = static_cast<int>(row_bytes_of(*out));
  if (auto err = check_row_bytes(kTarget, "x", parts.part_bytes[0]); err.failure()) return err;
  const int64_t T = rows_of(x), C = recv_src_rank.dimensions()[0];
  // The kernels stage T rows of x and write C rows of out, both of out's row
  // bytes, and read recv_src_token[c] for every c < C.
  if (recv_src_token.dimensions()[0] != C || rows_of(*out) != C) {
    return invalid_argument(kTarget, "recv_src_token and out must have C = " + std::to_string(C) +
                                         " rows like recv_src_rank, got " +
                                         std::to_string(recv_src_token.dimensions()[0]) + " and " +
                                         std::to_string(rows_of(*out)));
  }
  if (T > 0 && row_bytes_of(x) != parts.part_bytes[0]) {
    return invalid_argument(kTarget, "x and out rows must have the same bytes, got " +
                                         std::to_string(row_bytes_of(x)) + " and " +
                                         std::to_string(parts.part_bytes[0]));
  }
  if (auto err = check_fits(kTarget, *buf, intranode::row_staging_bytes(static_cast<int>(T), parts.row_bytes()));
      err.failure()) {
    return err;
  }
  const intranode::LaunchConfig cfg{static_cast<int>(num_sms) * kBlocksPerSm, stream};
  intranode::PeerTable peers = buf->peer_table();
  peers.call = sign_call(1, {{intranode::kSigTokens, T}, {intranode::kSigRows, C},
                             {intranode::kSigRowBytes, parts.row_bytes()}, {intranode::kSigSms, num_sms}});
  return launch_status(kTarget, intranode::launch_cached_dispatch(
                                    peers, static_cast<int>(T), static_cast<int>(C),
                                    recv_src_rank.typed_data(), recv_src_token.typed_data(), parts, cfg));
}

ffi::Error IntranodeCombine(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer y, I32_1 recv_src_rank,
                            I32_1 recv_src_token, I32_2 send_pos,
                            int64_t buffer_id, int64_t num_sms, int64_t layout, int64_t chunk_rows,
                            int64_t ring_rows, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_intranode_combine";
  std::shared_ptr<IntranodeBuffer> buf;
  if (auto err = lookup(kTarget, buffer_id, device, run.run_id, &buf); err.failure()) return err;
  intranode::CombineArgs args{};
  switch (y.element_type()) {
    case ffi::BF16: args.dtype = intranode::DType::kBF16; break;
    case ffi::F16: args.dtype = intranode::DType::kF16; break;
    case ffi::F32: args.dtype = intranode::DType::kF32; break;
    default: return invalid_argument(kTarget, "y must be bf16, f16 or f32");
  }
  if (y.dimensions().size() != 2) return invalid_argument(kTarget, "y must be [C, H]");
  if (layout != 0 && layout != 1) return invalid_argument(kTarget, "layout must be 0 (rank-major) or 1 (expert-major)");
  if (chunk_rows < 1) return invalid_argument(kTarget, "combine_chunk_rows must be positive");
  if (layout == 0 && (ring_rows < chunk_rows || ring_rows % chunk_rows != 0 ||
                      ring_rows / chunk_rows > intranode::kMaxRingChunks)) {
    return invalid_argument(kTarget, "combine_ring_rows must be a multiple of combine_chunk_rows, from 1 to " +
                                         std::to_string(intranode::kMaxRingChunks) + " times it; got ring " +
                                         std::to_string(ring_rows) + ", chunk " + std::to_string(chunk_rows));
  }
  const int64_t C = y.dimensions()[0], H = y.dimensions()[1];
  const int64_t T = send_pos.dimensions()[0], S = send_pos.dimensions()[1];
  if (recv_src_rank.dimensions()[0] != C || recv_src_token.dimensions()[0] != C) {
    return invalid_argument(kTarget, "recv_src_rank and recv_src_token must be [C] like y's rows");
  }
  const int R = buf->peer_table().num_ranks;
  if (!fits_int(static_cast<int64_t>(R) * C)) {
    return invalid_argument(kTarget, "num_ranks * capacity must fit an int32: R = " + std::to_string(R) +
                                         ", capacity = " + std::to_string(C));
  }
  if (S > R && S > intranode::kMaxTopk) {
    return invalid_argument(kTarget, "send_pos has " + std::to_string(S) + " columns; at most max(R, 16)");
  }
  const int blocks = intranode::combine_blocks(R, static_cast<int>(num_sms));
  if (static_cast<int64_t>(blocks) * buf->ranks_on_gpu() > buf->sm_count()) {
    return invalid_argument(kTarget, "the combine's " + std::to_string(blocks) + " spinning blocks per rank x " +
                                         std::to_string(buf->ranks_on_gpu()) + " ranks on this GPU exceed its " +
                                         std::to_string(buf->sm_count()) +
                                         " SMs (they must all be resident at once): lower NormalOptions.num_sms to "
                                         "at most " + std::to_string(buf->sm_count() / buf->ranks_on_gpu()));
  }
  const int64_t row_bytes = H * (args.dtype == intranode::DType::kF32 ? 4 : 2);
  if (auto err = check_row_bytes(kTarget, "y", row_bytes); err.failure()) return err;
  const std::size_t staging = layout == 0
                                  ? intranode::row_staging_bytes(static_cast<int>(R * ring_rows), row_bytes)
                                  : intranode::row_staging_bytes(static_cast<int>(C), row_bytes);
  if (auto err = check_fits(kTarget, *buf, staging); err.failure()) return err;
  args.y = y.untyped_data();
  args.recv_src_rank = recv_src_rank.typed_data();
  args.recv_src_token = recv_src_token.typed_data();
  args.send_pos = send_pos.typed_data();
  args.out = out->untyped_data();
  args.capacity = static_cast<int>(C);
  args.hidden = static_cast<int>(H);
  args.num_tokens = static_cast<int>(T);
  args.num_send_cols = static_cast<int>(S);
  args.chunk_rows = layout == 0 ? static_cast<int>(chunk_rows)
                                : intranode::combine_chunk_rows(static_cast<int>(C), static_cast<int>(chunk_rows));
  args.ring_rows = static_cast<int>(ring_rows);
  args.layout = layout == 0 ? intranode::Layout::kRankMajor : intranode::Layout::kExpertMajor;
  const intranode::LaunchConfig cfg{static_cast<int>(num_sms) * kBlocksPerSm, stream, static_cast<int>(num_sms)};
  intranode::PeerTable peers = buf->peer_table();
  peers.call = sign_call(2, {{intranode::kSigTokens, T}, {intranode::kSigRows, C}, {intranode::kSigRowBytes, row_bytes},
                             {intranode::kSigSms, num_sms}, {intranode::kSigChunkRows, args.chunk_rows},
                             {intranode::kSigRingRows, layout == 0 ? ring_rows : 0}, {intranode::kSigLayout, layout},
                             {intranode::kSigDtype, static_cast<int64_t>(args.dtype)}});
  return launch_status(kTarget, intranode::launch_combine(peers, args, cfg));
}

// jax_ep_status  (any operands: order it after the calls whose status it
// reads) -> s32[4] (intranode::launch_read_status). Unlike the ops it does
// not refuse a buffer that failed: reporting that is its job.
ffi::Error Status(cudaStream_t stream, int32_t device, ffi::RemainingArgs /*after*/, int64_t buffer_id,
                  ffi::Result<I32_1> out) {
  constexpr const char* kTarget = "jax_ep_status";
  if (out->dimensions()[0] != 4) return invalid_argument(kTarget, "the status has 4 entries");
  const std::shared_ptr<IntranodeBuffer> buf = Runtime::get().find_any(buffer_id, device);
  if (buf == nullptr) return invalid_argument(kTarget, "no jax_ep buffer " + std::to_string(buffer_id) + " here");
  return launch_status(kTarget, intranode::launch_read_status(buf->peer_table(), out->typed_data(), stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StatusHandler, Status,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .RemainingArgs()
                                  .Attr<int64_t>("buffer_id")
                                  .Ret<I32_1>(),
                              {ffi::Traits::kCmdBufferCompatible});

#define JAX_EP_DISPATCH_ATTRS                                                     \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("num_experts").Attr<int64_t>("capacity") \
      .Attr<int64_t>("expert_alignment").Attr<int64_t>("layout").Attr<int64_t>("num_sms")
#define JAX_EP_DISPATCH_RETS                                                        \
  .Ret<I32_2>().Ret<F32_2>().Ret<I32_1>().Ret<I32_1>().Ret<I32_0>().Ret<I32_0>()    \
      .Ret<I32_1>().Ret<I32_1>().Ret<Pred2>().Ret<I32_2>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(IntranodeDispatchHandler, IntranodeDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<F32_2>() JAX_EP_DISPATCH_ATTRS
                                  .Ret<ffi::AnyBuffer>() JAX_EP_DISPATCH_RETS,
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(IntranodeDispatchFp8Handler, IntranodeDispatchFp8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<F32_2>() JAX_EP_DISPATCH_ATTRS
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JAX_EP_DISPATCH_RETS,
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(IntranodeCachedDispatchHandler, IntranodeCachedDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_sms")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(IntranodeCombineHandler, IntranodeCombine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Arg<I32_2>()
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("chunk_rows")
                                  .Attr<int64_t>("ring_rows")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
