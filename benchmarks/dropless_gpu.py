"""Dropless rounds on the GPU: peak memory and step time of the expert block
with the CUDA kernels, worst-case capacity against capacity factors.

    python -m jax_ep.launch -n 4 benchmarks/dropless_gpu.py --capacity-factor worst --out OUT/bench
    python -m jax_ep.launch -n 4 benchmarks/dropless_gpu.py --capacity-factor 1.25 --out OUT/bench

One configuration per run, so that each process's peak memory is its own
(``peak_bytes_in_use`` of the device's memory stats never goes down in a
process). Every rank (one process each, ``backend="cuda"``, no mesh axis)
runs one forward + backward step of normal mode's expert block, as
``jax_ep.moe.normal_experts`` runs it: ``plan_rounds`` (with a factor), then
per round ``dispatch`` (expert-major) -> ``ragged_dot`` SwiGLU experts ->
``combine`` through ``sum_over_rounds``, the loss ``sum(y**2)``, gradients
w.r.t. the expert weights and ``x``. The router is left out (its cost does
not depend on the capacity). DeepEP's shape by default: T = 4096 tokens per
rank, H = 7168, K = 8 of E = 256 experts, BF16, uniform random routing, expert
FFN width F = 1024, alignment 128. Every rank shares one GPU under MPS: the
worst case at R = 2 holds about 15 GB per rank; at R = 4, twice the rows per
rank, it may not fit beside the other ranks on an 80 GB GPU.

Reports, for rank 0 (the ranks are symmetric): the receive rows ``C``, the
rounds run, the registered buffer's bytes (``num_nvl_bytes``: cudaMalloc'd
beside XLA's pool, sized for ``C``), XLA's compiled memory analysis of the
step, ``peak_bytes_in_use`` after the timed steps and the bytes in use
before the first one, and the median step time. Writes
``dropless_gpu_R{R}_{label}.json`` into ``--out``. A run that does not fit
in memory reports that instead. Ranks sharing one GPU need not fail alike:
the rank that allocates last fails, and a rank that got its memory waits in
its dispatch for the other until the buffer's timeout (60 s here: a step takes
well under a second on an H100; the rest covers the ranks' compile times
differing), then ends with ``CommunicationError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity-factor", default="worst", help="'worst' (worst-case capacity) or a number, e.g. 1.25")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--alignment", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--expert-matmul", default="auto", choices=("auto", "ragged_dot", "grouped"),
                   help="MoEConfig.expert_matmul (ragged_dot does not fit a GPU at DeepEP's shape)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.factor = None if args.capacity_factor == "worst" else float(args.capacity_factor)
    return args


def label(factor) -> str:
    return "worst" if factor is None else f"f{factor:g}"


def make_loss(cfg, opts, axis_name):
    """``loss(params, x, topk_idx, topk_weights) -> (sum(y**2), rounds run)``
    of normal mode's expert block with ``opts`` (its capacity; rounds when
    ``cfg.capacity_factor`` is set), over ``axis_name`` (``None``: the CUDA
    backend's one process per rank)."""
    import jax.numpy as jnp

    import jax_ep
    from jax_ep import moe

    e = cfg.num_experts

    def one_round(p, x, i, w):
        out = jax_ep.dispatch(x, i, w, num_experts=e, axis_name=axis_name, options=opts)
        y = moe.expert_mlp_ragged(out.recv_x, p, out.expert_group_sizes, cfg)
        y = y * jnp.sum(out.recv_topk_weights, axis=-1, keepdims=True).astype(y.dtype)
        return jax_ep.combine(y, out.handle)

    def loss(p, x, i, w):
        if cfg.capacity_factor is None:
            y, n = one_round(p, x, i, w), jnp.int32(1)
        else:
            plan = jax_ep.plan_rounds(i, num_experts=e, axis_name=axis_name, options=opts)
            y, n = jax_ep.sum_over_rounds(one_round, p, x, i, w, plan), plan.num_rounds
        return jnp.sum(y.astype(jnp.float32) ** 2), n

    return loss


def main(argv=None):
    args = parse_args(argv)
    from jax_ep.launch import initialize_distributed

    info = initialize_distributed()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_ep
    from jax_ep import moe

    r, me = info.num_ranks, info.rank
    t, h, k, e = args.tokens, args.hidden, args.topk, args.experts
    cfg = moe.MoEConfig(num_experts=e, hidden=h, ffn=args.ffn, topk=k, expert_alignment=args.alignment,
                        backend="cuda", capacity_factor=args.factor, expert_matmul=args.expert_matmul)
    opts0 = cfg.normal_options(num_tokens=t, num_ranks=r) if args.factor is not None else cfg.normal_options()
    worst = r * t * min(k, e // r) + (e // r) * (args.alignment - 1)
    capacity = opts0.num_max_recv_tokens or worst
    nvl_bytes = jax_ep.intranode_buffer_bytes(t, h, r, k, e, capacity=capacity, itemsize=2)
    buf = jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nvl_bytes,
                        normal=jax_ep.NormalOptions(backend="cuda"), timeout_s=60.0)
    opts = dataclasses.replace(opts0, buffer_id=buf.normal.buffer_id, num_sms=buf.normal.num_sms)

    rng = np.random.default_rng(1000 + me)
    idx = np.argsort(rng.random((t, e)), axis=-1)[:, :k].astype(np.int32)
    w = (rng.random((t, k)) / k).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    # Only this rank's experts (E/R of them), drawn on the device: the global
    # weights would not fit beside R ranks' activations.
    local = e // r
    shapes = moe.param_shapes(cfg)
    params = {n: jax.random.normal(jax.random.fold_in(jax.random.key(j), me), (local,) + shapes[n][1:],
                                   jnp.bfloat16) * (1.0 / float(np.sqrt(shapes[n][-2])))
              for j, n in enumerate(cfg.expert_param_names)}

    step = jax.jit(jax.value_and_grad(make_loss(cfg, opts, None), argnums=(0, 1), has_aux=True))
    dev = jax.local_devices()[0]
    result = dict(R=r, rank=me, device=dev.device_kind, T=t, H=h, F=args.ffn, K=k, E=e, dtype="bfloat16",
                  alignment=args.alignment, capacity_factor=args.factor, capacity=capacity, worst_capacity=worst,
                  expert_matmul=args.expert_matmul,
                  nvl_buffer_bytes=nvl_bytes)
    try:
        compiled = step.lower(params, x, idx, w).compile()
        m = compiled.memory_analysis()
        if m is not None:
            result.update(compiled_temp_bytes=m.temp_size_in_bytes, compiled_argument_bytes=m.argument_size_in_bytes,
                          compiled_output_bytes=m.output_size_in_bytes)
        stats = dev.memory_stats() or {}
        result["bytes_in_use_before"] = stats.get("bytes_in_use")
        (_, rounds), grads = compiled(params, x, idx, w)
        jax.block_until_ready(grads)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, x, idx, w))
            times.append(time.perf_counter() - t0)
        stats = dev.memory_stats() or {}
        result.update(rounds=int(rounds), step_ms=round(statistics.median(times) * 1e3, 2),
                      peak_bytes_in_use=stats.get("peak_bytes_in_use"), status="ok")
    except Exception as err:  # out of memory (on this rank; see the module docstring)
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        result.update(status="out of memory", error=str(err).splitlines()[0][:300])
    gib = 2.0 ** 30
    peak = result.get("peak_bytes_in_use")
    print(f"R={r} rank {me} {label(args.factor)}: C={capacity} ({capacity / worst:.2f} of worst) "
          f"buffer {nvl_bytes / gib:.2f} GiB, "
          + (f"rounds {result['rounds']}, XLA peak {peak / gib if peak else float('nan'):.2f} GiB, "
             f"step {result['step_ms']} ms" if result["status"] == "ok" else result["status"]), flush=True)
    if me == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"dropless_gpu_R{r}_{label(args.factor)}.json"), "w") as f:
            json.dump(result, f, indent=1)
    buf.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
