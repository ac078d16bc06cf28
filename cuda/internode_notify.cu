// Internode dispatch, source side: the notify (count messages along the
// rail) and the metas' leg (each token's meta once to each node it goes
// to). See internode.cuh for the protocol.
#include "internode.cuh"

namespace jax_ep {
namespace internode {
namespace {

using detail::call_number;
using detail::kThreads;
using detail::my_half;

__device__ __forceinline__ int* msg_ints_at(char* half, const Layout& l, std::size_t region, int n) {
  return reinterpret_cast<int*>(half + region + static_cast<std::size_t>(n) * l.msg_stride);
}

// One block: route this rank's tokens by node (rank mask, index in each
// node's stream, counts) and put the count message of node m to the
// forwarder (m, l) of this rank's rail.
__global__ void __launch_bounds__(kThreads) notify_send(Args a, const int* topk_idx, bool* is_token_in_rank) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  char* half = my_half(a, l, call);
  const int T = s.num_tokens, K = s.num_topk, E = s.num_experts, N = s.num_nodes, L = s.ranks_per_node;
  const int R = N * L, le = s.local_experts(), me = a.put.peers.rank;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __shared__ int cnt_rank[kMaxRanks], cnt_node[kMaxRanks];
  __shared__ int cnt_expert[kMaxExperts];
  __shared__ int cnt_chan[kMaxRanks * kMaxChannels];  // [node][channel]
  const int ch = s.channels, Tc = s.channel_tokens();
  for (int i = threadIdx.x; i < kMaxRanks; i += blockDim.x) cnt_rank[i] = cnt_node[i] = 0;
  for (int i = threadIdx.x; i < N * ch; i += blockDim.x) cnt_chan[i] = 0;
  for (int i = threadIdx.x; i < E; i += blockDim.x) cnt_expert[i] = 0;
  __syncthreads();

  auto* tmask = reinterpret_cast<unsigned long long*>(half + l.tmask);
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const int* ids = topk_idx + static_cast<std::size_t>(t) * K;
    unsigned long long mask = 0;
    for (int k = 0; k < K; ++k) {
      const int e = ids[k];
      if (e < 0 || e >= E) continue;
      mask |= 1ull << (e / le);
      if (ll_put::detail::first_slot(ids, k)) atomicAdd(&cnt_expert[e], 1);
    }
    tmask[t] = mask;
    for (int r = 0; r < R; ++r) {
      const bool in = (mask >> r) & 1ull;
      is_token_in_rank[static_cast<std::size_t>(t) * R + r] = in;
      if (in) atomicAdd(&cnt_rank[r], 1);
    }
  }
  __syncthreads();

  // Index of each token in the stream to node m (a warp per node, in token order).
  auto* send_pos = reinterpret_cast<int*>(half + l.send_pos);
  const unsigned long long node_bits = (1ull << L) - 1ull;
  for (int m = warp; m < N; m += warps) {
    int base = 0;
    for (int t0 = 0; t0 < T; t0 += 32) {
      const int t = t0 + lane;
      const bool in = t < T && ((tmask[t] >> (m * L)) & node_bits) != 0;
      const unsigned ballot = __ballot_sync(kFullWarpMask, in);
      if (t < T) send_pos[static_cast<std::size_t>(t) * N + m] = in ? base + __popc(ballot & ((1u << lane) - 1u)) : -1;
      if (in) atomicAdd(&cnt_chan[m * ch + t / Tc], 1);
      base += __popc(ballot);
    }
    if (lane == 0) cnt_node[m] = base;
  }
  __syncthreads();

  const int mi = Layout::msg_ints(s);
  const unsigned long long sig = s.signature();
  for (int v = threadIdx.x; v < N * mi; v += blockDim.x) {
    const int m = v / mi, x = v % mi;
    const int chan0 = Layout::msg_channel(s, 0);
    const int value = x < N            ? cnt_node[x]
                      : x < N + L      ? cnt_rank[m * L + (x - N)]
                      : x < chan0      ? cnt_expert[m * L * le + (x - N - L)]
                      : x < mi - 2     ? cnt_chan[m * ch + (x - chan0)]
                      : x == mi - 2    ? static_cast<int>(sig & 0xffffffffull)
                                       : static_cast<int>(sig >> 32);
    msg_ints_at(half, l, l.notify_src, m)[x] = value;
  }
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();  // the messages, before the NIC reads them
  __syncthreads();

  const int h = static_cast<int>(call & 1ull), n_me = me / L;
  const std::size_t half_off = kHeaderBytes + static_cast<std::size_t>(h) * l.half_bytes;
  for (int m = warp; m < N; m += warps) {
    transport::warp_put_signal(a.put.peers, m * L + me % L, half_off + l.notify_in + n_me * l.msg_stride,
                               half + l.notify_src + m * l.msg_stride, l.msg_stride,
                               rail_word(h, kRailNotify, n_me), transport::signal_final_value(1) + 1, lane);
  }
}

// One block: wait for the rail's messages and compare their signatures; the
// row where this rank's stream starts in each forwarder's table (the tokens
// of earlier source nodes).
__global__ void __launch_bounds__(kThreads) notify_wait(Args a) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Layout l = Layout::make(a.shape);
  const unsigned long long call = call_number(a);
  if (!detail::wait_rail(a, kRailNotify, call, kOpDispatchRail)) return;
  char* half = my_half(a, l, call);
  const int N = a.shape.num_nodes, L = a.shape.ranks_per_node, n_me = a.put.peers.rank / L;
  const int mi = Layout::msg_ints(a.shape);
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    const auto* msg = reinterpret_cast<volatile const unsigned*>(msg_ints_at(half, l, l.notify_in, n));
    const unsigned long long theirs = msg[mi - 2] | static_cast<unsigned long long>(msg[mi - 1]) << 32;
    if (theirs != a.shape.signature()) {
      detail::mismatch(a, n * L + a.put.peers.rank % L, kOpDispatchRail, call + 1, theirs);
      failed = 1;
    }
  }
  __syncthreads();
  if (failed) return;
  auto* start = reinterpret_cast<int*>(half + l.locals);
  for (int m = threadIdx.x; m < N; m += blockDim.x) {
    int sum = 0;
    for (int n = 0; n < n_me; ++n) sum += *reinterpret_cast<volatile int*>(msg_ints_at(half, l, l.notify_in, n) + m);
    start[m] = sum;
  }
  // This rank's streams as forwarder: source node n's tokens of channel c
  // are the table rows [lo_n + (its tokens of earlier channels), + its
  // tokens of c), cut at Cn. Node peers read them after barrier A.
  const int ch = a.shape.channels, Cn = a.shape.node_capacity;
  for (int v = threadIdx.x; v < N * ch; v += blockDim.x) {
    const int n = v / ch, c = v % ch;
    int row = 0;
    for (int p = 0; p < n; ++p) row += *reinterpret_cast<volatile int*>(msg_ints_at(half, l, l.notify_in, p) + n_me);
    const auto* msg = reinterpret_cast<volatile int*>(msg_ints_at(half, l, l.notify_in, n));
    for (int q = 0; q < c; ++q) row += msg[Layout::msg_channel(a.shape, q)];
    auto* r = reinterpret_cast<int*>(half + l.range(a.shape, c, n));
    r[0] = min(row, Cn);
    r[1] = min(row + msg[Layout::msg_channel(a.shape, c)], Cn);
  }
}

// The metas' leg: a warp per token stages its meta (Meta, top-k ids and
// weights) and puts it into the meta table of each node's forwarder it goes
// to, recording the table row in rdma_slot; block 0 adds each stream's final
// count. The rows follow through the rings (internode_pipeline.cu). No waits.
__global__ void __launch_bounds__(kThreads) dispatch_send(Args a, DispatchIO io) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  const unsigned long long call = call_number(a);
  char* half = my_half(a, l, call);
  const int T = s.num_tokens, K = s.num_topk, N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity;
  const int me = a.put.peers.rank, n_me = me / L, h = static_cast<int>(call & 1ull);
  const int lane = threadIdx.x % 32;
  const auto* start = reinterpret_cast<const int*>(half + l.locals);
  const auto* tmask = reinterpret_cast<const unsigned long long*>(half + l.tmask);
  const auto* send_pos = reinterpret_cast<const int*>(half + l.send_pos);
  const std::size_t half_off = kHeaderBytes + static_cast<std::size_t>(h) * l.half_bytes;

  if (blockIdx.x == 0 && threadIdx.x < N) {
    const int m = threadIdx.x;
    const int count = msg_ints_at(half, l, l.notify_src, 0)[m];
    const int sent = max(0, min(Cn - start[m], count));
    transport::signal_add(a.put.peers, m * L + me % L, rail_word(h, kRailRows, n_me),
                          transport::signal_final_value(static_cast<unsigned>(sent)));
  }

  const int warps = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < T; t += warps) {
    const unsigned long long mask = tmask[t];
    if (mask == 0) continue;
    char* msg = half + l.stage + static_cast<std::size_t>(t) * l.meta_bytes;
    if (lane == 0) *reinterpret_cast<Meta*>(msg) = Meta{t, me, mask};
    if (lane < K) {
      reinterpret_cast<int*>(msg + sizeof(Meta))[lane] = io.topk_idx[static_cast<std::size_t>(t) * K + lane];
      reinterpret_cast<float*>(msg + sizeof(Meta) + 4 * K)[lane] = io.topk_weights[static_cast<std::size_t>(t) * K + lane];
    }
    __syncwarp();
    __threadfence_system();  // the staged meta, before a put reads it
    __syncwarp();
    for (int m = 0; m < N; ++m) {
      const int sp = send_pos[static_cast<std::size_t>(t) * N + m];
      if (sp < 0 || start[m] + sp >= Cn) continue;  // not to m, or past the forwarder's table (dropped)
      const int row = start[m] + sp;
      if (lane == 0) io.rdma_slot[static_cast<std::size_t>(t) * N + m] = row;
      transport::warp_put_signal(a.put.peers, m * L + me % L, half_off + l.table + row * l.meta_bytes, msg,
                                 l.meta_bytes, rail_word(h, kRailRows, n_me), 1, lane);
    }
  }
}

}  // namespace

// The source half of a dispatch (internode_dispatch.cu launches the rest).
cudaError_t launch_dispatch_source(const Args& a, const DispatchIO& io, int num_blocks, cudaStream_t stream) {
  notify_send<<<1, kThreads, 0, stream>>>(a, io.topk_idx, io.is_token_in_rank);
  notify_wait<<<1, kThreads, 0, stream>>>(a);
  dispatch_send<<<num_blocks, kThreads, 0, stream>>>(a, io);
  return cudaGetLastError();
}

}  // namespace internode
}  // namespace jax_ep
