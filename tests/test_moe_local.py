"""The one-rank expert block (jax_ep.moe_local) against the reference
backend's dispatch -> experts -> combine at R = 1: identical outputs and drop
counts (worst-case capacity, a capacity that drops, repeated and masked
slots), the same gradients, the layer with overflow rounds at R = 1, and the
CUDA configuration's lowering at R = 1 (no kernel)."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax_ep import moe
from jax_ep.moe_local import local_capacity, local_round
from conftest import AXIS, make_mesh

CFG = moe.MoEConfig(num_experts=8, hidden=16, ffn=24, topk=3, expert_alignment=4)
T = 20


def _inputs(seed, repeat=False, mask=False):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(CFG.num_experts, CFG.topk, replace=False) for _ in range(T)]).astype(np.int32)
    if repeat:  # some tokens name an expert twice: one row, both weights
        idx[::3, 1] = idx[::3, 0]
    if mask:
        idx[1::4, 2] = -1
    w = rng.random((T, CFG.topk)).astype(np.float32)
    x = rng.standard_normal((T, CFG.hidden)).astype(np.float32)
    params = {k: v for k, v in moe.init_params(jax.random.key(seed), CFG).items() if k != "router"}
    return params, jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w)


def _on_one_rank(fn, *args):
    mesh = make_mesh(1)
    f = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    with jax.set_mesh(mesh):
        return jax.jit(f)(*args)


@pytest.mark.parametrize("capacity", [None, 40, 13, 1])
@pytest.mark.parametrize("repeat,mask", [(False, False), (True, True)])
def test_local_round_equals_reference_dispatch(capacity, repeat, mask):
    cfg = dataclasses.replace(CFG, capacity=capacity)
    options = cfg.normal_options()
    params, x, idx, w = _inputs(3, repeat, mask)

    def both(params, x, idx, w):
        return local_round(cfg, options, params, x, idx, w), moe._expert_round_counted(cfg, options, params, x, idx, w)

    (y, dropped), (y_ref, dropped_ref) = _on_one_rank(both, params, x, idx, w)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    assert int(dropped) == int(dropped_ref)
    if capacity is not None and capacity < 40:
        assert int(dropped) > 0


@pytest.mark.parametrize("capacity", [None, 13])
def test_local_round_gradients(capacity):
    cfg = dataclasses.replace(CFG, capacity=capacity)
    options = cfg.normal_options()
    params, x, idx, w = _inputs(5, repeat=True, mask=True)

    def grads(round_fn):
        def loss(params, x, w):
            return jnp.sum(jnp.sin(round_fn(cfg, options, params, x, idx, w)[0]))
        return jax.grad(loss, argnums=(0, 1, 2))

    g, g_ref = _on_one_rank(lambda *a: (grads(local_round)(*a), grads(moe._expert_round_counted)(*a)), params, x, w)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_local_capacity_is_dispatch_worst_case():
    assert local_capacity(20, 3, 8, 4, None) == 20 * 3 + 8 * 3
    assert local_capacity(0, 3, 8, 1, None) == 1
    assert local_capacity(20, 3, 8, 4, 7) == 7


@pytest.mark.parametrize("factor", [None, 0.5])
def test_one_rank_layer_matches_dense_reference(factor):
    """moe_layer at R = 1 (the local path), with overflow rounds when the
    capacity is half the expected load, equals the dense reference."""
    cfg = dataclasses.replace(CFG, capacity_factor=factor)
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (T, cfg.hidden))
    mesh = make_mesh(1)
    specs = moe.param_specs(cfg)

    def loss(params, x):
        y, aux = jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg), mesh=mesh,
                               in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))(params, x)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, y

    def ref_loss(params, x):
        y, aux = moe.moe_reference(params, x, cfg)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, y

    with jax.set_mesh(mesh):
        (l, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (l_ref, y_ref), g_ref = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    if factor is not None:
        with jax.set_mesh(mesh):
            plan = jax.jit(jax.shard_map(
                lambda p, x: moe.normal_experts(x, p, moe.route(x, p["router"], cfg), cfg, with_rounds=True)[1],
                mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=P(), check_vma=False))(params, x)
        assert int(plan.num_rounds) >= 2 and int(plan.num_dropped) == 0


def _lowered_calls(monkeypatch, layer_fn, cfg, twice):
    """The jax_ep custom calls in the CUDA lowering of a loss's gradient
    (lowered on CPU; a stand-in for the one-rank buffer)."""
    import re
    import types

    from jax_ep import _extension, runtime

    if not _extension.available():
        pytest.skip("needs the jax_ep._C extension (its FFI targets) to lower the CUDA backend")
    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: types.SimpleNamespace(num_ranks=1, put_path=False))
    mesh = make_mesh(1)
    specs = moe.param_specs(cfg)
    fwd = jax.shard_map(layer_fn, mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))
    if twice:  # y and aux from two calls, as compare_moe.py once did
        loss = lambda p, x: jnp.sum(fwd(p, x)[0] ** 2) + fwd(p, x)[1]  # noqa: E731
    else:
        loss = lambda p, x: (lambda y, aux: jnp.sum(y ** 2) + aux)(*fwd(p, x))  # noqa: E731
    params = moe.init_params(jax.random.key(0), cfg)
    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, jnp.ones((T, cfg.hidden))).lower(
            lowering_platforms=("cuda",)).as_text()
    return sorted(re.findall(r'custom_call @(jax_ep_\w+)', text) + re.findall(r'call_target_name = "(jax_ep_\w+)"', text))


def test_cuda_layer_at_one_rank_launches_no_kernel(monkeypatch):
    """With backend='cuda' at R = 1 the layer lowers to no jax_ep custom call;
    the dispatch/combine path it replaces keeps its calls (side effects: XLA
    neither merges nor drops them), so a loss calling it twice runs it twice."""
    cfg = dataclasses.replace(CFG, backend="cuda", buffer_id=0)
    assert _lowered_calls(monkeypatch, lambda p, x: moe.moe_layer(p, x, cfg), cfg, twice=True) == []

    def kernels_path(p, x):
        r = moe.route(x, p["router"], cfg)
        ex = {n: p[n] for n in cfg.expert_param_names}
        y = moe._expert_round_counted(cfg, cfg.normal_options(), ex, x, r.idx, r.weights)[0]
        return y, moe.load_balancing_loss(r.probs, r.idx, cfg.num_experts, AXIS)

    once = _lowered_calls(monkeypatch, kernels_path, cfg, twice=False)
    assert once.count("jax_ep_intranode_dispatch") == 1 and "jax_ep_intranode_cached_dispatch" in once
    assert _lowered_calls(monkeypatch, kernels_path, cfg, twice=True).count("jax_ep_intranode_dispatch") == 2
