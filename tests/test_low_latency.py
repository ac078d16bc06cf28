"""Low-latency dispatch/combine on the reference backend."""

import numpy as np
import pytest

import jax.numpy as jnp
import jax_ep
import np_reference as npr
from conftest import random_routing, run_ranks


def _inputs(rng, r, t, k, e, h, dtype=np.float32, **kw):
    idxs = random_routing(rng, r, t, k, e, **kw)
    xs = [rng.standard_normal((t, h)).astype(dtype) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
    return xs, idxs, ws


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_ll_dispatch_packed_layout(rng, r):
    t, k, e, h, m = 7, 3, 3 * r, 16, 9
    xs, idxs, _ = _inputs(rng, r, t, k, e, h, dtype=jnp.bfloat16, distinct=False)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        return o.recv_x, o.recv_count

    recv, count = run_ranks(f, r, xs, idxs)
    ref = npr.ll_dispatch(xs, idxs, e, m)
    for d in range(r):
        assert recv[d].shape == (e // r, r * m, h)
        np.testing.assert_array_equal(count[d], ref[d]["count"])
        for loc in range(e // r):  # rows past the count are unspecified
            n = ref[d]["count"][loc]
            np.testing.assert_array_equal(recv[d][loc, :n], ref[d]["x"][loc, :n])


def test_ll_rows_past_the_count_are_never_read(rng):
    """Rows past recv_count are unspecified (docs/semantics.md): whatever they
    hold, the combine's result is the same, and their handle entries are -1."""
    r, t, k, e, h, m = 2, 5, 3, 4, 16, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e, h, distinct=False)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        rows = jnp.arange(o.recv_x.shape[1])[None, :, None]
        junk = jnp.where(rows < o.recv_count[:, None, None], o.recv_x, jnp.nan)
        return (jax_ep.low_latency_combine(o.recv_x, w, o.handle), jax_ep.low_latency_combine(junk, w, o.handle),
                o.handle.recv_src_rank, o.recv_count)

    clean, junk, src, count = run_ranks(f, r, xs, idxs, ws)
    np.testing.assert_array_equal(junk, clean)
    for d in range(r):
        for loc in range(e // r):
            assert (src[d][loc, count[d][loc]:] == -1).all()


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_ll_round_trip_is_weighted(rng, r):
    t, k, e, h, m = 6, 4, 2 * r, 16, 6
    xs, idxs, ws = _inputs(rng, r, t, k, e, h, distinct=False)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    out = run_ranks(f, r, xs, idxs, ws)
    for s in range(r):
        wsum = np.where((idxs[s] >= 0), ws[s], 0).sum(1)  # duplicate ids weigh twice
        np.testing.assert_allclose(out[s], xs[s] * wsum[:, None], rtol=1e-5, atol=1e-6)


def test_ll_combine_applies_each_expert_output(rng):
    """Each expert scales its rows by (expert id + 1): combine gives sum_k w_k (e_k + 1) x."""
    r, t, k, e, h, m = 4, 5, 3, 8, 16, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e, h)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        import jax
        rank = jax.lax.axis_index("ep")
        ids = rank * (e // r) + jnp.arange(e // r)
        y = o.recv_x * (ids + 1.0)[:, None, None]
        return jax_ep.low_latency_combine(y, w, o.handle)

    out = run_ranks(f, r, xs, idxs, ws)
    for s in range(r):
        factor = np.where(idxs[s] >= 0, ws[s] * (idxs[s] + 1.0), 0).sum(1)
        np.testing.assert_allclose(out[s], xs[s] * factor[:, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [jax_ep.FP8Options(), jax_ep.FP8Options(round_scale=True), jax_ep.FP8Options(use_ue8m0=True)])
def test_ll_fp8_dispatch(rng, fp8):
    r, t, k, e, h, m = 2, 5, 2, 4, 512, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e, h, dtype=jnp.bfloat16)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, fp8=fp8)

    def f(x, i):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        q, s = o.recv_x
        return jax_ep.per_token_cast_back(q, s, fp8, out_dtype=jnp.float32), o.recv_count

    deq, count = run_ranks(f, r, xs, idxs)
    ref = npr.ll_dispatch([x.astype(np.float32) for x in xs], idxs, e, m)
    for d in range(r):
        np.testing.assert_array_equal(count[d], ref[d]["count"])
        want = ref[d]["x"]
        # e4m3 keeps 3 mantissa bits: |error| <= 2^-4 of the group's max, and power-of-two scales at most double it.
        amax = np.abs(want.reshape(*want.shape[:-1], -1, 128)).max(-1, keepdims=True)
        err = np.abs(deq[d] - want).reshape(*want.shape[:-1], -1, 128)
        assert (err <= amax * (2.0 ** -4) * (2 if fp8.round_scale else 1) + 1e-6).all()


def test_send_recv_split_matches_fused(rng):
    """low_latency_{dispatch,combine}_{send,recv} give the fused ops' results, with work in between."""
    import jax

    r, t, k, e, h, m = 4, 5, 3, 8, 16, 8
    xs, idxs, ws = _inputs(rng, r, t, k, e, h)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w):
        pending = jax_ep.low_latency_dispatch_send(x, i, num_experts=e, options=opts)
        busy = jnp.tanh(x @ x.T).sum()  # work to overlap
        o = jax_ep.low_latency_dispatch_recv(pending, after=busy)
        back = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o.recv_x * 2, o.handle), w, after=busy)
        fused = jax_ep.low_latency_combine(o.recv_x * 2, w, o.handle)
        return back, fused, o.recv_count

    back, fused, count = run_ranks(f, r, xs, idxs, ws)
    ref = npr.ll_dispatch(xs, idxs, e, m)
    for s in range(r):
        np.testing.assert_array_equal(back[s], fused[s])
        np.testing.assert_array_equal(count[s], ref[s]["count"])
        np.testing.assert_allclose(back[s], 2 * xs[s] * np.where(idxs[s] >= 0, ws[s], 0).sum(1)[:, None], rtol=1e-5, atol=1e-6)


def test_split_pending_orders_and_kinds(rng):
    """``pending.then`` returns its input unchanged; a pending result goes only to its own receive."""
    r, t, k, e, h, m = 2, 4, 2, 4, 16, 4
    xs, idxs, ws = _inputs(rng, r, t, k, e, h)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w):
        pending = jax_ep.low_latency_dispatch_send(x, i, num_experts=e, options=opts)
        same = pending.then(x)
        o = jax_ep.low_latency_dispatch_recv(pending)
        with pytest.raises(TypeError, match="low_latency_dispatch_send; receive it with low_latency_dispatch_recv"):
            jax_ep.low_latency_combine_recv(pending, w)
        p2 = jax_ep.low_latency_combine_send(o.recv_x, o.handle)
        with pytest.raises(TypeError, match="receive it with low_latency_combine_recv"):
            jax_ep.low_latency_dispatch_recv(p2)
        with pytest.raises(TypeError, match="takes the LowLatencyPending"):
            jax_ep.low_latency_dispatch_recv(o)
        back = jax_ep.low_latency_combine_recv(p2, w)
        # a second round, ordered after the first
        o2 = jax_ep.low_latency_dispatch_recv(
            jax_ep.low_latency_dispatch_send(3 * x, i, num_experts=e, options=opts, after=back))
        back2 = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o2.recv_x, o2.handle, after=back), w)
        return same, back, back2

    same, back, back2 = run_ranks(f, r, xs, idxs, ws)
    for s in range(r):
        np.testing.assert_array_equal(same[s], xs[s])
        want = xs[s] * np.where(idxs[s] >= 0, ws[s], 0).sum(1)[:, None]
        np.testing.assert_allclose(back[s], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(back2[s], 3 * want, rtol=1e-5, atol=1e-5)


def test_async_send_option_is_checked():
    assert jax_ep.LowLatencyOptions().async_send is True
    with pytest.raises(TypeError, match="async_send must be True or False"):
        jax_ep.LowLatencyOptions(async_send=1)


def test_dispatch_pull_option_is_checked():
    assert jax_ep.LowLatencyOptions().dispatch_pull is True
    with pytest.raises(TypeError, match="dispatch_pull must be True or False"):
        jax_ep.LowLatencyOptions(dispatch_pull="yes")


def test_combine_fp8_rows_round_trip_through_fp8(rng):
    """combine_fp8: each returned row is the FP8 cast and back of the expert's row."""
    r, t, k, e, h, m = 2, 6, 3, 4, 512, 6
    xs, idxs, ws = _inputs(rng, r, t, k, e, h)
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, combine_fp8=True)

    def f(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    (out,) = run_ranks(lambda x, i, w: (f(x, i, w),), r, xs, idxs, ws)
    for s in range(r):
        q, sc = npr.fp8_quantize(xs[s])
        deq = (q.astype(np.float32).reshape(t, -1, 128) * sc[..., None]).reshape(t, h)
        want = deq * np.where(idxs[s] >= 0, ws[s], 0).sum(1)[:, None]
        np.testing.assert_allclose(out[s], want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(out[s], xs[s] * np.where(idxs[s] >= 0, ws[s], 0).sum(1)[:, None], rtol=1e-6, atol=0)


def test_combine_fp8_errors():
    import jax

    x, i = jnp.zeros((4, 256)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="combine_fp8=True needs a multiple of 512"):
        jax_ep.low_latency_dispatch(x, i, num_experts=4, axis_name=None,
                                    options=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=4, combine_fp8=True))
    with pytest.raises(TypeError, match="combine_fp8 must be True or False"):
        jax_ep.LowLatencyOptions(combine_fp8="yes")

    r, t, k, e, h, m = 1, 2, 2, 2, 512, 2
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, combine_fp8=True)
    xs = [np.ones((t, h), np.float32)]
    idxs = [np.array([[0, 1], [1, -1]], np.int32)]
    ws = [np.ones((t, k), np.float32)]

    def loss(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle).sum()

    with pytest.raises(NotImplementedError, match="combine_fp8=True has no gradient"):
        run_ranks(lambda x, i, w: (jax.grad(loss, argnums=2)(x, i, w),), r, xs, idxs, ws)
