// Low-latency dispatch, push path: the send kernel writes each (token,
// expert) message into the expert rank's buffer and publishes the counts; the
// receive waits for the counts (wait_counts_kernel) and packs the rows
// (dispatch_recv_kernel). See low_latency.cuh for the protocol.
#include "low_latency_dispatch.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

// The payload of one message, built by the whole block from the BF16 token
// `row`: a copy (BF16), or the per-128-channel FP8 cast of
// jax_ep.reference.fp8 (values, then the scales) with a warp per group.
__device__ __forceinline__ void build_message(const Shape& s, const __nv_bfloat16* row, char* values) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (!s.fp8()) {
    for (int v = threadIdx.x; v < s.hidden / 8; v += blockDim.x)
      reinterpret_cast<int4*>(values)[v] = reinterpret_cast<const int4*>(row)[v];
    return;
  }
  char* scales = values + s.hidden;
  const int groups = s.hidden / 128;
  constexpr int kInFlight = 4;  // groups per warp whose loads are issued together
  for (int g0 = warp; g0 < groups; g0 += kWarps * kInFlight) {  // a warp per 128 channels, 4 per lane
    uint2 raw[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int g = g0 + u * kWarps;
      if (g < groups) raw[u] = *reinterpret_cast<const uint2*>(row + g * 128 + lane * 4);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int g = g0 + u * kWarps;
      if (g >= groups) break;  // uniform across the warp
      float scale;
      *reinterpret_cast<unsigned int*>(values + g * 128 + lane * 4) =
          fp8_cast_group_warp(raw[u], s.payload != Payload::kFP8, &scale);
      if (lane == 0) write_group_scale(s, scales, g, scale);
    }
  }
}

// One block per token: build its message once in shared memory (BF16 copy,
// or the per-128-channel FP8 cast of jax_ep.reference.fp8), then warp k
// copies it to the destination of top-k slot k, at the index of token t among
// this rank's tokens naming that expert (the warp counts the earlier tokens
// naming it, so no planning pass is needed). With `per_slot` (BF16 only) x
// is [T, K, H] and slot k sends its own row x[t, k] (the backward of
// combine). The last block to finish counts each expert's tokens and
// publishes the counts to the experts' ranks.
__global__ void __launch_bounds__(kThreads)
    send_kernel(PeerTable p, Shape s, const __nv_bfloat16* x, const int* topk_idx, bool per_slot, int* token) {
  extern __shared__ int4 smem[];
  char* msg = reinterpret_cast<char*>(smem);
  const int R = p.num_ranks, me = p.rank, le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int vecs = static_cast<int>(stride / 16);
  if (!start_send(p, 0, call, token)) return;
  for (int t = blockIdx.x; t < s.num_tokens; t += gridDim.x) {
    const __nv_bfloat16* row = x + static_cast<long long>(t) * s.hidden;
    if (threadIdx.x == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, 0, 0, 0);
    if (!per_slot) build_message(s, row, msg + kHeaderBytes);  // per-slot rows go straight from x below
    __syncthreads();
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    if (warp < s.num_topk && first_slot(ids, warp, s.num_experts) && !skipped(p, ids[warp] / le)) {
      const int k = warp, e = ids[k];
      const int idx = earlier_tokens_naming(topk_idx, t, s.num_topk, e, lane);
      const int dst = e / le, local = e % le;
      char* out = half_of(p, dst, call) + l.dispatch_rows +
                  ((static_cast<std::size_t>(local) * R + me) * s.max_tokens + idx) * stride;
      if (lane == 0) *reinterpret_cast<int4*>(out) = make_int4(t, k, 0, 0);
      if (per_slot) {
        const int4* from = reinterpret_cast<const int4*>(x + (static_cast<long long>(t) * s.num_topk + k) * s.hidden);
        for (int v = lane; v < s.hidden / 8; v += 32) reinterpret_cast<int4*>(out)[1 + v] = from[v];
      } else {
        for (int v = 1 + lane; v < vecs; v += 32) reinterpret_cast<int4*>(out)[v] = smem[v];
      }
    }
    __syncthreads();
  }
  // The last block to finish counts each expert's tokens (a shared-memory
  // histogram of the first slots) and publishes the counts, one thread per
  // expert: one system fence, then plain stores (release stores one after
  // another would cost a fence each).
  if (last_block_done<true>(p, 0)) {
    __shared__ int count[kCountSlots];
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < s.num_tokens * s.num_topk; i += blockDim.x) {
      const int* ids = topk_idx + (i / s.num_topk) * s.num_topk;
      if (first_slot(ids, i % s.num_topk, s.num_experts)) atomicAdd(&count[ids[i % s.num_topk]], 1);
    }
    __syncthreads();
    __threadfence_system();
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
      if (skipped(p, e / le)) continue;
      auto* slot = &dispatch_counts(p.base[e / le], static_cast<int>(call & 1))[(e % le) * R + me];
      *reinterpret_cast<volatile unsigned long long*>(slot) = serial_word(call, static_cast<unsigned int>(count[e]));
    }
  }
}

// Local copy of this call's (expert, source) counts, written by the wait kernel.
__device__ __forceinline__ int* received_counts(const PeerTable& p) {
  return reinterpret_cast<int*>(p.base[p.rank] + intranode::kSignalBytes + workspace::kReceivedCounts);
}

// The only waiting part of a dispatch receive: one block waits for every
// (local expert, source) count of this call and copies them locally.
__global__ void __launch_bounds__(1024) wait_counts_kernel(PeerTable p, Shape s) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  int* counts = received_counts(p);
  if (intranode::aborted(p) || (threadIdx.x == 0 && !check_order(p, 0, call, false))) return;
  for (int i = threadIdx.x; i < le * R; i += blockDim.x) {
    const auto* slot = dispatch_counts(p.base[p.rank], static_cast<int>(call & 1)) + i;
    if (skipped(p, i % R)) {
      counts[i] = 0;
      continue;
    }
    unsigned long long v;
    if (!wait_call(p, slot, call, i % R, 3, &v)) return;
    // Slots [0, R) are local expert 0 of every source: one check per source.
    if (i < R && !intranode::signature_agrees(p, sig_kind(0), call, i, 3)) return;
    counts[i] = static_cast<int>(word_value(v));
  }
}

// Lay out the packed rows from the received counts; then the grid copies
// them, 16-byte vectors with several loads in flight per thread. Never waits.
__global__ void __launch_bounds__(kThreads)
    dispatch_recv_kernel(PeerTable p, Shape s, char* recv_x, char* recv_scales, int* recv_count,
                         int* src_rank, int* src_token, int* src_slot) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  const int rows_out = R * s.max_tokens;
  const char* mine = half_of(p, p.rank, call);
  __shared__ int start[2 * kCountSlots + 64];  // (E/R) * (R + 1) <= 2 * E: lay_out_rows
  __shared__ int expert_first[kCountSlots + 1];
  const int* counts = received_counts(p);
  for (int i = threadIdx.x; i < le * R; i += blockDim.x) start[(i / R) * (R + 1) + i % R + 1] = counts[i];
  __syncthreads();
  lay_out_rows(start, expert_first, le, R, recv_count);
  const int total = expert_first[le];
  mark_padding_rows(start, le, R, rows_out, src_rank, src_token, src_slot);
  // One warp per valid row: find it once, then copy values (16-byte vectors,
  // several in flight per lane) and scales (words).
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int flat = warp; flat < total; flat += num_warps) {
    int e, r, j;
    locate_row(start, expert_first, le, R, flat, &e, &r, &j);
    const char* msg = mine + l.dispatch_rows +
                      ((static_cast<std::size_t>(e) * R + r) * s.max_tokens + (j - start[e * (R + 1) + r])) * stride;
    const long long o = static_cast<long long>(e) * rows_out + j;
    if (lane == 0) {
      const int* hdr = reinterpret_cast<const int*>(msg);
      src_rank[o] = r;
      src_token[o] = hdr[0];
      src_slot[o] = hdr[1];
    }
    copy_message(s, msg + kHeaderBytes, recv_x, recv_scales, o, lane);
  }
  advance(p, 0);
}

}  // namespace

cudaError_t launch_dispatch_send(const PeerTable& peers, const Shape& s, const void* x,
                                 const int* topk_idx, int* token, int num_blocks, cudaStream_t stream,
                                 bool per_slot) {
  const int smem = static_cast<int>(s.message_stride());
  cudaFuncSetAttribute(send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  send_kernel<<<copy_blocks_for(num_blocks, s.num_tokens), kThreads, smem, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(x), topk_idx, per_slot, token);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_recv(const PeerTable& peers, const Shape& s, void* recv_x,
                                 void* recv_scales, int* recv_count, int* recv_src_rank,
                                 int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream) {
  wait_counts_kernel<<<1, 1024, 0, stream>>>(peers, s);
  dispatch_recv_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, static_cast<char*>(recv_x), static_cast<char*>(recv_scales), recv_count, recv_src_rank,
      recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
