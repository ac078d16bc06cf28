"""Normal dispatch/combine on the reference backend against the numpy restatement."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax_ep
import np_reference as npr
from conftest import random_routing, run_ranks

H = 16


def _inputs(rng, r, t, k, e, dtype=np.float32, **kw):
    idxs = random_routing(rng, r, t, k, e, **kw)
    xs = [rng.standard_normal((t, H)).astype(dtype) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
    return xs, idxs, ws


def _dispatch_fn(num_experts, options):
    def f(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=num_experts, options=options)
        return (o.recv_x, o.recv_topk_idx, o.recv_topk_weights, o.num_recv_tokens_per_expert,
                o.num_recv_rows, o.num_dropped, o.handle.recv_src_rank, o.handle.recv_src_token,
                o.expert_group_sizes if o.expert_group_sizes is not None else o.num_dropped)
    return f


def _check_against(out, ref, expert_major=False):
    rx, ri, rw, cnt, rows, drop, src_rank, src_token, sizes = out
    for d, want in enumerate(ref):
        np.testing.assert_array_equal(rx[d], want["x"])
        np.testing.assert_array_equal(ri[d], want["idx"])
        np.testing.assert_array_equal(rw[d], want["w"])
        np.testing.assert_array_equal(cnt[d], want["counts"])
        assert drop[d] == want["dropped"]
        assert rows[d] == len(want["src"])
        got_src = [(int(a), int(b)) for a, b in zip(src_rank[d], src_token[d]) if a >= 0]
        assert got_src == want["src"]
        if expert_major:
            np.testing.assert_array_equal(sizes[d], want["group_sizes"])


@pytest.mark.parametrize("r", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_rank_major_matches_numpy(rng, r, dtype):
    t, k, e = 11, 3, 2 * r
    xs, idxs, ws = _inputs(rng, r, t, k, e, dtype=dtype, distinct=(k <= e))
    out = run_ranks(_dispatch_fn(e, jax_ep.NormalOptions()), r, xs, idxs, ws)
    _check_against(out, npr.dispatch_rank_major(xs, idxs, ws, e, r * t))


@pytest.mark.parametrize("r,alignment", [(1, 1), (2, 4), (4, 1), (8, 8)])
def test_expert_major_matches_numpy(rng, r, alignment):
    t, k, e = 9, 4, 4 * r
    xs, idxs, ws = _inputs(rng, r, t, k, e)
    opts = jax_ep.NormalOptions(layout="expert_major", expert_alignment=alignment)
    out = run_ranks(_dispatch_fn(e, opts), r, xs, idxs, ws)
    le = e // r
    capacity = r * t * min(k, le) + le * (alignment - 1)
    ref = npr.dispatch_expert_major(xs, idxs, ws, e, capacity, alignment)
    _check_against(out, ref, expert_major=True)
    for d in range(r):  # groups start aligned
        starts = np.concatenate([[0], np.cumsum(out[8][d])[:-1]])
        assert (starts % alignment == 0).all()


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_overflow_drops_by_rule_and_counts(rng, layout):
    r, t, k, e, cap = 4, 10, 3, 8, 7
    xs, idxs, ws = _inputs(rng, r, t, k, e, mask_prob=0.0)
    opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=cap, expert_alignment=2)
    out = run_ranks(_dispatch_fn(e, opts), r, xs, idxs, ws)
    if layout == "rank_major":
        ref = npr.dispatch_rank_major(xs, idxs, ws, e, cap)
    else:
        ref = npr.dispatch_expert_major(xs, idxs, ws, e, cap, 2)
    assert sum(x["dropped"] for x in ref) > 0
    _check_against(out, ref, expert_major=layout == "expert_major")


@pytest.mark.parametrize("r", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_round_trip_sums_once_per_rank_or_expert(rng, r, layout):
    t, k, e = 12, 4, 2 * r
    xs, idxs, ws = _inputs(rng, r, t, k, e, distinct=False)

    def f(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=e, options=jax_ep.NormalOptions(layout=layout))
        return jax_ep.combine(o.recv_x, o.handle)

    back = run_ranks(f, r, xs, idxs, ws)
    for s in range(r):
        per_rank, per_expert, in_rank = npr.layout(idxs[s], e, r)
        if layout == "rank_major":
            times = in_rank.sum(1)
        else:
            times = np.array([len(npr.token_experts(row, e)) for row in idxs[s]])
        np.testing.assert_allclose(back[s], xs[s] * times[:, None], rtol=1e-6, atol=1e-6)


def test_weighted_round_trip_with_recv_weights(rng):
    """Weighting rows by recv_topk_weights then combining gives sum_k w_k x."""
    r, t, k, e = 4, 10, 3, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e)

    def f(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=e)
        y = o.recv_x * jnp.sum(o.recv_topk_weights, axis=1, keepdims=True)
        return jax_ep.combine(y, o.handle)

    back = run_ranks(f, r, xs, idxs, ws)
    for s in range(r):
        wsum = np.where(idxs[s] >= 0, ws[s], 0).sum(1)
        np.testing.assert_allclose(back[s], xs[s] * wsum[:, None], rtol=1e-5, atol=1e-6)


def test_cached_dispatch_reuses_routing(rng):
    r, t, k, e = 4, 8, 2, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e)
    x2 = [rng.standard_normal((t, 5)).astype(np.float32) for _ in range(r)]

    def f(x, i, w, z):
        o = jax_ep.dispatch(x, i, w, num_experts=e)
        return jax_ep.cached_dispatch(z, o.handle)

    got = run_ranks(f, r, xs, idxs, ws, x2)
    ref = npr.dispatch_rank_major(x2, idxs, ws, e, r * t)
    for d in range(r):
        np.testing.assert_array_equal(got[d], ref[d]["x"])


def test_fp8_pair_dispatch_moves_both_parts(rng):
    r, t, k, e, h = 2, 6, 2, 4, 256
    idxs = random_routing(rng, r, t, k, e)
    xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]

    def f(x, i, w):
        pair = jax_ep.per_token_cast_to_fp8(x)
        o = jax_ep.dispatch(pair, i, w, num_experts=e)
        q, s = o.recv_x
        return jax_ep.per_token_cast_back(q, s, out_dtype=jnp.float32)

    got = run_ranks(f, r, xs, idxs, ws)
    deq = []
    for x in xs:
        q, s = npr.fp8_quantize(x)
        deq.append((q.astype(np.float32).reshape(t, h // 128, 128) * s[..., None]).reshape(t, h))
    ref = npr.dispatch_rank_major(deq, idxs, ws, e, r * t)
    for d in range(r):
        np.testing.assert_array_equal(got[d], ref[d]["x"])


@pytest.mark.parametrize("case", ["all_to_one_rank", "nothing_routed", "one_token"])
def test_skewed_routing(rng, case):
    r, k, e = 4, 2, 8
    t = 1 if case == "one_token" else 7
    xs = [rng.standard_normal((t, H)).astype(np.float32) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
    if case == "all_to_one_rank":
        idxs = [np.tile(np.array([[2, 3]], np.int32), (t, 1)) for _ in range(r)]  # experts of rank 1
    elif case == "nothing_routed":
        idxs = [np.full((t, k), -1, np.int32) for _ in range(r)]
    else:
        idxs = random_routing(rng, r, t, k, e, mask_prob=0.0)
    out = run_ranks(_dispatch_fn(e, jax_ep.NormalOptions()), r, xs, idxs, ws)
    _check_against(out, npr.dispatch_rank_major(xs, idxs, ws, e, r * t))
