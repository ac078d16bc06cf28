"""A MoE layer written the way a JAX user writes it without jax_ep (MaxText style).

Per rank, inside ``jax.shard_map`` over the EP axis (``R`` ranks, ``E/R``
experts each, rank ``r`` owning experts ``[r*E/R, (r+1)*E/R)``):

1. route each token (the same router as ``jax_ep.moe.route``, so the two
   layers make identical choices and only the exchange differs);
2. flatten the ``T*K`` (token, slot) pairs and ``argsort`` them by expert,
   which also groups them by destination rank;
3. scatter them into a send buffer ``[R, cap, H]`` with a fixed capacity
   ``cap`` per (source, destination) rank pair: pair ``i`` of destination
   ``d`` lands in slot ``i`` if ``i < cap``, else it is dropped;
4. ``jax.lax.all_to_all`` the buffer (and the local expert id of each slot);
5. on the receiving rank, permute the ``R*cap`` rows by local expert
   (``argsort``), run the experts with ``jax.lax.ragged_dot``, un-permute;
6. ``all_to_all`` the outputs back and sum each token's ``K`` results with
   its top-k weights.

Everything is differentiated by JAX's autodiff (the transpose of
``all_to_all`` is an ``all_to_all``). The parameters are those of
``jax_ep.moe`` (``router [H, E]``, ``w_gate``/``w_up [E, H, F]``,
``w_down [E, F, H]``, expert weights sharded on their leading axis), and the
config is a ``jax_ep.moe.MoEConfig`` (its ``mode``/``backend``/``capacity``
fields are jax_ep's and are ignored here).

Costs, compared with jax_ep's normal mode: each rank sends ``R*cap`` rows
whatever the routing (``cap = T*K`` by default, the no-drop worst case, so
``R*T*K`` rows; MaxText shrinks it with a capacity factor and drops), a token
with several experts on one rank is sent once per expert, and the receiver
sorts ``R*cap`` rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.moe import MoEConfig, load_balancing_loss, route


def default_capacity(num_tokens: int, config: MoEConfig) -> int:
    """``T*K`` slots per (source, destination) rank pair: the most pairs one
    rank can send to one rank, so nothing drops."""
    return max(num_tokens * config.topk, 1)


def baseline_experts(x: jax.Array, params: dict, idx: jax.Array, weights: jax.Array, config: MoEConfig,
                     capacity: int | None = None, capacity_factor: float | None = None) -> jax.Array:
    """Sort, all_to_all, ragged_dot, all_to_all back, weighted sum.

    Args:
      x: ``[T, H]``, this rank's tokens.
      params: ``w_* [E/R, ...]`` (this rank's experts).
      idx: ``int32 [T, K]`` global expert ids; weights ``float32 [T, K]``.
      capacity: slots per rank pair (static); ``None`` with no
        ``capacity_factor`` is ``T*K`` (never drops).
      capacity_factor: MaxText's knob, ``cap = ceil(T*K/R * capacity_factor)``.

    Returns:
      ``[T, H]`` in x's dtype; dropped pairs contribute nothing.
    """
    axis = config.axis_name
    r = jax.lax.axis_size(axis)
    e_local = config.num_experts // r
    t, h = x.shape
    k = idx.shape[1]
    if capacity is None:
        capacity = (max(1, -(-int(t * k * capacity_factor) // r)) if capacity_factor is not None
                    else default_capacity(t, config))

    # 2. sort the (token, slot) pairs by expert (hence by destination rank).
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    src_token = order // k
    dest = sorted_e // e_local
    per_dest = jnp.sum(jax.nn.one_hot(dest, r, dtype=jnp.int32), axis=0)
    start = jnp.cumsum(per_dest) - per_dest
    pos = jnp.arange(t * k) - start[dest]
    keep = pos < capacity
    slot = jnp.where(keep, pos, capacity)  # out of bounds: dropped by mode="drop"

    # 3.-4. fixed-capacity send buffer, exchanged with one all_to_all.
    send_x = jnp.zeros((r, capacity, h), x.dtype).at[dest, slot].set(x[src_token], mode="drop")
    send_e = jnp.full((r, capacity), -1, jnp.int32).at[dest, slot].set(sorted_e % e_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(-1)

    # 5. local permute by expert, grouped GEMMs, un-permute.
    perm = jnp.argsort(jnp.where(recv_e >= 0, recv_e, e_local), stable=True)
    rows = recv_x.reshape(-1, h)[perm]
    group_sizes = jnp.sum(jax.nn.one_hot(recv_e, e_local, dtype=jnp.int32), axis=0)  # -1 -> no group
    w = {n: params[n].astype(x.dtype) for n in config.expert_param_names}
    up = jax.lax.ragged_dot(rows, w["w_up"], group_sizes)
    if config.activation == "swiglu":
        act = jax.nn.silu(jax.lax.ragged_dot(rows, w["w_gate"], group_sizes)) * up
    else:
        act = jax.nn.gelu(up)
    out_rows = jax.lax.ragged_dot(act, w["w_down"], group_sizes)
    back = jnp.zeros_like(out_rows).at[perm].set(out_rows).reshape(r, capacity, h)

    # 6. return to the source ranks; weighted sum over each token's slots.
    ret = jax.lax.all_to_all(back, axis, 0, 0)
    got = jnp.where(keep[:, None], ret[dest, jnp.minimum(slot, capacity - 1)], 0).astype(jnp.float32)
    w_sorted = weights.reshape(-1)[order]
    y = jnp.zeros((t, h), jnp.float32).at[src_token].add(w_sorted[:, None] * got)
    return y.astype(x.dtype)


def baseline_moe_layer(params: dict, x: jax.Array, config: MoEConfig, capacity: int | None = None,
                       capacity_factor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The baseline layer on one rank: the counterpart of ``jax_ep.moe.moe_layer``.

    Call inside ``jax.shard_map`` over ``config.axis_name`` with params sharded
    by ``jax_ep.moe.param_specs``.

    Args:
      params: ``{"router": [H, E], "w_*": [E/R, ...]}``.
      x: ``[..., H]``, this rank's tokens.

    Returns:
      ``(y [..., H], aux_loss float32 [])`` (the same global load-balancing loss).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    routing = route(x2, params["router"], config)
    aux = load_balancing_loss(routing.probs, routing.idx, config.num_experts, config.axis_name)
    y = baseline_experts(x2, params, routing.idx, routing.weights, config, capacity, capacity_factor)
    return y.reshape(*lead, -1), aux
