"""The CUDA backend: ``jax.ffi.ffi_call`` wrappers of the kernels in ``jax_ep._C``.

Each function has the signature of its twin in ``jax_ep.reference``. Ops that
have no kernel yet are absent, and ``jax_ep.backends.require`` says so.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _extension  # noqa: F401  (registers the FFI targets)

IMPLEMENTED = ("get_dispatch_layout", "per_token_cast_to_fp8", "per_token_cast_back")


def get_dispatch_layout(topk_idx: jax.Array, num_experts: int, num_ranks: int):
    t = topk_idx.shape[0]
    out = (
        jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((t, num_ranks), jnp.bool_),
    )
    call = jax.ffi.ffi_call("jax_ep_get_dispatch_layout", out, vmap_method="sequential")
    return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


def _as_2d(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def per_token_cast_to_fp8(x: jax.Array, round_scale: bool, use_ue8m0: bool):
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = _as_2d(x if x.dtype != jnp.float16 else x.astype(jnp.float32))
    t = x2.shape[0]
    scales = (
        jax.ShapeDtypeStruct((t, hidden // 512), jnp.int32)
        if use_ue8m0
        else jax.ShapeDtypeStruct((t, hidden // 128), jnp.float32)
    )
    out = (jax.ShapeDtypeStruct((t, hidden), jnp.float8_e4m3fn), scales)
    call = jax.ffi.ffi_call("jax_ep_per_token_cast_to_fp8", out, vmap_method="sequential")
    q, s = call(x2, round_scale=bool(round_scale or use_ue8m0), use_ue8m0=bool(use_ue8m0))
    return q.reshape(*lead, hidden), s.reshape(*lead, s.shape[-1])


def per_token_cast_back(x_fp8: jax.Array, scales: jax.Array, use_ue8m0: bool, out_dtype):
    lead, hidden = x_fp8.shape[:-1], x_fp8.shape[-1]
    kernel_dtype = jnp.float32 if jnp.dtype(out_dtype) == jnp.float16 else out_dtype
    out = jax.ShapeDtypeStruct((int(np.prod(lead, dtype=np.int64)), hidden), kernel_dtype)
    call = jax.ffi.ffi_call("jax_ep_per_token_cast_back", out, vmap_method="sequential")
    y = call(_as_2d(x_fp8), _as_2d(scales), use_ue8m0=bool(use_ue8m0))
    return y.reshape(*lead, hidden).astype(out_dtype)


# --- intranode normal mode ------------------------------------------------------

IMPLEMENTED += ("dispatch", "cached_dispatch", "combine")

_LAYOUT_CODE = {"rank_major": 0, "expert_major": 1}
# A communicating call must run exactly where the program says on every rank:
# has_side_effect keeps XLA from eliminating, merging or hoisting it out of loops.
_COMM = dict(vmap_method="sequential", has_side_effect=True)


def _varying(tree, axis_name):
    """Mark FFI outputs as varying over the EP axis inside shard_map, like the
    values they replace (a custom call's results carry no axis type)."""
    if axis_name is None:
        return tree

    def mark(a):
        mat = getattr(jax.typeof(a), "manual_axis_type", None)
        varying = getattr(mat, "varying", None)
        if varying is None or axis_name in varying:
            return a
        try:
            return jax.lax.pcast(a, (axis_name,), to="varying")
        except (ValueError, TypeError, NameError):  # not inside a shard_map over axis_name
            return a

    return jax.tree.map(mark, tree)


def _rows(a: jax.Array):
    """[N, ...] -> ([N, B] with B * itemsize a multiple of 16 bytes, undo)."""
    n, trailing = a.shape[0], a.shape[1:]
    cols = int(np.prod(trailing, dtype=np.int64))
    flat = a.reshape(n, cols)
    per_vec = max(16 // a.dtype.itemsize, 1)
    pad = (-cols) % per_vec
    if pad:
        flat = jnp.pad(flat, ((0, 0), (0, pad)))

    def undo(out: jax.Array) -> jax.Array:
        out = out[:, :cols] if pad else out
        return out.reshape((out.shape[0],) + trailing)

    return flat, undo


def _buffer_attrs(spec):
    from jax_ep import runtime

    runtime.lookup(spec.options.buffer_id)  # alive, or a clear error
    return dict(buffer_id=np.int64(spec.options.buffer_id), num_sms=np.int64(spec.options.num_sms))


def _internode_ops(spec):
    """``jax_ep.internode_ops`` when the call's buffer spans several (virtual)
    nodes (an ``InternodeRuntime``), else None."""
    from jax_ep import runtime

    if getattr(runtime.lookup(spec.options.buffer_id), "internode", None) is None:
        return None
    from jax_ep import internode_ops

    return internode_ops


def dispatch(x, topk_idx: jax.Array, topk_weights: jax.Array, spec):
    """Fused routing + payload dispatch; same outputs as the reference's route + cached_dispatch."""
    from jax_ep.handle import DispatchHandle

    if (inter := _internode_ops(spec)) is not None:
        return inter.dispatch(x, topk_idx, topk_weights, spec)

    r, t, k, c = spec.num_ranks, spec.num_tokens, spec.num_topk, spec.capacity
    local_experts = spec.num_local_experts
    send_cols = r if spec.options.layout == "rank_major" else k
    meta = (
        jax.ShapeDtypeStruct((c, k), jnp.int32),  # recv_topk_idx
        jax.ShapeDtypeStruct((c, k), jnp.float32),  # recv_topk_weights
        jax.ShapeDtypeStruct((local_experts,), jnp.int32),  # num_recv_tokens_per_expert
        jax.ShapeDtypeStruct((local_experts,), jnp.int32),  # expert_group_sizes
        jax.ShapeDtypeStruct((), jnp.int32),  # kept
        jax.ShapeDtypeStruct((), jnp.int32),  # needed
        jax.ShapeDtypeStruct((c,), jnp.int32),  # recv_src_rank
        jax.ShapeDtypeStruct((c,), jnp.int32),  # recv_src_token
        jax.ShapeDtypeStruct((t, r), jnp.bool_),  # is_token_in_rank
        jax.ShapeDtypeStruct((t, send_cols), jnp.int32),  # send_pos
    )
    attrs = dict(
        _buffer_attrs(spec),
        num_experts=np.int64(spec.num_experts),
        capacity=np.int64(c),
        expert_alignment=np.int64(spec.options.expert_alignment),
        layout=np.int64(_LAYOUT_CODE[spec.options.layout]),
    )
    if isinstance(x, tuple):
        q, scales = x
        outs = (jax.ShapeDtypeStruct((c,) + q.shape[1:], q.dtype), jax.ShapeDtypeStruct((c,) + scales.shape[1:], scales.dtype))
        call = jax.ffi.ffi_call("jax_ep_intranode_dispatch_fp8", outs + meta, **_COMM)
        res = call(q, scales, topk_idx, topk_weights, **attrs)
        recv_x, rest = (res[0], res[1]), res[2:]
    else:
        rows, undo = _rows(x)
        call = jax.ffi.ffi_call(
            "jax_ep_intranode_dispatch", (jax.ShapeDtypeStruct((c, rows.shape[1]), rows.dtype),) + meta, **_COMM
        )
        res = call(rows, topk_idx, topk_weights, **attrs)
        recv_x, rest = undo(res[0]), res[1:]
    idx, w, counts, group_sizes, kept, needed, src_rank, src_token, in_rank, send_pos = rest
    handle = DispatchHandle(src_rank, src_token, in_rank, extra={"send_pos": send_pos}, spec=spec)
    if spec.options.layout == "rank_major":
        group_sizes = None
    return _varying((recv_x, idx, w, counts, group_sizes, kept, needed, handle), spec.axis_name)


def cached_dispatch(payload: jax.Array, handle) -> jax.Array:
    """[T, ...] -> [C, ...] along the handle's routing."""
    spec = handle.spec
    if (inter := _internode_ops(spec)) is not None:
        return inter.cached_dispatch(payload, handle)
    rows, undo = _rows(payload)
    call = jax.ffi.ffi_call(
        "jax_ep_intranode_cached_dispatch",
        jax.ShapeDtypeStruct((spec.capacity, rows.shape[1]), rows.dtype), **_COMM
    )
    return _varying(undo(call(rows, handle.recv_src_rank, handle.recv_src_token, **_buffer_attrs(spec))), spec.axis_name)


def combine(y: jax.Array, handle) -> jax.Array:
    """[C, ...] -> [T, ...]: float32 sum of every row into its source token."""
    spec = handle.spec
    if (inter := _internode_ops(spec)) is not None:
        return inter.combine(y, handle)
    dtype = y.dtype
    if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        y = y.astype(jnp.float32)  # e.g. FP8 cotangents: sum in float32, round once
    rows, undo = _rows(y)
    call = jax.ffi.ffi_call(
        "jax_ep_intranode_combine",
        jax.ShapeDtypeStruct((spec.num_tokens, rows.shape[1]), rows.dtype), **_COMM
    )
    out = call(
        rows, handle.recv_src_rank, handle.recv_src_token, handle.extra["send_pos"], **_buffer_attrs(spec),
        layout=np.int64(_LAYOUT_CODE[spec.options.layout]),
        chunk_rows=np.int64(spec.options.combine_chunk_rows),
        ring_rows=np.int64(spec.options.combine_ring_rows),
    )
    return _varying(undo(out).astype(dtype), spec.axis_name)


# --- low-latency mode -----------------------------------------------------------

IMPLEMENTED += ("ll_dispatch_send", "ll_dispatch_recv", "ll_dispatch_fused", "ll_combine_send",
                "ll_combine_recv", "ll_combine")

_TOKEN = jax.ShapeDtypeStruct((), jnp.int32)


def _ll_attrs(spec):
    from jax_ep import runtime

    o = spec.options
    runtime.lookup(o.buffer_id)
    return dict(
        buffer_id=np.int64(o.buffer_id), num_tokens=np.int64(spec.num_tokens), num_experts=np.int64(spec.num_experts),
        max_tokens=np.int64(spec.max_tokens), hidden=np.int64(spec.hidden), num_topk=np.int64(spec.num_topk),
        payload=np.int64(o.payload_code), combine_payload=np.int64(1 if o.combine_fp8 else 0),
        num_sms=np.int64(o.num_sms),
    )


def _rank_mask(spec, rank_mask) -> jax.Array:
    """The call's rank mask operand, bool [R] (all False: every rank takes part).

    An asynchronous send's kernel reads its mask on the buffer's send stream
    after XLA considers the send done: its receive must take that very array
    again (``sent_mask``) so that XLA keeps it alive until then."""
    if rank_mask is None:
        return jnp.zeros((spec.num_ranks,), jnp.bool_)
    return rank_mask.astype(jnp.bool_)


def _handle_mask(handle) -> jax.Array:
    return _rank_mask(handle.spec, handle.extra.get("rank_mask"))


def _put_path(spec) -> bool:
    """Whether the call's buffer is a put-path buffer (ranks in several nodes:
    ``jax_ep.ll_put_runtime``); its calls go to ``jax_ep.cuda_put_ops``."""
    from jax_ep import runtime

    return bool(getattr(runtime.lookup(spec.options.buffer_id), "put_path", False))


def _put_ops():
    from jax_ep import cuda_put_ops

    return cuda_put_ops


def _target(name: str, asynchronous: bool) -> str:
    return name + ("_async" if asynchronous else "")


def ll_dispatch_send(
    x: jax.Array, topk_idx: jax.Array, spec, asynchronous: bool = False, pull: bool = False, rank_mask=None
) -> jax.Array:
    """Push every (token, expert) message; returns the token that orders the receive.

    asynchronous: run the send on the buffer's send stream; its receive must
    then be ``ll_dispatch_recv(..., sent_x=x)``.
    pull: only stage this rank's messages for the receivers to copy (where
    the shapes allow it); its receive must pass ``pull`` too.
    rank_mask: bool [R], the ranks this call leaves out (``jax_ep.rank_mask``);
    its receive takes the same array."""
    if _put_path(spec):
        return _put_ops().ll_dispatch_send(x, topk_idx, spec, rank_mask=rank_mask)
    attrs = _ll_attrs(spec)
    attrs.pop("num_tokens")
    attrs["pull"] = np.int64(pull)
    call = jax.ffi.ffi_call(_target("jax_ep_ll_dispatch_send", asynchronous), _TOKEN, **_COMM)
    return call(_rank_mask(spec, rank_mask), x, topk_idx, **attrs)


def _ll_recv_shapes(spec) -> tuple:
    """The outputs of a low-latency dispatch receive (pointer and put paths),
    with L = E/R local experts and R*M rows: recv_x [L, R*M, H] (bf16, or
    float8_e4m3fn with FP8), its scales (float32 [L, R*M, H/128], int32
    [L, R*M, H/512] for UE8M0, float32 [L, R*M, 0] without FP8), recv_count
    int32 [L], and src_rank, src_token, src_slot int32 [L, R*M]."""
    le, rows, h = spec.num_local_experts, spec.num_ranks * spec.max_tokens, spec.hidden
    fp8 = spec.options.fp8
    if fp8 is None:
        x_out = jax.ShapeDtypeStruct((le, rows, h), jnp.bfloat16)
        s_out = jax.ShapeDtypeStruct((le, rows, 0), jnp.float32)
    else:
        x_out = jax.ShapeDtypeStruct((le, rows, h), jnp.float8_e4m3fn)
        s_out = (jax.ShapeDtypeStruct((le, rows, h // 512), jnp.int32) if fp8.use_ue8m0
                 else jax.ShapeDtypeStruct((le, rows, h // 128), jnp.float32))
    ints = jax.ShapeDtypeStruct((le, rows), jnp.int32)
    return (x_out, s_out, jax.ShapeDtypeStruct((le,), jnp.int32), ints, ints, ints)


def _ll_recv_result(outs, topk_idx: jax.Array, spec, mask: jax.Array, rank_mask):
    """(recv_x, recv_count, handle) from the outputs of ``_ll_recv_shapes``;
    recv_x is (rows, scales) with FP8. ``mask`` is the rank mask operand the
    receive took; the handle keeps it where the caller passed a ``rank_mask``."""
    from jax_ep.handle import LowLatencyHandle

    recv_x, scales, count, src_rank, src_token, src_slot = outs
    extra = {} if rank_mask is None else {"rank_mask": mask}  # the combine leaves out the same ranks
    handle = LowLatencyHandle(src_rank, src_token, src_slot, topk_idx, extra=extra, spec=spec)
    return _varying(((recv_x if spec.options.fp8 is None else (recv_x, scales)), count, handle), spec.axis_name)


def ll_dispatch_recv(
    token: jax.Array, topk_idx: jax.Array, spec, sent_x: jax.Array | None = None, pull: bool = False,
    rank_mask=None, sent_mask: jax.Array | None = None,
):
    """Wait for every source and pack: (recv_x, recv_count, handle).

    sent_x: the x of an asynchronous send. This receive then joins the send
    stream and takes the send's inputs again (unread), so XLA keeps them
    alive until it runs.
    pull: the send staged (``ll_dispatch_send(..., pull=True)``); copy from there."""
    if _put_path(spec):
        return _put_ops().ll_dispatch_recv(token, topk_idx, spec, rank_mask=rank_mask)
    call = jax.ffi.ffi_call(_target("jax_ep_ll_dispatch_recv", sent_x is not None), _ll_recv_shapes(spec), **_COMM)
    kept = () if sent_x is None else (sent_x, topk_idx) + (() if sent_mask is None else (sent_mask,))
    mask = _rank_mask(spec, rank_mask)
    outs = call(mask, token, *kept, **_ll_attrs(spec), pull=np.int64(pull))
    return _ll_recv_result(outs, topk_idx, spec, mask, rank_mask)


def ll_dispatch_fused(x: jax.Array, topk_idx: jax.Array, spec, rank_mask=None):
    pull = spec.options.dispatch_pull
    token = ll_dispatch_send(x, topk_idx, spec, pull=pull, rank_mask=rank_mask)
    return ll_dispatch_recv(token, topk_idx, spec, pull=pull, rank_mask=rank_mask)


def _combine_send_operands(y: jax.Array, handle) -> tuple:
    return (y, handle.recv_src_rank, handle.recv_src_token, handle.recv_src_slot)


def ll_combine_send(y: jax.Array, handle, asynchronous: bool = False, zero_copy: bool = False,
                    mask: jax.Array | None = None) -> jax.Array:
    """Push every valid expert-output row back to its token's owner (the
    kernel finds each expert's count in the handle: its rows that are not -1).

    asynchronous: as in ``ll_dispatch_send``; the receive then takes ``sent_y=y``.
    zero_copy: only record where the rows lie in this rank's XLA memory (where
    it can; else push); the receive must then take ``sent_y=y`` and ``zero_copy``."""
    if _put_path(handle.spec):
        return _put_ops().ll_combine_send(y, handle)
    call = jax.ffi.ffi_call(_target("jax_ep_ll_combine_send", asynchronous), _TOKEN, **_COMM)
    mask = _handle_mask(handle) if mask is None else mask
    return call(mask, *_combine_send_operands(y, handle), **_ll_attrs(handle.spec), zero_copy=np.int64(zero_copy))


def ll_send_mask(spec, rank_mask=None, handle=None) -> jax.Array:
    """The rank mask operand a send will take (of ``rank_mask``, or of the
    dispatch behind ``handle``), to pass to the send and, after an
    asynchronous one, to its receive as ``sent_mask``."""
    return _handle_mask(handle) if handle is not None else _rank_mask(spec, rank_mask)


def ll_combine_recv(
    token: jax.Array, topk_weights: jax.Array, handle, sent_y: jax.Array | None = None,
    asynchronous: bool = False, zero_copy: bool = False, sent_mask: jax.Array | None = None,
) -> jax.Array:
    """Wait for every rank's rows; [T, H] bf16 weighted sum.

    sent_y: the send's y, taken again (unread) so XLA keeps it alive: after an
    asynchronous send (as ``sent_x`` in ``ll_dispatch_recv``) or a zero-copy
    one, whose rows the peers read from y during this receive."""
    spec = handle.spec
    if _put_path(spec):
        return _put_ops().ll_combine_recv(token, topk_weights, handle)
    call = jax.ffi.ffi_call(
        _target("jax_ep_ll_combine_recv", asynchronous),
        jax.ShapeDtypeStruct((spec.num_tokens, spec.hidden), jnp.bfloat16), **_COMM
    )
    kept = () if sent_y is None else _combine_send_operands(sent_y, handle)
    kept += () if sent_mask is None else (sent_mask,)  # an asynchronous send's mask, kept alive
    out = call(_handle_mask(handle), token, handle.topk_idx, topk_weights, *kept, **_ll_attrs(spec),
               zero_copy=np.int64(zero_copy))
    return _varying(out, spec.axis_name)


def ll_combine(y: jax.Array, topk_weights: jax.Array, handle) -> jax.Array:
    zero_copy = handle.spec.options.combine_zero_copy and not handle.spec.options.combine_fp8
    token = ll_combine_send(y, handle, zero_copy=zero_copy)
    return ll_combine_recv(token, topk_weights, handle, sent_y=y if zero_copy else None, zero_copy=zero_copy)


# --- low-latency gradients -------------------------------------------------------

IMPLEMENTED += ("ll_gather_back", "ll_scatter_out")


def ll_gather_back(y: jax.Array, handle) -> jax.Array:
    """[E/R, R*M, H] -> float32 [T, K, H]: the row each top-k slot reads (the
    first slot naming its expert), zeros on masked slots. A combine without
    the sum: the rows travel back as in ``ll_combine``."""
    spec = handle.spec
    if spec.options.combine_fp8:  # the unsummed rows travel as BF16
        spec = dataclasses.replace(spec, options=dataclasses.replace(spec.options, combine_fp8=False))
        handle = dataclasses.replace(handle, spec=spec)
    token = ll_combine_send(y.astype(jnp.bfloat16), handle)
    if _put_path(spec):
        return _put_ops().ll_combine_gather(token, handle).astype(jnp.float32)
    call = jax.ffi.ffi_call(
        "jax_ep_ll_combine_gather_recv",
        jax.ShapeDtypeStruct((spec.num_tokens, spec.num_topk, spec.hidden), jnp.bfloat16), **_COMM
    )
    out = call(_handle_mask(handle), token, handle.topk_idx, **_ll_attrs(spec))
    return _varying(out, spec.axis_name).astype(jnp.float32)


def ll_scatter_out(v: jax.Array, handle) -> jax.Array:
    """Transpose of ``ll_gather_back``: v [T, K, H] -> float32 [E/R, R*M, H].

    Slots naming the same expert add into its first slot, whose row then
    travels like a BF16 low-latency dispatch (one row per slot instead of one
    per token). Padding rows are zero."""
    spec = handle.spec
    idx = handle.topk_idx
    same = (idx[:, :, None] == idx[:, None, :]).astype(jnp.float32)  # [T, K, K]
    rows = jnp.einsum("tkj,tjh->tkh", same, v.astype(jnp.float32), precision="highest").astype(jnp.bfloat16)
    bf16 = dataclasses.replace(spec, options=dataclasses.replace(spec.options, fp8=None))
    mask = handle.extra.get("rank_mask")
    token = ll_dispatch_send(rows, idx, bf16, rank_mask=mask)
    recv_x, _, _ = ll_dispatch_recv(token, idx, bf16, rank_mask=mask)
    return jnp.where((handle.recv_src_rank >= 0)[..., None], recv_x.astype(jnp.float32), 0.0)


# --- status ---------------------------------------------------------------------


def status(buffer_id: int, after: tuple, axis_name=None) -> jax.Array:
    """int32[4] status of a buffer on this rank, read on the GPU after the
    calls that produced ``after`` (jax_ep.buffer.status)."""
    call = jax.ffi.ffi_call("jax_ep_status", jax.ShapeDtypeStruct((4,), jnp.int32), **_COMM)
    return _varying(call(*jax.tree_util.tree_leaves(after), buffer_id=np.int64(buffer_id)), axis_name)
