// FFI handlers of the low-latency ops (send and receive halves):
//
//   jax_ep_ll_dispatch_send   x bf16[T, H] (or per-slot rows bf16[T, K, H], BF16 payload),
//                             topk_idx s32[T, K] -> token s32[]
//   jax_ep_ll_dispatch_recv   token -> recv_x [E/R, R*M, H] (bf16, or f8e4m3fn),
//                             recv_scales [E/R, R*M, G] (f32 scales, s32 packed UE8M0,
//                             or f32 with G = 0 for BF16), recv_count s32[E/R],
//                             recv_src_rank/token/slot s32[E/R, R*M]
//   jax_ep_ll_combine_send    y bf16[E/R, R*M, H], recv_src_rank/token/slot -> token
//   jax_ep_ll_combine_recv    token, topk_idx s32[T, K], topk_weights f32[T, K] -> out bf16[T, H]
//   jax_ep_ll_combine_gather_recv  token, topk_idx s32[T, K] -> out bf16[T, K, H] (unsummed rows)
//
//   Every target takes first a rank mask, pred[R] (true: a masked rank, which
//   this rank neither writes to nor waits for; all false: every rank takes
//   part), read by the kernels from device memory on each call.
//
//   attrs (all): buffer_id, num_experts, max_tokens (M), hidden, num_topk, payload
//   (0 BF16, 1 FP8, 2 FP8 with power-of-two scales, 3 FP8 with UE8M0),
//   combine_payload (0 BF16 rows, 1 FP8 rows with a float scale per 128
//   channels), num_sms; the dispatch send and receive also take `pull`
//   (1: the receivers copy from the senders' staging, where the shapes allow
//   it; 0: the senders push); the combine send and receive take `zero_copy`
//   (1: the one-call combine's owners read the rows in place from each
//   rank's XLA memory where it can; its receive then takes y and the routing
//   again as trailing operands).
//
// A receive must follow its send on the same buffer before the next send of
// that kind (the tokens order them).
//
// Each target has an asynchronous twin, `<target>_async`, for the split API:
// the send runs on the buffer's high-priority send stream (after the work
// already queued on XLA's stream), so XLA's next ops run beside it, and the
// receive first makes XLA's stream wait for that send. The twins take the
// send's inputs again as trailing operands of the receive (unread): that keeps
// XLA from reusing their memory while the send stream may still read them.
// They are not command-buffer compatible (the fork and join span two custom
// calls, which XLA would capture into separate graphs).
#include <string>

#include "../cuda/low_latency.cuh"
#include "ffi_helpers.h"
#include "handlers.h"
#include "runtime.h"

namespace jax_ep {
namespace {

constexpr int kBlocksPerSm = 1;  // 512-thread blocks

struct Call {
  std::shared_ptr<IntranodeBuffer> buf;  // held for the handler's duration
  low_latency::Shape shape{};
  intranode::CallSignature sig{};
  const bool* rank_mask = nullptr;  // pred[R] in device memory (use_rank_mask)

  // What every rank must agree on for this call: `op` (3 dispatch, 4
  // combine, send and receive alike), the layout's shapes, the SM budget and
  // `mode` (dispatch: pulled; combine: FP8 rows). T may differ per rank.
  void sign(int op, int64_t num_sms, int64_t mode) {
    using namespace intranode;
    sig = sign_call(op, {{kSigRows, shape.max_tokens}, {kSigRowBytes, int64_t{shape.hidden} * 2},
                         {kSigTopk, shape.num_topk}, {kSigExperts, shape.num_experts}, {kSigSms, num_sms},
                         {kSigDtype, static_cast<int64_t>(shape.payload)}, {kSigMode, mode}});
  }
  intranode::PeerTable peers() const {
    intranode::PeerTable t = buf->peer_table();
    t.call = sig;
    t.rank_mask = rank_mask;
    return t;
  }
};

ffi::Error prepare(const char* target, int32_t device, int64_t run, int64_t buffer_id, int64_t num_tokens, int64_t num_experts,
                   int64_t max_tokens, int64_t hidden, int64_t num_topk, int64_t payload, int64_t combine_payload,
                   Call* call) {
  std::string error;
  call->buf = Runtime::get().find(buffer_id, device, run, &error);
  if (call->buf == nullptr) return invalid_argument(target, error);
  const int R = call->buf->num_ranks();
  if (num_experts < R || num_experts % R != 0) {
    return invalid_argument(target, "num_experts must be a positive multiple of the rank count " + std::to_string(R) +
                                        ", got " + std::to_string(num_experts));
  }
  // The kernels send and sum at most kMaxTopk slots per token (a warp per slot).
  if (num_topk < 1 || num_topk > intranode::kMaxTopk) {
    return invalid_argument(target, "num_topk (K) must be in [1, " + std::to_string(intranode::kMaxTopk) +
                                        "] for low-latency calls, got " + std::to_string(num_topk));
  }
  if (num_experts > static_cast<int64_t>(low_latency::kCountSlots)) {
    return invalid_argument(target, "num_experts must be at most 2048");
  }
  if (hidden % 512 != 0 && payload != 0) return invalid_argument(target, "FP8 needs hidden % 512 == 0 here");
  if (hidden % 8 != 0) return invalid_argument(target, "hidden must be a multiple of 8");
  if (num_tokens > max_tokens) return invalid_argument(target, "T must be <= max_tokens");
  if (combine_payload != 0 && combine_payload != 1) return invalid_argument(target, "combine_payload must be 0 or 1");
  if (combine_payload == 1 && hidden % 512 != 0) {
    return invalid_argument(target, "an FP8 combine needs hidden % 512 == 0");
  }
  call->shape = low_latency::Shape{static_cast<int>(num_tokens), static_cast<int>(max_tokens),
                                   static_cast<int>(num_topk), static_cast<int>(num_experts),
                                   static_cast<int>(hidden), static_cast<low_latency::Payload>(payload),
                                   combine_payload == 1};
  const std::size_t need = low_latency::Layout::make(call->shape, R).half_bytes;
  if (need > call->buf->staging_half_bytes()) {
    return invalid_argument(target, "the jax_ep low-latency buffer is too small: it needs " +
                                        std::to_string(need) + " bytes per half, it has " +
                                        std::to_string(call->buf->staging_half_bytes()) +
                                        "; size it with jax_ep.low_latency_buffer_bytes");
  }
  return ffi::Error::Success();
}

// The buffer's peer table with the call's rank mask (pred[R]).
// Validates the call's rank mask (pred[R], true for a masked rank) and
// hands it to the kernels through the call's peer table.
ffi::Error use_rank_mask(const char* target, Call& c, const Mask& mask) {
  const int num_ranks = c.buf->num_ranks();
  if (mask.dimensions().size() != 1 || mask.dimensions()[0] != num_ranks) {
    return invalid_argument(target, "the rank mask must be pred[" + std::to_string(num_ranks) + "]");
  }
  c.rank_mask = mask.typed_data();
  return ffi::Error::Success();
}

constexpr int kDispatch = 0, kCombine = 1;

// Whether a dispatch asked to pull (attr `pull`) does: where the shapes allow
// it (low_latency::pull_supported), else it pushes. Send and receive decide alike.
bool pulls(const Call& c, int64_t pull) {
  return pull != 0 && low_latency::pull_supported(c.shape, c.buf->num_ranks());
}

// Zeroes the send's `token` on XLA's stream (XLA may hand it on as soon as
// that stream reaches it), then runs `launch(stream, nullptr)` on the
// buffer's send stream after everything queued on XLA's `stream`, and records
// the send's `kind` event there.
template <class Launch>
ffi::Error launch_on_send_stream(const char* target, const std::shared_ptr<IntranodeBuffer>& buf, int kind, cudaStream_t stream,
                                 int* token, Launch launch) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(stream, &capture);
  if (capture != cudaStreamCaptureStatusNone) {
    return invalid_argument(target, "an asynchronous send cannot be captured into a CUDA graph; use "
                                    "LowLatencyOptions(async_send=False) inside captured code");
  }
  IntranodeBuffer::SendStream* side = nullptr;
  cudaError_t err = buf->send_stream(&side);
  if (err == cudaSuccess) err = cudaMemsetAsync(token, 0, sizeof(int), stream);
  if (err == cudaSuccess) err = cudaEventRecord(side->fork[kind], stream);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(side->stream, side->fork[kind], 0);
  if (err == cudaSuccess) err = launch(side->stream, nullptr);
  if (err == cudaSuccess) err = cudaEventRecord(side->done[kind], side->stream);
  return launch_status(target, err);
}

// Makes XLA's `stream` wait for the last asynchronous send of `kind`.
ffi::Error join_send_stream(const char* target, const std::shared_ptr<IntranodeBuffer>& buf, int kind, cudaStream_t stream) {
  IntranodeBuffer::SendStream* side = nullptr;
  cudaError_t err = buf->send_stream(&side);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, side->done[kind], 0);
  return launch_status(target, err);
}

template <bool kAsync>
ffi::Error DispatchSend(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, ffi::AnyBuffer x, I32_2 topk_idx,
                        int64_t buffer_id,
                        int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                        int64_t payload, int64_t combine_payload, int64_t num_sms, int64_t pull,
                        ffi::Result<I32_0> token) {
  constexpr const char* kTarget = kAsync ? "jax_ep_ll_dispatch_send_async" : "jax_ep_ll_dispatch_send";
  if (x.element_type() != ffi::BF16) return invalid_argument(kTarget, "x must be bfloat16");
  // x [T, H]: every slot sends its token's row; x [T, K, H] (BF16 only): every
  // slot sends its own row (the backward of combine).
  const bool per_slot = x.dimensions().size() == 3;
  if (per_slot && (payload != 0 || x.dimensions()[0] != topk_idx.dimensions()[0] ||
                   x.dimensions()[1] != topk_idx.dimensions()[1] || x.dimensions()[2] != hidden)) {
    return invalid_argument(kTarget, "per-slot rows must be bfloat16 [T, K, H] matching topk_idx, with a BF16 payload");
  }
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, buffer_id, topk_idx.dimensions()[0], num_experts, max_tokens, hidden,
                         num_topk, payload, combine_payload, &c);
      err.failure()) {
    return err;
  }
  if (per_slot && pull != 0) return invalid_argument(kTarget, "per-slot rows are pushed: pass pull=0");
  if (auto err = use_rank_mask(kTarget, c, rank_mask); err.failure()) return err;
  const bool pulled = pulls(c, pull);
  c.sign(3, num_sms, pulled ? 1 : 0);
  auto launch = [&](cudaStream_t on, int* kernel_token) {
    const int blocks = static_cast<int>(num_sms) * kBlocksPerSm;
    if (pulled) {
      return low_latency::launch_dispatch_stage(c.peers(), c.shape, x.untyped_data(),
                                                topk_idx.typed_data(), kernel_token, blocks, on);
    }
    return low_latency::launch_dispatch_send(c.peers(), c.shape, x.untyped_data(), topk_idx.typed_data(),
                                             kernel_token, blocks, on, per_slot);
  };
  if constexpr (kAsync) return launch_on_send_stream(kTarget, c.buf, kDispatch, stream, token->typed_data(), launch);
  return launch_status(kTarget, launch(stream, token->typed_data()));
}

template <bool kAsync>
ffi::Error DispatchRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                        ffi::RemainingArgs /*the send's inputs, kept alive*/, int64_t buffer_id, int64_t num_tokens,
                        int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                        int64_t payload, int64_t combine_payload, int64_t num_sms, int64_t pull,
                        ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<ffi::AnyBuffer> recv_scales, ffi::Result<I32_1> recv_count,
                        ffi::Result<I32_2> src_rank, ffi::Result<I32_2> src_token, ffi::Result<I32_2> src_slot) {
  constexpr const char* kTarget = kAsync ? "jax_ep_ll_dispatch_recv_async" : "jax_ep_ll_dispatch_recv";
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk, payload,
                         combine_payload, &c);
      err.failure()) {
    return err;
  }
  if constexpr (kAsync) {
    if (auto err = join_send_stream(kTarget, c.buf, kDispatch, stream); err.failure()) return err;
  }
  if (auto err = use_rank_mask(kTarget, c, rank_mask); err.failure()) return err;
  c.sign(3, num_sms, pulls(c, pull) ? 1 : 0);
  auto* receive = pulls(c, pull) ? low_latency::launch_dispatch_pull : low_latency::launch_dispatch_recv;
  return launch_status(kTarget, receive(c.peers(), c.shape, recv_x->untyped_data(),
                                        recv_scales->untyped_data(), recv_count->typed_data(), src_rank->typed_data(),
                                        src_token->typed_data(), src_slot->typed_data(),
                                        static_cast<int>(num_sms) * kBlocksPerSm, stream));
}

// Where y lies in this rank's XLA memory when a combine asked for zero copy
// (attr `zero_copy`) can have it: BF16 rows, every rank's XLA memory mapped
// by every rank, y inside this rank's. Else -1: the rows are pushed. The send
// and the receive decide alike (the receive takes y again).
long long zero_copy_offset(const Call& c, int64_t zero_copy, const void* y) {
  if (zero_copy == 0 || c.shape.combine_fp8) return -1;
  const std::size_t bytes = static_cast<std::size_t>(c.shape.local_experts(c.buf->num_ranks())) *
                            c.buf->num_ranks() * c.shape.max_tokens * c.shape.hidden * 2;
  return c.buf->xla_memory_offset(y, bytes);
}

low_latency::XlaMemory xla_memory(const IntranodeBuffer& buf) {
  low_latency::XlaMemory m{};
  const auto& bases = buf.xla_bases();
  for (std::size_t r = 0; r < bases.size(); ++r) m.base[r] = bases[r];
  return m;
}

template <bool kAsync>
ffi::Error CombineSend(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, ffi::AnyBuffer y, I32_2 src_rank,
                       I32_2 src_token, I32_2 src_slot, int64_t buffer_id, int64_t num_tokens,
                       int64_t num_experts, int64_t max_tokens, int64_t hidden, int64_t num_topk,
                       int64_t payload, int64_t combine_payload, int64_t num_sms, int64_t zero_copy,
                       ffi::Result<I32_0> token) {
  constexpr const char* kTarget = kAsync ? "jax_ep_ll_combine_send_async" : "jax_ep_ll_combine_send";
  if (y.element_type() != ffi::BF16) return invalid_argument(kTarget, "y must be bfloat16");
  if (kAsync && zero_copy != 0) return invalid_argument(kTarget, "an asynchronous send pushes: pass zero_copy=0");
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk, payload,
                         combine_payload, &c);
      err.failure()) {
    return err;
  }
  c.sign(4, num_sms, combine_payload);
  // Zero copy: the receive publishes y's rows; nothing moves here.
  if (zero_copy_offset(c, zero_copy, y.untyped_data()) >= 0) {
    return launch_status(kTarget, cudaMemsetAsync(token->typed_data(), 0, sizeof(int), stream));
  }
  if (auto err = use_rank_mask(kTarget, c, rank_mask); err.failure()) return err;
  auto launch = [&](cudaStream_t on, int* kernel_token) {
    return low_latency::launch_combine_send(c.peers(), c.shape, y.untyped_data(), src_rank.typed_data(),
                                            src_token.typed_data(), src_slot.typed_data(), kernel_token,
                                            static_cast<int>(num_sms) * kBlocksPerSm, on);
  };
  if constexpr (kAsync) return launch_on_send_stream(kTarget, c.buf, kCombine, stream, token->typed_data(), launch);
  return launch_status(kTarget, launch(stream, token->typed_data()));
}

template <bool kAsync>
ffi::Error CombineRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                       I32_2 topk_idx,
                       F32_2 topk_weights, ffi::RemainingArgs sent /*the send's inputs, kept alive*/,
                       int64_t buffer_id, int64_t num_tokens, int64_t num_experts, int64_t max_tokens, int64_t hidden,
                       int64_t num_topk, int64_t payload, int64_t combine_payload, int64_t num_sms,
                       int64_t zero_copy, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = kAsync ? "jax_ep_ll_combine_recv_async" : "jax_ep_ll_combine_recv";
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk, payload,
                         combine_payload, &c);
      err.failure()) {
    return err;
  }
  if (!has_shape(topk_idx.dimensions(), {num_tokens, num_topk})) {
    return shape_error(kTarget, "topk_idx", topk_idx.dimensions(), {num_tokens, num_topk});
  }
  if (!has_shape(topk_weights.dimensions(), {num_tokens, num_topk})) {
    return shape_error(kTarget, "topk_weights", topk_weights.dimensions(), {num_tokens, num_topk});
  }
  c.sign(4, num_sms, combine_payload);
  if constexpr (kAsync) {
    if (auto err = join_send_stream(kTarget, c.buf, kCombine, stream); err.failure()) return err;
  }
  // Zero copy: this receive publishes the send's y (its trailing operands:
  // y and the routing) and holds y until every rank has read its rows.
  low_latency::ZeroCopy published;
  if (zero_copy != 0) {
    constexpr const char* kNeedsY = "a zero-copy receive takes the send's y and routing as trailing operands";
    if (kAsync || sent.size() != 4) return invalid_argument(kTarget, kNeedsY);
    auto y = sent.get<ffi::AnyBuffer>(0);
    auto rank = sent.get<I32_2>(1), tok = sent.get<I32_2>(2), slot = sent.get<I32_2>(3);
    if (!y.has_value() || !rank.has_value() || !tok.has_value() || !slot.has_value()) {
      return invalid_argument(kTarget, kNeedsY);
    }
    published.y_offset = zero_copy_offset(c, zero_copy, y->untyped_data());
    published.src_rank = rank->typed_data();
    published.src_token = tok->typed_data();
    published.src_slot = slot->typed_data();
  }
  if (auto err = use_rank_mask(kTarget, c, rank_mask); err.failure()) return err;
  return launch_status(kTarget, low_latency::launch_combine_recv(
                                    c.peers(), c.shape, xla_memory(*c.buf), topk_idx.typed_data(),
                                    topk_weights.typed_data(), out->untyped_data(), published,
                                    static_cast<int>(num_sms) * kBlocksPerSm, stream));
}

ffi::Error CombineGatherRecv(cudaStream_t stream, int32_t device, ffi::RunId run, Mask rank_mask, I32_0 /*token: orders the call*/,
                             I32_2 topk_idx,
                             int64_t buffer_id, int64_t num_tokens, int64_t num_experts, int64_t max_tokens,
                             int64_t hidden, int64_t num_topk, int64_t payload, int64_t combine_payload,
                             int64_t num_sms, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_ll_combine_gather_recv";
  if (combine_payload != 0) return invalid_argument(kTarget, "the unsummed combine takes BF16 rows only");
  Call c;
  if (auto err = prepare(kTarget, device, run.run_id, buffer_id, num_tokens, num_experts, max_tokens, hidden, num_topk, payload,
                         combine_payload, &c);
      err.failure()) {
    return err;
  }
  if (auto err = use_rank_mask(kTarget, c, rank_mask); err.failure()) return err;
  c.sign(4, num_sms, combine_payload);
  return launch_status(kTarget, low_latency::launch_combine_gather(c.peers(), c.shape,
                                                                   topk_idx.typed_data(), out->untyped_data(),
                                                                   static_cast<int>(num_sms) * kBlocksPerSm, stream));
}

}  // namespace

#define JAX_EP_LL_ATTRS                                                                          \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("num_tokens").Attr<int64_t>("num_experts")          \
      .Attr<int64_t>("max_tokens").Attr<int64_t>("hidden").Attr<int64_t>("num_topk")             \
      .Attr<int64_t>("payload").Attr<int64_t>("combine_payload").Attr<int64_t>("num_sms")
#define JAX_EP_LL_SEND_ATTRS                                                                     \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("num_experts").Attr<int64_t>("max_tokens")           \
      .Attr<int64_t>("hidden").Attr<int64_t>("num_topk").Attr<int64_t>("payload")                \
      .Attr<int64_t>("combine_payload").Attr<int64_t>("num_sms").Attr<int64_t>("pull")

// The binding of each op; the synchronous targets are command-buffer compatible.
#define JAX_EP_LL_DISPATCH_SEND_BINDING                                                          \
  ffi::Ffi::Bind()                                                                               \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                                  \
      .Ctx<ffi::DeviceOrdinal>()                                                                 \
      .Ctx<ffi::RunId>()                                                                         \
      .Arg<Mask>()                                                                               \
      .Arg<ffi::AnyBuffer>()                                                                     \
      .Arg<I32_2>() JAX_EP_LL_SEND_ATTRS.Ret<I32_0>()
#define JAX_EP_LL_DISPATCH_RECV_BINDING                                                          \
  ffi::Ffi::Bind()                                                                               \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                                  \
      .Ctx<ffi::DeviceOrdinal>()                                                                 \
      .Ctx<ffi::RunId>()                                                                         \
      .Arg<Mask>()                                                                               \
      .Arg<I32_0>()                                                                              \
      .RemainingArgs() JAX_EP_LL_ATTRS.Attr<int64_t>("pull")                                     \
      .Ret<ffi::AnyBuffer>()                                                                     \
      .Ret<ffi::AnyBuffer>()                                                                     \
      .Ret<I32_1>()                                                                              \
      .Ret<I32_2>()                                                                              \
      .Ret<I32_2>()                                                                              \
      .Ret<I32_2>()
#define JAX_EP_LL_COMBINE_SEND_BINDING                                                           \
  ffi::Ffi::Bind()                                                                               \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                                  \
      .Ctx<ffi::DeviceOrdinal>()                                                                 \
      .Ctx<ffi::RunId>()                                                                         \
      .Arg<Mask>()                                                                               \
      .Arg<ffi::AnyBuffer>()                                                                     \
      .Arg<I32_2>()                                                                              \
      .Arg<I32_2>()                                                                              \
      .Arg<I32_2>() JAX_EP_LL_ATTRS.Attr<int64_t>("zero_copy")                                  \
      .Ret<I32_0>()
#define JAX_EP_LL_COMBINE_RECV_BINDING                                                           \
  ffi::Ffi::Bind()                                                                               \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                                  \
      .Ctx<ffi::DeviceOrdinal>()                                                                 \
      .Ctx<ffi::RunId>()                                                                         \
      .Arg<Mask>()                                                                               \
      .Arg<I32_0>()                                                                              \
      .Arg<I32_2>()                                                                              \
      .Arg<F32_2>()                                                                              \
      .RemainingArgs() JAX_EP_LL_ATTRS.Attr<int64_t>("zero_copy")                                \
      .Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyDispatchSendHandler, DispatchSend<false>, JAX_EP_LL_DISPATCH_SEND_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyDispatchRecvHandler, DispatchRecv<false>, JAX_EP_LL_DISPATCH_RECV_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyCombineSendHandler, CombineSend<false>, JAX_EP_LL_COMBINE_SEND_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyCombineRecvHandler, CombineRecv<false>, JAX_EP_LL_COMBINE_RECV_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyDispatchSendAsyncHandler, DispatchSend<true>, JAX_EP_LL_DISPATCH_SEND_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyDispatchRecvAsyncHandler, DispatchRecv<true>, JAX_EP_LL_DISPATCH_RECV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyCombineSendAsyncHandler, CombineSend<true>, JAX_EP_LL_COMBINE_SEND_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyCombineRecvAsyncHandler, CombineRecv<true>, JAX_EP_LL_COMBINE_RECV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowLatencyCombineGatherRecvHandler, CombineGatherRecv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<Mask>()
                                  .Arg<I32_0>()
                                  .Arg<I32_2>() JAX_EP_LL_ATTRS
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
