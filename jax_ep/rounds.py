"""Dropless normal dispatch at capacity-factor memory: overflow rounds.

A receive buffer of ``C`` rows sized for the expected load (a capacity factor
times the rows a rank receives under uniform routing) drops the rows that do
not fit. Rounds serve them instead: round 0 dispatches exactly the rows that
fit (those a plain ``dispatch`` at capacity ``C`` keeps), round 1 the rows that
fit among the remaining ones by the same rule, and so on, every round through
the same ``C``-row buffer and the same expert computation; the rounds'
outputs add up to the worst-case-capacity result.

Each rank decides which of its top-k slots travel in which round on its own,
from one small collective: a ``psum`` of every rank's per-unit row counts
(``int32 [R, E]`` in the expert-major layout, ``[R, R]`` in the rank-major
one). The drop rule of ``docs/semantics.md`` is a pure function of those
counts, so every rank simulates every rank's receive buffer, round after
round, and all ranks agree on the number of rounds.

Pieces (call inside ``jax.shard_map`` over the EP axis):

* ``capacity_for_factor``: ``C`` from a capacity factor (static).
* ``plan_rounds``: the round of each top-k slot (``DispatchRounds``).
* ``DispatchRounds.topk_idx_of``/``weights_of``: a round's slots, the others
  masked with ``-1`` / 0, ready for ``jax_ep.dispatch``.
* ``sum_over_rounds``: runs a user's round function over all rounds with
  one round's memory, differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import validation
from jax_ep.options import NormalOptions
from jax_ep.reference import routing

__all__ = ["DispatchRounds", "capacity_for_factor", "plan_rounds", "rounds_to_never_drop", "sum_over_rounds"]


# --- static sizes -----------------------------------------------------------------


def expected_rows(num_tokens: int, num_topk: int, num_experts: int, num_ranks: int, layout: str) -> float:
    """Rows a rank receives on average under uniform routing (distinct ids, no masked slot).

    Expert-major: one row per (token, expert) pair, ``T*K`` per rank.
    Rank-major: one row per (token, rank reached), ``R*T*p`` with
    ``p = 1 - comb(E - E/R, K) / comb(E, K)`` the chance that a token's ``K``
    distinct experts include one of a given rank's ``E/R``.
    """
    if layout == "expert_major":
        return float(num_tokens * num_topk)
    miss = math.comb(num_experts - num_experts // num_ranks, num_topk) / math.comb(num_experts, num_topk)
    return num_ranks * num_tokens * (1.0 - miss)


def _worst_case_rows(num_tokens: int, num_topk: int, num_experts: int, num_ranks: int, layout: str) -> int:
    """Most rows one rank can receive (every rank's every token to it)."""
    if layout == "rank_major":
        return num_ranks * num_tokens
    return num_ranks * num_tokens * min(num_topk, num_experts // num_ranks)


def capacity_for_factor(
    capacity_factor: float, *, num_tokens: int, num_topk: int, num_experts: int, num_ranks: int,
    layout: str = "expert_major", expert_alignment: int = 1,
) -> int:
    """Receive rows ``C`` for a capacity factor (static).

    ``C = ceil(factor * expected_rows)``; in the expert-major layout rounded up
    to a multiple of ``expert_alignment`` plus ``(E/R) * (alignment - 1)``
    rows for the groups' alignment padding. Never above the worst case
    (``NormalOptions.num_max_recv_tokens=None``), never below 1.

    Args:
      capacity_factor: positive float; 1.0 is the expected load of uniform routing.
      num_tokens: ``T`` per rank. num_topk: ``K``. num_experts: ``E``. num_ranks: ``R``.
      layout: ``"expert_major"`` or ``"rank_major"``.
      expert_alignment: the expert-major groups' alignment.
    """
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be a positive number (e.g. 1.25), got {capacity_factor!r}")
    if layout not in ("expert_major", "rank_major"):
        raise ValueError(f"layout must be 'expert_major' or 'rank_major', got {layout!r}")
    local_experts = num_experts // num_ranks
    rows = math.ceil(capacity_factor * expected_rows(num_tokens, num_topk, num_experts, num_ranks, layout))
    worst = _worst_case_rows(num_tokens, num_topk, num_experts, num_ranks, layout)
    if layout == "expert_major":
        a = expert_alignment
        rows = -(-rows // a) * a + local_experts * (a - 1)
        worst += local_experts * (a - 1)
    return max(min(rows, worst), 1)


def rounds_to_never_drop(
    capacity: int, *, num_tokens: int, num_topk: int, num_experts: int, num_ranks: int,
    layout: str = "expert_major", expert_alignment: int = 1,
) -> int:
    """Rounds after which no routing can leave a row unserved (static).

    A round that cannot serve every pending row of a rank still fills its
    buffer up to the alignment padding: at least ``C - (E/R)*(alignment - 1)``
    rows (expert-major; ``C`` rank-major), and at least one row. So
    ``ceil(worst-case rows / that)`` rounds serve any routing.
    """
    worst = _worst_case_rows(num_tokens, num_topk, num_experts, num_ranks, layout)
    per_round = capacity
    if layout == "expert_major":
        per_round -= (num_experts // num_ranks) * (expert_alignment - 1)
    return max(-(-worst // max(per_round, 1)), 1)


# --- the plan ---------------------------------------------------------------------


class DispatchRounds(NamedTuple):
    """Which round serves each top-k slot (the same plan on every rank).

    Attributes:
      slot_round: ``int32 [T, K]``, the round that dispatches the slot's row;
        -1 on masked slots. Slots of one row (a token's slots of one expert in
        the expert-major layout, of one rank in the rank-major layout) share
        it. Rows no round serves are in the last round, whose dispatch drops
        them.
      num_rounds: ``int32 []``, rounds to run, the same on every rank:
        ``min(rounds needed, max_rounds)`` (0 when nothing is routed).
      num_dropped: ``int32 []``, rows this rank would receive that no round
        serves (nonzero only when ``max_rounds`` is reached); the last round's
        ``dispatch`` reports the same number in ``num_dropped``.
    """

    slot_round: jax.Array
    num_rounds: jax.Array
    num_dropped: jax.Array

    def topk_idx_of(self, topk_idx: jax.Array, r) -> jax.Array:
        """``topk_idx`` with every slot not in round ``r`` masked (-1)."""
        return jnp.where(self.slot_round == r, topk_idx, -1).astype(topk_idx.dtype)

    def weights_of(self, topk_weights: jax.Array, r) -> jax.Array:
        """``topk_weights`` with every slot not in round ``r`` set to 0."""
        return jnp.where(self.slot_round == r, topk_weights, jnp.zeros((), topk_weights.dtype))


def _units(topk_idx: jax.Array, num_experts: int, num_ranks: int, layout: str):
    """Each slot's receive row, as (unit, order) with the row counts.

    A unit is a column of the count matrix: the expert (expert-major) or the
    owning rank (rank-major). ``order`` is the row's place among this rank's
    rows of the same unit, in token order: the drop rule orders a unit's rows
    by (source rank, source token).

    Returns:
      unit ``int32 [T, K]`` (-1 on masked slots), order ``int32 [T, K]``,
      counts ``int32 [U]`` (this rank's rows per unit).
    """
    t, k = topk_idx.shape
    valid = routing.valid_slots(topk_idx, num_experts)
    if layout == "rank_major":
        owner = jnp.where(valid, topk_idx // (num_experts // num_ranks), -1)
        reached = jnp.any(owner[:, :, None] == jnp.arange(num_ranks)[None, None, :], axis=1).astype(jnp.int32)
        order_tr = jnp.cumsum(reached, axis=0) - reached  # [T, R]
        order = jnp.take_along_axis(order_tr, jnp.maximum(owner, 0), axis=1)
        return owner.astype(jnp.int32), order.astype(jnp.int32), jnp.sum(reached, axis=0, dtype=jnp.int32)
    # Expert-major: one row per (token, expert), carried by the expert's first slot.
    first = routing.first_slots(topk_idx, valid)
    group = jnp.where(first, topk_idx, num_experts).reshape(-1)  # entries (token, slot): token order
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[group].add(1)
    sorted_at = jnp.argsort(group, stable=True)
    start = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(t * k, dtype=jnp.int32) - start[group[sorted_at]]
    rank = jnp.zeros((t * k,), jnp.int32).at[sorted_at].set(rank_sorted).reshape(t, k)
    order = jnp.take_along_axis(rank, routing.first_slot_index(topk_idx), axis=1)  # duplicates: their first slot's
    unit = jnp.where(valid, topk_idx, -1).astype(jnp.int32)
    return unit, order, counts[:num_experts]


def rows_kept(pending: jax.Array, capacity: int, alignment: int, layout: str) -> jax.Array:
    """The drop rule on counts: rows of each (source rank, unit) block that a
    dispatch of ``pending`` keeps.

    Args:
      pending: ``int32 [R, U]`` rows each source rank sends to each unit
        (``U = E`` expert-major, ``U = R`` rank-major).

    Returns:
      ``int32 [R, U]``: a block keeps its rows whose buffer position is below
      ``capacity``, position = the unit's start (0 rank-major; the expert's
      aligned group start on its rank, expert-major) + the rows of earlier
      source ranks in the unit + the row's order in the block.
    """
    r = pending.shape[0]
    before = jnp.cumsum(pending, axis=0) - pending
    if layout == "rank_major":
        start = jnp.zeros((pending.shape[1],), pending.dtype)
    else:
        per_expert = jnp.sum(pending.reshape(r, r, -1), axis=0)  # [receiving rank, local expert]
        aligned = -(-per_expert // alignment) * alignment
        start = (jnp.cumsum(aligned, axis=1) - aligned).reshape(-1)
    return jnp.clip(capacity - start[None, :] - before, 0, pending)


def _all_counts(local_counts: jax.Array, num_experts: int, num_ranks: int, axis_name, options: NormalOptions):
    """(this rank's index, ``int32 [R, U]`` every rank's row counts, row ``s`` from rank ``s``).

    Over the mesh axis: one ``psum``. With the CUDA backend and no axis (one
    process per rank, no XLA collective between them): a rank-major
    ``dispatch`` of one token that names one expert of every rank, carrying
    the counts as its float32 row (exact below 2**24), gathers them.
    """
    if num_ranks == 1:  # nothing to gather (and no kernel to launch)
        return jnp.int32(0), local_counts[None, :]
    if axis_name is not None:
        me = lax.axis_index(axis_name)
        mine = (jnp.arange(num_ranks) == me)[:, None]
        return me, lax.psum(jnp.where(mine, local_counts[None, :], 0), axis_name)
    from jax_ep import normal, runtime

    me = runtime.lookup(options.buffer_id).rank
    every_rank = (jnp.arange(num_ranks, dtype=jnp.int32) * (num_experts // num_ranks))[None, :]
    opts = dataclasses.replace(options, layout="rank_major", num_max_recv_tokens=num_ranks, checked=False)
    out = normal.dispatch(local_counts[None, :].astype(jnp.float32), every_rank,
                          jnp.zeros(every_rank.shape, jnp.float32), num_experts=num_experts, axis_name=None,
                          options=opts)
    return jnp.int32(me), out.recv_x.astype(jnp.int32)


def plan_rounds(
    topk_idx: jax.Array,
    *,
    num_experts: int,
    axis_name="ep",
    options: NormalOptions = NormalOptions(),
    max_rounds: int | None = None,
) -> DispatchRounds:
    """Assign every top-k slot to the round that dispatches it.

    Call inside ``jax.shard_map`` over ``axis_name``. Round ``r`` dispatches
    ``rounds.topk_idx_of(topk_idx, r)`` with ``options`` (its capacity ``C =
    options.num_max_recv_tokens``): round 0 carries exactly the rows that a
    dispatch of ``topk_idx`` at ``C`` keeps, each later round the rows that
    the same rule keeps among the remaining ones, so no round but the last
    drops anything and every row travels exactly once. One ``psum`` of
    ``int32 [R, U]`` row counts over ``axis_name`` (``U = E`` expert-major,
    ``R`` rank-major; without an axis, a one-token dispatch gathers them);
    the rest is local integer arithmetic, one pass per round.

    Args:
      topk_idx: ``int32 [T, K]`` global expert ids, -1 masks a slot.
      num_experts: ``E`` (static).
      axis_name: the EP mesh axis (static); ``None`` with the CUDA backend
        outside ``shard_map`` (one process per rank).
      options: the ``NormalOptions`` every round dispatches with (layout,
        capacity, alignment). ``num_max_recv_tokens=None`` (worst case) gives
        one round.
      max_rounds: most rounds (static positive int); rows that fit in none
        go in the last round, whose dispatch drops them and counts them.
        ``None``: ``rounds_to_never_drop``, enough for any routing.

    Returns:
      ``DispatchRounds``.
    """
    if not isinstance(options, NormalOptions):
        raise TypeError(f"options must be a jax_ep.NormalOptions, got {type(options).__name__}")
    validation.check_topk_idx(topk_idx)
    if axis_name is None and options.backend != "cuda":
        raise ValueError(
            "plan_rounds needs the EP mesh axis (axis_name) to add up the ranks' row counts: call it inside "
            "jax.shard_map over that axis (axis_name=None is for the CUDA backend's one process per rank)"
        )
    r = validation.num_ranks_for(axis_name, options.backend, options.buffer_id)
    validation.check_num_experts(num_experts, r)
    t, k = topk_idx.shape
    layout, alignment = options.layout, options.expert_alignment
    worst = _worst_case_rows(t, k, num_experts, r, layout) + (
        (num_experts // r) * (alignment - 1) if layout == "expert_major" else 0)
    capacity = options.num_max_recv_tokens or worst
    bound = rounds_to_never_drop(capacity, num_tokens=t, num_topk=k, num_experts=num_experts, num_ranks=r,
                                 layout=layout, expert_alignment=alignment)
    if max_rounds is None:
        max_rounds = bound
    elif isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int or None (as many as needed), got {max_rounds!r}")

    unit, order, local_counts = _units(topk_idx.astype(jnp.int32), num_experts, r, layout)
    me, counts = _all_counts(local_counts, num_experts, r, axis_name, options)
    valid = unit >= 0
    safe_unit = jnp.maximum(unit, 0)

    def pending_anywhere(carry):
        rnd, served, _ = carry
        return (rnd < max_rounds) & jnp.any(served < counts)

    def one_round(carry):
        rnd, served, slot_round = carry
        served = served + rows_kept(counts - served, capacity, alignment, layout)
        still_pending = valid & (order >= jnp.take(served[me], safe_unit))
        return rnd + 1, served, slot_round + still_pending.astype(jnp.int32)

    num_rounds, served, slot_round = lax.while_loop(
        pending_anywhere, one_round, (jnp.int32(0), jnp.zeros_like(counts), jnp.zeros_like(unit)))
    slot_round = jnp.where(valid, jnp.minimum(slot_round, max_rounds - 1), -1)
    left = counts - served
    if layout == "rank_major":
        dropped = jnp.sum(jnp.take(left, me, axis=1))
    else:
        local = num_experts // r
        dropped = jnp.sum(lax.dynamic_slice_in_dim(left, me * local, local, axis=1))
    return DispatchRounds(slot_round.astype(jnp.int32), num_rounds, dropped.astype(jnp.int32))


# --- running the rounds -----------------------------------------------------------


def _round_term(round_fn, params, x, topk_weights, topk_idx, slot_round, r):
    this = slot_round == r
    return round_fn(params, x, jnp.where(this, topk_idx, -1), jnp.where(this, topk_weights, 0.0))


def _accumulator(like, template):
    """float32 zeros of ``template``'s shape, varying like ``like`` (a loop carry)."""
    return lax.full_like(like, 0, jnp.float32, shape=template.shape)


def _later_rounds(round_fn, params, x, topk_weights, topk_idx, slot_round, num_rounds, init):
    """``init`` + the float32 sum of rounds ``1 .. num_rounds-1``, one round at a time."""

    def body(carry):
        r, acc = carry
        y = _round_term(round_fn, params, x, topk_weights, topk_idx, slot_round, r)
        return r + 1, acc + y.astype(jnp.float32)

    return lax.while_loop(lambda c: c[0] < num_rounds, body, (jnp.int32(1), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _all_rounds(round_fn, dtype, grad_dtype, params, x, topk_weights, topk_idx, slot_round, num_rounds):
    y0 = _round_term(round_fn, params, x, topk_weights, topk_idx, slot_round, 0)
    return _later_rounds(round_fn, params, x, topk_weights, topk_idx, slot_round, num_rounds, y0.astype(jnp.float32))


def _all_rounds_fwd(round_fn, dtype, grad_dtype, params, x, topk_weights, topk_idx, slot_round, num_rounds):
    y0, round0_vjp = jax.vjp(
        lambda p, x, w: _round_term(round_fn, p, x, w, topk_idx, slot_round, 0), params, x, topk_weights)
    y = _later_rounds(round_fn, params, x, topk_weights, topk_idx, slot_round, num_rounds, y0.astype(jnp.float32))
    return y, (round0_vjp, params, x, topk_weights, topk_idx, slot_round, num_rounds)


def _all_rounds_bwd(round_fn, dtype, grad_dtype, res, ct):
    round0_vjp, params, x, topk_weights, topk_idx, slot_round, num_rounds = res
    diff = (params, x, topk_weights)
    # Round 0's gradients first: the later rounds' loop starts from them, so
    # round 0's residuals are freed before the loop recomputes a round.
    # Accumulators: x's and the weights' gradients (per token, small) in
    # float32; the parameters' in `grad_dtype`, by default their own gradient
    # dtype, as one dispatch returns them: a float32 copy of bfloat16
    # experts' gradients would hold twice their bytes (10.5 GiB per rank at
    # DeepEP's shape, F = 1024), more than the rounds save in activations
    # where the weights dominate.
    g_params, g_x, g_w = round0_vjp(ct.astype(dtype))
    if grad_dtype is not None:
        g_params = jax.tree.map(lambda g: g.astype(grad_dtype), g_params)
    grads = (g_params, g_x.astype(jnp.float32), g_w.astype(jnp.float32))

    def body(carry):
        r, acc = carry
        _, vjp = jax.vjp(lambda p, x, w: _round_term(round_fn, p, x, w, topk_idx, slot_round, r).astype(jnp.float32),
                         *diff)
        return r + 1, jax.tree.map(lambda g, d: g + d.astype(g.dtype), acc, vjp(ct))

    _, grads = lax.while_loop(lambda c: c[0] < num_rounds, body, (jnp.int32(1), grads))
    grads = jax.tree.map(lambda g, a: g.astype(a.dtype), grads, diff)
    return (*grads, None, None, None)


_all_rounds.defvjp(_all_rounds_fwd, _all_rounds_bwd)


def sum_over_rounds(
    round_fn: Callable, params, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
    rounds: DispatchRounds, *, param_grad_dtype=None,
) -> jax.Array:
    """``sum_r round_fn(params, x, rounds.topk_idx_of(topk_idx, r), rounds.weights_of(topk_weights, r))``
    over the rounds ``r < rounds.num_rounds``.

    ``round_fn(params, x, topk_idx_r, topk_weights_r) -> [T, ...]`` is one
    round of a layer: dispatch of the round's slots, experts, combine (a
    round with no slot must give zeros). Round 0 runs and keeps its residuals
    for the backward pass, as a single dispatch would; later rounds run in a
    ``lax.while_loop`` and keep none: the backward pass takes round 0's VJP
    first (freeing its residuals), then runs each later round again for its
    VJP. So a second round costs a second forward in the backward pass, and
    memory holds one round at a time however many rounds run. Gradients flow
    to ``params`` (any pytree of float arrays; ``None`` for none), ``x`` and
    ``topk_weights``, in reverse mode (no ``jax.jvp`` through the rounds).

    Rounds add up in float32 and round once to ``round_fn``'s output dtype;
    so do the gradients of ``x`` and ``topk_weights``. The gradients of
    ``params`` add up in ``param_grad_dtype``: by default (``None``) their
    own dtype (that of one round's gradient), so that the rounds hold no
    float32 copy of the experts' gradients; ``jnp.float32`` adds bfloat16
    parameters' gradients in float32 (one rounding instead of one per round)
    at the cost of that copy, twice the parameters' bytes.

    Returns:
      ``[T, ...]`` in ``round_fn``'s output dtype.
    """
    if param_grad_dtype is not None:
        param_grad_dtype = jnp.dtype(param_grad_dtype)
        if not jnp.issubdtype(param_grad_dtype, jnp.floating):
            raise ValueError(f"param_grad_dtype must be a float dtype or None, got {param_grad_dtype}")
    dtype = jax.eval_shape(lambda: _round_term(round_fn, params, x, topk_weights, topk_idx, rounds.slot_round, 0)).dtype
    y = _all_rounds(round_fn, jnp.dtype(dtype), param_grad_dtype, params, x, topk_weights, topk_idx,
                    rounds.slot_round, rounds.num_rounds)
    return y.astype(dtype)
