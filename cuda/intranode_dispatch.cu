// Intranode normal-mode dispatch: stage the routing and the rows, the
// cross-rank barrier, route (prefix, then place), pull the rows; and the
// cached dispatch (stage, barrier, pull). See intranode.cuh for the design.
#include "intranode.cuh"

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>

#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace intranode {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kCopyThreads = 256;  // four blocks per SM of the budget (64 registers each)
constexpr int kRouteThreads = 256;
constexpr int kUnroll = 4;

// Staging half a kernel uses: before this call's barrier the epoch counts the
// previous calls; after it, it counts this one too.
__device__ __forceinline__ int current_half(const PeerTable& peers, bool after_barrier) {
  const auto* me = reinterpret_cast<const Signals*>(peers.base[peers.rank]);
  const unsigned long long e = ld_volatile(&me->epoch);
  return static_cast<int>((after_barrier ? e - 1 : e) & 1ull);
}

__device__ __forceinline__ bool valid_expert(int id, int num_experts) {
  return id >= 0 && id < num_experts;
}

// ---------------------------------------------------------------------------
// Stage the routing: for each destination rank d, every local token's index
// among the tokens that go to d (local_idx), and for each expert e, every
// token's index among those that chose e (slot_idx, on the token's first slot
// naming e). Blocks [0, R) scan ranks, [R, R+E) scan experts; the order is
// token order, so every rank derives the same buffer positions.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kScanThreads)
    stage_routing_kernel(PeerTable peers, DispatchArgs args, DispatchStaging layout,
                         bool* is_token_in_rank) {
  if (block_aborted(peers)) return;  // a rank failed: this buffer is dead
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;

  const int T = args.num_tokens, K = args.num_topk, E = args.num_experts;
  const int R = peers.num_ranks;
  const int local_experts = E / R;
  char* stage = staging_half(peers.base[peers.rank], current_half(peers, false),
                             peers.staging_half_bytes);
  int* cnt_rank = reinterpret_cast<int*>(stage + layout.cnt_rank);
  int* cnt_expert = reinterpret_cast<int*>(stage + layout.cnt_expert);
  int* local_idx = reinterpret_cast<int*>(stage + layout.local_idx);
  int* slot_idx = reinterpret_cast<int*>(stage + layout.slot_idx);
  const int b = blockIdx.x;

  // Every block copies a share of the raw routing.
  int* staged_idx = reinterpret_cast<int*>(stage + layout.topk_idx);
  float* staged_w = reinterpret_cast<float*>(stage + layout.topk_weights);
  for (int i = b * blockDim.x + threadIdx.x; i < T * K; i += gridDim.x * blockDim.x) {
    staged_idx[i] = args.topk_idx[i];
    staged_w[i] = args.topk_weights[i];
  }

  int running = 0;
  for (int base = 0; base < T; base += kScanThreads) {
    const int t = base + threadIdx.x;
    int flag = 0, slot = -1;
    if (t < T) {
      const int* row = args.topk_idx + static_cast<long long>(t) * K;
      if (b < R) {
        for (int k = 0; k < K; ++k) {
          const int id = row[k];
          flag |= valid_expert(id, E) && id / local_experts == b;
        }
      } else {
        const int e = b - R;
        for (int k = 0; k < K && slot < 0; ++k) slot = row[k] == e ? k : -1;
        flag = slot >= 0;
      }
    }
    int index, total;
    Scan(scan_storage).ExclusiveSum(flag, index, total);
    __syncthreads();
    if (t < T) {
      if (b < R) {
        local_idx[static_cast<long long>(t) * R + b] = flag ? running + index : -1;
        is_token_in_rank[static_cast<long long>(t) * R + b] = flag;
      } else if (flag) {
        slot_idx[static_cast<long long>(t) * K + slot] = running + index;
      }
    }
    running += total;
  }
  if (threadIdx.x == 0) {
    if (b < R) cnt_rank[b] = running;
    else cnt_expert[b - R] = running;
  }
  // Slots no expert block claims (masked, out of range, repeated) get -1.
  if (b == 0) {
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
      const int t = i / K, k = i % K;
      const int* row = args.topk_idx + static_cast<long long>(t) * K;
      bool repeated = false;
      for (int j = 0; j < k; ++j) repeated |= row[j] == row[k];
      if (!valid_expert(row[k], E) || repeated) slot_idx[i] = -1;
    }
  }
}

// Copy rows of up to two parts into this rank's staging (rows with
// mask[r] < 0 are skipped when a mask is given). Each thread keeps kUnroll
// 16-byte loads in flight before it stores.
__global__ void __launch_bounds__(kCopyThreads, 4)
    stage_rows_kernel(PeerTable peers, RowParts parts, int num_rows, std::size_t rows_offset,
                      std::size_t row_stride, const int* mask) {
  if (aborted(peers)) return;  // a rank failed: this buffer is dead
  char* rows = staging_half(peers.base[peers.rank], current_half(peers, false),
                            peers.staging_half_bytes) + rows_offset;
  const int vec0 = parts.part_bytes[0] / 16;
  const int vecs = parts.row_bytes() / 16;
  const long long total = static_cast<long long>(num_rows) * vecs;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x * kUnroll;
  for (long long base = blockIdx.x * static_cast<long long>(blockDim.x) * kUnroll + threadIdx.x;
       base < total; base += step) {
    int4 value[kUnroll];
    long long dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long i = base + static_cast<long long>(u) * blockDim.x;
      dst[u] = -1;
      if (i >= total) continue;
      const int r = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
      if (mask != nullptr && mask[r] < 0) continue;
      // Select parts with branches, not a run-time array index (keeps the
      // kernel parameters out of local memory).
      const bool first = v < vec0;
      const char* src = first ? parts.src[0] : parts.src[1];
      const int part_bytes = first ? parts.part_bytes[0] : parts.part_bytes[1];
      value[u] = reinterpret_cast<const int4*>(src + static_cast<long long>(r) * part_bytes)[first ? v : v - vec0];
      dst[u] = static_cast<long long>(r) * static_cast<long long>(row_stride) + 16ll * v;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] >= 0) *reinterpret_cast<int4*>(rows + dst[u]) = value[u];
    }
  }
}

// Cross-rank barrier: announce this rank's new epoch to every peer, then wait
// until every peer announced it here. Only this one-block kernel ever waits.
// The call's signature goes with the announcement: each peer compares it
// once it saw this rank arrive. After an abort it returns at once.
__global__ void barrier_kernel(PeerTable peers, int op) {
  auto* me = reinterpret_cast<Signals*>(peers.base[peers.rank]);
  __shared__ unsigned long long epoch;
  if (block_aborted(peers)) return;
  if (threadIdx.x == 0) {
    epoch = ld_volatile(&me->epoch) + 1;
    *reinterpret_cast<volatile unsigned long long*>(&me->epoch) = epoch;
    publish_signature(peers, 0, epoch, 0, true);
  }
  __syncthreads();
  const int s = threadIdx.x;
  if (s < peers.num_ranks) {
    if (s != 0) publish_signature(peers, 0, epoch, s, false);
    __threadfence_system();
    auto* peer = reinterpret_cast<Signals*>(peers.base[s]);
    st_release_sys(&peer->arrived[peers.rank], epoch);
    if (wait_at_least(peers, &me->arrived[s], epoch, s, op)) signature_agrees(peers, 0, epoch, s, op);
  }
}

// Workspace (local, ints) written by route_prefix_kernel.
struct RouteWorkspace {
  int base_src[kMaxRanks];   // rank-major: first row of source s here
  int send_base[kMaxRanks];  // rank-major: first row of this rank's tokens at rank d
  int kept, needed;
  // expert-major, indexed by global expert g (owner o = g / E_l):
  //   group_start[g]: first row of g's group at o; prefix_me[g]: rows of g at o
  //   from ranks before this one. Local e: src_base[s * E_l + e].
  int data[1];
  __device__ int* group_start() { return data; }
  __device__ int* prefix_me(int E) { return data + E; }
  __device__ int* group_count(int E) { return data + 2 * E; }
  __device__ int* src_base(int E) { return data + 3 * E; }
};
// group_start, prefix_me, group_count ([E] each) and src_base ([R][E/R]).
static_assert(offsetof(RouteWorkspace, data) + 4 * kMaxExperts * sizeof(int) <= workspace::kRouteBytes,
              "RouteWorkspace must fit its workspace region");

__device__ __forceinline__ const int* peer_ints(const PeerTable& peers, int s, int half,
                                                std::size_t offset) {
  return reinterpret_cast<const int*>(
      staging_half(peers.base[s], half, peers.staging_half_bytes) + offset);
}

__global__ void __launch_bounds__(kScanThreads)
    route_prefix_kernel(PeerTable peers, DispatchArgs args, DispatchStaging layout,
                        RouteWorkspace* ws, DispatchOutputs out) {
  if (block_aborted(peers)) return;  // a rank failed: this buffer is dead
  const int R = peers.num_ranks, me = peers.rank, E = args.num_experts, C = args.capacity;
  const int local_experts = E / R;
  const int half = current_half(peers, true);
  const int tid = threadIdx.x;
  __shared__ int total[1024 + 1];

  if (args.layout == Layout::kRankMajor) {
    if (tid < R) {
      int base = 0, send = 0;
      for (int s = 0; s < R; ++s) {
        const int* cnt = peer_ints(peers, s, half, layout.cnt_rank);
        if (s < tid) base += cnt[me];
        if (s < me) send += cnt[tid];
      }
      ws->base_src[tid] = base;
      ws->send_base[tid] = send;
    }
    if (tid == 0) {
      int needed = 0;
      for (int s = 0; s < R; ++s) needed += peer_ints(peers, s, half, layout.cnt_rank)[me];
      ws->needed = needed;
      ws->kept = min(needed, C);
      *out.num_needed = needed;
      *out.num_kept = min(needed, C);
    }
  }
  // Per-expert totals: the counts output in both layouts, the groups in expert-major.
  for (int g = tid; g < E; g += blockDim.x) {
    int sum = 0, before_me = 0;
    for (int s = 0; s < R; ++s) {
      const int c = peer_ints(peers, s, half, layout.cnt_expert)[g];
      sum += c;
      if (s < me) before_me += c;
    }
    total[g] = sum;
    if (args.layout == Layout::kExpertMajor) {
      ws->prefix_me(E)[g] = before_me;
      ws->group_count(E)[g] = sum;
    }
  }
  __syncthreads();
  if (tid < local_experts) out.num_recv_per_expert[tid] = total[me * local_experts + tid];
  if (args.layout != Layout::kExpertMajor) return;

  const int align = args.expert_alignment;
  if (tid < R) {  // aligned group starts of owner `tid`
    int start = 0;
    for (int e = 0; e < local_experts; ++e) {
      const int g = tid * local_experts + e;
      ws->group_start()[g] = start;
      start += (total[g] + align - 1) / align * align;
    }
  }
  for (int i = tid; i < R * local_experts; i += blockDim.x) {
    const int s = i / local_experts, e = i % local_experts;
    int base = 0;
    for (int j = 0; j < s; ++j)
      base += peer_ints(peers, j, half, layout.cnt_expert)[me * local_experts + e];
    ws->src_base(E)[i] = base;
  }
  __syncthreads();
  if (tid == 0) {
    int needed = 0, kept = 0;
    for (int e = 0; e < local_experts; ++e) {
      const int g = me * local_experts + e;
      const int start = ws->group_start()[g], count = total[g];
      const int aligned = (count + align - 1) / align * align;
      needed += count;
      kept += max(0, min(start + count, C) - start);
      out.expert_group_sizes[e] = min(start + aligned, C) - min(start, C);
    }
    ws->needed = needed;
    ws->kept = kept;
    *out.num_needed = needed;
    *out.num_kept = kept;
  }
}

// Place every received row, fill padding rows, and compute where this rank's
// own tokens landed (send_pos, used by combine).
__global__ void __launch_bounds__(kRouteThreads)
    route_place_kernel(PeerTable peers, DispatchArgs args, DispatchStaging layout,
                       RouteWorkspace* ws, DispatchOutputs out) {
  if (aborted(peers)) return;  // a rank failed: this buffer is dead
  const int R = peers.num_ranks, me = peers.rank, E = args.num_experts, C = args.capacity;
  const int T = args.num_tokens, K = args.num_topk;
  const int local_experts = E / R;
  const int half = current_half(peers, true);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;

  auto write_row = [&](int pos, int s, int t, const int* idx_row, const float* w_row, int only) {
    out.recv_src_rank[pos] = s;
    out.recv_src_token[pos] = t;
    for (int k = 0; k < K; ++k) {
      const int id = idx_row[k];
      const bool own = only >= 0 ? id == only
                                 : valid_expert(id, E) && id / local_experts == me;
      out.recv_topk_idx[static_cast<long long>(pos) * K + k] = own ? id - me * local_experts : -1;
      out.recv_topk_weights[static_cast<long long>(pos) * K + k] = own ? w_row[k] : 0.0f;
    }
  };
  auto write_padding = [&](int pos) {
    out.recv_src_rank[pos] = -1;
    out.recv_src_token[pos] = -1;
    for (int k = 0; k < K; ++k) {
      out.recv_topk_idx[static_cast<long long>(pos) * K + k] = -1;
      out.recv_topk_weights[static_cast<long long>(pos) * K + k] = 0.0f;
    }
  };

  if (args.layout == Layout::kRankMajor) {
    for (long long i = first; i < static_cast<long long>(R) * T; i += stride) {
      const int s = static_cast<int>(i / T), t = static_cast<int>(i % T);
      const int li = peer_ints(peers, s, half, layout.local_idx)[static_cast<long long>(t) * R + me];
      if (li < 0) continue;
      const int pos = ws->base_src[s] + li;
      if (pos >= C) continue;
      const int* idx_row = peer_ints(peers, s, half, layout.topk_idx) + static_cast<long long>(t) * K;
      const float* w_row = reinterpret_cast<const float*>(peer_ints(peers, s, half, layout.topk_weights)) +
                           static_cast<long long>(t) * K;
      write_row(pos, s, t, idx_row, w_row, -1);
    }
    for (long long c = ws->kept + first; c < C; c += stride) write_padding(static_cast<int>(c));
    const int* my_local = peer_ints(peers, me, half, layout.local_idx);
    for (long long i = first; i < static_cast<long long>(T) * R; i += stride) {
      const int d = static_cast<int>(i % R);
      const int li = my_local[i];
      const int pos = ws->send_base[d] + li;
      out.send_pos[i] = (li >= 0 && pos < C) ? d * C + pos : -1;
    }
    return;
  }

  // Expert-major: one row per (token, local expert), on the token's first slot naming it.
  for (long long i = first; i < static_cast<long long>(R) * T * K; i += stride) {
    const int s = static_cast<int>(i / (static_cast<long long>(T) * K));
    const int tk = static_cast<int>(i % (static_cast<long long>(T) * K));
    const int sl = peer_ints(peers, s, half, layout.slot_idx)[tk];
    if (sl < 0) continue;
    const int t = tk / K;
    const int* idx_row = peer_ints(peers, s, half, layout.topk_idx) + static_cast<long long>(t) * K;
    const int g = idx_row[tk % K];
    if (g / local_experts != me) continue;
    const int e = g - me * local_experts;
    const int pos = ws->group_start()[g] + ws->src_base(E)[s * local_experts + e] + sl;
    if (pos >= C) continue;
    const float* w_row = reinterpret_cast<const float*>(peer_ints(peers, s, half, layout.topk_weights)) +
                         static_cast<long long>(t) * K;
    write_row(pos, s, t, idx_row, w_row, g);
  }
  for (long long c = first; c < C; c += stride) {
    bool valid = false;
    for (int e = 0; e < local_experts && !valid; ++e) {
      const int g = me * local_experts + e;
      const int start = ws->group_start()[g];
      valid = c >= start && c < start + ws->group_count(E)[g];
    }
    if (!valid) write_padding(static_cast<int>(c));
  }
  const int* my_slot = peer_ints(peers, me, half, layout.slot_idx);
  for (long long i = first; i < static_cast<long long>(T) * K; i += stride) {
    const int sl = my_slot[i];
    int value = -1;
    if (sl >= 0) {
      const int g = args.topk_idx[i];
      const int d = g / local_experts;
      const int pos = ws->group_start()[g] + ws->prefix_me(E)[g] + sl;
      if (pos < C) value = d * C + pos;
    }
    out.send_pos[i] = value;
  }
}

// out rows [C]: the row of (recv_src_rank, recv_src_token) in that rank's
// staging, or zeros on padding. kUnroll loads in flight per thread. A row
// whose handle names a rank or token out of range (a stale or foreign
// handle) stays zero and reads no peer memory; the thread records the first
// such row after its copy loop, so the loop itself holds no call and its
// loads stay predicated (every index, then every row load, in flight).
__global__ void __launch_bounds__(kCopyThreads, 4)
    pull_rows_kernel(PeerTable peers, RowParts parts, int capacity, std::size_t rows_offset,
                     std::size_t row_stride, const int* src_rank, const int* src_token, int source_rows, int op) {
  if (aborted(peers)) return;  // a rank failed: this buffer is dead
  const int half = current_half(peers, true);
  const int vec0 = parts.part_bytes[0] / 16;
  const int vecs = parts.row_bytes() / 16;
  const long long total = static_cast<long long>(capacity) * vecs;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x * kUnroll;
  int bad_row = -1, bad_index = 0;  // this thread's first out-of-range handle row
  for (long long base = blockIdx.x * static_cast<long long>(blockDim.x) * kUnroll + threadIdx.x;
       base < total; base += step) {
    int4 value[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long i = base + static_cast<long long>(u) * blockDim.x;
      value[u] = make_int4(0, 0, 0, 0);
      if (i >= total) continue;
      const int c = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
      const int s = src_rank[c], token = src_token[c];
      const bool in_range = static_cast<unsigned>(s) < static_cast<unsigned>(peers.num_ranks) &&
                            static_cast<unsigned>(token) < static_cast<unsigned>(source_rows);
      if (s >= 0 && !in_range && bad_row < 0) {
        bad_row = c;
        bad_index = s >= peers.num_ranks ? s : token;
      }
      if (in_range) {
        const char* row = staging_half(peers.base[s], half, peers.staging_half_bytes) + rows_offset +
                          static_cast<long long>(token) * row_stride;
        value[u] = ld_nc_v4(reinterpret_cast<const int4*>(row) + v);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const long long i = base + static_cast<long long>(u) * blockDim.x;
      if (i >= total) continue;
      const int c = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
      const bool first = v < vec0;
      char* dst = first ? parts.dst[0] : parts.dst[1];
      const int part_bytes = first ? parts.part_bytes[0] : parts.part_bytes[1];
      reinterpret_cast<int4*>(dst + static_cast<long long>(c) * part_bytes)[first ? v : v - vec0] = value[u];
    }
  }
  if (bad_row >= 0) record_bad_handle(peers, op, bad_row, bad_index);
}

int copy_blocks(const LaunchConfig& cfg, long long work_items) {
  const long long needed = ceil_div<long long>(work_items, kCopyThreads * kUnroll);
  return static_cast<int>(std::max<long long>(1, std::min<long long>(cfg.num_blocks, needed)));
}

}  // namespace

std::size_t dispatch_staging_bytes(int T, int K, int R, int E, std::size_t row_bytes) {
  return DispatchStaging::make(T, K, R, E, row_bytes).total;
}

std::size_t row_staging_bytes(int C, std::size_t row_bytes) {
  return RowStaging::make(C, row_bytes).total;
}

cudaError_t launch_dispatch(const PeerTable& peers, const DispatchArgs& args,
                            const RowParts& parts, const DispatchOutputs& out,
                            const LaunchConfig& cfg) {
  const int R = peers.num_ranks, T = args.num_tokens, C = args.capacity;
  const DispatchStaging layout =
      DispatchStaging::make(T, args.num_topk, R, args.num_experts, parts.row_bytes());
  auto* ws = reinterpret_cast<RouteWorkspace*>(peers.base[peers.rank] + kSignalBytes + workspace::kRoute);

  stage_routing_kernel<<<R + args.num_experts, kScanThreads, 0, cfg.stream>>>(
      peers, args, layout, out.is_token_in_rank);
  const long long stage_vecs = static_cast<long long>(T) * (parts.row_bytes() / 16);
  stage_rows_kernel<<<copy_blocks(cfg, stage_vecs), kCopyThreads, 0, cfg.stream>>>(
      peers, parts, T, layout.rows, layout.row_stride, nullptr);
  barrier_kernel<<<1, kMaxRanks, 0, cfg.stream>>>(peers, 0);
  route_prefix_kernel<<<1, kScanThreads, 0, cfg.stream>>>(peers, args, layout, ws, out);
  const long long route_items =
      std::max<long long>(static_cast<long long>(R) * T * args.num_topk, C);
  const int route_blocks = static_cast<int>(std::max<long long>(
      1, std::min<long long>(cfg.num_blocks * 4, ceil_div<long long>(route_items, kRouteThreads))));
  route_place_kernel<<<route_blocks, kRouteThreads, 0, cfg.stream>>>(peers, args, layout, ws, out);
  const long long pull_vecs = static_cast<long long>(C) * (parts.row_bytes() / 16);
  pull_rows_kernel<<<copy_blocks(cfg, pull_vecs), kCopyThreads, 0, cfg.stream>>>(
      peers, parts, C, layout.rows, layout.row_stride, out.recv_src_rank, out.recv_src_token, T, 0);
  return cudaGetLastError();
}

cudaError_t launch_barrier(const PeerTable& peers, int op, cudaStream_t stream) {
  barrier_kernel<<<1, kMaxRanks, 0, stream>>>(peers, op);
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const PeerTable& peers, int num_tokens, int capacity,
                                   const int* recv_src_rank, const int* recv_src_token,
                                   const RowParts& parts, const LaunchConfig& cfg) {
  const RowStaging layout = RowStaging::make(num_tokens, parts.row_bytes());
  const int vecs = parts.row_bytes() / 16;
  stage_rows_kernel<<<copy_blocks(cfg, static_cast<long long>(num_tokens) * vecs), kCopyThreads, 0,
                      cfg.stream>>>(peers, parts, num_tokens, 0, layout.row_stride, nullptr);
  barrier_kernel<<<1, kMaxRanks, 0, cfg.stream>>>(peers, 1);
  pull_rows_kernel<<<copy_blocks(cfg, static_cast<long long>(capacity) * vecs), kCopyThreads, 0,
                     cfg.stream>>>(peers, parts, capacity, 0, layout.row_stride, recv_src_rank,
                                   recv_src_token, num_tokens, 1);
  return cudaGetLastError();
}

}  // namespace intranode
}  // namespace jax_ep
