// Low-latency dispatch over the transport seam. See ll_put.cuh for the protocol.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "fp8.cuh"
#include "ll_put.cuh"
#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace ll_put {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

using detail::first_slot;

// Offset of the (local expert, source) signal word of `half`.
__device__ __forceinline__ std::size_t dispatch_word(const Layout& l, int half, int local_expert, int src, int R) {
  return l.dispatch_words + half * l.dispatch_words_half + (static_cast<std::size_t>(local_expert) * R + src) * 8;
}

// The token's message, built by the whole block into `msg`: header, then the
// values (a BF16 copy, or the FP8 cast with a warp per 128-channel group).
__device__ void build_message(const Shape& s, const __nv_bfloat16* row, const int* ids, int token, char* msg) {
  if (threadIdx.x == 0) {
    reinterpret_cast<int*>(msg)[0] = token;
    reinterpret_cast<int*>(msg)[1] = s.num_topk;
  }
  if (threadIdx.x < s.num_topk) reinterpret_cast<int*>(msg)[2 + threadIdx.x] = ids[threadIdx.x];
  char* values = msg + header_bytes(s);
  if (!s.fp8()) {
    for (int v = threadIdx.x; v < s.hidden / 8; v += blockDim.x)
      reinterpret_cast<int4*>(values)[v] = reinterpret_cast<const int4*>(row)[v];
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  char* scales = values + s.hidden;
  for (int g = warp; g < s.hidden / 128; g += kWarps) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row + g * 128 + lane * 4);
    float scale;
    *reinterpret_cast<uint32_t*>(values + g * 128 + lane * 4) =
        fp8_cast_group_warp(raw, s.payload != Payload::kFP8, &scale);
    if (lane == 0) fp8_store_group_scale(scales, g, scale, s.payload == Payload::kFP8UE8M0);
  }
}

// Tokens before `token` naming `expert` (a token naming it in several slots
// counts once): the message's index in its (expert, source) slot range.
__device__ int earlier_tokens_naming(const int* topk_idx, int token, int K, int expert, int lane) {
  int n = 0;
  for (int i = lane; i < token * K; i += 32) {
    n += topk_idx[i] == expert && first_slot(topk_idx + i / K * K, i % K);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) n += __shfl_xor_sync(kFullWarpMask, n, off);
  return n;
}

// Sends token t's messages, one per expert it names (its first slot naming
// it), from `msg(k)`: the staged message of slot k.
template <class Msg>
__device__ void put_token(const Args& a, const Layout& l, int half, const int* topk_idx, int t, Msg msg) {
  const Shape& s = a.shape;
  const int R = a.peers.num_ranks, me = a.peers.rank, K = s.num_topk, le = s.local_experts(R);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int* ids = topk_idx + static_cast<long long>(t) * K;
  const std::size_t stride = message_stride(s);
  for (int k = warp; k < K; k += kWarps) {
    const int e = ids[k];
    if (e < 0 || e >= s.num_experts || !first_slot(ids, k) || detail::skips(a, e / le)) continue;
    const int index = earlier_tokens_naming(topk_idx, t, K, e, lane);
    const int dst = e / le, li = e % le;
    const std::size_t slot = l.dispatch_rows + half * l.dispatch_rows_half +
                             ((static_cast<std::size_t>(li) * R + me) * s.max_tokens + index) * stride;
    transport::warp_put_signal(a.peers, dst, slot, msg(k), stride, dispatch_word(l, half, li, me, R), 1, lane);
  }
}

__global__ void __launch_bounds__(kThreads)
    dispatch_send_kernel(Args a, const __nv_bfloat16* x, const int* topk_idx, bool per_slot) {
  if (detail::block_aborted(a, kOpDispatchRecv)) return;  // a dead buffer: send nothing
  const Shape s = a.shape;
  const int R = a.peers.num_ranks, me = a.peers.rank, K = s.num_topk, le = s.local_experts(R);
  const Layout l = Layout::make(s, R);
  const int half = static_cast<int>(ld_volatile(&detail::control(a)->dispatch_call) & 1ull);
  const std::size_t stride = message_stride(s);
  char* stage = a.peers.local + l.dispatch_stage + half * l.dispatch_stage_half;

  // Block 0 first sends the call's signature and every expert's final add:
  // arrival counting needs no order between them and the rows, so they go
  // out before them.
  if (blockIdx.x == 0) {
    detail::send_signature(a, 0, half);
    __shared__ int count[kMaxWords];
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < s.num_tokens * K; i += blockDim.x) {
      const int e = topk_idx[i];
      if (e >= 0 && e < s.num_experts && first_slot(topk_idx + i / K * K, i % K)) atomicAdd(&count[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
      if (detail::skips(a, e / le)) continue;
      transport::signal_add(a.peers, e / le, dispatch_word(l, half, e % le, me, R),
                            transport::signal_final_value(static_cast<unsigned int>(count[e])));
    }
  }

  // Staging: [t][0] holds token t's message, or per slot [t][k] slot k's.
  for (int t = blockIdx.x; t < s.num_tokens; t += gridDim.x) {
    const int* ids = topk_idx + static_cast<long long>(t) * K;
    char* msgs = stage + static_cast<std::size_t>(t) * K * stride;
    if (per_slot) {
      for (int k = 0; k < K; ++k) {  // uniform across the block
        if (ids[k] < 0 || ids[k] >= s.num_experts || !first_slot(ids, k)) continue;
        build_message(s, x + (static_cast<long long>(t) * K + k) * s.hidden, ids, t, msgs + k * stride);
      }
    } else {
      build_message(s, x + static_cast<long long>(t) * s.hidden, ids, t, msgs);
    }
    __threadfence_system();  // the staged messages, before any warp's puts read them
    __syncthreads();
    put_token(a, l, half, topk_idx, t, [&](int k) { return msgs + (per_slot ? k * stride : 0); });
  }
}

// One block waits until every (local expert, source) word of this call's
// half reads done. A failed wait (timeout, or a peer's abort) records and
// raises the abort; the other threads see it at their next poll and stop,
// and the pack kernel after this one returns at entry.
__global__ void __launch_bounds__(1024) dispatch_wait_kernel(Args a) {
  if (detail::block_aborted(a, kOpDispatchRecv)) return;
  const int R = a.peers.num_ranks, le = a.shape.local_experts(R);
  const Layout l = Layout::make(a.shape, R);
  const unsigned long long call = ld_volatile(&detail::control(a)->dispatch_call);
  const int half = static_cast<int>(call & 1ull);
  // Each source's signature first: a source that made another call may
  // have put its rows elsewhere, so its data words are trusted only after.
  if (!detail::signatures_agree(a, 0, half, kOpDispatchRecv, call + 1)) return;
  for (int i = threadIdx.x; i < le * R; i += blockDim.x) {
    if (detail::skips(a, i % R)) continue;
    const auto* word = reinterpret_cast<const unsigned long long*>(a.peers.local + dispatch_word(l, half, i / R, i % R, R));
    if (!detail::wait_done(a, word, i % R, kOpDispatchRecv, call + 1)) return;
  }
}

// Packs the messages into [E/R, R*M, ...] (a warp per row, a grid that never
// waits), writes the handle and counts; the last block resets the words and
// ends the call.
__global__ void __launch_bounds__(kThreads)
    dispatch_pack_kernel(Args a, char* recv_x, char* recv_scales, int* recv_count, int* src_rank, int* src_token,
                         int* src_slot) {
  if (detail::block_aborted(a, kOpDispatchRecv)) return;  // the wait failed, or a peer did: outputs untouched
  const Shape s = a.shape;
  const int R = a.peers.num_ranks, me = a.peers.rank, le = s.local_experts(R), M = s.max_tokens;
  const Layout l = Layout::make(s, R);
  Control* ctl = detail::control(a);
  const int half = static_cast<int>(ld_volatile(&ctl->dispatch_call) & 1ull);
  const std::size_t stride = message_stride(s);
  const char* rows = a.peers.local + l.dispatch_rows + half * l.dispatch_rows_half;
  __shared__ int start[kMaxWords + 1];  // start[li * R + src]: the first packed row of that source
  __shared__ int total[kMaxWords];      // per local expert
  for (int li = threadIdx.x; li < le; li += blockDim.x) {
    int o = 0;
    for (int src = 0; src < R; ++src) {
      start[li * R + src] = o;
      if (detail::skips(a, src)) continue;
      o += static_cast<int>(transport::signal_count(
          ld_volatile(reinterpret_cast<const unsigned long long*>(a.peers.local + dispatch_word(l, half, li, src, R)))));
    }
    total[li] = o;
    if (blockIdx.x == 0) recv_count[li] = o;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const long long rows_total = static_cast<long long>(le) * R * M;
  for (long long r = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows_total;
       r += static_cast<long long>(gridDim.x) * blockDim.x / 32) {
    const int li = static_cast<int>(r / (static_cast<long long>(R) * M)), o = static_cast<int>(r % (R * M));
    if (o >= total[li]) {
      if (lane == 0) src_rank[r] = src_token[r] = src_slot[r] = -1;
      continue;
    }
    int src = R - 1;
    while (start[li * R + src] > o) --src;  // the last source starting at or before o
    const char* msg = rows + ((static_cast<std::size_t>(li) * R + src) * M + (o - start[li * R + src])) * stride;
    const char* values = msg + header_bytes(s);
    const auto* from = reinterpret_cast<const int4*>(values);
    auto* to = reinterpret_cast<int4*>(recv_x + r * s.value_bytes());
    for (int v = lane; v < s.value_bytes() / 16; v += 32) st_cs_v4(to + v, ld_cg_v4(from + v));
    if (s.fp8()) {
      const int* sc = reinterpret_cast<const int*>(values + s.value_bytes());
      for (int w = lane; w < s.scale_bytes() / 4; w += 32)
        reinterpret_cast<int*>(recv_scales + r * s.scale_bytes())[w] = sc[w];
    }
    if (lane == 0) {
      const int* hdr = reinterpret_cast<const int*>(msg);
      const int expert = me * le + li;
      int slot = 0;
      while (slot < hdr[1] && hdr[2 + slot] != expert) ++slot;
      src_rank[r] = src;
      src_token[r] = hdr[0];
      src_slot[r] = slot;
    }
  }
  if (detail::last_block(&ctl->blocks_done[0])) {
    for (int i = threadIdx.x; i < le * R; i += blockDim.x)
      *reinterpret_cast<unsigned long long*>(a.peers.local + dispatch_word(l, half, i / R, i % R, R)) = 0;
    __syncthreads();
    if (threadIdx.x == 0) ctl->dispatch_call += 1;
  }
}

__global__ void read_status_kernel(Args a, int* out) {
  const intranode::TimeoutRecord* rec = a.record;
  int code = *reinterpret_cast<const volatile int*>(&rec->code);
  __threadfence_system();
  if (code < 0) code = intranode::kFailAborted;  // being written: a failure all the same
  const bool ok = code == intranode::kFailNone;
  out[0] = code;
  out[1] = ok ? -1 : rec->peer;
  out[2] = a.peers.rank;
  out[3] = ok ? -1 : rec->op;
}

}  // namespace

cudaError_t launch_read_status(const Args& a, int* out, cudaStream_t stream) {
  read_status_kernel<<<1, 1, 0, stream>>>(a, out);
  return cudaGetLastError();
}

std::size_t buffer_bytes(const Shape& s, int num_ranks) { return Layout::make(s, num_ranks).total; }

bool supported(const Shape& s, int num_ranks) {
  return num_ranks >= 1 && num_ranks <= transport::kMaxPeers && s.num_experts % num_ranks == 0 &&
         s.num_experts <= kMaxWords && s.num_topk <= intranode::kMaxTopk && s.num_tokens <= s.max_tokens &&
         s.hidden % 128 == 0;
}

cudaError_t launch_dispatch_send(const Args& a, const void* x, const int* topk_idx, int num_blocks,
                                 cudaStream_t stream, bool per_slot) {
  if (per_slot && a.shape.fp8()) return cudaErrorInvalidValue;  // per-slot rows are BF16
  const int blocks = std::max(1, std::min(num_blocks, a.shape.num_tokens));
  dispatch_send_kernel<<<blocks, kThreads, 0, stream>>>(a, static_cast<const __nv_bfloat16*>(x), topk_idx, per_slot);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_recv(const Args& a, void* recv_x, void* recv_scales, int* recv_count,
                                 int* recv_src_rank, int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream) {
  dispatch_wait_kernel<<<1, 1024, 0, stream>>>(a);
  dispatch_pack_kernel<<<std::max(1, num_blocks), kThreads, 0, stream>>>(
      a, static_cast<char*>(recv_x), static_cast<char*>(recv_scales), recv_count, recv_src_rank, recv_src_token,
      recv_src_slot);
  return cudaGetLastError();
}

}  // namespace ll_put
}  // namespace jax_ep
