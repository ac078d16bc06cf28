// The XLA FFI handlers of jax_ep, one per custom-call target. module.cc hands
// them to Python as capsules; jax_ep/_extension.py registers them for CUDA.
#pragma once

#include "xla/ffi/api/api.h"
#include "xla/ffi/api/c_api.h"

namespace jax_ep {

// "jax_ep_get_dispatch_layout"
XLA_FFI_DECLARE_HANDLER_SYMBOL(GetDispatchLayoutHandler);
// "jax_ep_per_token_cast_to_fp8"
XLA_FFI_DECLARE_HANDLER_SYMBOL(PerTokenCastToFp8Handler);
// "jax_ep_per_token_cast_back"
XLA_FFI_DECLARE_HANDLER_SYMBOL(PerTokenCastBackHandler);

// "jax_ep_intranode_dispatch", "jax_ep_intranode_dispatch_fp8",
// "jax_ep_intranode_cached_dispatch", "jax_ep_intranode_combine"
XLA_FFI_DECLARE_HANDLER_SYMBOL(IntranodeDispatchHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(IntranodeDispatchFp8Handler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(IntranodeCachedDispatchHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(IntranodeCombineHandler);

// "jax_ep_status": a buffer's failure record as s32[4]
XLA_FFI_DECLARE_HANDLER_SYMBOL(StatusHandler);

// "jax_ep_ll_dispatch_send", "jax_ep_ll_dispatch_recv", "jax_ep_ll_combine_send",
// "jax_ep_ll_combine_recv", "jax_ep_ll_combine_gather_recv"
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyDispatchSendHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyDispatchRecvHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyCombineSendHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyCombineRecvHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyCombineGatherRecvHandler);
// Their asynchronous twins: "jax_ep_ll_dispatch_send_async", ... (send on the
// buffer's send stream; not command-buffer compatible)
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyDispatchSendAsyncHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyDispatchRecvAsyncHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyCombineSendAsyncHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(LowLatencyCombineRecvAsyncHandler);

}  // namespace jax_ep
