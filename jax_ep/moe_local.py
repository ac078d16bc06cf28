"""Normal mode's expert block when the EP axis has one rank.

With ``R = 1`` nothing crosses a link: the expert-major dispatch is a local
permutation of the ``T*K`` (token, slot) pairs and the combine its
transpose. This path sorts the pairs by expert, runs the experts on exactly
the kept rows (no alignment padding, no capacity rows past them) and adds
each row back into its token: pure XLA ops, differentiated by JAX, with no
buffer, no kernel launch and nothing that XLA must keep in program order.

It keeps the semantics of ``jax_ep.dispatch`` + ``combine`` in the
expert-major layout exactly: a token that names an expert twice runs it once
with both weights summed; rows are ordered by (expert, token) and expert
``e``'s group starts at its aligned offset, so a capacity below the worst
case drops the same rows (``num_dropped`` counts them); the rows' results add
up in float32 in the same order and round once to x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.reference import routing


def local_capacity(num_tokens: int, num_topk: int, num_experts: int, alignment: int, capacity: int | None) -> int:
    """Receive rows of a one-rank expert-major dispatch: ``capacity``, or the
    worst case ``T*min(K, E) + E*(alignment-1)`` (as ``jax_ep.dispatch``)."""
    if capacity is not None:
        return capacity
    return max(num_tokens * min(num_topk, num_experts) + num_experts * (alignment - 1), 1)


def local_round(config, options, params: dict, x: jax.Array, topk_idx: jax.Array,
                topk_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One expert-major round at ``R = 1``: what ``dispatch`` -> experts ->
    ``combine`` compute there, without the exchange.

    Args:
      config: the layer's ``MoEConfig`` (experts, activation).
      options: the round's ``NormalOptions`` (capacity, alignment).
      params: the expert weights ``w_* [E, ...]``.
      x: ``[T, H]``.
      topk_idx: ``int32 [T, K]`` expert ids, -1 masks a slot.
      topk_weights: ``float32 [T, K]``.

    Returns:
      ``(y [T, H] in x's dtype, rows dropped int32 [])``.
    """
    from jax_ep.moe import expert_mlp_ragged

    t, k = topk_idx.shape
    e = config.num_experts
    alignment = options.expert_alignment
    capacity = local_capacity(t, k, e, alignment, options.num_max_recv_tokens)
    valid = routing.valid_slots(topk_idx, e)
    # One row per (token, expert), carried by the expert's first slot.
    group = jnp.where(routing.first_slots(topk_idx, valid), topk_idx, e).reshape(-1)
    order = jnp.argsort(group, stable=True)  # (expert, token) order; masked slots last
    counts = jnp.zeros((e + 1,), jnp.int32).at[group].add(1)[:e]
    aligned = (counts + alignment - 1) // alignment * alignment
    start = jnp.cumsum(aligned) - aligned
    # A row is kept when its aligned position is below the capacity: per
    # expert a prefix of its rows, and over the sorted order a prefix too.
    kept_sizes = jnp.clip(capacity - start, 0, counts).astype(jnp.int32)
    num_kept = jnp.sum(kept_sizes)
    # The row's weight: the sum of the token's slot weights naming its expert.
    same = (topk_idx[:, :, None] == topk_idx[:, None, :]) & valid[:, None, :]
    row_w = jnp.sum(jnp.where(same, topk_weights[:, None, :], 0.0), axis=-1).reshape(-1)[order]
    token = (order // k).astype(jnp.int32)
    y = expert_mlp_ragged(jnp.take(x, token, axis=0), params, kept_sizes, config)
    y = y * row_w[:, None].astype(y.dtype)
    kept = jnp.arange(t * k) < num_kept
    out = jnp.zeros((t, x.shape[-1]), jnp.float32).at[jnp.where(kept, token, t)].add(
        y.astype(jnp.float32), mode="drop")
    return out.astype(x.dtype), (jnp.sum(counts) - num_kept).astype(jnp.int32)
