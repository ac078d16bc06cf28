"""Property-based routing tests: any routing, any capacity, on 4 ranks."""

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import jax_ep
import np_reference as npr
from conftest import run_ranks

R, E, H = 4, 8, 4


@st.composite
def routings(draw):
    t = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    ids = draw(st.lists(st.integers(-1, E - 1), min_size=R * t * k, max_size=R * t * k))
    idx = np.array(ids, np.int32).reshape(R, t, k)
    layout = draw(st.sampled_from(["rank_major", "expert_major"]))
    capacity = draw(st.one_of(st.none(), st.integers(1, R * t * k + 4)))
    alignment = draw(st.sampled_from([1, 2, 4]))
    return idx, layout, capacity, alignment


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routings())
def test_dispatch_matches_numpy_for_any_routing(case):
    idx, layout, capacity, alignment = case
    t, k = idx.shape[1:]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((t, H)).astype(np.float32) for _ in range(R)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(R)]
    opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=capacity, expert_alignment=alignment)

    def f(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=E, options=opts)
        return o.recv_x, o.recv_topk_idx, o.num_dropped, jax_ep.combine(o.recv_x, o.handle)

    rx, ri, dropped, back = run_ranks(f, R, xs, list(idx), ws)
    cap = opts.num_max_recv_tokens or (R * t if layout == "rank_major" else R * t * min(k, E // R) + (E // R) * (alignment - 1))
    if layout == "rank_major":
        ref = npr.dispatch_rank_major(xs, list(idx), ws, E, cap)
    else:
        ref = npr.dispatch_expert_major(xs, list(idx), ws, E, cap, alignment)
    received = np.zeros((R, t))
    for d in range(R):
        np.testing.assert_array_equal(rx[d], ref[d]["x"])
        np.testing.assert_array_equal(ri[d], ref[d]["idx"])
        assert dropped[d] == ref[d]["dropped"]
        for s, i in ref[d]["src"]:
            received[s, i] += 1
    for s in range(R):  # combine returns each kept copy exactly once
        np.testing.assert_allclose(back[s], xs[s] * received[s][:, None], rtol=1e-6, atol=1e-6)
