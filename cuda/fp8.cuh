// Per-token FP8 (e4m3) casts with one scale per 128 channels, and their inverse.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace jax_ep {

// Channels that share one scale.
inline constexpr int kFp8GroupSize = 128;
// UE8M0 scales are packed four to an int32 word, so `hidden` must then be a
// multiple of 4 * 128 = 512.
inline constexpr int kUe8m0ScalesPerWord = 4;

#ifdef __CUDACC__
// The scale of one 128-channel group from its amax (the arithmetic below):
// amax floored at 1e-4, times float32(1 / 448), and with `power_of_two` the
// smallest power of two >= that (from the float bits: the scale is a positive
// normal number, so exponent + 1 with a cleared mantissa is exact).
__device__ __forceinline__ float fp8_group_scale(float amax, bool power_of_two) {
  float scale = __fmul_rn(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
  if (power_of_two) {
    uint32_t bits = __float_as_uint(scale);
    if ((bits & 0x007fffffu) != 0) bits = (bits & 0x7f800000u) + 0x00800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// The BF16 values of `raw` (N / 2 packed pairs, first channel in the low
// half) as floats (exact).
template <int N, typename Raw>
__device__ __forceinline__ void fp8_bf16_to_float(const Raw& raw, float (&v)[N]) {
  static_assert(sizeof(Raw) == 2 * N, "raw must hold N BF16 values");
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// The e4m3 cast of one 128-channel group held by kLanes aligned consecutive
// lanes of a warp (32: a warp, 16: a half-warp, 8: a quarter), each lane
// holding kFp8GroupSize / kLanes consecutive channels `v`: writes this lane's
// FP8 bytes, in channel order, little-endian into the words `q`, and returns,
// in every lane, the group's scale (fp8_group_scale of the group's amax). The
// arithmetic of jax_ep/reference/fp8.py, each step correctly rounded: amax by
// fmaxf (a NaN never raises it), inv = 1 / scale, then x * inv converted with
// round to nearest even, saturating to ±448 (a NaN product gives 0x7f), two
// channels per conversion. Every lane of the warp must call it together
// (full-warp shuffles); a lane with no group passes values that cannot raise
// its neighbours' amax (zeros) and ignores the result.
template <int kLanes, int N = kFp8GroupSize / kLanes>
__device__ __forceinline__ float fp8_cast_group(const float (&v)[N], bool power_of_two, uint32_t (&q)[N / 4]) {
  static_assert(kLanes * N == kFp8GroupSize && (kLanes & (kLanes - 1)) == 0 && kLanes <= 32 && N % 4 == 0,
                "a power-of-two number of lanes, a multiple of 4 channels each, must cover the group");
  float amax = fabsf(v[0]);
#pragma unroll
  for (int i = 1; i < N; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = fp8_group_scale(amax, power_of_two);
  const float inv = __fdiv_rn(1.0f, scale);
#pragma unroll
  for (int j = 0; j < N / 2; ++j) {
    const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(v[2 * j], inv), __fmul_rn(v[2 * j + 1], inv)),
                                                   __NV_SATFINITE, __NV_E4M3);
    q[j / 2] = j % 2 == 0 ? pair : q[j / 2] | pair << 16;
  }
  return scale;
}

// fp8_cast_group with a warp per group, 4 channels per lane (`raw`: this
// lane's 4 BF16 values): returns this lane's 4 FP8 bytes in channel order and
// leaves the group's scale in *scale_out.
__device__ __forceinline__ uint32_t fp8_cast_group_warp(uint2 raw, bool power_of_two, float* scale_out) {
  float v[4];
  fp8_bf16_to_float(raw, v);
  uint32_t q[1];
  *scale_out = fp8_cast_group<32>(v, power_of_two, q);
  return q[0];
}

// acc[c] = sum over k of w[k] * row k's channel c, for the 8 channels of one
// vector per row: 8 BF16 values (Raw = int4) or, with kFp8, 8 e4m3 bytes
// (Raw = uint2). fmaf in k order from zero, so every combine sums alike; a
// row left out has w[k] = 0 and zero raw[k].
template <bool kFp8, int K, typename Raw>
__device__ __forceinline__ void weighted_sum8(const Raw (&raw)[K], const float (&w)[K], float (&acc)[8]) {
  static_assert(sizeof(Raw) == (kFp8 ? 8 : 16), "raw must hold 8 channels");
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c] = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float2 f;
      if constexpr (kFp8) {
        const auto pair = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw[k])[q];
        f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
      } else {
        f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(&raw[k])[q]);
      }
      acc[2 * q] = fmaf(w[k], f.x, acc[2 * q]);
      acc[2 * q + 1] = fmaf(w[k], f.y, acc[2 * q + 1]);
    }
  }
}

// A group's scale as stored: the float, or with UE8M0 its biased exponent
// byte (the scale is a power of two then, so the byte is exact; four groups'
// bytes make the little-endian int32 words of the packed layout). `group`:
// an int or int64_t index.
template <typename Index>
__device__ __forceinline__ void fp8_store_group_scale(char* scales, Index group, float scale, bool ue8m0) {
  if (ue8m0) scales[group] = static_cast<char>((__float_as_uint(scale) >> 23) & 0xffu);
  else reinterpret_cast<float*>(scales)[group] = scale;
}
#endif

// Casts x [num_tokens, hidden] to e4m3 with one scale per token and group of
// 128 channels, in correctly rounded float32 operations:
//   amax  = max(max_i |x_i|, 1e-4)
//   scale = amax * float32(1 / 448)
//   scale = 2^ceil(log2(scale))             if round_scale or use_ue8m0
//   out   = saturate_e4m3(x * (1 / scale))  (round to nearest even, clamp to ±448)
// This is the arithmetic of jax_ep/reference/fp8.py (multiplications by
// reciprocals, which XLA computes exactly, rather than divisions by a
// broadcast, which XLA rewrites), so kernel and reference agree bit for bit.
// scales is float32 [num_tokens, hidden / 128], or with use_ue8m0 int32
// [num_tokens, hidden / 512] whose byte j (little-endian) of word w holds the
// biased exponent (exponent + 127) of the scale of group 4 * w + j.
// x and out must be 16-byte aligned; hidden a multiple of 128 (512 with UE8M0).
cudaError_t launch_per_token_cast_to_fp8(const __nv_bfloat16* x, int num_tokens,
                                         int hidden, bool round_scale,
                                         bool use_ue8m0, __nv_fp8_e4m3* out,
                                         void* scales, cudaStream_t stream);
cudaError_t launch_per_token_cast_to_fp8(const float* x, int num_tokens,
                                         int hidden, bool round_scale,
                                         bool use_ue8m0, __nv_fp8_e4m3* out,
                                         void* scales, cudaStream_t stream);

// Inverse of the cast: out = float(x) * scale in float32, rounded to the output
// type (round to nearest even). scales as written by
// launch_per_token_cast_to_fp8; a packed UE8M0 byte e means the float32 with
// bits e << 23 (2^(e - 127), and 0 for e = 0).
cudaError_t launch_per_token_cast_back(const __nv_fp8_e4m3* x,
                                       const void* scales, int num_tokens,
                                       int hidden, bool use_ue8m0,
                                       __nv_bfloat16* out, cudaStream_t stream);
cudaError_t launch_per_token_cast_back(const __nv_fp8_e4m3* x,
                                       const void* scales, int num_tokens,
                                       int hidden, bool use_ue8m0, float* out,
                                       cudaStream_t stream);

}  // namespace jax_ep
