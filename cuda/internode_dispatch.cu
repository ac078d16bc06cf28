// Internode dispatch, destination side: the placement of the rows its node's
// tables name for this rank, and the handle's forwarder arrays; the rows
// themselves come through the rings (internode_pipeline.cu). See
// internode.cuh for the protocol.
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
          const auto* meta = reinterpret_cast<const Meta*>(fh + l.table + static_cast<std::size_t>(i) * l.meta_bytes);
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
        const auto* ids = reinterpret_cast<const volatile int*>(fh + l.table + static_cast<std::size_t>(i) * l.meta_bytes +
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
    const Meta meta = *reinterpret_cast<const Meta*>(half + l.table + static_cast<std::size_t>(i) * l.meta_bytes);
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

}  // namespace

cudaError_t launch_dispatch(const Args& a, const DispatchIO& io, int num_blocks, cudaStream_t stream) {
  if (cudaError_t err = launch_dispatch_source(a, io, num_blocks, stream); err != cudaSuccess) return err;
  dispatch_scan<<<1, kScanThreads, 0, stream>>>(a, io);
  if (cudaError_t err = launch_payload(a, io, true, stream); err != cudaSuccess) return err;
  dispatch_finish<<<1, kScanThreads, 0, stream>>>(a, io);
  return cudaGetLastError();
}

}  // namespace internode
}  // namespace jax_ep
