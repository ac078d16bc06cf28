// Intranode normal-mode combine: the combine kernel's copier groups stage
// the rows (full staging, expert-major) or push them through per-owner rings
// (rank-major), its reducer groups wait for them and sum in float32. See
// intranode.cuh for the design.
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

template <typename T>
struct Vec8;  // 16 bytes of T as floats

template <>
struct Vec8<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void add(float* acc, int4 v) {
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static int4 pack(const float* acc) {
    int4 v;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
};

template <>
struct Vec8<__half> {
  static constexpr int kN = 8;
  __device__ static void add(float* acc, int4 v) {
    const auto* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static int4 pack(const float* acc) {
    int4 v;
    auto* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
};

template <>
struct Vec8<float> {
  static constexpr int kN = 4;
  __device__ static void add(float* acc, int4 v) {
    const auto* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += f[i];
  }
  __device__ static int4 pack(const float* acc) {
    int4 v;
    auto* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = acc[i];
    return v;
  }
};

// Float32 sum of 16-byte vector `v` of `n` rows (null rows count as zero),
// in row order so every rank sums alike; eight loads in flight per thread.
template <typename V>
__device__ __forceinline__ int4 sum_rows(const char* const* rows, int n, int v) {
  constexpr int kCols = 8;
  float acc[V::kN] = {};
  for (int j0 = 0; j0 < n; j0 += kCols) {
    int4 value[kCols];
#pragma unroll
    for (int u = 0; u < kCols; ++u) {
      const char* row = j0 + u < n ? rows[j0 + u] : nullptr;
      value[u] = row != nullptr ? ld_cg_v4(reinterpret_cast<const int4*>(row) + v) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kCols; ++u) V::add(acc, value[u]);
  }
  return V::pack(acc);
}

// Announce this call's epoch to every peer without waiting (the combine's
// reducers do the waiting). A rank announces a call only after its previous
// call finished (stream order), so seeing every peer's announcement means
// nobody reads the staging half this call overwrites any more.
__global__ void arrive_kernel(PeerTable peers) {
  auto* me = reinterpret_cast<Signals*>(peers.base[peers.rank]);
  __shared__ unsigned long long epoch;
  if (block_aborted(peers)) return;
  if (threadIdx.x == 0) {
    epoch = ld_volatile(&me->epoch) + 1;
    *reinterpret_cast<volatile unsigned long long*>(&me->epoch) = epoch;
    publish_signature(peers, 0, epoch, 0, true);
  }
  __syncthreads();
  if (threadIdx.x < peers.num_ranks) {
    if (threadIdx.x != 0) publish_signature(peers, 0, epoch, threadIdx.x, false);
    __threadfence_system();
    st_release_sys(&reinterpret_cast<Signals*>(peers.base[threadIdx.x])->arrived[peers.rank], epoch);
  }
}

// A combine block is one SM of the budget: 1024 threads in four groups of
// 256 with their own barriers, two copiers and two reducers. (Blocks that
// spin must fill their SMs: spread thin, they would leave no SM with room
// for another rank's 1024-thread block, which may be what they wait for.)
// 1024 threads leave 64 registers a thread (65536 per SM), the cap ptxas
// reports, not a __launch_bounds__ choice; it spills 84 bytes a thread (the
// copiers' and reducers' loads in flight share one register budget).
constexpr int kGroupThreads = 256;
constexpr int kGroupsPerBlock = 4;
constexpr int kCombineThreads = kGroupThreads * kGroupsPerBlock;
constexpr int kCombineWarps = kGroupThreads / 32;  // warps per group

struct Group {
  int id;     // 0..3 within the block
  int tid;    // 0..255 within the group
  int* stop;  // shared, per group: a wait of the group failed
  __device__ void sync() const {
    asm volatile("bar.sync %0, %1;" ::"r"(id + 1), "r"(kGroupThreads) : "memory");
  }
  // A thread whose wait failed halts the group; after the group's next
  // barrier every thread sees it alike and the group leaves together (a
  // named barrier must not lose threads).
  __device__ void halt() const { *reinterpret_cast<volatile int*>(stop) = 1; }
  __device__ bool stopped() const { return *reinterpret_cast<volatile int*>(stop) != 0; }
};
constexpr int kStageUnroll = 8;  // 16-byte loads in flight per lane while staging
constexpr int kMaxSendCols = kMaxRanks > kMaxTopk ? kMaxRanks : kMaxTopk;

// Publish `v` at `flag` after the writes of the calling group (thread 0,
// after the group's barrier): GPU-scope release when every peer is on this
// GPU, system scope otherwise.
__device__ __forceinline__ void publish(const PeerTable& peers, unsigned long long* flag, unsigned long long v) {
  if (peers.gpu_scope) {
    st_release_gpu(flag, v);
  } else {
    __threadfence_system();
    st_release_sys(flag, v);
  }
}

// Wait until the 64-bit epoch counter at *flag (a Signals::arrived slot)
// reaches `epoch`; false when the wait failed (a timeout naming `peer`, or a
// peer's abort: recorded, abort raised). Packed words wait with wait_word.
__device__ __forceinline__ bool wait_epoch(const PeerTable& peers, const unsigned long long* flag,
                                           unsigned long long epoch, int peer, int op) {
  return wait_at_least(peers, flag, epoch, peer, op);
}

// Copier side of the full-staging combine, which combine_kernel runs for the
// expert-major layout (the rank-major layout goes through the rings,
// ring_stage): stage the valid rows of y chunk by chunk and flag every chunk.
template <typename T>
__device__ void combine_stage(const Group& g, const PeerTable& peers, const CombineArgs& a, int half,
                              unsigned long long epoch, int index, int count) {
  const int C = a.capacity, B = a.chunk_rows;
  const int chunks = (C + B - 1) / B;
  const std::size_t row_bytes = static_cast<std::size_t>(a.hidden) * sizeof(T);
  const std::size_t row_stride = align_up(row_bytes, 16);
  const int vecs = static_cast<int>(row_bytes / 16);
  const char* y = static_cast<const char*>(a.y);
  char* stage = staging_half(peers.base[peers.rank], half, peers.staging_half_bytes);
  unsigned long long* flags = chunk_flags(peers.base[peers.rank], half);
  const int warp = g.tid / 32, lane = g.tid % 32;
  for (int k = index; k < chunks; k += count) {
    const int r1 = min(k * B + B, C);
    for (int r = k * B + warp; r < r1; r += kCombineWarps) {
      if (a.recv_src_rank[r] < 0) continue;
      const int4* src = reinterpret_cast<const int4*>(y + static_cast<std::size_t>(r) * row_bytes);
      int4* dst = reinterpret_cast<int4*>(stage + static_cast<std::size_t>(r) * row_stride);
      for (int v = lane; v < vecs; v += 32 * kStageUnroll) {
        int4 val[kStageUnroll];
#pragma unroll
        for (int u = 0; u < kStageUnroll; ++u) {
          if (v + 32 * u < vecs) val[u] = src[v + 32 * u];
        }
#pragma unroll
        for (int u = 0; u < kStageUnroll; ++u) {
          if (v + 32 * u < vecs) dst[v + 32 * u] = val[u];
        }
      }
    }
    g.sync();
    if (g.tid == 0) publish(peers, &flags[k], serial_word(epoch, 0));
  }
}

// Reducer side: tokens index, index + count, ... in order; each waits for
// the chunks holding its rows, then sums them (float32, column order).
template <typename T>
__device__ void combine_reduce(const Group& g, const PeerTable& peers, const CombineArgs& a, int half,
                               unsigned long long epoch, int index, int count) {
  using V = Vec8<T>;
  __shared__ const char* rows_of[kGroupsPerBlock][kMaxSendCols];
  const char** rows = rows_of[g.id];
  const int R = peers.num_ranks, C = a.capacity, B = a.chunk_rows, S = a.num_send_cols;
  const auto* me = reinterpret_cast<const Signals*>(peers.base[peers.rank]);
  bool ok = true;
  if (g.tid < R) {
    ok = wait_epoch(peers, &me->arrived[g.tid], epoch, g.tid, 5) && signature_agrees(peers, 0, epoch, g.tid, 2);
    if (!ok) g.halt();
  }
  const std::size_t row_stride = align_up(static_cast<std::size_t>(a.hidden) * sizeof(T), 16);
  const int vecs = a.hidden / V::kN;
  for (int t = index; t < a.num_tokens; t += count) {
    if (g.tid < S && ok) {
      const int p = a.send_pos[static_cast<long long>(t) * S + g.tid];
      const char* row = nullptr;
      if (p >= R * C) {
        record_bad_handle(peers, 2, t, p);  // a stale or foreign handle: the slot is skipped
      } else if (p >= 0) {
        const int r = p / C, c = p % C;
        ok = wait_word(peers, chunk_flags(peers.base[r], half) + c / B, epoch, 0, r, 6);
        if (!ok) g.halt();
        row = staging_half(peers.base[r], half, peers.staging_half_bytes) +
              static_cast<std::size_t>(c) * row_stride;
      }
      rows[g.tid] = row;
    }
    g.sync();
    if (g.stopped()) return;
    int4* out_row = reinterpret_cast<int4*>(static_cast<T*>(a.out) + static_cast<long long>(t) * a.hidden);
    for (int v = g.tid; v < vecs; v += kGroupThreads) out_row[v] = sum_rows<V>(rows, S, v);
    g.sync();  // rows[] is rewritten for the next token
  }
}

// First row of each source >= s in a rank-major y (padding rows, -1, last),
// for s in [0, R]: start[s]..start[s + 1] are the rows bound for owner s.
__device__ void rank_major_regions(const Group& g, const int* recv_src_rank, int capacity, int num_ranks,
                                   int* start) {
  for (int s = g.tid; s <= num_ranks; s += kGroupThreads) {
    int lo = 0, hi = capacity;
    while (lo < hi) {
      const int mid = (lo + hi) / 2, v = recv_src_rank[mid];
      if (v >= 0 && v < s) lo = mid + 1;
      else hi = mid;
    }
    start[s] = lo;
  }
  g.sync();
}

// Copier of the ring combine: the blocks with index % R == s push this rank's
// stream for owner s, chunk j handled by block j % (blocks per stream), in
// order. Before reusing ring slots a chunk waits until s's reducers passed
// the token of the row that last used them.
template <typename T>
__device__ void ring_stage(const Group& g, const PeerTable& peers, const CombineArgs& a, int half,
                           unsigned long long epoch, int index, int count, int reducers) {
  __shared__ int start_of[kGroupsPerBlock][kMaxRanks + 1];
  int* start = start_of[g.id];
  const int R = peers.num_ranks, me = peers.rank, B = a.chunk_rows, ring = a.ring_rows;
  rank_major_regions(g, a.recv_src_rank, a.capacity, R, start);
  const int per_stream = count / R;
  if (index >= per_stream * R) return;  // spare copier
  const int s = index % R, sub = index / R;
  const int first = start[s], rows = start[s + 1] - start[s];
  char* owner = peers.base[s];
  if (sub == 0 && g.tid == 0) {
    st_release_sys(&region_starts(owner, half)[me], serial_word(epoch, static_cast<unsigned>(first)));
  }
  const std::size_t row_bytes = static_cast<std::size_t>(a.hidden) * sizeof(T);
  const std::size_t row_stride = align_up(row_bytes, 16);
  const int vecs = static_cast<int>(row_bytes / 16);
  const char* y = static_cast<const char*>(a.y);
  char* ring_base = staging_half(owner, half, peers.staging_half_bytes) +
                    static_cast<std::size_t>(me) * ring * row_stride;
  unsigned long long* flags = ring_flags(owner, half, me);
  const unsigned long long* progress = reduce_progress(owner);
  const int warp = g.tid / 32, lane = g.tid % 32;
  unsigned int passed = 0;  // warp 0: s's reducers' progress in this call, as last read (same in every lane)
  for (int j = sub; j * B < rows; j += per_stream) {
    const int reuse = (j + 1) * B - ring;  // rows [0, reuse) must have been summed
    if (reuse > 0 && warp == 0) {
      const unsigned int need = static_cast<unsigned>(a.recv_src_token[first + reuse - 1] + 1);
      // Warp-collective poll: every lane loads a share of the progress words.
      auto ready = [&] {
        if (passed >= need) return true;
        unsigned int low = ~0u;  // a reducer not yet in this call counts as 0
        for (int b = lane; b < reducers; b += 32) low = min(low, value_in_call(ld_acquire_sys(&progress[b]), epoch));
        for (int o = 16; o > 0; o /= 2) low = min(low, __shfl_xor_sync(kFullWarpMask, low, o));
        passed = low;
        return passed >= need;
      };
      const WaitOutcome w = wait_until(ready, &reinterpret_cast<const Signals*>(peers.base[me])->abort,
                                       peers.timeout_ns,
                                       [](bool b) { return __shfl_sync(kFullWarpMask, b ? 1 : 0, 0) != 0; });
      if (w != kWaitReady && lane == 0) {
        unsigned long long at = epoch;  // the call of s's slowest reducer
        for (int b = 0; b < reducers; ++b) at = min(at, call_near(word_serial(ld_acquire_sys(&progress[b])), epoch));
        wait_failed(peers, w, s, 7, epoch, at);
        g.halt();
      }
    }
    g.sync();
    if (g.stopped()) return;
    const int r1 = min((j + 1) * B, rows);
    // Small chunks share their rows among all the group's warps.
    const int per_row = max(1, kCombineWarps / B);
    const int part = warp % per_row, stride = 32 * per_row;
    for (int i = j * B + warp / per_row; i < r1; i += kCombineWarps / per_row) {
      const int4* src = reinterpret_cast<const int4*>(y + static_cast<std::size_t>(first + i) * row_bytes);
      int4* dst = reinterpret_cast<int4*>(ring_base + static_cast<std::size_t>(i % ring) * row_stride);
      for (int v = part * 32 + lane; v < vecs; v += stride * kStageUnroll) {
        int4 val[kStageUnroll];
#pragma unroll
        for (int u = 0; u < kStageUnroll; ++u) {
          if (v + stride * u < vecs) val[u] = src[v + stride * u];
        }
#pragma unroll
        for (int u = 0; u < kStageUnroll; ++u) {
          if (v + stride * u < vecs) dst[v + stride * u] = val[u];
        }
      }
    }
    g.sync();
    if (g.tid == 0) publish(peers, &flags[j % (ring / B)], serial_word(epoch, static_cast<unsigned>(j)));
  }
}

// Reducer of the ring combine: batches of kBatchTokens consecutive tokens,
// batch index, index + count, ... in order. One wait per batch (a lane per
// (token, source)), then the whole group sums the batch's rows.
template <typename T, int kBatchTokens>
__device__ void ring_reduce(const Group& g, const PeerTable& peers, const CombineArgs& a, int half,
                            unsigned long long epoch, int index, int count) {
  using V = Vec8<T>;
  __shared__ const char* rows_of[kGroupsPerBlock][kBatchTokens * kMaxRanks];
  __shared__ int start_of[kGroupsPerBlock][kMaxRanks];
  const char** rows = rows_of[g.id];
  int* start = start_of[g.id];
  const int R = peers.num_ranks, me = peers.rank, C = a.capacity, B = a.chunk_rows, ring = a.ring_rows;
  const int num_tokens = a.num_tokens;
  char* mine = peers.base[me];
  auto* signals = reinterpret_cast<const Signals*>(mine);
  unsigned long long* progress = reduce_progress(mine);
  const std::size_t row_stride = align_up(static_cast<std::size_t>(a.hidden) * sizeof(T), 16);
  const char* rings = staging_half(mine, half, peers.staging_half_bytes);
  auto token_word = [&](long long t) {
    return serial_word(epoch, t < num_tokens ? static_cast<unsigned>(t) : 0xffffffffu);
  };
  if (g.tid == 0) st_relaxed_sys(&progress[index], token_word(static_cast<long long>(index) * kBatchTokens));
  bool ok = true;
  if (g.tid < R) {
    const int r = g.tid;
    const unsigned long long* slot = &region_starts(mine, half)[r];
    ok = wait_epoch(peers, &signals->arrived[r], epoch, r, 5) && signature_agrees(peers, 0, epoch, r, 2) &&
         wait_word(peers, slot, epoch, 0, r, 5);
    if (ok) start[r] = static_cast<int>(word_value(ld_acquire_sys(slot)));
    else g.halt();
  }
  g.sync();
  if (g.stopped()) return;
  const int vecs = a.hidden / V::kN;
  for (int t0 = index * kBatchTokens; t0 < num_tokens; t0 += count * kBatchTokens) {
    const int n = min(kBatchTokens, num_tokens - t0);
    if (g.tid < n * R) {
      const int t = t0 + g.tid / R, r = g.tid % R;
      const int p = a.send_pos[static_cast<long long>(t) * R + r];
      const char* row = nullptr;
      if (p >= 0 && (p < r * C || p >= (r + 1) * C || p - r * C < start[r])) {
        record_bad_handle(peers, 2, t, p);  // column r must name a row of rank r's stream: skipped
      } else if (p >= 0) {
        const int i = p - r * C - start[r];  // index in r's stream for this rank
        const int j = i / B;
        if (!wait_word(peers, &ring_flags(mine, half, r)[j % (ring / B)], epoch, static_cast<unsigned>(j), r, 6)) {
          g.halt();
        }
        row = rings + (static_cast<std::size_t>(r) * ring + i % ring) * row_stride;
      }
      rows[g.tid] = row;
    }
    g.sync();
    if (g.stopped()) return;
    for (int e = g.tid; e < n * vecs; e += kGroupThreads) {
      const int k = e / vecs, v = e - k * vecs;
      reinterpret_cast<int4*>(static_cast<T*>(a.out) + static_cast<long long>(t0 + k) * a.hidden)[v] =
          sum_rows<V>(rows + k * R, R, v);
    }
    g.sync();  // every read of this batch's rows has returned
    if (g.tid == 0) st_relaxed_sys(&progress[index], token_word(t0 + static_cast<long long>(count) * kBatchTokens));
  }
  if (g.tid == 0) st_relaxed_sys(&progress[index], token_word(num_tokens));
}

// Groups 0 and 1 of every block copy, groups 2 and 3 reduce.
template <typename T, int kBatchTokens>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(PeerTable peers, CombineArgs a) {
  const auto* me = reinterpret_cast<const Signals*>(peers.base[peers.rank]);
  const unsigned long long epoch = ld_volatile(&me->epoch);  // arrive_kernel counted this call
  const int half = static_cast<int>((epoch - 1) & 1ull);
  __shared__ int stop[kGroupsPerBlock];
  if (block_aborted(peers)) return;
  const int id = static_cast<int>(threadIdx.x) / kGroupThreads;
  const Group g{id, static_cast<int>(threadIdx.x) % kGroupThreads, &stop[id]};
  if (g.tid == 0) stop[id] = 0;
  g.sync();
  const bool copier = g.id < 2;
  const int index = blockIdx.x * 2 + (g.id & 1), count = gridDim.x * 2;
  if (a.layout == Layout::kRankMajor) {
    if (copier) ring_stage<T>(g, peers, a, half, epoch, index, count, count);
    else ring_reduce<T, kBatchTokens>(g, peers, a, half, epoch, index, count);
  } else {
    if (copier) combine_stage<T>(g, peers, a, half, epoch, index, count);
    else combine_reduce<T>(g, peers, a, half, epoch, index, count);
  }
}

}  // namespace

CombineLaunch combine_launch(int num_ranks, int num_sms, int chunk_rows, int ring_rows) {
  const int blocks = combine_blocks(num_ranks, num_sms);
  // Tokens per reducer batch: the tokens all reducers hold at once (reducer
  // groups x batch) bound how far ahead of the slowest one the copiers must
  // run, i.e. how much of each ring is live. About 32 keeps the rings small
  // while few reducer groups still get enough loads in flight.
  int batch = std::max(1, std::min(4, 32 / (2 * blocks)));
  // A reducer publishes its progress only after its whole batch, so the rows
  // of one batch (up to `batch` consecutive rows of a stream, the last one
  // possibly the first of its chunk) must fit in the ring together with the
  // rest of that last chunk: ring_rows >= chunk_rows + batch - 1, or the
  // copier of that chunk waits for the reducer that waits for it
  // (tests/protocol/test_ring_combine_protocol.py). Batch 1 always fits.
  while (batch > 1 && ring_rows < chunk_rows + batch - 1) batch /= 2;
  return {blocks, batch};
}

cudaError_t launch_combine(const PeerTable& peers, const CombineArgs& args, const LaunchConfig& cfg) {
  arrive_kernel<<<1, kMaxRanks, 0, cfg.stream>>>(peers);
  const CombineLaunch shape = combine_launch(peers.num_ranks, cfg.num_sms, args.chunk_rows, args.ring_rows);
  const int blocks = shape.blocks, batch = shape.batch;
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kCombineThreads, 0, cfg.stream>>>(peers, args);
  };
  switch (args.dtype) {
    case DType::kBF16:
      if (batch == 1) launch(combine_kernel<__nv_bfloat16, 1>);
      else if (batch == 2) launch(combine_kernel<__nv_bfloat16, 2>);
      else launch(combine_kernel<__nv_bfloat16, 4>);
      break;
    case DType::kF16:
      if (batch == 1) launch(combine_kernel<__half, 1>);
      else if (batch == 2) launch(combine_kernel<__half, 2>);
      else launch(combine_kernel<__half, 4>);
      break;
    case DType::kF32:
      if (batch == 1) launch(combine_kernel<float, 1>);
      else if (batch == 2) launch(combine_kernel<float, 2>);
      else launch(combine_kernel<float, 4>);
      break;
  }
  return cudaGetLastError();
}

}  // namespace intranode
}  // namespace jax_ep
