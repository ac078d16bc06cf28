// The rows of an internode dispatch through the rings (docs/internode.md,
// "Rings and flow control"), and the start and end of the calls that follow
// a handle (cached dispatch, combine). internode_ring.cuh has the words;
// tests/protocol/internode_ring.py models the roles below.
//
// Two blocks per channel c (the tokens [c * Tc, (c + 1) * Tc) of every rank):
//
//   source block    warp 0: the source coordinator, warp 1: this rank as a
//                   forwarder returning credits, warps 2..: packers;
//   receiver block  this rank as a destination, a warp per set of streams.
//
// Every role waits only by polling (PollClock / warp_wait, with the abort
// word and the timeout), and the receivers and coordinators poll all of
// their streams round-robin, so no stream waits behind another.
#include <climits>

#include "internode_ring.cuh"

namespace jax_ep {
namespace internode {
namespace {

using detail::call_number;
using detail::kThreads;
using detail::my_half;
using detail::node_half;

inline constexpr int kSourceCoordinator = 0;
inline constexpr int kForwarderCoordinator = 1;
inline constexpr int kFirstPacker = 2;

// Packer warp p of P: the tokens of the channel in order (t = t0 + p, + P,
// ...); each row into slot q % ring of the stream to each node it goes to,
// once the credits allow, then one count on its chunk. Rows to this rank's
// own node go straight into its receive ring (no put).
__device__ void packers(const Args& a, const Layout& l, const DispatchIO& io, unsigned long long call, int c, int p,
                        int P, const int* r0, const unsigned long long* base) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, T = s.num_tokens;
  const int me = a.put.peers.rank, n_me = me / L, lane = threadIdx.x % 32;
  const int t0 = min(c * s.channel_tokens(), T), t1 = min(t0 + s.channel_tokens(), T);
  char* half = my_half(a, l, call);
  RingWords* w = ring::words(a.put.peers.local, static_cast<int>(call & 1ull));
  for (int t = t0 + p; t < t1; t += P) {
    for (int m = 0; m < N; ++m) {
      const int row = io.rdma_slot[static_cast<std::size_t>(t) * N + m];
      if (row < 0 || row >= Cn) continue;
      const int q = row - r0[m];
      const long long need = static_cast<long long>(q) - s.rdma_ring;  // the credit must pass this
      if (!ring::warp_wait(
              a, [&] { return ring::credit(w, c, m, base[m]) > need; },
              m * L + me % L, kOpDispatchRail, call)) {
        return;
      }
      char* dst = half + l.rdma_row(m == n_me ? l.recv_ring : l.send_ring, s, c, m, q);
      for (int part = 0; part < io.num_parts; ++part) {
        detail::warp_copy(dst, io.x[part] + static_cast<std::size_t>(t) * io.part_bytes[part], io.part_bytes[part],
                          lane);
        dst += io.part_bytes[part];
      }
      __syncwarp();
      __threadfence();  // the row, before its count (the coordinator's system fence follows the count)
      __syncwarp();
      if (lane == 0) atomicAdd(&w->filled[c][m][(q / s.rdma_chunk) % s.ring_chunks()], 1);
    }
  }
}

// This rank as a forwarder (one warp, a lane per source node): the credit of
// each stream it receives is the least head of its node's receivers (heads
// move on whole chunks or the stream's end); each increase goes back to the
// source as a signal add on its credit word.
__device__ void forwarder_coordinator(const Args& a, const Layout& l, unsigned long long call, int c) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, me = a.put.peers.rank, n_me = me / L, lane = threadIdx.x % 32;
  const int h = static_cast<int>(call & 1ull);
  const char* half = my_half(a, l, call);
  const RingWords* w = ring::words(a.put.peers.local, h);
  constexpr int kPerLane = (kMaxRanks + 31) / 32;
  int len[kPerLane], sent[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int n = lane + 32 * i;
    const int* r = n < N ? reinterpret_cast<const int*>(half + l.range(s, c, n)) : nullptr;
    len[i] = r != nullptr ? max(r[1] - r[0], 0) : 0;
    sent[i] = 0;
  }
  ring::PollClock clock;
  for (;;) {
    bool pending = false, progressed = false;
    int waiting_on = -1;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int n = lane + 32 * i;
      if (sent[i] >= len[i]) continue;
      pending = true;
      unsigned credit = UINT_MAX;
      int slowest = 0;
      for (int j = 0; j < L; ++j) {
        const unsigned head = ring::tagged_value(ld_acquire_sys(&w->head[c][n][j]), call);
        if (head < credit) {
          credit = head;
          slowest = j;
        }
      }
      if (static_cast<int>(credit) > sent[i]) {
        transport::signal_add(a.put.peers, n * L + me % L, ring::credit_offset(h, c, n_me),
                              static_cast<unsigned long long>(static_cast<int>(credit) - sent[i]));
        sent[i] = static_cast<int>(credit);
        progressed = true;
      } else if (waiting_on < 0) {
        waiting_on = n_me * L + slowest;
      }
    }
    if (!__any_sync(kFullWarpMask, pending)) break;
    // Waiting on a receiver of this node that has not passed a chunk: the first waiting lane names the
    // slowest one.
    const unsigned who = __ballot_sync(kFullWarpMask, waiting_on >= 0);
    const int peer = __shfl_sync(kFullWarpMask, waiting_on, who != 0 ? __ffs(who) - 1 : 0);
    if (!clock.go_on(a, __any_sync(kFullWarpMask, progressed), peer >= 0 ? peer : me, kOpDispatchNode, call)) return;
  }
}

// Row i of forwarder f's stream from source node n (q: its index in the
// stream) reached this rank: copy it to each of its output rows here.
__device__ void emit_row(const Args& a, const Layout& l, const DispatchIO& io, bool with_meta, const char* fh,
                         const char* src, const int* out_pos, int i, int lane) {
  const Shape& s = a.shape;
  const int S = s.slots(), K = s.num_topk, E = s.num_experts, le = s.local_experts(), me = a.put.peers.rank;
  for (int slot = 0; slot < S; ++slot) {
    const int o = out_pos[static_cast<std::size_t>(i) * S + slot];
    if (o < 0) continue;
    const char* payload = src;
    for (int part = 0; part < io.num_parts; ++part) {
      detail::warp_copy(io.recv_x[part] + static_cast<std::size_t>(o) * io.part_bytes[part], payload,
                        io.part_bytes[part], lane);
      payload += io.part_bytes[part];
    }
    if (!with_meta) continue;
    const char* meta = fh + l.table + static_cast<std::size_t>(i) * l.meta_bytes;
    const auto* ids = reinterpret_cast<const int*>(meta + sizeof(Meta));
    if (lane < K) {
      const int e = ids[lane];
      const float wt = reinterpret_cast<const float*>(meta + sizeof(Meta) + 4 * K)[lane];
      const bool mine = e >= 0 && e < E && e / le == me && (s.layout == 0 || e == ids[slot]);
      io.recv_topk_idx[static_cast<std::size_t>(o) * K + lane] = mine ? e - me * le : -1;
      io.recv_topk_weights[static_cast<std::size_t>(o) * K + lane] = mine ? wt : 0.0f;
    }
    if (lane == 0) {
      const Meta m = *reinterpret_cast<const Meta*>(meta);
      io.recv_src_rank[o] = m.src_rank;
      io.recv_src_token[o] = m.token;
      io.recv_table_row[o] = i;
    }
  }
}

// The receiver block: warp w takes the streams (f, n) numbered f * N + n =
// w, w + warps, ... and polls them round-robin; a chunk is there when its
// flag (in f) carries this call's tag; its rows that name this rank go
// straight from f's receive ring into the outputs; then this rank's head
// in f passes the chunk.
__device__ void receivers(const Args& a, const Layout& l, const DispatchIO& io, bool with_meta,
                          unsigned long long call, int c) {
  const Shape& s = a.shape;
  const int N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity, S = s.slots();
  const int me = a.put.peers.rank, l_me = me % L, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32, h = static_cast<int>(call & 1ull);
  const char* half = my_half(a, l, call);
  const auto* out_pos = reinterpret_cast<const int*>(half + l.out_pos);
  __shared__ int r0[kMaxLocal * kMaxRanks], len[kMaxLocal * kMaxRanks], next[kMaxLocal * kMaxRanks];
  for (int sid = warp; sid < L * N; sid += warps) {
    const int f = sid / N, n = sid % N;
    const auto* r = reinterpret_cast<const volatile int*>(node_half(a, l, call, f) + l.range(s, c, n));
    if (lane == 0) {
      r0[sid] = r[0];
      len[sid] = max(r[1] - r[0], 0);
      next[sid] = 0;
    }
  }
  __syncwarp();
  ring::PollClock clock;
  for (;;) {
    bool pending = false, progressed = false;
    int waiting_on = -1;
    for (int sid = warp; sid < L * N; sid += warps) {
      const int f = sid / N, n = sid % N, k = next[sid];
      if (k >= ring::num_chunks(s, len[sid])) continue;
      pending = true;
      const char* fh = node_half(a, l, call, f);
      RingWords* fw = ring::words(a.put.peers.mapped[me / L * L + f], h);
      const int slot = k % s.ring_chunks();
      const bool ready =
          __shfl_sync(kFullWarpMask, lane == 0 && ring::tagged_value(ld_acquire_sys(&fw->flag[c][n][slot]), call) >= static_cast<unsigned>(k + 1), 0);
      if (!ready) {
        if (waiting_on < 0) waiting_on = n * L + f;  // the stream's source
        continue;
      }
      const int rows = ring::chunk_rows(s, len[sid], k), q0 = k * s.rdma_chunk;
      for (int r = 0; r < rows; ++r) {
        const int i = r0[sid] + q0 + r;
        emit_row(a, l, io, with_meta, fh, fh + l.rdma_row(l.recv_ring, s, c, n, q0 + r),
                 out_pos + static_cast<std::size_t>(f) * Cn * S, i, lane);
      }
      __syncwarp();  // every lane's reads of the chunk, before the head passes it
      if (lane == 0) {
        st_release_sys(&fw->head[c][n][l_me], ring::tag(call, static_cast<unsigned>(min(q0 + rows, len[sid]))));
        next[sid] = k + 1;
      }
      __syncwarp();
      progressed = true;
    }
    if (!pending) break;
    if (!clock.go_on(a, progressed, waiting_on < 0 ? me : waiting_on, kOpDispatchRail, call)) return;
  }
}

__global__ void __launch_bounds__(kThreads) payload_pipeline(Args a, DispatchIO io, bool with_meta) {
  if (ll_put::detail::block_aborted(a.put, kOpDispatchRail)) return;
  const Layout l = Layout::make(a.shape);
  const unsigned long long call = call_number(a);
  const int c = blockIdx.x / 2;
  if (blockIdx.x % 2 == 1) {
    receivers(a, l, io, with_meta, call, c);
    return;
  }
  __shared__ int r0[kMaxRanks], len[kMaxRanks];
  __shared__ unsigned long long base[kMaxRanks];
  if (!ring::source_streams(a, io.rdma_slot, c, ring::words(a.put.peers.local, static_cast<int>(call & 1ull)), r0, len,
                            base, kOpDispatchRail)) {
    return;
  }
  const int warp = threadIdx.x / 32;
  if (warp == kSourceCoordinator) {
    ring::rdma_coordinator(a, l, call, c, len, base, kOpDispatchRail);
  } else if (warp == kForwarderCoordinator) {
    forwarder_coordinator(a, l, call, c);
  } else {
    packers(a, l, io, call, c, warp - kFirstPacker, blockDim.x / 32 - kFirstPacker, r0, base);
  }
}

// --- calls along a handle -------------------------------------------------------------

// out_pos := -1; the forwarder's stream ranges := empty (r0 = INT_MAX, r1 = 0).
__global__ void __launch_bounds__(kThreads) handle_clear(Args a, int op) {
  if (ll_put::detail::block_aborted(a.put, op)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  char* half = my_half(a, l, call_number(a));
  auto* out_pos = reinterpret_cast<int*>(half + l.out_pos);
  const std::size_t n = static_cast<std::size_t>(s.ranks_per_node) * s.node_capacity * s.slots();
  for (std::size_t v = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; v < n;
       v += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out_pos[v] = -1;
  }
  if (blockIdx.x == 0) {
    for (int v = threadIdx.x; v < s.channels * s.num_nodes; v += blockDim.x) {
      auto* r = reinterpret_cast<int*>(half + l.range(s, v / s.num_nodes, v % s.num_nodes));
      r[0] = INT_MAX;
      r[1] = 0;
    }
  }
}

// From the handle: out_pos[f][i][*] = this rank's output rows of forwarder
// f's table row i (in any order; a combine sorts them), and this rank's
// stream ranges as a forwarder (table rows by source node and channel).
__global__ void __launch_bounds__(kThreads) handle_scatter(Args a, HandleIO hio, int op) {
  if (ll_put::detail::block_aborted(a.put, op)) return;
  const Shape s = a.shape;
  const Layout l = Layout::make(s);
  char* half = my_half(a, l, call_number(a));
  const int L = s.ranks_per_node, R = s.num_ranks(), Cn = s.node_capacity, S = s.slots(), N = s.num_nodes;
  const int T = s.num_tokens, Tc = s.channel_tokens();
  auto* out_pos = reinterpret_cast<int*>(half + l.out_pos);
  const int stride = gridDim.x * blockDim.x;
  for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < s.capacity; o += stride) {
    const int src = hio.recv_src_rank[o], i = hio.recv_table_row[o];
    if (src < 0) continue;
    if (src >= R || i < 0 || i >= Cn) {
      ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, op, o, i);
      continue;
    }
    int* slots = out_pos + (static_cast<std::size_t>(src % L) * Cn + i) * S;
    bool placed = false;
    for (int k = 0; k < S && !placed; ++k) placed = atomicCAS(&slots[k], -1, o) == -1;
    if (!placed) ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, op, o, i);
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < Cn; i += stride) {
    const int n = hio.fwd_src_node[i], t = hio.fwd_src_token[i];
    if (n < 0) continue;
    if (n >= N || t < 0 || t >= T) {
      ll_put::detail::fail(a.put, intranode::kFailBadHandle, -1, op, i, t);
      continue;
    }
    auto* r = reinterpret_cast<int*>(half + l.range(s, t / Tc, n));
    atomicMin(&r[0], i);
    atomicMax(&r[1], i + 1);
  }
}

// One block: the rail exchange of the call (every rank signals and waits for
// every rank of its rail: the reuse argument of internode.cuh needs one per
// call) carrying the call's signature, which each rank compares with its
// rail's (node barrier A compares it with the node's), then node barrier A.
__global__ void __launch_bounds__(kThreads) handle_meet(Args a, int rail_kind, int op) {
  if (ll_put::detail::block_aborted(a.put, op)) return;
  const Shape s = a.shape;
  const unsigned long long call = call_number(a);
  const int L = s.ranks_per_node, me = a.put.peers.rank, h = static_cast<int>(call & 1ull);
  const unsigned long long sig = s.signature();
  char* local = a.put.peers.local;
  auto* stage = reinterpret_cast<unsigned long long*>(local + kRailSigStageOffset + 16 * static_cast<std::size_t>(h));
  if (threadIdx.x == 0) {
    stage[0] = sig;
    stage[1] = 0;
    __threadfence_system();  // the staged signature, before the puts read it
  }
  __syncthreads();
  for (int n = threadIdx.x; n < s.num_nodes; n += blockDim.x) {
    transport::thread_put_signal(a.put.peers, n * L + me % L,
                                 kRailSigOffset + 16 * (static_cast<std::size_t>(h) * kMaxRanks + me / L), stage, 16,
                                 rail_word(h, rail_kind, me / L), transport::signal_final_value(0));
  }
  __syncthreads();
  if (!detail::wait_rail(a, rail_kind, call, op)) return;
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  for (int n = threadIdx.x; n < s.num_nodes; n += blockDim.x) {
    const unsigned long long theirs = ld_volatile(reinterpret_cast<const unsigned long long*>(
        local + kRailSigOffset + 16 * (static_cast<std::size_t>(h) * kMaxRanks + n)));
    if (theirs != sig) {
      detail::mismatch(a, n * L + me % L, op, call + 1, theirs);
      failed = 1;
    }
  }
  __syncthreads();
  if (failed) return;
  detail::node_barrier(a, 0, call, op);
}

// One block: barrier B (no node peer reads this rank's half any more), the end of the call.
__global__ void __launch_bounds__(kThreads) handle_end(Args a, int rail_kind, int op) {
  if (ll_put::detail::block_aborted(a.put, op)) return;
  const unsigned long long call = call_number(a);
  if (!detail::node_barrier(a, 1, call, op)) return;
  if (threadIdx.x == 0) detail::end_call(a, call, rail_kind, -1);
}

}  // namespace

cudaError_t launch_payload(const Args& a, const DispatchIO& io, bool with_meta, cudaStream_t stream) {
  payload_pipeline<<<2 * a.shape.channels, kThreads, 0, stream>>>(a, io, with_meta);
  return cudaGetLastError();
}

cudaError_t launch_handle_start(const Args& a, const HandleIO& h, int rail_kind, int op, int num_blocks,
                                cudaStream_t stream) {
  handle_clear<<<num_blocks, kThreads, 0, stream>>>(a, op);
  handle_scatter<<<num_blocks, kThreads, 0, stream>>>(a, h, op);
  handle_meet<<<1, kThreads, 0, stream>>>(a, rail_kind, op);
  return cudaGetLastError();
}

cudaError_t launch_handle_end(const Args& a, int rail_kind, int op, cudaStream_t stream) {
  handle_end<<<1, kThreads, 0, stream>>>(a, rail_kind, op);
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const Args& a, const char* x, const HandleIO& h, char* out, int num_blocks,
                                   cudaStream_t stream) {
  DispatchIO io{};
  io.x[0] = x;
  io.recv_x[0] = out;
  io.part_bytes[0] = a.shape.row_bytes;
  io.num_parts = 1;
  io.rdma_slot = const_cast<int*>(h.rdma_slot);
  if (cudaError_t err = launch_handle_start(a, h, kRailRows, kOpDispatchRail, num_blocks, stream); err != cudaSuccess) {
    return err;
  }
  if (cudaError_t err = launch_payload(a, io, false, stream); err != cudaSuccess) return err;
  return launch_handle_end(a, kRailRows, kOpDispatchNode, stream);
}

}  // namespace internode
}  // namespace jax_ep
