"""Internode routing plan (jax_ep.internode_plan) against the numpy model, and
its two legs against the flat dispatch and combine of the reference backend."""

import functools

import jax
import numpy as np
import pytest

import jax_ep
import np_internode as npi
import np_reference as npr
from conftest import ROUTING_FAMILIES, random_routing, run_ranks
from jax_ep import internode_plan as ip

H = 8


_plan = ip._plan_jit  # one compiled plan per shape, shared with capacity_hint


@functools.partial(jax.jit, static_argnames=("num_experts", "num_nodes", "ranks_per_node"))
def _node_routing(idx, **kw):
    return jax.vmap(lambda i: ip.node_routing(i, **kw))(idx)


_forwarder_counts = jax.jit(ip.forwarder_counts, static_argnames=("num_nodes", "ranks_per_node", "num_experts"))
_forwarder_rows = jax.jit(ip.forwarder_rows, static_argnames=(
    "num_nodes", "ranks_per_node", "num_experts", "layout", "capacity", "expert_alignment"))
_dispatch_two_legs = jax.jit(ip.dispatch_two_legs)
_combine_two_legs = jax.jit(ip.combine_two_legs)


def _routing(rng, kind, r, t, k, e):
    """Per-rank top-k ids of one routing family."""
    if kind in ROUTING_FAMILIES:
        return random_routing(rng, r, t, k, e, **ROUTING_FAMILIES[kind])
    if kind == "skewed":  # most slots on the first ranks' experts
        p = np.exp(-np.arange(e) / max(e / 6, 1))
        p /= p.sum()
        return [np.where(rng.random((t, k)) < 0.1, -1, rng.choice(e, (t, k), p=p)).astype(np.int32)
                for _ in range(r)]
    if kind == "one_node":  # every token to node 0's experts only (nodes of r // 2 ranks or fewer)
        return [rng.integers(0, e // 2, (t, k)).astype(np.int32) for _ in range(r)]
    if kind == "none":
        return [np.full((t, k), -1, np.int32) for _ in range(r)]
    raise ValueError(kind)


KINDS = ["uniform", "masked", "duplicates", "skewed", "one_node", "none"]
SHAPES = [(2, 4), (4, 2), (8, 1), (1, 8), (2, 2), (3, 2)]  # (N nodes, L ranks per node)


@pytest.mark.parametrize("kind", KINDS)
def test_node_routing_matches_numpy(rng, kind):
    for nn, el in SHAPES:
        r = nn * el
        t, k, e = 13, 4, 2 * r
        idxs = _routing(rng, kind, r, t, k, e)
        got = _node_routing(np.stack(idxs), num_experts=e, num_nodes=nn, ranks_per_node=el)
        for s in range(r):
            want = npi.node_routing(idxs[s], e, nn, el)
            np.testing.assert_array_equal(got.is_token_in_node[s], want["in_node"])
            np.testing.assert_array_equal(got.nvl_mask[s], want["nvl_mask"])
            np.testing.assert_array_equal(got.send_pos[s], want["send_pos"])
            np.testing.assert_array_equal(got.num_tokens_per_node[s], want["per_node"])
            np.testing.assert_array_equal(got.is_token_in_rank[s], npr.layout(idxs[s], e, r)[2])


@pytest.mark.parametrize("kind", ["uniform", "skewed", "duplicates"])
@pytest.mark.parametrize("node_capacity", [None, 5])
def test_forwarder_tables_match_numpy(rng, kind, node_capacity):
    nn, el = 2, 4
    r, t, k, e = nn * el, 9, 3, 16
    idxs = _routing(rng, kind, r, t, k, e)
    plan = _plan(np.stack(idxs), num_experts=e, ranks_per_node=el, node_capacity=node_capacity)
    tables, arrived, _ = npi.forwarder_tables(idxs, e, el, node_capacity or nn * t)
    for f in range(r):
        got = [(int(n), int(i), int(mk)) for n, i, mk in
               zip(plan.fwd_src_node[f], plan.fwd_src_token[f], plan.fwd_nvl_mask[f]) if n >= 0]
        assert got == tables[f]
        assert plan.num_rdma_needed[f] == arrived[f]
    # Each kept (source, token, node) names its table row.
    for s in range(r):
        for i in range(t):
            for m in range(nn):
                slot = int(plan.rdma_slot[s, i, m])
                if slot >= 0:
                    f = m * el + s % el
                    assert (plan.fwd_src_node[f, slot], plan.fwd_src_token[f, slot]) == (s // el, i)


def _check_outputs(plan, recv_x, want, expert_major):
    for d, w in enumerate(want):
        np.testing.assert_array_equal(recv_x[d], w["x"])
        got = [(int(a), int(b)) for a, b in zip(plan.recv_src_rank[d], plan.recv_src_token[d]) if a >= 0]
        assert got == w["src"]
        assert int(plan.num_dropped[d]) == w["dropped"]
        assert int(plan.num_recv_rows[d]) == len(w["src"])
        if expert_major:
            np.testing.assert_array_equal(plan.expert_group_sizes[d], w["group_sizes"])


@pytest.mark.parametrize("layout,alignment", [("rank_major", 1), ("expert_major", 4)])
def test_two_legs_match_numpy_with_drops(rng, layout, alignment):
    """Small per-node and output capacities: rows lost at a forwarder and past C."""
    for nn, el in [(2, 4), (3, 2)]:
        r, t, k, e = nn * el, 10, 3, 4 * nn * el
        for cap, ncap in [(None, None), (11, 6)]:
            for kind in ["skewed", "duplicates", "one_node"]:
                idxs = _routing(rng, kind, r, t, k, e)
                xs = [rng.standard_normal((t, H)).astype(np.float32) for _ in range(r)]
                ws = [np.ones((t, k), np.float32) for _ in range(r)]
                plan = _plan(np.stack(idxs), num_experts=e, ranks_per_node=el, layout=layout, capacity=cap,
                             node_capacity=ncap, expert_alignment=alignment)
                c = plan.recv_src_rank.shape[1]
                want = npi.dispatch(xs, idxs, ws, e, el, c, ncap or nn * t, layout, alignment)
                if ncap:
                    assert any(w["dropped"] for w in want)
                _check_outputs(plan, np.asarray(_dispatch_two_legs(np.stack(xs), plan)), want,
                               layout == "expert_major")


def _flat(num_experts, options):
    def f(x, i, w, y):
        o = jax_ep.dispatch(x, i, w, num_experts=num_experts, options=options)
        sizes = o.expert_group_sizes if o.expert_group_sizes is not None else o.num_dropped
        return (o.recv_x, o.handle.recv_src_rank, o.handle.recv_src_token, o.num_recv_rows, o.num_dropped, sizes,
                jax_ep.combine(y, o.handle))
    return f


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_two_legs_equal_flat_dispatch_and_combine(rng, layout):
    """RDMA leg then NVLink leg = the flat dispatch on 8 CPU devices, rows and
    order; node partial sums then the sum over nodes = the flat combine."""
    r, t, k, e = 8, 12, 4, 32
    alignment = 4 if layout == "expert_major" else 1
    any_single = False
    for kind, cap in [("masked", None), ("skewed", 30)]:
        idxs = _routing(rng, kind, r, t, k, e)
        xs = [rng.standard_normal((t, H)).astype(np.float32) for _ in range(r)]
        ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
        opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=cap, expert_alignment=alignment)
        c = cap or ip.default_output_capacity(layout, r, t, k, e // r, alignment)
        ys = [rng.standard_normal((c, H)).astype(np.float32) for _ in range(r)]
        rx, src_rank, src_token, rows, dropped, sizes, flat_combined = run_ranks(_flat(e, opts), r, xs, idxs, ws, ys)
        for el in (4, 2):
            plan = _plan(np.stack(idxs), num_experts=e, ranks_per_node=el, layout=layout, capacity=cap,
                         expert_alignment=alignment)
            np.testing.assert_array_equal(_dispatch_two_legs(np.stack(xs), plan), rx)
            np.testing.assert_array_equal(plan.recv_src_rank, src_rank)
            np.testing.assert_array_equal(plan.recv_src_token, src_token)
            np.testing.assert_array_equal(plan.num_recv_rows, rows)
            np.testing.assert_array_equal(plan.num_dropped, dropped)
            if layout == "expert_major":
                np.testing.assert_array_equal(plan.expert_group_sizes, sizes)
            combined = np.asarray(_combine_two_legs(np.stack(ys), plan))
            np.testing.assert_allclose(combined, flat_combined, rtol=1e-5, atol=1e-5)
            # Tokens with at most one row anywhere: no sum, so bitwise.
            contributions = np.zeros((r, t), int)
            np.add.at(contributions, (src_rank[src_rank >= 0], src_token[src_rank >= 0]), 1)
            single = contributions <= 1
            np.testing.assert_array_equal(combined[single], flat_combined[single])
            any_single |= bool(single.any())
            assert not single.all()
    assert any_single


def test_combine_partials_cross_each_rail_once(rng):
    """The combine's RDMA leg carries one partial per (token, node): rows summed
    on a node never cross twice."""
    r, el, t, k, e = 8, 4, 16, 6, 32
    idxs = _routing(rng, "uniform", r, t, k, e)
    plan = _plan(np.stack(idxs), num_experts=e, ranks_per_node=el)
    crossings = (np.asarray(plan.rdma_slot) >= 0).sum()
    assert crossings == np.asarray(plan.routing.is_token_in_node).sum()
    assert crossings < np.asarray(plan.routing.is_token_in_rank).sum()  # fewer than the flat all-to-all's rows


def test_capacity_hint_is_the_smallest_that_does_not_drop(rng):
    r, el, t, k, e = 8, 4, 12, 3, 32
    idx = np.stack(_routing(rng, "skewed", r, t, k, e))
    node_cap, cap = ip.capacity_hint(idx, num_experts=e, ranks_per_node=el)
    kw = dict(num_experts=e, ranks_per_node=el)
    assert int(np.max(_plan(idx, capacity=cap, node_capacity=node_cap, **kw).num_dropped)) == 0
    assert int(np.max(_plan(idx, capacity=cap, node_capacity=node_cap - 1, **kw).num_dropped)) > 0
    assert int(np.max(_plan(idx, capacity=cap - 1, node_capacity=node_cap, **kw).num_dropped)) > 0
    # Expert-major: every group rounded up to the alignment, on the busiest rank.
    xs = [np.zeros((t, 1), np.float32)] * r
    ws = [np.ones((t, k), np.float32)] * r
    want = max(int(w["group_sizes"].sum()) for w in npr.dispatch_expert_major(xs, list(idx), ws, e, r * t * k, 4))
    assert ip.capacity_hint(idx, layout="expert_major", expert_alignment=4, **kw) == (node_cap, want)
    with pytest.raises(ValueError, match="slack must be a number >= 1"):
        ip.capacity_hint(idx, slack=0.5, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(topk_idx=np.zeros((4, 2), np.int32)), "topk_idx must be an integer .R, T, K. array"),
    (dict(ranks_per_node=3), "ranks_per_node must be an int in .1, 31. dividing R = 4"),
    (dict(num_experts=6), "num_experts must be a multiple of R = 4"),
    (dict(layout="node_major"), "layout must be one of"),
])
def test_bad_plan_arguments_are_named(kw, match):
    args = dict(topk_idx=np.zeros((4, 2, 2), np.int32), num_experts=8, ranks_per_node=2) | kw
    with pytest.raises(ValueError, match=match):
        ip.plan_dispatch(args.pop("topk_idx"), **args)


@pytest.mark.parametrize("layout,alignment", [("rank_major", 1), ("expert_major", 4)])
def test_each_forwarder_places_rows_from_its_table_and_node_counts(rng, layout, alignment):
    """The notify design: a forwarder's output rows follow from its own table
    (with the top-k ids each token carries) and its node's counts alone."""
    r, el, t, k, e = 8, 4, 10, 3, 32
    nn = r // el
    for kind, cap, ncap in [("duplicates", 17, None), ("skewed", None, 9)]:
        idx = np.stack(_routing(rng, kind, r, t, k, e))
        plan = _plan(idx, num_experts=e, ranks_per_node=el, layout=layout, capacity=cap, node_capacity=ncap,
                     expert_alignment=alignment)
        c = plan.recv_src_rank.shape[1]
        src_node, src_token = np.asarray(plan.fwd_src_node), np.asarray(plan.fwd_src_token)
        tables = []
        for f in range(r):
            s = np.maximum(src_node[f], 0) * el + f % el
            topk = np.where((src_node[f] >= 0)[:, None], idx[s, np.maximum(src_token[f], 0)], -1)
            tables.append((src_node[f], topk))
        for m in range(nn):
            kw = dict(num_nodes=nn, ranks_per_node=el, node=m, num_experts=e)
            counts = [_forwarder_counts(*tables[m * el + l], **kw) for l in range(el)]
            ranks, experts = np.stack([a for a, _ in counts]), np.stack([b for _, b in counts])
            for l in range(el):
                rows = _forwarder_rows(*tables[m * el + l], ranks, experts, rail=l, layout=layout, capacity=c,
                                         expert_alignment=alignment, **kw)
                np.testing.assert_array_equal(rows, plan.fwd_dst_row[m * el + l])
