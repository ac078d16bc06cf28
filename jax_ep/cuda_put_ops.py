"""The low-latency ops over NVSHMEM puts: ``jax.ffi.ffi_call`` wrappers of the
targets ``jax_ep._nvshmem`` registers (xla_ffi/ll_put.cc).

``jax_ep.cuda_ops`` calls these instead of the pointer path's when the
buffer is a put-path buffer (``jax_ep.ll_put_runtime.PutRuntime``: ranks in
several nodes). Same operands, outputs and ``LowLatencyHandle`` as the
pointer path. Every send runs on XLA's stream and only issues puts (and
stores to the peers of this rank's node), so it returns at once and no SM
waits until the receive; ``async_send`` and ``combine_zero_copy`` have
nothing to do here. FP8 combine rows (``combine_fp8``) travel as on the
pointer path, and the gradients use the same ops as there: per-slot rows
through the dispatch send, and the combine's rows unsummed
(``ll_combine_gather``). Every call carries the pointer path's call
signature, checked by the receive (docs/faults.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import nvshmem  # noqa: F401  (registers the put targets where jax_ep._nvshmem loads)

TARGETS = ("jax_ep_ll_put_dispatch_send", "jax_ep_ll_put_dispatch_recv", "jax_ep_ll_put_combine_send",
           "jax_ep_ll_put_combine_recv", "jax_ep_ll_put_combine_gather_recv", "jax_ep_ll_put_status")


def _ops():
    from jax_ep import cuda_ops

    return cuda_ops


def check_spec(spec) -> None:
    """What the put kernels take beyond the pointer path's checks (trace time)."""
    if spec.hidden % 128:
        raise ValueError(f"the low-latency put path needs hidden % 128 == 0, got H={spec.hidden}")


def _attrs(spec, with_tokens: bool) -> dict:
    from jax_ep import runtime

    o = spec.options
    runtime.lookup(o.buffer_id)  # alive, or a clear error
    attrs = dict(buffer_id=np.int64(o.buffer_id), num_experts=np.int64(spec.num_experts),
                 max_tokens=np.int64(spec.max_tokens), hidden=np.int64(spec.hidden),
                 num_topk=np.int64(spec.num_topk), payload=np.int64(o.payload_code),
                 combine_payload=np.int64(1 if o.combine_fp8 else 0), num_sms=np.int64(o.num_sms))
    if with_tokens:
        attrs["num_tokens"] = np.int64(spec.num_tokens)
    return attrs


def ll_dispatch_send(x: jax.Array, topk_idx: jax.Array, spec, rank_mask=None) -> jax.Array:
    """Put every (token, expert) message into its expert rank's receive slots;
    the token orders the receive. ``x`` bf16 [T, H], or per-slot rows bf16
    [T, K, H] with a BF16 payload (the backward of a combine: each slot sends
    its own row, from the first slot naming its expert); ``topk_idx`` int32 [T, K]."""
    check_spec(spec)
    if x.ndim == 3 and (spec.options.fp8 is not None or x.shape != (spec.num_tokens, spec.num_topk, spec.hidden)):
        raise ValueError(f"per-slot rows must be bfloat16 [T, K, H] = {(spec.num_tokens, spec.num_topk, spec.hidden)} "
                         f"with a BF16 dispatch (options.fp8=None), got {x.shape}")
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
    """Put every valid row of ``y`` [E/R, R*M, H] bf16 back to its token's owner
    (as FP8 with a float scale per 128 channels with ``combine_fp8``)."""
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


def ll_combine_gather(token: jax.Array, handle) -> jax.Array:
    """Wait for every expert rank's rows of a BF16 combine send and return
    them unsummed: bf16 [T, K, H], the row of each top-k slot's expert (its
    first slot's), zeros on masked slots. The receive of
    ``cuda_ops.ll_gather_back`` on the put path."""
    spec = handle.spec
    check_spec(spec)
    if spec.options.combine_fp8:
        raise ValueError("the unsummed combine takes BF16 rows: pass a spec with combine_fp8=False")
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_combine_gather_recv",
                            jax.ShapeDtypeStruct((spec.num_tokens, spec.num_topk, spec.hidden), jnp.bfloat16),
                            **ops._COMM)
    out = call(ops._handle_mask(handle), token, handle.topk_idx, **_attrs(spec, with_tokens=True))
    return ops._varying(out, spec.axis_name)


def status(buffer_id: int, after: tuple, axis_name=None) -> jax.Array:
    """int32[4] ``[code, rank at fault, this rank, op]`` of a put-path buffer
    on this rank, read on the GPU after the calls that produced ``after``
    (``jax_ep.status(..., mode="low_latency")``; the pointer path's
    ``cuda_ops.status`` encoding)."""
    ops = _ops()
    call = jax.ffi.ffi_call("jax_ep_ll_put_status", jax.ShapeDtypeStruct((4,), jnp.int32), **ops._COMM)
    return ops._varying(call(*jax.tree_util.tree_leaves(after), buffer_id=np.int64(buffer_id)), axis_name)

