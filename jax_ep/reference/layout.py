"""Dispatch layout in pure JAX (no communication)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.reference.routing import first_slots, valid_slots


def get_dispatch_layout(topk_idx: jax.Array, num_experts: int, num_ranks: int):
    """topk_idx int32 [T, K] -> (int32 [R], int32 [E], bool [T, R])."""
    local_experts = num_experts // num_ranks
    valid = valid_slots(topk_idx, num_experts)
    first = first_slots(topk_idx, valid)
    expert = jnp.where(first, topk_idx, num_experts)
    per_expert = jnp.zeros((num_experts + 1,), jnp.int32).at[expert].add(1)[:num_experts]
    owner = jnp.where(valid, topk_idx // local_experts, num_ranks)
    in_rank = jnp.any(owner[:, :, None] == jnp.arange(num_ranks)[None, None, :], axis=1)
    per_rank = jnp.sum(in_rank, axis=0, dtype=jnp.int32)
    return per_rank, per_expert, in_rank
