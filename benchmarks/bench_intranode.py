"""Benchmark intranode dispatch/combine on R rank processes.

    python -m jax_ep.launch -n 8 benchmarks/bench_intranode.py --out docs/benchmarks

DeepEP's normal-mode configuration by default: 4096 tokens per rank, hidden
7168, top-8 of 256 experts (uniform random routing), BF16 and FP8 dispatch,
BF16 combine, handle-reusing (cached) dispatch. Bytes are counted as DeepEP's
tests count them: received rows x hidden x 2 for BF16 (x (1 + 4/128) / 2 more
for FP8 with its scales); combine moves the same bytes as BF16 dispatch. Each
op is timed as the median over repetitions of one compiled program of
`--iters` back-to-back calls, divided by the number of calls (wall clock
around the whole program, so launch gaps count). Aggregate GB/s sums all
ranks' bytes; the roofline is the device-to-device copy bandwidth measured by
rank 0 in the same run (payload bytes, with every rank idle).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

from jax_ep.launch import initialize_distributed

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from roofline import copy_roofline_gbps  # noqa: E402  (benchmarks/roofline.py)
from unrolled import unrolled_loop  # noqa: E402  (benchmarks/unrolled.py)

R, ME = info.num_ranks, info.rank


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--sms", default=None, help="comma-separated SM budgets per rank to sweep")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the JSON results (rank 0 writes)")
    p.add_argument("--tag", default="")
    p.add_argument("--ops", default=None, help="comma-separated op names to run (default: all)")
    p.add_argument("--chunk-rows", default=None, help="comma-separated combine_chunk_rows to sweep (combine only)")
    p.add_argument("--ring-rows", default=None, help="comma-separated combine_ring_rows to sweep (combine only)")
    p.add_argument("--no-signatures", action="store_true",
                   help="run without the per-call signature check (JAX_EP_CALL_SIGNATURES=0 on every rank), "
                        "to measure its cost against a run with it")
    args = p.parse_args()
    if args.no_signatures:
        os.environ["JAX_EP_CALL_SIGNATURES"] = "0"  # read by the extension at its first call
    return args


def kv():
    from jax._src import distributed
    return distributed.global_state.client


_barriers = iter(range(1 << 30))


def barrier(name):
    if R > 1:
        kv().wait_at_barrier(f"bench/{next(_barriers)}/{name}", 600_000)


def routing(seed, t, k, e):
    rng = np.random.default_rng(seed)
    scores = rng.random((t, e)).astype(np.float32)
    idx = np.argsort(-scores, axis=1)[:, :k].astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    return idx, w


def received_rows(idxs, e):
    """Rows each rank receives (rank-major: once per (token, rank))."""
    per = e // R
    counts = np.zeros(R, np.int64)
    for idx in idxs:
        owners = np.where(idx >= 0, idx // per, -1)
        for r in range(R):
            counts[r] += np.any(owners == r, axis=1).sum()
    return counts


def time_loop(fn, args, iters, reps):
    """Median seconds per call of fn(*args), run `iters` times in one compiled
    program (``unrolled_loop``)."""
    loop = unrolled_loop(fn, iters)
    loop(*args).block_until_ready()  # compile + warm up
    times = []
    for _ in range(reps):
        barrier(fn.__name__)
        t0 = time.perf_counter()
        loop(*args).block_until_ready()
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def main():
    a = parse()
    t, h, k, e = a.tokens, a.hidden, a.topk, a.experts
    sms_list = [int(s) for s in a.sms.split(",")] if a.sms else [max(4, min(24, 128 // R))]
    chunk_list = ([int(c) for c in a.chunk_rows.split(",")] if a.chunk_rows
                  else [jax_ep.tuning.COMBINE_CHUNK_ROWS.get(R, 2)])
    ring_list = ([int(c) for c in a.ring_rows.split(",")] if a.ring_rows
                 else [jax_ep.tuning.COMBINE_RING_ROWS.get(R, 64)])
    idxs, ws = zip(*[routing(1000 + s, t, k, e) for s in range(R)])
    rows = received_rows(idxs, e)
    capacity = int(-(-rows.max() // 256) * 256)
    rng = np.random.default_rng(ME)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    idx, w = jnp.asarray(idxs[ME]), jnp.asarray(ws[ME])

    roof_gbps = None
    if ME == 0:
        roof_gbps, roof_t = copy_roofline_gbps()
        print(f"device copy roofline: {roof_gbps:.0f} GB/s payload (1 GiB in {roof_t * 1e6:.0f} us)", flush=True)
    barrier("roofline")

    nbytes = jax_ep.intranode_buffer_bytes(t, h, R, k, e, capacity=capacity)
    buf = jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nbytes,
                        normal=jax_ep.NormalOptions(backend="cuda"))
    bf16_bytes = rows * h * 2
    fp8_bytes = rows * h * (1 + 4 / 128)
    results = []
    for sms in sms_list:
        opts = jax_ep.NormalOptions(backend="cuda", num_sms=sms, num_max_recv_tokens=capacity,
                                    buffer_id=buf.normal.buffer_id)

        def layout_op(idx):
            return jnp.sum(jax_ep.get_dispatch_layout(idx, e, num_ranks=R, backend="cuda")[0]).astype(jnp.float32)

        def dispatch_bf16(x, idx, w):
            return buf.dispatch(x, idx, w, options=opts).recv_x[0, 0].astype(jnp.float32)

        handle = jax.jit(lambda x, i, w: buf.dispatch(x, i, w, options=opts).handle)(x, idx, w)
        pair = jax.jit(lambda x: jax_ep.per_token_cast_to_fp8(x, backend="cuda"))(x)
        y = jax.jit(lambda x, i, w: buf.dispatch(x, i, w, options=opts).recv_x)(x, idx, w)

        def cached_bf16(x, handle):
            return buf.cached_dispatch(x, handle)[0, 0].astype(jnp.float32)

        def cached_fp8(pair, handle):
            q, s = buf.cached_dispatch(pair, handle)
            return q[0, 0].astype(jnp.float32) + s[0, 0]

        def dispatch_fp8(pair, idx, w):
            return buf.dispatch(pair, idx, w, options=opts).recv_x[1][0, 0]

        def combine_with(chunk, ring):
            copts = dataclasses.replace(opts, combine_chunk_rows=chunk, combine_ring_rows=ring)

            def combine_bf16(y, handle):
                handle = dataclasses.replace(handle, spec=dataclasses.replace(handle.spec, options=copts))
                return buf.combine(y, handle)[0, 0].astype(jnp.float32)

            return combine_bf16

        ops = [
            ("layout", layout_op, (idx,), None),
            ("dispatch_bf16", dispatch_bf16, (x, idx, w), bf16_bytes),
            ("dispatch_fp8", dispatch_fp8, (pair, idx, w), fp8_bytes),
            ("cached_dispatch_bf16", cached_bf16, (x, handle), bf16_bytes),
            ("cached_dispatch_fp8", cached_fp8, (pair, handle), fp8_bytes),
        ] + [
            (f"combine_bf16@{chunk}x{ring}", combine_with(chunk, ring), (y, handle), bf16_bytes)
            for chunk in chunk_list for ring in ring_list if ring % chunk == 0 and ring // chunk <= 32
        ]
        if a.ops:
            wanted = a.ops.split(",")
            ops = [op for op in ops if op[0].split("@")[0] in wanted]
        for name, fn, args, nbytes_per_rank in ops:
            name, _, chunk = name.partition("@")
            fn.__name__ = f"{name}_{sms}_{chunk}"
            sec = time_loop(fn, args, a.iters, a.reps)
            # every rank's time: the slowest defines the op
            client = kv()
            key = f"bench/{name}/{sms}/{chunk}"
            if R > 1:
                client.key_value_set(f"{key}/{ME}", repr(sec))
            secs = [float(client.blocking_key_value_get(f"{key}/{r}", 600_000)) if R > 1 else sec for r in range(R)]
            row = dict(op=name, ranks=R, sms_per_rank=sms, tokens=t, hidden=h, topk=k, experts=e,
                       capacity=capacity, time_us=max(secs) * 1e6, time_us_per_rank=[s * 1e6 for s in secs])
            if nbytes_per_rank is not None:
                per_rank_gbps = nbytes_per_rank / np.array(secs) / 1e9
                agg = float(nbytes_per_rank.sum() / max(secs) / 1e9)
                row.update(gbps_per_rank_mean=float(per_rank_gbps.mean()), aggregate_gbps=agg)
                if roof_gbps:
                    row.update(roofline_gbps=roof_gbps, roofline_fraction=agg / roof_gbps)
            if chunk:
                c_rows, r_rows = chunk.split("x")
                row.update(combine_chunk_rows=int(c_rows), combine_ring_rows=int(r_rows))
            results.append(row)
            if ME == 0:
                frac = f"{row.get('roofline_fraction', float('nan')):.2f}"
                print(f"R={R} sms={sms:3d} {name + (('@' + chunk) if chunk else ''):22s} {row['time_us']:9.1f} us  "
                      f"agg {row.get('aggregate_gbps', float('nan')):7.1f} GB/s  roofline {frac}", flush=True)
    buf.destroy()
    if ME == 0 and a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"intranode_R{R}{a.tag}.json")
        with open(path, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), roofline_gbps=roof_gbps,
                           received_rows=rows.tolist(), results=results), f, indent=1)
        print(f"wrote {path}", flush=True)
    barrier("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
