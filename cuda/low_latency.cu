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
using intranode::TimeoutRecord;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Call counters live in the signal block's spare words.
__device__ __forceinline__ unsigned long long* dispatch_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[0];
}
__device__ __forceinline__ unsigned long long* combine_counter(const PeerTable& p) {
  return &reinterpret_cast<Signals*>(p.base[p.rank])->pad[1];
}
__device__ __forceinline__ unsigned int* blocks_done(const PeerTable& p) {
  return reinterpret_cast<unsigned int*>(&reinterpret_cast<Signals*>(p.base[p.rank])->pad[2]);
}

__device__ __forceinline__ char* half_of(const PeerTable& p, int rank, unsigned long long call) {
  return intranode::staging_half(p.base[rank], static_cast<int>(call & 1ull), p.staging_half_bytes);
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
    if (global_timer_ns() - start > p.timeout_ns) {
      TimeoutRecord* rec = p.timeout_record;
      if (atomicCAS(&rec->code, 0, 1) == 0) {
        rec->rank = p.rank;
        rec->peer = peer;
        rec->op = op;
        rec->epoch = call;
        rec->peer_epoch = whole ? v : (v >> 32);
        rec->seconds = p.timeout_ns * 1e-9;
        __threadfence_system();
      }
      const unsigned long long noticed = global_timer_ns();
      while (global_timer_ns() - noticed < 500000000ull) {
      }
      __trap();
    }
  }
  return v;
}

// Ends a receive: the next send of this kind is the next call.
__global__ void advance_kernel(PeerTable p, int which) {
  unsigned long long* c = which == 0 ? dispatch_counter(p) : combine_counter(p);
  *reinterpret_cast<volatile unsigned long long*>(c) = *c + 1;
}

// Bits of float32 scale -> smallest power of two >= it (exact).
__device__ __forceinline__ float pow2_ceil(float s) {
  unsigned int bits = __float_as_uint(s);
  unsigned int e = (bits >> 23) & 0xffu;
  e += (bits & 0x7fffffu) != 0u;
  return __uint_as_float(e << 23);
}

// Writes one token's message body: BF16 copy, or per-128-channel FP8 cast
// (the arithmetic of jax_ep.reference.fp8). One warp; lane i owns 8 channels
// of every 256.
__device__ void write_message(const Shape& s, const __nv_bfloat16* row, char* msg) {
  const int lane = threadIdx.x % 32;
  char* values = msg + kHeaderBytes;
  if (!s.fp8()) {
    const int vecs = s.hidden / 8;
    for (int v = lane; v < vecs; v += 32) {
      reinterpret_cast<int4*>(values)[v] = reinterpret_cast<const int4*>(row)[v];
    }
    return;
  }
  char* scales = values + s.hidden;
  for (int base = 0; base < s.hidden; base += 256) {
    const int c = base + lane * 8;  // 16 lanes per 128-channel group
    float f[8];
    float amax = 0.0f;
    if (c < s.hidden) {
      const int4 raw = reinterpret_cast<const int4*>(row)[c / 8];
      const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
    }
#pragma unroll
    for (int off = 8; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullWarpMask, amax, off));
    if (c >= s.hidden) continue;
    amax = fmaxf(amax, 1e-4f);
    float scale = amax * 0.002232142857142857f;  // float32(1/448), see reference/fp8.py
    if (s.payload != Payload::kFP8) scale = pow2_ceil(scale);
    const float inv = __fdiv_rn(1.0f, scale);
    unsigned char q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[i] = __nv_cvt_float_to_fp8(__fmul_rn(f[i], inv), __NV_SATFINITE, __NV_E4M3);
    }
    *reinterpret_cast<uint2*>(values + c) = *reinterpret_cast<const uint2*>(q);
    if ((lane & 15) == 0) {
      const int g = c / 128;
      if (s.payload == Payload::kFP8UE8M0) {
        scales[g] = static_cast<char>((__float_as_uint(scale) >> 23) & 0xffu);
      } else {
        reinterpret_cast<float*>(scales)[g] = scale;
      }
    }
  }
}

// One warp per global expert: find the local tokens that chose it (first
// slot naming it, in token order), push their messages, publish the count.
__global__ void __launch_bounds__(kThreads)
    dispatch_send_kernel(PeerTable p, Shape s, const __nv_bfloat16* x, const int* topk_idx) {
  const int R = p.num_ranks, me = p.rank;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const std::size_t stride = s.message_stride();
  const Layout l = Layout::make(s, R);
  for (int e = warp; e < s.num_experts; e += num_warps) {
    const int dst = e / le, local = e % le;
    char* rows = half_of(p, dst, call) + l.dispatch_rows +
                 (static_cast<std::size_t>(local) * R + me) * s.max_tokens * stride;
    int count = 0;
    for (int base = 0; base < s.num_tokens; base += 32) {
      const int t = base + lane;
      int slot = -1;
      if (t < s.num_tokens) {
        const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
        for (int k = 0; k < s.num_topk && slot < 0; ++k) slot = ids[k] == e ? k : -1;
      }
      unsigned int todo = __ballot_sync(kFullWarpMask, slot >= 0);  // chosen tokens, in order
      while (todo) {
        const int src_lane = __ffs(todo) - 1;
        todo &= todo - 1;
        const int tok = base + src_lane;
        const int k0 = __shfl_sync(kFullWarpMask, slot, src_lane);
        char* msg = rows + static_cast<std::size_t>(count) * stride;
        if (lane == 0) *reinterpret_cast<int4*>(msg) = make_int4(tok, k0, 0, 0);
        write_message(s, x + static_cast<long long>(tok) * s.hidden, msg);
        ++count;
      }
    }
    __syncwarp();
    __threadfence_system();
    __syncwarp();
    if (lane == 0) {
      st_release_sys(&dispatch_counts(p.base[dst], static_cast<int>(call & 1))[local * R + me],
                     (call << 32) | static_cast<unsigned long long>(count));
    }
  }
}

// One block per local expert: wait for every source's count, pack in
// (source, token) order.
__global__ void __launch_bounds__(kThreads)
    dispatch_recv_kernel(PeerTable p, Shape s, char* recv_x, char* recv_scales, int* recv_count,
                         int* src_rank, int* src_token, int* src_slot) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(dispatch_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const std::size_t stride = s.message_stride();
  const int rows_out = R * s.max_tokens;
  const char* mine = half_of(p, p.rank, call);
  __shared__ int counts[intranode::kMaxRanks + 1];
  for (int e = blockIdx.x; e < le; e += gridDim.x) {
    if (threadIdx.x < R) {
      const auto* slot = dispatch_counts(p.base[p.rank], static_cast<int>(call & 1)) + e * R + threadIdx.x;
      counts[threadIdx.x] = static_cast<int>(wait_call(p, slot, call, false, threadIdx.x, 3) & 0xffffffffull);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = 0;
      for (int r = 0; r < R; ++r) {
        const int c = counts[r];
        counts[r] = total;
        total += c;
      }
      counts[R] = total;
      recv_count[e] = total;
    }
    __syncthreads();
    const int total = counts[R];
    // Routing of every output row (-1 past the count).
    for (int j = threadIdx.x; j < rows_out; j += blockDim.x) {
      int r = -1, tok = -1, k0 = -1;
      if (j < total) {
        r = 0;
        while (counts[r + 1] <= j) ++r;
        const int* hdr = reinterpret_cast<const int*>(
            mine + l.dispatch_rows + ((static_cast<std::size_t>(e) * R + r) * s.max_tokens + (j - counts[r])) * stride);
        tok = hdr[0];
        k0 = hdr[1];
      }
      const long long o = static_cast<long long>(e) * rows_out + j;
      src_rank[o] = r;
      src_token[o] = tok;
      src_slot[o] = k0;
    }
    // Payload of the valid rows: values as 16-byte vectors, scales as words
    // (UE8M0 rows hold H/128 bytes, a multiple of 4).
    const int value_vecs = s.value_bytes() / 16;
    for (long long i = threadIdx.x; i < static_cast<long long>(total) * value_vecs; i += blockDim.x) {
      const int j = static_cast<int>(i / value_vecs), v = static_cast<int>(i % value_vecs);
      int r = 0;
      while (counts[r + 1] <= j) ++r;
      const char* msg = mine + l.dispatch_rows +
                        ((static_cast<std::size_t>(e) * R + r) * s.max_tokens + (j - counts[r])) * stride;
      const long long o = static_cast<long long>(e) * rows_out + j;
      reinterpret_cast<int4*>(recv_x + o * s.value_bytes())[v] =
          ld_nc_v4(reinterpret_cast<const int4*>(msg + kHeaderBytes) + v);
    }
    if (s.fp8()) {
      const int words = s.scale_bytes() / 4;
      for (long long i = threadIdx.x; i < static_cast<long long>(total) * words; i += blockDim.x) {
        const int j = static_cast<int>(i / words), v = static_cast<int>(i % words);
        int r = 0;
        while (counts[r + 1] <= j) ++r;
        const char* msg = mine + l.dispatch_rows +
                          ((static_cast<std::size_t>(e) * R + r) * s.max_tokens + (j - counts[r])) * stride;
        const long long o = static_cast<long long>(e) * rows_out + j;
        reinterpret_cast<int*>(recv_scales + o * s.scale_bytes())[v] =
            reinterpret_cast<const int*>(msg + kHeaderBytes + s.value_bytes())[v];
      }
    }
    __syncthreads();
  }
}

// One warp per row: push y[e][j] to its token's owner, into [token][slot].
// The last block to finish publishes this rank's flag to every owner.
__global__ void __launch_bounds__(kThreads)
    combine_send_kernel(PeerTable p, Shape s, const __nv_bfloat16* y, const int* recv_count,
                        const int* src_rank, const int* src_token, const int* src_slot) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const int rows_out = R * s.max_tokens;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const int vecs = s.hidden / 8;
  for (long long w = warp; w < static_cast<long long>(le) * rows_out; w += num_warps) {
    const int e = static_cast<int>(w / rows_out), j = static_cast<int>(w % rows_out);
    if (j >= recv_count[e]) continue;
    const int owner = src_rank[w];
    char* dst = half_of(p, owner, call) + l.combine_rows +
                (static_cast<std::size_t>(src_token[w]) * s.num_topk + src_slot[w]) * s.hidden * 2;
    const int4* src = reinterpret_cast<const int4*>(y + w * s.hidden);
    for (int v = lane; v < vecs; v += 32) reinterpret_cast<int4*>(dst)[v] = src[v];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int done = atomicAdd(blocks_done(p), 1u) + 1;
    if (done == gridDim.x) {
      *blocks_done(p) = 0;
      __threadfence_system();
      for (int r = 0; r < R; ++r) {
        st_release_sys(&combine_flags(p.base[r], static_cast<int>(call & 1))[p.rank], call);
      }
    }
  }
}

// One warp per token: wait for every rank's flag, weighted sum in float32.
__global__ void __launch_bounds__(kThreads)
    combine_recv_kernel(PeerTable p, Shape s, const int* topk_idx, const float* topk_weights,
                        __nv_bfloat16* out) {
  const int R = p.num_ranks;
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const char* mine = half_of(p, p.rank, call);
  if (threadIdx.x < R) {
    wait_call(p, combine_flags(p.base[p.rank], static_cast<int>(call & 1)) + threadIdx.x, call, true,
              threadIdx.x, 4);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const int vecs = s.hidden / 8;
  for (int t = warp; t < s.num_tokens; t += num_warps) {
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    for (int v = lane; v < vecs; v += 32) {
      float acc[8] = {};
      for (int k = 0; k < s.num_topk; ++k) {
        const int id = ids[k];
        if (id < 0 || id >= s.num_experts) continue;
        int k0 = 0;
        while (ids[k0] != id) ++k0;
        const float w = topk_weights[static_cast<long long>(t) * s.num_topk + k];
        const int4 raw = ld_nc_v4(reinterpret_cast<const int4*>(
            mine + l.combine_rows + (static_cast<std::size_t>(t) * s.num_topk + k0) * s.hidden * 2) + v);
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = __bfloat1622float2(h[i]);
          acc[2 * i] = fmaf(w, f.x, acc[2 * i]);
          acc[2 * i + 1] = fmaf(w, f.y, acc[2 * i + 1]);
        }
      }
      int4 packed;
      auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
      reinterpret_cast<int4*>(out + static_cast<long long>(t) * s.hidden)[v] = packed;
    }
  }
}

int blocks_for(int num_blocks) { return std::max(1, num_blocks); }

}  // namespace

std::size_t buffer_bytes(const Shape& s, int num_ranks) {
  return intranode::kSignalBytes + intranode::kWorkspaceBytes + 2 * Layout::make(s, num_ranks).half_bytes +
         intranode::kAlign;
}

cudaError_t launch_dispatch_send(const PeerTable& peers, const Shape& s, const void* x,
                                 const int* topk_idx, int num_blocks, cudaStream_t stream) {
  dispatch_send_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(x), topk_idx);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_recv(const PeerTable& peers, const Shape& s, void* recv_x,
                                 void* recv_scales, int* recv_count, int* recv_src_rank,
                                 int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream) {
  const int le = s.local_experts(peers.num_ranks);
  dispatch_recv_kernel<<<std::max(1, std::min(le, num_blocks)), kThreads, 0, stream>>>(
      peers, s, static_cast<char*>(recv_x), static_cast<char*>(recv_scales), recv_count, recv_src_rank,
      recv_src_token, recv_src_slot);
  advance_kernel<<<1, 1, 0, stream>>>(peers, 0);
  return cudaGetLastError();
}

cudaError_t launch_combine_send(const PeerTable& peers, const Shape& s, const void* y,
                                const int* recv_count, const int* recv_src_rank,
                                const int* recv_src_token, const int* recv_src_slot,
                                int num_blocks, cudaStream_t stream) {
  combine_send_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(y), recv_count, recv_src_rank, recv_src_token, recv_src_slot);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const PeerTable& peers, const Shape& s, const int* topk_idx,
                                const float* topk_weights, void* out, int num_blocks,
                                cudaStream_t stream) {
  combine_recv_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      peers, s, topk_idx, topk_weights, static_cast<__nv_bfloat16*>(out));
  advance_kernel<<<1, 1, 0, stream>>>(peers, 1);
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
