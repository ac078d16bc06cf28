// Small device helpers shared by the jax_ep kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {

// Threads per block used by the elementwise kernels.
inline constexpr int kThreadsPerBlock = 256;
inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullWarpMask = 0xffffffffu;

// Ceiling division for positive integers.
template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// True when `ptr` may be read or written with `bytes`-wide vector accesses.
inline bool is_aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace jax_ep
