"""jax_ep.grouped_matmul against jax.lax.ragged_dot (values and gradients,
any group sizes: empty groups, groups inside tiles, rows past the last
group), its segment plan, its memory at DeepEP's shape by XLA's memory
analysis, and the MoE layer on it (MoEConfig.expert_matmul)."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax_ep import moe
from jax_ep.grouped_matmul import _segments, grouped_matmul
from conftest import AXIS, make_mesh


def _pair(rng, m, k, n, sizes, dtype=np.float32):
    x = jnp.asarray(rng.standard_normal((m, k)).astype(dtype))
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)).astype(dtype))
    return x, w, jnp.asarray(np.asarray(sizes, np.int32))


CASES = [
    (40, [5, 0, 17, 3, 0, 2], 8, 3),      # groups start inside tiles; rows past the last group
    (40, [0, 0, 0, 0], 8, 2),             # no rows at all
    (40, [40], 16, 1),                    # one group
    (37, [8, 8, 16, 4], 8, 4),            # M not a multiple of the tile
    (64, [8, 16, 8, 0, 24, 8], 8, 2),     # aligned groups: one segment per tile
    (64, [1] * 20, 8, 4),                 # many groups in one tile
]


@pytest.mark.parametrize("m,sizes,tile,chunk", CASES)
def test_matches_ragged_dot_values_and_gradients(m, sizes, tile, chunk):
    rng = np.random.default_rng(len(sizes) * 100 + m)
    x, w, gs = _pair(rng, m, 16, 12, sizes)
    probe = jnp.cos(jnp.arange(m * 12, dtype=jnp.float32).reshape(m, 12))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, gs) * probe)

    ours = jax.jit(lambda x, w: grouped_matmul(x, w, gs, tile_rows=tile, chunk=chunk))(x, w)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.lax.ragged_dot(x, w, gs)), rtol=1e-5, atol=1e-4)
    g_ours = jax.grad(loss(lambda x, w, g: grouped_matmul(x, w, g, tile_rows=tile, chunk=chunk)), (0, 1))(x, w)
    g_ref = jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x, w)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_sizes_past_m_are_clipped():
    rng = np.random.default_rng(3)
    x, w, _ = _pair(rng, 24, 16, 12, [0, 0])
    y = grouped_matmul(x, w, jnp.asarray([30, 5], jnp.int32), tile_rows=8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w[0]), rtol=1e-5, atol=1e-4)


def test_traced_group_sizes_and_bfloat16():
    rng = np.random.default_rng(7)
    x, w, _ = _pair(rng, 96, 32, 24, [0] * 5)
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, tile_rows=16))
    for sizes in ([10, 30, 0, 40, 16], [96, 0, 0, 0, 0], [0, 0, 0, 0, 3]):
        gs = jnp.asarray(sizes, jnp.int32)
        y = f(x, w, gs)
        assert y.dtype == jnp.bfloat16
        ref = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-1)


def test_segments_follow_the_rows_that_hold_data():
    """Aligned groups need one segment per tile that holds data; a group
    starting inside a tile adds one; empty rows and empty groups add none."""
    seg = _segments(jnp.asarray([16, 0, 8, 8], jnp.int32), rows=64, tile_rows=8, chunk=4)
    assert int(seg.count) == 4  # rows [0, 32) in 4 tiles; rows [32, 64) hold nothing
    n = int(seg.count)
    assert np.asarray(seg.start)[:n].tolist() == [0, 8, 16, 24]
    assert np.asarray(seg.end)[:n].tolist() == [8, 16, 24, 32]
    assert np.asarray(seg.group)[:n].tolist() == [0, 0, 2, 3]
    seg = _segments(jnp.asarray([3, 0, 9, 4], jnp.int32), rows=20, tile_rows=8, chunk=4)
    n = int(seg.count)
    assert list(zip(np.asarray(seg.start)[:n].tolist(), np.asarray(seg.end)[:n].tolist(),
                    np.asarray(seg.tile)[:n].tolist(), np.asarray(seg.group)[:n].tolist())) == [
        (0, 3, 0, 0), (3, 8, 0, 2), (8, 12, 1, 2), (12, 16, 1, 3)]
    assert (np.asarray(seg.start)[n:] == np.asarray(seg.end)[n:]).all()  # the rest are empty
    assert seg.start.shape[0] % 4 == 0


def test_memory_at_deepeps_shape_is_linear_in_the_rows():
    """XLA's memory analysis (compiled, not run) at DeepEP's dropless shape:
    49,024 rows, 128 local experts, hidden 7168, FFN 1024, bfloat16. ragged_dot's
    dense rewrite needs tens of GiB of temporaries; grouped_matmul a fraction
    of one (forward), and in the backward the float32 weight gradient."""
    m, k, n, g = 49024, 7168, 1024, 128
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)

    def temp(f):
        return jax.jit(f).lower(x, w, gs).compile().memory_analysis().temp_size_in_bytes

    def grads(fn):
        return jax.grad(lambda x, w, g: jnp.sum(fn(x, w, g).astype(jnp.float32) ** 2), (0, 1))

    ours_fwd, ours_bwd = temp(grouped_matmul), temp(grads(grouped_matmul))
    dense_fwd = temp(jax.lax.ragged_dot)
    assert dense_fwd > 40 * 2**30            # the [M, G*K] operand
    assert ours_fwd < 2**30
    assert ours_bwd < g * k * n * 4 + 2**30  # the float32 dw, and less than 1 GiB besides


def test_errors():
    x = jnp.zeros((8, 4))
    w = jnp.zeros((2, 4, 3))
    gs = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"x \[M, K\], w \[G, K, N\]"):
        grouped_matmul(x[None], w, gs)
    with pytest.raises(ValueError, match="shapes do not match"):
        grouped_matmul(x, jnp.zeros((2, 5, 3)), gs)
    with pytest.raises(TypeError, match="integer"):
        grouped_matmul(x, w, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        grouped_matmul(x, w, gs, tile_rows=12)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        grouped_matmul(x, w, gs, chunk=0)
    assert grouped_matmul(jnp.zeros((0, 4)), w, gs).shape == (0, 3)


def test_auto_picks_grouped_where_ragged_dot_would_be_dense_and_huge():
    cfg = moe.MoEConfig(num_experts=256, hidden=7168, ffn=1024, topk=8)
    assert moe.grouped_matmul_for(cfg, 49024, 128, 7168, jnp.bfloat16)
    assert not moe.grouped_matmul_for(cfg, 8192, 32, 2048, jnp.float32)  # 2 GiB: ragged_dot
    assert moe.grouped_matmul_for(dataclasses.replace(cfg, expert_matmul="grouped"), 8, 2, 8, jnp.float32)
    assert not moe.grouped_matmul_for(dataclasses.replace(cfg, expert_matmul="ragged_dot"), 49024, 128, 7168,
                                      jnp.bfloat16)


@pytest.mark.parametrize("r", [1, 4])
def test_layer_on_grouped_matmul_matches_ragged_dot(r):
    """The normal-mode layer (r = 1: the local permutation, unaligned groups;
    r = 4: expert-major dispatch) on either matmul: same values and gradients."""
    t = 10
    cfg = moe.MoEConfig(num_experts=8, hidden=16, ffn=24, topk=3, expert_alignment=4, expert_matmul="ragged_dot")
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden))
    mesh = make_mesh(r)
    results = []
    with jax.set_mesh(mesh):
        for kind in ("ragged_dot", "grouped"):
            c = dataclasses.replace(cfg, expert_matmul=kind)
            specs = moe.param_specs(c)

            def loss(params, x, c=c, specs=specs):
                y, aux = jax.shard_map(lambda p, x: moe.moe_layer(p, x, c), mesh=mesh,
                                       in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))(params, x)
                return jnp.sum(jnp.sin(y)) + 0.1 * aux, y

            results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x))
    (l0, y0), g0 = results[0]
    (l1, y1), g1 = results[1]
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_under_scan_vmap_and_checkpoint():
    """A stack of layers in lax.scan (as nnx.scan or a scanned Equinox stack
    runs it), vmap with per-example group sizes, and jax.checkpoint: the same
    values and gradients as ragged_dot (per example, which ragged_dot's own
    vmap does not take)."""
    rng = np.random.default_rng(11)
    layers, m, k, g = 3, 40, 16, 4
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((layers, g, k, k)) / 4, jnp.float32)
    gs = jnp.asarray([10, 0, 20, 7], jnp.int32)

    def net(mm):
        def f(ws, x):
            h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(mm(h, w, gs)), None), x, ws)
            return jnp.sum(h ** 2)
        return f

    ours = net(lambda h, w, s: grouped_matmul(h, w, s, tile_rows=8))
    ref = jax.jit(jax.grad(net(jax.lax.ragged_dot), (0, 1)))(ws, x)
    for got in (jax.jit(jax.grad(ours, (0, 1)))(ws, x), jax.jit(jax.grad(jax.checkpoint(ours), (0, 1)))(ws, x)):
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)

    xs = jnp.stack([x, 2 * x])
    gss = jnp.stack([gs, jnp.asarray([m, 0, 0, 0], jnp.int32)])

    def batched(xs):
        return jax.vmap(lambda x, s: grouped_matmul(x, ws[0], s, tile_rows=8))(xs, gss)

    def looped(xs):
        return jnp.stack([jax.lax.ragged_dot(xs[i], ws[0], gss[i]) for i in range(2)])

    np.testing.assert_allclose(np.asarray(batched(xs)), np.asarray(looped(xs)), rtol=1e-5, atol=1e-4)
    g_ours = jax.grad(lambda xs: jnp.sum(batched(xs) ** 2))(xs)
    g_ref = jax.grad(lambda xs: jnp.sum(looped(xs) ** 2))(xs)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-4, atol=1e-4)
