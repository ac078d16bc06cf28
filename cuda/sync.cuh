// Cross-rank memory-ordering and waiting primitives (system scope: peers may
// be other processes mapping this memory through CUDA IPC).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_ep {

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_gpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// No ordering of its own: for progress counters published after a barrier
// whose loads have all returned (the values were consumed).
__device__ __forceinline__ void st_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// How a wait ended.
enum WaitOutcome : int { kWaitReady = 0, kWaitTimeout = 1, kWaitAborted = 2 };

// The one spin loop of jax_ep: every wait on a peer goes through it. Polls
// `ready()` (which loads the flag, acquire) until it holds, the abort word
// (raised by any rank that failed, in this rank's own memory) becomes
// nonzero, or `timeout_ns` passes. `uniform(b)` makes a decision the same in
// every thread that calls `ready` together (a warp-collective poll passes a
// lane-0 broadcast; a single thread passes the identity).
template <typename Ready, typename Uniform>
__device__ __forceinline__ WaitOutcome wait_until(Ready ready, const unsigned long long* abort_word,
                                                  unsigned long long timeout_ns, Uniform uniform) {
  if (ready()) return kWaitReady;
  const unsigned long long start = global_timer_ns();
  for (;;) {
    if (ready()) return kWaitReady;
    if (uniform(ld_volatile(abort_word) != 0)) return kWaitAborted;
    if (uniform(global_timer_ns() - start > timeout_ns)) return kWaitTimeout;
  }
}

template <typename Ready>
__device__ __forceinline__ WaitOutcome wait_until(Ready ready, const unsigned long long* abort_word,
                                                  unsigned long long timeout_ns) {
  return wait_until(ready, abort_word, timeout_ns, [](bool b) { return b; });
}

// 16-byte read of memory another rank wrote before a barrier; it does not
// change while the reading kernel runs, so the non-coherent path is safe.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16-byte store of output that this kernel does not read again: streamed
// (evict first), so it does not push rows still to be read out of L2.
__device__ __forceinline__ void st_cs_v4(int4* p, int4 v) {
  asm volatile("st.global.cs.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// 16-byte read that bypasses L1 (served by L2, the coherence point of one
// GPU): for memory another block or rank writes while this kernel runs,
// read after an acquire of the flag that published it.
__device__ __forceinline__ int4 ld_cg_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

}  // namespace jax_ep
