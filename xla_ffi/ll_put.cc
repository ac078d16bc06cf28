// FFI handlers of the low-latency put path (cuda/ll_put.cuh), registered from
// the jax_ep._nvshmem module (the one whose device code NVSHMEM knows):
//
//   jax_ep_ll_put_dispatch_send  rank_mask pred[R], x bf16[T, H] (or per-slot rows bf16[T, K, H],
//                                BF16 payload), topk_idx s32[T, K] -> token s32[]
//   jax_ep_ll_put_dispatch_recv  rank_mask, token, (ignored trailing operands) ->
//                                recv_x [E/R, R*M, H] (bf16, or f8e4m3fn), recv_scales
//                                [E/R, R*M, G] (f32, s32 packed UE8M0, or f32 with G = 0),
//                                recv_count s32[E/R], recv_src_rank/token/slot s32[E/R, R*M]
//   jax_ep_ll_put_combine_send   rank_mask, y bf16[E/R, R*M, H], recv_src_rank/token/slot -> token
//   jax_ep_ll_put_combine_recv   rank_mask, token, topk_idx s32[T, K], topk_weights f32[T, K],
//                                (ignored trailing operands) -> out bf16[T, H]
//   jax_ep_ll_put_combine_gather_recv  rank_mask, token, topk_idx s32[T, K] -> out bf16[T, K, H]
//                                (the rows unsummed: the backward of dispatch and combine)
//
//   jax_ep_ll_put_status         (any operands: orders it after the calls whose status it reads)
//                                -> s32[4] {code, rank at fault, this rank, op}; attr buffer_id
//
//   attrs (the four calls): buffer_id, num_experts, max_tokens (M), hidden, num_topk,
//   payload (0 BF16, 1 FP8, 2 FP8 pow2 scales, 3 FP8 UE8M0), combine_payload
//   (0 BF16 rows, 1 FP8 rows with a float scale per 128 channels), num_sms;
//   the receives and the combine send also num_tokens (T).
//
// Every call carries the pointer path's call signature (op, M, row bytes, K,
// E, num_sms, payload, and the FP8-combine mode; runtime.h sign_call), sent
// to every peer by the send and compared by the receive (ll_put.cuh): a
// peer that made another call fails the receive with a mismatch record.
//
// The operands, outputs and handle are those of the pointer path's targets
// (xla_ffi/low_latency.cc). Every send runs on XLA's stream and only issues
// puts (or, to pointer peers, stores): it returns without waiting for any
// peer, so nothing holds an SM between a send and its receive. A receive
// waits at most the buffer's timeout for each peer; a failed wait records
// what failed in the buffer's failure record (read by jax_ep through
// put_buffer_failure, and by jax_ep_ll_put_status on the GPU), raises the
// abort word in every rank and returns (docs/faults.md). The handlers
// refuse a buffer that failed earlier. The rank mask (true: a masked rank)
// is read on the GPU.
#include <string>

#include "../cuda/ll_put.cuh"
#include "ffi_helpers.h"
#include "ll_put_buffers.h"
#include "runtime.h"

namespace jax_ep {
namespace ll_put {
namespace {

struct Call {
  std::shared_ptr<PutBuffer> buf;  // held for the handler's duration
  Args args{};
};

// Finds the buffer and checks the attributes against it and the kernels.
ffi::Error prepare(const char* target, int32_t device, int64_t run, const Mask& rank_mask, int64_t buffer_id,
                   int64_t num_tokens, int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                   int64_t payload, int64_t combine_payload, Call* call) {
  std::string error;
  call->buf = find_live_put_buffer(buffer_id, device, run, "put-path", &error);
  if (call->buf == nullptr) return invalid_argument(target, error);
  const int R = call->buf->num_ranks();
  if (num_experts < R || num_experts % R != 0 || num_experts > kMaxWords) {
    return invalid_argument(target, "num_experts must be a multiple of the rank count " + std::to_string(R) +
                                        " and at most " + std::to_string(kMaxWords) + ", got " +
                                        std::to_string(num_experts));
  }
  if (num_topk < 1 || num_topk > intranode::kMaxTopk) {
    return invalid_argument(target, "num_topk (K) must be in [1, " + std::to_string(intranode::kMaxTopk) + "], got " +
                                        std::to_string(num_topk));
  }
  if (hidden < 128 || hidden % 128 != 0 || (payload != 0 && hidden % 512 != 0)) {
    return invalid_argument(target, "the put path needs hidden % 128 == 0 (% 512 with FP8), got " +
                                        std::to_string(hidden));
  }
  if (payload < 0 || payload > 3) return invalid_argument(target, "payload must be in [0, 3]");
  if (combine_payload != 0 && combine_payload != 1) return invalid_argument(target, "combine_payload must be 0 or 1");
  if (max_tokens < 1 || !fits_int(max_tokens) || num_tokens < 0 || num_tokens > max_tokens) {
    return invalid_argument(target, "need 0 <= T <= max_tokens, got T = " + std::to_string(num_tokens) +
                                        ", max_tokens = " + std::to_string(max_tokens));
  }
  if (rank_mask.dimensions().size() != 1 || rank_mask.dimensions()[0] != R) {
    return invalid_argument(target, "the rank mask must be pred[" + std::to_string(R) + "]");
  }
  const Shape shape{static_cast<int>(num_tokens), static_cast<int>(max_tokens), static_cast<int>(num_topk),
                    static_cast<int>(num_experts), static_cast<int>(hidden), static_cast<Payload>(payload),
                    combine_payload == 1};
  const std::size_t need = ll_put::buffer_bytes(shape, R);
  if (need > call->buf->num_bytes()) {
    return invalid_argument(target, "the jax_ep low-latency buffer is too small for the put path: it needs " +
                                        std::to_string(need) + " bytes, it has " +
                                        std::to_string(call->buf->num_bytes()) +
                                        "; size it with jax_ep.low_latency_buffer_bytes(..., ranks_per_node=...)");
  }
  call->args = call->buf->args(shape, rank_mask.typed_data());
  return ffi::Error::Success();
}

// The call's signature, as the pointer path's (xla_ffi/low_latency.cc,
// Call::sign): `op` 3 dispatch, 4 combine; `mode` the FP8-combine rows
// (combine) or 0 (the put path's dispatch never pulls).
void sign(Call& c, int op, int64_t num_sms, int64_t mode) {
  using namespace intranode;
  const Shape& s = c.args.shape;
  c.args.call = sign_call(op, {{kSigRows, s.max_tokens}, {kSigRowBytes, int64_t{s.hidden} * 2}, {kSigTopk, s.num_topk},
                               {kSigExperts, s.num_experts}, {kSigSms, num_sms},
                               {kSigDtype, static_cast<int64_t>(s.payload)}, {kSigMode, mode}});
}

int blocks(int64_t num_sms) { return static_cast<int>(num_sms > 0 ? num_sms : 1); }

ffi::Error DispatchSend(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, ffi::AnyBuffer x, I32_2 topk_idx,
                        int64_t buffer_id, int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                        int64_t payload, int64_t combine_payload, int64_t num_sms, ffi::Result<I32_0> token) {
  constexpr const char* kTarget = "jax_ep_ll_put_dispatch_send";
  if (x.element_type() != ffi::BF16) return invalid_argument(kTarget, "x must be bfloat16");
  const int64_t t = topk_idx.dimensions()[0];
  // x [T, H]: every slot sends its token's row; x [T, K, H] (BF16 only):
  // every slot its own row (the backward of combine).
  const bool per_slot = x.dimensions().size() == 3;
  if (per_slot && (payload != 0 || !has_shape(x.dimensions(), {t, num_topk, hidden}))) {
    return invalid_argument(kTarget, "per-slot rows must be bfloat16 [T, K, H] matching topk_idx, with a BF16 payload");
  }
  if (!per_slot && !has_shape(x.dimensions(), {t, hidden})) return shape_error(kTarget, "x", x.dimensions(), {t, hidden});
  if (!has_shape(topk_idx.dimensions(), {t, num_topk})) {
    return shape_error(kTarget, "topk_idx", topk_idx.dimensions(), {t, num_topk});
  }
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, rank_mask, buffer_id, t, num_experts, max_tokens, hidden, num_topk, payload,
                         combine_payload, &c);
      err.failure()) {
    return err;
  }
  sign(c, 3, num_sms, 0);
  cudaError_t err = cudaMemsetAsync(token->typed_data(), 0, sizeof(int), stream);
  if (err == cudaSuccess) {  // T = 0 still sends the signature and the final adds (count 0)
    err = ll_put::launch_dispatch_send(c.args, x.untyped_data(), topk_idx.typed_data(), blocks(num_sms), stream,
                                       per_slot);
  }
  return launch_status(kTarget, err);
}

ffi::Error DispatchRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                        ffi::RemainingArgs /*unread*/, int64_t buffer_id, int64_t num_tokens, int64_t num_experts,
                        int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t payload,
                        int64_t combine_payload, int64_t num_sms, ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_scales,
                        ffi::Result<I32_1> recv_count, ffi::Result<I32_2> src_rank, ffi::Result<I32_2> src_token,
                        ffi::Result<I32_2> src_slot) {
  constexpr const char* kTarget = "jax_ep_ll_put_dispatch_recv";
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, rank_mask, buffer_id, num_tokens, num_experts, max_tokens, hidden,
                         num_topk, payload, combine_payload, &c);
      err.failure()) {
    return err;
  }
  sign(c, 3, num_sms, 0);
  const int R = c.buf->num_ranks();
  const int64_t le = num_experts / R, rows = R * max_tokens;
  if (!has_shape(recv_x->dimensions(), {le, rows, hidden})) {
    return shape_error(kTarget, "recv_x", recv_x->dimensions(), {le, rows, hidden});
  }
  if (recv_x->element_type() != (payload == 0 ? ffi::BF16 : ffi::F8E4M3FN)) {
    return invalid_argument(kTarget, "recv_x must be bfloat16 (BF16 payload) or float8_e4m3fn (FP8)");
  }
  if (!has_shape(src_rank->dimensions(), {le, rows})) {
    return shape_error(kTarget, "recv_src_rank", src_rank->dimensions(), {le, rows});
  }
  // The pack kernel writes every row of these.
  if (!has_shape(src_token->dimensions(), {le, rows}) || !has_shape(src_slot->dimensions(), {le, rows}) ||
      !has_shape(recv_count->dimensions(), {le}) ||
      (c.args.shape.fp8() &&
       recv_scales->size_bytes() != static_cast<std::size_t>(le * rows) * c.args.shape.scale_bytes())) {
    return invalid_argument(kTarget, "recv_src_token/slot must be [E/R, R*M], recv_count [E/R], and FP8 "
                                     "recv_scales [E/R, R*M, G]");
  }
  return launch_status(kTarget, ll_put::launch_dispatch_recv(c.args, recv_x->untyped_data(), recv_scales->untyped_data(),
                                                     recv_count->typed_data(), src_rank->typed_data(),
                                                     src_token->typed_data(), src_slot->typed_data(),
                                                     blocks(num_sms), stream));
}

ffi::Error CombineSend(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, ffi::AnyBuffer y, I32_2 src_rank,
                       I32_2 src_token, I32_2 src_slot, int64_t buffer_id, int64_t num_tokens, int64_t num_experts,
                       int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t payload,
                       int64_t combine_payload, int64_t num_sms, ffi::Result<I32_0> token) {
  constexpr const char* kTarget = "jax_ep_ll_put_combine_send";
  if (y.element_type() != ffi::BF16) return invalid_argument(kTarget, "y must be bfloat16 (the put path's combine)");
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, rank_mask, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk,
                         payload, combine_payload, &c);
      err.failure()) {
    return err;
  }
  sign(c, 4, num_sms, combine_payload);
  const int R = c.buf->num_ranks();
  const int64_t le = num_experts / R, rows = R * max_tokens;
  if (!has_shape(y.dimensions(), {le, rows, hidden})) return shape_error(kTarget, "y", y.dimensions(), {le, rows, hidden});
  for (const auto* h : {&src_rank, &src_token, &src_slot}) {
    if (!has_shape(h->dimensions(), {le, rows})) return shape_error(kTarget, "the handle", h->dimensions(), {le, rows});
  }
  cudaError_t err = cudaMemsetAsync(token->typed_data(), 0, sizeof(int), stream);
  if (err == cudaSuccess) {
    err = ll_put::launch_combine_send(c.args, y.untyped_data(), src_rank.typed_data(), src_token.typed_data(),
                              src_slot.typed_data(), blocks(num_sms), stream);
  }
  return launch_status(kTarget, err);
}

ffi::Error CombineRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                       I32_2 topk_idx, F32_2 topk_weights, ffi::RemainingArgs /*unread*/, int64_t buffer_id,
                       int64_t num_tokens, int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                       int64_t payload, int64_t combine_payload, int64_t num_sms,
                       ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_ll_put_combine_recv";
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, rank_mask, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk,
                         payload, combine_payload, &c);
      err.failure()) {
    return err;
  }
  sign(c, 4, num_sms, combine_payload);
  if (!has_shape(topk_idx.dimensions(), {num_tokens, num_topk})) {
    return shape_error(kTarget, "topk_idx", topk_idx.dimensions(), {num_tokens, num_topk});
  }
  if (!has_shape(topk_weights.dimensions(), {num_tokens, num_topk})) {
    return shape_error(kTarget, "topk_weights", topk_weights.dimensions(), {num_tokens, num_topk});
  }
  if (out->element_type() != ffi::BF16 || !has_shape(out->dimensions(), {num_tokens, hidden})) {
    return invalid_argument(kTarget, "out must be bfloat16 [T, H]");
  }
  return launch_status(kTarget, ll_put::launch_combine_recv(c.args, topk_idx.typed_data(), topk_weights.typed_data(),
                                                    out->untyped_data(), blocks(num_sms), stream));
}

// The rows of a combine send unsummed, [T, K, H] bf16 (BF16 rows only).
ffi::Error CombineGatherRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                             I32_2 topk_idx, int64_t buffer_id, int64_t num_tokens, int64_t num_experts,
                             int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t payload,
                             int64_t combine_payload, int64_t num_sms, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_ll_put_combine_gather_recv";
  if (combine_payload != 0) return invalid_argument(kTarget, "the unsummed combine takes BF16 rows only");
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, rank_mask, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk,
                         payload, combine_payload, &c);
      err.failure()) {
    return err;
  }
  sign(c, 4, num_sms, combine_payload);
  if (!has_shape(topk_idx.dimensions(), {num_tokens, num_topk})) {
    return shape_error(kTarget, "topk_idx", topk_idx.dimensions(), {num_tokens, num_topk});
  }
  if (out->element_type() != ffi::BF16 || !has_shape(out->dimensions(), {num_tokens, num_topk, hidden})) {
    return invalid_argument(kTarget, "out must be bfloat16 [T, K, H]");
  }
  return launch_status(kTarget, ll_put::launch_combine_gather(c.args, topk_idx.typed_data(), out->untyped_data(),
                                                              blocks(num_sms), stream));
}

// The buffer's failure record as s32[4] (launch_read_status). Unlike the
// calls it does not refuse a buffer that failed: reporting that is its job.
ffi::Error Status(cudaStream_t stream, int32_t device, ffi::RemainingArgs /*after*/, int64_t buffer_id,
                  ffi::Result<I32_1> out) {
  constexpr const char* kTarget = "jax_ep_ll_put_status";
  if (out->dimensions().size() != 1 || out->dimensions()[0] != 4) {
    return invalid_argument(kTarget, "the status has 4 entries");
  }
  std::string error;
  const std::shared_ptr<PutBuffer> buf = find_put_buffer(buffer_id, device, &error);
  if (buf == nullptr) return invalid_argument(kTarget, error);
  return launch_status(kTarget, ll_put::launch_read_status(buf->args(Shape{}, nullptr), out->typed_data(), stream));
}

}  // namespace
}  // namespace ll_put

#define JAX_EP_LL_PUT_ATTRS                                                                           \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("num_experts").Attr<int64_t>("max_tokens")                \
      .Attr<int64_t>("hidden").Attr<int64_t>("num_topk").Attr<int64_t>("payload")                     \
      .Attr<int64_t>("combine_payload").Attr<int64_t>("num_sms")
#define JAX_EP_LL_PUT_ATTRS_T                                                                         \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("num_tokens").Attr<int64_t>("num_experts")               \
      .Attr<int64_t>("max_tokens").Attr<int64_t>("hidden").Attr<int64_t>("num_topk")                  \
      .Attr<int64_t>("payload").Attr<int64_t>("combine_payload").Attr<int64_t>("num_sms")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutDispatchSendHandler, ll_put::DispatchSend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>() JAX_EP_LL_PUT_ATTRS.Ret<I32_0>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutDispatchRecvHandler, ll_put::DispatchRecv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<I32_0>()
                                  .RemainingArgs() JAX_EP_LL_PUT_ATTRS_T
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<I32_1>()
                                  .Ret<I32_2>()
                                  .Ret<I32_2>()
                                  .Ret<I32_2>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutCombineSendHandler, ll_put::CombineSend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<I32_2>()
                                  .Arg<I32_2>() JAX_EP_LL_PUT_ATTRS_T.Ret<I32_0>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutCombineRecvHandler, ll_put::CombineRecv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<I32_0>()
                                  .Arg<I32_2>()
                                  .Arg<F32_2>()
                                  .RemainingArgs() JAX_EP_LL_PUT_ATTRS_T
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutCombineGatherRecvHandler, ll_put::CombineGatherRecv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<I32_0>()
                                  .Arg<I32_2>() JAX_EP_LL_PUT_ATTRS_T
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyPutStatusHandler, ll_put::Status,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .RemainingArgs()
                                  .Attr<int64_t>("buffer_id")
                                  .Ret<I32_1>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
