"""Hierarchical routing for internode normal mode: which tokens cross which
rail, what each node's forwarder holds, and where the forwarder puts each
token so that the result equals the flat (intranode) dispatch.

Ranks are ``R = N * L``: ``N`` nodes of ``L`` ranks, rank ``r = n * L + l``
(``jax_ep.topology``: node = DeepEP's RDMA rank, local index = NVL rank).
A token of source rank ``s = (n_s, l_s)`` travels

1. **RDMA leg**: once to each destination node ``m`` that owns one of its
   experts, always to the rank ``(m, l_s)`` of its own rail, the node's
   *forwarder* for that rail (``m == n_s`` included: the forwarder is then the
   source itself). It carries its *source meta*: the source node and a bitmask
   of the ranks of node ``m`` that need it.
2. **NVLink leg**: the forwarder copies it to each rank of its node named in
   the bitmask, into that rank's output row.

Each forwarder keeps a *table* of the tokens it received, ordered by (source
node, source token), of static size ``node_capacity`` (the per-node receive
capacity): row ``i`` of that order lands in table row ``i`` if
``i < node_capacity`` and is dropped otherwise, so it reaches no rank of that
node. Each destination rank then places the tokens it received by the
documented rule of flat dispatch (docs/semantics.md) applied to the tokens
that reached it: with the default ``node_capacity = N * T`` nothing is dropped
on the RDMA leg and every output and handle is the flat dispatch's, bit for
bit. Combine runs backwards: each forwarder sums its node's rows of a table
token into one partial sum, and the source sums one partial per node.

Everything here is pure ``jax.numpy`` on the *global* view (every rank's
routing stacked on a leading rank axis), without communication: the routing
plan a kernel launcher sizes its buffers from, and the definition tests hold
the kernels to. ``dispatch_two_legs`` and ``combine_two_legs`` move rows
along the plan leg by leg.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep.options import LAYOUTS
from jax_ep.reference import routing

__all__ = [
    "NodeRouting", "InternodePlan", "node_routing", "plan_dispatch", "dispatch_two_legs", "combine_two_legs",
    "default_node_capacity", "default_output_capacity", "capacity_hint", "forwarder_counts", "forwarder_rows",
]


class NodeRouting(NamedTuple):
    """One source rank's routing by node (``T`` tokens, ``N`` nodes, ``L`` ranks per node).

    Attributes:
      is_token_in_rank: ``bool [T, R]``, a valid slot of the token names an
        expert of rank ``r`` (as ``get_dispatch_layout``).
      is_token_in_node: ``bool [T, N]``, the token crosses to node ``m`` (its
        rail's forwarder there receives it once).
      nvl_mask: ``int32 [T, N]``, bit ``j`` set when rank ``(m, j)`` needs the
        token (DeepEP's source meta); 0 where the token does not go to ``m``.
      send_pos: ``int32 [T, N]``, the token's index among this rank's tokens
        going to node ``m`` (its order in the stream to that forwarder), -1
        where it does not go.
      num_tokens_per_node: ``int32 [N]``, tokens going to each node.
    """

    is_token_in_rank: jax.Array
    is_token_in_node: jax.Array
    nvl_mask: jax.Array
    send_pos: jax.Array
    num_tokens_per_node: jax.Array


def node_routing(topk_idx: jax.Array, num_experts: int, num_nodes: int, ranks_per_node: int) -> NodeRouting:
    """Route one rank's tokens by node.

    Args:
      topk_idx: ``int32 [T, K]`` global expert ids; -1 (and ids outside
        ``[0, E)``) mask a slot.
      num_experts: ``E``, divisible by ``R = num_nodes * ranks_per_node``.
      num_nodes: ``N``.
      ranks_per_node: ``L`` (at most 31: the bitmask is an int32).
    """
    r = num_nodes * ranks_per_node
    in_rank = jnp.any(routing.local_ids_per_rank(topk_idx, num_experts, r) >= 0, axis=-1).T  # [T, R]
    by_node = in_rank.reshape(in_rank.shape[0], num_nodes, ranks_per_node)
    bits = jnp.left_shift(jnp.int32(1), jnp.arange(ranks_per_node, dtype=jnp.int32))
    nvl_mask = jnp.sum(jnp.where(by_node, bits, 0), axis=-1, dtype=jnp.int32)
    in_node = nvl_mask != 0
    send_pos = jnp.where(in_node, jnp.cumsum(in_node, axis=0, dtype=jnp.int32) - 1, -1)
    return NodeRouting(in_rank, in_node, nvl_mask, send_pos, jnp.sum(in_node, axis=0, dtype=jnp.int32))


class InternodePlan(NamedTuple):
    """The whole hierarchical dispatch of one call, every rank at once.

    ``R`` ranks of ``T`` tokens, ``N`` nodes of ``L`` ranks, ``Cn`` rows of
    each forwarder's table (``node_capacity``), ``C`` output rows per rank,
    ``S`` = 1 (rank-major) or ``K`` (expert-major: one output row per
    (token, local expert), named by the first top-k slot holding that expert).

    Attributes:
      routing: ``NodeRouting`` of every source rank (leading axis ``R``).
      rdma_slot: ``int32 [R, T, N]``, row of source token ``t`` in the table
        of its forwarder on node ``m`` (rank ``m * L + l_s``); -1 where the
        token does not go to ``m`` or was dropped there.
      num_rdma_needed: ``int32 [R]``, tokens arriving at each forwarder
        (kept or not).
      fwd_src_node, fwd_src_token: ``int32 [R, Cn]``, each table row's source
        node and token (its source rank is ``src_node * L + l_f``); -1 on
        empty rows.
      fwd_nvl_mask: ``int32 [R, Cn]``, the row's source meta bitmask.
      fwd_dst_row: ``int32 [R, Cn, L, S]``, the output row on rank
        ``(n_f, j)`` that the table row fills (for slot ``k`` in the
        expert-major layout); -1 where none (not needed, or past ``C``).
      recv_src_rank, recv_src_token: ``int32 [R, C]``, each output row's
        source (the handle's arrays), -1 on padding.
      num_recv_rows: ``int32 [R]``, output rows holding a token.
      num_dropped: ``int32 [R]``, rows a rank needed and did not get (past
        ``Cn`` at a forwarder, or past ``C``).
      expert_group_sizes: ``int32 [R, E/R]`` (expert-major) or ``None``.
    """

    routing: NodeRouting
    rdma_slot: jax.Array
    num_rdma_needed: jax.Array
    fwd_src_node: jax.Array
    fwd_src_token: jax.Array
    fwd_nvl_mask: jax.Array
    fwd_dst_row: jax.Array
    recv_src_rank: jax.Array
    recv_src_token: jax.Array
    num_recv_rows: jax.Array
    num_dropped: jax.Array
    expert_group_sizes: jax.Array | None


def default_node_capacity(num_tokens: int, num_nodes: int) -> int:
    """Rows of a forwarder's table that never drop: ``N * T`` (each of the
    ``N`` source ranks of its rail sends each token at most once)."""
    return max(num_nodes * num_tokens, 1)


def default_output_capacity(layout: str, num_ranks: int, num_tokens: int, num_topk: int, num_local_experts: int,
                            expert_alignment: int = 1) -> int:
    """Output rows per rank that never drop: the flat dispatch's default."""
    if layout == "rank_major":
        return max(num_ranks * num_tokens, 1)
    return max(num_ranks * num_tokens * min(num_topk, num_local_experts)
               + num_local_experts * (expert_alignment - 1), 1)


def capacity_hint(topk_idx, *, num_experts: int, ranks_per_node: int, layout: str = "rank_major",
                  expert_alignment: int = 1, slack: float = 1.0) -> tuple[int, int]:
    """Capacities that drop nothing for a sample routing, for sizing buffers
    below the worst case.

    Args:
      topk_idx: concrete ``int32 [R, T, K]``, every rank's top-k ids of a
        representative call.
      num_experts, ranks_per_node, layout, expert_alignment: as ``plan_dispatch``.
      slack: factor (>= 1) for routings busier than the sample.

    Returns:
      ``(node_capacity, capacity)``: the largest forwarder table and output
      any rank needs, times ``slack``, rounded up (each at least 1); pass them
      as ``InternodeOptions.num_max_rdma_recv_tokens`` and
      ``NormalOptions.num_max_recv_tokens``. Later calls whose routing needs
      more drop rows by the documented rule.
    """
    if not slack >= 1.0:
        raise ValueError(f"slack must be a number >= 1, got {slack!r}")
    plan = _plan_jit(jnp.asarray(topk_idx, jnp.int32), num_experts=num_experts, ranks_per_node=ranks_per_node,
                     layout=layout, expert_alignment=expert_alignment)
    node = int(jnp.max(plan.num_rdma_needed))
    if layout == "rank_major":
        rows = int(jnp.max(plan.num_recv_rows))
    else:  # every group rounded up to the alignment
        rows = int(jnp.max(jnp.sum(plan.expert_group_sizes, axis=-1)))
    return max(math.ceil(node * slack), 1), max(math.ceil(rows * slack), 1)


def plan_dispatch(topk_idx: jax.Array, *, num_experts: int, ranks_per_node: int, layout: str = "rank_major",
                  capacity: int | None = None, node_capacity: int | None = None,
                  expert_alignment: int = 1) -> InternodePlan:
    """Plan the hierarchical dispatch of every rank's tokens.

    Args:
      topk_idx: ``int32 [R, T, K]``, every rank's top-k ids (rank-major stack).
      num_experts: ``E``, divisible by ``R``.
      ranks_per_node: ``L``, dividing ``R``.
      layout: ``"rank_major"`` or ``"expert_major"`` (as ``NormalOptions``).
      capacity: ``C``, output rows per rank (``None``: the flat default).
      node_capacity: ``Cn``, rows of each forwarder's table (``None``: ``N * T``).
      expert_alignment: expert-major group alignment.
    """
    _check_plan_args(topk_idx, num_experts, ranks_per_node, layout)
    r, t, k = topk_idx.shape
    el, nn = ranks_per_node, r // ranks_per_node
    le = num_experts // r
    c = capacity or default_output_capacity(layout, r, t, k, le, expert_alignment)
    cn = node_capacity or default_node_capacity(t, nn)
    rt = jax.vmap(lambda i: node_routing(i, num_experts, nn, el))(topk_idx)

    # RDMA leg: forwarder (m, l) stacks the streams of sources (0, l) .. (N-1, l).
    src_node = jnp.arange(r) // el
    src_local = jnp.arange(r) % el
    counts = rt.num_tokens_per_node.reshape(nn, el, nn)  # [source node, rail, destination node]
    start = jnp.cumsum(counts, axis=0) - counts  # exclusive prefix over source nodes
    start = start.reshape(r, nn)  # [source rank, destination node]
    pos = start[:, None, :] + rt.send_pos  # [R, T, N]
    kept = rt.is_token_in_node & (pos < cn)
    rdma_slot = jnp.where(kept, pos, -1).astype(jnp.int32)
    num_rdma_needed = jnp.sum(counts, axis=0).T.reshape(r)  # forwarder rank m * L + l
    fwd = jnp.arange(nn)[None, None, :] * el + src_local[:, None, None]  # [R, T, N] forwarder rank
    row = jnp.where(kept, rdma_slot, cn)

    def table(values):
        out = jnp.full((r, cn), -1, jnp.int32)
        return out.at[fwd, row].set(jnp.broadcast_to(values, row.shape).astype(jnp.int32), mode="drop")

    fwd_src_node = table(src_node[:, None, None])
    fwd_src_token = table(jnp.arange(t)[None, :, None])
    fwd_nvl_mask = table(rt.nvl_mask)

    # Which (source rank, token) reached each destination rank.
    reached = jnp.repeat(kept, el, axis=2)  # [R(src), T, R(dst)]
    delivered = rt.is_token_in_rank & reached

    if layout == "rank_major":
        def place(d):
            src, kept_rows, _ = routing.pack_ranked(delivered[:, :, d].reshape(-1), c)
            return src, jnp.where(src >= 0, 0, -1), kept_rows

        src, slot, kept_rows = jax.vmap(place)(jnp.arange(r))
        group_sizes = None
        s_dim = 1
    else:
        local = routing.local_ids_per_rank(topk_idx.reshape(r * t, k), num_experts, r)  # [R(dst), R*T, K]
        first = routing.first_slots(local, local >= 0)

        def place(d):
            ok = first[d] & delivered[:, :, d].reshape(-1)[:, None]
            group = jnp.where(ok, local[d], le).reshape(-1)
            entry, _, sizes, kept_rows, _ = routing.pack_grouped(group, le, expert_alignment, c)
            return jnp.where(entry >= 0, entry // k, -1), jnp.where(entry >= 0, entry % k, -1), kept_rows, sizes

        src, slot, kept_rows, group_sizes = jax.vmap(place)(jnp.arange(r))
        s_dim = k

    needed_rows = _needed_rows(topk_idx, num_experts, layout)
    recv_src_rank = jnp.where(src >= 0, src // t, -1).astype(jnp.int32)
    recv_src_token = jnp.where(src >= 0, src % t, -1).astype(jnp.int32)

    # NVLink leg: output row o of rank d = (m, j) comes from table row
    # rdma_slot[s, t, m] of forwarder (m, l_s).
    d = jnp.broadcast_to(jnp.arange(r)[:, None], src.shape)
    m, j = d // el, d % el
    s_safe, t_safe = jnp.maximum(recv_src_rank, 0), jnp.maximum(recv_src_token, 0)
    f = m * el + src_local[s_safe]
    i = jnp.where(src >= 0, rdma_slot[s_safe, t_safe, m], cn)
    o = jnp.broadcast_to(jnp.arange(c)[None, :], src.shape)
    fwd_dst_row = jnp.full((r, cn, el, s_dim), -1, jnp.int32).at[f, i, j, jnp.maximum(slot, 0)].set(o, mode="drop")

    return InternodePlan(
        routing=rt, rdma_slot=rdma_slot, num_rdma_needed=num_rdma_needed.astype(jnp.int32),
        fwd_src_node=fwd_src_node, fwd_src_token=fwd_src_token, fwd_nvl_mask=fwd_nvl_mask, fwd_dst_row=fwd_dst_row,
        recv_src_rank=recv_src_rank, recv_src_token=recv_src_token, num_recv_rows=kept_rows.astype(jnp.int32),
        num_dropped=(needed_rows - kept_rows).astype(jnp.int32), expert_group_sizes=group_sizes,
    )


def _check_plan_args(topk_idx, num_experts, ranks_per_node, layout) -> None:
    if getattr(topk_idx, "ndim", None) != 3 or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise ValueError(f"topk_idx must be an integer [R, T, K] array (every rank's top-k ids stacked), got "
                         f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {getattr(topk_idx, 'shape', '')}")
    r = topk_idx.shape[0]
    if not isinstance(ranks_per_node, int) or not 1 <= ranks_per_node <= 31 or r % ranks_per_node:
        raise ValueError(f"ranks_per_node must be an int in [1, 31] dividing R = {r}, got {ranks_per_node!r}")
    if not isinstance(num_experts, int) or num_experts < r or num_experts % r:
        raise ValueError(f"num_experts must be a multiple of R = {r}, got {num_experts!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


_plan_jit = jax.jit(plan_dispatch, static_argnames=("num_experts", "ranks_per_node", "layout", "capacity",
                                                  "node_capacity", "expert_alignment"))


def _needed_rows(topk_idx: jax.Array, num_experts: int, layout: str) -> jax.Array:
    """int32 [R]: rows each destination needs (tokens, or (token, local expert) pairs)."""
    r, t, k = topk_idx.shape
    local = routing.local_ids_per_rank(topk_idx.reshape(r * t, k), num_experts, r)  # [R(dst), R*T, K]
    if layout == "rank_major":
        return jnp.sum(jnp.any(local >= 0, axis=-1), axis=-1, dtype=jnp.int32)
    return jnp.sum(routing.first_slots(local, local >= 0), axis=(1, 2), dtype=jnp.int32)


def dispatch_two_legs(x: jax.Array, plan: InternodePlan) -> jax.Array:
    """Move rows along the plan: RDMA leg into the forwarders' tables, then the
    NVLink leg into every rank's output.

    Args:
      x: ``[R, T, ...]``, every rank's tokens.
      plan: from ``plan_dispatch``.

    Returns:
      ``[R, C, ...]`` in x's dtype: every rank's output rows (padding zero).
    """
    r, t = x.shape[:2]
    nn = plan.rdma_slot.shape[2]
    el = r // nn
    cn = plan.fwd_src_node.shape[1]
    c = plan.recv_src_rank.shape[1]
    trail = x.shape[2:]
    # RDMA leg: source s puts token t into table row rdma_slot[s, t, m] of forwarder (m, l_s).
    fwd = jnp.arange(nn)[None, None, :] * el + (jnp.arange(r) % el)[:, None, None]
    row = jnp.where(plan.rdma_slot >= 0, plan.rdma_slot, cn)
    rows = jnp.broadcast_to(x[:, :, None], (r, t, nn) + trail)
    tables = jnp.zeros((r, cn) + trail, x.dtype).at[fwd, row].set(rows, mode="drop")
    # NVLink leg: forwarder f = (m, l) copies table row i to output row fwd_dst_row[f, i, j, k] of rank (m, j).
    dst_rank = (jnp.arange(r) // el)[:, None, None, None] * el + jnp.arange(el)[None, None, :, None]
    dst_rank = jnp.broadcast_to(dst_rank, plan.fwd_dst_row.shape)
    dst_row = jnp.where(plan.fwd_dst_row >= 0, plan.fwd_dst_row, c)
    copies = jnp.broadcast_to(tables[:, :, None, None], plan.fwd_dst_row.shape + trail)
    return jnp.zeros((r, c) + trail, x.dtype).at[dst_rank, dst_row].set(copies, mode="drop")


def combine_two_legs(y: jax.Array, plan: InternodePlan) -> jax.Array:
    """Sum rows back along the plan: each forwarder sums its node's rows of a
    table token (NVLink leg), then each source sums one partial per node (RDMA
    leg). Both sums in float32, rounded once to ``y.dtype``.

    Args:
      y: ``[R, C, ...]``, every rank's rows as dispatch placed them.
      plan: from ``plan_dispatch``.

    Returns:
      ``[R, T, ...]`` in y's dtype.
    """
    r = y.shape[0]
    nn = plan.rdma_slot.shape[2]
    el = r // nn
    trail = y.shape[2:]
    # NVLink leg: partial[f, i] = sum over local ranks j (and slots) of rank (n_f, j)'s row.
    src_rank = (jnp.arange(r) // el)[:, None, None, None] * el + jnp.arange(el)[None, None, :, None]
    src_rank = jnp.broadcast_to(src_rank, plan.fwd_dst_row.shape)
    rows = y[src_rank, jnp.maximum(plan.fwd_dst_row, 0)].astype(jnp.float32)
    mask = (plan.fwd_dst_row >= 0).reshape(plan.fwd_dst_row.shape + (1,) * len(trail))
    partial = jnp.sum(jnp.where(mask, rows, 0.0), axis=(2, 3))  # [R, Cn, ...]
    # RDMA leg: source (n, l) reads one partial per node m from forwarder (m, l).
    fwd = jnp.arange(nn)[None, None, :] * el + (jnp.arange(r) % el)[:, None, None]
    got = partial[fwd, jnp.maximum(plan.rdma_slot, 0)]  # [R, T, N, ...]
    mask = (plan.rdma_slot >= 0).reshape(plan.rdma_slot.shape + (1,) * len(trail))
    return jnp.sum(jnp.where(mask, got, 0.0), axis=2).astype(y.dtype)



# --- what one forwarder computes from its own table ------------------------------


def _table_hits(table_src_node, table_topk, num_nodes, ranks_per_node, node, num_experts):
    """bool [L, Cn, K] first slots of the table tokens' experts on each rank of
    ``node``, and bool [L, Cn, E/R] the local experts each token names there."""
    el = ranks_per_node
    r = num_nodes * el
    local = routing.local_ids_per_rank(table_topk, num_experts, r)
    local = jax.lax.dynamic_slice_in_dim(local, node * el, el, axis=0)  # [L, Cn, K]; node may be traced
    first = routing.first_slots(local, local >= 0) & (table_src_node >= 0)[None, :, None]
    experts = jnp.arange(num_experts // r)
    per_expert = jnp.any(first[..., None] & (local[..., None] == experts), axis=2)
    return local, first, per_expert


def forwarder_counts(table_src_node: jax.Array, table_topk: jax.Array, *, num_nodes: int, ranks_per_node: int,
                     node: int, num_experts: int):
    """What forwarder ``(node, l)`` tells the other ranks of its node in the
    notify step, counted from its own table.

    Args:
      table_src_node: ``int32 [Cn]``, each table row's source node, -1 on empty rows.
      table_topk: ``int32 [Cn, K]``, the global top-k ids each token carries.

    Returns:
      ``(rank_counts int32 [N, L], expert_counts int32 [N, L, E/R])``: the
      table's tokens from source node ``n`` that go to rank ``(node, j)``, and
      to its local expert ``e``.
    """
    _, first, per_expert = _table_hits(table_src_node, table_topk, num_nodes, ranks_per_node, node, num_experts)
    src = jax.nn.one_hot(table_src_node, num_nodes, dtype=jnp.int32)  # [Cn, N]; -1 rows are all zero
    ranks = jnp.einsum("cn,jc->nj", src, jnp.any(first, axis=-1).astype(jnp.int32))
    return ranks, jnp.einsum("cn,jce->nje", src, per_expert.astype(jnp.int32))


def forwarder_rows(table_src_node: jax.Array, table_topk: jax.Array, rank_counts: jax.Array,
                   expert_counts: jax.Array, *, num_nodes: int, ranks_per_node: int, node: int, rail: int,
                   num_experts: int, layout: str, capacity: int, expert_alignment: int = 1) -> jax.Array:
    """The output rows forwarder ``(node, rail)`` writes, from its own table
    and its node's notify counts alone (no message per token): its slice of
    ``InternodePlan.fwd_dst_row``.

    Args:
      table_src_node, table_topk: this forwarder's table (see ``forwarder_counts``).
      rank_counts, expert_counts: ``int32 [L, N, L]`` and ``[L, N, L, E/R]``,
        ``forwarder_counts`` of every forwarder ``(node, l')`` of the node
        (``l'`` first).
      capacity: ``C``, output rows per rank.

    Returns:
      ``int32 [Cn, L, S]`` (``S`` = 1 rank-major, ``K`` expert-major): the row
      on rank ``(node, j)``, -1 where none.
    """
    el, nn = ranks_per_node, num_nodes
    r = nn * el
    local, first, per_expert = _table_hits(table_src_node, table_topk, nn, el, node, num_experts)
    seg = table_src_node[:, None] == jnp.arange(nn)[None, :]  # [Cn, N]
    src = jnp.maximum(table_src_node, 0) * el + rail  # each row's source rank

    def index_in_source(hits):  # [L, Cn, ...] -> the row's index among its source's hits, in table order
        mask = seg.reshape((1,) + seg.shape + (1,) * (hits.ndim - 2))
        run = jnp.cumsum(hits[:, :, None] & mask, axis=1) - 1
        return jnp.sum(jnp.where(mask, run, 0), axis=2)

    # Source rank s = n * L + l' is counted by forwarder (node, l').
    if layout == "rank_major":
        counts = jnp.transpose(rank_counts, (1, 0, 2)).reshape(r, el)  # [R(src), L]
        before = jnp.cumsum(counts, axis=0) - counts
        wants = jnp.any(first, axis=-1)  # [L, Cn]
        row = before[src].T + index_in_source(wants)
        row = jnp.where(wants & (row < capacity), row, -1)
        return row.T[:, :, None].astype(jnp.int32)
    counts = jnp.transpose(expert_counts, (1, 0, 2, 3)).reshape(r, el, -1)  # [R(src), L, E/R]
    totals = jnp.sum(counts, axis=0)
    aligned = (totals + expert_alignment - 1) // expert_alignment * expert_alignment
    start = jnp.cumsum(aligned, axis=-1) - aligned  # [L, E/R]: each group's first row on rank j
    before = jnp.cumsum(counts, axis=0) - counts  # [R(src), L, E/R]
    pos = start[:, None, :] + jnp.transpose(before[src], (1, 0, 2)) + index_in_source(per_expert)  # [L, Cn, E/R]
    row = jnp.take_along_axis(pos, jnp.maximum(local, 0), axis=2)  # [L, Cn, K]
    row = jnp.where(first & (row < capacity), row, -1)
    return jnp.transpose(row, (1, 0, 2)).astype(jnp.int32)
