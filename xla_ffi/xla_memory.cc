#include "xla_memory.h"

#include <cuda.h>  // driver types only: the functions come from cudaGetDriverEntryPointByVersion
#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>

namespace jax_ep {
namespace xla_memory {
namespace {

struct Driver {
  CUresult (*get_address_range)(CUdeviceptr*, size_t*, CUdeviceptr) = nullptr;
  CUresult (*retain_allocation_handle)(CUmemGenericAllocationHandle*, void*) = nullptr;
  CUresult (*get_allocation_properties)(CUmemAllocationProp*, CUmemGenericAllocationHandle) = nullptr;
  CUresult (*export_to_shareable_handle)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                                         unsigned long long) = nullptr;
  CUresult (*import_from_shareable_handle)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*address_reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*address_free)(CUdeviceptr, size_t) = nullptr;
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*get_access)(unsigned long long*, const CUmemLocation*, CUdeviceptr) = nullptr;  // optional
  CUresult (*get_error_name)(CUresult, const char**) = nullptr;
};

template <class F>
void load(const char* name, F* fn, std::string* missing) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || p == nullptr) {
    cudaGetLastError();
    if (missing->empty()) *missing = name;
    return;
  }
  *fn = reinterpret_cast<F>(p);
}

const Driver& driver() {
  static Driver d;
  static std::string missing;
  static std::once_flag once;
  std::call_once(once, [] {
    load("cuMemGetAddressRange", &d.get_address_range, &missing);
    load("cuMemRetainAllocationHandle", &d.retain_allocation_handle, &missing);
    load("cuMemGetAllocationPropertiesFromHandle", &d.get_allocation_properties, &missing);
    load("cuMemExportToShareableHandle", &d.export_to_shareable_handle, &missing);
    load("cuMemImportFromShareableHandle", &d.import_from_shareable_handle, &missing);
    load("cuMemRelease", &d.release, &missing);
    load("cuMemAddressReserve", &d.address_reserve, &missing);
    load("cuMemAddressFree", &d.address_free, &missing);
    load("cuMemMap", &d.map, &missing);
    load("cuMemUnmap", &d.unmap, &missing);
    load("cuMemSetAccess", &d.set_access, &missing);
    load("cuGetErrorName", &d.get_error_name, &missing);
    std::string optional;
    load("cuMemGetAccess", &d.get_access, &optional);
  });
  if (!missing.empty()) throw std::runtime_error("the CUDA driver has no " + missing);
  return d;
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const char* name = "unknown error";
  if (driver().get_error_name != nullptr) driver().get_error_name(r, &name);
  throw std::runtime_error(std::string(what) + " failed: " + name);
}

// Makes `device`'s primary context current (the driver calls need one).
void use_device(int device) {
  if (cudaSetDevice(device) != cudaSuccess || cudaFree(nullptr) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cannot make device " + std::to_string(device) + " current");
  }
}

CUdeviceptr address(const void* p) { return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(p)); }

// Lets `device` read [va, va + size): read-only where the driver takes it (a
// stray write then faults), else read/write (a driver that refuses
// read-only device mappings; the kernels still only read).
CUresult set_read_access(const Driver& d, CUdeviceptr va, std::size_t size, int device) {
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  if (d.set_access(va, size, &access, 1) == CUDA_SUCCESS) return CUDA_SUCCESS;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return d.set_access(va, size, &access, 1);
}

}  // namespace

Allocation find(int device, const void* ptr) {
  use_device(device);
  CUdeviceptr base = 0;
  size_t size = 0;
  check(driver().get_address_range(&base, &size, address(ptr)), "cuMemGetAddressRange");
  return Allocation{reinterpret_cast<char*>(static_cast<std::uintptr_t>(base)), size};
}

int export_fd(int device, const Allocation& allocation) {
  use_device(device);
  const Driver& d = driver();
  CUmemGenericAllocationHandle handle = 0;
  // Memory from cudaMalloc has no virtual-memory handle: the driver says so here.
  check(d.retain_allocation_handle(&handle, allocation.base),
        "cuMemRetainAllocationHandle (XLA's memory is not a CUDA virtual-memory allocation)");
  CUmemAllocationProp prop{};
  CUresult r = d.get_allocation_properties(&prop, handle);
  int fd = -1;
  if (r == CUDA_SUCCESS && !(prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) {
    d.release(handle);
    throw std::runtime_error("XLA's memory allocation cannot be exported as a POSIX file descriptor");
  }
  if (r == CUDA_SUCCESS) r = d.export_to_shareable_handle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  d.release(handle);  // the descriptor keeps the allocation
  check(r, "cuMemExportToShareableHandle");
  return fd;
}

char* import_fd(int device, int fd, std::size_t size) {
  use_device(device);
  const Driver& d = driver();
  CUmemGenericAllocationHandle handle = 0;
  check(d.import_from_shareable_handle(&handle, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)),
                                       CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle");
  CUdeviceptr va = 0;
  CUresult r = d.address_reserve(&va, size, 0, 0, 0);
  if (r == CUDA_SUCCESS) {
    r = d.map(va, size, 0, handle, 0);
    if (r != CUDA_SUCCESS) d.address_free(va, size);
  }
  d.release(handle);  // the mapping keeps the allocation
  check(r, "mapping a peer's XLA memory (cuMemAddressReserve, cuMemMap)");
  r = set_read_access(d, va, size, device);  // peers only read a rank's rows
  if (r != CUDA_SUCCESS) {
    d.unmap(va, size);
    d.address_free(va, size);
    check(r, "cuMemSetAccess on a peer's XLA memory");
  }
  return reinterpret_cast<char*>(static_cast<std::uintptr_t>(va));
}

bool still_holds(const Allocation& allocation, const void* ptr) {
  const Driver* d = nullptr;
  try {
    d = &driver();
  } catch (const std::runtime_error&) {
    return false;
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  if (d->get_address_range(&base, &size, address(ptr)) != CUDA_SUCCESS) {
    cudaGetLastError();
    return false;
  }
  return reinterpret_cast<char*>(static_cast<std::uintptr_t>(base)) == allocation.base && size == allocation.size;
}

void unmap(char* base, std::size_t size) {
  const Driver& d = driver();
  d.unmap(address(base), size);
  d.address_free(address(base), size);
}

void grant_access(int owner, const Allocation& allocation, int device) {
  use_device(owner);
  const Driver& d = driver();
  CUmemGenericAllocationHandle handle = 0;
  if (d.retain_allocation_handle(&handle, allocation.base) != CUDA_SUCCESS) return;  // cudaMalloc memory
  d.release(handle);
  // XLA's own mapping: never take away access XLA (or a library it uses)
  // granted `device` already, which may include writes. Only where `device`
  // has none is it made able to read (the other members only read).
  CUmemLocation location{};
  location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  location.id = device;
  unsigned long long current = CU_MEM_ACCESS_FLAGS_PROT_NONE;
  if (d.get_access != nullptr && d.get_access(&current, &location, address(allocation.base)) == CUDA_SUCCESS &&
      current != CU_MEM_ACCESS_FLAGS_PROT_NONE) {
    return;
  }
  check(set_read_access(d, address(allocation.base), allocation.size, device),
        ("cuMemSetAccess for device " + std::to_string(device) + " on device " + std::to_string(owner) +
         "'s XLA memory").c_str());
}

}  // namespace xla_memory
}  // namespace jax_ep
