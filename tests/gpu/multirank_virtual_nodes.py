"""Low-latency CUDA dispatch/combine over virtual nodes: every rank count R
runs the configurations (nodes x ranks per node) that divide it -- R = 8:
2x4, 4x2, 8x1; R = 4: 2x2; R = 2: 2x1 -- and each must equal, bit for bit,
the flat run (one node, pointers to every peer) and numpy: rows, scales,
counts, sources and combine outputs; back-to-back calls over both buffer
halves; the send/receive split with compute between; mixed pointer and put
peers (any configuration with more than one rank per node).

    python -m jax_ep.launch -n 8 tests/gpu/multirank_virtual_nodes.py

EXPECTED TO FAIL UNTIL THE PUT PATH IS WIRED. Today a CUDA Buffer over
several (virtual) nodes raises NotImplementedError ("... not yet callable
from Python"): the put kernels (cuda/ll_put_dispatch.cu, cuda/ll_put_combine.cu)
are compiled but no FFI handler calls them. While that is so, this script
reports each configuration as "XFAIL (put path not wired)" and exits 0; any
other failure exits 1. Once Buffer accepts virtual nodes, the checks run for
real and must pass.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu.rank_checks import Checks  # noqa: E402

R, ME = info.num_ranks, info.rank
NOT_WIRED = "not yet callable from Python"
CONFIGS = {8: (4, 2, 1), 4: (2,), 2: (1,)}.get(R, ())  # ranks per node
checks = Checks()
xfails = []


def inputs(seed, t, k, e, h, mask_prob=0.05):
    rng = np.random.default_rng(seed)
    idxs, xs, ws = [], [], []
    for r in range(R):
        tr = t - (r % 3)  # a different token count on some ranks
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tr)])
        idxs.append(np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32))
        xs.append(rng.standard_normal((tr, h)).astype(ml_dtypes.bfloat16))
        ws.append(rng.random((tr, k)).astype(np.float32))
    return xs, idxs, ws


def make_buffer(m, h, k, e, fp8, ranks_per_node):
    return jax_ep.Buffer(
        num_experts=e, axis_name=None, num_nvl_bytes=1 << 22, ranks_per_node=ranks_per_node,
        num_ll_bytes=jax_ep.low_latency_buffer_bytes(m, h, R, k, e, fp8),
        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, fp8=fp8, backend="cuda",
                                             num_sms=max(4, 96 // R)),
        timeout_s=60.0)


def run(buf, fp8, rounds):
    """Per round: (recv_x, count, sources, one-call combine, split combine), as numpy."""

    @jax.jit
    def step(x, i, w):
        o = buf.low_latency_dispatch(x, i)
        hd = o.handle
        y = o.recv_x if fp8 is None else jax_ep.per_token_cast_back(*o.recv_x, fp8, out_dtype=jnp.bfloat16)
        fused = buf.low_latency_combine(y, w, hd)
        # The split, with compute between send and receive.
        pending = buf.low_latency_dispatch_send(x, i, after=fused)
        busy = pending.then(jnp.tanh(x.astype(jnp.float32)) @ jnp.ones((x.shape[1], 8), jnp.float32))
        o2 = jax_ep.low_latency_dispatch_recv(pending, after=busy)
        y2 = o2.recv_x if fp8 is None else jax_ep.per_token_cast_back(*o2.recv_x, fp8, out_dtype=jnp.bfloat16)
        split = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(y2, o2.handle), w)
        src = jnp.stack([hd.recv_src_rank, hd.recv_src_token, hd.recv_src_slot], -1)
        return o.recv_x, o.recv_count, src, fused, split, o2.recv_x

    outs = []
    for x, i, w in rounds:  # back to back: both buffer halves, twice
        outs.append(jax.tree.map(np.asarray, step(x, i, w)))
    return outs


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def check_config(ranks_per_node, fp8, seed, t=24, m=32, k=4, h=1024):
    e = 4 * R
    rounds = []
    for it in range(4):
        xs, idxs, ws = inputs(seed + it, t, k, e, h)
        rounds.append((xs, idxs, ws))
    mine = [(xs[ME], idxs[ME], ws[ME]) for xs, idxs, ws in rounds]
    flat_buf = make_buffer(m, h, k, e, fp8, None)
    flat = run(flat_buf, fp8, mine)
    flat_buf.destroy()
    buf = make_buffer(m, h, k, e, fp8, ranks_per_node)
    assert buf.topology.num_nodes == R // ranks_per_node
    got = run(buf, fp8, mine)
    buf.destroy()
    for it, ((xs, idxs, ws), a, b) in enumerate(zip(rounds, got, flat)):
        name = f"{R // ranks_per_node}x{ranks_per_node} round {it}"
        for j, what in enumerate(("recv_x", "count", "sources", "combine", "split combine", "split recv_x")):
            for u, v in zip(jax.tree.leaves(a[j]), jax.tree.leaves(b[j])):
                np.testing.assert_array_equal(bits(u), bits(v), err_msg=f"{name}: {what} differs from the flat run")
        ref = npr.ll_dispatch(xs, idxs, e, m)[ME]
        np.testing.assert_array_equal(a[1], ref["count"], err_msg=f"{name}: counts")
        np.testing.assert_array_equal(a[2], ref["src"], err_msg=f"{name}: sources")
        for loc in range(e // R):
            n = int(ref["count"][loc])
            if fp8 is None:
                np.testing.assert_array_equal(bits(a[0][loc, :n]), bits(ref["x"][loc, :n]), err_msg=f"{name}: rows")
            else:
                want_q, want_s = npr.fp8_quantize(ref["x"][loc, :n].astype(np.float32), round_scale=fp8.round_scale)
                np.testing.assert_array_equal(bits(a[0][0][loc, :n]), bits(want_q), err_msg=f"{name}: fp8")
                if not fp8.use_ue8m0:
                    np.testing.assert_array_equal(a[0][1][loc, :n], want_s, err_msg=f"{name}: scales")


def wired(ranks_per_node) -> bool:
    """Whether a CUDA Buffer over these virtual nodes is accepted; False
    (an expected failure) while the put path is not wired."""
    try:
        make_buffer(8, 512, 2, 2 * R, None, ranks_per_node).destroy()
        return True
    except NotImplementedError as err:
        if NOT_WIRED not in str(err):
            raise
        print(f"XFAIL (put path not wired) {R // ranks_per_node}x{ranks_per_node}: {err}", flush=True)
        xfails.append(ranks_per_node)
        return False


for rpn in CONFIGS:
    if not wired(rpn):
        continue
    for label, fp8 in (("bf16", None), ("fp8", jax_ep.FP8Options()), ("ue8m0", jax_ep.FP8Options(use_ue8m0=True))):
        checks(f"virtual_nodes_{R // rpn}x{rpn}_{label}")(
            lambda rpn=rpn, fp8=fp8: check_config(rpn, fp8, seed=100 * rpn + len(label)))

if xfails:
    print(f"rank {ME}: virtual-node configurations {sorted(set(xfails))} (ranks per node) XFAIL: "
          f"the put path is not wired to Python yet", flush=True)
sys.exit(checks.summary(ME, R))
