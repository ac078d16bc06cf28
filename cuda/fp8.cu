// Per-token FP8 cast kernels.
//
// Each thread owns 16 consecutive channels of one token (16-byte loads and
// stores), so the 8 lanes of a 128-channel group cast it together
// (fp8.cuh's fp8_cast_group<8>) and its first lane stores the scale
// (fp8_store_group_scale). Only IEEE-rounded float32 operations are used, so
// results match the float32 reference (jax_ep/reference/fp8.py) bit for bit.
#include "fp8.cuh"

#include "utils.cuh"

namespace jax_ep {
namespace {

constexpr int kChannelsPerThread = 16;
constexpr int kThreadsPerGroup = kFp8GroupSize / kChannelsPerThread;  // 8

// The float32 whose exponent field is the UE8M0 byte (0 for a zero byte).
__device__ __forceinline__ float ue8m0_to_float(uint32_t biased_exponent) {
  return __uint_as_float(biased_exponent << 23);
}

__device__ __forceinline__ void load_channels(const __nv_bfloat16* src,
                                              float (&v)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + i);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(pairs[j]);
      v[8 * i + 2 * j] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}

__device__ __forceinline__ void load_channels(const float* src,
                                              float (&v)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(src) + i);
    v[4 * i] = f.x;
    v[4 * i + 1] = f.y;
    v[4 * i + 2] = f.z;
    v[4 * i + 3] = f.w;
  }
}

__device__ __forceinline__ void store_channels(__nv_bfloat16* dst,
                                               const float (&v)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint4 raw;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pairs[j] = __floats2bfloat162_rn(v[8 * i + 2 * j], v[8 * i + 2 * j + 1]);
    }
    reinterpret_cast<uint4*>(dst)[i] = raw;
  }
}

__device__ __forceinline__ void store_channels(float* dst,
                                               const float (&v)[kChannelsPerThread]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    reinterpret_cast<float4*>(dst)[i] =
        make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  }
}

// One thread per 16 channels; num_chunks = num_tokens * hidden / 16.
template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(kThreadsPerBlock)
    per_token_cast_to_fp8_kernel(const T* __restrict__ x, int64_t num_chunks,
                                 bool round_scale, __nv_fp8_e4m3* __restrict__ out,
                                 void* __restrict__ scales) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = chunk < num_chunks;
  const int lane = threadIdx.x % kWarpSize;

  float v[kChannelsPerThread] = {};
  if (valid) load_channels(x + chunk * kChannelsPerThread, v);
  // Every lane takes part in the cast's shuffles: a group's 8 lanes are all
  // valid or all past the end (casting zeros), since num_chunks is a
  // multiple of 8.
  uint32_t q[kChannelsPerThread / 4];
  const float scale = fp8_cast_group<kThreadsPerGroup>(v, kUe8m0 || round_scale, q);
  if (valid) reinterpret_cast<uint4*>(out)[chunk] = make_uint4(q[0], q[1], q[2], q[3]);

  // The group's first lane stores its scale (fp8.cuh's store: with UE8M0
  // the exponent byte, byte group % 4 of the packed int32 word).
  if (valid && lane % kThreadsPerGroup == 0) {
    fp8_store_group_scale(static_cast<char*>(scales), chunk / kThreadsPerGroup, scale, kUe8m0);
  }
}

template <typename T, bool kUe8m0>
__global__ void __launch_bounds__(kThreadsPerBlock)
    per_token_cast_back_kernel(const __nv_fp8_e4m3* __restrict__ x,
                               const void* __restrict__ scales,
                               int64_t num_chunks, T* __restrict__ out) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= num_chunks) return;

  const int64_t group = chunk / kThreadsPerGroup;
  float scale;
  if constexpr (kUe8m0) {
    const uint32_t word = static_cast<uint32_t>(
        __ldg(static_cast<const int32_t*>(scales) + group / kUe8m0ScalesPerWord));
    scale = ue8m0_to_float((word >> (8 * (group % kUe8m0ScalesPerWord))) & 0xffu);
  } else {
    scale = __ldg(static_cast<const float*>(scales) + group);
  }

  const uint4 packed = __ldg(reinterpret_cast<const uint4*>(x) + chunk);
  const __nv_fp8x2_storage_t* pairs =
      reinterpret_cast<const __nv_fp8x2_storage_t*>(&packed);
  float v[kChannelsPerThread];
#pragma unroll
  for (int j = 0; j < kChannelsPerThread / 2; ++j) {
    // e4m3 values are exact in half precision.
    const float2 f = __half22float2(
        __half2(__nv_cvt_fp8x2_to_halfraw2(pairs[j], __NV_E4M3)));
    v[2 * j] = __fmul_rn(f.x, scale);
    v[2 * j + 1] = __fmul_rn(f.y, scale);
  }
  store_channels(out + chunk * kChannelsPerThread, v);
}

bool valid_shape(int num_tokens, int hidden, bool use_ue8m0) {
  const int multiple = use_ue8m0 ? kFp8GroupSize * kUe8m0ScalesPerWord : kFp8GroupSize;
  return num_tokens >= 0 && hidden > 0 && hidden % multiple == 0;
}

int64_t num_blocks(int64_t num_chunks) {
  return ceil_div<int64_t>(num_chunks, kThreadsPerBlock);
}

template <typename T>
cudaError_t launch_cast_to_fp8(const T* x, int num_tokens, int hidden,
                               bool round_scale, bool use_ue8m0,
                               __nv_fp8_e4m3* out, void* scales,
                               cudaStream_t stream) {
  if (!valid_shape(num_tokens, hidden, use_ue8m0)) return cudaErrorInvalidValue;
  if (!is_aligned(x, 16) || !is_aligned(out, 16) || !is_aligned(scales, 4)) {
    return cudaErrorMisalignedAddress;
  }
  const int64_t num_chunks =
      static_cast<int64_t>(num_tokens) * hidden / kChannelsPerThread;
  if (num_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_blocks(num_chunks)));
  if (use_ue8m0) {
    per_token_cast_to_fp8_kernel<T, true>
        <<<grid, kThreadsPerBlock, 0, stream>>>(x, num_chunks, true, out, scales);
  } else {
    per_token_cast_to_fp8_kernel<T, false><<<grid, kThreadsPerBlock, 0, stream>>>(
        x, num_chunks, round_scale, out, scales);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cast_back(const __nv_fp8_e4m3* x, const void* scales,
                             int num_tokens, int hidden, bool use_ue8m0, T* out,
                             cudaStream_t stream) {
  if (!valid_shape(num_tokens, hidden, use_ue8m0)) return cudaErrorInvalidValue;
  if (!is_aligned(x, 16) || !is_aligned(out, 16) || !is_aligned(scales, 4)) {
    return cudaErrorMisalignedAddress;
  }
  const int64_t num_chunks =
      static_cast<int64_t>(num_tokens) * hidden / kChannelsPerThread;
  if (num_chunks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_blocks(num_chunks)));
  if (use_ue8m0) {
    per_token_cast_back_kernel<T, true>
        <<<grid, kThreadsPerBlock, 0, stream>>>(x, scales, num_chunks, out);
  } else {
    per_token_cast_back_kernel<T, false>
        <<<grid, kThreadsPerBlock, 0, stream>>>(x, scales, num_chunks, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_per_token_cast_to_fp8(const __nv_bfloat16* x, int num_tokens,
                                         int hidden, bool round_scale,
                                         bool use_ue8m0, __nv_fp8_e4m3* out,
                                         void* scales, cudaStream_t stream) {
  return launch_cast_to_fp8(x, num_tokens, hidden, round_scale, use_ue8m0, out,
                            scales, stream);
}

cudaError_t launch_per_token_cast_to_fp8(const float* x, int num_tokens,
                                         int hidden, bool round_scale,
                                         bool use_ue8m0, __nv_fp8_e4m3* out,
                                         void* scales, cudaStream_t stream) {
  return launch_cast_to_fp8(x, num_tokens, hidden, round_scale, use_ue8m0, out,
                            scales, stream);
}

cudaError_t launch_per_token_cast_back(const __nv_fp8_e4m3* x,
                                       const void* scales, int num_tokens,
                                       int hidden, bool use_ue8m0,
                                       __nv_bfloat16* out, cudaStream_t stream) {
  return launch_cast_back(x, scales, num_tokens, hidden, use_ue8m0, out, stream);
}

cudaError_t launch_per_token_cast_back(const __nv_fp8_e4m3* x,
                                       const void* scales, int num_tokens,
                                       int hidden, bool use_ue8m0, float* out,
                                       cudaStream_t stream) {
  return launch_cast_back(x, scales, num_tokens, hidden, use_ue8m0, out, stream);
}

}  // namespace jax_ep
