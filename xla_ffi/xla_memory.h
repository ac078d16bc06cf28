// Sharing XLA's device memory between rank processes (the zero-copy
// low-latency combine reads expert outputs straight from the rank that
// computed them).
//
// XLA's GPU allocator reserves its pool as one CUDA virtual-memory allocation
// (cuMemCreate) whose handle can be exported as a POSIX file descriptor. A
// rank exports the allocation holding any of its XLA buffers; a peer that
// received the descriptor (over a Unix socket: jax_ep/runtime.py) imports it
// and maps it into its own address space. Buffers are then reached at the same
// offset from the allocation's base in every process.
//
// The driver API is reached through cudaGetDriverEntryPointByVersion: the
// extension does not link libcuda, so it still loads where there is no GPU.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace jax_ep {
namespace xla_memory {

struct Allocation {
  char* base = nullptr;   // start of the allocation in this process
  std::size_t size = 0;   // bytes
};

// The allocation that holds device address `ptr` on `device`.
Allocation find(int device, const void* ptr);

// Exports `allocation` (from find) as a POSIX file descriptor the caller
// owns. Throws std::runtime_error saying why when it cannot be shared (for
// example an allocator that does not use exportable virtual memory).
int export_fd(int device, const Allocation& allocation);

// Maps an allocation of `size` bytes exported by another process (the caller
// keeps and closes `fd`) read-only for `device` (read/write where the
// driver refuses read-only device mappings); returns its base here.
char* import_fd(int device, int fd, std::size_t size);

// Whether `ptr` (in the current context) still lies in exactly `allocation`
// (the same base and size): false once XLA has replaced that allocation.
bool still_holds(const Allocation& allocation, const void* ptr);

// Undoes import_fd.
void unmap(char* base, std::size_t size);

// One process driving several GPUs: lets `device` read
// `allocation` (from find on `owner`), which XLA mapped for `owner` only;
// access `device` already has (maybe read/write, granted by XLA) is kept.
// Memory that is not a virtual-memory allocation (cudaMalloc) needs nothing
// here: peer access between the two devices already reaches it.
void grant_access(int owner, const Allocation& allocation, int device);

}  // namespace xla_memory
}  // namespace jax_ep
