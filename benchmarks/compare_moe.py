"""Side-by-side timing: jax_ep's MoE layer (normal and low-latency modes)
against the hand-written all_to_all baseline (baseline_moe.py).

    python benchmarks/compare_moe.py [--ranks 8 --tokens 128 --hidden 64 ...]
    python benchmarks/compare_moe.py --platform gpu --ranks 1 --tokens 4096 --hidden 2048 ...

On CPU it runs on virtual devices (``--xla_force_host_platform_device_count``):
the numbers say how the programs compare under XLA:CPU's emulated
collectives, not how they compare on GPUs. With ``--platform gpu`` it uses the
local GPUs of one process (NCCL refuses several ranks on one GPU, so on one
GPU this is the one-rank case) and adds a ``backend="cuda"`` row (at R = 1 the
normal-mode layer takes its local path, ``jax_ep.moe_local``, with either
backend; ``profile_layer.py`` times the kernels' path there). Each row is the median over
``--iters`` runs of one compiled program (forward, or forward + backward of a
scalar loss w.r.t. params and input), after a warm-up call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    return p.parse_args()


def main():
    args = parse_args()
    os.environ["JAX_PLATFORMS"] = args.platform if args.platform == "cpu" else "cuda,cpu"
    if args.platform == "cpu" and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.ranks}"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import baseline_moe
    from jax_ep import moe

    r = args.ranks
    mesh = jax.make_mesh((r,), ("ep",), devices=jax.devices()[:r], axis_types=(jax.sharding.AxisType.Auto,))
    cfg = moe.MoEConfig(num_experts=args.experts, hidden=args.hidden, ffn=args.ffn, topk=args.topk,
                        expert_alignment=8, expert_matmul="ragged_dot")
    grouped = dataclasses.replace(cfg, expert_matmul="grouped")
    specs = moe.param_specs(cfg)
    params = moe.init_params(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (r * args.tokens, args.hidden))

    import jax_ep

    layers = {
        "jax_ep normal (expert-major + ragged_dot)": lambda p, x: moe.moe_layer(p, x, cfg),
        "jax_ep normal (expert-major + grouped_matmul)": lambda p, x: moe.moe_layer(p, x, grouped),
        "jax_ep low-latency (packed + einsum)": lambda p, x: moe.moe_layer(p, x, dataclasses.replace(cfg, mode="low_latency")),
        "baseline (argsort + all_to_all + ragged_dot)": lambda p, x: baseline_moe.baseline_moe_layer(p, x, cfg),
    }
    buffer = None
    if args.platform == "gpu" and r == 1:  # backend="cuda": at R = 1 the layer's local path (jax_ep.moe_local)
        buffer = jax_ep.Buffer(num_experts=args.experts, normal=jax_ep.NormalOptions(backend="cuda"),
                               num_nvl_bytes=jax_ep.intranode_buffer_bytes(
                                   args.tokens, args.hidden, 1, args.topk, args.experts,
                                   capacity=args.tokens * args.topk + args.experts * 8, itemsize=4))
        cuda_cfg = dataclasses.replace(cfg, backend="cuda", buffer_id=buffer.normal.buffer_id)
        layers["jax_ep normal, backend='cuda'"] = lambda p, x: moe.moe_layer(p, x, cuda_cfg)
        cuda_grouped = dataclasses.replace(cuda_cfg, expert_matmul="grouped")
        layers["jax_ep normal, backend='cuda', grouped_matmul"] = lambda p, x: moe.moe_layer(p, x, cuda_grouped)

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    rows = []
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
        x = jax.device_put(x, NamedSharding(mesh, P("ep")))
        for name, layer in layers.items():
            fwd = jax.shard_map(layer, mesh=mesh, in_specs=(specs, P("ep")), out_specs=(P("ep"), P()))
            # One call for y and aux: XLA does not merge two calls of the CUDA
            # kernels (they have side effects), so calling twice runs the layer twice.
            loss = lambda p, x, fwd=fwd: (lambda y, aux: jnp.sum(y ** 2) + aux)(*fwd(p, x))
            rows.append((name, timed(jax.jit(lambda p, x, fwd=fwd: fwd(p, x)[0]), params, x),
                         timed(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)))
            print(f"[compare_moe] {name}: {rows[-1][1]:.2f} / {rows[-1][2]:.2f} ms", file=sys.stderr, flush=True)

    where = (f"CPU ONLY ({r} virtual XLA:CPU devices; not indicative of GPU performance)" if args.platform == "cpu"
             else f"{jax.devices()[0].device_kind}, {r} device(s) in one process")
    print(f"{where}: "
          f"{args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.topk}")
    width = max(len(n) for n, *_ in rows)
    print(f"{'layer':<{width}}  {'fwd ms':>8}  {'fwd+bwd ms':>10}")
    for name, f, fb in rows:
        print(f"{name:<{width}}  {f:8.2f}  {fb:10.2f}")


if __name__ == "__main__":
    main()
