"""The low-latency ops over NVSHMEM puts: ``jax.ffi.ffi_call`` wrappers of the
targets ``jax_ep._nvshmem`` registers (xla_ffi/ll_put.cc).

``jax_ep.cuda_ops`` calls these instead of the pointer path's when the
buffer is a put-path buffer (``jax_ep.ll_put_runtime.PutRuntime``: ranks in
several nodes). Same operands, outputs and ``LowLatencyHandle`` as the
pointer path. Every send runs on XLA's stream and only issues puts (and
stores to the peers of this rank's node), so it returns at once and no SM
waits until the receive; ``async_send`` and ``combine_zero_copy`` have
nothing to do here. Not on this path: FP8 combine rows, and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import nvshmem  # noqa: F401  (registers the put targets where jax_ep._nvshmem loads)

TARGETS = ("jax_ep_ll_put_dispatch_send", "jax_ep_ll_put_dispatch_recv", "jax_ep_ll_put_combine_send",
           "jax_ep_ll_put_combine_recv", "jax_ep_ll_put_status")


def _ops():
    from jax_ep import cuda_ops

    return cuda_ops


def check_spec(spec) -> None:
    """What the put kernels take beyond the pointer path's checks (trace time)."""
    if spec.options.combine_fp8:
        raise NotImplementedError(
            "LowLatencyOptions(combine_fp8=True) is not implemented on the put path (ranks in several nodes): "
            "its combine returns BF16 rows; use combine_fp8=False")
    if spec.hidden % 128:
        raise ValueError(f"the low-latency put path needs hidden % 128 == 0, got H={spec.hidden}")


def _attrs(spec, with_tokens: bool) -> dict:
    from jax_ep import runtime

    o = spec.options
    runtime.lookup(o.buffer_id)  # alive, or a clear error
    attrs = dict(buffer_id=np.int64(o.buffer_id), num_experts=np.int64(spec.num_experts),
                 max_tokens=np.int64(spec.max_tokens), hidden=np.int64(spec.hidden),
                 num_topk=np.int64(spec.num_topk), payload=np.int64(o.payload_code), num_sms=np.int64(o.num_sms))
    if with_tokens:
        attrs["num_tokens"] = np.int64(spec.num_tokens)
    return attrs


def ll_dispatch_send(x: jax.Array, topk_idx: jax.Array, spec, rank_mask=None) -> jax.Array:
    """Put every (token, expert) message into its expert rank's receive slots;
    the token orders the receive. ``x`` bf16 [T, H], ``topk_idx`` int32 [T, K]."""
    check_spec(spec)
    if x.ndim != 2:
        raise NotImplementedError("per-slot rows (the gradient of a combine) are not sent over the put path")
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_dispatch_send", ops._TOKEN, **ops._COMM)
    return call(ops._rank_mask(spec, rank_mask), x, topk_idx, **_attrs(spec, with_tokens=False))


def ll_dispatch_recv(token: jax.Array, topk_idx: jax.Array, spec, rank_mask=None):
    """Wait for every source's messages and pack them: (recv_x, recv_count, handle)."""
    check_spec(spec)
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_dispatch_recv", ops._ll_recv_shapes(spec), **ops._COMM)
    mask = ops._rank_mask(spec, rank_mask)
    outs = call(mask, token, **_attrs(spec, with_tokens=True))
    return ops._ll_recv_result(outs, topk_idx, spec, mask, rank_mask)


def ll_combine_send(y: jax.Array, handle) -> jax.Array:
    """Put every valid row of ``y`` [E/R, R*M, H] bf16 back to its token's owner."""
    check_spec(handle.spec)
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_combine_send", ops._TOKEN, **ops._COMM)
    return call(ops._handle_mask(handle), *ops._combine_send_operands(y, handle),
                **_attrs(handle.spec, with_tokens=True))


def ll_combine_recv(token: jax.Array, topk_weights: jax.Array, handle) -> jax.Array:
    """Wait for every expert rank's rows; bf16 [T, H], the float32 weighted sum."""
    spec = handle.spec
    check_spec(spec)
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_combine_recv",
                            jax.ShapeDtypeStruct((spec.num_tokens, spec.hidden), jnp.bfloat16), **ops._COMM)
    out = call(ops._handle_mask(handle), token, handle.topk_idx, topk_weights, **_attrs(spec, with_tokens=True))
    return ops._varying(out, spec.axis_name)


def status(buffer_id: int, after: tuple, axis_name=None) -> jax.Array:
    """int32[4] ``[code, rank at fault, this rank, op]`` of a put-path buffer
    on this rank, read on the GPU after the calls that produced ``after``
    (``jax_ep.status(..., mode="low_latency")``; the pointer path's
    ``cuda_ops.status`` encoding)."""
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_status", jax.ShapeDtypeStruct((4,), jnp.int32), **ops._COMM)
    return ops._varying(call(*jax.tree_util.tree_leaves(after), buffer_id=np.int64(buffer_id)), axis_name)


def no_gradient(op: str):
    raise NotImplementedError(
        f"{op}: gradients of the low-latency calls are not implemented on the put path (ranks in several "
        f"nodes); differentiate with backend='xla', or with every rank in one node")
