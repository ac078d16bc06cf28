"""Normal-mode dispatch and combine in pure JAX, inside ``shard_map``.

Each rank sends every token to every rank over one ``all_to_all`` of
``[R, T, ...]`` and the receiver keeps the rows routed to it; the receive
placement (which source row lands in which static buffer row) is computed
from the exchanged top-k ids alone, so ``cached_dispatch`` and ``combine`` are
exact transposes of each other. This moves ``R*T`` rows per rank where the
kernels move only the routed ones: it is the definition, not the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.handle import DispatchHandle, NormalSpec
from jax_ep.reference import routing


def _flat_src(handle: DispatchHandle) -> jax.Array:
    t = handle.spec.num_tokens
    return jnp.where(handle.recv_src_rank >= 0, handle.recv_src_rank * t + handle.recv_src_token, -1)


def dispatch_route(topk_idx: jax.Array, topk_weights: jax.Array, spec: NormalSpec):
    """Exchange the routing and place the receive rows.

    Returns (recv_topk_idx [C, K], recv_topk_weights [C, K],
    num_recv_tokens_per_expert [E/R], expert_group_sizes [E/R] or None,
    num_recv_rows, num_needed_rows, handle).
    """
    r, t, k, c = spec.num_ranks, spec.num_tokens, spec.num_topk, spec.capacity
    local_experts = spec.num_local_experts
    send_idx = routing.local_ids_per_rank(topk_idx, spec.num_experts, r)  # [R, T, K]
    send_w = jnp.where(send_idx >= 0, topk_weights[None], 0.0)
    recv_idx = routing.exchange(send_idx, spec.axis_name).reshape(r * t, k)
    recv_w = routing.exchange(send_w, spec.axis_name).reshape(r * t, k)
    valid = recv_idx >= 0
    first = routing.first_slots(recv_idx, valid)
    counts = jnp.zeros((local_experts + 1,), jnp.int32).at[jnp.where(first, recv_idx, local_experts)].add(1)
    counts = counts[:local_experts]

    if spec.options.layout == "rank_major":
        src, kept, needed = routing.pack_ranked(jnp.any(valid, axis=-1), c)
        out_idx = routing.gather_rows(recv_idx, src)
        out_idx = jnp.where((src >= 0)[:, None], out_idx, -1)
        out_w = routing.gather_rows(recv_w, src)
        group_sizes = None
    else:
        # One row per (token, local expert): entries are (row, first slot).
        group = jnp.where(first, recv_idx, local_experts).reshape(-1)
        entry, _, group_sizes, kept, needed = routing.pack_grouped(
            group, local_experts, spec.options.expert_alignment, c
        )
        src = jnp.where(entry >= 0, entry // k, -1)
        row_idx = routing.gather_rows(recv_idx, src)
        row_expert = routing.gather_rows(group, entry)
        mine = (row_idx == row_expert[:, None]) & (entry >= 0)[:, None]
        out_idx = jnp.where(mine, row_idx, -1)
        out_w = jnp.where(mine, routing.gather_rows(recv_w, src), 0.0)

    handle = DispatchHandle(
        recv_src_rank=jnp.where(src >= 0, src // t, -1).astype(jnp.int32),
        recv_src_token=jnp.where(src >= 0, src % t, -1).astype(jnp.int32),
        is_token_in_rank=jnp.any(send_idx >= 0, axis=-1).T,
        spec=spec,
    )
    return out_idx, out_w, counts, group_sizes, kept, needed, handle


def cached_dispatch(payload: jax.Array, handle: DispatchHandle) -> jax.Array:
    """[T, ...] -> [C, ...]: each receive row is its source token's row."""
    spec = handle.spec
    sent = jnp.broadcast_to(payload[None], (spec.num_ranks,) + payload.shape)
    received = routing.exchange(sent, spec.axis_name)
    received = received.reshape((spec.num_ranks * spec.num_tokens,) + payload.shape[1:])
    return routing.gather_rows(received, _flat_src(handle))


def combine(y: jax.Array, handle: DispatchHandle) -> jax.Array:
    """[C, ...] -> [T, ...]: sum of every receive row into its source token (float32 sum)."""
    spec = handle.spec
    r, t = spec.num_ranks, spec.num_tokens
    partial = routing.scatter_add_rows(y, _flat_src(handle), r * t).reshape((r, t) + y.shape[1:])
    returned = routing.exchange(partial, spec.axis_name)
    return jnp.sum(returned, axis=0).astype(y.dtype)
