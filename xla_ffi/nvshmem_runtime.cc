// The jax_ep NVSHMEM transport (see nvshmem_runtime.h).
//
// Compiled as CUDA with relocatable device code; the module that holds it is
// device-linked against libnvshmem_device.a (cmake/nvshmem.cmake). Device code
// that calls NVSHMEM only works in a module registered with the initialised host
// library: init() below initialises through nvshmemi_init_thread, which lives in
// libnvshmem_device.a and registers this module's device state itself; when the
// host library was initialised by someone else, init() registers this module
// with nvshmemx_culibrary_init instead.
#include "nvshmem_runtime.h"

#include <cuda.h>  // CUlibrary / CUkernel types only: no link against libcuda
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

namespace jax_ep {
namespace nvshmem {
namespace {

constexpr int kChunkInts = 1024;        // ints of the putmem_nbi_block chunk
constexpr std::size_t kAlign = 256;
constexpr int kSelfTestThreads = 256;

__host__ __device__ constexpr std::size_t align_up(std::size_t x) {
  return (x + kAlign - 1) / kAlign * kAlign;
}
// Bytes of the slot array of n PEs.
__host__ __device__ constexpr std::size_t slot_bytes(int n) {
  return align_up(sizeof(int) * static_cast<std::size_t>(n));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep nvshmem: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

struct Buffer {
  void* ptr = nullptr;
  std::size_t num_bytes = 0;
};

struct State {
  std::mutex mutex;
  bool initialized = false;
  bool owned = false;          // this module initialised the host library
  CUlibrary library = nullptr;  // registered with nvshmemx_culibrary_init (reuse path)
  int device = 0;
  void* probe = nullptr;       // small symmetric allocation for transport()
  int* test_result = nullptr;  // self_test: device words {errors, where, value}
  cudaStream_t test_stream = nullptr;
  int next_id = 1;
  std::map<int, Buffer> buffers;
};

State& state() {
  static State* s = new State();  // never destroyed: may be used at exit
  return *s;
}

void require_initialized(const State& s) {
  if (!s.initialized) {
    throw std::runtime_error(
        "jax_ep nvshmem: NVSHMEM is not initialised in this process (call "
        "jax_ep.nvshmem.initialize() first)");
  }
}

void set_device(const State& s) { check(cudaSetDevice(s.device), "cudaSetDevice"); }

__host__ __device__ inline int code(int pe, int round, int i) {
  return ((round & 0x7f) << 24) | ((pe & 0xff) << 16) | (i & 0xffff);
}

// One block. Layout of the buffer: [slots: n ints][chunk from the previous PE][source chunk].
__global__ void self_test_kernel(char* base, int me, int n, int round, int* result) {
  int* slots = reinterpret_cast<int*>(base);
  int* region = reinterpret_cast<int*>(base + slot_bytes(n));
  int* source = region + kChunkInts;
  for (int i = threadIdx.x; i < kChunkInts; i += blockDim.x) source[i] = code(me, round, i);
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int pe = 0; pe < n; ++pe) nvshmem_int_p(slots + me, code(me, round, 0xffff), pe);
  }
  nvshmemx_putmem_nbi_block(region, source, sizeof(int) * kChunkInts, (me + 1) % n);
  nvshmem_quiet();
  __syncthreads();
  nvshmemx_barrier_all_block();
  // Volatile loads: round r+1 must not see round r's values from L1.
  const volatile int* vslots = slots;
  const volatile int* vregion = region;
  for (int pe = threadIdx.x; pe < n; pe += blockDim.x) {
    if (vslots[pe] != code(pe, round, 0xffff)) {
      if (atomicAdd(result, 1) == 0) { result[1] = -1 - pe; result[2] = vslots[pe]; }
    }
  }
  const int prev = (me + n - 1) % n;
  for (int i = threadIdx.x; i < kChunkInts; i += blockDim.x) {
    if (vregion[i] != code(prev, round, i)) {
      if (atomicAdd(result, 1) == 0) { result[1] = i; result[2] = vregion[i]; }
    }
  }
  __syncthreads();
  // Nobody starts the next round's writes before every PE has checked this one.
  nvshmemx_barrier_all_block();
}


// This module's CUlibrary (the CUDA runtime loads the module's fatbin as one),
// found through a kernel of the module; cuKernelGetLibrary comes through the
// runtime's driver entry point so that the module does not link libcuda.
CUlibrary this_library() {
  cudaKernel_t kernel = nullptr;
  check(cudaGetKernel(&kernel, reinterpret_cast<const void*>(&self_test_kernel)), "cudaGetKernel");
  using GetLibrary = CUresult (*)(CUlibrary*, CUkernel);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  // The entry point exists from CUDA 12.5 (PFN_cuKernelGetLibrary_v12050): asking for an older
  // ABI version finds nothing.
  check(cudaGetDriverEntryPointByVersion("cuKernelGetLibrary", &fn, 12050, cudaEnableDefault, &found),
        "cudaGetDriverEntryPointByVersion(cuKernelGetLibrary)");
  if (fn == nullptr || found != cudaDriverEntryPointSuccess) {
    throw std::runtime_error("jax_ep nvshmem: the CUDA driver has no cuKernelGetLibrary (it needs a driver "
                             "for CUDA 12.5 or later)");
  }
  CUlibrary library = nullptr;
  const CUresult rc = reinterpret_cast<GetLibrary>(fn)(&library, reinterpret_cast<CUkernel>(kernel));
  if (rc != CUDA_SUCCESS || library == nullptr) {
    throw std::runtime_error("jax_ep nvshmem: cuKernelGetLibrary failed with CUresult " +
                             std::to_string(static_cast<int>(rc)));
  }
  return library;
}

std::string version_string(int major, int minor, int patch) {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

}  // namespace

std::size_t unique_id_bytes() { return sizeof(nvshmemx_uniqueid_t); }

std::string get_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int rc = nvshmemx_get_uniqueid(&id);
  if (rc != 0) {
    throw std::runtime_error("jax_ep nvshmem: nvshmemx_get_uniqueid failed with status " +
                             std::to_string(rc) +
                             " (the unique-ID bootstrap plugin nvshmem_bootstrap_uid.so.3 must sit "
                             "next to libnvshmem_host.so.3; NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME picks "
                             "the network interface)");
  }
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

bool init(int device, int rank, int num_ranks, const std::string& unique_id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (num_ranks < 1 || rank < 0 || rank >= num_ranks) {
    throw std::invalid_argument("jax_ep nvshmem: need 0 <= rank < num_ranks, got rank " +
                                std::to_string(rank) + " of " + std::to_string(num_ranks));
  }
  if (s.initialized) {
    if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
      throw std::runtime_error("jax_ep nvshmem: already initialised as PE " +
                               std::to_string(nvshmem_my_pe()) + " of " +
                               std::to_string(nvshmem_n_pes()) + ", asked for " +
                               std::to_string(rank) + " of " + std::to_string(num_ranks));
    }
    return false;
  }
  s.device = device;
  set_device(s);
  check(cudaFree(nullptr), "CUDA context creation");
  const int status = nvshmemx_init_status();
  bool owned = false;
  if (status >= NVSHMEM_STATUS_IS_INITIALIZED) {
    // Someone else (XLA, nvshmem4py) initialised the host library: register our
    // device code with it.
    if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
      throw std::runtime_error("jax_ep nvshmem: NVSHMEM was initialised elsewhere as PE " +
                               std::to_string(nvshmem_my_pe()) + " of " +
                               std::to_string(nvshmem_n_pes()) + ", but this is rank " +
                               std::to_string(rank) + " of " + std::to_string(num_ranks));
    }
    CUlibrary library = this_library();
    const int rc = nvshmemx_culibrary_init(library);
    if (rc != 0) {
      throw std::runtime_error("jax_ep nvshmem: nvshmemx_culibrary_init failed with status " +
                               std::to_string(rc));
    }
    s.library = library;
  } else {
    if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
      throw std::invalid_argument("jax_ep nvshmem: a unique id has " +
                                  std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
                                  std::to_string(unique_id.size()));
    }
    nvshmemx_uniqueid_t id;
    std::memcpy(&id, unique_id.data(), sizeof(id));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    int rc = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr);
    if (rc != 0) {
      throw std::runtime_error("jax_ep nvshmem: nvshmemx_set_attr_uniqueid_args failed with status " +
                               std::to_string(rc));
    }
    // nvshmemx_init_attr without its exit(-1) on failure: the same call, checked.
    nvshmemx_init_init_attr_ver_only(attr);
    const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                        NVSHMEM_VENDOR_PATCH_VERSION};
    int provided = 0;
    rc = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                              version);
    if (rc != 0) {
      throw std::runtime_error(
          "jax_ep nvshmem: NVSHMEM initialisation failed with status " + std::to_string(rc) +
          " as PE " + std::to_string(rank) + " of " + std::to_string(num_ranks) +
          " (see NVSHMEM's messages above; NVSHMEM_DEBUG=INFO says more). The device library of "
          "this build is " + version_string(NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                           NVSHMEM_VENDOR_PATCH_VERSION) +
          ": the loaded libnvshmem_host.so.3 must not be older (minor version)");
    }
    owned = true;
  }
  s.owned = owned;
  s.initialized = true;
  // A small symmetric allocation for transport(): collective, like every malloc.
  s.probe = nvshmem_malloc(kAlign);
  if (s.probe == nullptr) throw std::runtime_error("jax_ep nvshmem: nvshmem_malloc of the probe failed");
  return owned;
}

bool initialized() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.initialized;
}

int init_status() { return nvshmemx_init_status(); }

int my_pe() {
  State& s = state();
  require_initialized(s);
  return nvshmem_my_pe();
}

int n_pes() {
  State& s = state();
  require_initialized(s);
  return nvshmem_n_pes();
}

int malloc(std::size_t num_bytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  require_initialized(s);
  if (num_bytes == 0) throw std::invalid_argument("jax_ep nvshmem: malloc of 0 bytes");
  set_device(s);
  void* ptr = nvshmem_malloc(num_bytes);
  if (ptr == nullptr) {
    throw std::runtime_error("jax_ep nvshmem: nvshmem_malloc(" + std::to_string(num_bytes) +
                             ") failed: the symmetric heap is too small (raise "
                             "NVSHMEM_SYMMETRIC_SIZE, default 1 GiB per PE) or the sizes differ "
                             "between PEs");
  }
  check(cudaMemset(ptr, 0, num_bytes), "cudaMemset of a symmetric buffer");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_barrier_all();  // every PE has zeroed its part before anyone writes to it
  const int id = s.next_id++;
  s.buffers[id] = Buffer{ptr, num_bytes};
  return id;
}

void free(int id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.buffers.find(id);
  if (it == s.buffers.end()) return;
  set_device(s);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_free(it->second.ptr);
  s.buffers.erase(it);
}

namespace {
const Buffer& find(State& s, int id) {
  require_initialized(s);
  auto it = s.buffers.find(id);
  if (it == s.buffers.end()) {
    throw std::invalid_argument("jax_ep nvshmem: no symmetric buffer with id " + std::to_string(id) +
                                " (freed, or never allocated in this process)");
  }
  return it->second;
}
}  // namespace

std::size_t size(int id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return find(s, id).num_bytes;
}

std::uintptr_t local(int id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return reinterpret_cast<std::uintptr_t>(find(s, id).ptr);
}

std::vector<std::uintptr_t> peer_pointers(int id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const Buffer& b = find(s, id);
  const int n = nvshmem_n_pes();
  std::vector<std::uintptr_t> out(n, 0);
  for (int pe = 0; pe < n; ++pe) out[pe] = reinterpret_cast<std::uintptr_t>(nvshmem_ptr(b.ptr, pe));
  return out;
}

std::string transport(int pe) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  require_initialized(s);
  if (pe < 0 || pe >= nvshmem_n_pes()) {
    throw std::invalid_argument("jax_ep nvshmem: no PE " + std::to_string(pe) + " (there are " +
                                std::to_string(nvshmem_n_pes()) + ")");
  }
  if (nvshmem_ptr(s.probe, pe) != nullptr) return "p2p";
  const char* remote = std::getenv("NVSHMEM_REMOTE_TRANSPORT");
  if (remote != nullptr && std::strcmp(remote, "none") == 0) return "none";
  return "rdma";
}

void barrier_all() {
  State& s = state();
  require_initialized(s);
  set_device(s);
  nvshmem_barrier_all();
}

void finalize() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.initialized) return;
  set_device(s);
  cudaDeviceSynchronize();
  for (auto& kv : s.buffers) nvshmem_free(kv.second.ptr);
  s.buffers.clear();
  if (s.probe != nullptr) nvshmem_free(s.probe);
  s.probe = nullptr;
  if (s.test_stream != nullptr) cudaStreamDestroy(s.test_stream);
  if (s.test_result != nullptr) cudaFree(s.test_result);
  s.test_stream = nullptr;
  s.test_result = nullptr;
  if (s.owned) {
    nvshmem_finalize();
  } else if (s.library != nullptr) {
    nvshmemx_culibrary_finalize(s.library);
    s.library = nullptr;
  }
  s.initialized = false;
  s.owned = false;
}

std::string library_version() {
  int major = 0, minor = 0, patch = 0;
  nvshmemx_vendor_get_version_info(&major, &minor, &patch);
  return version_string(major, minor, patch);
}

std::string build_version() {
  return version_string(NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                        NVSHMEM_VENDOR_PATCH_VERSION);
}

std::size_t self_test_bytes(int num_pes) {
  return slot_bytes(num_pes) + 2 * sizeof(int) * kChunkInts;
}

std::string self_test(int id, int round) {
  State& s = state();
  char* base = nullptr;
  std::size_t num_bytes = 0;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    const Buffer& b = find(s, id);
    base = static_cast<char*>(b.ptr);
    num_bytes = b.num_bytes;
  }
  const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
  if (num_bytes < self_test_bytes(n)) {
    throw std::invalid_argument("jax_ep nvshmem: self_test needs a buffer of at least " +
                                std::to_string(self_test_bytes(n)) + " bytes, got " +
                                std::to_string(num_bytes));
  }
  set_device(s);
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.test_result == nullptr) {
      check(cudaMalloc(&s.test_result, 3 * sizeof(int)), "cudaMalloc");
      check(cudaStreamCreateWithFlags(&s.test_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    }
  }
  int* result = s.test_result;
  cudaStream_t stream = s.test_stream;
  std::string error;
  check(cudaMemsetAsync(result, 0, 3 * sizeof(int), stream), "cudaMemsetAsync");
  self_test_kernel<<<1, kSelfTestThreads, 0, stream>>>(base, me, n, round, result);
  check(cudaGetLastError(), "launch of the NVSHMEM self-test kernel");
  int host[3] = {0, 0, 0};
  check(cudaMemcpyAsync(host, result, sizeof(host), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "the NVSHMEM self-test kernel");
  if (host[0] != 0) {
    char buf[256];
    if (host[1] < 0) {
      std::snprintf(buf, sizeof(buf),
                    "PE %d round %d: %d wrong words; first: the nvshmem_int_p slot of PE %d "
                    "holds 0x%08x, expected 0x%08x",
                    me, round, host[0], -1 - host[1], host[2], code(-1 - host[1], round, 0xffff));
    } else {
      std::snprintf(buf, sizeof(buf),
                    "PE %d round %d: %d wrong words; first: word %d of the chunk put by PE %d "
                    "holds 0x%08x, expected 0x%08x",
                    me, round, host[0], host[1], (me + n - 1) % n, host[2],
                    code((me + n - 1) % n, round, host[1]));
    }
    error = buf;
  }
  return error;
}

void copy_to_device(std::uintptr_t dst, const std::string& data) {
  State& s = state();
  set_device(s);
  check(cudaMemcpy(reinterpret_cast<void*>(dst), data.data(), data.size(), cudaMemcpyHostToDevice),
        "cudaMemcpy host to device");
}

std::string copy_from_device(std::uintptr_t src, std::size_t num_bytes) {
  State& s = state();
  set_device(s);
  std::string out(num_bytes, '\0');
  check(cudaMemcpy(out.data(), reinterpret_cast<const void*>(src), num_bytes, cudaMemcpyDeviceToHost),
        "cudaMemcpy device to host");
  return out;
}

}  // namespace nvshmem
}  // namespace jax_ep
