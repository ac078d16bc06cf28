"""Masked ranks in low-latency mode (a failed rank left out without
re-creating buffers), on the reference backend against numpy: a masked
rank's experts are masked slots, and the masked rank sends and receives
nothing."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax_ep
import np_reference as npr
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import AXIS, make_mesh, random_routing, run_ranks


def _masked_ids(idxs, masked, e, r):
    """The numpy statement: slots naming a masked rank's expert, and every slot
    of a masked rank, become -1."""
    out = []
    for s, ids in enumerate(idxs):
        owner = np.where(ids >= 0, ids // (e // r), -1)
        off = np.isin(owner, list(masked)) | (s in masked)
        out.append(np.where(off & (ids >= 0), -1, ids).astype(np.int32))
    return out


@pytest.mark.parametrize("r,masked", [(4, {2}), (8, {0, 5})])
def test_masked_ranks_dispatch_and_combine(rng, r, masked):
    t, k, e, h, m = 5, 3, 2 * r, 16, 6
    idxs = random_routing(rng, r, t, k, e, distinct=False)
    xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)
    mask = jax_ep.rank_mask_of(masked, r)

    def f(x, i, w, mask):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts, rank_mask=mask)
        # each expert scales its rows by (global expert id + 1)
        first = jax.lax.axis_index("ep") * (e // r)
        y = o.recv_x * (first + jnp.arange(e // r) + 1.0)[:, None, None]
        split = jax_ep.low_latency_dispatch_recv(
            jax_ep.low_latency_dispatch_send(x, i, num_experts=e, options=opts, rank_mask=mask))
        return (o.recv_x, o.recv_count, jax_ep.low_latency_combine(y, w, o.handle), split.recv_count,
                o.handle.recv_src_rank)

    recv, count, out, split_count, src_rank = run_ranks(f, r, xs, idxs, ws, [mask] * r)
    want_ids = _masked_ids(idxs, masked, e, r)
    ref = npr.ll_dispatch(xs, want_ids, e, m)
    for d in range(r):
        np.testing.assert_array_equal(count[d], ref[d]["count"])
        np.testing.assert_array_equal(split_count[d], ref[d]["count"])
        np.testing.assert_array_equal(recv[d], ref[d]["x"])
        if d in masked:
            assert not count[d].any() and not out[d].any()
        ids = want_ids[d]
        scale = np.where(ids >= 0, ws[d] * (ids + 1.0), 0).sum(1)
        np.testing.assert_allclose(out[d], xs[d] * scale[:, None], rtol=1e-5, atol=1e-5)
    assert not np.isin(src_rank, list(masked)).any()  # nothing arrives from a masked rank
    assert count.sum() > 0  # the survivors still exchange


def test_mask_changes_without_recompiling(rng):
    r, t, k, e, h, m = 4, 4, 2, 8, 16, 4
    idxs = np.stack(random_routing(rng, r, t, k, e, mask_prob=0.0))
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)
    traces = []

    def f(x, i, w, mask):
        traces.append(1)
        o = jax_ep.low_latency_dispatch(x[0], i[0], num_experts=e, options=opts, rank_mask=mask)
        return jax_ep.low_latency_combine(o.recv_x, w[0], o.handle)[None]

    mesh = make_mesh(r)
    step = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P()), out_specs=P(AXIS)))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))
    x, i, w = put(np.ones((r, t, h), np.float32)), put(idxs), put(np.ones((r, t, k), np.float32))
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(step(x, i, w, jax_ep.rank_mask_of([], r)), 2.0)  # both slots of every token
        for dead in range(r):
            out = np.asarray(step(x, i, w, jax_ep.rank_mask_of([dead], r)))
            want = [np.where(_masked_ids(list(idxs), {dead}, e, r)[s] >= 0, 1.0, 0.0).sum(1) for s in range(r)]
            np.testing.assert_allclose(out[..., 0], np.stack(want))
    assert len(traces) == 1


def test_rank_mask_errors():
    with pytest.raises(ValueError, match=r"masked ranks must be ints in \[0, 4\), got 4"):
        jax_ep.rank_mask_of([4], 4)

    def f(x, i):
        return jax_ep.low_latency_dispatch(x, i, num_experts=4, rank_mask=jnp.zeros((3,), bool)).recv_count

    xs = [np.zeros((2, 16), np.float32)] * 2
    idxs = [np.zeros((2, 1), np.int32)] * 2
    with pytest.raises(ValueError, match=r"rank_mask must be a bool array \[R\] = \[2\]"):
        run_ranks(f, 2, xs, idxs)


def test_buffer_records_masked_ranks():
    buf = jax_ep.Buffer(num_experts=8)
    assert buf.masked_ranks() == ()
    buf.set_masked_ranks([3, 1, 3])
    assert buf.masked_ranks() == (1, 3)
    np.testing.assert_array_equal(buf.rank_mask(4), [False, True, False, True])
    with pytest.raises(ValueError, match="needs num_ranks"):
        buf.rank_mask()
    with pytest.raises(ValueError, match="masked ranks must be ints"):
        buf.set_masked_ranks(["a"])
    buf.set_masked_ranks([])
    assert not buf.rank_mask(4).any()


def test_one_rank_per_process_masks_by_its_own_rank(monkeypatch):
    """With the CUDA backend and axis_name=None the rank is the buffer's."""
    import types

    from jax_ep import runtime
    from jax_ep.handle import LowLatencySpec
    from jax_ep.low_latency import _apply_rank_mask

    spec = LowLatencySpec(num_ranks=2, num_experts=4, num_tokens=2, num_topk=2, hidden=128, axis_name=None,
                          options=jax_ep.LowLatencyOptions(backend="cuda", buffer_id=3))
    ids = jnp.array([[0, 2], [3, -1]], jnp.int32)
    assert _apply_rank_mask(ids, None, spec) == (ids, None)
    for me, want in [(0, [[0, -1], [-1, -1]]), (1, [[-1, -1], [-1, -1]])]:
        monkeypatch.setattr(runtime, "lookup", lambda buffer_id, me=me: types.SimpleNamespace(rank=me))
        got, mask = _apply_rank_mask(ids, np.array([False, True]), spec)
        np.testing.assert_array_equal(got, want)
        assert mask.dtype == jnp.bool_
