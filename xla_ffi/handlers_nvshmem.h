// The XLA FFI handlers of the jax_ep._nvshmem module (the low-latency put
// path, xla_ffi/ll_put.cc); nvshmem_module.cc hands them to Python as
// capsules and jax_ep/nvshmem.py registers them for CUDA. Also internode
// normal mode's (xla_ffi/internode.cc).
#pragma once

#include "xla/ffi/api/api.h"
#include "xla/ffi/api/c_api.h"

namespace jax_ep {

// "jax_ep_ll_put_dispatch_send", "jax_ep_ll_put_dispatch_recv",
// "jax_ep_ll_put_combine_send", "jax_ep_ll_put_combine_recv"
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutDispatchSendHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutDispatchRecvHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutCombineSendHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutCombineRecvHandler);
// "jax_ep_ll_put_combine_gather_recv": the combine's rows unsummed (gradients)
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutCombineGatherRecvHandler);
// "jax_ep_ll_put_status": the buffer's failure record as s32[4]
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyPutStatusHandler);
// Internode normal mode (xla_ffi/internode.cc): "jax_ep_internode_dispatch",
// "jax_ep_internode_dispatch_fp8", "jax_ep_internode_cached_dispatch",
// "jax_ep_internode_combine" (status: "jax_ep_ll_put_status", the same buffer kind)
XLA_FFI_DECLARE_HANDLER_SYMBOL(InternodeDispatchHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(InternodeDispatchFp8Handler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(InternodeCachedDispatchHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(InternodeCombineHandler);

}  // namespace jax_ep
