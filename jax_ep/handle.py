"""Handles: what dispatch learns about the routing, reused by combine and by
the backward passes. Each is a pytree of arrays with its static shape facts as
metadata, so it crosses ``jit``, ``scan`` and ``custom_vjp`` boundaries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jax_ep.options import LowLatencyOptions, NormalOptions


@dataclasses.dataclass(frozen=True)
class NormalSpec:
    """Static facts of one normal dispatch (resolved at trace time)."""

    num_ranks: int  # R
    num_experts: int  # E
    num_tokens: int  # T on each rank
    num_topk: int  # K
    capacity: int  # C, rows of the receive buffer
    axis_name: Any
    options: NormalOptions

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


@dataclasses.dataclass(frozen=True)
class LowLatencySpec:
    """Static facts of one low-latency dispatch (resolved at trace time)."""

    num_ranks: int  # R
    num_experts: int  # E
    num_tokens: int  # T on each rank, <= M
    num_topk: int  # K
    hidden: int  # H
    axis_name: Any
    options: LowLatencyOptions

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def max_tokens(self) -> int:
        return self.options.num_max_dispatch_tokens_per_rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """Routing of one normal dispatch, for ``combine`` and ``cached_dispatch``.

    Attributes:
      recv_src_rank: ``int32 [C]``, source rank of each receive row, -1 on
        padding and dropped rows.
      recv_src_token: ``int32 [C]``, token index on that source rank, -1 on
        padding.
      is_token_in_rank: ``bool [T, R]``, which ranks each local token went to.
      extra: backend-specific arrays (empty for ``"xla"``).
      spec: static shape facts and options.
    """

    recv_src_rank: jax.Array
    recv_src_token: jax.Array
    is_token_in_rank: jax.Array
    extra: dict = dataclasses.field(default_factory=dict)
    spec: NormalSpec = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """Routing of one low-latency dispatch, for ``low_latency_combine``.

    Attributes:
      recv_src_rank: ``int32 [E/R, R*M]``, source rank of each packed row, -1
        past the expert's count.
      recv_src_token: ``int32 [E/R, R*M]``, token index on the source rank.
      recv_src_slot: ``int32 [E/R, R*M]``, first top-k slot of that token that
        chose this expert.
      topk_idx: ``int32 [T, K]``, the local routing this rank dispatched with.
      extra: backend-specific arrays (empty for ``"xla"``).
      spec: static shape facts and options.
    """

    recv_src_rank: jax.Array
    recv_src_token: jax.Array
    recv_src_slot: jax.Array
    topk_idx: jax.Array
    extra: dict = dataclasses.field(default_factory=dict)
    spec: LowLatencySpec = dataclasses.field(default=None, metadata=dict(static=True))
