// The nanobind module jax_ep._C: hands the FFI handlers to Python as capsules.
//
//   registrations()   dict target name -> PyCapsule of the handler
//   cuda_arch_list()  CUDA architectures the kernels were compiled for
//   workspace_map     the registered buffer's map (cuda/workspace.cuh)
//   __version__       package version the module was built from
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "../cuda/intranode.cuh"
#include "../cuda/low_latency.cuh"
#include "runtime.h"

#include <cstddef>
#include <stdexcept>
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

// cuda/workspace.cuh as a dict: the sizes, and each workspace region's
// (mode, offset after the signal block, bytes).
nb::dict workspace_map() {
  namespace ws = jax_ep::workspace;
  nb::dict map, regions;
  map["signal_bytes"] = jax_ep::intranode::kSignalBytes;
  map["workspace_bytes"] = jax_ep::intranode::kWorkspaceBytes;
  map["staging_offset"] = ws::kStagingOffset;
  map["staging_align"] = jax_ep::intranode::kAlign;
  map["min_buffer_bytes"] = ws::kMinBufferBytes;
  for (const ws::Region& r : ws::kRegions) {
    regions[r.name] = nb::make_tuple(r.mode == 0 ? "normal" : "low_latency", r.offset, r.bytes);
  }
  map["regions"] = regions;
  return map;
}

nb::dict registrations() {
  nb::dict targets;
  targets["jax_ep_get_dispatch_layout"] =
      handler_capsule(jax_ep::GetDispatchLayoutHandler);
  targets["jax_ep_per_token_cast_to_fp8"] =
      handler_capsule(jax_ep::PerTokenCastToFp8Handler);
  targets["jax_ep_per_token_cast_back"] =
      handler_capsule(jax_ep::PerTokenCastBackHandler);
  targets["jax_ep_intranode_dispatch"] = handler_capsule(jax_ep::IntranodeDispatchHandler);
  targets["jax_ep_intranode_dispatch_fp8"] = handler_capsule(jax_ep::IntranodeDispatchFp8Handler);
  targets["jax_ep_intranode_cached_dispatch"] =
      handler_capsule(jax_ep::IntranodeCachedDispatchHandler);
  targets["jax_ep_intranode_combine"] = handler_capsule(jax_ep::IntranodeCombineHandler);
  targets["jax_ep_status"] = handler_capsule(jax_ep::StatusHandler);
  targets["jax_ep_ll_dispatch_send"] = handler_capsule(jax_ep::LowLatencyDispatchSendHandler);
  targets["jax_ep_ll_dispatch_recv"] = handler_capsule(jax_ep::LowLatencyDispatchRecvHandler);
  targets["jax_ep_ll_combine_send"] = handler_capsule(jax_ep::LowLatencyCombineSendHandler);
  targets["jax_ep_ll_combine_recv"] = handler_capsule(jax_ep::LowLatencyCombineRecvHandler);
  targets["jax_ep_ll_combine_gather_recv"] = handler_capsule(jax_ep::LowLatencyCombineGatherRecvHandler);
  targets["jax_ep_ll_dispatch_send_async"] = handler_capsule(jax_ep::LowLatencyDispatchSendAsyncHandler);
  targets["jax_ep_ll_dispatch_recv_async"] = handler_capsule(jax_ep::LowLatencyDispatchRecvAsyncHandler);
  targets["jax_ep_ll_combine_send_async"] = handler_capsule(jax_ep::LowLatencyCombineSendAsyncHandler);
  targets["jax_ep_ll_combine_recv_async"] = handler_capsule(jax_ep::LowLatencyCombineRecvAsyncHandler);
  return targets;
}

nb::bytes ipc_handle(int id) {
  const std::string h = jax_ep::Runtime::get().at(id)->ipc_handle();
  return nb::bytes(h.data(), h.size());
}

void open_peer_ipc(int id, int peer, nb::bytes handle) {
  jax_ep::Runtime::get().at(id)->open_peer_ipc(
      peer, std::string(static_cast<const char*>(handle.data()), handle.size()));
}

void open_peer_local(int id, int peer, int peer_id) {
  auto& runtime = jax_ep::Runtime::get();
  runtime.at(id)->open_peer_local(peer, *runtime.at(peer_id));
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
  m.def("create_intranode_buffer",
        [](int device, int rank, int num_ranks, size_t num_bytes, double timeout_s) {
          return jax_ep::Runtime::get().create(device, rank, num_ranks, num_bytes, timeout_s);
        },
        nb::arg("device"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("num_bytes"),
        nb::arg("timeout_s"),
        "Allocate this rank's registered buffer on `device`; returns its id.");
  m.def("create_external_buffer",
        [](int device, int rank, int num_ranks, size_t num_bytes, double timeout_s, uintptr_t local,
           const std::vector<uintptr_t>& peers) {
          std::vector<char*> ptrs;
          for (uintptr_t p : peers) ptrs.push_back(reinterpret_cast<char*>(p));
          return jax_ep::Runtime::get().create_external(device, rank, num_ranks, num_bytes, timeout_s,
                                                        reinterpret_cast<char*>(local), ptrs);
        },
        nb::arg("device"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("num_bytes"), nb::arg("timeout_s"),
        nb::arg("local"), nb::arg("peers"),
        "Register memory mapped elsewhere (an NVSHMEM symmetric allocation) as a buffer; returns its id.");
  m.def("create_intranode_group",
        [](const std::vector<int>& devices, size_t num_bytes, double timeout_s) {
          return jax_ep::Runtime::get().create_group(devices, num_bytes, timeout_s);
        },
        nb::arg("devices"), nb::arg("num_bytes"), nb::arg("timeout_s"),
        "One process driving several GPUs: a buffer per device (rank i on devices[i]), peers mapped "
        "through peer access; returns the group's id.");
  m.def("intranode_group_members", [](int id) { return jax_ep::Runtime::get().members(id); },
        "Member buffer ids of a group, in rank order.");
  m.def("group_barrier_selftest", &jax_ep::group_barrier_selftest, nb::arg("group_id"),
        "Run one barrier across a group's members (each on its own stream) and check it completed.");
  m.def("intranode_ipc_handle", &ipc_handle, "CUDA IPC handle (bytes) of a buffer.");
  m.def("open_intranode_peer_ipc", &open_peer_ipc, nb::arg("id"), nb::arg("peer"),
        nb::arg("handle"), "Map peer rank `peer`'s buffer from its IPC handle.");
  m.def("open_intranode_peer_local", &open_peer_local, nb::arg("id"), nb::arg("peer"),
        nb::arg("peer_id"), "Use buffer `peer_id` of this process as peer `peer` (peer access).");
  m.def("export_xla_memory",
        [](int id, uint64_t any_xla_ptr) {
          size_t size = 0;
          const int fd = jax_ep::Runtime::get().at(id)->export_xla_memory(any_xla_ptr, &size);
          return std::make_pair(fd, size);
        },
        nb::arg("id"), nb::arg("any_xla_ptr"),
        "Export the XLA allocation holding a device pointer: (POSIX fd the caller closes, bytes).");
  m.def("open_peer_xla_memory",
        [](int id, int peer, int fd, size_t size) {
          jax_ep::Runtime::get().at(id)->open_peer_xla_memory(peer, fd, size);
        },
        nb::arg("id"), nb::arg("peer"), nb::arg("fd"), nb::arg("size"),
        "Map peer rank `peer`'s XLA memory from its exported descriptor (the caller closes fd).");
  m.def("enable_xla_memory", [](int id, bool on) { jax_ep::Runtime::get().at(id)->enable_xla_memory(on); },
        nb::arg("id"), nb::arg("on"), "Let zero-copy combines read peers' XLA memory (every peer mapped).");
  m.def("xla_memory_enabled", [](int id) { return jax_ep::Runtime::get().xla_memory_enabled(id); },
        nb::arg("id"), "Whether zero-copy combines of a buffer (or of every member of a group) read peers' XLA memory.");
  m.def("share_group_xla_memory",
        [](int group_id, const std::vector<uint64_t>& probes) {
          std::vector<std::uintptr_t> p(probes.begin(), probes.end());
          jax_ep::Runtime::get().share_group_xla_memory(group_id, p);
        },
        nb::arg("group_id"), nb::arg("probes"),
        "One process, several GPUs: let every member's device read every member's XLA memory (probes[r]: any "
        "XLA buffer on member r's device) and enable zero-copy combines.");
  m.def("buffer_failure",
        [](int id) {
          const jax_ep::intranode::TimeoutRecord rec = jax_ep::Runtime::get().failure(id);
          nb::dict d;
          d["code"] = rec.code;
          d["rank"] = rec.rank;
          d["peer"] = rec.peer;
          d["op"] = rec.op;
          d["call"] = rec.epoch;
          d["message"] = jax_ep::timeout_message(rec);
          return d;
        },
        nb::arg("id"),
        "A buffer's failure record (code 0: none; else code, rank, peer, op, call and the message).");
  m.def("failure_message",
        [](int code, int rank, int peer, int op, unsigned long long call, unsigned long long peer_call,
           const std::vector<unsigned int>& mine, const std::vector<unsigned int>& theirs, double seconds) {
          jax_ep::intranode::TimeoutRecord rec{};
          rec.code = code;
          rec.rank = rank;
          rec.peer = peer;
          rec.op = op;
          rec.epoch = call;
          rec.peer_epoch = peer_call;
          rec.seconds = seconds;
          for (std::size_t i = 0; i < mine.size() && i < jax_ep::intranode::kSigFields; ++i) rec.mine[i] = mine[i];
          for (std::size_t i = 0; i < theirs.size() && i < jax_ep::intranode::kSigFields; ++i) rec.theirs[i] = theirs[i];
          return jax_ep::timeout_message(rec);
        },
        nb::arg("code"), nb::arg("rank"), nb::arg("peer"), nb::arg("op"), nb::arg("call"), nb::arg("peer_call"),
        nb::arg("mine"), nb::arg("theirs"), nb::arg("seconds") = 5.0,
        "The message of a failure record with these fields (what the host prints and raises).");
  m.attr("signature_fields") = static_cast<int>(jax_ep::intranode::kSigFields);
  m.def("inject_abort_for_test",
        [](int id, int raiser, int code) {
          jax_ep::IntranodeBuffer& b = *jax_ep::Runtime::get().at(id);
          const unsigned long long word =
              static_cast<unsigned long long>(code) << 32 | static_cast<unsigned long long>(raiser + 1);
          int previous = 0;
          cudaGetDevice(&previous);
          cudaSetDevice(b.device());
          const cudaError_t err = cudaMemcpy(b.local() + offsetof(jax_ep::intranode::Signals, abort), &word,
                                             sizeof(word), cudaMemcpyHostToDevice);
          cudaSetDevice(previous);
          if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
        },
        nb::arg("id"), nb::arg("raiser"), nb::arg("code"),
        "Test hook: raise the abort word in a buffer as if rank `raiser` had failed with `code`.");
  m.def("intranode_buffer_ready", [](int id) { return jax_ep::Runtime::get().at(id)->ready(); });
  m.def("intranode_staging_half_bytes",
        [](int id) { return jax_ep::Runtime::get().at(id)->staging_half_bytes(); });
  m.def("close_intranode_imports", [](int id) { jax_ep::Runtime::get().at(id)->close_imports(); },
        "Teardown's first half: wait for this rank's work, unmap every peer's memory.");
  m.def("destroy_intranode_buffer", [](int id) { jax_ep::Runtime::get().destroy(id); },
        "Free a buffer and unmap its peers (waits for the device).");
  m.def("combine_launch_shape",
        [](int num_ranks, int num_sms, int chunk_rows, int ring_rows) {
          const auto l = jax_ep::intranode::combine_launch(num_ranks, num_sms, chunk_rows, ring_rows);
          return std::make_pair(l.blocks, l.batch);
        },
        nb::arg("num_ranks"), nb::arg("num_sms"), nb::arg("chunk_rows"), nb::arg("ring_rows"),
        "(blocks, reducer batch) of the normal combine kernel's launch.");
  m.def("dispatch_staging_bytes", &jax_ep::intranode::dispatch_staging_bytes, nb::arg("num_tokens"),
        nb::arg("num_topk"), nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("row_bytes"),
        "Staging bytes (per half) a dispatch of these shapes needs.");
  m.def("row_staging_bytes", &jax_ep::intranode::row_staging_bytes, nb::arg("num_rows"),
        nb::arg("row_bytes"), "Staging bytes (per half) a combine or cached dispatch needs.");
  m.def("low_latency_buffer_bytes",
        [](int num_tokens, int max_tokens, int num_topk, int num_experts, int hidden, int payload,
           int num_ranks) {
          return jax_ep::low_latency::buffer_bytes(
              jax_ep::low_latency::Shape{num_tokens, max_tokens, num_topk, num_experts, hidden,
                                         static_cast<jax_ep::low_latency::Payload>(payload)},
              num_ranks);
        },
        nb::arg("num_tokens"), nb::arg("max_tokens"), nb::arg("num_topk"), nb::arg("num_experts"),
        nb::arg("hidden"), nb::arg("payload"), nb::arg("num_ranks"),
        "Bytes a low-latency buffer needs for calls of these shapes.");
  m.attr("workspace_map") = workspace_map();
  m.def("cuda_arch_list", &cuda_arch_list,
        "CUDA architectures the kernels were compiled for, e.g. ['90a'].");
}
