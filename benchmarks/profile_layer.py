"""Where a MoE layer's time goes on one device: jax_ep's layer piece by piece
against the pure-XLA all_to_all baseline (baseline_moe.py).

    python benchmarks/profile_layer.py --platform gpu [--tokens 2048 --hidden 1024 --ffn 2048 \
        --experts 32 --topk 4 --reps 50 --json OUT/profile_layer.json --trace OUT/trace]
    python benchmarks/profile_layer.py --platform cpu --tokens 32 --hidden 16 --ffn 32 --experts 8 --reps 3

One rank (R = 1, one device in a ``shard_map`` of one), the shape of
``compare_moe.py``'s GPU row by default. Each row is one ``jax.jit`` program
(forward; forward + backward of ``sum(out * cotangent)`` w.r.t. every float
input), the median of ``--reps`` calls with ``block_until_ready`` after a
warm-up; ``bwd`` is their difference. Variants:

* ``layer``: ``jax_ep.moe.moe_layer`` as users call it; at R = 1 its normal
  mode takes the local path (``jax_ep.moe_local``);
* ``local``: that path's pieces: route, the permutation (argsort + gather of
  the ``T*K`` rows), the experts on exactly the kept rows, the weighted
  scatter-add back; for scale, the experts as a matmul batched over every
  (expert, token) pair (the low-latency layer's MLP, ``E/K`` times the FLOPs);
* ``dispatch/xla`` and ``dispatch/cuda`` (GPU, with the kernels): the
  communicating path (``jax_ep.dispatch`` -> experts on the ``C`` capacity
  rows -> ``jax_ep.combine``) with the reference backend and with the CUDA
  kernels, piece by piece; ``cuda: loss calls the layer twice`` is the
  forward + backward of a loss that calls that layer twice for ``y`` and the
  auxiliary loss, as ``compare_moe.py`` once did: calls with side effects
  are not merged by XLA, so it runs the layer twice;
* ``baseline``: the whole baseline layer, its route and experts on the same
  rows, and the rest (sorting, buffers, ``all_to_all``) as the difference.

Prints a table and writes the rows as JSON (``--json``). ``--trace DIR``
also records a ``jax.profiler`` trace of each whole layer's forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="gpu", choices=["cpu", "gpu"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--alignment", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--trace", default=None, help="jax.profiler trace directory")
    return p.parse_args(argv)


def median_ms(f, *args, reps: int) -> float:
    """Median wall time of ``f(*args)`` in ms over ``reps`` calls, after one warm-up."""
    import jax

    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd_bwd(fn, argnums):
    """``fn`` -> forward + backward of ``sum(out * 1.0001)`` over its float
    outputs, gradients w.r.t. the args in ``argnums``."""
    import jax
    import jax.numpy as jnp

    def loss(*args):
        outs = [o for o in jax.tree.leaves(fn(*args)) if jnp.issubdtype(o.dtype, jnp.floating)]
        return sum(jnp.sum(o.astype(jnp.float32) * 1.0001) for o in outs)

    return jax.grad(loss, argnums=argnums)


def main(argv=None):
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu" if args.platform == "cpu" else "cuda,cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import baseline_moe
    import jax_ep
    from jax_ep import _extension
    from jax_ep import moe
    from jax_ep.moe_local import local_round
    from jax_ep.reference import routing as rt

    t, k, e = args.tokens, args.topk, args.experts
    dtype = jnp.dtype(args.dtype)
    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
    cfg = moe.MoEConfig(num_experts=e, hidden=args.hidden, ffn=args.ffn, topk=k, expert_alignment=args.alignment)
    params = jax.tree.map(lambda a: a.astype(dtype), moe.init_params(jax.random.key(0), cfg))
    experts = {n: params[n] for n in cfg.expert_param_names}
    x = jax.random.normal(jax.random.key(1), (t, args.hidden), dtype)

    def on_mesh(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))

    rows = []

    def row(variant, piece, f, call_args, argnums, fwd=True):
        """Time ``f`` (forward) and its forward + backward on ``call_args``."""
        ms_f = median_ms(on_mesh(f), *call_args, reps=args.reps) if fwd else None
        ms_fb = median_ms(on_mesh(fwd_bwd(f, argnums)), *call_args, reps=args.reps) if argnums else None
        rows.append(dict(variant=variant, piece=piece, fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                         bwd_ms=(ms_fb - ms_f) if ms_f is not None and ms_fb is not None else None))

    def derived(variant, piece, total, parts):
        got = {p["piece"]: p for p in rows if p["variant"] == variant}
        out = {}
        for key in ("fwd_ms", "fwd_bwd_ms", "bwd_ms"):
            vals = [got[total][key]] + [got[p][key] for p in parts]
            out[key] = None if None in vals else vals[0] - sum(vals[1:])
        rows.append(dict(variant=variant, piece=piece, **out))

    with jax.set_mesh(mesh):
        routing = on_mesh(lambda x, r: moe.route(x, r, cfg))(x, params["router"])
        idx, w = routing.idx, routing.weights

        def layer(c):
            return lambda p, x: moe.moe_layer(p, x, c)

        # --- the layer as called, and the local path's pieces --------------------------
        row("layer", "moe_layer (total)", layer(cfg), (params, x), (0, 1))
        def route_aux(x, router):
            r = moe.route(x, router, cfg)
            return r.weights, moe.load_balancing_loss(r.probs, r.idx, e, "ep")

        row("local", "route + aux loss", route_aux, (x, params["router"]), (0, 1))
        row("local", "experts round (permute, experts, scatter-add)",
            lambda p, x, w: local_round(cfg, cfg.normal_options(), p, x, idx, w)[0], (experts, x, w), (0, 1, 2))

        valid = rt.valid_slots(idx, e)
        group = jnp.where(rt.first_slots(idx, valid), idx, e).reshape(-1)
        order = jnp.argsort(group, stable=True)
        token = order // k
        sizes = jnp.zeros((e + 1,), jnp.int32).at[group].add(1)[:e]
        row("local", "permute (argsort + gather T*K rows)",
            lambda x, i: jnp.take(x, jnp.argsort(jnp.where(rt.first_slots(i, rt.valid_slots(i, e)), i, e).reshape(-1),
                                                 stable=True) // k, axis=0), (x, idx), (0,))
        xs = jnp.take(x, token, axis=0)
        row("local", f"experts on the {t * k} exact rows", lambda p, xs: moe.expert_mlp_ragged(xs, p, sizes, cfg),
            (experts, xs), (0, 1))
        # For scale: every local expert on every token, as the low-latency layer's packed MLP.
        row("local", f"(for scale) experts batched over [{e}, {t}, H]: {e // k}x the FLOPs",
            lambda p, xb: moe.expert_mlp_batched(xb, p, cfg), (experts, jnp.broadcast_to(x, (e,) + x.shape)), (0, 1))
        row("local", "weighted scatter-add back",
            lambda ys, wr: jnp.zeros((t, args.hidden), jnp.float32).at[token].add(
                (ys * wr[:, None].astype(ys.dtype)).astype(jnp.float32)).astype(dtype),
            (xs, w.reshape(-1)[order]), (0, 1))

        # --- the communicating path: dispatch -> experts on C rows -> combine ------------
        backends = ["xla"]
        buffer = None
        if args.platform == "gpu" and _extension.available():
            backends.append("cuda")
            buffer = jax_ep.Buffer(num_experts=e, normal=jax_ep.NormalOptions(backend="cuda"),
                                   num_nvl_bytes=jax_ep.intranode_buffer_bytes(
                                       t, args.hidden, 1, k, e, capacity=t * k + e * args.alignment,
                                       itemsize=4))
        for b in backends:
            c = dataclasses.replace(cfg, backend=b, buffer_id=None if buffer is None else buffer.normal.buffer_id)
            v = f"dispatch/{b}"
            opts = c.normal_options()

            def dispatch_layer(p, x, c=c, opts=opts):
                r = moe.route(x, p["router"], c)
                aux = moe.load_balancing_loss(r.probs, r.idx, e, "ep")
                ex = {n: p[n] for n in c.expert_param_names}
                return moe._expert_round_counted(c, opts, ex, x, r.idx, r.weights)[0], aux

            row(v, "layer with dispatch/combine (total)", dispatch_layer, (params, x), (0, 1))
            if b == "cuda":
                def twice(p, x, f=dispatch_layer):
                    return jnp.sum(f(p, x)[0].astype(jnp.float32) ** 2) + f(p, x)[1]

                row(v, "loss calls the layer twice (total)", twice, (params, x), (0, 1), fwd=False)
            out = on_mesh(lambda x, w, opts=opts: jax_ep.dispatch(x, idx, w, num_experts=e, axis_name="ep",
                                                                  options=opts))(x, w)
            row(v, "dispatch", lambda x, w, opts=opts: jax_ep.dispatch(x, idx, w, num_experts=e, axis_name="ep",
                                                                       options=opts)[:3:2], (x, w), (0, 1))
            cap = out.recv_x.shape[0]
            row(v, f"experts on the {cap} capacity rows",
                lambda p, xs, gs=out.expert_group_sizes: moe.expert_mlp_ragged(xs, p, gs, c), (experts, out.recv_x),
                (0, 1))
            row(v, "combine", lambda y, h=out.handle: jax_ep.combine(y, h), (out.recv_x,), (0,))
            derived(v, "rest (route, weights, glue)", "layer with dispatch/combine (total)",
                    ["dispatch", f"experts on the {cap} capacity rows", "combine"])

        # --- the baseline ----------------------------------------------------------------
        row("baseline", "baseline layer (total)", lambda p, x: baseline_moe.baseline_moe_layer(p, x, cfg),
            (params, x), (0, 1))
        row("baseline", "route + aux loss", route_aux, (x, params["router"]), (0, 1))
        exact = jnp.sort(group)
        bsizes = jnp.sum(jax.nn.one_hot(exact, e, dtype=jnp.int32), axis=0)
        row("baseline", f"experts on the {t * k} received rows",
            lambda p, xs: moe.expert_mlp_ragged(xs, p, bsizes, cfg), (experts, xs), (0, 1))
        derived("baseline", "rest (sorts, send buffer, all_to_all, un-permute)", "baseline layer (total)",
                ["route + aux loss", f"experts on the {t * k} received rows"])

        if args.trace:
            with jax.profiler.trace(args.trace):
                for name, f in [("layer", layer(cfg)),
                                ("baseline", lambda p, x: baseline_moe.baseline_moe_layer(p, x, cfg))]:
                    g = on_mesh(fwd_bwd(f, (0, 1)))
                    for _ in range(5):
                        with jax.profiler.TraceAnnotation(name):
                            jax.block_until_ready(g(params, x))

    where = f"{jax.devices()[0].device_kind}" + (" (CPU: says nothing about GPUs)" if args.platform == "cpu" else "")
    print(f"{where}, one rank: {t} tokens, hidden {args.hidden}, ffn {args.ffn}, {e} experts, top-{k}, "
          f"{args.dtype}, median of {args.reps}")
    print_table(rows)
    result = dict(device=jax.devices()[0].device_kind, platform=args.platform, tokens=t, hidden=args.hidden,
                  ffn=args.ffn, experts=e, topk=k, dtype=args.dtype, reps=args.reps, rows=rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def print_table(rows):
    """Rows as ``variant | piece | fwd ms | bwd ms | fwd+bwd ms``."""
    def fmt(v):
        return f"{v:10.3f}" if v is not None else f"{'':>10}"

    vw = max(len(r["variant"]) for r in rows)
    pw = max(len(r["piece"]) for r in rows)
    print(f"{'variant':<{vw}}  {'piece':<{pw}}  {'fwd ms':>10}  {'bwd ms':>10}  {'fwd+bwd ms':>10}")
    for r in rows:
        print(f"{r['variant']:<{vw}}  {r['piece']:<{pw}}  {fmt(r['fwd_ms'])}  {fmt(r['bwd_ms'])}  "
              f"{fmt(r['fwd_bwd_ms'])}")


if __name__ == "__main__":
    main()
