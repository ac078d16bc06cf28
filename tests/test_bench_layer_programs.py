"""The layer benchmarks' programs on CPU: profile_layer.py runs end to end at
a tiny shape; dropless_gpu.py's step (its loss over the expert block, with
and without overflow rounds) equals the layer's own expert block."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax_ep import moe
from conftest import AXIS, make_mesh

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCH)

import dropless_gpu  # noqa: E402


def test_profile_layer_runs_on_cpu(tmp_path):
    out = tmp_path / "p.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(BENCH, ".."))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "profile_layer.py"), "--platform", "cpu",
                           "--tokens", "16", "--hidden", "8", "--ffn", "16", "--experts", "4", "--topk", "2",
                           "--reps", "1", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    pieces = {(r["variant"], r["piece"]) for r in rows}
    assert ("layer", "moe_layer (total)") in pieces and ("baseline", "baseline layer (total)") in pieces
    assert ("dispatch/xla", "dispatch") in pieces and ("local", "experts on the 32 exact rows") in pieces
    assert all(r["fwd_bwd_ms"] is not None for r in rows if "total" in r["piece"] and "twice" not in r["piece"])
    assert "moe_layer (total)" in proc.stdout


@pytest.mark.parametrize("factor,matmul", [(None, "auto"), (0.5, "auto"), (0.5, "grouped")])
def test_dropless_gpu_step_equals_the_layers_expert_block(factor, matmul):
    r, t = 2, 12
    cfg = moe.MoEConfig(num_experts=8, hidden=8, ffn=16, topk=3, expert_alignment=4, capacity_factor=factor,
                        expert_matmul=matmul)
    opts = cfg.normal_options(num_tokens=t, num_ranks=r) if factor is not None else cfg.normal_options()
    params = {k: v for k, v in moe.init_params(jax.random.key(0), cfg).items() if k != "router"}
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.argsort(rng.random((r * t, cfg.num_experts)), -1)[:, :cfg.topk].astype(np.int32))
    w = jnp.asarray(rng.random((r * t, cfg.topk)).astype(np.float32))
    x = jax.random.normal(jax.random.key(1), (r * t, cfg.hidden))
    mesh = make_mesh(r)
    specs = {k: P(AXIS) for k in params}
    bench_loss = dropless_gpu.make_loss(cfg, opts, AXIS)

    def layer_loss(p, x, i, w):
        y, plan = moe.normal_experts(x, p, moe.Routing(None, w, i), cfg, with_rounds=True)
        return jnp.sum(y.astype(jnp.float32) ** 2), plan.num_rounds

    def run(loss):
        f = jax.shard_map(lambda p, x, i, w: (lambda v, g: (v[0][None], v[1][None], g))(
            *jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x, i, w)),
            mesh=mesh, in_specs=(specs, P(AXIS), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS), P(AXIS), (specs, P(AXIS))), check_vma=False)
        with jax.set_mesh(mesh):
            return jax.jit(f)(params, x, idx, w)

    (l, n, g), (l_ref, n_ref, g_ref) = run(bench_loss), run(layer_loss)
    np.testing.assert_allclose(np.asarray(l), np.asarray(l_ref), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(n), np.asarray(n_ref))
    assert int(np.asarray(n).max()) == (1 if factor is None else int(np.asarray(n_ref).max()))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_dropless_gpu_arguments():
    a = dropless_gpu.parse_args([])
    assert (a.factor, a.tokens, a.hidden, a.experts, a.topk) == (None, 4096, 7168, 256, 8)
    assert dropless_gpu.label(a.factor) == "worst" and a.expert_matmul == "auto"
    b = dropless_gpu.parse_args(["--capacity-factor", "1.25", "--expert-matmul", "grouped"])
    assert b.expert_matmul == "grouped"
    assert b.factor == 1.25 and dropless_gpu.label(b.factor) == "f1.25"
