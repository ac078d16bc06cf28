// Intranode normal-mode dispatch and combine over peer-mapped memory
// (CUDA IPC between processes, peer access inside one process).
//
// Design: pull, not push. Each rank stages its tokens (and routing) once in
// its own registered buffer; after one cross-rank barrier every receiver
// computes its receive layout from the peers' staged routing and copies the
// rows it owns straight from the peers' staging into its output. Combine is
// the mirror: each rank stages the rows it computed, and each token's owner
// pulls and sums its rows. Every payload byte is read once from the source
// XLA buffer, written once to staging, read once by the peer and written once
// into the destination XLA buffer; no ring buffers, no flow control, and only
// the barrier kernel (one block) ever waits, so kernels of many ranks sharing
// one GPU cannot starve each other.
//
// Registered buffer of each rank:
//   [0, kSignalBytes)               Signals: epoch counter and one arrival
//                                   slot per peer
//   [kSignalBytes, +kWorkspaceBytes) workspace: routing prefix sums (local
//                                   only) in the first 64 KiB, then the
//                                   combine's chunk flags (read by peers)
//   then two staging halves; call n uses half (n % 2). A rank stages call n
//   only after the barrier of call n-1, which every peer passed after it
//   finished reading call n-2 (the same half), so staging is never overwritten
//   while a peer reads it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {
namespace intranode {

inline constexpr int kMaxRanks = 64;
inline constexpr int kMaxTopk = 16;
inline constexpr std::size_t kSignalBytes = 4096;
// Workspace: routing prefix sums first (local only), then the combine's
// protocol words at fixed offsets (never inside a staging half, whose contents
// depend on the shapes of earlier calls and could otherwise pass for a flag).
inline constexpr std::size_t kChunkFlagOffset = 64 * 1024;    // [2][kMaxChunks]
inline constexpr std::size_t kRingFlagOffset = 96 * 1024;     // [2][kMaxRanks][kMaxRingChunks]
inline constexpr std::size_t kProgressOffset = 128 * 1024;    // [kMaxCombineBlocks]
inline constexpr std::size_t kRegionStartOffset = 132 * 1024; // [2][kMaxRanks]
inline constexpr std::size_t kWorkspaceBytes = 144 * 1024;
inline constexpr int kMaxChunks = 2048;
inline constexpr int kMaxRingChunks = 32;
inline constexpr int kMaxCombineBlocks = 512;
inline constexpr std::size_t kAlign = 256;

__host__ __device__ inline std::size_t align_up(std::size_t v, std::size_t a) {
  return (v + a - 1) / a * a;
}

// Header of every registered buffer.
struct Signals {
  unsigned long long epoch;       // barriers this rank has entered
  unsigned long long pad[7];
  unsigned long long arrived[kMaxRanks];  // arrived[s]: latest epoch rank s reached
};

// Written by a kernel (into mapped host memory) just before it traps on a
// timeout, so the host can print a message naming the peer even though the
// CUDA context is lost.
struct TimeoutRecord {
  int code;  // 0 none, 1 barrier timeout, 2 low-latency calls out of order (peer: 0 send twice, 1 receive without send)
  int rank, peer, op;
  unsigned long long epoch, peer_epoch;
  double seconds;
};

// What a kernel needs to reach every rank's registered buffer.
struct PeerTable {
  char* base[kMaxRanks];  // base of each rank's registered buffer in this address space
  int rank;
  int num_ranks;
  std::size_t staging_half_bytes;  // bytes of one staging half
  unsigned long long timeout_ns;   // barrier wait limit
  TimeoutRecord* timeout_record;   // mapped host memory
  int gpu_scope;                   // 1: every peer's memory is on this GPU (GPU-scope fences suffice)
  const bool* rank_mask = nullptr;  // low-latency: bool [num_ranks] in device memory, true for a masked rank
};

// Operation codes of timeout records: 0 dispatch, 1 cached dispatch, 2
// combine (barriers); 3 low-latency dispatch receive, 4 low-latency combine
// receive; combine waits: 5 for a peer's call to start, 6 for a peer's rows,
// 7 for ring space.
inline const char* op_name(int op) {
  switch (op) {
    case 0: return "dispatch";
    case 1: return "cached-dispatch";
    case 2: return "combine";
    case 3: return "low-latency dispatch";
    case 4: return "low-latency combine";
    case 5: return "combine (waiting for the peer to start the call)";
    case 6: return "combine (waiting for the peer's rows)";
    case 8: return "low-latency combine (waiting for the peer to finish reading this rank's rows)";
    default: return "combine (waiting for the peer's sums to free ring space)";
  }
}

#ifdef __CUDACC__
// A wait gave up: leave a record for the host's watcher (the first one
// wins), give it time to print, then trap (the CUDA context is lost anyway).
__device__ __forceinline__ void fail(const PeerTable& peers, int code, int peer, int op,
                                     unsigned long long epoch, unsigned long long peer_epoch) {
  TimeoutRecord* rec = peers.timeout_record;
  if (atomicCAS(&rec->code, 0, code) == 0) {
    rec->rank = peers.rank;
    rec->peer = peer;
    rec->op = op;
    rec->epoch = epoch;
    rec->peer_epoch = peer_epoch;
    rec->seconds = peers.timeout_ns * 1e-9;
    __threadfence_system();
  }
  long long noticed;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(noticed));
  for (long long now = noticed; now - noticed < 500000000ll;) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  }
  __trap();
}

__device__ __forceinline__ void fail_wait(const PeerTable& peers, int peer, int op,
                                          unsigned long long epoch, unsigned long long peer_epoch) {
  fail(peers, 1, peer, op, epoch, peer_epoch);
}
#endif

__host__ __device__ inline char* staging_half(char* base, int half, std::size_t half_bytes) {
  return base + kSignalBytes + kWorkspaceBytes + static_cast<std::size_t>(half) * half_bytes;
}

// Offsets inside one staging half for a dispatch of T tokens, K slots, R
// ranks, E experts and rows of `row_bytes` bytes. Identical on every rank
// (shapes are the same everywhere).
struct DispatchStaging {
  std::size_t cnt_rank, cnt_expert, topk_idx, topk_weights, local_idx, slot_idx, rows;
  std::size_t row_stride, total;

  __host__ __device__ static DispatchStaging make(int T, int K, int R, int E,
                                                  std::size_t row_bytes) {
    DispatchStaging s{};
    std::size_t o = 0;
    s.cnt_rank = o;     o = align_up(o + sizeof(int) * R, kAlign);
    s.cnt_expert = o;   o = align_up(o + sizeof(int) * E, kAlign);
    s.topk_idx = o;     o = align_up(o + sizeof(int) * T * K, kAlign);
    s.topk_weights = o; o = align_up(o + sizeof(float) * T * K, kAlign);
    s.local_idx = o;    o = align_up(o + sizeof(int) * T * R, kAlign);
    s.slot_idx = o;     o = align_up(o + sizeof(int) * T * K, kAlign);
    s.row_stride = align_up(row_bytes, 16);
    s.rows = o;         o = align_up(o + s.row_stride * T, kAlign);
    s.total = o;
    return s;
  }
};

__host__ __device__ inline unsigned long long* workspace_words(char* base, std::size_t offset) {
  return reinterpret_cast<unsigned long long*>(base + kSignalBytes + offset);
}
// Full-staging combine: flag of chunk k of a rank's staging (value: epoch).
__host__ __device__ inline unsigned long long* chunk_flags(char* base, int half) {
  return workspace_words(base, kChunkFlagOffset) + static_cast<std::size_t>(half) * kMaxChunks;
}
// Ring combine, all in the owner's buffer: flag of each ring chunk of the
// ring from `source` (value: epoch << 32 | chunk index), ...
__host__ __device__ inline unsigned long long* ring_flags(char* base, int half, int source) {
  return workspace_words(base, kRingFlagOffset) +
         (static_cast<std::size_t>(half) * kMaxRanks + source) * kMaxRingChunks;
}
// ... the next token each of the owner's reducer blocks will sum (epoch << 32 | token), ...
__host__ __device__ inline unsigned long long* reduce_progress(char* base) {
  return workspace_words(base, kProgressOffset);
}
// ... and where the owner's rows start in each source's y (epoch << 32 | row).
__host__ __device__ inline unsigned long long* region_starts(char* base, int half) {
  return workspace_words(base, kRegionStartOffset) + static_cast<std::size_t>(half) * kMaxRanks;
}

// Staging of a combine (or any pull of C rows of `row_bytes`).
struct RowStaging {
  std::size_t row_stride, total;
  __host__ __device__ static RowStaging make(int C, std::size_t row_bytes) {
    RowStaging s{};
    s.row_stride = align_up(row_bytes, 16);
    s.total = align_up(s.row_stride * C, kAlign);
    return s;
  }
};

enum class Layout : int { kRankMajor = 0, kExpertMajor = 1 };
enum class DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

// One row payload of up to two parts (e.g. FP8 values and their scales):
// part p of token t is at parts[p] + t * part_bytes[p]. Part sizes are
// multiples of 16 bytes (checked by the handler) so rows copy as int4.
struct RowParts {
  const char* src[2];
  char* dst[2];
  int part_bytes[2];
  int num_parts;
  __host__ __device__ int row_bytes() const {
    return part_bytes[0] + (num_parts > 1 ? part_bytes[1] : 0);
  }
};

// Launch parameters shared by the kernels of one call.
struct LaunchConfig {
  int num_blocks;         // SM budget of the copy kernels (blocks)
  cudaStream_t stream;
  int num_sms = 0;        // SM budget (kernels that spin take one block per SM)
};

// Dispatch outputs (all device pointers; C rows).
struct DispatchOutputs {
  int* recv_topk_idx;        // [C, K]
  float* recv_topk_weights;  // [C, K]
  int* num_recv_per_expert;  // [E/R]
  int* expert_group_sizes;   // [E/R] (expert-major; may be null otherwise)
  int* num_kept;             // []
  int* num_needed;           // []
  int* recv_src_rank;        // [C]
  int* recv_src_token;       // [C]
  bool* is_token_in_rank;    // [T, R]
  int* send_pos;             // [T, S]: dst_rank * C + row, or -1 (S = R or K)
};

struct DispatchArgs {
  const int* topk_idx;        // [T, K]
  const float* topk_weights;  // [T, K]
  int num_tokens, num_topk, num_experts, capacity, expert_alignment;
  Layout layout;
};

// Full dispatch: stage routing and rows, barrier, route, pull rows.
cudaError_t launch_dispatch(const PeerTable& peers, const DispatchArgs& args,
                            const RowParts& parts, const DispatchOutputs& out,
                            const LaunchConfig& cfg);

// Dispatch of new rows along a handle's routing: stage, barrier, pull.
// parts.dst rows are [C]; recv_src_* come from the handle.
cudaError_t launch_cached_dispatch(const PeerTable& peers, int num_tokens, int capacity,
                                   const int* recv_src_rank, const int* recv_src_token,
                                   const RowParts& parts, const LaunchConfig& cfg);

// Combine: out [T, H] = sum over columns j with send_pos[t, j] >= 0 of the
// row send_pos names (rank p / C, row p % C of that rank's y [C, H]), in
// float32 (column order, so every rank sums alike).
//
// One kernel moves and sums at once: half of its blocks (copiers) move rows,
// the other half (reducers) sum tokens, waiting for per-chunk flags.
//
// Rank-major layout: a ring per (source, owner) pair. The rows of y bound for
// owner s form a contiguous stream (sorted by token); copiers of each stream
// push it in chunks of `chunk_rows` rows into a ring of `ring_rows` rows in
// s's buffer and flag each chunk; s's reducers take tokens in order, sum the
// rows straight out of the rings and publish how far they got, which is
// what lets a copier reuse ring slots. The rings stay in L2: every payload
// byte is read once from y and the sums are written once to out.
//
// Expert-major layout: copiers stage every row in this rank's staging and
// flag it per chunk; reducers read the rows there.
//
// Why it cannot deadlock (every block of every rank resident, R x blocks
// within the GPU): let t be the smallest token any reducer is waiting on. Its
// rows' chunks are each handled by a copier that processes its stream's
// chunks in order, and a copier waits only for reducers to pass tokens that
// precede its chunk's rows by a whole ring, i.e. tokens < t: all passed.
struct CombineArgs {
  const void* y;           // [C, H]
  const int* recv_src_rank;   // [C]
  const int* recv_src_token;  // [C]
  const int* send_pos;        // [T, S]
  void* out;                 // [T, H]
  int capacity, hidden, num_tokens, num_send_cols;
  int chunk_rows;  // rows per flag (expert-major: raised so that C / chunk_rows <= kMaxChunks)
  int ring_rows;   // rank-major: rows of each (source, owner) ring, a multiple of chunk_rows
  Layout layout;
  DType dtype;
};

cudaError_t launch_combine(const PeerTable& peers, const CombineArgs& args, const LaunchConfig& cfg);

// Rows per chunk flag actually used for a combine of `capacity` rows.
inline int combine_chunk_rows(int capacity, int requested) {
  const int minimum = (capacity + kMaxChunks - 1) / kMaxChunks;
  return requested > minimum ? requested : (minimum > 1 ? minimum : 1);
}

// One cross-rank barrier (the one every dispatch runs): each rank announces
// its next epoch to every peer and waits for theirs.
cudaError_t launch_barrier(const PeerTable& peers, int op, cudaStream_t stream);

// Bytes of one staging half needed by the calls of these shapes.
std::size_t dispatch_staging_bytes(int T, int K, int R, int E, std::size_t row_bytes);
std::size_t row_staging_bytes(int C, std::size_t row_bytes);

}  // namespace intranode
}  // namespace jax_ep
