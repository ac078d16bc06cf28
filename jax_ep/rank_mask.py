"""Masked ranks of low-latency mode: ranks that failed, left out of every call.

A rank mask is a ``bool [R]`` array, the same on every rank, ``True`` for a
masked rank. It is an ordinary (traced) input, so changing it does not
recompile. A surviving rank treats every top-k slot that names an expert of a
masked rank as masked (id -1: nothing is sent, the slot contributes nothing to
the combine); a masked rank itself sends nothing, receives nothing and its
combine returns zeros. With the CUDA kernels a surviving rank also neither
writes to nor waits for a masked rank, so the survivors go on without it,
through the same buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_rank_mask(rank_mask, num_ranks: int):
    """``rank_mask`` as ``bool [R]`` (None stays None), or a clear error."""
    if rank_mask is None:
        return None
    if isinstance(rank_mask, (list, tuple)):
        rank_mask = np.asarray(rank_mask)
    shape = getattr(rank_mask, "shape", None)
    dtype = getattr(rank_mask, "dtype", None)
    if shape != (num_ranks,) or not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(
            f"rank_mask must be a bool array [R] = [{num_ranks}] (True for a masked rank, the same on every "
            f"rank), got {dtype} {shape}; build one with jax_ep.rank_mask_of(masked_ranks, num_ranks)"
        )
    return jnp.asarray(rank_mask).astype(jnp.bool_)


def rank_mask_of(masked_ranks, num_ranks: int) -> np.ndarray:
    """``bool [R]``, True at each rank of ``masked_ranks`` (an iterable of ints)."""
    mask = np.zeros((num_ranks,), bool)
    for r in masked_ranks:
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 <= r < num_ranks:
            raise ValueError(f"masked ranks must be ints in [0, {num_ranks}), got {r!r}")
        mask[int(r)] = True
    return mask


def this_rank(axis_name, rank: int | None):
    """This rank's index: ``rank`` when known statically (one rank per
    process), else its position on the EP axis."""
    if rank is not None:
        return jnp.int32(rank)
    return jax.lax.axis_index(axis_name).astype(jnp.int32)


def mask_routing(topk_idx, rank_mask, num_experts: int, num_ranks: int, me):
    """int32 [T, K]: ``topk_idx`` with -1 in every slot whose expert lives on a
    masked rank, and in every slot when this rank (``me``) is masked."""
    local = num_experts // num_ranks
    owner = jnp.clip(topk_idx, 0, num_experts - 1) // local
    off = rank_mask[owner] | rank_mask[me]
    return jnp.where(off & (topk_idx >= 0), -1, topk_idx).astype(jnp.int32)
