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

// One block: wait for this rank's table (every rail source's rows), barrier
// A with the node, then place the rows of the node's tables that name this
// rank: in (source rank, source token) order, i.e. for source node n, rail
// l', the segment of n in forwarder (node, l')'s table; out_pos[l'][i] gets
// the output row or -1. Counts come from the forwarders' messages.
__global__ void __launch_bounds__(kScanThreads) dispatch_scan(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  if (!detail::wait_rail(a, kRailRows, call, kOpDispatchRail)) return;
  if (!detail::node_barrier(a, 0, call, kOpDispatchNode)) return;
  char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, C = s.capacity, le = s.local_experts();
  const int me = a.put.peers.rank, n_me = me / L, l_me = me % L;
  auto* out_pos = reinterpret_cast<int*>(half + l.out_pos);
  int running = 0;  // rows placed so far (the same in every thread)
  for (int n = 0; n < N; ++n) {
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      int seg = 0;
      for (int p = 0; p < n; ++p) seg += msg_int(fh, l, p, n_me);
      const int lo = min(seg, Cn), hi = min(seg + msg_int(fh, l, n, n_me), Cn);
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
    int needed = 0;
    for (int f = 0; f < L; ++f) {
      const char* fh = node_half(a, l, call, f);
      for (int n = 0; n < N; ++n) needed += msg_int(fh, l, n, N + l_me);
    }
    *io.num_needed = needed;
    *io.num_kept = min(running, C);
  }
}

// Copy the placed rows (a warp per table row of the node) from the
// forwarders' tables into the outputs. No waits.
__global__ void __launch_bounds__(kThreads) dispatch_copy(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchNode)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  const char* half = my_half(a, l, call);
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, K = s.num_topk, E = s.num_experts;
  const int le = s.local_experts(), me = a.put.peers.rank, lane = threadIdx.x % 32;
  const auto* valid = reinterpret_cast<const int*>(half + l.locals) + N;
  const auto* out_pos = reinterpret_cast<const int*>(half + l.out_pos);
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; w < L * Cn; w += warps) {
    const int f = w / Cn, i = w % Cn;
    if (i >= valid[f]) continue;
    const int o = out_pos[w];
    if (o < 0) continue;
    const char* row = node_half(a, l, call, f) + l.table + static_cast<std::size_t>(i) * l.tok_stride;
    const char* payload = row + l.meta_bytes;
    for (int p = 0; p < io.num_parts; ++p) {
      detail::warp_copy(io.recv_x[p] + static_cast<std::size_t>(o) * io.part_bytes[p], payload, io.part_bytes[p], lane);
      payload += io.part_bytes[p];
    }
    if (lane < K) {
      const int e = reinterpret_cast<const int*>(row + sizeof(Meta))[lane];
      const float wt = reinterpret_cast<const float*>(row + sizeof(Meta) + 4 * K)[lane];
      const bool mine = e >= 0 && e < E && e / le == me;
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
  const int valid = reinterpret_cast<const int*>(half + l.locals)[N + l_me];
  for (int i = threadIdx.x; i < valid; i += blockDim.x) {
    const Meta meta = *reinterpret_cast<const Meta*>(half + l.table + static_cast<std::size_t>(i) * l.tok_stride);
    io.fwd_src_node[i] = meta.src_rank / L;
    io.fwd_src_token[i] = meta.token;
    for (int j = 0; j < L; ++j) {
      io.fwd_dst_row[static_cast<std::size_t>(i) * L + j] = *reinterpret_cast<const volatile int*>(
          node_half(a, l, call, j) + l.out_pos + 4 * (static_cast<std::size_t>(l_me) * Cn + i));
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
