"""Benchmark internode normal mode on R rank processes grouped into virtual nodes.

    python -m jax_ep.launch -n 8 benchmarks/bench_internode.py --ranks-per-node 4 --out docs/benchmarks

DeepEP's internode configuration by default: 4096 tokens per rank, hidden
7168, top-8 of 256 experts (uniform random routing), FP8 dispatch, BF16
combine; ``--ranks-per-node`` (default R/2) makes the other node's ranks
reachable only through NVSHMEM puts, even on one host. Bytes are counted as
DeepEP's test_internode.py counts them: the RDMA leg moves one row per
(token, destination node) -- the source's own node included --, the NVLink
leg one row per received row, x hidden x 2 for BF16 and x (1 + 4/128) / 2
of that for FP8; combine moves the BF16 bytes back. It also reports the
fraction of (token, destination) crossings to another node that the
hierarchy saves: (token, remote node) pairs against (token, remote rank)
pairs of a flat all-to-all. Time per call: the median over repetitions of
one compiled program of ``--iters`` back-to-back calls, divided by the
calls; the slowest rank's time defines the op.
"""

import argparse
import json
import os
import time

from jax_ep.launch import initialize_distributed

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import internode_ops, internode_plan  # noqa: E402
from unrolled import unrolled_loop  # noqa: E402  (benchmarks/unrolled.py)

R, ME = info.num_ranks, info.rank
FP8_FACTOR = (1 + 4 / 128) / 2


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--ranks-per-node", type=int, default=None, help="ranks per virtual node (default R/2)")
    p.add_argument("--sms", type=int, default=24, help="blocks of the copy kernels per rank")
    p.add_argument("--channels", type=int, default=None,
                   help="ring channels per rank (default: the most whose ring blocks fit with the ranks sharing "
                        "this GPU, at most 12: jax_ep.internode_ops.local_channel_cap)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the JSON results (rank 0 writes)")
    return p.parse_args()


def kv():
    from jax._src import distributed
    return distributed.global_state.client


_barriers = iter(range(1 << 30))


def barrier(name):
    if R > 1:
        kv().wait_at_barrier(f"bench_internode/{next(_barriers)}/{name}", 600_000)


def routing(seed, t, k, e):
    rng = np.random.default_rng(seed)
    idx = np.argsort(-rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
    return idx, rng.random((t, k)).astype(np.float32)


def traffic(idxs, e, el):
    """Per rank: (token, node) pairs (DeepEP's num_rdma_token_sent), received
    rows, and (token, remote node) / (token, remote rank) crossings."""
    per = e // R
    node_pairs, recv_rows = np.zeros(R, np.int64), np.zeros(R, np.int64)
    remote_nodes, remote_ranks = 0, 0
    for s, idx in enumerate(idxs):
        owners = np.where(idx >= 0, idx // per, -1)
        in_rank = np.stack([np.any(owners == r, axis=1) for r in range(R)], axis=1)  # [T, R]
        in_node = in_rank.reshape(len(idx), R // el, el).any(-1)  # [T, N]
        node_pairs[s] = in_node.sum()
        recv_rows += in_rank.sum(0)
        own = s // el
        remote_nodes += int(in_node.sum() - in_node[:, own].sum())
        remote_ranks += int(in_rank.sum() - in_rank[:, own * el:(own + 1) * el].sum())
    return node_pairs, recv_rows, remote_nodes, remote_ranks


def time_loop(fn, args, iters, reps):
    loop = unrolled_loop(fn, iters)
    loop(*args).block_until_ready()  # compile + warm up
    times = []
    for _ in range(reps):
        barrier(fn.__name__)
        t0 = time.perf_counter()
        loop(*args).block_until_ready()
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def slowest(name, sec):
    if R == 1:
        return sec
    client = kv()
    client.key_value_set(f"bench_internode/{name}/{ME}", repr(sec))
    return max(float(client.blocking_key_value_get(f"bench_internode/{name}/{r}", 600_000)) for r in range(R))


def main():
    a = parse()
    t, h, k, e = a.tokens, a.hidden, a.topk, a.experts
    el = a.ranks_per_node or max(R // 2, 1)
    idxs, ws = zip(*[routing(1000 + s, t, k, e) for s in range(R)])
    node_pairs, recv_rows, remote_nodes, remote_ranks = traffic(idxs, e, el)
    # Capacities from the routing (rounded up), so the buffer is not sized for the worst case.
    node_cap, capacity = internode_plan.capacity_hint(np.stack(idxs), num_experts=e, ranks_per_node=el)
    node_cap, capacity = -(-node_cap // 256) * 256, -(-capacity // 256) * 256
    # All ring blocks (3 per channel in a combine) of the ranks sharing this GPU must be resident.
    channels = a.channels or internode_ops.local_channel_cap()
    internode = jax_ep.InternodeOptions(num_max_rdma_recv_tokens=node_cap, num_channels=channels)
    nbytes = jax_ep.internode_buffer_bytes(t, h, R, k, e, ranks_per_node=el, capacity=capacity,
                                           node_capacity=node_cap, fp8=True, internode=internode)
    nbytes = max(nbytes, jax_ep.internode_buffer_bytes(t, h, R, k, e, ranks_per_node=el, capacity=capacity,
                                                       node_capacity=node_cap, internode=internode))
    buf = jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nbytes, ranks_per_node=el,
                        normal=jax_ep.NormalOptions(backend="cuda", num_sms=a.sms, num_max_recv_tokens=capacity),
                        internode=internode)
    rng = np.random.default_rng(ME)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    idx, w = jnp.asarray(idxs[ME]), jnp.asarray(ws[ME])
    pair = jax.jit(lambda x: jax_ep.per_token_cast_to_fp8(x, backend="cuda"))(x)
    handle = jax.jit(lambda x, i, w: buf.dispatch(x, i, w).handle)(x, idx, w)
    y = jax.jit(lambda x, i, w: buf.dispatch(x, i, w).recv_x)(x, idx, w)

    def dispatch_fp8(pair, idx, w):
        return buf.dispatch(pair, idx, w).recv_x[1][0, 0]

    def dispatch_bf16(x, idx, w):
        return buf.dispatch(x, idx, w).recv_x[0, 0].astype(jnp.float32)

    def combine_bf16(y, handle):
        return buf.combine(y, handle)[0, 0].astype(jnp.float32)

    rdma_bf16 = node_pairs[ME] * h * 2
    nvl_bf16 = recv_rows[ME] * h * 2
    ops = [("dispatch_fp8", dispatch_fp8, (pair, idx, w), FP8_FACTOR),
           ("dispatch_bf16", dispatch_bf16, (x, idx, w), 1.0),
           ("combine_bf16", combine_bf16, (y, handle), 1.0)]
    results = []
    for name, fn, args, factor in ops:
        sec = slowest(name, time_loop(fn, args, a.iters, a.reps))
        row = dict(op=name, ranks=R, ranks_per_node=el, tokens=t, hidden=h, topk=k, experts=e, sms=a.sms,
                   capacity=capacity, node_capacity=node_cap, time_us=sec * 1e6,
                   rdma_bytes=float(rdma_bf16 * factor), nvl_bytes=float(nvl_bf16 * factor),
                   rdma_gbps=float(rdma_bf16 * factor / sec / 1e9), nvl_gbps=float(nvl_bf16 * factor / sec / 1e9))
        results.append(row)
        if ME == 0:
            print(f"R={R} nodes={R // el}x{el} {name:14s} {row['time_us']:9.1f} us  RDMA {row['rdma_gbps']:6.1f} GB/s"
                  f"  NVL {row['nvl_gbps']:6.1f} GB/s  (rank 0's bytes)", flush=True)
    saved = 1 - remote_nodes / remote_ranks if remote_ranks else 0.0
    if ME == 0:
        print(f"crossings to another node: {remote_nodes} (token, node) vs {remote_ranks} (token, rank) flat: "
              f"{saved:.0%} fewer", flush=True)
    buf.destroy()
    if ME == 0 and a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"internode_R{R}_rpn{el}.json")
        with open(path, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), num_channels=channels, buffer_bytes=nbytes,
                           remote_token_node_pairs=remote_nodes,
                           remote_token_rank_pairs=remote_ranks, crossings_saved=saved, results=results), f,
                      indent=1)
        print(f"wrote {path}", flush=True)
    barrier("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
