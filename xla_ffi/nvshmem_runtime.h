// The jax_ep NVSHMEM transport: host library bootstrap, symmetric buffers and
// their peer pointers, and a device-side self test.
//
// Built only into the separate module jax_ep._nvshmem (cmake/nvshmem.cmake), so
// that jax_ep._C never needs libnvshmem. This header names no NVSHMEM type:
// the nanobind module and, later, FFI handlers include it with a plain C++
// compiler; nvshmem_runtime.cc (compiled as CUDA with relocatable device code
// and device-linked against libnvshmem_device.a) holds every NVSHMEM call.
//
// One process per PE. A symmetric buffer is allocated collectively
// (nvshmem_malloc: every PE calls with the same size, in the same order) and
// identified by a small integer id, the same on every PE.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace jax_ep {
namespace nvshmem {

// Bytes of an NVSHMEM unique id (nvshmemx_uniqueid_t).
std::size_t unique_id_bytes();

// A fresh unique id (call on one PE, share the bytes with the others).
std::string get_unique_id();

// Initialises NVSHMEM as PE `rank` of `num_ranks` on CUDA device `device`
// (the local ordinal) with the unique-id bootstrap. When the host library is
// already initialised in this process (by an earlier call, by XLA or by
// nvshmem4py) it is reused: the PE numbering must match, and this module's
// device code is registered with the host library (nvshmemx_culibrary_init).
// Returns true when this call initialised the library, false when it reused it.
bool init(int device, int rank, int num_ranks, const std::string& unique_id);
bool initialized();       // init (or reuse) done and not finalised
int init_status();        // nvshmemx_init_status()
int my_pe();
int n_pes();

// Collective: every PE calls with the same size in the same order. Zeroed, and
// every PE has zeroed its part before any returns. Returns the buffer id.
int malloc(std::size_t num_bytes);
void free(int id);        // collective too
std::size_t size(int id);
std::uintptr_t local(int id);
// nvshmem_ptr of the buffer for each PE: 0 where the PE is not reachable by
// load/store (P2P) from this process.
std::vector<std::uintptr_t> peer_pointers(int id);
// "p2p" when nvshmem_ptr reaches the PE, otherwise "rdma" (a remote transport
// is configured) or "none" (NVSHMEM_REMOTE_TRANSPORT=none).
std::string transport(int pe);

void barrier_all();       // host-side nvshmem_barrier_all
void finalize();          // frees every buffer; nvshmem_finalize if init() started it

// "3.4.5": the NVSHMEM host library's vendor version (as it reports itself).
std::string library_version();
// The version of the headers and device library this module was built with.
std::string build_version();

// Device-side round trip on buffer `id` (needs >= self_test_bytes(n_pes())):
// every PE nvshmem_int_p's a word to every PE, putmem_nbi_block's a chunk to
// the next PE, nvshmem_quiet, device barrier_all, then checks what it got.
// `round` makes successive calls write different values. Collective (every PE
// must call it, or the device barrier never completes). Returns "" on success,
// otherwise what was wrong.
std::size_t self_test_bytes(int num_pes);
std::string self_test(int id, int round);

// Synchronous copies between host bytes and a device address (peer pointers
// included): for tests.
void copy_to_device(std::uintptr_t dst, const std::string& data);
std::string copy_from_device(std::uintptr_t src, std::size_t num_bytes);

}  // namespace nvshmem
}  // namespace jax_ep
