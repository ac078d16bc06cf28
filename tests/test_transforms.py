"""Every op under jit, lax.scan and lax.fori_loop, and through the Buffer object."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax_ep
import np_reference as npr
from conftest import random_routing, run_ranks

R, T, K, E, H, STEPS = 4, 6, 2, 8, 16, 5


def test_normal_round_trip_in_scan(rng):
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idxs = [np.stack(r) for r in zip(*[random_routing(rng, R, T, K, E) for _ in range(STEPS)])]  # [STEPS, T, K] per rank
    ws = [rng.random((STEPS, T, K)).astype(np.float32) for _ in range(R)]

    def f(x, idx, w):
        def step(carry, inp):
            i, wk = inp
            o = jax_ep.dispatch(carry, i, wk, num_experts=E)
            y = o.recv_x * jnp.sum(o.recv_topk_weights, 1, keepdims=True)
            return jax_ep.combine(y, o.handle), o.num_recv_rows
        return jax.lax.scan(step, x, (idx, w))

    out, rows = run_ranks(f, R, xs, idxs, ws)
    for s in range(R):  # each step scales a token by its summed weights
        want = xs[s].astype(np.float64)
        for st in range(STEPS):
            want = want * np.where(idxs[s][st] >= 0, ws[s][st], 0).sum(1)[:, None]
        np.testing.assert_allclose(out[s], want, rtol=1e-4, atol=1e-6)


def test_low_latency_decode_loop_in_fori_loop(rng):
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idxs = random_routing(rng, R, T, K, E)
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(R)]
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=8)

    def f(x, i, w):
        def body(_, h):
            o = jax_ep.low_latency_dispatch(h, i, num_experts=E, options=opts)
            return jax_ep.low_latency_combine(o.recv_x, w, o.handle)
        return jax.lax.fori_loop(0, STEPS, body, x)

    out = run_ranks(f, R, xs, idxs, ws)
    for s in range(R):
        factor = np.where(idxs[s] >= 0, ws[s], 0).sum(1) ** STEPS
        np.testing.assert_allclose(out[s], xs[s] * factor[:, None], rtol=1e-4, atol=1e-6)


def test_layout_and_fp8_under_jit_and_vmap(rng):
    idx = random_routing(rng, 3, T, K, E)
    lay = jax.jit(jax.vmap(lambda i: tuple(jax_ep.get_dispatch_layout(i, E, num_ranks=R))))(np.stack(idx))
    for b in range(3):
        for got, want in zip(lay, npr.layout(idx[b], E, R)):
            np.testing.assert_array_equal(np.asarray(got[b]), want)
    x = rng.standard_normal((3, T, 256)).astype(np.float32)
    q, s = jax.jit(jax_ep.per_token_cast_to_fp8)(x)
    assert q.shape == x.shape and s.shape == (3, T, 2)


def test_buffer_methods_match_functions(rng):
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idxs = random_routing(rng, R, T, K, E)
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(R)]
    buf = jax_ep.Buffer(num_experts=E, low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=T))

    def f(x, i, w):
        lay = buf.get_dispatch_layout(i)
        o = buf.dispatch(x, i, w)
        back = buf.combine(o.recv_x, o.handle)
        ll = buf.low_latency_dispatch(x, i)
        ll_back = buf.low_latency_combine(ll.recv_x, w, ll.handle)
        return lay.num_tokens_per_rank, back, ll_back

    per_rank, back, ll_back = run_ranks(f, R, xs, idxs, ws)
    for s in range(R):
        _, _, in_rank = npr.layout(idxs[s], E, R)
        np.testing.assert_array_equal(per_rank[s], in_rank.sum(0))
        np.testing.assert_allclose(back[s], xs[s] * in_rank.sum(1)[:, None], rtol=1e-6)
        np.testing.assert_allclose(ll_back[s], xs[s] * np.where(idxs[s] >= 0, ws[s], 0).sum(1)[:, None], rtol=1e-5, atol=1e-6)
