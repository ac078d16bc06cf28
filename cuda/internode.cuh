// Internode normal-mode dispatch and combine (docs/internode.md): ranks in
// N nodes of L, RDMA traffic only along a rail (same local index), NVLink
// inside a node, through the transport seam (transport.cuh: stores for the
// peers of this rank's node, NVSHMEM puts for the rest).
//
// The two legs, per call (every rank is a source, a forwarder and a
// destination at once):
//
//   dispatch  notify: each source puts a count message to the forwarder of
//             its rail on every node (its per-node, per-channel token counts,
//             and its per-rank and per-expert counts of that node's ranks);
//             metas: each source puts each token's meta (token, source rank,
//             64-bit rank mask, top-k ids and weights) once to every node it
//             goes to, into the forwarder's meta table at row (tokens of
//             earlier source nodes of the rail) + (its index in the source's
//             stream); after node barrier A each destination reads the meta
//             tables of its node's forwarders and places the rows that name
//             it by the flat rule (docs/semantics.md);
//             rows: through the rings (internode_pipeline.cu), each straight
//             from the forwarder's receive ring into its destinations'
//             outputs; node barrier B ends the reads.
//   combine   each rank sends its rows of each forwarder's tokens through
//             NVLink rings to the forwarder, which sums the node's rows of a
//             token (float32, rounded to y's dtype) into an RDMA ring back to
//             the token's source, which sums one partial per node
//             (internode_combine.cu).
//
// Rows move through bounded rings (docs/internode.md, "Rings and flow
// control"): the RDMA leg of each (channel, source, forwarder) stream goes in
// chunks through a send ring here and a receive ring on the forwarder, with
// per-chunk flags and credits; a dispatch's NVLink leg is the node's ranks
// reading the forwarder's receive ring (each row straight into its output),
// a combine's goes through NVLink rings to the forwarder. Only the tokens'
// small metas are staged whole (the placement needs all of them), so the
// buffer is the rings, the metas and the placements, not the rows.
// internode_ring.cuh has the ring words; tests/protocol/internode_ring.py
// models the pipeline.
//
// Reuse (every call; tests/protocol/internode_calls.py): calls alternate
// between two halves (call % 2). Every call has a rail exchange in which
// each rank signals and waits for every rank of its rail (a dispatch's
// notify; a cached dispatch's or a combine's handle_meet), and a node
// barrier pair (A: data ready; B: reads done) in which each rank signals and
// waits for every rank of its node; a rank reads its node peers' memory
// between A and B (and, in dispatch_finish, their placements after B). So a
// peer writes half h of call n + 2 only after this rank signalled it in call
// n + 1, i.e. after this rank's call n ended, and this rank's call n ended
// only after its node peers passed barrier B of call n. The reads after B
// are safe too, although each op lays its half out differently (a later
// call's writes may land on any region): a rank ends call n + 1 only after
// every rank entered it (its node's barrier A follows each node rank's rail
// wait), so no write of call n + 2 lands before every rank left call n. A
// stream that carries no rows orders nothing between its two ends, which is
// why the rail exchange cannot be left to the rows. Puts read their source
// (this rank's send ring and staged metas) until delivered; a ring slot is
// refilled only after its chunk's credit, i.e. after the receiver read it,
// and the metas are rewritten two calls later, after their receivers
// signalled call n + 1. Rail signal words count arrivals (transport.cuh) and
// are reset by their reader at the end of the call; node flags are monotonic
// call numbers; the ring words carry call tags and are never reset.
//
// Faults (docs/faults.md): every wait goes through sync.cuh's wait_until
// with the abort word; a failed wait records (code, rank, peer, op, call) in
// the buffer's record, raises the abort in every rank and returns; every
// kernel returns at entry once the abort is raised. Every node barrier
// compares the call's signature (Shape::signature) with the node's ranks,
// and a dispatch's rail messages carry it to the rail's: a rank that made a
// different call is named (kFailMismatch). The buffer is a put-path buffer
// (xla_ffi/ll_put_buffers.h) and shares its Control header.
//
// These kernels link NVSHMEM device code: they live in jax_ep._nvshmem.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "intranode.cuh"
#include "ll_put.cuh"
#include "sync.cuh"
#include "transport.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace internode {

using intranode::align_up;

inline constexpr int kMaxRanks = transport::kMaxPeers;  // 64: the source meta's rank mask is a uint64
inline constexpr int kMaxLocal = 8;                      // ranks per node
inline constexpr int kMaxExperts = 2048;                 // shared-memory counters of the notify kernel
inline constexpr int kMaxLocalExperts = 1024;            // shared-memory counters of the expert-major placement
inline constexpr int kMaxTopk = intranode::kMaxTopk;
inline constexpr int kMaxChannels = 12;    // jax_ep.internode_config.MAX_CHANNELS
inline constexpr int kMaxRingChunks = 16;  // chunks per RDMA ring: its flags and counters are fixed arrays
static_assert(kMaxRanks <= 64, "the source meta's rank mask is one uint64");

// Header of the buffer: ll_put::Control (abort word, the call counter in
// Control::dispatch_call), the rail signal words and node flags, then the
// ring words of each half (RingWords), at offsets that no op or shape
// changes: a tagged word read by a later call holds an older call's tag,
// never the bytes of another op's rows.
enum RailKind : int { kRailNotify = 0, kRailRows = 1, kRailPartials = 2, kRailKinds = 3 };
inline constexpr std::size_t kRailWordsOffset = ll_put::kControlBytes;  // u64 [2][kRailKinds][kMaxRanks]
inline constexpr std::size_t kNodeFlagsOffset = kRailWordsOffset + 2 * kRailKinds * kMaxRanks * 8;  // u64 [2][kMaxLocal]
inline constexpr std::size_t kNodeSigOffset = kNodeFlagsOffset + 2 * kMaxLocal * 8;  // u64 [2][kMaxLocal]
// A call along a handle (cached dispatch, combine) sends its signature with
// its rail exchange: u64 [2][kMaxRanks] slots by source node (16 bytes
// each), and this rank's own staged copy [2] (the put's source).
inline constexpr std::size_t kRailSigOffset = kNodeSigOffset + 2 * kMaxLocal * 8;
inline constexpr std::size_t kRailSigStageOffset = kRailSigOffset + 2 * kMaxRanks * 16;
inline constexpr std::size_t kRingWordsOffset = 8192;
static_assert(kRailSigStageOffset + 2 * 16 <= kRingWordsOffset, "header overflow");
static_assert(offsetof(ll_put::Control, abort) + 8 <= ll_put::kControlBytes, "Control must fit its block");

// The ring words of one half (docs/internode.md). A tag is (call + 1) << 32
// | value: chunk flags carry k + 1 of chunk k, heads and tails a row count;
// a reader compares the call part for equality, so a word of an older call
// reads as nothing yet.
struct RingWords {
  // RDMA chunk flags, in the receiving rank: [channel][sending node][chunk slot].
  unsigned long long flag[kMaxChannels][kMaxRanks][kMaxRingChunks];
  // Dispatch: receivers' heads of each stream, in the forwarder: [channel][source node][receiver].
  unsigned long long head[kMaxChannels][kMaxRanks][kMaxLocal];
  // Combine NVLink rings: tails in the forwarder [channel][sender], heads in the sender [channel][forwarder].
  unsigned long long nvl_tail[kMaxChannels][kMaxLocal];
  unsigned long long nvl_head[kMaxChannels][kMaxLocal];
  // RDMA credits, in the sending rank: [channel][receiving node], cumulative over every call of this
  // half (signal adds of whole chunks); base: the tokens of the calls before this one (this rank's).
  unsigned long long credit[kMaxChannels][kMaxRanks];
  unsigned long long base[kMaxChannels][kMaxRanks];
  // This rank's chunk counters (rows written / consumed per chunk slot); each returns to 0 when its
  // chunk is issued / credited.
  int filled[kMaxChannels][kMaxRanks][kMaxRingChunks];
  int consumed[kMaxChannels][kMaxRanks][kMaxRingChunks];
};
inline constexpr std::size_t kHeaderBytes = kRingWordsOffset + 2 * sizeof(RingWords);
static_assert(sizeof(RingWords) % 16 == 0, "ring words keep 16-byte alignment");

__host__ __device__ inline std::size_t ring_words_offset(int half) {
  return kRingWordsOffset + static_cast<std::size_t>(half) * sizeof(RingWords);
}

// Source meta of a token in a forwarder's table (16 bytes).
struct Meta {
  int token;                    // index among the source's tokens
  int src_rank;
  unsigned long long rank_mask;  // bit r: rank r needs the token (get_dispatch_layout's is_token_in_rank)
};
static_assert(sizeof(Meta) == 16, "Meta is one int4");

enum class Op : int { kDispatch = 0, kCachedDispatch = 1, kCombine = 2 };
enum class DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

// Failure-record op codes (intranode::op_name has their text).
inline constexpr int kOpDispatchRail = 10;
inline constexpr int kOpDispatchNode = 11;
inline constexpr int kOpCombineRail = 12;
inline constexpr int kOpCombineNode = 13;

// The static shapes of one call; fields an op does not use are 0.
struct Shape {
  Op op;
  int num_tokens;      // T
  int num_topk;        // K (dispatch only: 0 carries no meta)
  int num_experts;     // E
  int num_nodes;       // N
  int ranks_per_node;  // L
  int node_capacity;   // Cn, rows of a forwarder's table
  int capacity;        // C, output rows per rank
  int row_bytes;       // payload bytes of one row (a multiple of 16): dispatch parts together, or y's row
  int cols;            // combine: elements of one row (float32 partials of cols * 4 bytes)
  int layout = 0;      // dispatch: 0 rank-major, 1 expert-major
  int alignment = 1;   // dispatch, expert-major: groups start at multiples of this
  // The rings (jax_ep.internode_config.resolve_internode): channels, tokens per RDMA chunk and
  // ring (ring % chunk == 0, ring / chunk <= kMaxRingChunks), per NVLink chunk and ring (combine).
  int channels = 1;
  int rdma_chunk = 1;
  int rdma_ring = 1;
  int nvl_chunk = 1;
  int nvl_ring = 1;

  __host__ __device__ int num_ranks() const { return num_nodes * ranks_per_node; }
  __host__ __device__ int local_experts() const { return num_ranks() > 0 ? num_experts / num_ranks() : 0; }
  // Output rows per table row and destination: 1 rank-major, K expert-major
  // (one per top-k slot; the first slot naming a local expert holds its row).
  __host__ __device__ int slots() const { return layout == 1 ? num_topk : 1; }
  // Tokens per channel: channel c holds tokens [c * Tc, min((c + 1) * Tc, T)).
  __host__ __device__ int channel_tokens() const { return channels > 0 ? (num_tokens + channels - 1) / channels : 0; }
  __host__ __device__ int ring_chunks() const { return rdma_chunk > 0 ? rdma_ring / rdma_chunk : 0; }
  // What every rank of a call must agree on (FNV-1a of the fields, never 0):
  // compared at every node barrier and, in a dispatch, in every rail message.
  __host__ __device__ unsigned long long signature() const {
    const int f[17] = {static_cast<int>(op), num_tokens, num_topk, num_experts, num_nodes, ranks_per_node,
                       node_capacity, capacity, row_bytes, cols, layout, alignment,
                       channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring};
    unsigned long long h = 1469598103934665603ull;
    for (int i = 0; i < 17; ++i) {
      for (int b = 0; b < 4; ++b) {
        h ^= (static_cast<unsigned>(f[i]) >> (8 * b)) & 0xffu;
        h *= 1099511628211ull;
      }
    }
    return h | 1ull;
  }
};

// Offsets inside one half (identical on every rank), from the half's start.
struct Layout {
  std::size_t msg_stride, meta_bytes, ring_stride;
  std::size_t notify_src, notify_in;  // [N] count messages: this rank's (put source), and from its rail
  std::size_t locals;                 // int [N] table starts on each node, [L] forwarders' valid rows
  std::size_t ranges;                 // int [channels][N][2]: this rank's streams as forwarder, table rows
                                      // [r0, r1) by source node (node peers read them); a source derives its
                                      // own from rdma_slot
  std::size_t tmask, send_pos;        // u64 [T] rank mask; int [T, N] index in the stream to node m
  std::size_t out_pos;                // int [L, Cn, S]: this rank's output row of each row of its node's tables
  std::size_t local_ids;              // int [L, Cn, K] (expert-major): each row's first-slot local experts here, -1
  std::size_t stage, table;           // [T] / [Cn] metas (dispatch): put source; forwarder's meta table
  std::size_t send_ring, recv_ring;   // [channels][N][rdma_ring] rows of ring_stride: RDMA send / receive rings
  std::size_t nvl_ring;               // [channels][L][nvl_ring] rows (combine, in the forwarder, by sender)
  std::size_t half_bytes;

  // Message of a source to a forwarder of node m: counts to every node [N],
  // to each rank of m [L], to each local expert of m's ranks [L * E/R], to m
  // per channel [channels], and the call's signature (two ints).
  __host__ __device__ static int msg_ints(const Shape& s) {
    return s.num_nodes + s.ranks_per_node + s.ranks_per_node * s.local_experts() + s.channels + 2;
  }
  __host__ __device__ static int msg_channel(const Shape& s, int c) {
    return s.num_nodes + s.ranks_per_node + s.ranks_per_node * s.local_experts() + c;
  }

  __host__ __device__ static Layout make(const Shape& s) {
    Layout l{};
    const std::size_t T = s.num_tokens, N = s.num_nodes, L = s.ranks_per_node, Cn = s.node_capacity;
    const std::size_t ch = s.channels, A = intranode::kAlign;
    const bool dispatch = s.op == Op::kDispatch, combine = s.op == Op::kCombine;
    l.msg_stride = align_up(4 * static_cast<std::size_t>(msg_ints(s)), 16);
    l.meta_bytes = dispatch ? align_up(sizeof(Meta) + 8 * static_cast<std::size_t>(s.num_topk), 16) : 0;
    l.ring_stride = align_up(static_cast<std::size_t>(s.row_bytes), 16);
    std::size_t o = 0;
    auto region = [&](std::size_t& at, std::size_t bytes) {
      at = o;
      o = align_up(o + bytes, A);
    };
    region(l.notify_src, dispatch ? N * l.msg_stride : 0);
    region(l.notify_in, dispatch ? N * l.msg_stride : 0);
    region(l.locals, 4 * (N + L));
    region(l.ranges, 4 * ch * N * 2);
    region(l.tmask, dispatch ? 8 * T : 0);
    region(l.send_pos, dispatch ? 4 * T * N : 0);
    region(l.out_pos, 4 * L * Cn * s.slots());
    region(l.local_ids, dispatch && s.layout == 1 ? 4 * L * Cn * s.num_topk : 0);
    region(l.stage, dispatch ? T * l.meta_bytes : 0);
    region(l.table, dispatch ? Cn * l.meta_bytes : 0);
    region(l.send_ring, ch * N * s.rdma_ring * l.ring_stride);
    region(l.recv_ring, ch * N * s.rdma_ring * l.ring_stride);
    region(l.nvl_ring, combine ? ch * L * s.nvl_ring * l.ring_stride : 0);
    l.half_bytes = o;
    return l;
  }
  // Row q of the RDMA ring (channel c, node n): slot q % rdma_ring.
  __host__ __device__ std::size_t rdma_row(std::size_t ring, const Shape& s, int c, int n, int q) const {
    return ring + ((static_cast<std::size_t>(c) * s.num_nodes + n) * s.rdma_ring + q % s.rdma_ring) * ring_stride;
  }
  __host__ __device__ std::size_t nvl_row(const Shape& s, int c, int j, int p) const {
    return nvl_ring + ((static_cast<std::size_t>(c) * s.ranks_per_node + j) * s.nvl_ring + p % s.nvl_ring) * ring_stride;
  }
  // This rank's stream range [r0, r1) as forwarder of (channel c, source node n).
  __host__ __device__ std::size_t range(const Shape& s, int c, int n) const {
    return ranges + 4 * 2 * (static_cast<std::size_t>(c) * s.num_nodes + n);
  }
};

// Bytes of the buffer a call of these shapes needs (header and both halves).
inline std::size_t buffer_bytes(const Shape& s) { return kHeaderBytes + 2 * Layout::make(s).half_bytes; }

__host__ __device__ inline std::size_t rail_word(int half, int kind, int src_node) {
  return kRailWordsOffset + ((static_cast<std::size_t>(half) * kRailKinds + kind) * kMaxRanks + src_node) * 8;
}
__host__ __device__ inline std::size_t node_flag(int phase, int src_local) {
  return kNodeFlagsOffset + (static_cast<std::size_t>(phase) * kMaxLocal + src_local) * 8;
}
// The signature node peer `src_local` published with its flag of `phase`.
__host__ __device__ inline std::size_t node_sig(int phase, int src_local) {
  return kNodeSigOffset + (static_cast<std::size_t>(phase) * kMaxLocal + src_local) * 8;
}

// What every kernel takes: the put path's arguments (peers, timeout, record;
// no rank mask) and the call's shapes.
struct Args {
  ll_put::Args put;
  Shape shape;
};

// Dispatch operands and outputs (device pointers; C output rows). The
// payload has one or two parts (FP8 values, then scales), each a multiple of
// 16 bytes per row.
struct DispatchIO {
  const char* x[2];
  char* recv_x[2];
  int part_bytes[2];
  int num_parts;
  const int* topk_idx;        // [T, K]
  const float* topk_weights;  // [T, K]
  int* recv_topk_idx;         // [C, K]
  float* recv_topk_weights;   // [C, K]
  int* num_recv_per_expert;   // [E/R]
  int* expert_group_sizes;    // [E/R] (expert-major; zeros rank-major)
  int* num_kept;              // []
  int* num_needed;            // []
  int* recv_src_rank;         // [C]
  int* recv_src_token;        // [C]
  bool* is_token_in_rank;     // [T, R]
  // The handle's internode arrays (internode_plan.InternodePlan's names):
  int* rdma_slot;             // [T, N] table row of the token on node m's forwarder, -1: none
  int* fwd_src_node;          // [Cn] this rank's table: each row's source node, -1 on empty rows
  int* fwd_src_token;         // [Cn]
  int* fwd_dst_row;           // [Cn, L, S] output row on each rank of this node (per slot), -1: none
  int* recv_table_row;        // [C] table row (on the forwarder of the row's source rail) of each output row
};

// A handle's arrays (device pointers), for a cached dispatch or a combine.
struct HandleIO {
  const int* rdma_slot;       // [T, N]
  const int* recv_src_rank;   // [C]
  const int* recv_table_row;  // [C]
  const int* fwd_src_node;    // [Cn]
  const int* fwd_src_token;   // [Cn]
  const int* fwd_dst_row;     // [Cn, L, S]
};

// Every launcher enqueues the whole call on `stream` (no host sync).
// launch_dispatch = launch_dispatch_source (notify and the metas' leg,
// internode_notify.cu), the placement, the rows' rings (launch_payload),
// the handle's forwarder arrays.
cudaError_t launch_dispatch_source(const Args& a, const DispatchIO& io, int num_blocks, cudaStream_t stream);
cudaError_t launch_dispatch(const Args& a, const DispatchIO& io, int num_blocks, cudaStream_t stream);
// internode_pipeline.cu: the rows' rings of a dispatch, 2 blocks per channel:
// io.x's rows along io.rdma_slot to the forwarders, placed at each
// destination by its out_pos (with_meta: the top-k and source outputs too).
cudaError_t launch_payload(const Args& a, const DispatchIO& io, bool with_meta, cudaStream_t stream);
// A cached dispatch's or a combine's start (internode_pipeline.cu): a rail
// exchange on `rail_kind`, out_pos and the forwarder's stream ranges from the
// handle, node barrier A; and its end: barrier B, the end of the call.
cudaError_t launch_handle_start(const Args& a, const HandleIO& h, int rail_kind, int op, int num_blocks,
                                cudaStream_t stream);
cudaError_t launch_handle_end(const Args& a, int rail_kind, int op, cudaStream_t stream);
// x [T, row_bytes] -> out [C, row_bytes] along a handle (zero padding rows).
cudaError_t launch_cached_dispatch(const Args& a, const char* x, const HandleIO& h, char* out, int num_blocks,
                                   cudaStream_t stream);
// y [C, cols] of `dtype` -> out [T, cols] (internode_combine.cu): rows of a
// token summed per node at its forwarder, then over nodes at the source.
cudaError_t launch_combine(const Args& a, DType dtype, const void* y, const HandleIO& h, void* out, int num_blocks,
                           cudaStream_t stream);

#ifdef __CUDACC__
namespace detail {

inline constexpr int kThreads = 512;
inline constexpr int kScanThreads = 1024;

__device__ __forceinline__ ll_put::Control* control(const Args& a) {
  return reinterpret_cast<ll_put::Control*>(a.put.peers.local);
}
// The call's number (0-based); the last kernel of every call increments it.
__device__ __forceinline__ unsigned long long call_number(const Args& a) {
  return ld_volatile(&control(a)->dispatch_call);
}
__device__ __forceinline__ char* half_base(char* base, const Layout& l, unsigned long long call) {
  return base + kHeaderBytes + static_cast<std::size_t>(call & 1ull) * l.half_bytes;
}
// This rank's half, and node peer j's (through its pointer).
__device__ __forceinline__ char* my_half(const Args& a, const Layout& l, unsigned long long call) {
  return half_base(a.put.peers.local, l, call);
}
__device__ __forceinline__ char* node_half(const Args& a, const Layout& l, unsigned long long call, int j) {
  const int L = a.shape.ranks_per_node;
  return half_base(a.put.peers.mapped[a.put.peers.rank / L * L + j], l, call);
}

// A failed wait: record it and raise the abort (ll_put's contract).
__device__ __forceinline__ void wait_failed(const Args& a, WaitOutcome w, int peer, int op,
                                            unsigned long long call) {
  if (w == kWaitAborted) {
    const unsigned long long raised = ld_volatile(&control(a)->abort);
    ll_put::detail::fail(a.put, intranode::kFailAborted, static_cast<int>(raised & 0xffffffffull) - 1, op, call,
                         raised >> 32);
  } else {
    ll_put::detail::fail(a.put, intranode::kFailTimeout, peer, op, call, call);
  }
}

// One-block kernels: wait until every rail peer's signal word `kind` of the
// call's half reads done (thread n waits for the rank of node n). False in
// every thread when a wait failed.
__device__ __forceinline__ bool wait_rail(const Args& a, int kind, unsigned long long call, int op) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const int L = a.shape.ranks_per_node;
  if (threadIdx.x < a.shape.num_nodes) {
    const int n = threadIdx.x;
    const auto* word = reinterpret_cast<const unsigned long long*>(
        a.put.peers.local + rail_word(static_cast<int>(call & 1ull), kind, n));
    if (!ll_put::detail::wait_done(a.put, word, n * L + a.put.peers.rank % L, op, call + 1)) failed = 1;
  }
  __syncthreads();
  return failed == 0;
}

// A peer's signature differs from this call's: record and raise the abort.
__device__ __forceinline__ void mismatch(const Args& a, int peer, int op, unsigned long long call,
                                         unsigned long long theirs) {
  ll_put::detail::fail(a.put, intranode::kFailMismatch, peer, op, call, theirs);
}

// One-block kernels: node barrier `phase` (0: data ready, 1: reads done) of
// the call: store the call's signature and then (after a system fence) its
// number + 1 into every node peer's header (its own included), then wait
// for each peer's flag and compare its signature. A peer rewrites its slot
// of `phase` only in the next call's barrier of that phase, which it reaches
// after this rank passed the barrier in between.
__device__ __forceinline__ bool node_barrier(const Args& a, int phase, unsigned long long call, int op) {
  __shared__ int failed;
  const int L = a.shape.ranks_per_node, me = a.put.peers.rank, first = me / L * L;
  const unsigned long long sig = a.shape.signature();
  if (threadIdx.x == 0) {
    failed = 0;
    for (int j = 0; j < L; ++j) {
      *reinterpret_cast<volatile unsigned long long*>(a.put.peers.mapped[first + j] + node_sig(phase, me % L)) = sig;
    }
    __threadfence_system();
    for (int j = 0; j < L; ++j) {
      st_release_sys(reinterpret_cast<unsigned long long*>(a.put.peers.mapped[first + j] + node_flag(phase, me % L)),
                     call + 1);
    }
  }
  __syncthreads();
  if (threadIdx.x < L) {
    const auto* flag = reinterpret_cast<const unsigned long long*>(a.put.peers.local + node_flag(phase, threadIdx.x));
    const WaitOutcome w =
        wait_until([&] { return ld_acquire_sys(flag) >= call + 1; }, &control(a)->abort, a.put.timeout_ns);
    if (w != kWaitReady) {
      wait_failed(a, w, first + threadIdx.x, op, call + 1);
      failed = 1;
    } else if (const unsigned long long theirs = ld_volatile(reinterpret_cast<const unsigned long long*>(
                   a.put.peers.local + node_sig(phase, threadIdx.x)));
               theirs != sig) {
      mismatch(a, first + threadIdx.x, op, call + 1, theirs);
      failed = 1;
    }
  }
  __syncthreads();
  return failed == 0;
}

// End of a call (one thread, after every wait of the call on this rank):
// reset the rail words this call counted (their writers are done) and
// advance the call number.
__device__ __forceinline__ void end_call(const Args& a, unsigned long long call, int kind0, int kind1) {
  const int h = static_cast<int>(call & 1ull);
  for (int n = 0; n < a.shape.num_nodes; ++n) {
    *reinterpret_cast<unsigned long long*>(a.put.peers.local + rail_word(h, kind0, n)) = 0;
    if (kind1 >= 0) *reinterpret_cast<unsigned long long*>(a.put.peers.local + rail_word(h, kind1, n)) = 0;
  }
  __threadfence_system();
  control(a)->dispatch_call = call + 1;
}

// Exclusive prefix count of `flag` over the block (blockDim.x <= 1024);
// *total: the block's count. Every thread calls it.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* total) {
  __shared__ int sums[33];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  const unsigned ballot = __ballot_sync(kFullWarpMask, flag);
  const int pre = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) sums[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    const int v = lane < warps ? sums[lane] : 0;
    int inc = v;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int u = __shfl_up_sync(kFullWarpMask, inc, off);
      if (lane >= off) inc += u;
    }
    sums[lane] = inc - v;
    if (lane == 31) sums[32] = inc;
  }
  __syncthreads();
  const int out = sums[warp] + pre;
  *total = sums[32];
  __syncthreads();  // sums is reused by the next call
  return out;
}

// A warp copies `bytes` (a multiple of 16) from `src` to `dst`.
__device__ __forceinline__ void warp_copy(char* dst, const char* src, std::size_t bytes, int lane) {
  auto* d = reinterpret_cast<int4*>(dst);
  const auto* s = reinterpret_cast<const int4*>(src);
  for (std::size_t v = lane; v < bytes / 16; v += 32) d[v] = s[v];
}

}  // namespace detail
#endif

}  // namespace internode
}  // namespace jax_ep
