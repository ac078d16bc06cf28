"""Overflow rounds on the CUDA kernels, R rank processes, against worst-case capacity.

Run through the launcher (one process per rank, ranks may share a GPU under MPS):

    python -m jax_ep.launch -n 4 tests/gpu/multirank_rounds.py

Every rank builds the same seeded global routing, plans the rounds with
``jax_ep.plan_rounds(axis_name=None)`` (the counts travel through the
kernels' own dispatch: no XLA collective, so ranks may share a GPU), runs
``jax_ep.sum_over_rounds`` of dispatch -> weight -> combine at a capacity
factor, and compares with one dispatch at the worst-case capacity: the plan
with the numpy model of repeated dispatches (exact), the outputs and the
gradients to x and the weights (DeepEP's calc_diff). Prints PASS/FAIL per
check; exits 1 if any failed.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu.rank_checks import Checks, calc_diff  # noqa: E402

R, ME = info.num_ranks, info.rank
checks = Checks()
check = checks


def global_inputs(seed, t, k, e, h, skewed):
    """Every rank's (x, topk_idx, topk_weights); skewed: 90 % of tokens pick rank 0's experts."""
    rng = np.random.default_rng(seed)
    local = e // R
    idxs, xs, ws = [], [], []
    for _ in range(R):
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        if skewed:
            hot = rng.random(t) < 0.9
            ids = np.where(hot[:, None], np.stack([rng.choice(local, k, replace=False) for _ in range(t)]), ids)
        idxs.append(ids.astype(np.int32))
        xs.append(rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((t, k)).astype(np.float32))
    return xs, idxs, ws


def run_rounds_case(name, seed, t, k, e, h, alignment, factor, skewed):
    xs, idxs, ws = global_inputs(seed, t, k, e, h, skewed)
    worst = R * t * min(k, e // R) + (e // R) * (alignment - 1)
    buf = jax_ep.Buffer(num_experts=e, axis_name=None,
                        num_nvl_bytes=jax_ep.intranode_buffer_bytes(t, h, R, k, e, capacity=worst),
                        normal=jax_ep.NormalOptions(backend="cuda", num_sms=max(4, 96 // R)), timeout_s=60.0)
    c = jax_ep.capacity_for_factor(factor, num_tokens=t, num_topk=k, num_experts=e, num_ranks=R,
                                   expert_alignment=alignment)
    opts = dataclasses.replace(buf.normal, layout="expert_major", num_max_recv_tokens=c, expert_alignment=alignment)
    worst_opts = dataclasses.replace(opts, num_max_recv_tokens=None)

    def round_fn(_, x, i, w, options=opts):
        o = jax_ep.dispatch(x, i, w, num_experts=e, axis_name=None, options=options)
        y = o.recv_x * jnp.sum(o.recv_topk_weights, -1, keepdims=True).astype(o.recv_x.dtype)
        return jax_ep.combine(y, o.handle)

    g = np.random.default_rng(99 + ME).standard_normal((t, h)).astype(np.float32)

    @jax.jit
    def rounds(x, i, w):
        plan = jax_ep.plan_rounds(i, num_experts=e, axis_name=None, options=opts)
        y, vjp = jax.vjp(lambda x, w: jax_ep.sum_over_rounds(round_fn, None, x, i, w, plan), x, w)
        return y, plan, vjp(g.astype(y.dtype))

    @jax.jit
    def whole(x, i, w):
        y, vjp = jax.vjp(lambda x, w: round_fn(None, x, i, w, worst_opts), x, w)
        return y, vjp(g.astype(y.dtype))

    y, plan, (gx, gw) = rounds(xs[ME], idxs[ME], ws[ME])
    y0, (gx0, gw0) = whole(xs[ME], idxs[ME], ws[ME])
    model_round, model_n, _ = npr.dispatch_rounds(idxs, e, c, alignment, "expert_major", max_rounds=10**6)
    np.testing.assert_array_equal(np.asarray(plan.slot_round), model_round[ME], err_msg=f"{name}: slot rounds")
    assert int(plan.num_rounds) == model_n, (name, int(plan.num_rounds), model_n)
    assert int(plan.num_dropped) == 0
    if skewed:
        assert model_n > 1, (name, model_n)
    for what, a, b in (("y", y, y0), ("grad x", gx, gx0), ("grad w", gw, gw0)):
        diff = calc_diff(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert diff < 1e-5, f"{name}: {what} calc_diff {diff}"
    print(f"  {name}: C = {c} of {worst}, {model_n} round(s)", flush=True)
    buf.destroy()


@check("rounds_uniform_factor_1_25")
def _():
    run_rounds_case("rounds_uniform_factor_1_25", 1, 256, 8, 32 * R, 1024, alignment=16, factor=1.25, skewed=False)


@check("rounds_uniform_factor_1_0")
def _():
    run_rounds_case("rounds_uniform_factor_1_0", 2, 256, 8, 32 * R, 1024, alignment=16, factor=1.0, skewed=False)


@check("rounds_skewed_factor_1_25")
def _():
    run_rounds_case("rounds_skewed_factor_1_25", 3, 256, 8, 32 * R, 1024, alignment=16, factor=1.25, skewed=True)


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
