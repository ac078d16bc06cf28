// Internode combine: the dispatch run backwards. Each rank stages its rows;
// after barrier A each forwarder sums, in float32, the rows of each of its
// table tokens over the ranks of its node (ascending local rank) and puts the
// partial to the token's source; after barrier B and the rail wait each
// source sums one partial per node (ascending node) and rounds once. See
// internode.cuh for the protocol.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "internode.cuh"

namespace jax_ep {
namespace internode {
namespace {

using detail::call_number;
using detail::kThreads;
using detail::my_half;
using detail::node_half;

// Four consecutive elements as float32, and back.
template <DType D>
__device__ __forceinline__ float4 load4(const char* row, int c) {
  if constexpr (D == DType::kF32) {
    return *reinterpret_cast<const float4*>(row + 4 * static_cast<std::size_t>(c));
  } else if constexpr (D == DType::kBF16) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + 2 * static_cast<std::size_t>(c));
    const auto* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(v[0]), b = __bfloat1622float2(v[1]);
    return make_float4(a.x, a.y, b.x, b.y);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + 2 * static_cast<std::size_t>(c));
    const auto* v = reinterpret_cast<const __half2*>(&raw);
    const float2 a = __half22float2(v[0]), b = __half22float2(v[1]);
    return make_float4(a.x, a.y, b.x, b.y);
  }
}

template <DType D>
__device__ __forceinline__ void store4(char* row, int c, float4 v) {
  if constexpr (D == DType::kF32) {
    *reinterpret_cast<float4*>(row + 4 * static_cast<std::size_t>(c)) = v;
  } else if constexpr (D == DType::kBF16) {
    __nv_bfloat162 out[2] = {__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
    *reinterpret_cast<uint2*>(row + 2 * static_cast<std::size_t>(c)) = *reinterpret_cast<const uint2*>(out);
  } else {
    __half2 out[2] = {__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
    *reinterpret_cast<uint2*>(row + 2 * static_cast<std::size_t>(c)) = *reinterpret_cast<const uint2*>(out);
  }
}

__device__ __forceinline__ void add4(float4& acc, float4 v) {
  acc.x += v.x;
  acc.y += v.y;
  acc.z += v.z;
  acc.w += v.w;
}

// Stage the rows of y that hold a token (a warp per row). No waits.
__global__ void __launch_bounds__(kThreads) combine_stage(Args a, const char* y, const int* recv_src_rank) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineNode)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  char* half = my_half(a, l, call_number(a));
  const int lane = threadIdx.x % 32, warps = gridDim.x * (blockDim.x / 32);
  for (int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; o < s.capacity; o += warps) {
    if (recv_src_rank[o] < 0) continue;
    detail::warp_copy(half + l.y_stage + static_cast<std::size_t>(o) * s.row_bytes,
                      y + static_cast<std::size_t>(o) * s.row_bytes, s.row_bytes, lane);
  }
}

// One block: barrier A (every rank of the node staged its rows).
__global__ void __launch_bounds__(kThreads) combine_ready(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineNode)) return;
  detail::node_barrier(a, 0, call_number(a), kOpCombineNode);
}

// The forwarder: a warp per table row sums the node's rows of the token and
// puts the float32 partial into the source's receive rows [node][token];
// block 0 adds each source node's final count. No waits.
template <DType D>
__global__ void __launch_bounds__(kThreads) combine_reduce(Args a, const int* fwd_src_node, const int* fwd_src_token,
                                                           const int* fwd_dst_row) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, T = s.num_tokens, C = s.capacity;
  const int me = a.put.peers.rank, n_me = me / L, h = static_cast<int>(call & 1ull), lane = threadIdx.x % 32;
  const int S = s.slots();
  const std::size_t half_off = kHeaderBytes + static_cast<std::size_t>(h) * l.half_bytes;
  if (blockIdx.x == 0) {
    __shared__ int count[kMaxRanks];
    for (int n = threadIdx.x; n < N; n += blockDim.x) count[n] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < Cn; i += blockDim.x) {
      const int n = fwd_src_node[i];
      if (n >= 0 && n < N && fwd_src_token[i] >= 0 && fwd_src_token[i] < T) atomicAdd(&count[n], 1);
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      transport::signal_add(a.put.peers, n * L + me % L, rail_word(h, kRailPartials, n_me),
                            transport::signal_final_value(static_cast<unsigned>(count[n])));
    }
  }
  const char* rows[kMaxLocal];
  for (int j = 0; j < L; ++j) rows[j] = node_half(a, l, call, j) + l.y_stage;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < Cn; i += warps) {
    const int n = fwd_src_node[i], t = fwd_src_token[i];
    if (n < 0) continue;
    if (n >= N || t < 0 || t >= T) {
      if (lane == 0) ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, kOpCombineRail, i, t);
      continue;
    }
    const int* dst = fwd_dst_row + static_cast<std::size_t>(i) * L * S;  // [L, S]
    char* partial = half + l.partial + static_cast<std::size_t>(i) * l.partial_stride;
    for (int c = 4 * lane; c < s.cols; c += 128) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j < L; ++j) {  // ascending local rank, then slot
        for (int slot = 0; slot < S; ++slot) {
          const int o = dst[j * S + slot];
          if (o >= 0 && o < C) add4(acc, load4<D>(rows[j] + static_cast<std::size_t>(o) * s.row_bytes, c));
        }
      }
      store4<DType::kF32>(partial, c, acc);
    }
    __syncwarp();
    __threadfence_system();  // the partial, before a put reads it
    __syncwarp();
    transport::warp_put_signal(a.put.peers, n * L + me % L,
                               half_off + l.recv + (static_cast<std::size_t>(n_me) * T + t) * l.partial_stride,
                               partial, l.partial_stride, rail_word(h, kRailPartials, n_me), 1, lane);
  }
}

// One block: barrier B (the node finished reading this rank's rows), then
// wait for every node's partials of this rank's tokens.
__global__ void __launch_bounds__(kThreads) combine_wait(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineNode)) return;
  const unsigned long long call = call_number(a);
  if (!detail::node_barrier(a, 1, call, kOpCombineNode)) return;
  detail::wait_rail(a, kRailPartials, call, kOpCombineRail);
}

// A warp per token: the sum of its partials (ascending node), rounded once.
template <DType D>
__global__ void __launch_bounds__(kThreads) combine_sum(Args a, const int* rdma_slot, char* out) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const char* half = my_half(a, l, call_number(a));
  const int N = s.num_nodes, T = s.num_tokens, lane = threadIdx.x % 32;
  const std::size_t out_row = static_cast<std::size_t>(s.cols) * (D == DType::kF32 ? 4 : 2);
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < T; t += warps) {
    for (int c = 4 * lane; c < s.cols; c += 128) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int n = 0; n < N; ++n) {
        if (rdma_slot[static_cast<std::size_t>(t) * N + n] < 0) continue;
        add4(acc, load4<DType::kF32>(half + l.recv + (static_cast<std::size_t>(n) * T + t) * l.partial_stride, c));
      }
      store4<D>(out + t * out_row, c, acc);
    }
  }
}

// One thread: the end of the call.
__global__ void combine_finish(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineRail)) return;
  if (threadIdx.x == 0) detail::end_call(a, call_number(a), kRailPartials, -1);
}

template <DType D>
cudaError_t launch_typed(const Args& a, const void* y, const int* recv_src_rank, const int* rdma_slot,
                         const int* fwd_src_node, const int* fwd_src_token, const int* fwd_dst_row, void* out,
                         int num_blocks, cudaStream_t stream) {
  combine_stage<<<num_blocks, kThreads, 0, stream>>>(a, static_cast<const char*>(y), recv_src_rank);
  combine_ready<<<1, kThreads, 0, stream>>>(a);
  combine_reduce<D><<<num_blocks, kThreads, 0, stream>>>(a, fwd_src_node, fwd_src_token, fwd_dst_row);
  combine_wait<<<1, kThreads, 0, stream>>>(a);
  combine_sum<D><<<num_blocks, kThreads, 0, stream>>>(a, rdma_slot, static_cast<char*>(out));
  combine_finish<<<1, 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine(const Args& a, DType dtype, const void* y, const int* recv_src_rank,
                           const int* rdma_slot, const int* fwd_src_node, const int* fwd_src_token,
                           const int* fwd_dst_row, void* out, int num_blocks, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBF16:
      return launch_typed<DType::kBF16>(a, y, recv_src_rank, rdma_slot, fwd_src_node, fwd_src_token, fwd_dst_row,
                                        out, num_blocks, stream);
    case DType::kF16:
      return launch_typed<DType::kF16>(a, y, recv_src_rank, rdma_slot, fwd_src_node, fwd_src_token, fwd_dst_row,
                                       out, num_blocks, stream);
    default:
      return launch_typed<DType::kF32>(a, y, recv_src_rank, rdma_slot, fwd_src_node, fwd_src_token, fwd_dst_row,
                                       out, num_blocks, stream);
  }
}

}  // namespace internode
}  // namespace jax_ep
