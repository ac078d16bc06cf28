// Low-latency dispatch, pulled path: the stage kernel routes this rank's
// tokens and writes their messages into its own buffer; the receive waits for
// every source's flag (wait_staged_kernel) and copies the rows it needs from
// the sources' buffers (dispatch_pull_kernel). See low_latency.cuh.
#include "low_latency_dispatch.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

// The messages of this block's tokens blockIdx.x + i * gridDim.x (i <
// my_tokens) into `stage` (message t at t * stride), with many loads in
// flight: a block stages a few tokens, so per-token rounds of loads would
// leave it waiting on memory once per token. FP8: a half-warp per
// 128-channel group, 8 channels (16 bytes) per lane, kInFlight pairs of
// groups per warp per round (fp8.cuh's fp8_cast_group<16>). BF16: a copy,
// kInFlight vectors per thread per round.
__device__ __forceinline__ void stage_messages(const Shape& s, const __nv_bfloat16* x, char* stage,
                                               std::size_t stride, int my_tokens) {
  constexpr int kInFlight = 8;
  auto token_of = [&](int i) { return static_cast<int>(blockIdx.x) + i * static_cast<int>(gridDim.x); };
  if (!s.fp8()) {
    const int vecs = s.hidden / 8, total = my_tokens * vecs;
    for (int v0 = threadIdx.x; v0 < total; v0 += blockDim.x * kInFlight) {
      int4 value[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int v = v0 + u * blockDim.x;
        if (v < total) {
          value[u] = ld_nc_v4(reinterpret_cast<const int4*>(x + static_cast<long long>(token_of(v / vecs)) * s.hidden) +
                              v % vecs);
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int v = v0 + u * blockDim.x;
        if (v < total) reinterpret_cast<int4*>(stage + token_of(v / vecs) * stride + kHeaderBytes)[v % vecs] = value[u];
      }
    }
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, hl = lane % 16;
  const int groups = s.hidden / 128, total = my_tokens * groups;
  const bool pow2_scale = s.payload != Payload::kFP8;
  for (int p0 = warp; 2 * p0 < total; p0 += kWarps * kInFlight) {
    int4 raw[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int g = 2 * (p0 + u * kWarps) + lane / 16;  // this half-warp's group among the block's
      if (g < total) {
        raw[u] = ld_nc_v4(reinterpret_cast<const int4*>(x + static_cast<long long>(token_of(g / groups)) * s.hidden +
                                                        (g % groups) * 128) + hl);
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (2 * (p0 + u * kWarps) >= total) break;  // uniform across the warp
      const int g = 2 * (p0 + u * kWarps) + lane / 16;
      const bool valid = g < total;  // with an odd group count, the last pair's second half has none
      float v[8];
      fp8_bf16_to_float(valid ? raw[u] : int4{}, v);  // a half-warp with no group casts zeros
      uint32_t q[2];  // 8 FP8 bytes, channel order
      const float scale = fp8_cast_group<16>(v, pow2_scale, q);
      if (!valid) continue;
      char* values = stage + token_of(g / groups) * stride + kHeaderBytes;
      const int gg = g % groups;
      *reinterpret_cast<uint2*>(values + gg * 128 + hl * 8) = make_uint2(q[0], q[1]);
      if (hl == 0) write_group_scale(s, values + s.hidden, gg, scale);
    }
  }
}

// Rank r's staged call in every peer's workspace: serial_word(call, its token count).
__device__ __forceinline__ unsigned long long* pull_flags(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + workspace::kPullFlags) +
         half * intranode::kMaxRanks;
}

// Rank r's routing of the staged call, read by the receivers:
// pull_counts(r, half)[e] = serial_word(call, how many of r's tokens name
// expert e). One warp of r's stage kernel counts and stores each expert's
// word: a single writer per word, so no atomic, and no word of another call
// is ever compared with this one's (serial.cuh).
__device__ __forceinline__ unsigned long long* pull_counts(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + workspace::kPullCounts) + half * kCountSlots;
}

// Stage: every block reads this rank's top-k ids into shared memory and
// routes its own tokens (blockIdx.x, + gridDim.x, ...), a warp per (token,
// slot) naming an expert first: the token's index among this rank's tokens
// naming that expert places token * K + slot in the routing table
// (stage_rows, [E][M]). A warp per expert (over the grid's warps) counts the
// tokens naming it and stores its pull_counts word. Then the block writes
// its tokens' messages (the FP8 cast when asked) into this rank's own half;
// the last block to finish flags every peer. Routing once here, at the
// source, leaves each receiver only its experts' counts to read: were every
// receiver block to route all R*M*K ids itself, that alone would take tens
// of microseconds at R = 8.
__global__ void __launch_bounds__(kThreads)
    stage_kernel(PeerTable p, Shape s, const __nv_bfloat16* x, const int* topk_idx, int* token) {
  extern __shared__ __align__(16) int ids[];  // [T][K]: this rank's top-k ids
  const int K = s.num_topk, M = s.max_tokens;
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const Layout l = Layout::make(s, p.num_ranks);
  const std::size_t stride = s.message_stride();
  char* stage = half_of(p, p.rank, call) + l.dispatch_rows;
  int* rows = reinterpret_cast<int*>(stage + s.stage_rows_offset());
  unsigned long long* counts = pull_counts(p.base[p.rank], static_cast<int>(call & 1));
  if (!start_send(p, 0, call, token)) return;
  for (int i = threadIdx.x; i < s.num_tokens * K; i += blockDim.x) ids[i] = topk_idx[i];
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int my_tokens = (s.num_tokens - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
  for (int u = warp; u < my_tokens * K; u += kWarps) {
    const int t = blockIdx.x + (u / K) * gridDim.x, k = u % K;
    const int* tok = ids + t * K;
    if (!first_slot(tok, k, s.num_experts)) continue;  // uniform across the warp
    const int e = tok[k];
    const int idx = earlier_tokens_naming<true>(ids, t, K, e, lane);
    if (lane == 0) rows[static_cast<long long>(e) * M + idx] = t * K + k;
  }
  // Every expert's count, also 0 (plain stores: a cross-block atomic raise of
  // each count cost a round trip to memory per (token, slot)).
  for (int e = blockIdx.x * kWarps + warp; e < s.num_experts; e += gridDim.x * kWarps) {
    const int n = earlier_tokens_naming<true>(ids, s.num_tokens, K, e, lane);
    if (lane == 0) *reinterpret_cast<volatile unsigned long long*>(&counts[e]) = serial_word(call, n);
  }
  stage_messages(s, x, stage, stride, my_tokens);  // (a staged message's header is left unused)
  if (last_block_done<true>(p, 0) && threadIdx.x < p.num_ranks && !skipped(p, threadIdx.x)) {
    __threadfence_system();  // after seeing every block done: their writes go before the flag
    *reinterpret_cast<volatile unsigned long long*>(
        &pull_flags(p.base[threadIdx.x], static_cast<int>(call & 1))[p.rank]) =
        serial_word(call, static_cast<unsigned int>(s.num_tokens));
  }
}

// The only waiting part of a pulled receive: one block waits for every
// source's flag.
__global__ void wait_staged_kernel(PeerTable p) {
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  if (intranode::aborted(p) || (threadIdx.x == 0 && !check_order(p, 0, call, false))) return;
  unsigned long long v;
  if (threadIdx.x < p.num_ranks && !skipped(p, threadIdx.x) &&
      wait_call(p, pull_flags(p.base[p.rank], static_cast<int>(call & 1)) + threadIdx.x, call, threadIdx.x, 3, &v)) {
    intranode::signature_agrees(p, sig_kind(0), call, threadIdx.x, 3);
  }
}

// Pull: every block reads, from every source, the counts of this rank's
// experts, which lay out the packed rows: expert e's rows hold source 0's
// tokens naming e, then source 1's, and so on. Then a warp per valid row
// finds its (expert, source, index), reads the source's token and slot from
// the source's routing table and copies the staged message. Never waits.
__global__ void __launch_bounds__(kThreads, 2)
    dispatch_pull_kernel(PeerTable p, Shape s, char* recv_x, char* recv_scales, int* recv_count,
                         int* src_rank, int* src_token, int* src_slot) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  __shared__ int start[2 * kCountSlots + 64];  // lay_out_rows
  __shared__ int first[kCountSlots + 1];
  const int R = p.num_ranks, M = s.max_tokens, K = s.num_topk;
  const int le = s.local_experts(R), first_expert = p.rank * le;
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const int half = static_cast<int>(call & 1);
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  const int rows_out = R * M;
  for (int i = threadIdx.x; i < le * R; i += blockDim.x) {
    const int e = i / R, r = i % R;
    const unsigned long long c = skipped(p, r) ? 0ull : ld_volatile(pull_counts(p.base[r], half) + first_expert + e);
    start[e * (R + 1) + r + 1] = skipped(p, r) ? 0 : static_cast<int>(value_in_call(c, call));
  }
  __syncthreads();
  lay_out_rows(start, first, le, R, recv_count);
  mark_padding_rows(start, le, R, rows_out, src_rank, src_token, src_slot);
  const int n = first[le];
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  // Rows warp, warp + num_warps, ...: each lane locates one of the warp's
  // next 32 rows (so their routing-table reads are in flight together) and
  // leaves it in shared memory (not registers, which the copy needs), then
  // the warp copies them one by one.
  __shared__ const char* row_msg[kWarps][32];  // the staged message of a row
  __shared__ long long row_out[kWarps][32];    // the row of the output
  const int w = threadIdx.x / 32;
  for (int j0 = warp; j0 < n; j0 += 32 * num_warps) {
    const int j = j0 + lane * num_warps;
    if (j < n) {
      int e, r, q;
      locate_row(start, first, le, R, j, &e, &r, &q);
      const int* rows = reinterpret_cast<const int*>(half_of(p, r, call) + l.dispatch_rows + s.stage_rows_offset());
      const int unit = rows[static_cast<long long>(first_expert + e) * M + (q - start[e * (R + 1) + r])];
      const long long o = static_cast<long long>(e) * rows_out + q;
      row_msg[w][lane] = half_of(p, r, call) + l.dispatch_rows + (unit / K) * stride + kHeaderBytes;
      row_out[w][lane] = o;
      src_rank[o] = r;
      src_token[o] = unit / K;
      src_slot[o] = unit % K;
    }
    __syncwarp();
    const int count = min(32, (n - j0 + num_warps - 1) / num_warps);
    for (int i = 0; i < count; ++i) copy_message(s, row_msg[w][i], recv_x, recv_scales, row_out[w][i], lane);
    __syncwarp();
  }
  advance(p, 0);
}

}  // namespace

bool pull_supported(const Shape& s, int num_ranks) {
  const std::size_t region = static_cast<std::size_t>(s.local_experts(num_ranks)) * num_ranks * s.max_tokens *
                             s.message_stride();
  return static_cast<long long>(s.max_tokens) * s.num_topk <= kMaxPullIds && s.stage_bytes() <= region;
}

cudaError_t launch_dispatch_stage(const PeerTable& peers, const Shape& s, const void* x, const int* topk_idx,
                                  int* token, int num_blocks, cudaStream_t stream) {
  const int smem = s.num_tokens * s.num_topk * static_cast<int>(sizeof(int));  // the ids
  cudaFuncSetAttribute(stage_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  stage_kernel<<<copy_blocks_for(num_blocks, s.num_tokens), kThreads, smem, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(x), topk_idx, token);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_pull(const PeerTable& peers, const Shape& s, void* recv_x, void* recv_scales,
                                 int* recv_count, int* recv_src_rank, int* recv_src_token, int* recv_src_slot,
                                 int num_blocks, cudaStream_t stream) {
  wait_staged_kernel<<<1, 64, 0, stream>>>(peers);
  dispatch_pull_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, static_cast<char*>(recv_x), static_cast<char*>(recv_scales), recv_count, recv_src_rank,
      recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
