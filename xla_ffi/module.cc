// The nanobind module jax_ep._C: hands the FFI handlers to Python as capsules.
//
//   registrations()   dict target name -> PyCapsule of the handler
//   cuda_arch_list()  CUDA architectures the kernels were compiled for
//   __version__       package version the module was built from
#include <nanobind/nanobind.h>

#include <string>
#include <string_view>

#include "handlers.h"

#ifndef JAX_EP_VERSION
#define JAX_EP_VERSION "unknown"
#endif
#ifndef JAX_EP_CUDA_ARCHITECTURES
#define JAX_EP_CUDA_ARCHITECTURES ""
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict registrations() {
  nb::dict targets;
  targets["jax_ep_get_dispatch_layout"] =
      handler_capsule(jax_ep::GetDispatchLayoutHandler);
  targets["jax_ep_per_token_cast_to_fp8"] =
      handler_capsule(jax_ep::PerTokenCastToFp8Handler);
  targets["jax_ep_per_token_cast_back"] =
      handler_capsule(jax_ep::PerTokenCastBackHandler);
  return targets;
}

// "90a;100a" -> ["90a", "100a"]
nb::list cuda_arch_list() {
  nb::list archs;
  std::string_view all = JAX_EP_CUDA_ARCHITECTURES;
  while (!all.empty()) {
    const size_t end = all.find(';');
    const std::string_view arch = all.substr(0, end);
    if (!arch.empty()) archs.append(nb::str(arch.data(), arch.size()));
    if (end == std::string_view::npos) break;
    all.remove_prefix(end + 1);
  }
  return archs;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "jax_ep CUDA kernels as XLA FFI handlers.";
  m.attr("__version__") = JAX_EP_VERSION;
  m.def("registrations", &registrations,
        "Map of XLA FFI target name to handler capsule (platform CUDA).");
  m.def("cuda_arch_list", &cuda_arch_list,
        "CUDA architectures the kernels were compiled for, e.g. ['90a'].");
}
