"""Overflow rounds (jax_ep.rounds): the plan against a numpy model of repeated
dispatches, every row served exactly once and bitwise as the worst-case
dispatch places it, outputs and gradients equal to worst-case capacity, the
max_rounds drop count, and the MoE core's capacity_factor option."""

import dataclasses
import functools
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax import test_util as jtu

import jax_ep
from jax_ep import moe
from jax_ep import rounds as rd
import np_reference as npr
from conftest import AXIS, ROUTING_FAMILIES, make_mesh, random_routing, run_ranks

T, K, E, H = 16, 4, 16, 8


def _routing(kind, rng, r, t=T, k=K, e=E):
    if kind in ROUTING_FAMILIES:
        return random_routing(rng, r, t, k, e, **ROUTING_FAMILIES[kind])
    if kind == "skewed":  # 90 % of the tokens pick only rank 0's experts
        local = e // r
        out = []
        for ids in random_routing(rng, r, t, k, e, mask_prob=0.0):
            hot = rng.random(t) < 0.9
            pick = np.stack([rng.choice(e if local < k else local, k, replace=False) for _ in range(t)])
            out.append(np.where(hot[:, None], pick, ids).astype(np.int32))
        return out
    if kind == "one_expert":  # every slot of every token names expert 3
        return [np.full((t, k), 3, np.int32) for _ in range(r)]
    raise ValueError(kind)


def _rows(recv_x, idx, w, src_rank, src_token, layout):
    """{(source rank, token[, local expert]): (x row, idx row, weight row)} of a receive buffer."""
    out = {}
    for c in np.nonzero(src_rank >= 0)[0]:
        key = (int(src_rank[c]), int(src_token[c]))
        if layout == "expert_major":
            key += (int(idx[c][idx[c] >= 0][0]),)
        out[key] = (recv_x[c], idx[c], w[c])
    return out


@functools.cache
def _rounds_program(r, layout, alignment, factor, max_rounds):
    """Jitted: dispatch round by round (a scan over every allowed round) and once at the worst case."""
    c = jax_ep.capacity_for_factor(factor, num_tokens=T, num_topk=K, num_experts=E, num_ranks=r, layout=layout,
                                   expert_alignment=alignment)
    opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=c, expert_alignment=alignment)
    worst = dataclasses.replace(opts, num_max_recv_tokens=None)
    bound = max_rounds or rd.rounds_to_never_drop(c, num_tokens=T, num_topk=K, num_experts=E, num_ranks=r,
                                                  layout=layout, expert_alignment=alignment)

    def fn(x, idx, w):
        x, idx, w = x[0], idx[0], w[0]
        plan = jax_ep.plan_rounds(idx, num_experts=E, options=opts, max_rounds=max_rounds)

        def one(_, rnd):
            o = jax_ep.dispatch(x, plan.topk_idx_of(idx, rnd), plan.weights_of(w, rnd), num_experts=E, options=opts)
            return None, (o.recv_x, o.recv_topk_idx, o.recv_topk_weights, o.handle.recv_src_rank,
                          o.handle.recv_src_token, o.num_dropped)

        _, per_round = jax.lax.scan(one, None, jnp.arange(bound))
        o = jax_ep.dispatch(x, idx, w, num_experts=E, options=worst)
        whole = (o.recv_x, o.recv_topk_idx, o.recv_topk_weights, o.handle.recv_src_rank, o.handle.recv_src_token)
        return jax.tree.map(lambda a: a[None], (plan, per_round, whole))

    mesh = make_mesh(r)
    return c, mesh, jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(AXIS),) * 3, out_specs=P(AXIS)))


def _run_rounds_vs_worst(r, idxs, xs, ws, layout, alignment, factor, max_rounds):
    c, mesh, f = _rounds_program(r, layout, alignment, factor, max_rounds)
    with jax.set_mesh(mesh):
        return c, jax.tree.map(np.asarray, f(np.stack(xs), np.stack(idxs), np.stack(ws)))


ROUTINGS = ["uniform", "skewed", "one_expert", "masked", "duplicates"]


@pytest.mark.parametrize("r,layout,alignment", [(1, "expert_major", 4), (2, "expert_major", 4),
                                               (4, "expert_major", 4), (8, "expert_major", 4),
                                               (2, "rank_major", 1), (8, "rank_major", 1)])
def test_rounds_serve_every_row_once_as_worst_case(r, layout, alignment, rng):
    """Across routings: the plan equals the numpy model of repeated dispatches,
    no round but the last drops, and the rounds' rows together are exactly the
    worst-case buffer's rows, bitwise (x, ids, weights), each once."""
    seen_rounds = set()
    for kind in ROUTINGS:
        idxs = _routing(kind, rng, r)
        xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(r)]
        ws = [rng.random((T, K)).astype(np.float32) for _ in range(r)]
        c, (plan, per_round, whole) = _run_rounds_vs_worst(r, idxs, xs, ws, layout, alignment, 1.0, None)
        model_round, model_n, model_dropped = npr.dispatch_rounds(idxs, E, c, alignment, layout, max_rounds=10**6)
        n = int(plan.num_rounds[0])
        assert (plan.num_rounds == n).all(), kind  # every rank runs the same rounds
        assert n == model_n, kind
        seen_rounds.add(n)
        for s in range(r):
            np.testing.assert_array_equal(plan.slot_round[s], model_round[s], err_msg=kind)
        assert (plan.num_dropped == 0).all() and model_dropped == [0] * r
        recv_x, idx, w, src_rank, src_token, dropped = per_round
        assert (dropped == 0).all(), kind
        for d in range(r):
            want = _rows(whole[0][d], whole[1][d], whole[2][d], whole[3][d], whole[4][d], layout)
            got = {}
            for rnd in range(recv_x.shape[1]):
                if rnd >= n:
                    assert (src_rank[d, rnd] < 0).all()  # rounds past the plan carry nothing
                rows = _rows(recv_x[d, rnd], idx[d, rnd], w[d, rnd], src_rank[d, rnd], src_token[d, rnd], layout)
                assert not set(rows) & set(got), (kind, rnd)  # each row in one round only
                got.update(rows)
            assert got.keys() == want.keys(), kind
            for key, (gx, gi, gw) in got.items():
                wx, wi, ww = want[key]
                np.testing.assert_array_equal(gx, wx)
                np.testing.assert_array_equal(gi, wi)
                np.testing.assert_array_equal(gw, ww)
    if r > 1:
        assert max(seen_rounds) > 1  # the routings did overflow


def test_max_rounds_reached_drops_and_counts(rng):
    """With max_rounds below the need the last round keeps what fits and drops
    the rest, counted as a plain dispatch counts; max_rounds=1 is a plain
    dispatch at the factor's capacity."""
    r, layout, alignment = 4, "expert_major", 4
    idxs = _routing("one_expert", rng, r)
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(r)]
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(r)]
    for max_rounds in (1, 2):
        c, (plan, per_round, _) = _run_rounds_vs_worst(r, idxs, xs, ws, layout, alignment, 0.25, max_rounds)
        model_round, model_n, model_dropped = npr.dispatch_rounds(idxs, E, c, alignment, layout, max_rounds)
        assert model_n == max_rounds and sum(model_dropped) > 0
        np.testing.assert_array_equal(plan.num_rounds, [max_rounds] * r)
        np.testing.assert_array_equal(plan.num_dropped, model_dropped)
        np.testing.assert_array_equal(per_round[5][:, max_rounds - 1], model_dropped)  # the last dispatch's count
        for s in range(r):
            np.testing.assert_array_equal(plan.slot_round[s], model_round[s])


def test_capacity_for_factor_and_bound():
    kw = dict(num_tokens=4096, num_topk=8, num_experts=256, num_ranks=8)
    worst = 8 * 4096 * 8 + 32 * 7
    assert jax_ep.capacity_for_factor(1.0, **kw, expert_alignment=8) == 4096 * 8 + 32 * 7
    assert jax_ep.capacity_for_factor(1.25, **kw, expert_alignment=8) == 40960 + 32 * 7
    assert jax_ep.capacity_for_factor(100.0, **kw, expert_alignment=8) == worst
    assert rd.rounds_to_never_drop(40960 + 32 * 7, **kw, expert_alignment=8) == 7
    # Rank-major: R*T*(1 - C(E-E/R, K)/C(E, K)) expected rows.
    c = jax_ep.capacity_for_factor(1.0, **kw, layout="rank_major")
    assert 5.2 * 4096 < c < 5.4 * 4096
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        jax_ep.capacity_for_factor(0.0, **kw)
    with pytest.raises(ValueError, match="max_rounds must be a positive int"):
        run_ranks(lambda i: jax_ep.plan_rounds(i, num_experts=4, max_rounds=0).num_rounds, 2,
                  [np.zeros((2, 1), np.int32)] * 2)


def test_check_grads_through_rounds(rng):
    """check_grads (reverse mode) through a round function whose later rounds
    run in the custom-VJP while loop: gradients to params, x and weights."""
    r, c = 4, 8
    idxs = _routing("skewed", rng, r, t=6, k=2, e=8)
    opts = jax_ep.NormalOptions(layout="expert_major", num_max_recv_tokens=c, expert_alignment=2)
    x0 = rng.standard_normal((r * 6, 4)).astype(np.float32)
    w0 = rng.random((r * 6, 2)).astype(np.float32)
    p0 = rng.standard_normal((8, 4, 4)).astype(np.float32)
    mesh = make_mesh(r)
    idx = jnp.asarray(np.concatenate(idxs))

    def round_fn(p, x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=8, options=opts)
        y = jax.lax.ragged_dot(o.recv_x, p, o.expert_group_sizes)
        return jax_ep.combine(jnp.tanh(y) * jnp.sum(o.recv_topk_weights, -1, keepdims=True), o.handle)

    def local(p, x, i, w):
        plan = jax_ep.plan_rounds(i, num_experts=8, options=opts)
        return jax_ep.sum_over_rounds(round_fn, p, x, i, w, plan), plan.num_rounds[None]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) * 4, out_specs=(P(AXIS), P(AXIS)))
    with jax.set_mesh(mesh):
        assert int(jax.jit(f)(p0, x0, idx, w0)[1].max()) >= 2
        loss = jax.jit(lambda p, x, w: jnp.sum(f(p, x, idx, w)[0] ** 2))
        jtu.check_grads(loss, (p0, x0, w0), order=1,
                                  modes=("rev",), atol=5e-2, rtol=5e-2)


# --- the MoE core's option --------------------------------------------------------------


def _skewed_params(cfg, r):
    """Router that sends most tokens to rank 0's experts (x[:, 0] is large)."""
    params = moe.init_params(jax.random.key(0), cfg)
    params["router"] = params["router"].at[0, : cfg.num_experts // r].add(4.0)
    return params


def _layer(cfg, mesh, with_rounds=False):
    specs = moe.param_specs(cfg)

    def local(p, x):
        routing = moe.route(x, p["router"], cfg)
        y, plan = moe.normal_experts(x, p, routing, cfg, with_rounds=True)
        return y, plan.num_rounds[None], plan.num_dropped[None]

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS),) * 3)


@pytest.mark.parametrize("r,skew", [(2, False), (8, True)])
def test_moe_capacity_factor_matches_worst_case(r, skew):
    """Values and gradients of the layer with capacity_factor (rounds) equal the
    worst-case capacity's: to float32 rounding (rounds add in another order)."""
    t = 8
    cfg = moe.MoEConfig(num_experts=16, hidden=8, ffn=12, topk=2, expert_alignment=4)
    params = _skewed_params(cfg, r) if skew else moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)).at[:, 0].add(3.0 if skew else 0.0)
    mesh = make_mesh(r)
    results = {}
    for name, c in [("worst", cfg), ("rounds", dataclasses.replace(cfg, capacity_factor=1.0))]:
        layer = _layer(c, mesh)

        def loss(p, x):
            y, n, d = layer(p, x)
            return jnp.sum(jnp.sin(y)), (y, n, d)

        with jax.set_mesh(mesh):
            results[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (_, (y0, n0, d0)), g0 = results["worst"]
    (_, (y1, n1, d1)), g1 = results["rounds"]
    assert (np.asarray(n0) == 1).all() and (np.asarray(d0) == 0).all() and (np.asarray(d1) == 0).all()
    assert (np.asarray(n1) > 1).all() if skew else (np.asarray(n1) >= 1).all()
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_moe_max_rounds_one_is_todays_dropping_dispatch():
    """capacity_factor with max_rounds=1 is a plain dispatch at that capacity:
    the same output and drop count as capacity=C."""
    r, t = 4, 8
    cfg = moe.MoEConfig(num_experts=16, hidden=8, ffn=12, topk=2, expert_alignment=4)
    params = _skewed_params(cfg, r)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)).at[:, 0].add(3.0)
    c = jax_ep.capacity_for_factor(1.0, num_tokens=t, num_topk=2, num_experts=16, num_ranks=r, expert_alignment=4)
    mesh = make_mesh(r)
    with jax.set_mesh(mesh):
        y1, n1, d1 = jax.jit(_layer(dataclasses.replace(cfg, capacity_factor=1.0, max_rounds=1), mesh))(params, x)
        y0, n0, d0 = jax.jit(_layer(dataclasses.replace(cfg, capacity=c), mesh))(params, x)
    assert int(np.sum(d0)) > 0
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d0))
    np.testing.assert_array_equal(np.asarray(n1), 1)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-6, atol=1e-6)


def test_moe_rounds_under_scan_and_jit():
    """Two stacked layers in a lax.scan with capacity_factor: value and grad
    equal the worst case's."""
    r, t = 4, 8
    cfg = moe.MoEConfig(num_experts=8, hidden=8, ffn=8, topk=2, expert_alignment=2)
    layers = [_skewed_params(cfg, r), moe.init_params(jax.random.key(5), cfg)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)).at[:, 0].add(3.0)
    mesh = make_mesh(r)
    specs = jax.tree.map(lambda s: P(None, *s), moe.param_specs(cfg))

    def model(c):
        def local(ps, x):
            def step(h, p):
                y, aux = moe.moe_layer(p, h, c)
                return h + y, aux
            h, aux = jax.lax.scan(step, x, ps)
            return h, aux
        f = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))
        def loss(ps, x):
            h, aux = f(ps, x)
            return jnp.sum(h ** 2) + jnp.sum(aux)

        return jax.jit(jax.value_and_grad(loss))

    with jax.set_mesh(mesh):
        v0, g0 = model(cfg)(stacked, x)
        v1, g1 = model(dataclasses.replace(cfg, capacity_factor=1.0))(stacked, x)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_moe_config_rounds_validation():
    base = dict(num_experts=8, hidden=8, ffn=8)
    with pytest.raises(ValueError, match="not both"):
        moe.MoEConfig(**base, capacity=64, capacity_factor=1.25)
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        moe.MoEConfig(**base, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="max_rounds must be a positive int"):
        moe.MoEConfig(**base, capacity_factor=1.0, max_rounds=0)
    with pytest.raises(ValueError, match="needs capacity or capacity_factor"):
        moe.MoEConfig(**base, max_rounds=3)
    with pytest.raises(ValueError, match="mode='normal'"):
        moe.MoEConfig(**base, mode="low_latency", capacity_factor=1.0)
    assert moe.MoEConfig(**base, capacity=64, max_rounds=3).uses_rounds
    assert not moe.MoEConfig(**base, capacity=64).uses_rounds
    with pytest.raises(ValueError, match="needs num_tokens and num_ranks"):
        moe.MoEConfig(**base, capacity_factor=1.0).normal_options()


# --- the Flax and Equinox layers ----------------------------------------------------


def _layer_outputs(make, call_mapped, grad):
    """Outputs and grads of a framework layer, worst case vs capacity_factor=1.0 (same weights, skewed)."""
    r, t = 4, 8
    cfg = moe.MoEConfig(num_experts=8, hidden=8, ffn=8, topk=2, expert_alignment=2)
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)).at[:, 0].add(3.0)
    mesh = make_mesh(r)
    out = []
    for c in (cfg, dataclasses.replace(cfg, capacity_factor=1.0)):
        model = make(c, r, mesh)
        with jax.set_mesh(mesh):
            out.append(grad(lambda m: jnp.sum(call_mapped(m, x, mesh) ** 2), model))
    (v0, g0), (v1, g1) = out
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_flax_layer_capacity_factor():
    pytest.importorskip("flax")
    from flax import nnx
    import jax_ep.flax as fx

    def make(c, r, mesh):
        model = fx.MoE(c, rngs=nnx.Rngs(0))
        model.router[...] = model.router[...].at[0, : c.num_experts // r].add(4.0)
        return fx.shard_model(model, mesh)

    def call(m, x, mesh):
        return fx.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh, in_specs=(P(AXIS),), out_specs=P(AXIS))

    _layer_outputs(make, call, lambda f, m: nnx.jit(nnx.value_and_grad(f))(m))


def test_equinox_layer_capacity_factor():
    eqx = pytest.importorskip("equinox")
    import jax_ep.equinox as ex

    def make(c, r, mesh):
        model = ex.MoE(c, key=jax.random.key(0))
        model = eqx.tree_at(lambda m: m.router, model, model.router.at[0, : c.num_experts // r].add(4.0))
        return ex.shard_model(model, mesh)

    def call(m, x, mesh):
        return ex.ep_shard_map(lambda m, x: m(x)[0], m, x, mesh=mesh, in_specs=(P(AXIS),), out_specs=P(AXIS))

    _layer_outputs(make, call, lambda f, m: eqx.filter_jit(eqx.filter_value_and_grad(f))(m))


# --- the CUDA backend: lowering (no GPU needed) ----------------------------------------


def _lower_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _fake_cuda_buffer(monkeypatch, r):
    from jax_ep import _extension, runtime

    if not _extension.available():
        pytest.skip(_extension.unavailable_reason() or "no CUDA extension")
    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: types.SimpleNamespace(num_ranks=r, rank=0))


def test_moe_rounds_lower_for_cuda(monkeypatch):
    """The layer with capacity_factor on the CUDA backend, forward + backward:
    the kernels' dispatch runs for round 0, in the later rounds' while loop,
    and again in the backward's while loop; no other kernel is needed."""
    r = 2
    _fake_cuda_buffer(monkeypatch, r)
    mesh = make_mesh(r)
    cfg = moe.MoEConfig(num_experts=8, hidden=128, ffn=64, topk=2, backend="cuda", buffer_id=3, capacity_factor=1.25)
    specs = moe.param_specs(cfg)
    f = jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg), mesh=mesh, in_specs=(specs, P(AXIS)),
                      out_specs=(P(AXIS), P()))
    p = {n: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=jax.NamedSharding(mesh, specs[n]))
         for n, s in moe.param_shapes(cfg).items()}
    x = jax.ShapeDtypeStruct((r * 16, cfg.hidden), jnp.bfloat16, sharding=jax.NamedSharding(mesh, P(AXIS)))
    with jax.set_mesh(mesh):
        text = _lower_for_cuda(jax.grad(lambda p, x: jnp.sum(f(p, x)[0].astype(jnp.float32) ** 2), (0, 1)), p, x)
    assert text.count("stablehlo.custom_call @jax_ep_intranode_dispatch(") == 3
    assert text.count("stablehlo.while") >= 3  # the plan, the later rounds, their backward
    c = jax_ep.capacity_for_factor(1.25, num_tokens=16, num_topk=2, num_experts=8, num_ranks=r, expert_alignment=8)
    assert f"capacity = {c} : i64" in text


def test_plan_rounds_without_axis_lowers_for_cuda(monkeypatch):
    """One process per rank (axis_name=None): the counts travel through a
    one-token rank-major dispatch of the kernels instead of a psum."""
    r, t, k, e = 4, 16, 2, 8
    _fake_cuda_buffer(monkeypatch, r)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: r)
    opts = jax_ep.NormalOptions(layout="expert_major", num_max_recv_tokens=24, expert_alignment=4, backend="cuda",
                                buffer_id=3)

    def fn(x, idx, w):
        plan = jax_ep.plan_rounds(idx, num_experts=e, axis_name=None, options=opts)

        def round_fn(_, x, i, w):
            o = jax_ep.dispatch(x, i, w, num_experts=e, axis_name=None, options=opts)
            return jax_ep.combine(o.recv_x * jnp.sum(o.recv_topk_weights, -1, keepdims=True), o.handle)

        return jax_ep.sum_over_rounds(round_fn, None, x, idx, w, plan)

    text = _lower_for_cuda(fn, jax.ShapeDtypeStruct((t, 128), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32),
                           jax.ShapeDtypeStruct((t, k), jnp.float32))
    assert "all_reduce" not in text
    dispatches = [line for line in text.splitlines() if "@jax_ep_intranode_dispatch(" in line]
    assert len(dispatches) == 3  # the counts' gather, round 0, the later rounds
    assert sum(f"capacity = {r} : i64" in line and "layout = 0 : i64" in line for line in dispatches) == 1


@pytest.mark.parametrize("param_grad_dtype", [None, jnp.float32])
def test_rounds_hold_no_float32_copy_of_bfloat16_parameter_gradients(rng, param_grad_dtype):
    """Where the experts' weights dominate (here 2 MiB of bfloat16 per rank
    against a few KiB of rows), the backward pass through the rounds holds no
    more temporaries than one plain dispatch at worst-case capacity: the
    parameters' gradients add up in their own dtype, not in a float32 copy
    (which alone would be twice the weights). ``param_grad_dtype=float32``
    asks for that copy: about one more weight's bytes. The gradients keep the
    parameters' dtype and equal the plain dispatch's to bfloat16 rounding."""
    r, c, g, h = 2, 8, 8, 512
    idxs = _routing("skewed", rng, r, t=6, k=2, e=g)
    x0 = jnp.asarray(rng.standard_normal((r * 6, h)), jnp.bfloat16)
    w0 = jnp.asarray(rng.random((r * 6, 2)), jnp.float32)
    p0 = jnp.asarray(rng.standard_normal((g, h, h)) / h, jnp.bfloat16)
    mesh = make_mesh(r)
    idx = jnp.asarray(np.concatenate(idxs))

    def compiled(capacity):
        opts = jax_ep.NormalOptions(layout="expert_major", num_max_recv_tokens=capacity, expert_alignment=2)

        def round_fn(p, x, i, w):
            o = jax_ep.dispatch(x, i, w, num_experts=g, options=opts)
            y = jax.lax.ragged_dot(o.recv_x, p, o.expert_group_sizes)
            return jax_ep.combine(y * jnp.sum(o.recv_topk_weights, -1, keepdims=True).astype(y.dtype), o.handle)

        def local(p, x, i, w):
            if capacity is None:  # one plain dispatch, no rounds
                return round_fn(p, x, i, w), jnp.ones((1,), jnp.int32)
            plan = jax_ep.plan_rounds(i, num_experts=g, options=opts)
            return (jax_ep.sum_over_rounds(round_fn, p, x, i, w, plan, param_grad_dtype=param_grad_dtype),
                    plan.num_rounds[None])

        f = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) * 4, out_specs=(P(AXIS), P(AXIS)))
        step = jax.jit(jax.grad(lambda p, x, w: jnp.sum(f(p, x, idx, w)[0].astype(jnp.float32) ** 2), (0, 1, 2)))
        return jax.jit(f)(p0, x0, idx, w0)[1], step(p0, x0, w0), step.lower(p0, x0, w0).compile().memory_analysis()

    with jax.set_mesh(mesh):
        n1, g1, m1 = compiled(None)
        n2, g2, m2 = compiled(c)
    assert int(n1.max()) == 1 and int(n2.max()) >= 2
    assert [a.dtype for a in g2] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for a, b in zip(g2, g1, strict=True):
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=2e-2 * np.abs(b).max())
    per_rank_weights = p0.nbytes // r
    extra = m2.temp_size_in_bytes - m1.temp_size_in_bytes
    if param_grad_dtype is None:
        assert extra < 0.5 * per_rank_weights, (m2.temp_size_in_bytes, m1.temp_size_in_bytes, per_rank_weights)
    else:
        assert 0.5 * per_rank_weights < extra < 2.5 * per_rank_weights, (extra, per_rank_weights)


def test_sum_over_rounds_refuses_a_non_float_param_grad_dtype():
    plan = rd.DispatchRounds(jnp.zeros((2, 1), jnp.int32), jnp.int32(1), jnp.int32(0))
    with pytest.raises(ValueError, match="param_grad_dtype must be a float dtype"):
        jax_ep.sum_over_rounds(lambda p, x, i, w: x, None, jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32),
                               jnp.ones((2, 1)), plan, param_grad_dtype=jnp.int32)
