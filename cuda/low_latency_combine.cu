// Low-latency combine: the send kernel pushes each expert output row back to
// its token's owner (combine_send_kernel); the receive waits for every rank's
// flag, or first publishes this rank's rows for the zero-copy combine
// (wait_flags_kernel), then sums the rows (combine_recv_kernel) or gathers
// them unsummed (combine_gather_kernel). See low_latency.cuh.
#include "low_latency_common.cuh"

namespace jax_ep {
namespace low_latency {
namespace {

// first[e] = the valid rows of the local experts before e (first[le]: all
// of them), in shared memory. Expert e's valid rows are [0, count): the rows
// before its first -1 source.
__device__ __forceinline__ void count_valid_rows(const int* src_rank, int le, int rows_out, int* first) {
  for (int e = threadIdx.x; e < le; e += blockDim.x) {
    const int* ranks = src_rank + static_cast<long long>(e) * rows_out;
    int lo = 0, hi = rows_out;  // count = the first row whose source is -1
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (ranks[mid] >= 0) lo = mid + 1;
      else hi = mid;
    }
    first[e + 1] = lo;
  }
  __syncthreads();
  scan_expert_counts(first, le);
}

// Whether valid row `row` of a combine's routing names a (rank, token, slot)
// a dispatch of these shapes can produce; records a bad handle otherwise (a
// stale or foreign handle), whose row the caller skips: it would address
// another rank's half past its end, or another half.
__device__ __forceinline__ bool routing_in_range(const PeerTable& p, const Shape& s, const int* src_rank,
                                                 const int* src_token, const int* src_slot, long long row) {
  // A valid row (before its expert's first -1) may still name a negative
  // rank in a foreign handle: base[r] would then be read outside the table.
  const int r = src_rank[row], t = src_token[row], k = src_slot[row];
  if (r >= 0 && r < p.num_ranks && t >= 0 && t < s.max_tokens && k >= 0 && k < s.num_topk) return true;
  intranode::record_bad_handle(p, 4, row, r < 0 || r >= p.num_ranks ? r : (t < 0 || t >= s.max_tokens ? t : k));
  return false;
}

// The row of y [E/R, R*M, H] that is valid row `flat` (count_valid_rows' order).
__device__ __forceinline__ long long valid_row(const int* first, int le, int rows_out, int flat) {
  const int e = last_at_or_below(first, le, flat);
  return static_cast<long long>(e) * rows_out + (flat - first[e]);
}

// Flags every rank (its combine_flags[half][this rank]) once the whole grid
// is done, `mode` in the low bits: 0 rows pushed, 1 rows published.
__device__ __forceinline__ void flag_combine_peers(const PeerTable& p, unsigned long long call, unsigned long long mode) {
  if (last_block_done<true>(p, 1) && threadIdx.x < p.num_ranks && !skipped(p, threadIdx.x)) {
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(
        &combine_flags(p.base[threadIdx.x], static_cast<int>(call & 1))[p.rank]) = serial_word(call, mode);
  }
}

// Push each valid row of y to its token's owner, into [token][slot], several
// 16-byte loads in flight per thread; the last block publishes the flags.
__global__ void __launch_bounds__(kThreads)
    combine_send_kernel(PeerTable p, Shape s, const __nv_bfloat16* y, const int* src_rank,
                        const int* src_token, const int* src_slot, int* token) {
  const int R = p.num_ranks;
  const int le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const int rows_out = R * s.max_tokens;
  const int vecs = s.hidden / 8;
  if (!start_send(p, 1, call, token)) return;
  __shared__ int first[kCountSlots + 1];
  count_valid_rows(src_rank, le, rows_out, first);
  // One warp per valid row: find it once, then push its vectors.
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int flat = warp; flat < first[le]; flat += num_warps) {
    const long long row = valid_row(first, le, rows_out, flat);
    if (!routing_in_range(p, s, src_rank, src_token, src_slot, row)) continue;  // uniform across the warp
    if (skipped(p, src_rank[row])) continue;  // uniform across the warp
    char* dst = half_of(p, src_rank[row], call) + l.combine_rows +
                (static_cast<std::size_t>(src_token[row]) * s.num_topk + src_slot[row]) * s.combine_row_bytes();
    if (s.combine_fp8) {
      // FP8 values then one float scale per 128 channels: a half-warp per
      // group (fp8_cast_group<16>), 8 channels per lane (one 16-byte load),
      // two groups per step and `kSteps` steps' loads in flight.
      const __nv_bfloat16* from = y + row * s.hidden;
      const int groups = s.hidden / 128, half = lane / 16, sub = lane % 16;
      constexpr int kSteps = 4;
      for (int g0 = 0; g0 < groups; g0 += 2 * kSteps) {
        int4 raw[kSteps];
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          const int g = g0 + 2 * u + half;
          if (g < groups) raw[u] = *reinterpret_cast<const int4*>(from + g * 128 + sub * 8);
        }
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          if (g0 + 2 * u >= groups) break;  // uniform across the warp (groups is even)
          const int g = g0 + 2 * u + half;
          float v[8];
          fp8_bf16_to_float(raw[u], v);
          uint32_t q[2];
          const float scale = fp8_cast_group<16>(v, false, q);
          *reinterpret_cast<uint2*>(dst + g * 128 + sub * 8) = make_uint2(q[0], q[1]);
          if (sub == 0) fp8_store_group_scale(dst + s.hidden, g, scale, false);
        }
      }
      continue;
    }
    warp_copy(reinterpret_cast<const int4*>(y + row * s.hidden), reinterpret_cast<int4*>(dst), vecs, lane);
  }
  flag_combine_peers(p, call, 0);
}

// The only waiting part of a combine receive, one block. With y_offset >= 0
// (the zero-copy combine) it first publishes this rank's rows: for each valid
// row of y, its offset in this rank's XLA memory goes to
// combine_index[source][token][slot] of this rank's buffer, where the token's
// owner looks it up, and every rank is flagged. Then it waits for every
// rank's flag, and, given topk_idx, resolves the row each (token, slot) sums
// into combine_ptrs (null on a masked slot): in this rank's buffer where the
// expert's rank pushed it, or in that rank's XLA memory where it published it.
__global__ void __launch_bounds__(1024)
    wait_flags_kernel(PeerTable p, Shape s, const int* topk_idx, XlaMemory xla, long long y_offset,
                      const int* src_rank, const int* src_token, const int* src_slot) {
  const int R = p.num_ranks, le = s.local_experts(R);
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const int half = static_cast<int>(call & 1);
  const Layout l = Layout::make(s, R);
  __shared__ bool published[intranode::kMaxRanks];
  __shared__ int failed;  // a thread's check or wait failed (read after the block's barriers)
  if (threadIdx.x == 0) failed = 0;
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead (its barrier orders `failed`)
  if (y_offset >= 0) {
    if (threadIdx.x == 0 && !check_order(p, 1, call, true)) failed = 1;
    if (threadIdx.x < R) intranode::publish_signature(p, sig_kind(1), call, threadIdx.x, threadIdx.x == 0);
    const int rows_out = R * s.max_tokens;
    __shared__ int first[kCountSlots + 1];
    count_valid_rows(src_rank, le, rows_out, first);
    auto* index = reinterpret_cast<long long*>(half_of(p, p.rank, call) + l.combine_index);
    const long long row_bytes = static_cast<long long>(s.hidden) * 2;
    for (int flat = threadIdx.x; flat < first[le]; flat += blockDim.x) {
      const long long row = valid_row(first, le, rows_out, flat);
      if (!routing_in_range(p, s, src_rank, src_token, src_slot, row)) continue;
      index[(static_cast<long long>(src_rank[row]) * s.max_tokens + src_token[row]) * s.num_topk + src_slot[row]] =
          y_offset + row * row_bytes;
    }
    __syncthreads();
    if (threadIdx.x < R && !failed && !skipped(p, threadIdx.x)) {
      // The block's barrier, then a system fence in the flagging thread: every
      // thread's index entries (and the signature) go before the flag.
      __threadfence_system();
      *reinterpret_cast<volatile unsigned long long*>(&combine_flags(p.base[threadIdx.x], half)[p.rank]) =
          serial_word(call, 1);
    }
  }
  if (threadIdx.x == 0 && !check_order(p, 1, call, false)) failed = 1;
  if (threadIdx.x < R) {
    unsigned long long v = 0;
    if (!skipped(p, threadIdx.x) &&
        (!wait_call(p, combine_flags(p.base[p.rank], half) + threadIdx.x, call, threadIdx.x, 4, &v) ||
         !intranode::signature_agrees(p, sig_kind(1), call, threadIdx.x, 4))) {
      failed = 1;
    }
    published[threadIdx.x] = (v & 1ull) != 0;
  }
  __syncthreads();
  if (topk_idx == nullptr || failed) return;
  char* mine = half_of(p, p.rank, call);
  auto** rows = reinterpret_cast<const char**>(mine + l.combine_ptrs);
  for (int i = threadIdx.x; i < s.num_tokens * s.num_topk; i += blockDim.x) {
    const int t = i / s.num_topk, k = i % s.num_topk;
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    const int id = ids[k];
    const char* row = nullptr;
    if (id >= 0 && id < s.num_experts && !skipped(p, id / le)) {
      int k0 = 0;
      while (ids[k0] != id) ++k0;
      const int owner = id / le;
      const long long slot = static_cast<long long>(t) * s.num_topk + k0;
      if (published[owner]) {
        const auto* index = reinterpret_cast<const unsigned long long*>(half_of(p, owner, call) + l.combine_index);
        row = xla.base[owner] + ld_volatile(index + static_cast<long long>(p.rank) * s.max_tokens * s.num_topk + slot);
      } else {
        row = mine + l.combine_rows + slot * s.combine_row_bytes();
      }
    }
    rows[i] = row;
  }
}

// out[t] = sum_k w[t, k] * row(t, first slot naming k's expert), float32;
// a thread per 8 channels of a token, all top-k loads in flight. The rows
// are BF16 (16 bytes per thread), or with kFp8 FP8 (8 bytes) and the group's
// scale, folded into the weight.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    combine_recv_kernel(PeerTable p, Shape s, const float* topk_weights, __nv_bfloat16* out, bool wait_readers) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  using Raw = std::conditional_t<kFp8, uint2, int4>;
  const int R = p.num_ranks;
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const auto* const* rows = reinterpret_cast<const char* const*>(half_of(p, p.rank, call) + l.combine_ptrs);
  const int vecs = s.hidden / 8;
  const long long n = static_cast<long long>(s.num_tokens) * vecs;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int t = static_cast<int>(i / vecs), v = static_cast<int>(i % vecs);
    Raw raw[intranode::kMaxTopk];
    float w[intranode::kMaxTopk];
#pragma unroll
    for (int k = 0; k < intranode::kMaxTopk; ++k) {
      w[k] = 0.0f;
      raw[k] = Raw{};
      if (k < s.num_topk) {
        const char* row = rows[static_cast<long long>(t) * s.num_topk + k];
        if (row != nullptr) {
          w[k] = topk_weights[static_cast<long long>(t) * s.num_topk + k];
          if constexpr (kFp8) {
            w[k] *= reinterpret_cast<const float*>(row + s.hidden)[v * 8 / 128];
            raw[k] = *reinterpret_cast<const uint2*>(row + v * 8);
          } else {
            raw[k] = ld_nc_v4(reinterpret_cast<const int4*>(row) + v);
          }
        }
      }
    }
    float acc[8];
    weighted_sum8<kFp8>(raw, w, acc);
    int4 packed;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
    reinterpret_cast<int4*>(out + static_cast<long long>(t) * s.hidden)[v] = packed;
  }
  // The last block tells every rank this one is done reading its rows and
  // ends the call; with `wait_readers` (this rank published its rows in y)
  // it then waits until every rank is done reading them, since XLA may reuse
  // y's memory once the call ends.
  if (advance(p, 1) && threadIdx.x < R && !skipped(p, threadIdx.x)) {
    const int half = static_cast<int>(call & 1);
    __threadfence_system();
    *reinterpret_cast<volatile unsigned long long*>(&combine_done(p.base[threadIdx.x], half)[p.rank]) =
        serial_word(call, 0);
    unsigned long long v;
    if (wait_readers) wait_call(p, combine_done(p.base[p.rank], half) + threadIdx.x, call, threadIdx.x, 8, &v);
  }
}

// out[t, k] = row(t, first slot naming k's expert), or zeros on a masked
// slot: the rows a combine would sum, unsummed (the backward of combine and
// of dispatch). A warp per (token, slot).
__global__ void __launch_bounds__(kThreads)
    combine_gather_kernel(PeerTable p, Shape s, const int* topk_idx, __nv_bfloat16* out) {
  if (intranode::block_aborted(p)) return;  // a rank failed: this buffer is dead
  const int R = p.num_ranks;
  const unsigned long long call = ld_volatile(combine_counter(p)) + 1;
  const Layout l = Layout::make(s, R);
  const char* mine = half_of(p, p.rank, call);
  const int vecs = s.hidden / 8;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  for (int i = warp; i < s.num_tokens * s.num_topk; i += num_warps) {
    const int t = i / s.num_topk, k = i % s.num_topk;
    const int* ids = topk_idx + static_cast<long long>(t) * s.num_topk;
    const int id = ids[k];
    int4* to = reinterpret_cast<int4*>(out + static_cast<long long>(i) * s.hidden);
    if (id < 0 || id >= s.num_experts || skipped(p, id / s.local_experts(R))) {
      for (int v = lane; v < vecs; v += 32) to[v] = make_int4(0, 0, 0, 0);
      continue;
    }
    int k0 = 0;
    while (ids[k0] != id) ++k0;
    const int4* from = reinterpret_cast<const int4*>(
        mine + l.combine_rows + (static_cast<std::size_t>(t) * s.num_topk + k0) * s.hidden * 2);
    for (int v = lane; v < vecs; v += 32) to[v] = ld_nc_v4(from + v);
  }
  advance(p, 1);
}

}  // namespace

cudaError_t launch_combine_send(const PeerTable& peers, const Shape& s, const void* y,
                                const int* recv_src_rank, const int* recv_src_token, const int* recv_src_slot,
                                int* token, int num_blocks, cudaStream_t stream) {
  combine_send_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, static_cast<const __nv_bfloat16*>(y), recv_src_rank, recv_src_token, recv_src_slot, token);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const PeerTable& peers, const Shape& s, const XlaMemory& xla,
                                const int* topk_idx, const float* topk_weights, void* out,
                                const ZeroCopy& zero_copy, int num_blocks, cudaStream_t stream) {
  wait_flags_kernel<<<1, 1024, 0, stream>>>(peers, s, topk_idx, xla, zero_copy.y_offset, zero_copy.src_rank,
                                            zero_copy.src_token, zero_copy.src_slot);
  auto* kernel = s.combine_fp8 ? combine_recv_kernel<true> : combine_recv_kernel<false>;
  kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, topk_weights, static_cast<__nv_bfloat16*>(out), zero_copy.y_offset >= 0);
  return cudaGetLastError();
}

cudaError_t launch_combine_gather(const PeerTable& peers, const Shape& s, const int* topk_idx, void* out,
                                  int num_blocks, cudaStream_t stream) {
  wait_flags_kernel<<<1, 64, 0, stream>>>(peers, s, nullptr, XlaMemory{}, -1, nullptr, nullptr, nullptr);
  combine_gather_kernel<<<copy_blocks_for(num_blocks, 1ll << 30), kThreads, 0, stream>>>(
      peers, s, topk_idx, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace low_latency
}  // namespace jax_ep
