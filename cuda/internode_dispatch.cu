// Internode dispatch, forwarder and destination side (the NVLink leg), and
// the cached dispatch along a handle. See internode.cuh for the protocol.
#include "internode.cuh"

namespace jax_ep {
namespace internode {
namespace {

using detail::call_number;
using detail::kScanThreads;
using detail::kThreads;
using detail::my_half;
using detail::node_half;

__device__ __forceinline__ int msg_int(const char* half, const Layout& l, int n, int x) {
  return *reinterpret_cast<const volatile int*>(half + l.notify_in + static_cast<std::size_t>(n) * l.msg_stride +
                                                4 * static_cast<std::size_t>(x));
}

// The segment of source node n in forwarder f's table: rows [lo, hi).
__device__ __forceinline__ void segment(const char* fh, const Layout& l, int n, int n_me, int Cn, int* lo, int* hi) {
  int seg = 0;
  for (int p = 0; p < n; ++p) seg += msg_int(fh, l, p, n_me);
  *lo = min(seg, Cn);
  *hi = min(seg + msg_int(fh, l, n, n_me), Cn);
}

// Rank-major placement: rows naming this rank, in segment order; returns
// the rows placed (kept or not).
__device__ int place_rank_major(const Args& a, const Layout& l, unsigned long long call, int* out_pos) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, C = s.capacity;
  const int me = a.put.peers.rank, n_me = me / L;
  int running = 0;  // rows placed so far (the same in every thread)
  for (int n = 0; n < N; ++n) {
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      int lo, hi;
      segment(fh, l, n, n_me, Cn, &lo, &hi);
      for (int base = lo; base < hi; base += blockDim.x) {
        const int i = base + threadIdx.x;
        bool hit = false;
        if (i < hi) {
          const auto* meta = reinterpret_cast<const Meta*>(fh + l.table + static_cast<std::size_t>(i) * l.tok_stride);
          hit = (ld_volatile(&meta->rank_mask) >> me) & 1ull;
        }
        int total;
        const int pre = detail::block_exclusive_count(hit, &total);
        if (i < hi) out_pos[static_cast<std::size_t>(f) * Cn + i] = hit && running + pre < C ? running + pre : -1;
        running += total;
      }
    }
  }
  return min(running, C);
}

// Expert-major placement: one row per (token, local expert), named by the
// first slot naming it, grouped by local expert (groups start at multiples
// of the alignment), in segment order inside a group. A first pass copies
// each table row's local experts here and counts them; a second pass scans
// the rows once per local expert (O(E/R x rows): not tuned). Returns the
// rows kept.
__device__ int place_expert_major(const Args& a, const Layout& l, unsigned long long call, char* half, int* out_pos,
                                  int* group_sizes) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, C = s.capacity, K = s.num_topk;
  const int E = s.num_experts, le = s.local_experts(), me = a.put.peers.rank, n_me = me / L;
  auto* lx = reinterpret_cast<int*>(half + l.local_ids);
  __shared__ int count[kMaxLocalExperts], start[kMaxLocalExperts];
  for (int e = threadIdx.x; e < le; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int n = 0; n < N; ++n) {
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      int lo, hi;
      segment(fh, l, n, n_me, Cn, &lo, &hi);
      for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const auto* ids = reinterpret_cast<const volatile int*>(fh + l.table + static_cast<std::size_t>(i) * l.tok_stride +
                                                                sizeof(Meta));
        const std::size_t row = (static_cast<std::size_t>(f) * Cn + i) * K;
        for (int k = 0; k < K; ++k) {
          const int e = ids[k];
          bool first = e >= 0 && e < E && e / le == me;
          for (int j = 0; j < k && first; ++j) first = ids[j] != e;
          lx[row + k] = first ? e - me * le : -1;
          out_pos[row + k] = -1;
          if (first) atomicAdd(&count[e - me * le], 1);
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int at = 0;
    for (int e = 0; e < le; ++e) {
      const int aligned = (count[e] + s.alignment - 1) / s.alignment * s.alignment;
      start[e] = at;
      group_sizes[e] = min(at + aligned, C) - min(at, C);
      at += aligned;
    }
  }
  __syncthreads();
  int kept = 0;
  for (int e = 0; e < le; ++e) {
    int running = start[e];
    for (int n = 0; n < N; ++n) {
      for (int f = 0; f < L; ++f) {
        int lo, hi;
        segment(node_half(a, l, call, f), l, n, n_me, Cn, &lo, &hi);
        for (int base = lo; base < hi; base += blockDim.x) {
          const int i = base + threadIdx.x;
          int slot = -1;
          if (i < hi) {
            const int* row = lx + (static_cast<std::size_t>(f) * Cn + i) * K;
            for (int k = 0; k < K && slot < 0; ++k) slot = row[k] == e ? k : -1;
          }
          int total;
          const int pre = detail::block_exclusive_count(slot >= 0, &total);
          if (slot >= 0 && running + pre < C) out_pos[(static_cast<std::size_t>(f) * Cn + i) * K + slot] = running + pre;
          running += total;
        }
      }
    }
    kept += max(0, min(C - start[e], count[e]));
  }
  return kept;
}

// One block: wait for this rank's table (every rail source's rows), barrier
// A with the node, then place the rows of the node's tables that name this
// rank: for source node n, rail l', the segment of n in forwarder (node,
// l')'s table, i.e. (source rank, source token) order; out_pos gets the
// output row or -1. Counts come from the forwarders' messages.
__global__ void __launch_bounds__(kScanThreads) dispatch_scan(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  if (!detail::wait_rail(a, kRailRows, call, kOpDispatchRail)) return;
  if (!detail::node_barrier(a, 0, call, kOpDispatchNode)) return;
  char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, le = s.local_experts();
  const int me = a.put.peers.rank, n_me = me / L, l_me = me % L;
  auto* out_pos = reinterpret_cast<int*>(half + l.out_pos);
  const int kept = s.layout == 1 ? place_expert_major(a, l, call, half, out_pos, io.expert_group_sizes)
                                 : place_rank_major(a, l, call, out_pos);
  auto* valid = reinterpret_cast<int*>(half + l.locals) + N;
  for (int f = threadIdx.x; f < L; f += blockDim.x) {
    const char* fh = node_half(a, l, call, f);
    int total = 0;
    for (int n = 0; n < N; ++n) total += msg_int(fh, l, n, n_me);
    valid[f] = min(total, Cn);
  }
  for (int x = threadIdx.x; x < le; x += blockDim.x) {
    int sum = 0;
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      for (int n = 0; n < N; ++n) sum += msg_int(fh, l, n, N + L + l_me * le + x);
    }
    io.num_recv_per_expert[x] = sum;
  }
  if (threadIdx.x == 0) {
    int needed = 0;  // rank-major: tokens naming this rank; expert-major: (token, local expert) pairs
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      for (int n = 0; n < N; ++n) {
        if (s.layout == 1) {
          for (int x = 0; x < le; ++x) needed += msg_int(fh, l, n, N + L + l_me * le + x);
        } else {
          needed += msg_int(fh, l, n, N + l_me);
        }
      }
    }
    *io.num_needed = needed;
    *io.num_kept = kept;
  }
}

// Copy the placed rows (a warp per table row of the node) from the
// forwarders' tables into the outputs (expert-major: one per placed slot,
// with only the top-k slots of that expert set). No waits.
__global__ void __launch_bounds__(kThreads) dispatch_copy(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchNode)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  const char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, K = s.num_topk, E = s.num_experts;
  const int le = s.local_experts(), me = a.put.peers.rank, lane = threadIdx.x % 32, S = s.slots();
  const auto* valid = reinterpret_cast<const int*>(half + l.locals) + N;
  const auto* out_pos = reinterpret_cast<const int*>(half + l.out_pos);
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; w < L * Cn; w += warps) {
    const int f = w / Cn, i = w % Cn;
    if (i >= valid[f]) continue;
    const char* row = node_half(a, l, call, f) + l.table + static_cast<std::size_t>(i) * l.tok_stride;
    const auto* ids = reinterpret_cast<const int*>(row + sizeof(Meta));
    for (int slot = 0; slot < S; ++slot) {
      const int o = out_pos[static_cast<std::size_t>(w) * S + slot];
      if (o < 0) continue;
      const char* payload = row + l.meta_bytes;
      for (int p = 0; p < io.num_parts; ++p) {
        detail::warp_copy(io.recv_x[p] + static_cast<std::size_t>(o) * io.part_bytes[p], payload, io.part_bytes[p],
                          lane);
        payload += io.part_bytes[p];
      }
      if (lane < K) {
        const int e = ids[lane];
        const float wt = reinterpret_cast<const float*>(row + sizeof(Meta) + 4 * K)[lane];
        const bool mine = e >= 0 && e < E && e / le == me && (s.layout == 0 || e == ids[slot]);
        io.recv_topk_idx[static_cast<std::size_t>(o) * K + lane] = mine ? e - me * le : -1;
        io.recv_topk_weights[static_cast<std::size_t>(o) * K + lane] = mine ? wt : 0.0f;
      }
      if (lane == 0) {
        const Meta meta = *reinterpret_cast<const Meta*>(row);
        io.recv_src_rank[o] = meta.src_rank;
        io.recv_src_token[o] = meta.token;
        io.recv_table_row[o] = i;
      }
    }
  }
}

// One block: barrier B (every rank of the node finished reading this rank's
// table); this rank's forwarder arrays of the handle (each table row's
// source and its output row on each rank of the node, from their out_pos);
// end of the call.
__global__ void __launch_bounds__(kScanThreads) dispatch_finish(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchNode)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  if (!detail::node_barrier(a, 1, call, kOpDispatchNode)) return;
  const char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, l_me = a.put.peers.rank % L;
  const int S = s.slots();
  const int valid = reinterpret_cast<const int*>(half + l.locals)[N + l_me];
  for (int i = threadIdx.x; i < valid; i += blockDim.x) {
    const Meta meta = *reinterpret_cast<const Meta*>(half + l.table + static_cast<std::size_t>(i) * l.tok_stride);
    io.fwd_src_node[i] = meta.src_rank / L;
    io.fwd_src_token[i] = meta.token;
    for (int j = 0; j < L; ++j) {
      for (int slot = 0; slot < S; ++slot) {
        io.fwd_dst_row[(static_cast<std::size_t>(i) * L + j) * S + slot] = *reinterpret_cast<const volatile int*>(
            node_half(a, l, call, j) + l.out_pos + 4 * ((static_cast<std::size_t>(l_me) * Cn + i) * S + slot));
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) detail::end_call(a, call, kRailNotify, kRailRows);
}

// --- cached dispatch --------------------------------------------------------------

// The RDMA leg along a handle: stage each token's row once, put it to the
// table row rdma_slot[t, m] of each node; block 0 adds the final counts.
__global__ void __launch_bounds__(kThreads) cached_send(Args a, const char* x, const int* rdma_slot) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  char* half = my_half(a, l, call);
  const int T = s.num_tokens, N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity;
  const int me = a.put.peers.rank, n_me = me / L, h = static_cast<int>(call & 1ull), lane = threadIdx.x % 32;
  const std::size_t half_off = kHeaderBytes + static_cast<std::size_t>(h) * l.half_bytes;
  if (blockIdx.x == 0) {
    __shared__ int count[kMaxRanks];
    for (int m = threadIdx.x; m < N; m += blockDim.x) count[m] = 0;
    __syncthreads();
    for (int v = threadIdx.x; v < T * N; v += blockDim.x) {
      if (rdma_slot[v] >= 0 && rdma_slot[v] < Cn) atomicAdd(&count[v % N], 1);
    }
    __syncthreads();
    for (int m = threadIdx.x; m < N; m += blockDim.x) {
      transport::signal_add(a.put.peers, m * L + me % L, rail_word(h, kRailRows, n_me),
                            transport::signal_final_value(static_cast<unsigned>(count[m])));
    }
  }
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < T; t += warps) {
    bool any = false;
    for (int m = 0; m < N; ++m) any |= rdma_slot[static_cast<std::size_t>(t) * N + m] >= 0;
    if (!any) continue;
    char* msg = half + l.stage + static_cast<std::size_t>(t) * l.tok_stride;
    detail::warp_copy(msg, x + static_cast<std::size_t>(t) * s.row_bytes, s.row_bytes, lane);
    __syncwarp();
    __threadfence_system();
    __syncwarp();
    for (int m = 0; m < N; ++m) {
      const int row = rdma_slot[static_cast<std::size_t>(t) * N + m];
      if (row < 0) continue;
      if (row >= Cn) {  // a stale or foreign handle: record, touch nothing
        if (lane == 0) ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, kOpDispatchRail, t, row);
        continue;
      }
      transport::warp_put_signal(a.put.peers, m * L + me % L, half_off + l.table + row * l.tok_stride, msg,
                                 l.tok_stride, rail_word(h, kRailRows, n_me), 1, lane);
    }
  }
}

// One block: wait for this rank's table, then barrier A.
__global__ void __launch_bounds__(kThreads) cached_wait(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const unsigned long long call = call_number(a);
  if (!detail::wait_rail(a, kRailRows, call, kOpDispatchRail)) return;
  detail::node_barrier(a, 0, call, kOpDispatchNode);
}

// A warp per output row: copy it from the table of its source's forwarder.
__global__ void __launch_bounds__(kThreads) cached_copy(Args a, const int* recv_src_rank, const int* recv_table_row,
                                                        char* out) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchNode)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  const int L = s.ranks_per_node, lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; o < s.capacity; o += warps) {
    const int src = recv_src_rank[o];
    if (src < 0) continue;
    const int i = recv_table_row[o];
    if (src >= s.num_ranks() || i < 0 || i >= s.node_capacity) {
      if (lane == 0) ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, kOpDispatchNode, o, i);
      continue;
    }
    const char* row = node_half(a, l, call, src % L) + l.table + static_cast<std::size_t>(i) * l.tok_stride;
    detail::warp_copy(out + static_cast<std::size_t>(o) * s.row_bytes, row, s.row_bytes, lane);
  }
}

// One block: barrier B, then the end of the call.
__global__ void __launch_bounds__(kThreads) cached_finish(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchNode)) return;
  const unsigned long long call = call_number(a);
  if (!detail::node_barrier(a, 1, call, kOpDispatchNode)) return;
  if (threadIdx.x == 0) detail::end_call(a, call, kRailRows, -1);
}

}  // namespace

cudaError_t launch_dispatch(const Args& a, const DispatchIO& io, int num_blocks, cudaStream_t stream) {
  if (cudaError_t err = launch_dispatch_source(a, io, num_blocks, stream); err != cudaSuccess) return err;
  dispatch_scan<<<1, kScanThreads, 0, stream>>>(a, io);
  dispatch_copy<<<num_blocks, kThreads, 0, stream>>>(a, io);
  dispatch_finish<<<1, kScanThreads, 0, stream>>>(a, io);
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const Args& a, const char* x, const int* rdma_slot, const int* recv_src_rank,
                                   const int* recv_table_row, char* out, int num_blocks, cudaStream_t stream) {
  cached_send<<<num_blocks, kThreads, 0, stream>>>(a, x, rdma_slot);
  cached_wait<<<1, kThreads, 0, stream>>>(a);
  cached_copy<<<num_blocks, kThreads, 0, stream>>>(a, recv_src_rank, recv_table_row, out);
  cached_finish<<<1, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace internode
}  // namespace jax_ep
