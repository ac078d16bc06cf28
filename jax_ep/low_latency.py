"""Low-latency dispatch and combine: the packed per-expert layout of decoding.

Call these inside ``jax.shard_map`` over the expert-parallel axis. Shapes are
static (``M`` = ``options.num_max_dispatch_tokens_per_rank``), nothing is
ever dropped, and the combine weights the returned rows by the top-k weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import checked, validation
from jax_ep import rank_mask as _masks
from jax_ep.backends import get_backend, require
from jax_ep.handle import LowLatencyHandle, LowLatencySpec
from jax_ep.normal import _zero_cotangent
from jax_ep.options import LowLatencyOptions


class LowLatencyDispatchOutput(NamedTuple):
    """What ``low_latency_dispatch`` returns on each rank.

    Attributes:
      recv_x: ``bfloat16 [E/R, R*M, H]`` (x's dtype), or with FP8 the pair
        ``(float8_e4m3fn [E/R, R*M, H], scales)`` with scales ``float32
        [E/R, R*M, H/128]`` or packed UE8M0 ``int32 [E/R, R*M, H/512]``.
        Local expert ``e``'s tokens fill rows ``[0, recv_count[e])`` ordered by
        (source rank, source token); the rest are zero with the xla backend
        and unspecified with the CUDA kernels (the handle marks them -1).
      recv_count: ``int32 [E/R]``, tokens received by each local expert.
      handle: ``LowLatencyHandle`` for ``low_latency_combine``.
    """

    recv_x: jax.Array | tuple
    recv_count: jax.Array
    handle: LowLatencyHandle


def _impl(spec: LowLatencySpec, op: str):
    return require(get_backend(spec.options.backend), op, spec.options.backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ll_dispatch(x, handle, spec):
    return _impl(spec, "ll_dispatch")(x, handle)


def _ll_dispatch_fwd(x, handle, spec):
    return _impl(spec, "ll_dispatch")(x, handle), handle


def _ll_dispatch_bwd(spec, handle, ct):
    if spec.options.fp8 is not None:
        raise NotImplementedError(
            "low_latency_dispatch with FP8 has no gradient (the cast is not differentiable); "
            "differentiate a BF16 low_latency_dispatch (options.fp8=None) instead"
        )
    vals = _impl(spec, "ll_gather_back")(ct, handle)  # [T, K, H]
    first = _first_slot_mask(handle)
    grad = jnp.sum(jnp.where(first[..., None], vals, 0.0), axis=1).astype(ct.dtype)
    return grad, _zero_cotangent(handle)


_ll_dispatch.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


def _first_slot_mask(handle: LowLatencyHandle) -> jax.Array:
    from jax_ep.reference.routing import first_slots, valid_slots

    idx = handle.topk_idx
    return first_slots(idx, valid_slots(idx, handle.spec.num_experts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ll_dispatch_fused(x, topk_idx, rank_mask, spec):
    return _impl(spec, "ll_dispatch_fused")(x, topk_idx, spec, rank_mask=rank_mask)


def _ll_dispatch_fused_fwd(x, topk_idx, rank_mask, spec):
    out = _impl(spec, "ll_dispatch_fused")(x, topk_idx, spec, rank_mask=rank_mask)
    return out, (out[2], rank_mask)


def _ll_dispatch_fused_bwd(spec, res, ct):
    handle, rank_mask = res
    grad, _ = _ll_dispatch_bwd(spec, handle, ct[0])
    no_mask = None if rank_mask is None else np.zeros(rank_mask.shape, jax.dtypes.float0)
    return grad, np.zeros(handle.topk_idx.shape, jax.dtypes.float0), no_mask


_ll_dispatch_fused.defvjp(_ll_dispatch_fused_fwd, _ll_dispatch_fused_bwd)


def _ll_spec(x, topk_idx, num_experts, axis_name, options) -> LowLatencySpec:
    """Validate the arguments of a low-latency dispatch; its static facts."""
    if not isinstance(options, LowLatencyOptions):
        raise TypeError(f"options must be a jax_ep.LowLatencyOptions, got {type(options).__name__}")
    validation.check_hidden_states(x)
    t, h = x.shape
    validation.check_topk_idx(topk_idx, t)
    validation.check_max_topk(topk_idx, "low_latency_dispatch")
    m = options.num_max_dispatch_tokens_per_rank
    if t > m:
        raise ValueError(
            f"x has T={t} tokens but options.num_max_dispatch_tokens_per_rank={m}; "
            f"low-latency dispatch needs T <= M: raise M to at least {t} (the same M on every rank)"
        )
    if options.fp8 is not None:
        validation.check_fp8_hidden(h, use_ue8m0=options.fp8.use_ue8m0)
    if options.combine_fp8:
        validation.check_fp8_hidden(h, combine=True)
    if options.backend == "cuda" and x.dtype != jnp.bfloat16:
        raise TypeError(f"the CUDA low-latency kernels take bfloat16 x, got {x.dtype}; cast with x.astype(jnp.bfloat16)")
    r = validation.num_ranks_for(axis_name, options.backend, options.buffer_id)
    validation.check_num_experts(num_experts, r)
    validation.check_ids_in_range_now(topk_idx, num_experts)
    return LowLatencySpec(
        num_ranks=r, num_experts=num_experts, num_tokens=t, num_topk=topk_idx.shape[1], hidden=h,
        axis_name=axis_name, options=options,
    )


def low_latency_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    num_experts: int,
    axis_name="ep",
    options: LowLatencyOptions = LowLatencyOptions(),
    rank_mask=None,
) -> LowLatencyDispatchOutput:
    """Send each (token, expert) pair to the expert's rank, packed per expert.

    Args:
      x: ``[T, H]`` bfloat16 (float16/float32 also accepted by the xla
        backend), ``T <= M``; ``H % 128 == 0`` with FP8 (``% 512`` with UE8M0).
      topk_idx: ``int32 [T, K]`` global expert ids, -1 masks a slot.
      num_experts: ``E`` (static), divisible by ``R``.
      axis_name: the EP mesh axis (static); ``None`` with the CUDA backend to
        call it per process.
      options: ``LowLatencyOptions`` (static): ``M``, FP8 cast, backend.
      rank_mask: optional ``bool [R]``, the same on every rank, True for a
        masked (failed) rank: slots naming its experts are masked like -1,
        it sends and receives nothing, and the combine of this dispatch
        skips it too (``jax_ep.rank_mask``). A traced input: changing it does
        not recompile.

    Returns:
      ``LowLatencyDispatchOutput``. With BF16 the VJP returns each row's
      cotangent to its token (an un-weighted low-latency combine).
    """
    spec = _ll_spec(x, topk_idx, num_experts, axis_name, options)
    topk_idx = topk_idx.astype(jnp.int32)
    if options.checked:  # every rank fails together, before anything is exchanged
        x, topk_idx, _ = checked.check_ids(x, topk_idx, None, num_experts, axis_name)
    topk_idx, rank_mask = _apply_rank_mask(topk_idx, rank_mask, spec)
    if hasattr(get_backend(options.backend), "ll_dispatch_fused"):  # send and receive in one call
        recv_x, counts, handle = _ll_dispatch_fused(x, topk_idx, rank_mask, spec)
        return LowLatencyDispatchOutput(recv_x, counts, handle)
    counts, handle = _impl(spec, "ll_dispatch_route")(topk_idx, spec)
    return LowLatencyDispatchOutput(_ll_dispatch(x, handle, spec), counts, handle)


def _apply_rank_mask(topk_idx, rank_mask, spec: LowLatencySpec):
    """(The routing with masked ranks' slots, all slots on a masked rank, set
    to -1; the mask as bool [R] or None). The CUDA kernels also take the mask:
    they neither write to nor wait for a masked rank."""
    rank_mask = _masks.check_rank_mask(rank_mask, spec.num_ranks)
    if rank_mask is None:
        return topk_idx, None
    rank = None
    if spec.options.backend == "cuda" and spec.axis_name is None:
        from jax_ep import runtime

        rank = runtime.lookup(spec.options.buffer_id).rank
    me = _masks.this_rank(spec.axis_name, rank)
    return _masks.mask_routing(topk_idx, rank_mask, spec.num_experts, spec.num_ranks, me), rank_mask


@jax.custom_vjp
def _ll_combine(y, topk_weights, handle):
    return _impl(handle.spec, "ll_combine")(y, topk_weights, handle)


def _ll_combine_fwd(y, topk_weights, handle):
    out = _ll_combine(y, topk_weights, handle)
    return out, (y, topk_weights, handle, out)


def _ll_combine_bwd(res, ct):
    y, topk_weights, handle, out = res
    spec = handle.spec
    if spec.options.combine_fp8:
        raise NotImplementedError(
            "low_latency_combine with combine_fp8=True has no gradient (the cast is not differentiable); "
            "differentiate a BF16 combine (LowLatencyOptions(combine_fp8=False)) instead"
        )
    # The CUDA backward ops are calls on the same buffer, and each kind must
    # follow the previous call of its kind: tie them in order (after the
    # forward combine's receive, the gather; after the gather, the scatter).
    y, _ = jax.lax.optimization_barrier((y, out))
    vals = _impl(spec, "ll_gather_back")(y, handle)
    grad_w = jnp.einsum("th,tkh->tk", ct.astype(jnp.float32), vals, precision="highest")
    weighted = topk_weights[..., None] * ct[:, None, :].astype(jnp.float32)  # [T, K, H]
    weighted, _ = jax.lax.optimization_barrier((weighted, vals))
    grad_y = _impl(spec, "ll_scatter_out")(weighted, handle).astype(y.dtype)
    return grad_y, grad_w, _zero_cotangent(handle)


_ll_combine.defvjp(_ll_combine_fwd, _ll_combine_bwd)


def low_latency_combine(y: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle) -> jax.Array:
    """Return expert outputs to their tokens and sum them with the top-k weights.

    ``out[t] = sum_k topk_weights[t, k] * y_row(t, topk_idx[t, k])`` over the
    valid slots (float32 accumulation), as DeepEP's low-latency combine.

    Args:
      y: ``[E/R, R*M, H]`` bfloat16/float16/float32, rows as dispatch packed them.
      topk_weights: ``float32 [T, K]``, the weights of the dispatched ``topk_idx``.
      handle: that dispatch's ``LowLatencyHandle``.

    Returns:
      ``[T, H]`` in y's dtype; differentiable in ``y`` and ``topk_weights``.
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(
            f"handle must be the LowLatencyHandle returned by jax_ep.low_latency_dispatch, got {type(handle).__name__}"
        )
    s = handle.spec
    want = (s.num_local_experts, s.num_ranks * s.max_tokens, s.hidden)
    if getattr(y, "shape", None) != want or y.dtype not in validation.PAYLOAD_DTYPES:
        raise ValueError(
            f"y must be a bfloat16/float16/float32 array of shape [E/R, R*M, H] = {want}, "
            f"got {getattr(y, 'dtype', None)} {getattr(y, 'shape', None)}"
        )
    validation.check_topk_weights(topk_weights, handle.topk_idx)
    return _ll_combine(y, topk_weights, handle)


# --- send/receive split -----------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyPending:
    """A low-latency call whose sends were issued and whose receive is pending.

    ``token`` orders the receive after the send; ``state`` holds what the
    receive needs (the reference backend already holds the results there).
    """

    token: jax.Array
    state: tuple
    spec: object = dataclasses.field(default=None, metadata=dict(static=True))
    kind: str = dataclasses.field(default="dispatch", metadata=dict(static=True))  # or "combine"

    def then(self, tree):
        """``tree`` unchanged, ordered after this send: compute that consumes
        the result is scheduled after the send was issued, so it can overlap
        the transfer (XLA may otherwise schedule independent compute first)."""
        tree, _ = jax.lax.optimization_barrier((tree, self.token))
        return tree


def _after(value, after):
    """`value`, tied to `after` so XLA schedules its consumer after `after`."""
    if after is None:
        return value
    value, _ = jax.lax.optimization_barrier((value, after))
    return value


def low_latency_dispatch_send(
    x: jax.Array, topk_idx: jax.Array, *, num_experts: int, axis_name="ep",
    options: LowLatencyOptions = LowLatencyOptions(), after=None, rank_mask=None,
) -> LowLatencyPending:
    """Issue a low-latency dispatch's sends and return at once (DeepEP's
    ``return_recv_hook``). No SM waits between send and receive.

    With the CUDA backend and ``options.async_send`` (the default) the send
    kernel runs on a CUDA stream of its own, beside whatever XLA runs next;
    place compute between send and receive (``pending.then(inputs)`` orders
    it after the send, ``after=`` orders the receive after it) and it
    overlaps the transfer. Same arguments as ``low_latency_dispatch``, and
    ``after``: arrays the send must follow. Not differentiable.
    ``rank_mask`` as in ``low_latency_dispatch``.

    On one buffer, every send must be received before the next send of its
    kind. XLA orders calls only by their data, so when one program issues
    several rounds, pass the previous round's result as ``after``.
    """
    x, topk_idx = _after((x, topk_idx), after)
    spec = _ll_spec(x, topk_idx, num_experts, axis_name, options)
    topk_idx = topk_idx.astype(jnp.int32)
    backend = get_backend(options.backend)
    if hasattr(backend, "ll_dispatch_send"):
        if options.checked:
            x, topk_idx, _ = checked.check_ids(x, topk_idx, None, num_experts, axis_name)
        topk_idx, rank_mask = _apply_rank_mask(topk_idx, rank_mask, spec)
        # The send's mask operand, which an asynchronous send reads after XLA
        # took the send as done: its receive takes it again to keep it alive.
        send_mask = backend.ll_send_mask(spec, rank_mask)
        token = backend.ll_dispatch_send(x, topk_idx, spec, asynchronous=options.async_send, rank_mask=send_mask)
        sent = (x, send_mask) if options.async_send else (None, None)
        return LowLatencyPending(token, (topk_idx, sent[0], rank_mask, sent[1]), spec)
    out = low_latency_dispatch(x, topk_idx, num_experts=num_experts, axis_name=axis_name, options=options,
                               rank_mask=rank_mask)
    return LowLatencyPending(jnp.zeros((), jnp.int32), tuple(out), spec)


def low_latency_dispatch_recv(pending: LowLatencyPending, *, after=None) -> LowLatencyDispatchOutput:
    """Receive a dispatch issued by ``low_latency_dispatch_send``.

    Args:
      pending: what the send returned.
      after: optional arrays the receive must wait for (XLA schedules the
        receive after them), e.g. the result of the compute to overlap.
    """
    _check_pending(pending, "low_latency_dispatch_recv", "dispatch")
    spec = pending.spec
    backend = get_backend(spec.options.backend)
    if hasattr(backend, "ll_dispatch_recv"):
        token = _after(pending.token, after)
        topk_idx, sent_x, rank_mask, sent_mask = pending.state
        return LowLatencyDispatchOutput(*backend.ll_dispatch_recv(token, topk_idx, spec, sent_x=sent_x,
                                                                  rank_mask=rank_mask, sent_mask=sent_mask))
    return LowLatencyDispatchOutput(*_after(pending.state, after))


def low_latency_combine_send(
    y: jax.Array, handle: LowLatencyHandle, recv_count: jax.Array | None = None, *, after=None
) -> LowLatencyPending:
    """Issue a low-latency combine's sends (see ``low_latency_dispatch_send``;
    ``handle.spec.options.async_send`` picks the stream).

    Args:
      y: ``[E/R, R*M, H]`` expert outputs (bfloat16 with the CUDA backend).
      handle: the dispatch's handle.
      recv_count: the dispatch's ``recv_count``; accepted and not needed (the
        handle determines it).
      after: arrays the send must follow (the previous combine's result when
        one program issues several rounds).
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle must be a LowLatencyHandle, got {type(handle).__name__}")
    y = _after(y, after)
    backend = get_backend(handle.spec.options.backend)
    if hasattr(backend, "ll_combine_send"):
        if y.dtype != jnp.bfloat16:
            raise TypeError(f"the CUDA low-latency combine takes bfloat16 y, got {y.dtype}")
        asynchronous = handle.spec.options.async_send
        send_mask = backend.ll_send_mask(handle.spec, handle=handle)  # kept alive as in the dispatch
        token = backend.ll_combine_send(y, handle, asynchronous=asynchronous, mask=send_mask)
        sent = (y, send_mask) if asynchronous else (None, None)
        return LowLatencyPending(token, (handle, *sent), handle.spec, "combine")
    return LowLatencyPending(jnp.zeros((), jnp.int32), (y, handle), handle.spec, "combine")


def low_latency_combine_recv(pending: LowLatencyPending, topk_weights: jax.Array, *, after=None) -> jax.Array:
    """Receive a combine issued by ``low_latency_combine_send``: ``[T, H]``."""
    _check_pending(pending, "low_latency_combine_recv", "combine")
    spec = pending.spec
    backend = get_backend(spec.options.backend)
    if hasattr(backend, "ll_combine_recv"):
        handle, sent_y, sent_mask = pending.state
        return backend.ll_combine_recv(_after(pending.token, after), topk_weights, handle, sent_y=sent_y,
                                       asynchronous=sent_y is not None, sent_mask=sent_mask)
    y, handle = _after(pending.state, after)
    return low_latency_combine(y, topk_weights, handle)


def _check_pending(pending, fn: str, kind: str) -> None:
    if not isinstance(pending, LowLatencyPending):
        raise TypeError(f"{fn} takes the LowLatencyPending returned by low_latency_{kind}_send, got {type(pending).__name__}")
    if pending.kind != kind:
        other = "dispatch" if kind == "combine" else "combine"
        raise TypeError(f"{fn} got the pending result of low_latency_{other}_send; "
                        f"receive it with low_latency_{other}_recv")
