"""Routing arithmetic shared by the pure-JAX layouts: which slots are valid,
which rank owns them, and where each row lands in a static receive buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def valid_slots(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """bool [T, K]: the slot names an expert (ids outside [0, E) are masked)."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def first_slots(topk_idx: jax.Array, valid: jax.Array) -> jax.Array:
    """bool [..., K]: a valid slot whose id no earlier slot of the token repeats.

    A token that names an expert twice is sent to it once; both slots' weights
    apply to that one row in the weighted combine.
    """
    k = topk_idx.shape[-1]
    same = topk_idx[..., :, None] == topk_idx[..., None, :]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, k'] = k' < k
    repeated = jnp.any(same & earlier & valid[..., None, :], axis=-1)
    return valid & ~repeated


def first_slot_index(topk_idx: jax.Array) -> jax.Array:
    """int32 [..., K]: index of the first slot holding the same id as slot k."""
    k = topk_idx.shape[-1]
    same = topk_idx[..., :, None] == topk_idx[..., None, :]
    return jnp.argmax(same, axis=-1).astype(jnp.int32) if k > 1 else jnp.zeros_like(topk_idx, jnp.int32)


def local_ids_per_rank(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> jax.Array:
    """int32 [R, T, K]: slot's local expert id on rank r, -1 where rank r does not own it."""
    local_experts = num_experts // num_ranks
    valid = valid_slots(topk_idx, num_experts)
    owner = jnp.where(valid, topk_idx // local_experts, -1)
    local = topk_idx - owner * local_experts
    ranks = jnp.arange(num_ranks, dtype=jnp.int32)[:, None, None]
    return jnp.where(owner[None] == ranks, local[None], -1).astype(jnp.int32)


def exchange(x: jax.Array, axis_name) -> jax.Array:
    """[R, ...] with row r for rank r -> [R, ...] with row s from rank s."""
    return lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0)


def pack_ranked(valid_flat: jax.Array, capacity: int):
    """Place valid entries in order into `capacity` rows; later ones drop.

    Returns (src [capacity] int32 entry index or -1, kept count, needed count).
    """
    valid_flat = valid_flat.astype(jnp.int32)
    pos = jnp.cumsum(valid_flat) - 1
    needed = jnp.sum(valid_flat)
    target = jnp.where((valid_flat > 0) & (pos < capacity), pos, capacity)
    entries = jnp.arange(valid_flat.shape[0], dtype=jnp.int32)
    src = jnp.full((capacity,), -1, jnp.int32).at[target].set(entries, mode="drop")
    return src, jnp.minimum(needed, capacity), needed


def pack_grouped(group: jax.Array, num_groups: int, alignment: int, capacity: int):
    """Place entries grouped by `group` (num_groups = none), in entry order
    within a group, each group starting at a multiple of `alignment`.

    Returns (src [capacity] int32 entry index or -1, counts [G], group_sizes
    [G] rows of each group inside the buffer, kept, needed).
    """
    n = group.shape[0]
    counts = jnp.zeros((num_groups + 1,), jnp.int32).at[group].add(1)[:num_groups]
    order = jnp.argsort(group, stable=True)
    sorted_group = group[order]
    exact_start = jnp.cumsum(counts) - counts
    aligned = (counts + alignment - 1) // alignment * alignment
    aligned_start = jnp.cumsum(aligned) - aligned
    in_group = sorted_group < num_groups
    safe_group = jnp.where(in_group, sorted_group, 0)
    rank_in_group = jnp.arange(n, dtype=jnp.int32) - exact_start[safe_group]
    pos = aligned_start[safe_group] + rank_in_group
    keep = in_group & (pos < capacity)
    target = jnp.where(keep, pos, capacity)
    src = jnp.full((capacity,), -1, jnp.int32).at[target].set(order.astype(jnp.int32), mode="drop")
    group_sizes = jnp.clip(aligned_start + aligned, 0, capacity) - jnp.clip(aligned_start, 0, capacity)
    return src, counts, group_sizes, jnp.sum(keep), jnp.sum(counts)


def gather_rows(table: jax.Array, src: jax.Array) -> jax.Array:
    """table [N, ...] rows at src (any shape, -1 = zero row); N may be 0 (no
    tokens on any rank: every row is zero)."""
    if table.shape[0] == 0:  # one zero row to take from (concatenated: keeps the table's axis type)
        table = jnp.concatenate([table, jnp.zeros((1,) + table.shape[1:], table.dtype)])
    rows = jnp.take(table, jnp.maximum(src, 0), axis=0)
    mask = (src >= 0).reshape(src.shape + (1,) * (table.ndim - 1))
    return jnp.where(mask, rows, jnp.zeros((), table.dtype))


def scatter_add_rows(values: jax.Array, dst: jax.Array, num_rows: int) -> jax.Array:
    """Sum rows of values [N, ...] into float32 [num_rows, ...] at dst (-1 = skip)."""
    target = jnp.where(dst >= 0, dst, num_rows)
    out = jnp.zeros((num_rows,) + values.shape[1:], jnp.float32)
    return out.at[target].add(values.astype(jnp.float32), mode="drop")
