// The nanobind module jax_ep._nvshmem: the NVSHMEM transport's runtime
// (nvshmem_runtime.h), kept out of jax_ep._C so that _C never needs
// libnvshmem_host.so.3. jax_ep/nvshmem.py is its Python face.
//
//   get_unique_id() -> bytes                 on one PE; share the bytes
//   init(rank, num_ranks, unique_id, device=0) -> bool   True: initialised here
//   initialized() -> bool, init_status() -> int, my_pe(), n_pes()
//   malloc(num_bytes) -> int                 collective, zeroed symmetric buffer id
//   free(id)                                 collective
//   size(id), local_pointer(id)
//   peer_pointers(id) -> list[int | None]    nvshmem_ptr per PE (None: no P2P)
//   transport(pe) -> "p2p" | "rdma" | "none"
//   barrier_all(), finalize()
//   version() -> str                         the loaded host library ("3.4.5")
//   build_version() -> str                   headers / device library of this build
//   self_test_bytes(num_pes), self_test(id, round=1) -> str   "" when it passed
//   copy_to_device(ptr, bytes), copy_from_device(ptr, n) -> bytes
//   registrations() -> dict                  FFI target name -> handler capsule (the put path, internode)
//   internode_buffer_bytes(op, T, K, E, N, L, Cn, C, row_bytes, cols, layout=0, channels=1, rdma_chunk=1,
//                          rdma_ring=1, nvl_chunk=1, nvl_ring=1) -> bytes an internode call needs
//   create_put_buffer(device, rank, num_ranks, local, num_bytes, mapped, paths, timeout_s) -> int
//   destroy_put_buffer(id)
//   put_buffer_failure(id) -> dict           the failure record: code (0: none), rank, peer, op,
//                                            call, peer_call, seconds, and a mismatch's signatures
//                                            mine, theirs (all zero for an unknown id)
//   put_buffer_bytes(T, M, K, E, H, payload, num_ranks) -> int   0: shapes the put kernels refuse
//
// Blocking calls release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "handlers_nvshmem.h"
#include "ll_put_buffers.h"
#include "../cuda/internode.cuh"
#include "nvshmem_runtime.h"

#ifndef JAX_EP_VERSION
#define JAX_EP_VERSION "unknown"
#endif

namespace nb = nanobind;
namespace rt = jax_ep::nvshmem;

namespace {

nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

std::string from_bytes(const nb::bytes& b) {
  return std::string(static_cast<const char*>(b.data()), b.size());
}

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict registrations() {
  nb::dict targets;
  targets["jax_ep_ll_put_dispatch_send"] = handler_capsule(jax_ep::LowLatencyPutDispatchSendHandler);
  targets["jax_ep_ll_put_dispatch_recv"] = handler_capsule(jax_ep::LowLatencyPutDispatchRecvHandler);
  targets["jax_ep_ll_put_combine_send"] = handler_capsule(jax_ep::LowLatencyPutCombineSendHandler);
  targets["jax_ep_ll_put_combine_recv"] = handler_capsule(jax_ep::LowLatencyPutCombineRecvHandler);
  targets["jax_ep_ll_put_combine_gather_recv"] = handler_capsule(jax_ep::LowLatencyPutCombineGatherRecvHandler);
  targets["jax_ep_ll_put_status"] = handler_capsule(jax_ep::LowLatencyPutStatusHandler);
  targets["jax_ep_internode_dispatch"] = handler_capsule(jax_ep::InternodeDispatchHandler);
  targets["jax_ep_internode_dispatch_fp8"] = handler_capsule(jax_ep::InternodeDispatchFp8Handler);
  targets["jax_ep_internode_cached_dispatch"] = handler_capsule(jax_ep::InternodeCachedDispatchHandler);
  targets["jax_ep_internode_combine"] = handler_capsule(jax_ep::InternodeCombineHandler);
  return targets;
}

}  // namespace

NB_MODULE(_nvshmem, m) {
  m.doc() = "jax_ep NVSHMEM transport: bootstrap, symmetric buffers, peer pointers";
  m.attr("__version__") = JAX_EP_VERSION;
  m.attr("unique_id_bytes") = rt::unique_id_bytes();

  m.def("get_unique_id", [] {
    std::string id;
    {
      nb::gil_scoped_release release;
      id = rt::get_unique_id();
    }
    return to_bytes(id);
  });
  m.def(
      "init",
      [](int rank, int num_ranks, nb::bytes unique_id, int device) {
        const std::string id = from_bytes(unique_id);
        nb::gil_scoped_release release;
        return rt::init(device, rank, num_ranks, id);
      },
      nb::arg("rank"), nb::arg("num_ranks"), nb::arg("unique_id"), nb::arg("device") = 0);
  m.def("initialized", &rt::initialized);
  m.def("init_status", &rt::init_status);
  m.def("my_pe", &rt::my_pe);
  m.def("n_pes", &rt::n_pes);
  m.def("malloc", &rt::malloc, nb::arg("num_bytes"), nb::call_guard<nb::gil_scoped_release>());
  m.def("free", &rt::free, nb::arg("id"), nb::call_guard<nb::gil_scoped_release>());
  m.def("size", &rt::size, nb::arg("id"));
  m.def("local_pointer", &rt::local, nb::arg("id"));
  m.def(
      "peer_pointers",
      [](int id) {
        nb::list out;
        for (std::uintptr_t p : rt::peer_pointers(id)) {
          if (p == 0) out.append(nb::none());
          else out.append(nb::int_(p));
        }
        return out;
      },
      nb::arg("id"));
  m.def("transport", &rt::transport, nb::arg("pe"));
  m.def("barrier_all", &rt::barrier_all, nb::call_guard<nb::gil_scoped_release>());
  m.def("finalize", &rt::finalize, nb::call_guard<nb::gil_scoped_release>());
  m.def("version", &rt::library_version);
  m.def("build_version", &rt::build_version);
  m.def("self_test_bytes", &rt::self_test_bytes, nb::arg("num_pes"));
  m.def("self_test", &rt::self_test, nb::arg("id"), nb::arg("round") = 1,
        nb::call_guard<nb::gil_scoped_release>());
  m.def("registrations", &registrations);
  m.def(
      "create_put_buffer",
      [](int device, int rank, int num_ranks, std::uintptr_t local, std::size_t num_bytes,
         const std::vector<std::uintptr_t>& mapped, const std::vector<int>& paths, double timeout_s) {
        return jax_ep::ll_put::create_put_buffer(device, rank, num_ranks, local, num_bytes, mapped, paths, timeout_s);
      },
      nb::arg("device"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("local"), nb::arg("num_bytes"),
      nb::arg("mapped"), nb::arg("paths"), nb::arg("timeout_s"));
  m.def("destroy_put_buffer", &jax_ep::ll_put::destroy_put_buffer, nb::arg("id"));
  m.def(
      "put_buffer_failure",
      [](int id) {
        jax_ep::intranode::TimeoutRecord rec{};
        {
          nb::gil_scoped_release release;  // may wait up to 100 ms for a record being written
          rec = jax_ep::ll_put::put_buffer_failure(id);
        }
        nb::dict d;
        d["code"] = rec.code;
        d["rank"] = rec.rank;
        d["peer"] = rec.peer;
        d["op"] = rec.op;
        d["call"] = rec.epoch;
        d["peer_call"] = rec.peer_epoch;
        d["seconds"] = rec.seconds;
        nb::list mine, theirs;  // a mismatch's signatures (intranode::SigField order)
        for (int i = 0; i < jax_ep::intranode::kSigFields; ++i) {
          mine.append(rec.mine[i]);
          theirs.append(rec.theirs[i]);
        }
        d["mine"] = mine;
        d["theirs"] = theirs;
        return d;
      },
      nb::arg("id"));
  m.def(
      "put_buffer_bytes",
      [](int t, int m, int k, int e, int h, int payload, int num_ranks) -> std::size_t {
        const jax_ep::ll_put::Shape s{t, m, k, e, h, static_cast<jax_ep::ll_put::Payload>(payload), false};
        return jax_ep::ll_put::supported(s, num_ranks) ? jax_ep::ll_put::buffer_bytes(s, num_ranks) : 0;
      },
      nb::arg("num_tokens"), nb::arg("max_tokens"), nb::arg("num_topk"), nb::arg("num_experts"), nb::arg("hidden"),
      nb::arg("payload"), nb::arg("num_ranks"));
  m.def(
      "internode_buffer_bytes",
      [](int op, int t, int k, int e, int n, int l, int cn, int c, int row_bytes, int cols, int layout, int channels,
         int rdma_chunk, int rdma_ring, int nvl_chunk, int nvl_ring) -> std::size_t {
        const jax_ep::internode::Shape s{static_cast<jax_ep::internode::Op>(op), t, k, e, n, l, cn, c, row_bytes,
                                         cols, layout, 1, channels, rdma_chunk, rdma_ring, nvl_chunk, nvl_ring};
        return jax_ep::internode::buffer_bytes(s);
      },
      nb::arg("op"), nb::arg("num_tokens"), nb::arg("num_topk"), nb::arg("num_experts"), nb::arg("num_nodes"),
      nb::arg("ranks_per_node"), nb::arg("node_capacity"), nb::arg("capacity"), nb::arg("row_bytes"),
      nb::arg("cols"), nb::arg("layout") = 0, nb::arg("channels") = 1, nb::arg("rdma_chunk") = 1,
      nb::arg("rdma_ring") = 1, nb::arg("nvl_chunk") = 1, nb::arg("nvl_ring") = 1);
  m.def(
      "copy_to_device",
      [](std::uintptr_t dst, nb::bytes data) {
        const std::string s = from_bytes(data);
        nb::gil_scoped_release release;
        rt::copy_to_device(dst, s);
      },
      nb::arg("ptr"), nb::arg("data"));
  m.def(
      "copy_from_device",
      [](std::uintptr_t src, std::size_t num_bytes) {
        std::string s;
        {
          nb::gil_scoped_release release;
          s = rt::copy_from_device(src, num_bytes);
        }
        return to_bytes(s);
      },
      nb::arg("ptr"), nb::arg("num_bytes"));
}
