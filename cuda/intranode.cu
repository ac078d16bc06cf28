// Intranode status read-back. The kernels are in intranode_dispatch.cu
// (dispatch, cached dispatch, barrier) and intranode_combine.cu (combine).
// See intranode.cuh for the design.
#include "intranode.cuh"

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>

#include "sync.cuh"
#include "utils.cuh"

namespace jax_ep {
namespace intranode {

namespace {
__global__ void read_status_kernel(PeerTable peers, int* out) {
  aborted(peers);  // records a peer's abort that no kernel of this rank has seen yet
  const auto* rec = reinterpret_cast<volatile const TimeoutRecord*>(peers.timeout_record);
  int code = rec->code;
  const unsigned long long start = global_timer_ns();
  while (code < 0 && global_timer_ns() - start < 100000000ull) code = rec->code;  // being written
  if (code < 0) code = kFailAborted;
  const bool ok = code == kFailNone;
  out[0] = code;
  out[1] = ok ? -1 : (code == kFailOrder ? rec->rank : rec->peer);
  out[2] = peers.rank;
  out[3] = ok ? -1 : rec->op;
}
}  // namespace

cudaError_t launch_read_status(const PeerTable& peers, int* out, cudaStream_t stream) {
  read_status_kernel<<<1, 1, 0, stream>>>(peers, out);
  return cudaGetLastError();
}

}  // namespace intranode
}  // namespace jax_ep
