// Low-latency send/receive kernels. See low_latency.cuh for the protocol.
#include "low_latency.cuh"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

using intranode::Signals;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Every kernel fits two blocks per SM (at most 64 registers a thread), so a
// send block of one rank always fits beside a spinning receive block of
// another on the same SM.
constexpr int kMinBlocksPerSm = 2;

// Call counters live in the signal block's spare words.
__device__ __forceinline__ unsigned long long* dispatch_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[0];
}
__device__ __forceinline__ unsigned long long* combine_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[1];
}

// Finished-block counters, one per kernel so that kernels of different kinds
// never share one (pad[2] and pad[3] hold four 32-bit counters).
enum BlockCounter : int { kDispatchSendBlocks = 0, kDispatchRecvBlocks, kCombineSendBlocks, kCombineRecvBlocks };
__device__ __forceinline__ unsigned int* blocks_done(const PeerTable& p, BlockCounter which) {
  return reinterpret_cast<unsigned int*>(&reinterpret_cast<Signals*>(p.base[p.rank])->pad[2]) + which;
}

// The sender's per-expert count of its latest dispatch, (call << 32) |
// count, raised with atomicMax by the block that sends each message; a word
// still carrying an older call number means a count of 0, so nothing is reset.
constexpr std::size_t kSendCountsOffset = 40 * 1024;
static_assert(kSendCountsOffset >= (2 * kCountSlots + 2 * intranode::kMaxRanks) * sizeof(unsigned long long),
              "send counts overlap the count slots and flags");
static_assert(kSendCountsOffset + kCountSlots * sizeof(unsigned long long) <= intranode::kWorkspaceBytes,
              "send counts do not fit the workspace");
__device__ __forceinline__ unsigned long long* send_counts(const PeerTable& p) {
  return reinterpret_cast<unsigned long long*>(p.base[p.rank] + intranode::kSignalBytes + kSendCountsOffset);
}

__device__ __forceinline__ char* half_of(const PeerTable& p, int rank, unsigned long long call) {
  return intranode::staging_half(p.base[rank], static_cast<int>(call & 1ull), p.staging_half_bytes);
}

// 16-byte read of a message a peer wrote before the count (or flag) this
// kernel waited for: a coherent load that does not allocate in L1.
__device__ __forceinline__ int4 ld_v4_no_alloc(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// Spin until *slot's call number (high 32 bits, or the whole word when
// `whole`) reaches `call`; on timeout leave a record and trap.
__device__ unsigned long long wait_call(const PeerTable& p, const unsigned long long* slot,
                                        unsigned long long call, bool whole, int peer, int op) {
  auto ready = [&](unsigned long long v) { return (whole ? v : (v >> 32)) >= call; };
  unsigned long long v = ld_acquire_sys(slot);
  if (ready(v)) return v;
  const unsigned long long start = global_timer_ns();
  while (!ready(v = ld_acquire_sys(slot))) {
    if (global_timer_ns() - start > p.timeout_ns) intranode::fail_wait(p, peer, op, call, whole ? v : (v >> 32));
  }
  return v;
}

// True in every thread of the block that finished last; that block resets
// the counter. With `publish`, each block's writes are fenced at system scope
// first (the last block then publishes them to peers). A receive kernel ends
// with it to advance its call counter: every block read the counter at its
// start, before it counted itself here, so none can read the advanced value.
template <bool publish>
__device__ __forceinline__ bool last_block_done(const PeerTable& p, BlockCounter which) {
  __shared__ bool last;
  if (publish) __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(blocks_done(p, which), 1u) + 1 == gridDim.x;
    if (last) *blocks_done(p, which) = 0;
  }
  __syncthreads();
  return last;
}

// The call a receive kernel serves: read once per block by thread 0 before a
// barrier, so each block has read it before it can count itself finished
// (and so before the last block advances the counter).
__device__ __forceinline__ unsigned long long block_read_call(const unsigned long long* counter) {
  __shared__ unsigned long long call;
  if (threadIdx.x == 0) call = ld_volatile(counter) + 1;
  __syncthreads();
  return call;
}

// Bits of float32 scale -> smallest power of two >= it (exact).
__device__ __forceinline__ float pow2_ceil(float s) {
  unsigned int bits = __float_as_uint(s);
  unsigned int e = (bits >> 23) & 0xffu;
  e += (bits & 0x7fffffu) != 0u;
  return __uint_as_float(e << 23);
}

// Index of token t among the local tokens naming expert `id` (the number of
// tokens before t whose row holds it), summed over the warp. The row prefix
// is read as 16-byte vectors; a match counts when it is the first slot of its
// row naming the expert (matches are rare, so the division there is cheap).
__device__ __forceinline__ int rank_among_tokens(const int* topk_idx, int t, int num_topk, int id, int lane) {
  const int len = t * num_topk;
  int n = 0;
  auto hit = [&](int i) {
    const int row = i - i % num_topk;
    bool first = true;
    for (int j = row; j < i; ++j) first &= __ldg(topk_idx + j) != id;
    n += first;
  };
  // 16-byte loads when the array is 16-byte aligned (XLA's buffers are).
  const int vecs = reinterpret_cast<std::uintptr_t>(topk_idx) % 16 == 0 ? len / 4 : 0;
  const int4* v4 = reinterpret_cast<const int4*>(topk_idx);
  for (int v = lane; v < vecs; v += 32) {
    const int4 q = __ldg(v4 + v);
    if (q.x == id) hit(4 * v);
    if (q.y == id) hit(4 * v + 1);
    if (q.z == id) hit(4 * v + 2);
    if (q.w == id) hit(4 * v + 3);
  }
  for (int i = 4 * vecs + lane; i < len; i += 32) {
    if (__ldg(topk_idx + i) == id) hit(i);
  }
  return __reduce_add_sync(kFullWarpMask, n);
}

// One block per token: warp k finds whether top-k slot k is the first naming
// its expert and, if so, the token's index among this rank's tokens for that
// expert; meanwhile the block builds the message once in shared memory (BF16
// copy, or the per-128-channel FP8 cast of jax_ep.reference.fp8). Then warp k
// copies it to slot k's destination and raises the expert's count. The last
// block to finish publishes every expert's count to the expert's rank.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    send_kernel(PeerTable p, Shape s, const __nv_bfloat16* x, const int* topk_idx) {
  extern __shared__ int4 smem[];
  char* msg = reinterpret_cast<char*>(smem);
  const int R = p.num_ranks, me = p.rank, le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  unsigned long long* counts = send_counts(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int vecs = static_cast<int>(stride / 16);
  for (int t = blockIdx.x; t < s.num_tokens; t += gridDim.x) {
    int id = -1, idx = -1;
    if (warp < s.num_topk) {
      const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
      id = __ldg(ids + warp);
      bool first = id >= 0 && id < s.num_experts;
      for (int j = 0; j < warp; ++j) first &= __ldg(ids + j) != id;
      if (first) idx = rank_among_tokens(topk_idx, t, s.num_topk, id, lane);
    }
    const __nv_bfloat16* row = x + static_cast<long long>(t) * s.hidden;
    char* values = msg + kHeaderBytes;
    if (!s.fp8()) {
      for (int v = threadIdx.x; v < s.hidden / 8; v += blockDim.x)
        reinterpret_cast<int4*>(values)[v] = reinterpret_cast<const int4*>(row)[v];
    } else {
      char* scales = values + s.hidden;
      for (int g = warp; g < s.hidden / 128; g += kWarps) {  // a warp per 128 channels, 4 per lane
        const int c = g * 128 + lane * 4;
        const uint2 raw = *reinterpret_cast<const uint2*>(row + c);
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
        const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
        float amax = fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(b.x), fabsf(b.y)));
#pragma unroll
        for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, off));
        amax = fmaxf(amax, 1e-4f);
        float scale = amax * 0.002232142857142857f;  // float32(1/448), see reference/fp8.py
        if (s.payload != Payload::kFP8) scale = pow2_ceil(scale);
        const float inv = __fdiv_rn(1.0f, scale);
        unsigned char q[4];
        q[0] = __nv_cvt_float_to_fp8(__fmul_rn(a.x, inv), __NV_SATFINITE, __NV_E4M3);
        q[1] = __nv_cvt_float_to_fp8(__fmul_rn(a.y, inv), __NV_SATFINITE, __NV_E4M3);
        q[2] = __nv_cvt_float_to_fp8(__fmul_rn(b.x, inv), __NV_SATFINITE, __NV_E4M3);
        q[3] = __nv_cvt_float_to_fp8(__fmul_rn(b.y, inv), __NV_SATFINITE, __NV_E4M3);
        *reinterpret_cast<unsigned int*>(values + c) = *reinterpret_cast<const unsigned int*>(q);
        if (lane == 0) {
          if (s.payload == Payload::kFP8UE8M0) scales[g] = static_cast<char>((__float_as_uint(scale) >> 23) & 0xffu);
          else reinterpret_cast<float*>(scales)[g] = scale;
        }
      }
    }
    __syncthreads();
    if (idx >= 0) {  // warp k < K, slot k is the first naming expert `id`
      const int dst = id / le, local = id - dst * le;
      char* out = half_of(p, dst, call) + l.dispatch_rows +
                  ((static_cast<std::size_t>(local) * R + me) * s.max_tokens + idx) * stride;
      if (lane == 0) {
        *reinterpret_cast<int4*>(out) = make_int4(t, warp, 0, 0);
        atomicMax(counts + id, (call << 32) | static_cast<unsigned long long>(idx + 1));
      }
      for (int v = 1 + lane; v < vecs; v += 32) reinterpret_cast<int4*>(out)[v] = smem[v];
    }
    __syncthreads();
  }
  // The last block to finish publishes the counts, one thread per expert:
  // one system fence, then plain stores (release stores one after another
  // would cost a fence each).
  if (last_block_done<true>(p, kDispatchSendBlocks)) {
    __threadfence_system();
    const unsigned long long tag = call & 0xffffffffull;
    for (int e = threadIdx.x; e < s.num_experts; e += blockDim.x) {
      const unsigned long long c = ld_volatile(counts + e);
      const unsigned long long count = (c >> 32) == tag ? (c & 0xffffffffull) : 0ull;
      const int dst = e / le;
      auto* slot = &dispatch_counts(p.base[dst], static_cast<int>(call & 1))[(e - dst * le) * R + me];
      *reinterpret_cast<volatile unsigned long long*>(slot) = (call << 32) | count;
    }
  }
}

// Dispatch receive, one kernel: every block waits for every (local expert,
// source) count of this call (only this kernel waits; the senders it waits on
// never do), lays out the packed rows, then the grid copies them, a warp per
// row, 16-byte vectors with several loads in flight per lane. The block that
// finishes last advances the dispatch call counter.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    dispatch_recv_kernel(PeerTable p, Shape s, char* recv_x, char* recv_scales, int* recv_count,
                         int* src_rank, int* src_token, int* src_slot) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = block_read_call(dispatch_counter(p));
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  const int rows_out = R * s.max_tokens;
  const char* mine = half_of(p, p.rank, call);
  // start[e * (R + 1) + r]: first packed row of (expert e, source r); [.. + R] = total.
  __shared__ int start[4160];          // (E/R) * (R + 1) <= 2 * E
  __shared__ int expert_first[2049];  // first flat row of expert e (flattened over experts)
  const unsigned long long* slots = dispatch_counts(p.base[p.rank], static_cast<int>(call & 1));
  for (int i = threadIdx.x; i < le * R; i += blockDim.x) {
    const int e = i / R, r = i - e * R;
    start[e * (R + 1) + r + 1] = static_cast<int>(wait_call(p, slots + i, call, false, r, 3) & 0xffffffffull);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < le; e += blockDim.x) {
    int* st = start + e * (R + 1);
    st[0] = 0;
    for (int r = 1; r <= R; ++r) st[r] += st[r - 1];
    if (blockIdx.x == 0) recv_count[e] = st[R];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < le; ++e) {
      expert_first[e] = acc;
      acc += start[e * (R + 1) + R];
    }
    expert_first[le] = acc;
  }
  __syncthreads();
  const int total = expert_first[le];
  // Row `flat` of the packed output -> (expert e, source r, index j in e's rows).
  auto locate = [&](int flat, int& e, int& r, int& j) {
    int lo = 0, hi = le;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (expert_first[mid] <= flat) lo = mid;
      else hi = mid;
    }
    e = lo;
    j = flat - expert_first[e];
    const int* st = start + e * (R + 1);
    lo = 0, hi = R;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (st[mid] <= j) lo = mid;
      else hi = mid;
    }
    r = lo;
  };
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  // Routing of the padding rows (past each expert's count): -1, a warp per
  // chunk of 256 rows of one expert.
  constexpr int kChunk = 256;
  const int chunks = (rows_out + kChunk - 1) / kChunk;
  for (int c = warp; c < le * chunks; c += num_warps) {
    const int e = c / chunks;
    const int first = (c - e * chunks) * kChunk;
    const int end = min(first + kChunk, rows_out);
    const long long base = static_cast<long long>(e) * rows_out;
    for (int j = max(first, start[e * (R + 1) + R]) + lane; j < end; j += 32) {
      src_rank[base + j] = -1;
      src_token[base + j] = -1;
      src_slot[base + j] = -1;
    }
  }
  // One warp per valid row: find it once, then copy values (16-byte vectors,
  // several in flight per lane) and scales (words).
  const int value_vecs = s.value_bytes() / 16;
  const int words = s.fp8() ? s.scale_bytes() / 4 : 0;
  for (int flat = warp; flat < total; flat += num_warps) {
    int e, r, j;
    locate(flat, e, r, j);
    const char* msg = mine + l.dispatch_rows +
                      ((static_cast<std::size_t>(e) * R + r) * s.max_tokens + (j - start[e * (R + 1) + r])) * stride;
    const long long o = static_cast<long long>(e) * rows_out + j;
    if (lane == 0) {
      const int* hdr = reinterpret_cast<const int*>(msg);
      src_rank[o] = r;
      src_token[o] = hdr[0];
      src_slot[o] = hdr[1];
    }
    const int4* from = reinterpret_cast<const int4*>(msg + kHeaderBytes);
    int4* to = reinterpret_cast<int4*>(recv_x + o * s.value_bytes());
    constexpr int kUnroll = 8;
    for (int v0 = lane; v0 < value_vecs; v0 += 32 * kUnroll) {
      int4 value[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + 32 * u < value_vecs) value[u] = ld_v4_no_alloc(from + v0 + 32 * u);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + 32 * u < value_vecs) to[v0 + 32 * u] = value[u];
      }
    }
    for (int w = lane; w < words; w += 32) {
      reinterpret_cast<int*>(recv_scales + o * s.scale_bytes())[w] =
          reinterpret_cast<const int*>(msg + kHeaderBytes + s.value_bytes())[w];
    }
  }
  if (last_block_done<false>(p, kDispatchRecvBlocks) && threadIdx.x == 0) {
    unsigned long long* c = dispatch_counter(p);
    *reinterpret_cast<volatile unsigned long long*>(c) = call;
  }
}

// Push each valid row of y to its token's owner, into [token][slot], several
// 16-byte loads in flight per thread; the last block publishes the flags.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    combine_send_kernel(PeerTable p, Shape s, const __nv_bfloat16* y, const int* recv_count,
                        const int* src_rank, const int* src_token, const int* src_slot) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const int rows_out = R * s.max_tokens;
  const int vecs = s.hidden / 8;
  // Only the valid rows: first[e] = valid rows of the experts before e.
  __shared__ int first[2049];
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < le; ++e) {
      first[e] = acc;
      acc += recv_count[e];
    }
    first[le] = acc;
  }
  __syncthreads();
  // One warp per valid row: find it once, then push its vectors.
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int flat = warp; flat < first[le]; flat += num_warps) {
    int lo = 0, hi = le;  // the expert e with first[e] <= flat < first[e + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (first[mid] <= flat) lo = mid;
      else hi = mid;
    }
    const long long row = static_cast<long long>(lo) * rows_out + (flat - first[lo]);
    const int4* from = reinterpret_cast<const int4*>(y + row * s.hidden);
    int4* to = reinterpret_cast<int4*>(half_of(p, src_rank[row], call) + l.combine_rows +
                                       (static_cast<std::size_t>(src_token[row]) * s.num_topk + src_slot[row]) *
                                           s.hidden * 2);
    constexpr int kUnroll = 4;
    for (int v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
      int4 value[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + 32 * u < vecs) value[u] = from[v0 + 32 * u];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v0 + 32 * u < vecs) to[v0 + 32 * u] = value[u];
      }
    }
  }
  if (last_block_done<true>(p, kCombineSendBlocks) && threadIdx.x < R) {
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(
        &combine_flags(p.base[threadIdx.x], static_cast<int>(call & 1))[p.rank]) = call;
  }
}

// Combine receive, one kernel: every block waits for every rank's flag of
// this call, then out[t] = sum_k w[t, k] * row(t, first slot naming k's
// expert) in float32, a warp per token and a lane per 16-byte vector, all
// top-k loads in flight. The block that finishes last advances the combine
// call counter.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    combine_recv_kernel(PeerTable p, Shape s, const int* topk_idx, const float* topk_weights,
                        __nv_bfloat16* out) {
  constexpr int kMaxK = intranode::kMaxTopk;
  constexpr int kLoads = 8;
  static_assert(kMaxK % kLoads == 0, "top-k chunks");
  const int R = p.num_ranks;
  const unsigned long long call = block_read_call(combine_counter(p));
  if (threadIdx.x < R) {
    wait_call(p, combine_flags(p.base[p.rank], static_cast<int>(call & 1)) + threadIdx.x, call, true,
              threadIdx.x, 4);
  }
  __syncthreads();
  const Layout l = Layout::make(s, R);
  const char* mine = half_of(p, p.rank, call);
  const int vecs = s.hidden / 8;
  const int K = s.num_topk;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  // Per warp: slot k's vector offset inside the token's rows (the row of
  // the first slot naming k's expert), or -1, and its weight.
  __shared__ int slot_off[kWarps][kMaxK];
  __shared__ float slot_w[kWarps][kMaxK];
  int* my_off = slot_off[threadIdx.x / 32];
  float* my_w = slot_w[threadIdx.x / 32];
  for (int t = warp; t < s.num_tokens; t += num_warps) {
    if (lane < K) {
      const int* ids = topk_idx + static_cast<long long>(t) * K;
      const int id = ids[lane];
      int off = -1;
      float w = 0.0f;
      if (id >= 0 && id < s.num_experts) {
        int k0 = 0;
        while (ids[k0] != id) ++k0;
        off = k0 * vecs;
        w = topk_weights[static_cast<long long>(t) * K + lane];
      }
      my_off[lane] = off;
      my_w[lane] = w;
    }
    __syncwarp();
    const int4* rows = reinterpret_cast<const int4*>(mine + l.combine_rows) + static_cast<long long>(t) * K * vecs;
    int4* to = reinterpret_cast<int4*>(out + static_cast<long long>(t) * s.hidden);
    for (int v = lane; v < vecs; v += 32) {
      float acc[8] = {};
      // kLoads top-k rows in flight at a time, summed in slot order.
#pragma unroll
      for (int k0 = 0; k0 < kMaxK; k0 += kLoads) {
        if (k0 < K) {
          int4 raw[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            raw[u] = make_int4(0, 0, 0, 0);
            if (k0 + u < K && my_off[k0 + u] >= 0) raw[u] = ld_v4_no_alloc(rows + my_off[k0 + u] + v);
          }
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            if (k0 + u < K) {
              const float w = my_w[k0 + u];
              const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const float2 f = __bfloat1622float2(h[q]);
                acc[2 * q] = fmaf(w, f.x, acc[2 * q]);
                acc[2 * q + 1] = fmaf(w, f.y, acc[2 * q + 1]);
              }
            }
          }
        }
      }
      int4 packed;
      auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
      to[v] = packed;
    }
    __syncwarp();  // the next token's offsets overwrite these
  }
  if (last_block_done<false>(p, kCombineRecvBlocks) && threadIdx.x == 0) {
    unsigned long long* c = combine_counter(p);
    *reinterpret_cast<volatile unsigned long long*>(c) = call;
  }
}

int blocks_for(int num_blocks) { return std::max(1, num_blocks); }

// Kernels that never wait may take more blocks than the budget of waiting ones.
int copy_blocks_for(int num_blocks, long long items) {
  return static_cast<int>(std::max<long long>(1, std::min<long long>(4ll * num_blocks, items)));
}

}  // namespace

std::size_t buffer_bytes(const Shape& s, int num_ranks) {
  return intranode::kSignalBytes + intranode::kWorkspaceBytes + 2 * Layout::make(s, num_ranks).half_bytes +
         intranode::kAlign;
}

cudaError_t launch_dispatch_send(const PeerTable& peers, const Shape& s, const void* x,
                                 const int* topk_idx, int num_blocks, cudaStream_t stream) {
  const int smem = static_cast<int>(s.message_stride());
  if (smem > 48 * 1024) cudaFuncSetAttribute(send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  send_kernel<<<copy_blocks_for(num_blocks, s.num_tokens), kThreads, smem, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(x), topk_idx);
  return cudaGetLastError();
}

// The receive kernels spin-wait in every block: their grids stay within the
// SM budget so that, with several ranks sharing a GPU, the send kernels they
// wait on always find room to run.
cudaError_t launch_dispatch_recv(const PeerTable& peers, const Shape& s, void* recv_x,
                                 void* recv_scales, int* recv_count, int* recv_src_rank,
                                 int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream) {
  dispatch_recv_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      peers, s, static_cast<char*>(recv_x), static_cast<char*>(recv_scales), recv_count, recv_src_rank,
      recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

cudaError_t launch_combine_send(const PeerTable& peers, const Shape& s, const void* y,
                                const int* recv_count, const int* recv_src_rank,
                                const int* recv_src_token, const int* recv_src_slot,
                                int num_blocks, cudaStream_t stream) {
  combine_send_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(y), recv_count, recv_src_rank, recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const PeerTable& peers, const Shape& s, const int* topk_idx,
                                const float* topk_weights, void* out, int num_blocks,
                                cudaStream_t stream) {
  combine_recv_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      peers, s, topk_idx, topk_weights, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
