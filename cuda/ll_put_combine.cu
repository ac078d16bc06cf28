// Low-latency combine over the transport seam. See ll_put.cuh for the protocol.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>

#include "fp8.cuh"
#include "ll_put.cuh"
#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace ll_put {
namespace {

constexpr int kThreads = 512;

using detail::first_slot;

// Offset of the signal word, at the owner, of rows from expert rank `src`.
__device__ __forceinline__ std::size_t combine_word(const Layout& l, int half, int src) {
  return l.combine_words + half * l.combine_words_half + static_cast<std::size_t>(src) * 8;
}

// Row `r` of y cast to FP8 into `to` by a warp, a warp-wide pass per
// 128-channel group (fp8.cuh's group cast, unrounded scales): the values,
// then a float scale per group at `to + H` (low_latency::Shape::combine_row_bytes).
__device__ __forceinline__ void cast_row_fp8(const Shape& s, const __nv_bfloat16* from, char* to, int lane) {
  for (int g = 0; g < s.hidden / kFp8GroupSize; ++g) {
    const uint2 raw = *reinterpret_cast<const uint2*>(from + g * kFp8GroupSize + lane * 4);
    float scale;
    *reinterpret_cast<uint32_t*>(to + g * kFp8GroupSize + lane * 4) = fp8_cast_group_warp(raw, false, &scale);
    if (lane == 0) fp8_store_group_scale(to + s.hidden, g, scale, false);
  }
}

// A warp per valid row of y: to its owner's [token][slot], with its signal;
// rows for put peers (and, with FP8 rows, every row, cast on the way) go
// through this rank's staging. Block 0 first sends the call's signature and
// the final add to every owner (arrival counting needs no order).
__global__ void __launch_bounds__(kThreads)
    combine_send_kernel(Args a, const __nv_bfloat16* y, const int* src_rank, const int* src_token,
                        const int* src_slot) {
  if (detail::block_aborted(a, kOpCombineRecv)) return;  // a dead buffer: send nothing
  const Shape s = a.shape;
  const int R = a.peers.num_ranks, me = a.peers.rank, le = s.local_experts(R), M = s.max_tokens;
  const Layout l = Layout::make(s, R);
  const int half = static_cast<int>(ld_volatile(&detail::control(a)->combine_call) & 1ull);
  const std::size_t row_bytes = s.combine_row_bytes();
  const long long rows_total = static_cast<long long>(le) * R * M;
  if (blockIdx.x == 0) {
    detail::send_signature(a, 1, half);
    __shared__ int count[transport::kMaxPeers];
    for (int r = threadIdx.x; r < R; r += blockDim.x) count[r] = 0;
    __syncthreads();
    for (long long r = threadIdx.x; r < rows_total; r += blockDim.x) {
      if (src_rank[r] >= 0) atomicAdd(&count[src_rank[r]], 1);
    }
    __syncthreads();
    for (int owner = threadIdx.x; owner < R; owner += blockDim.x) {
      if (detail::skips(a, owner)) continue;
      transport::signal_add(a.peers, owner, combine_word(l, half, me),
                            transport::signal_final_value(static_cast<unsigned int>(count[owner])));
    }
  }
  const int lane = threadIdx.x % 32;
  char* stage = a.peers.local + l.combine_stage + half * l.combine_stage_half;
  for (long long r = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows_total;
       r += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int owner = src_rank[r];
    if (owner < 0 || detail::skips(a, owner)) continue;
    const char* from = reinterpret_cast<const char*>(y + r * s.hidden);
    if (s.combine_fp8) {
      char* staged = stage + r * row_bytes;
      cast_row_fp8(s, y + r * s.hidden, staged, lane);
      __threadfence_system();
      __syncwarp();
      from = staged;
    } else if (a.peers.path[owner] == transport::PeerPath::kPut) {  // a put's source must be symmetric memory
      char* staged = stage + r * row_bytes;
      for (std::size_t v = lane; v < row_bytes / 16; v += 32)
        reinterpret_cast<int4*>(staged)[v] = ld_nc_v4(reinterpret_cast<const int4*>(from) + v);
      __threadfence_system();
      __syncwarp();
      from = staged;
    }
    const std::size_t slot = l.combine_rows + half * l.combine_rows_half +
                             (static_cast<std::size_t>(src_token[r]) * s.num_topk + src_slot[r]) * row_bytes;
    transport::warp_put_signal(a.peers, owner, slot, from, row_bytes, combine_word(l, half, me), 1, lane);
  }
}

// One block waits until every expert rank's word of this call's half reads
// done (a failed wait: as dispatch_wait_kernel).
__global__ void __launch_bounds__(1024) combine_wait_kernel(Args a) {
  if (detail::block_aborted(a, kOpCombineRecv)) return;
  const int R = a.peers.num_ranks;
  const Layout l = Layout::make(a.shape, R);
  const unsigned long long call = ld_volatile(&detail::control(a)->combine_call);
  const int half = static_cast<int>(call & 1ull);
  // Each expert rank's signature first (as dispatch_wait_kernel).
  if (!detail::signatures_agree(a, 1, half, kOpCombineRecv, call + 1)) return;
  for (int src = threadIdx.x; src < R; src += blockDim.x) {
    if (detail::skips(a, src)) continue;
    const auto* word = reinterpret_cast<const unsigned long long*>(a.peers.local + combine_word(l, half, src));
    if (!detail::wait_done(a, word, src, kOpCombineRecv, call + 1)) return;
  }
}

// Ends a combine receive in its last block: resets the half's words and
// counts the call.
__device__ __forceinline__ void finish_combine(const Args& a, const Layout& l, int half) {
  Control* ctl = detail::control(a);
  if (detail::last_block(&ctl->blocks_done[1])) {
    for (int src = threadIdx.x; src < a.peers.num_ranks; src += blockDim.x)
      *reinterpret_cast<unsigned long long*>(a.peers.local + combine_word(l, half, src)) = 0;
    __syncthreads();
    if (threadIdx.x == 0) ctl->combine_call += 1;
  }
}

// out[t] = sum_k w[t, k] * row(t, first slot naming topk_idx[t, k]) in
// float32, rounded to BF16: the loop and arithmetic of low_latency.cu's
// combine receive (fmaf over all kMaxTopk slots, zeros on masked ones; with
// kFp8 the group's scale folded into the weight, the values widened through
// half2), so the two agree bit for bit. The last block ends the call.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    combine_sum_kernel(Args a, const int* topk_idx, const float* topk_weights, __nv_bfloat16* out) {
  if (detail::block_aborted(a, kOpCombineRecv)) return;  // the wait failed, or a peer did: out untouched
  using Raw = std::conditional_t<kFp8, uint2, int4>;
  const Shape s = a.shape;
  const int R = a.peers.num_ranks, K = s.num_topk;
  const Layout l = Layout::make(s, R);
  const int half = static_cast<int>(ld_volatile(&detail::control(a)->combine_call) & 1ull);
  const char* rows = a.peers.local + l.combine_rows + half * l.combine_rows_half;
  const std::size_t row_bytes = s.combine_row_bytes();
  const int vecs = s.hidden / 8;
  const long long n = static_cast<long long>(s.num_tokens) * vecs;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
    const int* ids = topk_idx + static_cast<long long>(t) * K;
    Raw raw[intranode::kMaxTopk];
    float w[intranode::kMaxTopk];
#pragma unroll
    for (int k = 0; k < intranode::kMaxTopk; ++k) {
      w[k] = 0.0f;
      raw[k] = Raw{};
      if (k < K && ids[k] >= 0 && ids[k] < s.num_experts) {
        int f = 0;
        while (ids[f] != ids[k]) ++f;  // the first slot naming the expert holds its row
        const char* row = rows + (static_cast<std::size_t>(t) * K + f) * row_bytes;
        w[k] = topk_weights[static_cast<long long>(t) * K + k];
        if constexpr (kFp8) {
          w[k] *= reinterpret_cast<const float*>(row + s.hidden)[v * 8 / kFp8GroupSize];
          raw[k] = *reinterpret_cast<const uint2*>(row + v * 8);
        } else {
          raw[k] = ld_cg_v4(reinterpret_cast<const int4*>(row) + v);
        }
      }
    }
    float acc[8];
    weighted_sum8<kFp8>(raw, w, acc);
    int4 packed;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
    reinterpret_cast<int4*>(out + static_cast<long long>(t) * s.hidden)[v] = packed;
  }
  finish_combine(a, l, half);
}

// out[t, k] = row(t, first slot naming topk_idx[t, k]), or zeros on a masked
// slot (-1, or an expert of a skipped rank): the rows a combine would sum,
// unsummed (the backward of dispatch and of combine). A warp per (token,
// slot); BF16 rows. The last block ends the call.
__global__ void __launch_bounds__(kThreads) combine_gather_kernel(Args a, const int* topk_idx, __nv_bfloat16* out) {
  if (detail::block_aborted(a, kOpCombineRecv)) return;  // the wait failed, or a peer did: out untouched
  const Shape s = a.shape;
  const int R = a.peers.num_ranks, K = s.num_topk, le = s.local_experts(R);
  const Layout l = Layout::make(s, R);
  const int half = static_cast<int>(ld_volatile(&detail::control(a)->combine_call) & 1ull);
  const char* rows = a.peers.local + l.combine_rows + half * l.combine_rows_half;
  const std::size_t row_bytes = static_cast<std::size_t>(s.hidden) * 2;
  const int vecs = s.hidden / 8, lane = threadIdx.x % 32;
  const long long n = static_cast<long long>(s.num_tokens) * K;
  for (long long i = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int t = static_cast<int>(i / K), k = static_cast<int>(i % K);
    const int* ids = topk_idx + static_cast<long long>(t) * K;
    auto* to = reinterpret_cast<int4*>(out + i * s.hidden);
    if (ids[k] < 0 || ids[k] >= s.num_experts || detail::skips(a, ids[k] / le)) {
      for (int v = lane; v < vecs; v += 32) to[v] = make_int4(0, 0, 0, 0);
      continue;
    }
    int f = 0;
    while (ids[f] != ids[k]) ++f;
    const auto* from = reinterpret_cast<const int4*>(rows + (static_cast<std::size_t>(t) * K + f) * row_bytes);
    for (int v = lane; v < vecs; v += 32) to[v] = ld_cg_v4(from + v);
  }
  finish_combine(a, l, half);
}

}  // namespace

cudaError_t launch_combine_send(const Args& a, const void* y, const int* recv_src_rank, const int* recv_src_token,
                                const int* recv_src_slot, int num_blocks, cudaStream_t stream) {
  combine_send_kernel<<<std::max(1, num_blocks), kThreads, 0, stream>>>(
      a, static_cast<const __nv_bfloat16*>(y), recv_src_rank, recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const Args& a, const int* topk_idx, const float* topk_weights, void* out,
                                int num_blocks, cudaStream_t stream) {
  combine_wait_kernel<<<1, 1024, 0, stream>>>(a);
  auto* sum = a.shape.combine_fp8 ? combine_sum_kernel<true> : combine_sum_kernel<false>;
  sum<<<std::max(1, num_blocks), kThreads, 0, stream>>>(a, topk_idx, topk_weights, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

cudaError_t launch_combine_gather(const Args& a, const int* topk_idx, void* out, int num_blocks,
                                  cudaStream_t stream) {
  if (a.shape.combine_fp8) return cudaErrorInvalidValue;  // the unsummed rows travel as BF16
  combine_wait_kernel<<<1, 1024, 0, stream>>>(a);
  combine_gather_kernel<<<std::max(1, num_blocks), kThreads, 0, stream>>>(a, topk_idx,
                                                                          static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace ll_put
}  // namespace jax_ep
