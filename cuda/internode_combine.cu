// Internode combine: the dispatch's rings run backwards (docs/internode.md,
// "Rings and flow control (combine)"), three blocks per channel:
//
//   NVLink senders  each rank sends, per forwarder f of its node, one row per
//                   row of f's table it holds (its rows of the token summed in
//                   float32, rounded to y's dtype), in table order, through
//                   the NVLink ring (c, this rank) in f's memory;
//   reducer         each forwarder walks its table rows in order (batches of
//                   warps), sums the node's rows of each token in float32
//                   (ascending local rank), rounds to y's dtype into the RDMA
//                   send ring to the token's source node; warp 0 puts whole
//                   chunks (ring::rdma_coordinator);
//   RDMA receivers  each source sums, per token, one partial per node
//                   (ascending node) in float32 and rounds once; warp 0
//                   returns the credits of whole consumed chunks, in order.
//
// A token with one row (rank-major, one rank of one node) comes back
// bitwise; sums round once per node and once at the source.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "internode_ring.cuh"

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


inline constexpr int kReducerBarrier = 1;  // named barrier of the reducer's row warps (warp 0 coordinates)

__device__ __forceinline__ void reducer_sync(int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(kReducerBarrier), "r"(threads) : "memory");
}

// This rank's output rows of forwarder f's table row i, ascending (out_pos
// holds them in any order): count of them.
__device__ __forceinline__ int my_rows(const int* out_pos, int S, std::size_t at, int* rows) {
  int n = 0;
  for (int k = 0; k < S; ++k) {
    const int o = out_pos[at * S + k];
    if (o < 0) continue;
    int j = n++;
    for (; j > 0 && rows[j - 1] > o; --j) rows[j] = rows[j - 1];
    rows[j] = o;
  }
  return n;
}

// NVLink senders (rank j): warp f sends to forwarder f of the node the rows
// of f's table in channel c that j holds, in table order: slot p % nvl_ring
// of the ring (c, j) in f, once the reducer's head allows; the tail (in f)
// is published every nvl_chunk rows, before any wait, and at the end.
template <DType D>
__device__ void nvl_senders(const Args& a, const Layout& l, unsigned long long call, int c, const char* y) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, S = s.slots();
  const int me = a.put.peers.rank, l_me = me % L, lane = threadIdx.x % 32, f = threadIdx.x / 32;
  const int h = static_cast<int>(call & 1ull);
  if (f >= L) return;
  const char* half = my_half(a, l, call);
  const auto* out_pos = reinterpret_cast<const int*>(half + l.out_pos);
  const RingWords* w = ring::words(a.put.peers.local, h);
  char* fh = node_half(a, l, call, f);
  RingWords* fw = ring::words(a.put.peers.mapped[me / L * L + f], h);
  int p = 0, published = 0;
  auto publish = [&] {
    if (published == p) return;
    __syncwarp();
    __threadfence_system();  // the rows, before the tail
    __syncwarp();
    if (lane == 0) st_release_sys(&fw->nvl_tail[c][l_me], ring::tag(call, static_cast<unsigned>(p)));
    published = p;
  };
  for (int n = 0; n < N; ++n) {
    const auto* r = reinterpret_cast<const volatile int*>(fh + l.range(s, c, n));
    const int r0 = r[0], r1 = r[1];
    for (int i = r0; i < r1; ++i) {
      int rows[kMaxTopk];
      const int count = my_rows(out_pos, S, static_cast<std::size_t>(f) * Cn + i, rows);
      if (count == 0) continue;
      const long long need = static_cast<long long>(p) - s.nvl_ring;
      auto room = [&] {
        return static_cast<long long>(ring::tagged_value(ld_acquire_sys(&w->nvl_head[c][f]), call)) > need;
      };
      bool ready = false;
      if (lane == 0) ready = room();
      if (!__shfl_sync(kFullWarpMask, ready, 0)) {
        publish();  // every written row visible before waiting: the reducer may need them to move its head
        if (!ring::warp_wait(a, room, me / L * L + f, kOpCombineNode, call)) return;
      }
      __syncwarp();
      char* dst = fh + l.nvl_row(s, c, l_me, p);
      for (int col = 4 * lane; col < s.cols; col += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int k = 0; k < count; ++k) add4(acc, load4<D>(y + static_cast<std::size_t>(rows[k]) * s.row_bytes, col));
        store4<D>(dst, col, acc);
      }
      ++p;
      if (p % s.nvl_chunk == 0) publish();
    }
  }
  publish();
}

// The reducer (this rank as forwarder): warps 1.. take the table rows of
// channel c in order, a batch of min(warps - 1, nvl_ring) rows at a time;
// a row's position in each sender's ring counts that sender's earlier rows.
// After each batch the heads go back to the senders.
template <DType D>
__device__ void reducer(const Args& a, const Layout& l, unsigned long long call, int c, const HandleIO& hio,
                        const unsigned long long* base) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, C = s.capacity, S = s.slots();
  const int me = a.put.peers.rank, n_me = me / L, l_me = me % L, lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32 - 1, warps = blockDim.x / 32 - 1, h = static_cast<int>(call & 1ull);
  const int batch = min(warps, s.nvl_ring);
  char* half = my_half(a, l, call);
  RingWords* w = ring::words(a.put.peers.local, h);
  __shared__ int has[32][kMaxLocal];  // rows of the batch: which senders hold them
  __shared__ int count[kMaxLocal];    // rows taken from each sender's ring before this batch
  __shared__ int failed;
  if (threadIdx.x == 32) failed = 0;
  if (warp == 0 && lane < L) count[lane] = 0;
  for (int v = threadIdx.x - 32; v < 32 * kMaxLocal; v += warps * 32) has[v / kMaxLocal][v % kMaxLocal] = 0;
  reducer_sync(warps * 32);
  for (int n = 0; n < N; ++n) {
    const auto* r = reinterpret_cast<const int*>(half + l.range(s, c, n));
    const int r0 = r[0], r1 = max(r[1], r[0]);
    for (int b0 = r0; b0 < r1; b0 += batch) {
      const int i = b0 + warp;
      const bool mine = warp < batch && i < r1;
      if (mine && lane < L) {
        bool any = false;
        for (int k = 0; k < S; ++k) {
          const int o = hio.fwd_dst_row[(static_cast<std::size_t>(i) * L + lane) * S + k];
          any |= o >= 0 && o < C;
        }
        has[warp][lane] = any;
      }
      reducer_sync(warps * 32);
      if (mine && !failed) {
        // Every wait first (a whole warp each), then the sum: ascending local rank.
        const int q = i - r0;
        int pos[kMaxLocal];
        bool ok = true;
        for (int j = 0; j < L; ++j) {
          pos[j] = -1;
          if (!has[warp][j] || !ok) continue;
          int at = count[j];
          for (int b = 0; b < warp; ++b) at += has[b][j];
          pos[j] = at;
          ok = ring::warp_wait(
              a,
              [&] { return ring::tagged_value(ld_acquire_sys(&w->nvl_tail[c][j]), call) > static_cast<unsigned>(at); },
              n_me * L + j, kOpCombineNode, call);
        }
        const long long need = static_cast<long long>(q) - s.rdma_ring;
        ok = ok && ring::warp_wait(
                       a, [&] { return ring::credit(w, c, n, base[n]) > need; },
                       n * L + l_me, kOpCombineRail, call);
        if (!ok) {
          failed = 1;
        } else {
          char* dst = half + l.rdma_row(n == n_me ? l.recv_ring : l.send_ring, s, c, n, q);
          for (int col = 4 * lane; col < s.cols; col += 128) {
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int j = 0; j < L; ++j) {
              if (pos[j] >= 0) add4(acc, load4<D>(half + l.nvl_row(s, c, j, pos[j]), col));
            }
            store4<D>(dst, col, acc);
          }
          __syncwarp();
          __threadfence();  // the partial, before its count (the coordinator's system fence follows the count)
          __syncwarp();
          if (lane == 0) atomicAdd(&w->filled[c][n][(q / s.rdma_chunk) % s.ring_chunks()], 1);
        }
      }
      reducer_sync(warps * 32);
      if (failed) return;
      if (warp == 0 && lane < L) {
        int taken = 0;
        for (int b = 0; b < batch && b0 + b < r1; ++b) taken += has[b][lane];
        count[lane] += taken;
        for (int b = 0; b < batch; ++b) has[b][lane] = 0;
        // The batch's reads of sender `lane`'s ring are done (the barrier above): pass them.
        RingWords* jw = ring::words(a.put.peers.mapped[n_me * L + lane], h);
        st_release_sys(&jw->nvl_head[c][l_me], ring::tag(call, static_cast<unsigned>(count[lane])));
      }
      reducer_sync(warps * 32);
    }
  }
}

// RDMA receivers (this rank as source): warps 1.. take the tokens of
// channel c (striding); each sums the partial of every node it went to
// (ascending node) and counts the chunk consumed; warp 0 returns the credits
// of whole consumed chunks, in order.
template <DType D>
__device__ void rdma_receivers(const Args& a, const Layout& l, unsigned long long call, int c, const int* rdma_slot,
                               const int* r0, const int* len, char* out) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, T = s.num_tokens;
  const int me = a.put.peers.rank, n_me = me / L, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int h = static_cast<int>(call & 1ull);
  const char* half = my_half(a, l, call);
  RingWords* w = ring::words(a.put.peers.local, h);
  const std::size_t out_row = static_cast<std::size_t>(s.cols) * (D == DType::kF32 ? 4 : 2);
  if (warp == 0) {  // credits
    __shared__ int next[kMaxRanks];
    for (int m = lane; m < N; m += 32) next[m] = 0;
    __syncwarp();
    ring::PollClock clock;
    for (;;) {
      bool pending = false, progressed = false;
      int waiting_on = -1;
      for (int m = 0; m < N; ++m) {
        const int k = next[m];
        if (k >= ring::num_chunks(s, len[m])) continue;
        pending = true;
        const int rows = ring::chunk_rows(s, len[m], k), slot = k % s.ring_chunks();
        int* used = &w->consumed[c][m][slot];
        if (!__shfl_sync(kFullWarpMask, lane == 0 && *reinterpret_cast<volatile int*>(used) == rows, 0)) {
          if (waiting_on < 0) waiting_on = m * L + me % L;
          continue;
        }
        if (lane == 0) {
          *used = 0;
          __threadfence();  // the reset, before the credit lets the slot's next chunk arrive
          transport::signal_add(a.put.peers, m * L + me % L, ring::credit_offset(h, c, n_me),
                                static_cast<unsigned long long>(rows));
          next[m] = k + 1;
        }
        __syncwarp();
        progressed = true;
      }
      if (!pending) break;
      if (!clock.go_on(a, progressed, waiting_on < 0 ? me : waiting_on, kOpCombineRail, call)) return;
    }
    return;
  }
  const int t0 = min(c * s.channel_tokens(), T), t1 = min(t0 + s.channel_tokens(), T);
  const int warps = blockDim.x / 32 - 1;
  for (int t = t0 + warp - 1; t < t1; t += warps) {
    // Wait for every partial of the token first (a lane per node), then sum.
    for (int m = 0; m < N; ++m) {
      const int row = rdma_slot[static_cast<std::size_t>(t) * N + m];
      if (row < 0 || row >= Cn) continue;
      const int q = row - r0[m];
      const unsigned want = static_cast<unsigned>(q / s.rdma_chunk + 1);
      const unsigned long long* flag = &w->flag[c][m][(q / s.rdma_chunk) % s.ring_chunks()];
      if (!ring::warp_wait(a, [&] { return ring::tagged_value(ld_acquire_sys(flag), call) >= want; },
                           m * L + me % L, kOpCombineRail, call)) {
        return;
      }
    }
    for (int col = 4 * lane; col < s.cols; col += 128) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int m = 0; m < N; ++m) {
        const int row = rdma_slot[static_cast<std::size_t>(t) * N + m];
        if (row < 0 || row >= Cn) continue;
        add4(acc, load4<D>(half + l.rdma_row(l.recv_ring, s, c, m, row - r0[m]), col));
      }
      store4<D>(out + t * out_row, col, acc);
    }
    __syncwarp();  // every lane's reads, before the slots count as consumed
    if (lane == 0) {
      for (int m = 0; m < N; ++m) {
        const int row = rdma_slot[static_cast<std::size_t>(t) * N + m];
        if (row < 0 || row >= Cn) continue;
        atomicAdd(&w->consumed[c][m][((row - r0[m]) / s.rdma_chunk) % s.ring_chunks()], 1);
      }
    }
  }
}

// Three blocks per channel: NVLink senders, reducer, RDMA receivers.
template <DType D>
__global__ void __launch_bounds__(kThreads) combine_rings(Args a, const char* y, HandleIO hio, char* out) {
  if (ll_put::detail::block_aborted(a.put, kOpCombineRail)) return;
  const Layout l = Layout::make(a.shape);
  const unsigned long long call = call_number(a);
  const int c = blockIdx.x / 3, role = blockIdx.x % 3;
  if (role == 0) {
    nvl_senders<D>(a, l, call, c, y);
    return;
  }
  __shared__ int r0[kMaxRanks], len[kMaxRanks];
  __shared__ unsigned long long base[kMaxRanks];
  const RingWords* w = ring::words(a.put.peers.local, static_cast<int>(call & 1ull));
  if (role == 1) {
    // As the forwarder: the streams to each source node are the table's ranges.
    const char* half = my_half(a, l, call);
    for (int n = threadIdx.x; n < a.shape.num_nodes; n += blockDim.x) {
      const auto* r = reinterpret_cast<const int*>(half + l.range(a.shape, c, n));
      len[n] = max(r[1] - r[0], 0);
      base[n] = w->base[c][n];
    }
    __syncthreads();
    if (threadIdx.x / 32 == 0) {
      ring::rdma_coordinator(a, l, call, c, len, base, kOpCombineRail);
    } else {
      reducer<D>(a, l, call, c, hio, base);
    }
    return;
  }
  if (!ring::source_streams(a, hio.rdma_slot, c, w, r0, len, base, kOpCombineRail)) return;
  rdma_receivers<D>(a, l, call, c, hio.rdma_slot, r0, len, out);
}

template <DType D>
cudaError_t launch_typed(const Args& a, const void* y, const HandleIO& h, void* out, int num_blocks,
                         cudaStream_t stream) {
  if (cudaError_t err = launch_handle_start(a, h, kRailPartials, kOpCombineRail, num_blocks, stream);
      err != cudaSuccess) {
    return err;
  }
  combine_rings<D><<<3 * a.shape.channels, kThreads, 0, stream>>>(a, static_cast<const char*>(y), h,
                                                                   static_cast<char*>(out));
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  return launch_handle_end(a, kRailPartials, kOpCombineNode, stream);
}

}  // namespace

cudaError_t launch_combine(const Args& a, DType dtype, const void* y, const HandleIO& h, void* out, int num_blocks,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kBF16:
      return launch_typed<DType::kBF16>(a, y, h, out, num_blocks, stream);
    case DType::kF16:
      return launch_typed<DType::kF16>(a, y, h, out, num_blocks, stream);
    default:
      return launch_typed<DType::kF32>(a, y, h, out, num_blocks, stream);
  }
}

}  // namespace internode
}  // namespace jax_ep
