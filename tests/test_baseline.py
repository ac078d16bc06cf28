"""The hand-written all_to_all baseline (benchmarks/baseline_moe.py) computes
the same layer as jax_ep's normal and low-latency modes (xla backend).

Tolerance: outputs and the loss to rtol 1e-5 / atol 1e-5, gradients to
rtol 1e-4 / atol 2e-5 (float32 on CPU; the implementations sum the top-k
contributions in different orders). Capacities never drop: jax_ep's default
worst case, the baseline's T*K slots per rank pair.
"""

import dataclasses
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import moe
from conftest import AXIS, make_mesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import baseline_moe  # noqa: E402


def _loss(layer, cfg, mesh):
    specs = moe.param_specs(cfg)

    def loss(params, x):
        y, aux = jax.shard_map(lambda p, x: layer(p, x, cfg), mesh=mesh,
                               in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))(params, x)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_baseline_matches_jax_ep(r):
    t = 6
    cfg = moe.MoEConfig(num_experts=16, hidden=16, ffn=16, topk=4, expert_alignment=4,
                        activation="swiglu" if r % 4 else "gelu")
    params = moe.init_params(jax.random.key(r), cfg)
    x = jax.random.normal(jax.random.key(10 + r), (r * t, cfg.hidden))
    mesh = make_mesh(r)
    with jax.set_mesh(mesh):
        x = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
        (l_b, y_b), g_b = _loss(baseline_moe.baseline_moe_layer, cfg, mesh)(params, x)
        modes = ("normal", "low_latency") if r == 4 else ("normal",)
        for mode in modes:
            (l_e, y_e), g_e = _loss(moe.moe_layer, dataclasses.replace(cfg, mode=mode), mesh)(params, x)
            np.testing.assert_allclose(np.asarray(y_b), np.asarray(y_e), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(l_b), float(l_e), rtol=1e-5)
            for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_e), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_baseline_small_capacity_drops():
    """With a capacity factor below 1 under skewed routing the baseline drops pairs
    (the MaxText trade-off); jax_ep's default capacity does not."""
    r, t = 4, 8
    cfg = moe.MoEConfig(num_experts=8, hidden=8, ffn=8, topk=2)
    params = moe.init_params(jax.random.key(0), cfg)
    params["router"] = params["router"].at[:, :2].add(5.0)  # every token prefers experts 0 and 1
    x = jnp.abs(jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)))
    mesh = make_mesh(r)

    def run(layer):
        return jax.jit(jax.shard_map(lambda p, x: layer(p, x, cfg)[0], mesh=mesh,
                                     in_specs=(moe.param_specs(cfg), P(AXIS)), out_specs=P(AXIS)))(params, x)

    with jax.set_mesh(mesh):
        full = run(moe.moe_layer)
        dropped = run(lambda p, x, c: baseline_moe.baseline_moe_layer(p, x, c, capacity_factor=0.5))
    rows_zero = np.all(np.asarray(dropped) == 0, axis=1)
    assert rows_zero.any() and not np.all(np.asarray(full) == 0, axis=1).any()
