"""The framework-free MoE core (jax_ep.moe): normal and low-latency expert
blocks against the dense single-device reference (outputs and gradients, aux
loss included), group-limited gating, the load-balancing loss formula, FP8
low-latency inference, config validation, the optional-framework imports."""

import dataclasses
import importlib
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import moe
from conftest import AXIS, make_mesh


def _sharded_loss(cfg, mesh):
    specs = moe.param_specs(cfg)

    def loss(params, x):
        y, aux = jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg), mesh=mesh,
                               in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))(params, x)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, (y, aux)
    return loss


def _reference_loss(cfg):
    def loss(params, x):
        y, aux = moe.moe_reference(params, x, cfg)
        return jnp.sum(jnp.sin(y)) + 0.1 * aux, (y, aux)
    return loss


def _value_grad(loss, params, x):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("r,activation,grouped", [(2, "gelu", False), (8, "swiglu", True)])
def test_modes_match_dense_reference(r, activation, grouped):
    """Both expert-parallel modes equal the dense reference, values and grads."""
    t = 6
    cfg = moe.MoEConfig(num_experts=16, hidden=16, ffn=24, topk=3, activation=activation, expert_alignment=4,
                        **({"n_group": 4, "topk_group": 2} if grouped else {}))
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden))
    (ref_loss, (ref_y, ref_aux)), ref_g = _value_grad(_reference_loss(cfg), params, x)
    mesh = make_mesh(r)
    with jax.set_mesh(mesh):
        for mode in ("normal", "low_latency"):
            c = dataclasses.replace(cfg, mode=mode)
            (loss, (y, aux)), g = _value_grad(_sharded_loss(c, mesh), params, x)
            np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5, err_msg=mode)
            np.testing.assert_allclose(float(aux), float(ref_aux), rtol=1e-6, err_msg=mode)
            np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=mode)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5, err_msg=mode)


def test_leading_axes_and_bfloat16():
    """x [B, S, H] in bfloat16 keeps its shape and dtype; close to float32."""
    r = 4
    cfg = moe.MoEConfig(num_experts=8, hidden=16, ffn=16, topk=2)
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * 2, 3, cfg.hidden))
    mesh = make_mesh(r)
    f = jax.jit(jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg)[0], mesh=mesh,
                              in_specs=(moe.param_specs(cfg), P(AXIS)), out_specs=P(AXIS)))
    with jax.set_mesh(mesh):
        y = f(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16))
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    ref = moe.moe_reference(params, x, cfg)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.1, rtol=0.1)


def test_group_limited_gating_picks_from_chosen_groups():
    cfg = moe.MoEConfig(num_experts=32, hidden=8, ffn=8, topk=4, n_group=8, topk_group=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    router = (3 * rng.standard_normal((8, 32))).astype(np.float32)
    r = moe.route(jnp.asarray(x), jnp.asarray(router), cfg)
    probs, idx, w = np.asarray(r.probs), np.asarray(r.idx), np.asarray(r.weights)

    logits = x.astype(np.float64) @ router
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, p, rtol=1e-5, atol=1e-7)
    group_size = 32 // 8
    differs = 0
    for t in range(64):
        grouped = p[t].reshape(8, group_size)
        score = np.sort(grouped, axis=1)[:, -2:].sum(1)
        groups = set(np.argsort(-score)[:3].tolist())
        assert {int(e) // group_size for e in idx[t]} <= groups, (t, idx[t], groups)
        allowed = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in sorted(groups)])
        best = allowed[np.argsort(-p[t, allowed])[:4]]
        assert set(idx[t].tolist()) == set(best.tolist())
        differs += set(idx[t].tolist()) != set(np.argsort(-p[t])[:4].tolist())
        np.testing.assert_allclose(w[t], p[t, idx[t]] / p[t, idx[t]].sum(), rtol=1e-5)
    assert differs > 0  # the group limit changed some choices


def test_plain_topk_router_renormalises():
    cfg = moe.MoEConfig(num_experts=8, hidden=4, ffn=4, topk=3)
    r = moe.route(jax.random.normal(jax.random.key(0), (10, 4)), jax.random.normal(jax.random.key(1), (4, 8)), cfg)
    np.testing.assert_array_equal(np.asarray(r.idx), np.asarray(jax.lax.top_k(r.probs, 3)[1]))
    np.testing.assert_allclose(np.asarray(r.weights).sum(1), 1.0, rtol=1e-6)
    raw = moe.route(jnp.ones((2, 4)), jnp.ones((4, 8)), dataclasses.replace(cfg, normalize_weights=False))
    np.testing.assert_allclose(np.asarray(raw.weights), 1 / 8, rtol=1e-6)


def test_aux_loss_formula_and_global_reduction():
    r, t, k, e = 4, 5, 2, 8
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((r * t, e)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(r * t)]).astype(np.int32)
    f = np.bincount(idx.ravel(), minlength=e) / idx.size
    want = e * np.sum(f * probs.mean(0))
    got = moe.load_balancing_loss(jnp.asarray(probs), jnp.asarray(idx), e)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # Uniform routing gives exactly 1.
    uni = moe.load_balancing_loss(jnp.full((8, e), 1 / e), jnp.arange(8 * k, dtype=jnp.int32).reshape(8, k) % e, e)
    np.testing.assert_allclose(float(uni), 1.0, rtol=1e-6)
    # Inside shard_map: every rank returns the global value, not its local one.
    mesh = make_mesh(r)
    fn = jax.jit(jax.shard_map(lambda p, i: moe.load_balancing_loss(p, i, e, AXIS)[None], mesh=mesh,
                               in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS)))
    with jax.set_mesh(mesh):
        per_rank = np.asarray(fn(*(jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in (probs, idx))))
    np.testing.assert_allclose(per_rank, np.full(r, want), rtol=1e-5)


def test_fp8_low_latency_inference_is_close():
    r = 2
    cfg = moe.MoEConfig(num_experts=4, hidden=128, ffn=32, topk=2, mode="low_latency",
                        fp8=moe.FP8Options(), max_tokens_per_rank=8)
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * 4, cfg.hidden)).astype(jnp.bfloat16)
    mesh = make_mesh(r)
    f = jax.jit(jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg)[0], mesh=mesh,
                              in_specs=(moe.param_specs(cfg), P(AXIS)), out_specs=P(AXIS)))
    with jax.set_mesh(mesh):
        y = f(params, x)
    ref = moe.moe_reference(params, x.astype(jnp.float32), cfg)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.1, rtol=0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="n_group"):
        moe.MoEConfig(num_experts=8, hidden=4, ffn=4, n_group=4)
    with pytest.raises(ValueError, match="divisible by n_group"):
        moe.MoEConfig(num_experts=8, hidden=4, ffn=4, n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="exceeds the experts"):
        moe.MoEConfig(num_experts=8, hidden=4, ffn=4, topk=3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="low_latency"):
        moe.MoEConfig(num_experts=8, hidden=4, ffn=4, fp8=moe.FP8Options())
    cfg = moe.MoEConfig(num_experts=8, hidden=4, ffn=4, activation="gelu")
    assert set(moe.init_params(jax.random.key(0), cfg)) == {"router", "w_up", "w_down"}
    assert moe.param_specs(cfg) == {"router": P(), "w_up": P(AXIS), "w_down": P(AXIS)}
    assert hash(cfg) == hash(dataclasses.replace(cfg))


@pytest.mark.parametrize("module,framework,extra", [("jax_ep.flax", "flax", "flax"),
                                                    ("jax_ep.equinox", "equinox", "equinox")])
def test_layer_import_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"`pip install {framework}`") as info:
        importlib.import_module(module)
    # No index serves jax_ep: the hint names the framework's own package, or
    # the extra of an install from a clone.
    assert "pip install jax_ep" not in str(info.value)
    assert f"pip install -e '.[{extra}]'" in str(info.value)
    assert extra in _pyproject()["project"]["optional-dependencies"]


def _pyproject():
    import os
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_missing_extension_hint_names_a_command_that_works_here(monkeypatch):
    """The build hint is a command for a clone of this repository: an editable
    install of the project in pyproject.toml, or the setup script."""
    import os

    from jax_ep import _extension

    monkeypatch.setattr(_extension, "_C", None)
    reason = _extension.unavailable_reason()
    assert "`pip install -e .`" in reason and "--no-build-isolation" not in reason, reason
    assert _pyproject()["project"]["name"] == "jax_ep"
    assert "`bash scripts/setup_env.sh`" in reason
    assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "scripts", "setup_env.sh"))


@pytest.mark.parametrize("field,value,error,match", [
    ("num_experts", 0, ValueError, r"MoEConfig.num_experts must be a positive int, got 0"),
    ("hidden", -4, ValueError, r"MoEConfig.hidden must be a positive int, got -4"),
    ("ffn", 2.0, ValueError, r"MoEConfig.ffn must be a positive int, got 2.0"),
    ("topk", 0, ValueError, r"MoEConfig.topk must be a positive int, got 0"),
    ("topk", 9, ValueError, r"MoEConfig.topk=9 exceeds num_experts=8"),
    ("expert_alignment", True, ValueError, r"MoEConfig.expert_alignment must be a positive int, got True"),
    ("capacity", -1, ValueError, r"MoEConfig.capacity must be a positive int or None, got -1"),
    ("capacity", 0, ValueError, r"MoEConfig.capacity must be a positive int or None, got 0"),
    ("max_tokens_per_rank", 0, ValueError, r"MoEConfig.max_tokens_per_rank must be a positive int or None"),
    ("n_group", 0, ValueError, r"MoEConfig.n_group must be a positive int or None, got 0"),
    ("topk_group", "2", ValueError, r"MoEConfig.topk_group must be a positive int or None"),
    ("activation", "relu", ValueError, r"MoEConfig.activation must be one of \('swiglu', 'gelu'\), got 'relu'"),
    ("mode", "decode", ValueError, r"MoEConfig.mode must be one of \('normal', 'low_latency'\), got 'decode'"),
    ("backend", "gpu", ValueError, r"MoEConfig.backend must be one of \('xla', 'cuda'\), got 'gpu'"),
    ("axis_name", None, TypeError, r"MoEConfig.axis_name must be the name \(str\) of the expert-parallel mesh axis"),
    ("normalize_weights", 1, TypeError, r"MoEConfig.normalize_weights must be True or False, got 1"),
    ("fp8", "e4m3", TypeError, r"MoEConfig.fp8 must be None or a jax_ep.FP8Options"),
    ("buffer_id", -1, ValueError, r"MoEConfig.buffer_id must be None or the id of a jax_ep.Buffer"),
    ("ll_buffer_id", "0", ValueError, r"MoEConfig.ll_buffer_id must be None or the id of a jax_ep.Buffer"),
    ("expert_matmul", "dense", ValueError,
     r"MoEConfig.expert_matmul must be one of \('auto', 'ragged_dot', 'grouped'\), got 'dense'"),
])
def test_config_validates_every_field(field, value, error, match):
    with pytest.raises(error, match=match):
        moe.MoEConfig(**{"num_experts": 8, "hidden": 4, "ffn": 4, field: value})


def test_experts_that_do_not_split_over_the_mesh_get_jax_eps_error():
    cfg = moe.MoEConfig(num_experts=12, hidden=4, ffn=4)
    mesh = make_mesh(8)
    params = moe.init_params(jax.random.key(0), cfg)
    match = r"MoEConfig.num_experts=12 must be divisible by the size R=8 of the EP mesh axis 'ep'.*num_experts=8 or 16"
    with pytest.raises(ValueError, match=match):
        moe.shard_params(params, mesh, cfg)
    with pytest.raises(ValueError, match=r"the mesh has no axis 'tp'"):
        moe.shard_params(params, mesh, dataclasses.replace(cfg, axis_name="tp"))
    ok = dataclasses.replace(cfg, num_experts=16)
    placed = moe.shard_params(moe.init_params(jax.random.key(0), ok), mesh, ok)
    assert placed["w_up"].sharding.spec == P(AXIS) and placed["router"].sharding.spec == P()
    assert placed["w_up"].addressable_shards[1].data.shape == (2, 4, 4)  # rank 1: experts 2 and 3


@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_layer_helpers_check_the_mesh_before_jax(framework):
    """shard_model (eagerly) and ep_shard_map (at trace time) raise jax_ep's
    error for experts that do not split over the EP axis, not JAX's."""
    pytest.importorskip(framework)
    cfg = moe.MoEConfig(num_experts=12, hidden=4, ffn=4)
    mesh = make_mesh(8)
    match = r"MoEConfig.num_experts=12 must be divisible by the size R=8 of the EP mesh axis 'ep'"
    x = jnp.zeros((16, 4))
    if framework == "flax":
        from flax import nnx

        import jax_ep.flax as epx

        layer = epx.MoE(cfg, rngs=nnx.Rngs(0))
        call = nnx.jit(lambda m, x: epx.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh,
                                                     in_specs=(P(AXIS),), out_specs=P(AXIS)))
    else:
        import equinox as eqx

        import jax_ep.equinox as epx

        layer = epx.MoE(cfg, key=jax.random.key(0))
        call = eqx.filter_jit(lambda m, x: epx.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh,
                                                            in_specs=(P(AXIS),), out_specs=P(AXIS)))
    with pytest.raises(ValueError, match=match):
        epx.shard_model(layer, mesh)
    with pytest.raises(ValueError, match=match):
        call(layer, x)
