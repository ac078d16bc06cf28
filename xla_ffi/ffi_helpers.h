// Helpers shared by the jax_ep XLA FFI handlers: shape checks and error
// messages. Handlers bind buffers, attributes and the stream, validate shapes,
// call a kernel launcher and turn its status into an ffi::Error.
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

namespace ffi = xla::ffi;

// The handlers' typed buffers: int32 of rank 0-3, float32 [rows, cols], and
// boolean [n] and [rows, cols].
using I32_0 = ffi::Buffer<ffi::S32, 0>;
using I32_1 = ffi::Buffer<ffi::S32, 1>;
using I32_2 = ffi::Buffer<ffi::S32, 2>;
using I32_3 = ffi::Buffer<ffi::S32, 3>;
using F32_2 = ffi::Buffer<ffi::F32, 2>;
using Mask = ffi::Buffer<ffi::PRED, 1>;
using Pred2 = ffi::Buffer<ffi::PRED, 2>;

// "[4096, 8]"
inline std::string shape_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i != 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

inline std::string shape_string(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

inline bool has_shape(ffi::AnyBuffer::Dimensions dims,
                      std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t d : expected) {
    if (dims[i++] != d) return false;
  }
  return true;
}

// InvalidArgument naming the target and the buffer whose shape is wrong.
inline ffi::Error shape_error(std::string_view target, std::string_view buffer,
                              ffi::AnyBuffer::Dimensions got,
                              std::initializer_list<int64_t> expected) {
  return ffi::Error::InvalidArgument(
      std::string(target) + ": " + std::string(buffer) + " has shape " +
      shape_string(got) + ", expected " + shape_string(expected));
}

inline ffi::Error invalid_argument(std::string_view target, std::string_view what) {
  return ffi::Error::InvalidArgument(std::string(target) + ": " + std::string(what));
}

// A size that the int-based kernel launchers can take.
inline bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// Turns the status of a kernel launch into an ffi::Error.
inline ffi::Error launch_status(std::string_view target, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(target) + ": kernel launch failed: " +
                              cudaGetErrorName(err) + " (" +
                              cudaGetErrorString(err) + ")");
}

}  // namespace jax_ep
