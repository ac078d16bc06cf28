"""Low-latency dispatch and combine in pure JAX, inside ``shard_map``.

Layout: local expert ``e`` receives its tokens packed at the front of
``[R*M]`` rows, ordered by source rank, then source token; a token that names
an expert twice arrives once. ``recv_count[e]`` rows are valid, the rest zero.
Combine weights each returned row by the token's top-k weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.handle import LowLatencyHandle, LowLatencySpec
from jax_ep.reference import fp8 as fp8_ref
from jax_ep.reference import routing


def _entry(handle: LowLatencyHandle):
    """Flat (source rank, token, slot) index of each packed row, -1 on padding."""
    s = handle.spec
    ok = handle.recv_src_rank >= 0
    token_row = handle.recv_src_rank * s.num_tokens + handle.recv_src_token
    return jnp.where(ok, token_row, -1), jnp.where(ok, token_row * s.num_topk + handle.recv_src_slot, -1)


def dispatch_route(topk_idx: jax.Array, spec: LowLatencySpec):
    """Exchange the routing and pack the rows per local expert.

    Returns (recv_count int32 [E/R], handle).
    """
    r, t, k = spec.num_ranks, spec.num_tokens, spec.num_topk
    local_experts = spec.num_local_experts
    rows = r * spec.max_tokens
    send_idx = routing.local_ids_per_rank(topk_idx, spec.num_experts, r)
    recv_idx = routing.exchange(send_idx, spec.axis_name).reshape(r * t, k)
    first = routing.first_slots(recv_idx, recv_idx >= 0)
    group = jnp.where(first, recv_idx, local_experts).reshape(-1)  # entries (rank, token, slot)
    counts = jnp.zeros((local_experts + 1,), jnp.int32).at[group].add(1)[:local_experts]
    order = jnp.argsort(group, stable=True).astype(jnp.int32)
    sorted_group = group[order]
    start = jnp.cumsum(counts) - counts
    in_group = sorted_group < local_experts
    safe = jnp.where(in_group, sorted_group, 0)
    pos = jnp.arange(order.shape[0], dtype=jnp.int32) - start[safe]
    target = jnp.where(in_group, safe * rows + pos, local_experts * rows)
    entry = jnp.full((local_experts * rows,), -1, jnp.int32).at[target].set(order, mode="drop")
    entry = entry.reshape(local_experts, rows)
    token_row = jnp.where(entry >= 0, entry // k, -1)
    handle = LowLatencyHandle(
        recv_src_rank=jnp.where(entry >= 0, token_row // t, -1),
        recv_src_token=jnp.where(entry >= 0, token_row % t, -1),
        recv_src_slot=jnp.where(entry >= 0, entry % k, -1),
        topk_idx=topk_idx.astype(jnp.int32),
        spec=spec,
    )
    return counts, handle


def dispatch_payload(payload: jax.Array, handle: LowLatencyHandle) -> jax.Array:
    """[T, ...] -> [E/R, R*M, ...]: each packed row is its source token's row."""
    s = handle.spec
    sent = jnp.broadcast_to(payload[None], (s.num_ranks,) + payload.shape)
    received = routing.exchange(sent, s.axis_name).reshape((s.num_ranks * s.num_tokens,) + payload.shape[1:])
    token_row, _ = _entry(handle)
    return routing.gather_rows(received, token_row)


def dispatch(x: jax.Array, handle: LowLatencyHandle):
    """x [T, H] -> BF16 [E/R, R*M, H], or the FP8 pair when spec.options.fp8 is set."""
    fp8 = handle.spec.options.fp8
    if fp8 is None:
        return dispatch_payload(x, handle)
    q, scales = fp8_ref.per_token_cast_to_fp8(x, fp8.round_scale, fp8.use_ue8m0)
    return dispatch_payload(q, handle), dispatch_payload(scales, handle)


def gather_back(y: jax.Array, handle: LowLatencyHandle) -> jax.Array:
    """y [E/R, R*M, H] -> float32 [T, K, H]: the expert output each top-k slot
    reads (zero on masked slots)."""
    s = handle.spec
    r, t, k, h = s.num_ranks, s.num_tokens, s.num_topk, y.shape[-1]
    _, slot_entry = _entry(handle)
    out = routing.scatter_add_rows(y.reshape(-1, h), slot_entry.reshape(-1), r * t * k)
    returned = routing.exchange(out.reshape(r, t, k, h), s.axis_name)  # [expert rank, T, K, H]
    idx = handle.topk_idx
    valid = routing.valid_slots(idx, s.num_experts)
    owner = jnp.where(valid, idx // s.num_local_experts, 0)
    first = routing.first_slot_index(idx)
    flat = (owner * t + jnp.arange(t)[:, None]) * k + first
    vals = jnp.take(returned.reshape(r * t * k, h), flat.reshape(-1), axis=0).reshape(t, k, h)
    return jnp.where(valid[..., None], vals, 0.0)


def scatter_out(v: jax.Array, handle: LowLatencyHandle) -> jax.Array:
    """Transpose of ``gather_back``: v [T, K, H] -> float32 [E/R, R*M, H]."""
    s = handle.spec
    r, t, k, h = s.num_ranks, s.num_tokens, s.num_topk, v.shape[-1]
    idx = handle.topk_idx
    valid = routing.valid_slots(idx, s.num_experts)
    owner = jnp.where(valid, idx // s.num_local_experts, 0)
    first = routing.first_slot_index(idx)
    flat = jnp.where(valid, (owner * t + jnp.arange(t)[:, None]) * k + first, -1)
    sent = routing.scatter_add_rows(v.reshape(t * k, h), flat.reshape(-1), r * t * k)
    received = routing.exchange(sent.reshape(r, t, k, h), s.axis_name).reshape(r * t * k, h)
    _, slot_entry = _entry(handle)
    return routing.gather_rows(received, slot_entry)


def combine(y: jax.Array, topk_weights: jax.Array, handle: LowLatencyHandle) -> jax.Array:
    """[E/R, R*M, H] -> [T, H] in y's dtype: sum over valid slots of weight * row
    (each row cast to FP8 and back first with ``options.combine_fp8``)."""
    rows = y
    if handle.spec.options.combine_fp8:
        q, scales = fp8_ref.per_token_cast_to_fp8(y, round_scale=False, use_ue8m0=False)
        rows = fp8_ref.per_token_cast_back(q, scales, use_ue8m0=False, out_dtype=jnp.float32)
    vals = gather_back(rows, handle)
    return jnp.einsum("tk,tkh->th", topk_weights, vals, precision="highest").astype(y.dtype)
