"""``get_dispatch_layout``: how many tokens go to each rank and expert."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep import validation
from jax_ep.backends import get_backend, require
from jax_ep.options import BACKENDS


class DispatchLayout(NamedTuple):
    """Routing counts of one rank's tokens.

    Attributes:
      num_tokens_per_rank: ``int32 [R]``, tokens this rank sends to each rank
        (each token once per rank, however many of its experts live there).
      num_tokens_per_expert: ``int32 [E]``, tokens routed to each expert (a
        token naming an expert twice counts once).
      is_token_in_rank: ``bool [T, R]``, token ``t`` goes to rank ``r``.
    """

    num_tokens_per_rank: jax.Array
    num_tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array


def get_dispatch_layout(
    topk_idx: jax.Array,
    num_experts: int,
    *,
    num_ranks: int | None = None,
    axis_name="ep",
    backend: str = "xla",
) -> DispatchLayout:
    """Count where this rank's tokens go. Local: no communication.

    Args:
      topk_idx: ``int32 [T, K]`` expert ids; -1 masks a slot.
      num_experts: ``E`` (static), divisible by ``R``; rank ``r`` owns experts
        ``[r*E/R, (r+1)*E/R)``.
      num_ranks: ``R`` (static). ``None`` reads the size of ``axis_name``
        (inside ``shard_map``).
      axis_name: the EP mesh axis.
      backend: ``"xla"`` or ``"cuda"`` (static).

    Returns:
      ``DispatchLayout`` of exact integers. Ids outside ``[0, E)`` are ignored
      (concrete ids out of ``[-1, E)`` raise here).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    validation.check_topk_idx(topk_idx)
    r = validation.num_ranks_of(axis_name, num_ranks)
    validation.check_num_experts(num_experts, r)
    validation.check_ids_in_range_now(topk_idx, num_experts)
    impl = require(get_backend(backend), "get_dispatch_layout", backend)
    return DispatchLayout(*impl(jnp.asarray(topk_idx).astype(jnp.int32), num_experts, r))
