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
// Registered buffer of each rank (cuda/workspace.cuh has the map): the
// signal block (epoch counter, one arrival slot per peer, the abort word and
// the call signatures, docs/faults.md), the workspace (routing prefix sums,
// local only, then the combine's flags, read by peers), then two staging
// halves; call n uses half (n % 2). A rank stages call n only after the
// barrier of call n-1, which every peer passed after it finished reading call
// n-2 (the same half), so staging is never overwritten while a peer reads it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#include "serial.cuh"
#include "sync.cuh"
#endif
#include "workspace.cuh"

namespace jax_ep {
namespace intranode {

inline constexpr int kMaxTopk = 16;

__host__ __device__ inline std::size_t align_up(std::size_t v, std::size_t a) {
  return (v + a - 1) / a * a;
}

// What a communicating call is, as every rank must agree on it: the host
// fills the fields from the call's static shapes and attributes (a field
// that does not apply is 0) and hashes them. A rank publishes the hash to
// every peer beside its arrival flag and its fields in its own header; a
// peer that acquired the flag compares the hash (one store and one compare
// per peer per call) and, on a difference, reads the fields to name the
// first one that differs.
inline constexpr int kSigFields = 12;
enum SigField : int {
  kSigOp = 0,        // which call (op codes of timeout records)
  kSigTokens,        // T (intranode ops; 0 in low-latency ones, where it may differ)
  kSigRows,          // C (intranode) or M (low-latency)
  kSigRowBytes,      // bytes of one payload row
  kSigTopk,          // K
  kSigExperts,       // E
  kSigSms,           // SM budget (num_sms)
  kSigChunkRows,     // combine chunk rows
  kSigRingRows,      // combine ring rows
  kSigLayout,        // 0 rank-major, 1 expert-major
  kSigDtype,         // dtype or low-latency payload
  kSigMode,          // per op: expert_alignment (dispatch), pulled (LL dispatch), FP8 rows (LL combine)
};
struct CallSignature {
  unsigned int field[kSigFields];
  unsigned long long hash;  // FNV-1a of the fields; 0: no signature (not checked)
};

__host__ __device__ inline unsigned long long signature_hash(const unsigned int* field) {
  unsigned long long h = 1469598103934665603ull;
  for (int i = 0; i < kSigFields; ++i) {
    for (int b = 0; b < 4; ++b) {
      h ^= (field[i] >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  return h | 1ull;  // never 0
}

// Signature slots: kind 0 the intranode epoch, 1 low-latency dispatch, 2
// low-latency combine; each kind alternates two slots by call parity (a peer
// reaches call n + 2, which would reuse a slot, only after this rank
// arrived at call n + 1, i.e. after it finished reading call n's).
inline constexpr int kSigKinds = 3;

// Header of every registered buffer.
struct Signals {
  unsigned long long epoch;       // barriers this rank has entered
  unsigned long long pad[7];
  unsigned long long arrived[kMaxRanks];  // arrived[s]: latest epoch rank s reached
  // Nonzero once any rank failed: (what << 32) | (failing rank + 1), written
  // by the failing rank into every rank's header and polled by every wait.
  // Never cleared: the buffer is unusable until re-created.
  unsigned long long abort;
  unsigned long long pad2[7];
  unsigned long long sig_hash[kSigKinds][2][kMaxRanks];  // written by rank s into [.][.][s]
  CallSignature sig_fields[kSigKinds][2];                // this rank's own, read by peers
};
static_assert(sizeof(Signals) <= kSignalBytes, "Signals must fit the signal block");

// What went wrong (TimeoutRecord::code; the abort word's `what`).
enum FailCode : int {
  kFailNone = 0,
  kFailTimeout = 1,   // a wait gave up on `peer`
  kFailOrder = 2,     // low-latency calls out of order (peer: 0 send twice, 1 receive without send)
  kFailMismatch = 3,  // `peer` made a different call (mine / theirs: the signatures)
  kFailAborted = 4,   // another rank failed first (`peer`: that rank, peer_epoch: its code)
  kFailBadHandle = 5, // a handle's index out of range (epoch: the row, peer_epoch: the index)
};

// Written by a kernel (into mapped host memory) when a wait fails, before
// it returns; the host turns it into the message of a jax_ep error.
struct TimeoutRecord {
  int code;  // FailCode
  int rank, peer, op;
  unsigned long long epoch, peer_epoch;
  double seconds;
  unsigned int mine[kSigFields], theirs[kSigFields];  // kFailMismatch
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
  CallSignature call;              // the call's signature (set by its handler; hash 0: unchecked)
  const bool* rank_mask = nullptr;  // low-latency: bool [num_ranks] in device memory, true for a masked rank
};

// Operation codes of timeout records: 0 dispatch, 1 cached dispatch, 2
// combine (barriers); 3 low-latency dispatch receive, 4 low-latency combine
// receive; combine waits: 5 for a peer's call to start, 6 for a peer's rows,
// 7 for ring space; internode (cuda/internode.cuh): 10/11 dispatch and
// 12/13 combine waits on a rank of the rail / of the node.
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
    case 10: return "internode dispatch (waiting for a rank of the rail)";
    case 11: return "internode dispatch (waiting for a rank of the node)";
    case 12: return "internode combine (waiting for a rank of the rail)";
    case 13: return "internode combine (waiting for a rank of the node)";
    default: return "combine (waiting for the peer's sums to free ring space)";
  }
}

#ifdef __CUDACC__
// Whether this rank neither writes to nor waits for rank r this call (a
// low-latency call with a rank mask): r is masked (failed), or this rank is,
// which then talks to nobody. Read from the call's rank mask in device
// memory, so the host changes it between calls. Nothing of a call touches a
// skipped rank's memory: not its data, flags or signature, nor the abort
// word (a failed rank's memory may be gone; a masked rank that fails must
// not stop the others).
__device__ __forceinline__ bool skipped(const PeerTable& p, int r) {
  return p.rank_mask != nullptr && (p.rank_mask[r] || p.rank_mask[p.rank]);
}

// Tell every rank (this one too) that `peers.rank` failed: a plain store of
// the abort word in each header (the first failure is what each keeps).
// Ranks skipped in this call are not told (this one always is).
__device__ __forceinline__ void raise_abort(const PeerTable& peers, int code) {
  const unsigned long long word = static_cast<unsigned long long>(code) << 32 |
                                  static_cast<unsigned long long>(peers.rank + 1);
  __threadfence_system();
  for (int r = 0; r < peers.num_ranks; ++r) {
    if (r != peers.rank && skipped(peers, r)) continue;
    auto* w = &reinterpret_cast<Signals*>(peers.base[r])->abort;
    if (ld_volatile(w) == 0) *reinterpret_cast<volatile unsigned long long*>(w) = word;
  }
  __threadfence_system();
}

// Fill `rec` unless a record is there already (the first failure wins).
// Not inlined, and given no PeerTable (whose address would copy it to local
// memory): a cold path, kept out of the waiting kernels' registers.
inline __device__ __noinline__ void record_failure(TimeoutRecord* rec, int code, int rank, int peer, int op,
                                                   unsigned long long epoch, unsigned long long peer_epoch,
                                                   unsigned long long timeout_ns, const CallSignature* mine,
                                                   const CallSignature* theirs) {
  if (atomicCAS(&rec->code, 0, -1) != 0) return;
  rec->rank = rank;
  rec->peer = peer;
  rec->op = op;
  rec->epoch = epoch;
  rec->peer_epoch = peer_epoch;
  rec->seconds = timeout_ns * 1e-9;
  for (int i = 0; i < kSigFields; ++i) {
    rec->mine[i] = mine != nullptr ? mine->field[i] : 0u;
    rec->theirs[i] = theirs != nullptr ? theirs->field[i] : 0u;
  }
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&rec->code) = code;  // last: the host reads a whole record
  __threadfence_system();
}

// A call failed here: leave a record for the host and, unless a peer's
// abort is what stopped it, raise the abort in every rank. The caller then
// returns; so do the call's later kernels (`aborted`). A mismatch passes
// both signatures (this rank's, as published in its own header, and the
// peer's).
__device__ __forceinline__ void fail(const PeerTable& peers, int code, int peer, int op,
                                     unsigned long long epoch, unsigned long long peer_epoch,
                                     const CallSignature* mine = nullptr, const CallSignature* theirs = nullptr) {
  record_failure(peers.timeout_record, code, peers.rank, peer, op, epoch, peer_epoch, peers.timeout_ns, mine, theirs);
  if (code != kFailAborted) raise_abort(peers, code);
}

// A handle (routing a kernel reads: source ranks, tokens, rows) names a rank
// or row out of range (a stale or foreign handle): record it and raise the
// abort; the caller skips the row, touching no peer memory for it.
__device__ __forceinline__ void record_bad_handle(const PeerTable& peers, int op, long long row, long long index) {
  fail(peers, kFailBadHandle, -1, op, static_cast<unsigned long long>(row), static_cast<unsigned long long>(index));
}

// Whether any rank failed (this buffer is then dead): kernels of a call
// check it on entry and return without touching peers or outputs. The first
// kernel of this rank to notice records who raised it (unless this rank
// recorded a failure already), so the host learns it even where no wait ran.
__device__ __forceinline__ bool aborted(const PeerTable& peers) {
  const unsigned long long word = ld_volatile(&reinterpret_cast<const Signals*>(peers.base[peers.rank])->abort);
  if (word == 0) return false;
  if (*reinterpret_cast<volatile int*>(&peers.timeout_record->code) == 0) {
    fail(peers, kFailAborted, static_cast<int>(word & 0xffffffffull) - 1, -1, 0, word >> 32);
  }
  return true;
}

// `aborted` decided once for the whole block (thread 0 reads, all see its
// answer): for kernels whose threads meet at block barriers later.
__device__ __forceinline__ bool block_aborted(const PeerTable& peers) {
  __shared__ int seen;
  if (threadIdx.x == 0) seen = aborted(peers) ? 1 : 0;
  __syncthreads();
  return seen != 0;
}

// A wait ended without its flag: record why (a timeout on `peer`, or the
// abort a peer raised) and raise the abort. False; true when ready.
__device__ __forceinline__ bool wait_failed(const PeerTable& peers, WaitOutcome outcome, int peer, int op,
                                            unsigned long long expected, unsigned long long seen) {
  if (outcome == kWaitReady) return false;
  if (outcome == kWaitAborted) {
    const unsigned long long word = ld_volatile(&reinterpret_cast<const Signals*>(peers.base[peers.rank])->abort);
    fail(peers, kFailAborted, static_cast<int>(word & 0xffffffffull) - 1, op, expected, word >> 32);
  } else {
    fail(peers, kFailTimeout, peer, op, expected, seen);
  }
  return true;
}

// Wait until *flag >= `expected` (acquire); false when the wait failed
// (recorded, abort raised): the caller stops.
__device__ __forceinline__ bool wait_at_least(const PeerTable& peers, const unsigned long long* flag,
                                              unsigned long long expected, int peer, int op) {
  unsigned long long v = 0;
  const WaitOutcome w = wait_until([&] { return (v = ld_acquire_sys(flag)) >= expected; },
                                   &reinterpret_cast<const Signals*>(peers.base[peers.rank])->abort,
                                   peers.timeout_ns);
  return !wait_failed(peers, w, peer, op, expected, v);
}

// Wait until *flag holds call `call`'s word with a value of at least `value`
// (serial.cuh); false when the wait failed (recorded, abort raised).
__device__ __forceinline__ bool wait_word(const PeerTable& peers, const unsigned long long* flag,
                                          unsigned long long call, unsigned int value, int peer, int op) {
  unsigned long long v = 0;
  const WaitOutcome w = wait_until([&] { return word_reached(v = ld_acquire_sys(flag), call, value); },
                                   &reinterpret_cast<const Signals*>(peers.base[peers.rank])->abort,
                                   peers.timeout_ns);
  return !wait_failed(peers, w, peer, op, call, call_near(word_serial(v), call));
}

// Signature check after acquiring peer `s`'s flag of call `n` of `kind`:
// false (recorded, abort raised) when s made a different call.
__device__ __forceinline__ bool signature_agrees(const PeerTable& peers, int kind, unsigned long long n, int s,
                                                 int op) {
  if (peers.call.hash == 0) return true;
  const int slot = static_cast<int>(n & 1ull);
  const auto* me = reinterpret_cast<const Signals*>(peers.base[peers.rank]);
  const unsigned long long theirs = ld_volatile(&me->sig_hash[kind][slot][s]);
  if (theirs == peers.call.hash) return true;
  fail(peers, kFailMismatch, s, op, n, theirs, &me->sig_fields[kind][slot],
       &reinterpret_cast<const Signals*>(peers.base[s])->sig_fields[kind][slot]);
  return false;
}

// Publish this rank's signature of call `n` of `kind`: its fields in its own
// header (thread of `publish_fields`), its hash in peer `s`'s header (not
// in a skipped peer's). Before the release of the arrival flag that
// publishes the call.
__device__ __forceinline__ void publish_signature(const PeerTable& peers, int kind, unsigned long long n, int s,
                                                  bool publish_fields) {
  if (peers.call.hash == 0) return;
  const int slot = static_cast<int>(n & 1ull);
  if (publish_fields) reinterpret_cast<Signals*>(peers.base[peers.rank])->sig_fields[kind][slot] = peers.call;
  if (skipped(peers, s)) return;
  reinterpret_cast<Signals*>(peers.base[s])->sig_hash[kind][slot][peers.rank] = peers.call.hash;
}
#endif

__host__ __device__ inline char* staging_half(char* base, int half, std::size_t half_bytes) {
  return base + workspace::kStagingOffset + static_cast<std::size_t>(half) * half_bytes;
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
// Protocol words of the combine are serial words (serial.cuh): the epoch's
// serial and a value.
// Full-staging combine: flag of chunk k of a rank's staging (serial_word(epoch, 0)).
__host__ __device__ inline unsigned long long* chunk_flags(char* base, int half) {
  return workspace_words(base, workspace::kChunkFlags) + static_cast<std::size_t>(half) * kMaxChunks;
}
// Ring combine, all in the owner's buffer: flag of each ring chunk of the
// ring from `source` (serial_word(epoch, chunk index)), ...
__host__ __device__ inline unsigned long long* ring_flags(char* base, int half, int source) {
  return workspace_words(base, workspace::kRingFlags) +
         (static_cast<std::size_t>(half) * kMaxRanks + source) * kMaxRingChunks;
}
// ... the next token each of the owner's reducer blocks will sum (serial_word(epoch, token)), ...
__host__ __device__ inline unsigned long long* reduce_progress(char* base) {
  return workspace_words(base, workspace::kProgress);
}
// ... and where the owner's rows start in each source's y (serial_word(epoch, row)).
__host__ __device__ inline unsigned long long* region_starts(char* base, int half) {
  return workspace_words(base, workspace::kRegionStarts) + static_cast<std::size_t>(half) * kMaxRanks;
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
// Why it does not deadlock (every block of every rank resident, R x blocks
// within the GPU, and ring_rows >= chunk_rows + batch - 1, which
// combine_launch ensures by shrinking the batch): a reducer publishes its
// progress only after its whole batch, so let t0 be the first token of the
// earliest unfinished batch; every token < t0 is summed. That batch's rows in
// one stream are at most `batch` consecutive rows i0..i1, rows < i0 belong
// to tokens < t0. The copier of i1's chunk j (and of its own earlier chunks)
// waits only for rows < (j + 1) * chunk_rows - ring_rows <= i1 - batch + 1 <= i0
// to be summed: done. So the batch's chunks all arrive and t0 moves on. With
// a smaller ring the copier waits for a row of the very batch that waits for
// it (the executable model: tests/protocol/ring_combine.py).
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

// Blocks of a combine (one per SM of the budget, at least one copier per
// ring). They spin, so every block of every rank on a GPU must be resident
// at once: blocks x ranks on the GPU <= its SMs (checked by the handler).
inline int combine_blocks(int num_ranks, int num_sms) {
  const int want = (num_ranks + 1) / 2 > num_sms ? (num_ranks + 1) / 2 : num_sms;
  return want < kMaxCombineBlocks / 2 ? want : kMaxCombineBlocks / 2;
}

// Launch shape of the combine kernel: blocks per rank (copiers and reducers
// are 2 * blocks each) and tokens per reducer batch (1, 2 or 4).
struct CombineLaunch {
  int blocks, batch;
};
CombineLaunch combine_launch(int num_ranks, int num_sms, int chunk_rows, int ring_rows);

// Rows per chunk flag actually used for a combine of `capacity` rows.
inline int combine_chunk_rows(int capacity, int requested) {
  const int minimum = (capacity + kMaxChunks - 1) / kMaxChunks;
  return requested > minimum ? requested : (minimum > 1 ? minimum : 1);
}

// Status of this rank's buffer into out s32[4], on `stream` after the calls
// before it: {code (FailCode: 0 ok, 1 timeout, 2 calls out of order, 3
// mismatch, 4 aborted), the rank at fault (the peer waited for or that
// differed, the rank that raised the abort; -1 when ok), this rank, op (-1
// when ok or unknown)}.
cudaError_t launch_read_status(const PeerTable& peers, int* out, cudaStream_t stream);

// One cross-rank barrier (the one every dispatch runs): each rank announces
// its next epoch to every peer and waits for theirs.
cudaError_t launch_barrier(const PeerTable& peers, int op, cudaStream_t stream);

// Bytes of one staging half needed by the calls of these shapes.
std::size_t dispatch_staging_bytes(int T, int K, int R, int E, std::size_t row_bytes);
std::size_t row_staging_bytes(int C, std::size_t row_bytes);

}  // namespace intranode
}  // namespace jax_ep
