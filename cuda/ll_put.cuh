// Low-latency dispatch and combine over the transport seam (transport.cuh):
// every (token, expert) message, and every expert output row, is written
// straight into the receiver's slot with a put-with-signal (or, for a peer
// with a pointer, stores and a release add), so peers in other nodes are
// reached without a pointer and a send only issues puts.
//
// Dispatch. The send casts each token once (FP8 when asked) into this
// rank's staging half, the put source, and a warp per (token, expert)
// writes it to slot [local expert][source][index] of the expert's rank,
// index = the source's earlier tokens naming that expert, adding 1 to the
// (local expert, source) signal word there; one thread per expert then adds
// signal_final_value(count) to that word. The receive waits until every word
// of its half reads done, packs the messages into [E/R, R*M, H] ordered by
// (source, token) with the handle (source rank, token, first top-k slot
// naming the expert), resets the words and ends the call.
//
// Combine. The send returns each valid row of y to its token's owner, slot
// [token][first top-k slot naming the expert], adding 1 to the owner's
// (source) word, then the final add per owner; rows for put peers are first
// copied into this rank's staging (a put source must be symmetric memory).
// With FP8 rows (Shape::combine_fp8) every row is cast into the staging with
// fp8.cuh's group cast (values, then a float scale per 128 channels: the
// pointer path's row). The receive waits for every source's word and sums
// the rows with the top-k weights in float32 (the arithmetic of
// low_latency.cu's combine receive), or, for gradients, returns them
// unsummed [T, K, H] (launch_combine_gather). A dispatch send with per-slot
// rows (the backward of a combine) stages one message per top-k slot.
//
// Call signatures (docs/faults.md). Every send also puts this rank's
// signature of the call (intranode::CallSignature: op, shapes, options) into
// a fixed slot of every peer, [kind][half][source] (kind 0 dispatch, 1
// combine), with a signal of its own on a fixed word. Fixed: at offsets that
// no call's shapes move, so a peer that calls with other shapes still lands
// it where the receiver looks. The receive first waits for each source's
// signature word, compares the hash with its own call's and, on a
// difference, records both signatures (kFailMismatch: the host names the
// first field that differs) and raises the abort; only then does it trust
// the source's data words. Hash 0 (JAX_EP_CALL_SIGNATURES=0): neither sent
// nor checked.
//
// Calls alternate between two halves (call % 2); a rank writes half h of a
// peer only after its own receive of the previous call, which needed that
// peer's messages of the previous call, sent after the peer's receive of
// the call before (the same half) had read and reset it. The same argument
// covers the staging halves: a put's source is rewritten two calls later,
// after the put was delivered. tests/protocol/ll_put_model.py models it.
//
// Faults (docs/faults.md): every wait polls its word, this rank's abort word
// (Control::abort) and the timeout; a failed wait records (code, rank, peer,
// op, call) in the pointer path's record, raises the abort in every rank
// that is not masked and returns; every kernel returns at entry once the
// abort word is raised. No trap: the CUDA context survives.
//
// These kernels link NVSHMEM device code (JAX_EP_WITH_NVSHMEM): they live in
// the jax_ep._nvshmem module; xla_ffi/ll_put.cc holds their FFI handlers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "low_latency.cuh"
#include "sync.cuh"
#include "transport.cuh"

namespace jax_ep {
namespace ll_put {

using low_latency::Payload;
using low_latency::Shape;

// A message: the token (int32), K (int32), the token's K expert ids (int32),
// padded to 16 bytes; then the values (BF16, or FP8) and, FP8, the scales.
// The receiver takes the top-k slot from the ids.
__host__ __device__ inline std::size_t header_bytes(const Shape& s) {
  return intranode::align_up(8 + 4 * static_cast<std::size_t>(s.num_topk), 16);
}
__host__ __device__ inline std::size_t message_stride(const Shape& s) {
  return intranode::align_up(header_bytes(s) + s.value_bytes() + (s.fp8() ? s.scale_bytes() : 0), 16);
}
// The largest message of these shapes, the BF16 one: the regions are sized
// by it (and combine rows by BF16 rows), so that calls with other payloads
// (an FP8 dispatch, then the BF16 dispatch of a backward pass; FP8 combine
// rows, then BF16) find every half at the same offsets.
__host__ __device__ inline std::size_t max_message_stride(const Shape& s) {
  return intranode::align_up(header_bytes(s) + static_cast<std::size_t>(s.hidden) * 2, 16);
}

inline constexpr int kMaxWords = 2048;  // dispatch signal words per half: (E/R) * R = E

// This rank's control words, at the start of its buffer. Peers write only
// `abort`; the rest is this rank's own.
struct Control {
  unsigned long long dispatch_call;  // calls received so far: the next call's number
  unsigned long long combine_call;
  unsigned int blocks_done[2];       // finished pack / sum blocks (dispatch, combine)
  // Nonzero once any rank failed: (FailCode << 32) | (failing rank + 1),
  // written by the failing rank into every rank's copy (the same encoding as
  // intranode::Signals::abort) and polled by every wait of the put kernels.
  // Never cleared: the buffer is unusable until re-created.
  unsigned long long abort;
};
inline constexpr std::size_t kControlBytes = 256;
static_assert(sizeof(Control) <= kControlBytes);

// The signature region, after the control words at offsets independent of
// every call's shapes: words [kind][half][source] (uint64, written by
// sources), this rank's own record [kind][half] (the put source) and the
// received records [kind][half][source]. A record is a CallSignature.
inline constexpr int kSigKinds = 2;  // 0 dispatch, 1 combine
inline constexpr std::size_t kSigRecordBytes = 64;
static_assert(sizeof(intranode::CallSignature) <= kSigRecordBytes);
inline constexpr std::size_t kSigWords = kControlBytes;
inline constexpr std::size_t kSigOwn = kSigWords + kSigKinds * 2 * transport::kMaxPeers * 8;
inline constexpr std::size_t kSigRecords = kSigOwn + kSigKinds * 2 * kSigRecordBytes;
inline constexpr std::size_t kSigEnd = kSigRecords + kSigKinds * 2 * transport::kMaxPeers * kSigRecordBytes;
__host__ __device__ constexpr std::size_t sig_word(int kind, int half, int src) {
  return kSigWords + ((static_cast<std::size_t>(kind) * 2 + half) * transport::kMaxPeers + src) * 8;
}
__host__ __device__ constexpr std::size_t sig_own(int kind, int half) {
  return kSigOwn + (static_cast<std::size_t>(kind) * 2 + half) * kSigRecordBytes;
}
__host__ __device__ constexpr std::size_t sig_record(int kind, int half, int src) {
  return kSigRecords + ((static_cast<std::size_t>(kind) * 2 + half) * transport::kMaxPeers + src) * kSigRecordBytes;
}

// Regions of every rank's symmetric buffer (identical on every rank), each
// [2] halves; offsets from the buffer's start.
struct Layout {
  std::size_t dispatch_words, dispatch_words_half;  // [E/R][R] uint64, written by sources
  std::size_t combine_words, combine_words_half;    // [R] uint64, written by expert ranks
  std::size_t dispatch_stage, dispatch_stage_half;  // [M][K] messages: this rank's tokens (put source;
                                                    // [t][0] per token, [t][k] per slot)
  std::size_t dispatch_rows, dispatch_rows_half;    // [E/R][R][M] messages, written by sources
  std::size_t combine_stage, combine_stage_half;    // [E/R][R*M] rows: y's rows for put peers (FP8: all)
  std::size_t combine_rows, combine_rows_half;      // [M][K] rows, written by expert ranks
  std::size_t total;

  __host__ __device__ static Layout make(const Shape& s, int R) {
    using intranode::align_up;
    using intranode::kAlign;
    const std::size_t le = s.local_experts(R), m = s.max_tokens, row = static_cast<std::size_t>(s.hidden) * 2;
    const std::size_t stride = max_message_stride(s), k = s.num_topk;
    Layout l{};
    std::size_t o = kSigEnd;
    auto region = [&](std::size_t& at, std::size_t& half, std::size_t bytes) {
      at = align_up(o, kAlign);
      half = align_up(bytes, kAlign);
      o = at + 2 * half;
    };
    region(l.dispatch_words, l.dispatch_words_half, le * R * 8);
    region(l.combine_words, l.combine_words_half, static_cast<std::size_t>(R) * 8);
    region(l.dispatch_stage, l.dispatch_stage_half, m * k * stride);
    region(l.dispatch_rows, l.dispatch_rows_half, le * R * m * stride);
    region(l.combine_stage, l.combine_stage_half, le * R * m * row);
    region(l.combine_rows, l.combine_rows_half, m * k * row);
    l.total = o;
    return l;
  }
};

// What every kernel takes.
struct Args {
  transport::Peers peers;
  Shape shape;
  unsigned long long timeout_ns;  // how long a receive waits for a peer's signal
  // What failed, for the host (mapped host memory, or device memory in the
  // direct calls): the pointer path's record and codes, first failure wins.
  intranode::TimeoutRecord* record;
  const bool* rank_mask;          // device bool[R], true: a masked rank (never written to nor waited for); null: none
  intranode::CallSignature call;  // the call's signature (hash 0: neither sent nor checked)
};

// Operation codes of the put path's failure records: those of the pointer
// path's low-latency receives (intranode::op_name), so a record reads the same.
inline constexpr int kOpDispatchRecv = 3;
inline constexpr int kOpCombineRecv = 4;

// Bytes of the symmetric buffer for these shapes (both halves of everything).
std::size_t buffer_bytes(const Shape& s, int num_ranks);
// Whether these shapes fit the kernels (E <= kMaxWords, K <= kMaxTopk, H % 128 == 0).
bool supported(const Shape& s, int num_ranks);

// x [T, H] bf16, topk_idx [T, K] int32 (-1 masks a slot). With `per_slot`
// (BF16 payload only) x is [T, K, H] and each slot sends its own row (the
// backward of a combine), from the first slot naming its expert.
cudaError_t launch_dispatch_send(const Args& a, const void* x, const int* topk_idx, int num_blocks,
                                 cudaStream_t stream, bool per_slot = false);
// recv_x [E/R, R*M, H] (bf16, or fp8 values); recv_scales [E/R, R*M, G] (fp8
// only: float32 G = H/128, or UE8M0 bytes packed 4 to an int32); recv_count
// [E/R]; recv_src_{rank,token,slot} [E/R, R*M] (-1 on padding rows).
cudaError_t launch_dispatch_recv(const Args& a, void* recv_x, void* recv_scales, int* recv_count,
                                 int* recv_src_rank, int* recv_src_token, int* recv_src_slot, int num_blocks,
                                 cudaStream_t stream);
// y [E/R, R*M, H] bf16 with the dispatch's handle.
cudaError_t launch_combine_send(const Args& a, const void* y, const int* recv_src_rank, const int* recv_src_token,
                                const int* recv_src_slot, int num_blocks, cudaStream_t stream);
// out [T, H] bf16 = sum_k w[t, k] * row(t, first slot naming topk_idx[t, k]).
// With shape.combine_fp8 the rows travel as FP8 values and a float scale per
// 128 channels (fp8.cuh's group cast), dequantized in the sum.
cudaError_t launch_combine_recv(const Args& a, const int* topk_idx, const float* topk_weights, void* out,
                                int num_blocks, cudaStream_t stream);
// out [T, K, H] bf16: row(t, first slot naming topk_idx[t, k]) unsummed, zeros
// on masked slots (the backward of dispatch and combine; BF16 rows only).
cudaError_t launch_combine_gather(const Args& a, const int* topk_idx, void* out, int num_blocks,
                                  cudaStream_t stream);
// out s32[4] = {code, rank at fault, this rank, op} of the buffer's record,
// on `stream` after the calls before it (intranode::launch_read_status's
// encoding; code -1, a record being written, reads as aborted).
cudaError_t launch_read_status(const Args& a, int* out, cudaStream_t stream);

#ifdef __CUDACC__
namespace detail {

__device__ __forceinline__ Control* control(const Args& a) { return reinterpret_cast<Control*>(a.peers.local); }

// Whether rank `r` is masked for this call. A masked rank's own calls send
// and wait for nothing (its routing is all -1), and no rank writes to or
// waits for it, so no signal word can change after its reader reset it.
__device__ __forceinline__ bool masked(const Args& a, int r) { return a.rank_mask != nullptr && a.rank_mask[r]; }
__device__ __forceinline__ bool skips(const Args& a, int peer) { return masked(a, a.peers.rank) || masked(a, peer); }

// Failure handling: the contract of the pointer path (docs/faults.md) with
// the put path's own abort word. sync.cuh's `wait_until` needs only the
// address of the abort word, so the waits reuse it; raising the abort is the
// put path's own (intranode::raise_abort stores through a PeerTable's
// pointers, and put peers have none): a store for pointer peers, an NVSHMEM
// signal set (transport::signal_set) for put peers.

__device__ __forceinline__ const unsigned long long* abort_word(const Args& a) { return &control(a)->abort; }

// Tell every rank that is not masked (this one too) that this rank failed.
__device__ __forceinline__ void raise_abort(const Args& a, int code) {
  const unsigned long long word = static_cast<unsigned long long>(code) << 32 |
                                  static_cast<unsigned long long>(a.peers.rank + 1);
  __threadfence_system();
  for (int r = 0; r < a.peers.num_ranks; ++r) {
    if (r != a.peers.rank && masked(a, r)) continue;  // a masked rank may be gone: touch nothing of it
    transport::signal_set(a.peers, r, offsetof(Control, abort), word);
  }
  __threadfence_system();
}

// A call failed here: record it (code, this rank, the peer, op, call) and,
// unless a peer's abort is what stopped it, raise the abort in every rank.
// The caller returns; so do the call's later kernels (`block_aborted`).
// A mismatch passes both signatures (this rank's call, and the peer's record).
__device__ __forceinline__ void fail(const Args& a, int code, int peer, int op, unsigned long long call,
                                     unsigned long long seen, const intranode::CallSignature* mine = nullptr,
                                     const intranode::CallSignature* theirs = nullptr) {
  if (a.record != nullptr) {
    intranode::record_failure(a.record, code, a.peers.rank, peer, op, call, seen, a.timeout_ns, mine, theirs);
  }
  if (code != intranode::kFailAborted) raise_abort(a, code);
}

// Whether any rank failed (the buffer is then dead); the first kernel of
// this rank to notice records who raised it, unless a record is there.
__device__ __forceinline__ bool aborted(const Args& a, int op) {
  const unsigned long long word = ld_volatile(abort_word(a));
  if (word == 0) return false;
  if (a.record != nullptr && *reinterpret_cast<volatile int*>(&a.record->code) == 0) {
    fail(a, intranode::kFailAborted, static_cast<int>(word & 0xffffffffull) - 1, op, 0, word >> 32);
  }
  return true;
}

// `aborted` decided once for the whole block (thread 0 reads): every put
// kernel checks it at entry and returns at once on a dead buffer, touching
// neither peers nor outputs.
__device__ __forceinline__ bool block_aborted(const Args& a, int op) {
  __shared__ int seen;
  if (threadIdx.x == 0) seen = aborted(a, op) ? 1 : 0;
  __syncthreads();
  return seen != 0;
}

// Wait until the signal word at `word` (this rank's memory) reads done,
// polling the abort word and the timeout (sync.cuh's `wait_until`). False
// when the wait failed (recorded; abort raised unless a peer raised it):
// the calling thread stops, the others see the abort at their next poll.
// The acquire orders the rows the word counts before later reads. `call`
// (1-based) is the receive's call number; a timeout records it as the
// peer's too (the peer had not finished sending that call).
__device__ __forceinline__ bool wait_done(const Args& a, const unsigned long long* word, int peer, int op,
                                          unsigned long long call) {
  const WaitOutcome w =
      wait_until([&] { return transport::signal_done(ld_acquire_sys(word)); }, abort_word(a), a.timeout_ns);
  if (w == kWaitReady) return true;
  if (w == kWaitAborted) {
    const unsigned long long raised = ld_volatile(abort_word(a));
    fail(a, intranode::kFailAborted, static_cast<int>(raised & 0xffffffffull) - 1, op, call, raised >> 32);
  } else {
    fail(a, intranode::kFailTimeout, peer, op, call, call);
  }
  return false;
}

// Block 0 of a send, before any of its rows: this rank's signature of the
// call into its own record of `kind` and `half` (the put source, rewritten
// two calls later, after delivery), then, one thread per peer that is not
// skipped, a put of it into the peer's slot [kind][half][this rank] with the
// final add on the matching signature word. Every thread of the block calls it.
__device__ __forceinline__ void send_signature(const Args& a, int kind, int half) {
  if (a.call.hash == 0) return;
  auto* own = reinterpret_cast<intranode::CallSignature*>(a.peers.local + sig_own(kind, half));
  if (threadIdx.x == 0) *own = a.call;
  __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < a.peers.num_ranks; r += blockDim.x) {
    if (skips(a, r)) continue;
    transport::thread_put_signal(a.peers, r, sig_record(kind, half, a.peers.rank), own, kSigRecordBytes,
                                 sig_word(kind, half, a.peers.rank), transport::signal_final_value(0));
  }
}

// A receive, for source `src`: wait for its signature of this call, compare
// it with this call's, and reset the word. False when the wait failed or
// the signatures differ (recorded, abort raised): the calling thread stops.
__device__ __forceinline__ bool signature_agrees(const Args& a, int kind, int half, int src, int op,
                                                 unsigned long long call) {
  if (a.call.hash == 0) return true;
  auto* word = reinterpret_cast<unsigned long long*>(a.peers.local + sig_word(kind, half, src));
  if (!wait_done(a, word, src, op, call)) return false;
  const auto* theirs = reinterpret_cast<const intranode::CallSignature*>(a.peers.local + sig_record(kind, half, src));
  const unsigned long long hash = ld_volatile(&theirs->hash);
  *word = 0;  // read: no source writes it again before this rank's next call of this kind
  if (hash == a.call.hash) return true;
  fail(a, intranode::kFailMismatch, src, op, call, hash, &a.call, theirs);
  return false;
}

// signature_agrees for every source that is not skipped, a thread per
// source; the same answer in every thread of the block (which all call it).
__device__ __forceinline__ bool signatures_agree(const Args& a, int kind, int half, int op, unsigned long long call) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  for (int src = threadIdx.x; src < a.peers.num_ranks; src += blockDim.x) {
    if (!skips(a, src) && !signature_agrees(a, kind, half, src, op, call)) {
      failed = 1;
      break;
    }
  }
  __syncthreads();
  return failed == 0;
}

// True in every thread of the block that finished last (and resets the counter).
__device__ __forceinline__ bool last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) + 1 == gridDim.x;
    if (last) *counter = 0;
  }
  __syncthreads();
  return last;
}

// Whether slot k of token row `ids` is the first naming its expert.
__device__ __forceinline__ bool first_slot(const int* ids, int k) {
  for (int j = 0; j < k; ++j) {
    if (ids[j] == ids[k]) return false;
  }
  return true;
}

}  // namespace detail
#endif

}  // namespace ll_put
}  // namespace jax_ep
