"""Normal (high-throughput) dispatch and combine, differentiable.

Call these inside ``jax.shard_map`` over the expert-parallel axis; every
argument is the local shard of one rank. ``combine`` is the gradient of
``dispatch`` and ``cached_dispatch`` the gradient of ``combine``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import checked, validation
from jax_ep.backends import get_backend, require
from jax_ep.handle import DispatchHandle, NormalSpec
from jax_ep.options import NormalOptions


class DispatchOutput(NamedTuple):
    """What ``dispatch`` returns on each rank (``C`` = capacity rows).

    Attributes:
      recv_x: ``[C, H]`` in x's dtype, or the FP8 pair ``(float8_e4m3fn [C, H],
        float32 [C, H/128])``. Padding rows are zero.
      recv_topk_idx: ``int32 [C, K]``, local expert ids of the row's top-k
        slots that this rank owns, -1 elsewhere and on padding. In the
        expert-major layout only the slots of the row's own expert are set.
      recv_topk_weights: ``float32 [C, K]``, the weights of those slots, 0
        elsewhere.
      num_recv_tokens_per_expert: ``int32 [E/R]``, tokens routed to each local
        expert from all ranks (dropped rows included).
      expert_group_sizes: expert-major only, ``int32 [E/R]``: rows of the
        buffer that belong to each expert's group (counts rounded up to the
        alignment, clipped at ``C``); the ``group_sizes`` of
        ``jax.lax.ragged_dot``. ``None`` in the rank-major layout.
      num_recv_rows: ``int32 []``, rows that hold a token.
      num_dropped: ``int32 []``, rows that did not fit in ``C``.
      handle: ``DispatchHandle`` for ``combine`` and ``cached_dispatch``.
    """

    recv_x: jax.Array | tuple
    recv_topk_idx: jax.Array
    recv_topk_weights: jax.Array
    num_recv_tokens_per_expert: jax.Array
    expert_group_sizes: jax.Array | None
    num_recv_rows: jax.Array
    num_dropped: jax.Array
    handle: DispatchHandle


def _worst_case_capacity(options: NormalOptions, r: int, t: int, k: int, local_experts: int) -> int:
    if options.layout == "rank_major":
        return max(r * t, 1)
    return max(r * t * min(k, local_experts) + local_experts * (options.expert_alignment - 1), 1)


def _zero_cotangent(tree):
    """Cotangent of a pytree that carries no gradient (float0 for integer leaves)."""

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _combine_leaves(tree, handle: DispatchHandle):
    backend = get_backend(handle.spec.options.backend)
    combine_fn = require(backend, "combine", handle.spec.options.backend)
    return jax.tree.map(lambda a: combine_fn(a, handle), tree)


def _dispatch_leaves(tree, handle: DispatchHandle):
    backend = get_backend(handle.spec.options.backend)
    cached = require(backend, "cached_dispatch", handle.spec.options.backend)
    return jax.tree.map(lambda a: cached(a, handle), tree)


# --- dispatch -----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x, topk_idx, topk_weights, spec: NormalSpec):
    return _dispatch_fwd(x, topk_idx, topk_weights, spec)[0]


def _dispatch_fwd(x, topk_idx, topk_weights, spec):
    backend = get_backend(spec.options.backend)
    fused = getattr(backend, "dispatch", None)
    if fused is not None:  # routing and payload in one pass (one barrier)
        out = fused(x, topk_idx, topk_weights, spec)
    else:
        route = require(backend, "dispatch_route", spec.options.backend)
        idx, w, counts, group_sizes, kept, needed, handle = route(topk_idx, topk_weights, spec)
        out = (_dispatch_leaves(x, handle), idx, w, counts, group_sizes, kept, needed, handle)
    return out, (out[7], out[1])


def _dispatch_bwd(spec, res, ct):
    handle, idx = res
    ct_x, ct_w = ct[0], ct[2]
    grad_x = _combine_leaves(ct_x, handle)
    # Only the slots a row owns carry its weight; the rest are constant zeros.
    grad_w = _combine_leaves(jnp.where(idx >= 0, ct_w, 0.0), handle)
    topk_ct = np.zeros(handle.is_token_in_rank.shape[:1] + idx.shape[1:], jax.dtypes.float0)
    return grad_x, topk_ct, grad_w


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def dispatch(
    x,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name="ep",
    options: NormalOptions = NormalOptions(),
) -> DispatchOutput:
    """Send each token once to every rank that owns one of its top-k experts.

    Call inside ``jax.shard_map`` over ``axis_name`` (``R`` ranks); rank ``r``
    owns experts ``[r*E/R, (r+1)*E/R)``.

    Args:
      x: ``[T, H]`` bfloat16/float16/float32, or an FP8 pair ``(float8_e4m3fn
        [T, H], float32 [T, H/128])`` from ``per_token_cast_to_fp8``.
      topk_idx: ``int32 [T, K]`` global expert ids, -1 masks a slot.
      topk_weights: ``float32 [T, K]``.
      num_experts: ``E`` (static), divisible by ``R``.
      axis_name: the EP mesh axis (static).
      options: ``NormalOptions`` (static): layout, capacity, alignment,
        checked mode, backend.

    Layouts (``C = options.num_max_recv_tokens``):
      * rank-major: rows ordered by (source rank, source token); row ``i`` of
        that order lands in buffer row ``i`` if ``i < C``, else it is dropped.
      * expert-major: one row per (token, local expert), ordered by (local
        expert, source rank, source token); expert ``e``'s group starts at
        ``sum_{e' < e} roundup(count[e'], alignment)``; a row whose position
        reaches ``C`` is dropped.
      Dropped rows are counted in ``num_dropped``; ``options.checked`` raises
      ``CapacityOverflowError`` instead, on every rank (see
      ``jax_ep.checked_errors``). Nothing is written out of bounds.

    Returns:
      ``DispatchOutput``. Gradients flow to ``x`` and ``topk_weights``: the
      VJP is a ``combine`` of the cotangents through the same handle.
    """
    options = _check_options(options)
    fp8_input = isinstance(x, (tuple, list))
    if fp8_input:
        validation.check_fp8_pair(x)
        x = tuple(x)
        t = x[0].shape[0]
    else:
        validation.check_hidden_states(x)
        t = x.shape[0]
    validation.check_topk_idx(topk_idx, t)
    validation.check_topk_weights(topk_weights, topk_idx)
    r = validation.num_ranks_for(axis_name, options.backend, options.buffer_id)
    validation.check_num_experts(num_experts, r)
    validation.check_ids_in_range_now(topk_idx, num_experts)
    k = topk_idx.shape[1]
    capacity = options.num_max_recv_tokens or _worst_case_capacity(options, r, t, k, num_experts // r)
    spec = NormalSpec(
        num_ranks=r, num_experts=num_experts, num_tokens=t, num_topk=k, capacity=capacity,
        axis_name=axis_name, options=options,
    )
    topk_idx = topk_idx.astype(jnp.int32)
    if options.checked:  # every rank fails together, before anything is exchanged
        x, topk_idx, topk_weights = checked.check_ids(x, topk_idx, topk_weights, num_experts, axis_name)
    recv_x, idx, w, counts, group_sizes, kept, needed, handle = _dispatch(x, topk_idx, topk_weights, spec)
    dropped = (needed - kept).astype(jnp.int32)
    if options.checked:  # every rank fails together, before any later exchange
        (recv_x, idx, w, counts, group_sizes, kept, dropped), handle = checked.check_overflow(
            (recv_x, idx, w, counts, group_sizes, kept, dropped), handle, dropped, needed, capacity, axis_name)
    return DispatchOutput(recv_x, idx, w, counts, group_sizes, kept.astype(jnp.int32), dropped, handle)


def _check_options(options) -> NormalOptions:
    if not isinstance(options, NormalOptions):
        raise TypeError(f"options must be a jax_ep.NormalOptions, got {type(options).__name__}")
    return options


def _check_handle(handle) -> None:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(
            f"handle must be the DispatchHandle returned by jax_ep.dispatch, got {type(handle).__name__}"
        )


def _check_rows(value, rows: int, name: str) -> None:
    for leaf in jax.tree.leaves(value):
        if leaf.ndim < 1 or leaf.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} rows (one per handle row), got shape {leaf.shape}")


# --- cached dispatch and combine ----------------------------------------------


@jax.custom_vjp
def _cached_dispatch(x, handle):
    return _dispatch_leaves(x, handle)


def _cached_dispatch_fwd(x, handle):
    return _dispatch_leaves(x, handle), handle


def _cached_dispatch_bwd(handle, ct):
    return _combine_leaves(ct, handle), _zero_cotangent(handle)


_cached_dispatch.defvjp(_cached_dispatch_fwd, _cached_dispatch_bwd)


def cached_dispatch(x, handle: DispatchHandle):
    """Dispatch new rows along the routing of an earlier ``dispatch``.

    DeepEP's handle-reusing dispatch; the backward of ``combine``.

    Args:
      x: ``[T, ...]`` (any trailing shape; FP8 pairs as a tuple).
      handle: the ``DispatchHandle`` of a ``dispatch`` with the same ``T``.

    Returns:
      ``[C, ...]`` in x's dtype, rows placed exactly as that dispatch placed them.
    """
    _check_handle(handle)
    _check_rows(x, handle.spec.num_tokens, "x")
    return _cached_dispatch(tuple(x) if isinstance(x, list) else x, handle)


@jax.custom_vjp
def _combine(y, handle):
    return _combine_leaves(y, handle)


def _combine_fwd(y, handle):
    return _combine_leaves(y, handle), handle


def _combine_bwd(handle, ct):
    return _dispatch_leaves(ct, handle), _zero_cotangent(handle)


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(y: jax.Array, handle: DispatchHandle) -> jax.Array:
    """Return every received row to its token and sum, without weights.

    DeepEP's normal combine: ``out[t] = sum of all rows that came from token
    t`` on every rank (one row per rank in the rank-major layout, one per
    (rank, local expert) in the expert-major layout). Apply top-k weights to
    ``y`` before combining. Sums accumulate in float32.

    Args:
      y: ``[C, H]`` (bfloat16/float16/float32), rows as ``dispatch`` placed them;
        padding and dropped rows are ignored.
      handle: that dispatch's ``DispatchHandle``.

    Returns:
      ``[T, H]`` in y's dtype. Its VJP is ``cached_dispatch`` of the cotangent.
    """
    _check_handle(handle)
    if getattr(y, "ndim", None) != 2 or y.dtype not in validation.PAYLOAD_DTYPES:
        raise ValueError(
            f"y must be a [C, H] bfloat16/float16/float32 array, got {getattr(y, 'dtype', None)} "
            f"{getattr(y, 'shape', None)}"
        )
    _check_rows(y, handle.spec.capacity, "y")
    return _combine(y, handle)
