// FFI handlers of internode normal mode (cuda/internode.cuh), registered
// from the jax_ep._nvshmem module. The buffer is a put-path buffer
// (ll_put_buffers.h: symmetric memory, each peer's path and mapped copy, a
// failure record); jax_ep_ll_put_status reads its status.
//
//   jax_ep_internode_dispatch      x [T, B], topk_idx s32[T, K], topk_weights f32[T, K] ->
//   jax_ep_internode_dispatch_fp8  (x_fp8 [T, H], scales [T, G], topk_idx, topk_weights) ->
//       recv_x [C, B] (fp8: recv_x, recv_scales), recv_topk_idx s32[C, K],
//       recv_topk_weights f32[C, K], num_recv_per_expert s32[E/R], expert_group_sizes
//       s32[E/R] (expert-major; zeros rank-major), num_kept s32[], num_needed s32[], recv_src_rank s32[C],
//       recv_src_token s32[C], is_token_in_rank pred[T, R], rdma_slot s32[T, N],
//       fwd_src_node s32[Cn], fwd_src_token s32[Cn], fwd_dst_row s32[Cn, L, S],
//       recv_table_row s32[C]   (S = 1 rank-major, K expert-major)
//   jax_ep_internode_cached_dispatch  x [T, B], rdma_slot, recv_src_rank, recv_table_row,
//                                  fwd_src_node, fwd_src_token, fwd_dst_row -> [C, B]
//   jax_ep_internode_combine       y [C, B] (bf16/f16/f32), recv_src_rank, rdma_slot,
//                                  fwd_src_node, fwd_src_token, fwd_dst_row, recv_table_row -> [T, B]
//
//   attrs: buffer_id, ranks_per_node (L), node_capacity (Cn), num_sms, and the rings:
//   num_channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring (tokens;
//   jax_ep.internode_config); dispatch also num_experts, capacity (C), layout
//   (0 rank-major, 1 expert-major), expert_alignment.
//
// Row bytes are multiples of 16 (jax_ep.cuda_ops pads them).
#include <string>

#include "../cuda/internode.cuh"
#include "ffi_helpers.h"
#include "ll_put_buffers.h"

namespace jax_ep {
namespace internode {
namespace {

int64_t rows_of(const ffi::AnyBuffer& b) { return b.dimensions().size() == 0 ? 1 : b.dimensions()[0]; }
int64_t row_bytes_of(const ffi::AnyBuffer& b) {
  const int64_t rows = rows_of(b);
  return rows == 0 ? 0 : static_cast<int64_t>(b.size_bytes()) / rows;
}

struct Call {
  std::shared_ptr<ll_put::PutBuffer> buf;
  Args args{};
};

// The ring sizes of a call (the attrs every target takes).
struct Rings {
  int64_t channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring;
};

// The rings' conditions (docs/internode.md): a ring holds whole chunks,
// at most kMaxRingChunks of them (their flags are fixed words).
ffi::Error apply_rings(const char* target, const Rings& r, Shape* shape) {
  if (r.channels < 1 || r.channels > kMaxChannels) {
    return invalid_argument(target, "num_channels must be in [1, " + std::to_string(kMaxChannels) + "], got " +
                                        std::to_string(r.channels));
  }
  if (r.rdma_chunk < 1 || r.rdma_ring < r.rdma_chunk || r.rdma_ring % r.rdma_chunk != 0 ||
      r.rdma_ring / r.rdma_chunk > kMaxRingChunks || !fits_int(r.rdma_ring)) {
    return invalid_argument(target, "rdma_ring must be a multiple of rdma_chunk >= 1, at most " +
                                        std::to_string(kMaxRingChunks) + " chunks; got chunk " +
                                        std::to_string(r.rdma_chunk) + ", ring " + std::to_string(r.rdma_ring));
  }
  if (r.nvl_chunk < 1 || r.nvl_ring < r.nvl_chunk || !fits_int(r.nvl_ring)) {
    return invalid_argument(target, "nvl_ring must be >= nvl_chunk >= 1; got chunk " + std::to_string(r.nvl_chunk) +
                                        ", ring " + std::to_string(r.nvl_ring));
  }
  shape->channels = static_cast<int>(r.channels);
  shape->rdma_chunk = static_cast<int>(r.rdma_chunk);
  shape->rdma_ring = static_cast<int>(r.rdma_ring);
  shape->nvl_chunk = static_cast<int>(r.nvl_chunk);
  shape->nvl_ring = static_cast<int>(r.nvl_ring);
  return ffi::Error::Success();
}

// Finds the buffer, checks the topology and the sizes against it.
ffi::Error prepare(const char* target, int32_t device, int64_t run, int64_t buffer_id, const Rings& rings, Shape shape,
                   Call* call) {
  if (auto err = apply_rings(target, rings, &shape); err.failure()) return err;
  std::string error;
  call->buf = ll_put::find_live_put_buffer(buffer_id, device, run, "internode", &error);
  if (call->buf == nullptr) return invalid_argument(target, error);
  const int R = call->buf->num_ranks(), L = shape.ranks_per_node;
  if (L < 1 || L > kMaxLocal || R % L != 0 || R > kMaxRanks) {
    return invalid_argument(target, "ranks_per_node must be in [1, 8] and divide the rank count " +
                                        std::to_string(R) + " (at most 64), got " + std::to_string(L));
  }
  shape.num_nodes = R / L;
  if (shape.node_capacity < 1 || shape.capacity < 0 || shape.num_tokens < 0 || shape.row_bytes % 16 != 0) {
    return invalid_argument(target, "bad sizes (node_capacity >= 1, row bytes a multiple of 16)");
  }
  const std::size_t need = buffer_bytes(shape);
  if (need > call->buf->num_bytes()) {
    return invalid_argument(target, "the jax_ep internode buffer is too small for this call: it needs " +
                                        std::to_string(need) + " bytes, it has " +
                                        std::to_string(call->buf->num_bytes()) +
                                        "; create the Buffer with num_nvl_bytes >= jax_ep.internode_buffer_bytes(...)");
  }
  call->args.put = call->buf->args(ll_put::Shape{}, nullptr);
  call->args.shape = shape;
  return ffi::Error::Success();
}

int blocks(int64_t num_sms) { return static_cast<int>(num_sms > 0 ? num_sms : 1); }

ffi::Error Dispatch(const char* target, cudaStream_t stream, int32_t device, int64_t run, DispatchIO io, int64_t rows,
                    I32_2 topk_idx, F32_2 topk_weights, int64_t buffer_id, int64_t ranks_per_node,
                    int64_t node_capacity, int64_t num_sms, int64_t num_channels, int64_t rdma_chunk,
                    int64_t rdma_ring, int64_t nvl_chunk, int64_t nvl_ring, int64_t num_experts, int64_t capacity,
                    int64_t layout, int64_t expert_alignment,
                    ffi::Result<I32_2>& recv_topk_idx, ffi::Result<F32_2>& recv_topk_weights,
                    ffi::Result<I32_1>& num_recv_per_expert, ffi::Result<I32_1>& expert_group_sizes,
                    ffi::Result<I32_0>& num_kept, ffi::Result<I32_0>& num_needed, ffi::Result<I32_1>& recv_src_rank,
                    ffi::Result<I32_1>& recv_src_token, ffi::Result<Pred2>& is_token_in_rank,
                    ffi::Result<I32_2>& rdma_slot, ffi::Result<I32_1>& fwd_src_node,
                    ffi::Result<I32_1>& fwd_src_token, ffi::Result<I32_3>& fwd_dst_row,
                    ffi::Result<I32_1>& recv_table_row) {
  const int64_t T = topk_idx.dimensions()[0], K = topk_idx.dimensions()[1];
  if (layout != 0 && layout != 1) return invalid_argument(target, "layout must be 0 (rank-major) or 1 (expert-major)");
  if (expert_alignment < 1 || !fits_int(expert_alignment)) {
    return invalid_argument(target, "expert_alignment must be a positive int");
  }
  if (K < 1 || K > kMaxTopk) return invalid_argument(target, "num_topk must be in [1, 16]");
  if (rows != T) return invalid_argument(target, "x must have one row per token of topk_idx");
  if (!has_shape(topk_weights.dimensions(), {T, K})) {
    return shape_error(target, "topk_weights", topk_weights.dimensions(), {T, K});
  }
  if (!fits_int(T) || !fits_int(capacity) || capacity < 1 || !fits_int(node_capacity)) {
    return invalid_argument(target, "bad sizes");
  }
  Shape shape{Op::kDispatch, static_cast<int>(T), static_cast<int>(K), static_cast<int>(num_experts), 0,
              static_cast<int>(ranks_per_node), static_cast<int>(node_capacity), static_cast<int>(capacity),
              io.part_bytes[0] + (io.num_parts > 1 ? io.part_bytes[1] : 0), 0, static_cast<int>(layout),
              static_cast<int>(expert_alignment)};
  Call c;
  const Rings rings{num_channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring};
  if (auto err = prepare(target, device, run, buffer_id, rings, shape, &c); err.failure()) return err;
  const int R = c.buf->num_ranks(), N = c.args.shape.num_nodes, L = c.args.shape.ranks_per_node;
  if (num_experts < R || num_experts % R != 0 || num_experts > kMaxExperts || num_experts / R > kMaxLocalExperts) {
    return invalid_argument(target, "num_experts must be a multiple of the rank count " + std::to_string(R) +
                                        " and at most " + std::to_string(kMaxExperts) + ", got " +
                                        std::to_string(num_experts));
  }
  const int64_t S = layout == 1 ? K : 1;
  if (!has_shape(rdma_slot->dimensions(), {T, N}) || !has_shape(fwd_dst_row->dimensions(), {node_capacity, L, S})) {
    return invalid_argument(target, "the handle's internode arrays have the wrong shape");
  }
  // The memsets and kernels write C, Cn, T and E/R rows of these.
  if (!has_shape(recv_topk_idx->dimensions(), {capacity, K}) || !has_shape(recv_topk_weights->dimensions(), {capacity, K}) ||
      recv_src_rank->dimensions()[0] != capacity || recv_src_token->dimensions()[0] != capacity ||
      recv_table_row->dimensions()[0] != capacity || fwd_src_node->dimensions()[0] != node_capacity ||
      fwd_src_token->dimensions()[0] != node_capacity || !has_shape(is_token_in_rank->dimensions(), {T, R}) ||
      num_recv_per_expert->dimensions()[0] != num_experts / R || expert_group_sizes->dimensions()[0] != num_experts / R) {
    return invalid_argument(target, "the outputs disagree with T, C, node_capacity, K or E/R");
  }
  io.topk_idx = topk_idx.typed_data();
  io.topk_weights = topk_weights.typed_data();
  io.recv_topk_idx = recv_topk_idx->typed_data();
  io.recv_topk_weights = recv_topk_weights->typed_data();
  io.num_recv_per_expert = num_recv_per_expert->typed_data();
  io.expert_group_sizes = expert_group_sizes->typed_data();
  io.num_kept = num_kept->typed_data();
  io.num_needed = num_needed->typed_data();
  io.recv_src_rank = recv_src_rank->typed_data();
  io.recv_src_token = recv_src_token->typed_data();
  io.is_token_in_rank = is_token_in_rank->typed_data();
  io.rdma_slot = rdma_slot->typed_data();
  io.fwd_src_node = fwd_src_node->typed_data();
  io.fwd_src_token = fwd_src_token->typed_data();
  io.fwd_dst_row = fwd_dst_row->typed_data();
  io.recv_table_row = recv_table_row->typed_data();
  // Padding: zero rows and weights, -1 ids and handle entries.
  const std::size_t C = capacity, Cn = node_capacity;
  cudaError_t err = cudaSuccess;
  auto set = [&](void* p, int v, std::size_t bytes) {
    if (err == cudaSuccess && bytes > 0) err = cudaMemsetAsync(p, v, bytes, stream);
  };
  for (int p = 0; p < io.num_parts; ++p) set(io.recv_x[p], 0, C * io.part_bytes[p]);
  set(io.recv_topk_idx, 0xff, C * K * 4);
  set(io.recv_topk_weights, 0, C * K * 4);
  set(io.num_recv_per_expert, 0, 4 * (num_experts / R));
  set(expert_group_sizes->typed_data(), 0, 4 * (num_experts / R));
  set(io.recv_src_rank, 0xff, C * 4);
  set(io.recv_src_token, 0xff, C * 4);
  set(io.recv_table_row, 0xff, C * 4);
  set(io.rdma_slot, 0xff, static_cast<std::size_t>(T) * N * 4);
  set(io.fwd_src_node, 0xff, Cn * 4);
  set(io.fwd_src_token, 0xff, Cn * 4);
  set(io.fwd_dst_row, 0xff, Cn * L * S * 4);
  if (err == cudaSuccess) err = launch_dispatch(c.args, io, blocks(num_sms), stream);
  return launch_status(target, err);
}

#define JAX_EP_INTERNODE_RING_PARAMS \
  int64_t num_channels, int64_t rdma_chunk, int64_t rdma_ring, int64_t nvl_chunk, int64_t nvl_ring
#define JAX_EP_INTERNODE_DISPATCH_PARAMS                                                                          \
  I32_2 topk_idx, F32_2 topk_weights, int64_t buffer_id, int64_t ranks_per_node, int64_t node_capacity,           \
      int64_t num_sms, JAX_EP_INTERNODE_RING_PARAMS, int64_t num_experts, int64_t capacity, int64_t layout,       \
      int64_t expert_alignment
#define JAX_EP_INTERNODE_DISPATCH_RESULTS                                                                         \
  ffi::Result<I32_2> recv_topk_idx, ffi::Result<F32_2> recv_topk_weights, ffi::Result<I32_1> num_recv_per_expert, \
      ffi::Result<I32_1> expert_group_sizes, ffi::Result<I32_0> num_kept, ffi::Result<I32_0> num_needed,          \
      ffi::Result<I32_1> recv_src_rank, ffi::Result<I32_1> recv_src_token, ffi::Result<Pred2> is_token_in_rank,   \
      ffi::Result<I32_2> rdma_slot, ffi::Result<I32_1> fwd_src_node, ffi::Result<I32_1> fwd_src_token,            \
      ffi::Result<I32_3> fwd_dst_row, ffi::Result<I32_1> recv_table_row
#define JAX_EP_INTERNODE_DISPATCH_FORWARD                                                                         \
  topk_idx, topk_weights, buffer_id, ranks_per_node, node_capacity, num_sms, num_channels, rdma_chunk,           \
      rdma_ring, nvl_chunk, nvl_ring, num_experts, capacity, layout, expert_alignment,                            \
      recv_topk_idx, recv_topk_weights, num_recv_per_expert, expert_group_sizes, num_kept, num_needed,            \
      recv_src_rank, recv_src_token, is_token_in_rank, rdma_slot, fwd_src_node, fwd_src_token, fwd_dst_row,       \
      recv_table_row

ffi::Error InternodeDispatch(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, JAX_EP_INTERNODE_DISPATCH_PARAMS,
                             ffi::Result<ffi::AnyBuffer> recv_x, JAX_EP_INTERNODE_DISPATCH_RESULTS) {
  constexpr const char* kTarget = "jax_ep_internode_dispatch";
  DispatchIO io{};
  io.x[0] = static_cast<const char*>(x.untyped_data());
  io.recv_x[0] = static_cast<char*>(recv_x->untyped_data());
  io.part_bytes[0] = static_cast<int>(row_bytes_of(*recv_x));
  io.num_parts = 1;
  if (io.part_bytes[0] % 16 != 0 || io.part_bytes[0] == 0) {
    return invalid_argument(kTarget, "rows of x must be a nonzero multiple of 16 bytes");
  }
  if (rows_of(*recv_x) != capacity || static_cast<int64_t>(x.size_bytes()) != rows_of(x) * io.part_bytes[0]) {
    return invalid_argument(kTarget, "recv_x must be [capacity, ...] with the rows of x");
  }
  return Dispatch(kTarget, stream, device, run.run_id, io, rows_of(x), JAX_EP_INTERNODE_DISPATCH_FORWARD);
}

ffi::Error InternodeDispatchFp8(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, ffi::AnyBuffer scales,
                                JAX_EP_INTERNODE_DISPATCH_PARAMS, ffi::Result<ffi::AnyBuffer> recv_x,
                                ffi::Result<ffi::AnyBuffer> recv_scales, JAX_EP_INTERNODE_DISPATCH_RESULTS) {
  constexpr const char* kTarget = "jax_ep_internode_dispatch_fp8";
  DispatchIO io{};
  io.x[0] = static_cast<const char*>(x.untyped_data());
  io.x[1] = static_cast<const char*>(scales.untyped_data());
  io.recv_x[0] = static_cast<char*>(recv_x->untyped_data());
  io.recv_x[1] = static_cast<char*>(recv_scales->untyped_data());
  io.part_bytes[0] = static_cast<int>(row_bytes_of(*recv_x));
  io.part_bytes[1] = static_cast<int>(row_bytes_of(*recv_scales));
  io.num_parts = 2;
  for (int p = 0; p < 2; ++p) {
    if (io.part_bytes[p] % 16 != 0 || io.part_bytes[p] == 0) {
      return invalid_argument(kTarget, "FP8 values and scales rows must be nonzero multiples of 16 bytes "
                                       "(hidden % 512 == 0 with float32 scales)");
    }
  }
  if (rows_of(scales) != rows_of(x)) return invalid_argument(kTarget, "scales must have one row per row of x");
  if (rows_of(*recv_x) != capacity || rows_of(*recv_scales) != capacity ||
      static_cast<int64_t>(x.size_bytes()) != rows_of(x) * io.part_bytes[0] ||
      static_cast<int64_t>(scales.size_bytes()) != rows_of(x) * io.part_bytes[1]) {
    return invalid_argument(kTarget, "recv_x and recv_scales must be [capacity, ...] with the rows of x and scales");
  }
  return Dispatch(kTarget, stream, device, run.run_id, io, rows_of(x), JAX_EP_INTERNODE_DISPATCH_FORWARD);
}

// A call along a handle (cached dispatch, combine): the handle's arrays,
// checked against T, C, Cn, L and the node count, and the call's shape
// (num_topk carries the handle's slots S, expert-major K, for Shape::slots).
ffi::Error prepare_handle_call(const char* target, int32_t device, int64_t run, int64_t buffer_id, const Rings& rings, Op op,
                               int64_t T, int64_t C, int64_t row_bytes, int64_t cols, int64_t node_capacity,
                               int64_t ranks_per_node, I32_2& rdma_slot, I32_1& recv_src_rank,
                               I32_1& recv_table_row, I32_1& fwd_src_node, I32_1& fwd_src_token, I32_3& fwd_dst_row,
                               HandleIO* h, Call* call) {
  if (rdma_slot.dimensions()[0] != T || recv_src_rank.dimensions()[0] != C || recv_table_row.dimensions()[0] != C ||
      fwd_src_node.dimensions()[0] != node_capacity || fwd_src_token.dimensions()[0] != node_capacity ||
      fwd_dst_row.dimensions()[0] != node_capacity || fwd_dst_row.dimensions()[1] != ranks_per_node ||
      fwd_dst_row.dimensions()[2] < 1 || fwd_dst_row.dimensions()[2] > kMaxTopk) {
    return invalid_argument(target, "the handle's arrays disagree with the payload, the output or the node capacity");
  }
  const int S = static_cast<int>(fwd_dst_row.dimensions()[2]);
  Shape shape{op, static_cast<int>(T), S, 0, 0, static_cast<int>(ranks_per_node), static_cast<int>(node_capacity),
              static_cast<int>(C), static_cast<int>(row_bytes), static_cast<int>(cols), S > 1 ? 1 : 0, 1};
  if (auto err = prepare(target, device, run, buffer_id, rings, shape, call); err.failure()) return err;
  if (rdma_slot.dimensions()[1] != call->args.shape.num_nodes) {
    return invalid_argument(target, "rdma_slot must be [T, num_nodes]");
  }
  *h = HandleIO{rdma_slot.typed_data(),    recv_src_rank.typed_data(), recv_table_row.typed_data(),
                fwd_src_node.typed_data(), fwd_src_token.typed_data(), fwd_dst_row.typed_data()};
  return ffi::Error::Success();
}

ffi::Error InternodeCachedDispatch(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer x, I32_2 rdma_slot,
                                   I32_1 recv_src_rank, I32_1 recv_table_row, I32_1 fwd_src_node,
                                   I32_1 fwd_src_token, I32_3 fwd_dst_row, int64_t buffer_id,
                                   int64_t ranks_per_node, int64_t node_capacity, int64_t num_sms,
                                   JAX_EP_INTERNODE_RING_PARAMS, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_internode_cached_dispatch";
  const int64_t T = rows_of(x), C = rows_of(*out), row = row_bytes_of(*out);
  if (row % 16 != 0 || row == 0) return invalid_argument(kTarget, "rows must be a nonzero multiple of 16 bytes");
  if (static_cast<int64_t>(x.size_bytes()) != T * row) {
    return invalid_argument(kTarget, "x and the output disagree on the row bytes");
  }
  HandleIO h;
  Call c;
  const Rings rings{num_channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring};
  if (auto err = prepare_handle_call(kTarget, device, run.run_id, buffer_id, rings, Op::kCachedDispatch, T, C, row, 0,
                                     node_capacity, ranks_per_node, rdma_slot, recv_src_rank, recv_table_row,
                                     fwd_src_node, fwd_src_token, fwd_dst_row, &h, &c);
      err.failure()) {
    return err;
  }
  cudaError_t err = cudaMemsetAsync(out->untyped_data(), 0, static_cast<std::size_t>(C) * row, stream);
  if (err == cudaSuccess) {
    err = launch_cached_dispatch(c.args, static_cast<const char*>(x.untyped_data()), h,
                                 static_cast<char*>(out->untyped_data()), blocks(num_sms), stream);
  }
  return launch_status(kTarget, err);
}

ffi::Error InternodeCombine(cudaStream_t stream, int32_t device, ffi::RunId run, ffi::AnyBuffer y, I32_1 recv_src_rank,
                            I32_2 rdma_slot, I32_1 fwd_src_node, I32_1 fwd_src_token, I32_3 fwd_dst_row,
                            I32_1 recv_table_row, int64_t buffer_id, int64_t ranks_per_node, int64_t node_capacity,
                            int64_t num_sms, JAX_EP_INTERNODE_RING_PARAMS, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kTarget = "jax_ep_internode_combine";
  DType dtype;
  int item;
  switch (y.element_type()) {
    case ffi::BF16: dtype = DType::kBF16; item = 2; break;
    case ffi::F16: dtype = DType::kF16; item = 2; break;
    case ffi::F32: dtype = DType::kF32; item = 4; break;
    default: return invalid_argument(kTarget, "y must be bfloat16, float16 or float32");
  }
  if (out->element_type() != y.element_type() || y.dimensions().size() != 2 || out->dimensions().size() != 2) {
    return invalid_argument(kTarget, "y [C, B] and out [T, B] of one dtype");
  }
  const int64_t C = y.dimensions()[0], B = y.dimensions()[1], T = out->dimensions()[0];
  if (out->dimensions()[1] != B || (B * item) % 16 != 0 || B % 4 != 0) {
    return invalid_argument(kTarget, "rows must be multiples of 16 bytes and of 4 elements, the same in y and out");
  }
  HandleIO h;
  Call c;
  const Rings rings{num_channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring};
  if (auto err = prepare_handle_call(kTarget, device, run.run_id, buffer_id, rings, Op::kCombine, T, C, B * item, B,
                                     node_capacity, ranks_per_node, rdma_slot, recv_src_rank, recv_table_row,
                                     fwd_src_node, fwd_src_token, fwd_dst_row, &h, &c);
      err.failure()) {
    return err;
  }
  return launch_status(kTarget, launch_combine(c.args, dtype, y.untyped_data(), h, out->untyped_data(),
                                               blocks(num_sms), stream));
}

}  // namespace
}  // namespace internode

#define JAX_EP_INTERNODE_ATTRS                                                                       \
  .Attr<int64_t>("buffer_id").Attr<int64_t>("ranks_per_node").Attr<int64_t>("node_capacity")        \
      .Attr<int64_t>("num_sms").Attr<int64_t>("num_channels").Attr<int64_t>("rdma_chunk")              \
      .Attr<int64_t>("rdma_ring").Attr<int64_t>("nvl_chunk").Attr<int64_t>("nvl_ring")
#define JAX_EP_INTERNODE_DISPATCH_RETS                                                              \
  .Ret<I32_2>().Ret<F32_2>().Ret<I32_1>().Ret<I32_1>() \
      .Ret<I32_0>().Ret<I32_0>().Ret<I32_1>().Ret<I32_1>() \
      .Ret<Pred2>().Ret<I32_2>().Ret<I32_1>().Ret<I32_1>() \
      .Ret<I32_3>().Ret<I32_1>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(InternodeDispatchHandler, internode::InternodeDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<F32_2>() JAX_EP_INTERNODE_ATTRS
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("expert_alignment")
                                  .Ret<ffi::AnyBuffer>() JAX_EP_INTERNODE_DISPATCH_RETS,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(InternodeDispatchFp8Handler, internode::InternodeDispatchFp8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<F32_2>() JAX_EP_INTERNODE_ATTRS
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("expert_alignment")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JAX_EP_INTERNODE_DISPATCH_RETS,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(InternodeCachedDispatchHandler, internode::InternodeCachedDispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_2>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Arg<I32_3>() JAX_EP_INTERNODE_ATTRS
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(InternodeCombineHandler, internode::InternodeCombine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<I32_1>()
                                  .Arg<I32_2>()
                                  .Arg<I32_1>()
                                  .Arg<I32_1>()
                                  .Arg<I32_3>()
                                  .Arg<I32_1>() JAX_EP_INTERNODE_ATTRS
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
