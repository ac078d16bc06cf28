// Low-latency send/receive kernels. See low_latency.cuh for the protocol.
#include "low_latency.cuh"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fp8.cuh"
#include "serial.cuh"
#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

using intranode::Signals;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Call counters live in the signal block's spare words.
constexpr int kDispatchCounterPad = 0, kCombineCounterPad = 1;
__device__ __forceinline__ unsigned long long* dispatch_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[kDispatchCounterPad];
}
__device__ __forceinline__ unsigned long long* combine_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[kCombineCounterPad];
}
// Finished-block counters, one per kernel kind (0 dispatch send, 1 combine
// send, 2 dispatch receive, 3 combine receive): a send on the send stream may
// run beside a call of the other kind on XLA's stream.
__device__ __forceinline__ unsigned int* blocks_done(const PeerTable& p, int which) {
  return reinterpret_cast<unsigned int*>(&reinterpret_cast<Signals*>(p.base[p.rank])->pad[2 + which]);
}

// The last call whose send this rank issued, per kind (0 dispatch, 1 combine):
// a send finding its own call number there follows an unreceived send; a
// receive finding another one has no send.
constexpr std::size_t kSentMarkOffset = intranode::kSignalBytes + 60 * 1024;
__device__ __forceinline__ unsigned long long* sent_mark(const PeerTable& p, int which) {
  return reinterpret_cast<unsigned long long*>(p.base[p.rank] + kSentMarkOffset) + which;
}

// Called by one thread at the start of a send (`is_send`) or a receive;
// false (recorded, abort raised) when the calls are out of order.
__device__ __forceinline__ bool check_order(const PeerTable& p, int which, unsigned long long call, bool is_send) {
  unsigned long long* mark = sent_mark(p, which);
  const unsigned long long last = ld_volatile(mark);
  if (is_send ? last == call : last != call) {
    intranode::fail(p, intranode::kFailOrder, is_send ? 0 : 1, 3 + which, call, last);
    return false;
  }
  if (is_send) *mark = call;
  return true;
}

// Signature kind of low-latency dispatch (0) or combine (1) calls.
__device__ __forceinline__ int sig_kind(int which) { return 1 + which; }

// Block 0 of a send, at its start: this rank's signature of the call to
// every peer (its fields in its own header), ordered before the flags the
// last block raises by the same fences as the messages.
__device__ __forceinline__ void publish_call(const PeerTable& p, int which, unsigned long long call) {
  if (blockIdx.x == 0 && threadIdx.x < p.num_ranks) {
    intranode::publish_signature(p, sig_kind(which), call, threadIdx.x, threadIdx.x == 0);
  }
}

using intranode::skipped;  // ranks this call neither writes to nor waits for

__device__ __forceinline__ char* half_of(const PeerTable& p, int rank, unsigned long long call) {
  return intranode::staging_half(p.base[rank], static_cast<int>(call & 1ull), p.staging_half_bytes);
}

// Entry of a send kernel (every thread): false when the buffer is dead or
// (block 0) this send is out of order; the block then returns as a whole.
// Other blocks of an out-of-order send may already be writing.
__device__ __forceinline__ bool start_send(const PeerTable& p, int which, unsigned long long call, int* token) {
  __shared__ int stop;
  if (threadIdx.x == 0) {
    stop = intranode::aborted(p) || (blockIdx.x == 0 && !check_order(p, which, call, true));
    if (!stop && blockIdx.x == 0 && token != nullptr) *token = 0;
  }
  __syncthreads();
  if (stop) return false;
  publish_call(p, which, call);
  return true;
}

// Spin until *slot holds a word of call `call` (serial.cuh: a slot holds
// this call's word or an older one), leaving the word in *value; false when
// the wait failed (a timeout or a peer's abort: recorded, abort raised).
__device__ bool wait_call(const PeerTable& p, const unsigned long long* slot, unsigned long long call, int peer,
                          int op, unsigned long long* value) {
  unsigned long long v = 0;
  auto ready = [&] {
    v = ld_acquire_sys(slot);
    return word_in_call(v, call);
  };
  const WaitOutcome w = wait_until(ready, &reinterpret_cast<const Signals*>(p.base[p.rank])->abort, p.timeout_ns);
  *value = v;
  return !intranode::wait_failed(p, w, peer, op, call, call_near(word_serial(v), call));
}

// True in every thread of the block that finished last; that block resets
// the counter. kPublish: fence this block's writes at system scope first (a
// send whose last block then publishes them to peers).
template <bool kPublish>
__device__ __forceinline__ bool last_block_done(const PeerTable& p, int which) {
  __shared__ bool last;
  if (kPublish) __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(blocks_done(p, which), 1u) + 1 == gridDim.x;
    if (last) *blocks_done(p, which) = 0;
  }
  __syncthreads();
  return last;
}

// Ends a receive (its last block): the next send of this kind is the next
// call. True in every thread of that last block.
__device__ __forceinline__ bool advance(const PeerTable& p, int which) {
  unsigned long long* c = which == 0 ? dispatch_counter(p) : combine_counter(p);
  const bool last = last_block_done<false>(p, 2 + which);
  if (last && threadIdx.x == 0) *reinterpret_cast<volatile unsigned long long*>(c) = *c + 1;
  return last;
}

// The FP8 cast of one 128-channel group of a BF16 row (jax_ep.reference.fp8's
// arithmetic), a warp per group and 4 channels per lane: returns this lane's
// 4 FP8 bytes and, in every lane, the group's scale.
__device__ __forceinline__ unsigned int cast_group_fp8(uint2 raw, bool pow2_scale, float* scale_out) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  float amax = fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(b.x), fabsf(b.y)));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, off));
  const float scale = fp8_group_scale(amax, pow2_scale);
  const float inv = __fdiv_rn(1.0f, scale);
  unsigned char q[4];
  q[0] = __nv_cvt_float_to_fp8(__fmul_rn(a.x, inv), __NV_SATFINITE, __NV_E4M3);
  q[1] = __nv_cvt_float_to_fp8(__fmul_rn(a.y, inv), __NV_SATFINITE, __NV_E4M3);
  q[2] = __nv_cvt_float_to_fp8(__fmul_rn(b.x, inv), __NV_SATFINITE, __NV_E4M3);
  q[3] = __nv_cvt_float_to_fp8(__fmul_rn(b.y, inv), __NV_SATFINITE, __NV_E4M3);
  *scale_out = scale;
  return *reinterpret_cast<const unsigned int*>(q);
}

// Writes the scale of 128-channel group g: a float, or its UE8M0 exponent byte.
__device__ __forceinline__ void write_group_scale(const Shape& s, char* scales, int g, float scale) {
  if (s.payload == Payload::kFP8UE8M0) scales[g] = static_cast<char>((__float_as_uint(scale) >> 23) & 0xffu);
  else reinterpret_cast<float*>(scales)[g] = scale;
}

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
          cast_group_fp8(raw[u], s.payload != Payload::kFP8, &scale);
      if (lane == 0) write_group_scale(s, scales, g, scale);
    }
  }
}

// The messages of this block's tokens blockIdx.x + i * gridDim.x (i <
// my_tokens) into `stage` (message t at t * stride), with many loads in
// flight: a block stages a few tokens, so per-token rounds of loads would
// leave it waiting on memory once per token. FP8: a half-warp per
// 128-channel group, 8 channels (16 bytes) per lane, kInFlight pairs of
// groups per warp per round (jax_ep.reference.fp8's arithmetic, as
// cast_group_fp8). BF16: a copy, kInFlight vectors per thread per round.
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
      const unsigned int words[4] = {static_cast<unsigned int>(raw[u].x), static_cast<unsigned int>(raw[u].y),
                                     static_cast<unsigned int>(raw[u].z), static_cast<unsigned int>(raw[u].w)};
      float2 f[4];
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // two BF16 channels per word, the first in the low half (exact)
        f[i] = valid ? make_float2(__uint_as_float(words[i] << 16), __uint_as_float(words[i] & 0xffff0000u))
                     : make_float2(0.0f, 0.0f);
        amax = fmaxf(amax, fmaxf(fabsf(f[i].x), fabsf(f[i].y)));
      }
#pragma unroll
      for (int off = 8; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, off));
      if (!valid) continue;
      const float scale = fp8_group_scale(amax, pow2_scale);
      const float inv = __fdiv_rn(1.0f, scale);
      unsigned int q[2] = {0, 0};  // 8 FP8 bytes, channel order
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const unsigned int lo = __nv_cvt_float_to_fp8(__fmul_rn(f[i].x, inv), __NV_SATFINITE, __NV_E4M3);
        const unsigned int hi = __nv_cvt_float_to_fp8(__fmul_rn(f[i].y, inv), __NV_SATFINITE, __NV_E4M3);
        q[i / 2] |= (lo | hi << 8) << (16 * (i % 2));
      }
      char* values = stage + token_of(g / groups) * stride + kHeaderBytes;
      const int gg = g % groups;
      *reinterpret_cast<uint2*>(values + gg * 128 + hl * 8) = make_uint2(q[0], q[1]);
      if (hl == 0) write_group_scale(s, values + s.hidden, gg, scale);
    }
  }
}

// A warp copies n 16-byte vectors of memory that does not change while the
// kernel runs, kUnroll loads in flight per lane (a row copy is latency-bound).
// kStream: streaming stores, for output rows (kept out of L2's way).
template <bool kStream = false>
__device__ __forceinline__ void warp_copy(const int4* from, int4* to, int n, int lane) {
  constexpr int kUnroll = 8;
  for (int v0 = lane; v0 < n; v0 += 32 * kUnroll) {
    int4 value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + 32 * u < n) value[u] = ld_nc_v4(from + v0 + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + 32 * u >= n) continue;
      if constexpr (kStream) st_cs_v4(to + v0 + 32 * u, value[u]);
      else to[v0 + 32 * u] = value[u];
    }
  }
}

// A warp copies a message's values (and, FP8, the scales after them) into
// packed row o of recv_x (and recv_scales).
__device__ __forceinline__ void copy_message(const Shape& s, const char* values, char* recv_x, char* recv_scales,
                                             long long o, int lane) {
  warp_copy<true>(reinterpret_cast<const int4*>(values), reinterpret_cast<int4*>(recv_x + o * s.value_bytes()),
                  s.value_bytes() / 16, lane);
  const int words = s.fp8() ? s.scale_bytes() / 4 : 0;
  for (int w = lane; w < words; w += 32) {
    reinterpret_cast<int*>(recv_scales + o * s.scale_bytes())[w] = reinterpret_cast<const int*>(values + s.value_bytes())[w];
  }
}

// The grid writes -1 as the routing of every padding row (past each
// expert's count, start[e * (R + 1) + R]); the valid rows' warps write theirs.
__device__ __forceinline__ void mark_padding_rows(const int* start, int le, int R, int rows_out, int* src_rank,
                                                  int* src_token, int* src_slot) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
       i < static_cast<long long>(le) * rows_out; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int e = static_cast<int>(i / rows_out), j = static_cast<int>(i % rows_out);
    if (j < start[e * (R + 1) + R]) continue;
    src_rank[i] = -1;
    src_token[i] = -1;
    src_slot[i] = -1;
  }
}

// The largest i < n with a[i] <= x (a ascending, a[0] <= x).
__device__ __forceinline__ int last_at_or_below(const int* a, int n, int x) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (a[mid] <= x) lo = mid;
    else hi = mid;
  }
  return lo;
}

// On entry first[e + 1] holds local expert e's row count; afterwards first[e]
// is the rows of the experts before e (first[le]: all of them). Warp 0
// scans, a chunk of experts per lane. Ends at a barrier.
__device__ __forceinline__ void scan_expert_counts(int* first, int le) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x, chunk = (le + 31) / 32, lo = min(le, lane * chunk), hi = min(le, lo + chunk);
    int mine = 0;
    for (int e = lo; e < hi; ++e) mine += first[e + 1];
    int before = mine;  // inclusive scan across the lanes
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int v = __shfl_up_sync(kFullWarpMask, before, off);
      if (lane >= off) before += v;
    }
    before -= mine;
    for (int e = lo; e < hi; ++e) {
      before += first[e + 1];
      first[e + 1] = before;
    }
    if (lane == 0) first[0] = 0;
  }
  __syncthreads();
}

// The packed layout of a dispatch receive, in shared memory. On entry
// start[e * (R + 1) + r + 1] holds how many rows source r has for local
// expert e. Afterwards start[e * (R + 1) + r] is the first of them among e's
// rows (start[e * (R + 1) + R]: e's count, which block 0 writes to
// recv_count), and first[e] the rows of the experts before e (first[le]: all
// valid rows). Ends at a barrier.
__device__ __forceinline__ void lay_out_rows(int* start, int* first, int le, int R, int* recv_count) {
  for (int e = threadIdx.x; e < le; e += blockDim.x) {
    int* st = start + e * (R + 1);
    st[0] = 0;
    for (int r = 1; r <= R; ++r) st[r] += st[r - 1];
    first[e + 1] = st[R];
    if (blockIdx.x == 0) recv_count[e] = st[R];
  }
  __syncthreads();
  scan_expert_counts(first, le);
}

// Packed row `flat` of lay_out_rows' layout: its local expert e, source r
// (the last whose rows start at or before it: sources with none are skipped)
// and row q among e's rows.
__device__ __forceinline__ void locate_row(const int* start, const int* first, int le, int R, int flat, int* e,
                                           int* r, int* q) {
  *e = last_at_or_below(first, le, flat);
  *q = flat - first[*e];
  *r = last_at_or_below(start + *e * (R + 1), R, *q);
}

// How many of a source's tokens before t name expert e (ids: that source's
// [tokens][K] top-k ids, global or shared memory), counted by a warp, 32
// tokens per step: the index of token t among the source's tokens for e.
// kVectors (for ids in shared memory): with K % 4 == 0 and aligned ids, each
// lane reads its token's ids as 16-byte vectors, a quarter of the bank
// conflicts of reading them one by one.
template <bool kVectors = false>
__device__ __forceinline__ int earlier_tokens_naming(const int* ids, int t, int K, int e, int lane) {
  const bool vectors = kVectors && K % 4 == 0 && reinterpret_cast<std::uintptr_t>(ids) % 16 == 0;
  int idx = 0;
  for (int base = 0; base < t; base += 32) {
    bool names = false;
    if (base + lane < t) {
      const int* other = ids + static_cast<long long>(base + lane) * K;
      if (vectors) {
        for (int j = 0; j < K / 4; ++j) {
          const int4 v = reinterpret_cast<const int4*>(other)[j];
          names |= (v.x == e) | (v.y == e) | (v.z == e) | (v.w == e);
        }
      } else {
        for (int j = 0; j < K; ++j) names |= other[j] == e;
      }
    }
    idx += __popc(__ballot_sync(kFullWarpMask, names));
  }
  return idx;
}

// Whether top-k slot k of a token sends: a valid id its earlier slots do not repeat.
__device__ __forceinline__ bool first_slot(const int* ids, int k, int num_experts) {
  const int id = ids[k];
  bool first = id >= 0 && id < num_experts;
  for (int j = 0; j < k; ++j) first &= ids[j] != id;
  return first;
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
  return reinterpret_cast<int*>(p.base[p.rank] + intranode::kSignalBytes + 40 * 1024);
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

// ---- Pulled dispatch --------------------------------------------------------

// Rank r's staged call in every peer's workspace: serial_word(call, its token count).
__device__ __forceinline__ unsigned long long* pull_flags(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + 34 * 1024) +
         half * intranode::kMaxRanks;
}

// Rank r's routing of the staged call, read by the receivers:
// pull_counts(r, half)[e] = serial_word(call, how many of r's tokens name
// expert e) (their first slot naming it). Only r writes them, raising them
// with raise_in_call, so a word of another call is always of an earlier one.
__device__ __forceinline__ unsigned long long* pull_counts(char* base, int half) {
  return reinterpret_cast<unsigned long long*>(base + intranode::kSignalBytes + 64 * 1024) + half * kCountSlots;
}

// Raise *word to serial_word(call, value) unless it holds this call's word
// with at least that value. (An atomicMax of the packed words would keep an
// older call's word once the serial wrapped.)
__device__ __forceinline__ void raise_in_call(unsigned long long* word, unsigned long long call, unsigned int value) {
  const unsigned long long want = serial_word(call, value);
  unsigned long long cur = ld_volatile(word);
  while (!word_reached(cur, call, value)) {
    const unsigned long long seen = atomicCAS(word, cur, want);
    if (seen == cur) break;
    cur = seen;
  }
}

// Stage: every block reads this rank's top-k ids into shared memory and
// routes its own tokens (blockIdx.x, + gridDim.x, ...), a warp per (token,
// slot) naming an expert first: the token's index among this rank's tokens
// naming that expert places token * K + slot in the routing table
// (stage_rows, [E][M]) and raises the expert's count. Then the block writes
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
    if (lane == 0) {
      rows[static_cast<long long>(e) * M + idx] = t * K + k;
      raise_in_call(&counts[e], call, static_cast<unsigned int>(idx + 1));
    }
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

// first[e] = the valid rows of the local experts before e (first[le]: all
// of them), in shared memory. Expert e's valid rows are [0, count): the rows
// before its first -1 source.
__device__ __forceinline__ void count_valid_rows(const int* src_rank, int le, int rows_out, int* first) {
  for (int e = threadIdx.x; e < le; e += blockDim.x) {
    const int* ranks = src_rank + static_cast<long long>(e) * rows_out;
    int lo = 0, hi = rows_out;  // count = the first row whose source is -1
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (ranks[mid] >= 0) lo = mid + 1;
      else hi = mid;
    }
    first[e + 1] = lo;
  }
  __syncthreads();
  scan_expert_counts(first, le);
}

// Whether valid row `row` of a combine's routing names a (rank, token, slot)
// a dispatch of these shapes can produce; records a bad handle otherwise (a
// stale or foreign handle), whose row the caller skips: it would address
// another rank's half past its end, or another half.
__device__ __forceinline__ bool routing_in_range(const PeerTable& p, const Shape& s, const int* src_rank,
                                                 const int* src_token, const int* src_slot, long long row) {
  // A valid row (before its expert's first -1) may still name a negative
  // rank in a foreign handle: base[r] would then be read outside the table.
  const int r = src_rank[row], t = src_token[row], k = src_slot[row];
  if (r >= 0 && r < p.num_ranks && t >= 0 && t < s.max_tokens && k >= 0 && k < s.num_topk) return true;
  intranode::record_bad_handle(p, 4, row, r < 0 || r >= p.num_ranks ? r : (t < 0 || t >= s.max_tokens ? t : k));
  return false;
}

// The row of y [E/R, R*M, H] that is valid row `flat` (count_valid_rows' order).
__device__ __forceinline__ long long valid_row(const int* first, int le, int rows_out, int flat) {
  const int e = last_at_or_below(first, le, flat);
  return static_cast<long long>(e) * rows_out + (flat - first[e]);
}

// Flags every rank (its combine_flags[half][this rank]) once the whole grid
// is done, `mode` in the low bits: 0 rows pushed, 1 rows published.
__device__ __forceinline__ void flag_combine_peers(const PeerTable& p, unsigned long long call, unsigned long long mode) {
  if (last_block_done<true>(p, 1) && threadIdx.x < p.num_ranks && !skipped(p, threadIdx.x)) {
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(
        &combine_flags(p.base[threadIdx.x], static_cast<int>(call & 1))[p.rank]) = serial_word(call, mode);
  }
}

// Push each valid row of y to its token's owner, into [token][slot], several
// 16-byte loads in flight per thread; the last block publishes the flags.
__global__ void __launch_bounds__(kThreads)
    combine_send_kernel(PeerTable p, Shape s, const __nv_bfloat16* y, const int* src_rank,
                        const int* src_token, const int* src_slot, int* token) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const int rows_out = R * s.max_tokens;
  const int vecs = s.hidden / 8;
  if (!start_send(p, 1, call, token)) return;
  __shared__ int first[kCountSlots + 1];
  count_valid_rows(src_rank, le, rows_out, first);
  // One warp per valid row: find it once, then push its vectors.
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int flat = warp; flat < first[le]; flat += num_warps) {
    const long long row = valid_row(first, le, rows_out, flat);
    if (!routing_in_range(p, s, src_rank, src_token, src_slot, row)) continue;  // uniform across the warp
    if (skipped(p, src_rank[row])) continue;  // uniform across the warp
    char* dst = half_of(p, src_rank[row], call) + l.combine_rows +
                (static_cast<std::size_t>(src_token[row]) * s.num_topk + src_slot[row]) * s.combine_row_bytes();
    if (s.combine_fp8) {
      // FP8 values then one float scale per 128 channels: a half-warp per
      // group, 8 channels per lane (one 16-byte load), two groups per step and
      // `kSteps` steps' loads in flight.
      const __nv_bfloat16* from = y + row * s.hidden;
      const int groups = s.hidden / 128, half = lane / 16, sub = lane % 16;
      constexpr int kSteps = 4;
      for (int g0 = 0; g0 < groups; g0 += 2 * kSteps) {
        int4 raw[kSteps];
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          const int g = g0 + 2 * u + half;
          if (g < groups) raw[u] = *reinterpret_cast<const int4*>(from + g * 128 + sub * 8);
        }
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          if (g0 + 2 * u >= groups) break;  // uniform across the warp (groups is even)
          const int g = g0 + 2 * u + half;
          const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw[u]);
          float2 f[4];
          float amax = 0.0f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            f[q] = __bfloat1622float2(h[q]);
            amax = fmaxf(amax, fmaxf(fabsf(f[q].x), fabsf(f[q].y)));
          }
#pragma unroll
          for (int off = 8; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, off));
          const float scale = fp8_group_scale(amax, false);
          const float inv = __fdiv_rn(1.0f, scale);
          __nv_fp8x2_storage_t q2[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            q2[q] = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(f[q].x, inv), __fmul_rn(f[q].y, inv)),
                                             __NV_SATFINITE, __NV_E4M3);
          }
          *reinterpret_cast<uint2*>(dst + g * 128 + sub * 8) =
              make_uint2(q2[0] | (static_cast<unsigned int>(q2[1]) << 16),
                         q2[2] | (static_cast<unsigned int>(q2[3]) << 16));
          if (sub == 0) reinterpret_cast<float*>(dst + s.hidden)[g] = scale;
        }
      }
      continue;
    }
    warp_copy(reinterpret_cast<const int4*>(y + row * s.hidden), reinterpret_cast<int4*>(dst), vecs, lane);
  }
  flag_combine_peers(p, call, 0);
}

// The only waiting part of a combine receive, one block. With y_offset >= 0
// (the zero-copy combine) it first publishes this rank's rows: for each valid
// row of y, its offset in this rank's XLA memory goes to
// combine_index[source][token][slot] of this rank's buffer, where the token's
// owner looks it up, and every rank is flagged. Then it waits for every
// rank's flag, and, given topk_idx, resolves the row each (token, slot) sums
// into combine_ptrs (null on a masked slot): in this rank's buffer where the
// expert's rank pushed it, or in that rank's XLA memory where it published it.
__global__ void __launch_bounds__(1024)
    wait_flags_kernel(PeerTable p, Shape s, const int* topk_idx, XlaMemory xla, long long y_offset,
                      const int* src_rank, const int* src_token, const int* src_slot) {
  const int R = p.num_ranks, le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const int half = static_cast<int>(call & 1);
  const Layout l = Layout::make(s, R);
  __shared__ bool published[intranode::kMaxRanks];
  __shared__ int failed;  // a thread's check or wait failed (read after the block's barriers)
  if (threadIdx.x == 0) failed = 0;
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead (its barrier orders `failed`)
  if (y_offset >= 0) {
    if (threadIdx.x == 0 && !check_order(p, 1, call, true)) failed = 1;
    if (threadIdx.x < R) intranode::publish_signature(p, sig_kind(1), call, threadIdx.x, threadIdx.x == 0);
    const int rows_out = R * s.max_tokens;
    __shared__ int first[kCountSlots + 1];
    count_valid_rows(src_rank, le, rows_out, first);
    auto* index = reinterpret_cast<long long*>(half_of(p, p.rank, call) + l.combine_index);
    const long long row_bytes = static_cast<long long>(s.hidden) * 2;
    for (int flat = threadIdx.x; flat < first[le]; flat += blockDim.x) {
      const long long row = valid_row(first, le, rows_out, flat);
      if (!routing_in_range(p, s, src_rank, src_token, src_slot, row)) continue;
      index[(static_cast<long long>(src_rank[row]) * s.max_tokens + src_token[row]) * s.num_topk + src_slot[row]] =
          y_offset + row * row_bytes;
    }
    __syncthreads();
    if (threadIdx.x < R && !failed && !skipped(p, threadIdx.x)) {
      // The block's barrier, then a system fence in the flagging thread: every
      // thread's index entries (and the signature) go before the flag.
      __threadfence_system();
      *reinterpret_cast<volatile unsigned long long*>(&combine_flags(p.base[threadIdx.x], half)[p.rank]) =
          serial_word(call, 1);
    }
  }
  if (threadIdx.x == 0 && !check_order(p, 1, call, false)) failed = 1;
  if (threadIdx.x < R) {
    unsigned long long v = 0;
    if (!skipped(p, threadIdx.x) &&
        (!wait_call(p, combine_flags(p.base[p.rank], half) + threadIdx.x, call, threadIdx.x, 4, &v) ||
         !intranode::signature_agrees(p, sig_kind(1), call, threadIdx.x, 4))) {
      failed = 1;
    }
    published[threadIdx.x] = (v & 1ull) != 0;
  }
  __syncthreads();
  if (topk_idx == nullptr || failed) return;
  char* mine = half_of(p, p.rank, call);
  auto** rows = reinterpret_cast<const char**>(mine + l.combine_ptrs);
  for (int i = threadIdx.x; i < s.num_tokens * s.num_topk; i += blockDim.x) {
    const int t = i / s.num_topk, k = i % s.num_topk;
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    const int id = ids[k];
    const char* row = nullptr;
    if (id >= 0 && id < s.num_experts && !skipped(p, id / le)) {
      int k0 = 0;
      while (ids[k0] != id) ++k0;
      const int owner = id / le;
      const long long slot = static_cast<long long>(t) * s.num_topk + k0;
      if (published[owner]) {
        const auto* index = reinterpret_cast<const unsigned long long*>(half_of(p, owner, call) + l.combine_index);
        row = xla.base[owner] + ld_volatile(index + static_cast<long long>(p.rank) * s.max_tokens * s.num_topk + slot);
      } else {
        row = mine + l.combine_rows + slot * s.combine_row_bytes();
      }
    }
    rows[i] = row;
  }
}

// out[t] = sum_k w[t, k] * row(t, first slot naming k's expert), float32;
// a thread per 8 channels of a token, all top-k loads in flight. The rows
// are BF16 (16 bytes per thread), or with kFp8 FP8 (8 bytes) and the group's
// scale, folded into the weight.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    combine_recv_kernel(PeerTable p, Shape s, const float* topk_weights, __nv_bfloat16* out, bool wait_readers) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  using Raw = std::conditional_t<kFp8, uint2, int4>;
  const int R = p.num_ranks;
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const auto* const* rows = reinterpret_cast<const char* const*>(half_of(p, p.rank, call) + l.combine_ptrs);
  const int vecs = s.hidden / 8;
  const long long n = static_cast<long long>(s.num_tokens) * vecs;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
    Raw raw[intranode::kMaxTopk];
    float w[intranode::kMaxTopk];
#pragma unroll
    for (int k = 0; k < intranode::kMaxTopk; ++k) {
      w[k] = 0.0f;
      raw[k] = Raw{};
      if (k < s.num_topk) {
        const char* row = rows[static_cast<long long>(t) * s.num_topk + k];
        if (row != nullptr) {
          w[k] = topk_weights[static_cast<long long>(t) * s.num_topk + k];
          if constexpr (kFp8) {
            w[k] *= reinterpret_cast<const float*>(row + s.hidden)[v * 8 / 128];
            raw[k] = *reinterpret_cast<const uint2*>(row + v * 8);
          } else {
            raw[k] = ld_nc_v4(reinterpret_cast<const int4*>(row) + v);
          }
        }
      }
    }
    float acc[8] = {};
#pragma unroll
    for (int k = 0; k < intranode::kMaxTopk; ++k) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float2 f;
        if constexpr (kFp8) {
          const auto pair = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw[k])[q];
          f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        } else {
          f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(&raw[k])[q]);
        }
        acc[2 * q] = fmaf(w[k], f.x, acc[2 * q]);
        acc[2 * q + 1] = fmaf(w[k], f.y, acc[2 * q + 1]);
      }
    }
    int4 packed;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
    reinterpret_cast<int4*>(out + static_cast<long long>(t) * s.hidden)[v] = packed;
  }
  // The last block tells every rank this one is done reading its rows and
  // ends the call; with `wait_readers` (this rank published its rows in y)
  // it then waits until every rank is done reading them, since XLA may reuse
  // y's memory once the call ends.
  if (advance(p, 1) && threadIdx.x < R && !skipped(p, threadIdx.x)) {
    const int half = static_cast<int>(call & 1);
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(&combine_done(p.base[threadIdx.x], half)[p.rank]) =
        serial_word(call, 0);
    unsigned long long v;
    if (wait_readers) wait_call(p, combine_done(p.base[p.rank], half) + threadIdx.x, call, threadIdx.x, 8, &v);
  }
}

// out[t, k] = row(t, first slot naming k's expert), or zeros on a masked
// slot: the rows a combine would sum, unsummed (the backward of combine and
// of dispatch). A warp per (token, slot).
__global__ void __launch_bounds__(kThreads)
    combine_gather_kernel(PeerTable p, Shape s, const int* topk_idx, __nv_bfloat16* out) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  const int R = p.num_ranks;
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const char* mine = half_of(p, p.rank, call);
  const int vecs = s.hidden / 8;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int i = warp; i < s.num_tokens * s.num_topk; i += num_warps) {
    const int t = i / s.num_topk, k = i % s.num_topk;
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    const int id = ids[k];
    int4* to = reinterpret_cast<int4*>(out + static_cast<long long>(i) * s.hidden);
    if (id < 0 || id >= s.num_experts || skipped(p, id / s.local_experts(R))) {
      for (int v = lane; v < vecs; v += 32) to[v] = make_int4(0, 0, 0, 0);
      continue;
    }
    int k0 = 0;
    while (ids[k0] != id) ++k0;
    const int4* from = reinterpret_cast<const int4*>(
        mine + l.combine_rows + (static_cast<std::size_t>(t) * s.num_topk + k0) * s.hidden * 2);
    for (int v = lane; v < vecs; v += 32) to[v] = ld_nc_v4(from + v);
  }
  advance(p, 1);
}

// Kernels that never wait may take more blocks than the budget of waiting ones.
int copy_blocks_for(int num_blocks, long long items) {
  return static_cast<int>(std::max<long long>(1, std::min<long long>(4ll * num_blocks, items)));
}

}  // namespace

std::vector<unsigned long long> fresh_header(unsigned long long start) {
  std::vector<unsigned long long> words((intranode::kSignalBytes + intranode::kWorkspaceBytes) / 8, 0);
  auto* signals = reinterpret_cast<Signals*>(words.data());
  signals->epoch = start;
  for (auto& a : signals->arrived) a = start;
  signals->pad[kDispatchCounterPad] = start;
  signals->pad[kCombineCounterPad] = start;
  // Every protocol word of the workspace reads as the call before the first.
  for (std::size_t i = intranode::kSignalBytes / 8; i < words.size(); ++i) words[i] = serial_word(start, 0);
  words[kSentMarkOffset / 8] = words[kSentMarkOffset / 8 + 1] = start;
  return words;
}

std::size_t buffer_bytes(const Shape& s, int num_ranks) {
  return intranode::kSignalBytes + intranode::kWorkspaceBytes + 2 * Layout::make(s, num_ranks).half_bytes +
         intranode::kAlign;
}

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

cudaError_t launch_combine_send(const PeerTable& peers, const Shape& s, const void* y,
                                const int* recv_src_rank, const int* recv_src_token, const int* recv_src_slot,
                                int* token, int num_blocks, cudaStream_t stream) {
  combine_send_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(y), recv_src_rank, recv_src_token, recv_src_slot, token);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const PeerTable& peers, const Shape& s, const XlaMemory& xla,
                                const int* topk_idx, const float* topk_weights, void* out,
                                const ZeroCopy& zero_copy, int num_blocks, cudaStream_t stream) {
  wait_flags_kernel<<<1, 1024, 0, stream>>>(peers, s, topk_idx, xla, zero_copy.y_offset, zero_copy.src_rank,
                                            zero_copy.src_token, zero_copy.src_slot);
  auto* kernel = s.combine_fp8 ? combine_recv_kernel<true> : combine_recv_kernel<false>;
  kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, topk_weights, static_cast<__nv_bfloat16*>(out), zero_copy.y_offset >= 0);
  return cudaGetLastError();
}

cudaError_t launch_combine_gather(const PeerTable& peers, const Shape& s, const int* topk_idx, void* out,
                                  int num_blocks, cudaStream_t stream) {
  wait_flags_kernel<<<1, 64, 0, stream>>>(peers, s, nullptr, XlaMemory{}, -1, nullptr, nullptr, nullptr);
  combine_gather_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, topk_idx, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
