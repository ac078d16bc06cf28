"""Dropless overflow rounds: memory and time against worst-case capacity.

    python benchmarks/dropless_memory.py [--out docs/benchmarks] [--skip-deepep] [--seeds 20]

Three measurements, on CPU with 8 virtual devices (``backend="xla"``):

1. **Memory** (compile only): XLA's compiled memory analysis of one
   forward + backward step of ``jax_ep.moe.moe_layer`` (gradients w.r.t. the
   parameters and the input) inside ``shard_map``, per rank: temp, argument
   and output bytes; peak = their sum (an upper bound on what the program
   holds at once; XLA reuses temp buffers inside it). Worst-case capacity vs
   ``capacity_factor`` 1.0 / 1.25 / 2.0, at DeepEP's shape (R = 8, T = 4096,
   H = 7168, K = 8, E = 256, bfloat16) and at the training example's shape
   (examples/train_moe_transformer.py: R = 8, T = 64, H = 32, K = 2, E = 16,
   F = 32, float32).
2. **Rounds** each capacity needs: ``jax_ep.plan_rounds`` run at the full
   shape (it is integer work on the routing alone, cheap on CPU), over
   ``--seeds`` random routings: uniform (each token picks K distinct experts
   uniformly) and skewed (90 % of the tokens pick only rank 0's experts).
3. **Time** of one compiled forward + backward step at a CPU-sized shape
   (R = 8, T = 256, H = 128, F = 256, K = 4, E = 32, float32), with a routing
   fed to the layer's experts that needs one round, two rounds, and the
   skewed one, against worst-case capacity: the cost of a second round.

Writes ``dropless.json`` and ``dropless.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

FACTORS = (None, 1.0, 1.25, 2.0)  # None: worst case


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks"))
    p.add_argument("--seeds", type=int, default=20, help="random routings per case for the rounds count")
    p.add_argument("--deepep-ffn", type=int, default=2048, help="expert FFN width at DeepEP's shape")
    p.add_argument("--skip-deepep", action="store_true", help="leave out the DeepEP shape (its compile is slow)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per time case (median)")
    p.add_argument("--render", action="store_true", help="only rewrite dropless.md from --out/dropless.json")
    return p.parse_args()


def setup():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def main():
    args = parse_args()
    if args.render:
        with open(os.path.join(args.out, "dropless.json")) as f:
            result = json.load(f)
        with open(os.path.join(args.out, "dropless.md"), "w") as f:
            f.write(markdown(result))
        return
    setup()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep import moe

    r = 8
    mesh = jax.make_mesh((r,), ("ep",), devices=jax.devices()[:r], axis_types=(jax.sharding.AxisType.Auto,))

    def capacity(cfg, t, factor):
        if factor is None:
            return r * t * min(cfg.topk, cfg.num_experts // r) + (cfg.num_experts // r) * (cfg.expert_alignment - 1)
        return jax_ep.capacity_for_factor(factor, num_tokens=t, num_topk=cfg.topk, num_experts=cfg.num_experts,
                                          num_ranks=r, expert_alignment=cfg.expert_alignment)

    def layer_step(cfg):
        specs = moe.param_specs(cfg)
        f = jax.shard_map(lambda p, x: moe.moe_layer(p, x, cfg), mesh=mesh, in_specs=(specs, P("ep")),
                          out_specs=(P("ep"), P()))

        def loss(p, x):
            y, aux = f(p, x)
            return jnp.sum(y.astype(jnp.float32) ** 2) + aux

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    # --- 1. memory ---------------------------------------------------------------
    def memory(cfg, t, dtype):
        shapes = moe.param_shapes(cfg)
        specs = moe.param_specs(cfg)
        p = {n: jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, specs[n])) for n, s in shapes.items()}
        x = jax.ShapeDtypeStruct((r * t, cfg.hidden), dtype, sharding=NamedSharding(mesh, P("ep")))
        rows = []
        for factor in FACTORS:
            c = dataclasses.replace(cfg, capacity_factor=factor)
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                m = layer_step(c).lower(p, x).compile().memory_analysis()
            peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
            rows.append(dict(capacity_factor=factor, capacity=capacity(cfg, t, factor), temp_bytes=m.temp_size_in_bytes,
                             argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                             peak_bytes=peak, compile_s=round(time.perf_counter() - t0, 1)))
            print(f"  memory factor={factor}: C={rows[-1]['capacity']} temp={_gib(m.temp_size_in_bytes)} "
                  f"peak={_gib(peak)} ({rows[-1]['compile_s']} s)", flush=True)
        return rows

    # --- 2. rounds ---------------------------------------------------------------
    def routing(kind, rng, t, k, e):
        local = e // r
        ids = np.argsort(rng.random((r, t, e)), axis=-1)[..., :k]  # K distinct experts per token
        if kind == "skewed":
            hot = rng.random((r, t)) < 0.9
            pick = np.argsort(rng.random((r, t, local)), axis=-1)[..., :k]
            if local < k:  # fewer local experts than K: the rest anywhere
                pick = ids
            ids = np.where(hot[..., None], pick, ids)
        return ids.astype(np.int32)

    def rounds(cfg, t, seeds):
        out = []
        for factor in FACTORS[1:]:
            opts = moe.MoEConfig(**{**dataclasses.asdict(cfg), "capacity_factor": factor}).normal_options(t, r)
            plan = jax.jit(jax.shard_map(
                lambda i: jax_ep.plan_rounds(i[0], num_experts=cfg.num_experts, options=opts).num_rounds[None],
                mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
            for kind in ("uniform", "skewed"):
                rng = np.random.default_rng(0)
                counts = []
                with jax.set_mesh(mesh):
                    for _ in range(seeds):
                        counts.append(int(np.asarray(plan(routing(kind, rng, t, cfg.topk, cfg.num_experts)))[0]))
                hist = {str(n): counts.count(n) for n in sorted(set(counts))}
                out.append(dict(capacity_factor=factor, routing=kind, rounds_histogram=hist, seeds=seeds))
                print(f"  rounds factor={factor} {kind}: {hist}", flush=True)
        return out

    # --- 3. time -------------------------------------------------------------------
    def timing(iters):
        cfg = moe.MoEConfig(num_experts=32, hidden=128, ffn=256, topk=4, expert_alignment=8)
        t = 256
        params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                              moe.init_params(jax.random.key(0), cfg), moe.param_specs(cfg))
        x = jax.device_put(jax.random.normal(jax.random.key(1), (r * t, cfg.hidden)), NamedSharding(mesh, P("ep")))
        rng = np.random.default_rng(1)

        def experts_step(c):
            specs = moe.param_specs(c)

            def local(p, x, idx, w):
                y, plan = moe.normal_experts(x, p, moe.Routing(None, w, idx), c, with_rounds=True)
                return y, plan.num_rounds[None]

            f = jax.shard_map(local, mesh=mesh, in_specs=(specs, P("ep"), P("ep"), P("ep")),
                              out_specs=(P("ep"), P("ep")))

            def loss(p, x, idx, w):
                y, n = f(p, x, idx, w)
                return jnp.sum(y ** 2), n

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True))

        def routing_with_rounds(kind):
            """A routing (and its plan's round count at factor 1.25) of the requested kind."""
            if kind == "skewed":
                return routing("skewed", rng, t, cfg.topk, cfg.num_experts)
            # Overload rank 0 by a share that one extra round absorbs.
            ids = routing("uniform", rng, t, cfg.topk, cfg.num_experts)
            if kind == "two rounds":
                local = cfg.num_experts // r
                hot = rng.random((r, t)) < 0.3  # rank 0: ~1.5x its share
                ids[..., 0] = np.where(hot, rng.integers(0, local, (r, t)), ids[..., 0])
                ids = np.where((ids == ids[..., :1]) & (np.arange(cfg.topk) > 0), (ids + local) % cfg.num_experts, ids)
            return ids

        rows = []
        for kind in ("one round", "two rounds", "skewed"):
            idx = routing_with_rounds(kind)
            w = np.full(idx.shape, 1.0 / cfg.topk, np.float32)
            idx_s = jax.device_put(idx.reshape(r * t, -1), NamedSharding(mesh, P("ep")))
            w_s = jax.device_put(w.reshape(r * t, -1), NamedSharding(mesh, P("ep")))
            for factor in (None, 1.25):
                step = experts_step(dataclasses.replace(cfg, capacity_factor=factor))
                with jax.set_mesh(mesh):
                    (_, n), g = step(params, x, idx_s, w_s)
                    jax.block_until_ready(g)
                    secs = []
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        jax.block_until_ready(step(params, x, idx_s, w_s))
                        secs.append(time.perf_counter() - t0)
                rounds_run = int(np.asarray(n).max())
                rows.append(dict(routing=kind, capacity_factor=factor, capacity=capacity(cfg, t, factor),
                                 rounds=rounds_run, step_ms=round(statistics.median(secs) * 1e3, 2)))
                print(f"  time {kind} factor={factor}: {rounds_run} rounds, {rows[-1]['step_ms']} ms", flush=True)
        return dict(shape=dict(R=r, T=t, H=cfg.hidden, F=cfg.ffn, K=cfg.topk, E=cfg.num_experts,
                               dtype="float32", alignment=cfg.expert_alignment), rows=rows)

    result = dict(device=str(jax.devices()[0].platform) + " x8 virtual", jax=jax.__version__)
    shapes = {}
    if not args.skip_deepep:
        deepep = moe.MoEConfig(num_experts=256, hidden=7168, ffn=args.deepep_ffn, topk=8, expert_alignment=128)
        shapes["deepep"] = (deepep, 4096, jnp.bfloat16)
    example = moe.MoEConfig(num_experts=16, hidden=32, ffn=32, topk=2, expert_alignment=8)
    shapes["train_example"] = (example, 64, jnp.float32)
    for name, (cfg, t, dtype) in shapes.items():
        print(f"{name}: memory", flush=True)
        mem = memory(cfg, t, dtype)
        print(f"{name}: rounds", flush=True)
        rnd = rounds(cfg, t, args.seeds)
        result[name] = dict(shape=dict(R=r, T=t, H=cfg.hidden, F=cfg.ffn, K=cfg.topk, E=cfg.num_experts,
                                       dtype=jnp.dtype(dtype).name, alignment=cfg.expert_alignment),
                            memory=mem, rounds=rnd)
    print("time", flush=True)
    result["time"] = timing(args.iters)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dropless.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "dropless.md"), "w") as f:
        f.write(markdown(result))
    print(f"wrote {args.out}/dropless.json and dropless.md")


def _gib(b):
    if b >= 2**28:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def markdown(result) -> str:
    lines = ["# Dropless overflow rounds: memory and time", "",
             "Generated by `python benchmarks/dropless_memory.py` on "
             f"{result['device']} (jax {result['jax']}, `backend=\"xla\"`). Method in the script's docstring.", ""]
    for name, title in (("deepep", "DeepEP's shape"), ("train_example", "The training example's shape")):
        if name not in result:
            continue
        d = result[name]
        s = d["shape"]
        lines += [f"## {title}: R = {s['R']}, T = {s['T']}, H = {s['H']}, F = {s['F']}, K = {s['K']}, "
                  f"E = {s['E']}, {s['dtype']}, alignment {s['alignment']}", "",
                  "Forward + backward of `moe_layer`, per rank (XLA memory analysis; peak = temp + arguments + outputs).", "",
                  "| capacity | rows C | temp | arguments | outputs | peak | worst case / peak | rounds, uniform | rounds, skewed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        worst = d["memory"][0]["peak_bytes"]
        hist = {(x["capacity_factor"], x["routing"]): x["rounds_histogram"] for x in d["rounds"]}

        def fmt(h):
            return ", ".join(f"{n}: {c}" for n, c in h.items()) if h else "1 (always)"

        for m in d["memory"]:
            f = m["capacity_factor"]
            label = "worst case" if f is None else f"factor {f}"
            lines.append(f"| {label} | {m['capacity']} | {_gib(m['temp_bytes'])} | {_gib(m['argument_bytes'])} | "
                         f"{_gib(m['output_bytes'])} | {_gib(m['peak_bytes'])} | {worst / m['peak_bytes']:.1f}x |"
                         f" {fmt(hist.get((f, 'uniform')))} | {fmt(hist.get((f, 'skewed')))} |")
        seeds = d["rounds"][0]["seeds"] if d["rounds"] else 0
        lines += ["", f"Rounds: `rounds: routings` over {seeds} random routings, from `jax_ep.plan_rounds` at this "
                  "shape (the worst case always takes one round).", ""]
    t = result["time"]
    s = t["shape"]
    lines += [f"## Time of a second round (CPU, R = {s['R']}, T = {s['T']}, H = {s['H']}, F = {s['F']}, "
              f"K = {s['K']}, E = {s['E']}, {s['dtype']})", "",
              "One compiled forward + backward step of the expert block (`normal_experts`) for a given routing, "
              "median of several runs. XLA:CPU with emulated collectives: relative costs only.", "",
              "| routing | capacity | rows C | rounds | step | vs worst case |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    base = {row["routing"]: row["step_ms"] for row in t["rows"] if row["capacity_factor"] is None}
    for row in t["rows"]:
        label = "worst case" if row["capacity_factor"] is None else f"factor {row['capacity_factor']}"
        lines.append(f"| {row['routing']} | {label} | {row['capacity']} | {row['rounds']} | {row['step_ms']} ms | "
                     f"{row['step_ms'] / base[row['routing']]:.2f}x |")
    fac = {(row["routing"], row["rounds"]): row["step_ms"] for row in t["rows"] if row["capacity_factor"] is not None}
    one, two = fac.get(("one round", 1)), fac.get(("two rounds", 2))
    if one and two:
        lines += ["", f"A second round at factor 1.25: {two} ms against {one} ms for one round, "
                  f"+{100 * (two / one - 1):.0f} % on the step."]
    lines += ["", "## Reading the numbers", "",
              "- DeepEP's shape is compiled here with its real expert width (F = 2048) and not run (with the "
              "kernels, at R = 2 and F = 1024 on one H100: [dropless_gpu.md](dropless_gpu.md)). Its expert MLP "
              "runs on `jax_ep.grouped_matmul` (`MoEConfig.expert_matmul=\"auto\"`; XLA's rewrite of "
              "`jax.lax.ragged_dot` works on every local expert for every buffer row, C·(E/R)·H, and needed "
              "718 GiB of temporaries at the worst case). The activations of the expert MLP and the dispatch's "
              "rows, forward and backward, scale with C; the ratio is C_worst / C (5.9x at factor 1.25) less what "
              "does not scale with C (the parameters, their gradients (added up over rounds in their own "
              "dtype) and the grouped matmul's float32 weight-gradient accumulator, the reference backend's "
              "[R, T, H] exchange buffers) and what the "
              "rounds add (a later round's loop, recomputed in the backward pass after round 0's residuals are "
              "freed).",
              "- At the training example's shape everything is small and the part that does not scale with C "
              "(the reference backend's exchange of all R·T tokens, the router, the loss) weighs more: the "
              "same factors save 2-3x there.",
              "- Rounds come from `jax_ep.plan_rounds` on the routings themselves; the plan is what the layer "
              "runs (tests/test_rounds.py checks it against a numpy model of repeated dispatches and the "
              "dispatches against the worst case). Uniform routing needs one round at factor 1.25 in every "
              "sample at both shapes; at factor 1.0 the small example's 512 tokens overflow by chance in most "
              "steps. Skewed routing (90 % of tokens on one rank's experts) needs about 0.9·R / factor rounds "
              "and drops nothing.",
              "- Time: on a shared 2-core CPU, so noisy; read the ratios. A second round adds its dispatch, "
              "experts and combine of C rows, once in the forward pass and twice in the backward pass (a "
              "recomputed forward and its VJP). At this small shape the expert MLP is `ragged_dot` (below "
              "`auto`'s threshold), whose cost grows with C, so there the worst case is the slowest of all; "
              "with an expert MLP that skips empty rows (`jax_ep.grouped_matmul`) it is the memory, not the "
              "time, that the worst case wastes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
