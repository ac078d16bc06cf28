// FFI handlers of the per-token FP8 casts.
//
// "jax_ep_per_token_cast_to_fp8"
//   operand  x       bf16[T, H] or f32[T, H]
//   attrs    round_scale: bool, use_ue8m0: bool
//   results  out     f8e4m3fn[T, H]
//            scales  f32[T, H / 128], or s32[T, H / 512] packed UE8M0 with use_ue8m0
//
// "jax_ep_per_token_cast_back"
//   operands x       f8e4m3fn[T, H]
//            scales  as above
//   attrs    use_ue8m0: bool
//   result   out     bf16[T, H] or f32[T, H] (the result dtype picks the kernel)
#include "../cuda/fp8.cuh"
#include "ffi_helpers.h"
#include "handlers.h"

namespace jax_ep {
namespace {

constexpr const char* kCastTarget = "jax_ep_per_token_cast_to_fp8";
constexpr const char* kCastBackTarget = "jax_ep_per_token_cast_back";

// Checks H and the scales buffer against the [T, H] data shape.
ffi::Error check_scales(const char* target, int64_t num_tokens, int64_t hidden,
                        bool use_ue8m0, const ffi::AnyBuffer& scales) {
  if (!fits_int(num_tokens) || !fits_int(hidden) ||
      num_tokens * hidden / kFp8GroupSize > INT32_MAX) {
    return invalid_argument(target, "tensor too large");
  }
  const int64_t multiple =
      use_ue8m0 ? int64_t{kFp8GroupSize} * kUe8m0ScalesPerWord : kFp8GroupSize;
  if (hidden <= 0 || hidden % multiple != 0) {
    return invalid_argument(target, "hidden size must be a positive multiple of " +
                                        std::to_string(multiple) + ", got " +
                                        std::to_string(hidden));
  }
  const ffi::DataType scale_type = use_ue8m0 ? ffi::S32 : ffi::F32;
  if (scales.element_type() != scale_type) {
    return invalid_argument(target, use_ue8m0 ? "scales must be int32 with use_ue8m0"
                                              : "scales must be float32");
  }
  const int64_t num_scales = hidden / multiple;
  if (!has_shape(scales.dimensions(), {num_tokens, num_scales})) {
    return shape_error(target, "scales", scales.dimensions(), {num_tokens, num_scales});
  }
  return ffi::Error::Success();
}

ffi::Error PerTokenCastToFp8(cudaStream_t stream, ffi::AnyBuffer x,
                             bool round_scale, bool use_ue8m0,
                             ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> scales) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) {
    return invalid_argument(kCastTarget, "x must be [T, H], got " + shape_string(dims));
  }
  const int64_t num_tokens = dims[0];
  const int64_t hidden = dims[1];
  if (ffi::Error err = check_scales(kCastTarget, num_tokens, hidden, use_ue8m0, *scales);
      err.failure()) {
    return err;
  }
  if (out->element_type() != ffi::F8E4M3FN) {
    return invalid_argument(kCastTarget, "out must be float8_e4m3fn");
  }
  if (!has_shape(out->dimensions(), {num_tokens, hidden})) {
    return shape_error(kCastTarget, "out", out->dimensions(), {num_tokens, hidden});
  }

  auto* q = static_cast<__nv_fp8_e4m3*>(out->untyped_data());
  void* s = scales->untyped_data();
  const int t = static_cast<int>(num_tokens);
  const int h = static_cast<int>(hidden);
  switch (x.element_type()) {
    case ffi::BF16:
      return launch_status(
          kCastTarget,
          launch_per_token_cast_to_fp8(static_cast<const __nv_bfloat16*>(x.untyped_data()),
                                       t, h, round_scale, use_ue8m0, q, s, stream));
    case ffi::F32:
      return launch_status(
          kCastTarget,
          launch_per_token_cast_to_fp8(static_cast<const float*>(x.untyped_data()), t,
                                       h, round_scale, use_ue8m0, q, s, stream));
    default:
      return invalid_argument(kCastTarget, "x must be bfloat16 or float32");
  }
}

ffi::Error PerTokenCastBack(cudaStream_t stream, ffi::AnyBuffer x,
                            ffi::AnyBuffer scales, bool use_ue8m0,
                            ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = x.dimensions();
  if (x.element_type() != ffi::F8E4M3FN || dims.size() != 2) {
    return invalid_argument(kCastBackTarget, "x must be float8_e4m3fn [T, H]");
  }
  const int64_t num_tokens = dims[0];
  const int64_t hidden = dims[1];
  if (ffi::Error err = check_scales(kCastBackTarget, num_tokens, hidden, use_ue8m0, scales);
      err.failure()) {
    return err;
  }
  if (!has_shape(out->dimensions(), {num_tokens, hidden})) {
    return shape_error(kCastBackTarget, "out", out->dimensions(), {num_tokens, hidden});
  }

  const auto* q = static_cast<const __nv_fp8_e4m3*>(x.untyped_data());
  const void* s = scales.untyped_data();
  const int t = static_cast<int>(num_tokens);
  const int h = static_cast<int>(hidden);
  switch (out->element_type()) {
    case ffi::BF16:
      return launch_status(
          kCastBackTarget,
          launch_per_token_cast_back(q, s, t, h, use_ue8m0,
                                     static_cast<__nv_bfloat16*>(out->untyped_data()),
                                     stream));
    case ffi::F32:
      return launch_status(
          kCastBackTarget,
          launch_per_token_cast_back(q, s, t, h, use_ue8m0,
                                     static_cast<float*>(out->untyped_data()), stream));
    default:
      return invalid_argument(kCastBackTarget, "out must be bfloat16 or float32");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerTokenCastToFp8Handler, PerTokenCastToFp8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<bool>("round_scale")
                                  .Attr<bool>("use_ue8m0")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerTokenCastBackHandler, PerTokenCastBack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<bool>("use_ue8m0")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_ep
