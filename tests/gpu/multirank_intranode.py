"""Intranode CUDA dispatch/combine on R rank processes, checked against numpy.

Run through the launcher (one process per rank, ranks may share a GPU under MPS):

    python -m jax_ep.launch -n 4 tests/gpu/multirank_intranode.py

Every rank builds the same seeded global inputs, runs the CUDA backend on its
own shard, and checks its outputs against the numpy restatement of the
contract (tests/np_reference.py): bitwise where data only moves, DeepEP's
calc_diff for sums. XLA collectives cannot be the reference here (NCCL refuses
two ranks on one GPU). Prints PASS/FAIL per check; exits 1 if any failed.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

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



def global_inputs(seed, t, k, e, h, dtype=ml_dtypes.bfloat16, mask_prob=0.05, skew=None, distinct=True):
    rng = np.random.default_rng(seed)
    idxs = []
    for s in range(R):
        if skew == "one_rank":
            ids = np.stack([rng.choice(np.arange(e // R) + (e // R) * (R - 1), min(k, e // R), replace=False) for _ in range(t)]) if t else np.zeros((0, k), int)
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        elif distinct:
            ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) if t else np.zeros((0, k), int)
        else:
            ids = rng.integers(0, e, (t, k))
        ids = np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32)
        idxs.append(ids)
    xs = [rng.standard_normal((t, h)).astype(dtype) for _ in range(R)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(R)]
    return xs, idxs, ws


def make_buffer(t, h, k, e, capacity=None, itemsize=2):
    nbytes = jax_ep.intranode_buffer_bytes(t, h, R, k, e, capacity=capacity, itemsize=itemsize)
    return jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nbytes,
                         normal=jax_ep.NormalOptions(backend="cuda", num_sms=max(4, 96 // R)),
                         timeout_s=60.0)


def assert_dispatch_matches(out, ref, name, expert_major=False):
    rx = np.asarray(out.recv_x)
    np.testing.assert_array_equal(rx.view(np.uint16) if rx.dtype == ml_dtypes.bfloat16 else rx,
                                  ref["x"].view(np.uint16) if ref["x"].dtype == ml_dtypes.bfloat16 else ref["x"],
                                  err_msg=f"{name}: recv_x")
    np.testing.assert_array_equal(np.asarray(out.recv_topk_idx), ref["idx"], err_msg=f"{name}: recv_topk_idx")
    np.testing.assert_array_equal(np.asarray(out.recv_topk_weights), ref["w"], err_msg=f"{name}: weights")
    np.testing.assert_array_equal(np.asarray(out.num_recv_tokens_per_expert), ref["counts"], err_msg=f"{name}: counts")
    assert int(out.num_dropped) == ref["dropped"], (name, int(out.num_dropped), ref["dropped"])
    assert int(out.num_recv_rows) == len(ref["src"]), (name, int(out.num_recv_rows), len(ref["src"]))
    src = [(int(a), int(b)) for a, b in zip(np.asarray(out.handle.recv_src_rank), np.asarray(out.handle.recv_src_token)) if a >= 0]
    assert src == ref["src"], f"{name}: receive order differs"
    if expert_major:
        np.testing.assert_array_equal(np.asarray(out.expert_group_sizes), ref["group_sizes"], err_msg=f"{name}: group sizes")


def expected_combine(xs_rows_per_rank, refs, t, h):
    """numpy float64 sum of every rank's rows back to their tokens, for rank ME."""
    out = np.zeros((t, h), np.float64)
    for d in range(R):
        for row, (s, i) in zip(refs[d]["pos"], refs[d]["src"]):
            if s == ME:
                out[i] += np.asarray(xs_rows_per_rank[d][row], np.float64)
    return out


def run_normal_case(name, seed, t, k, e, h, layout="rank_major", capacity=None, alignment=1, skew=None, distinct=True):
    xs, idxs, ws = global_inputs(seed, t, k, e, h, skew=skew, distinct=distinct)
    buf = make_buffer(t, h, k, e, capacity=capacity or (R * t * min(k, e // R) + (e // R) * (alignment - 1)))
    opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=capacity, expert_alignment=alignment,
                                backend="cuda", num_sms=buf.normal.num_sms, buffer_id=buf.normal.buffer_id)

    @jax.jit
    def step(x, i, w):
        o = buf.dispatch(x, i, w, options=opts)
        back = buf.combine(o.recv_x, o.handle)
        return o, back

    o, back = step(xs[ME], idxs[ME], ws[ME])
    cap = capacity or (R * t if layout == "rank_major" else R * t * min(k, e // R) + (e // R) * (alignment - 1))
    if layout == "rank_major":
        refs = npr.dispatch_rank_major(xs, idxs, ws, e, cap)
    else:
        refs = npr.dispatch_expert_major(xs, idxs, ws, e, cap, alignment)
    assert_dispatch_matches(o, refs[ME], name, expert_major=layout == "expert_major")
    want = expected_combine([r["x"] for r in refs], refs, t, h)
    diff = calc_diff(np.asarray(back, np.float32), want)
    assert diff < 5e-6, f"{name}: combine calc_diff {diff}"
    buf.destroy()


@check("rank_major_small_uneven")
def _():
    run_normal_case("rank_major_small_uneven", 1, 37, 3, 4 * R, 256)


@check("rank_major_deepep_shape_7168")
def _():
    run_normal_case("rank_major_deepep_shape_7168", 2, 512, 8, 32 * R, 7168)


@check("expert_major_aligned")
def _():
    run_normal_case("expert_major_aligned", 3, 100, 4, 4 * R, 512, layout="expert_major", alignment=8)


@check("rank_major_overflow_drops")
def _():
    run_normal_case("rank_major_overflow_drops", 4, 64, 4, 4 * R, 128, capacity=40)


@check("expert_major_overflow_drops")
def _():
    run_normal_case("expert_major_overflow_drops", 5, 64, 4, 4 * R, 128, layout="expert_major", capacity=50, alignment=4)


@check("all_tokens_to_last_rank")
def _():
    run_normal_case("all_tokens_to_last_rank", 6, 50, 2, 4 * R, 256, skew="one_rank")


@check("duplicate_ids_and_masks")
def _():
    run_normal_case("duplicate_ids_and_masks", 7, 41, 5, 2 * R, 128, distinct=False)


@check("fp8_dispatch")
def _():
    t, k, e, h = 256, 8, 8 * R, 2048
    xs, idxs, ws = global_inputs(8, t, k, e, h, dtype=np.float32)
    buf = make_buffer(t, h, k, e)

    @jax.jit
    def step(x, i, w):
        pair = jax_ep.per_token_cast_to_fp8(x, backend="cuda")
        o = buf.dispatch(pair, i, w)
        return o.recv_x

    q, s = step(xs[ME], idxs[ME], ws[ME])
    pairs = [npr.fp8_quantize(x) for x in xs]
    deq = [(p[0].astype(np.float32).reshape(t, h // 128, 128) * p[1][..., None]).reshape(t, h) for p in pairs]
    ref = npr.dispatch_rank_major(deq, idxs, ws, e, R * t)[ME]
    got = (np.asarray(q).astype(np.float32).reshape(-1, h // 128, 128) * np.asarray(s)[..., None]).reshape(-1, h)
    np.testing.assert_array_equal(got, ref["x"])
    buf.destroy()


@check("cached_dispatch_and_back_to_back_routings")
def _():
    t, k, e, h = 128, 4, 4 * R, 512
    buf = make_buffer(t, h, k, e)

    @jax.jit
    def step(x, i, w, z):
        o = buf.dispatch(x, i, w)
        return o.recv_x, buf.cached_dispatch(z, o.handle), buf.combine(o.recv_x, o.handle)

    for it in range(4):  # new routing every call, buffers alternate
        xs, idxs, ws = global_inputs(100 + it, t, k, e, h)
        zs = global_inputs(200 + it, t, k, e, h)[0]
        rx, rz, back = step(xs[ME], idxs[ME], ws[ME], zs[ME])
        refs = npr.dispatch_rank_major(xs, idxs, ws, e, R * t)
        refz = npr.dispatch_rank_major(zs, idxs, ws, e, R * t)
        np.testing.assert_array_equal(np.asarray(rx).view(np.uint16), refs[ME]["x"].view(np.uint16))
        np.testing.assert_array_equal(np.asarray(rz).view(np.uint16), refz[ME]["x"].view(np.uint16))
        assert calc_diff(np.asarray(back, np.float32), expected_combine([r["x"] for r in refs], refs, t, h)) < 5e-6
    buf.destroy()


@check("gradients_match_numpy_transposes")
def _():
    t, k, e, h = 96, 4, 4 * R, 256
    xs, idxs, ws = global_inputs(9, t, k, e, h, dtype=np.float32)
    buf = make_buffer(t, h, k, e, itemsize=4)
    g_rows = np.random.default_rng(10 + ME).standard_normal((R * t, h)).astype(np.float32)

    @jax.jit
    def grads(x, i, w, g):
        def f(x, w):
            o = buf.dispatch(x, i, w)
            return jnp.sum(o.recv_x * g) + jnp.sum(o.recv_topk_weights * g[:, :k])
        return jax.grad(f, argnums=(0, 1))(x, w)

    gx, gw = grads(xs[ME], idxs[ME], ws[ME], g_rows)
    # d/dx[t] = sum over the rows made from token t (on every rank) of that rank's g row.
    all_g = [np.random.default_rng(10 + d).standard_normal((R * t, h)).astype(np.float32) for d in range(R)]
    refs = npr.dispatch_rank_major(xs, idxs, ws, e, R * t)
    want_x = expected_combine(all_g, refs, t, h)
    want_w = np.zeros((t, k))
    for d in range(R):
        for row, (s, i) in enumerate(refs[d]["src"]):
            if s == ME:
                want_w[i] += np.where(refs[d]["idx"][row] >= 0, all_g[d][row, :k], 0)
    np.testing.assert_allclose(np.asarray(gx), want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-5, atol=1e-5)

    @jax.jit
    def combine_grad(x, i, w, gt):
        o = buf.dispatch(x, i, w)
        _, vjp = jax.vjp(lambda y: buf.combine(y, o.handle), o.recv_x)
        return vjp(gt)[0]

    gt = np.random.default_rng(50 + ME).standard_normal((t, h)).astype(np.float32)
    all_gt = [np.random.default_rng(50 + d).standard_normal((t, h)).astype(np.float32) for d in range(R)]
    got = combine_grad(xs[ME], idxs[ME], ws[ME], gt)
    want = npr.dispatch_rank_major(all_gt, idxs, ws, e, R * t)[ME]["x"]
    np.testing.assert_array_equal(np.asarray(got), want)
    buf.destroy()


@check("inside_shard_map_over_the_global_mesh")
def _():
    t, k, e, h = 64, 4, 4 * R, 256
    xs, idxs, ws = global_inputs(11, t, k, e, h)
    mesh = jax.make_mesh((R,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))
    nbytes = jax_ep.intranode_buffer_bytes(t, h, R, k, e)
    buf = jax_ep.Buffer(num_experts=e, axis_name="ep", num_nvl_bytes=nbytes,
                        normal=jax_ep.NormalOptions(backend="cuda", num_sms=max(4, 96 // R)))
    from jax.sharding import NamedSharding, PartitionSpec as P
    sh = NamedSharding(mesh, P("ep"))
    glob = [jax.make_array_from_process_local_data(sh, a) for a in (xs[ME], idxs[ME], ws[ME])]

    def body(x, i, w):
        o = buf.dispatch(x, i, w)
        return buf.combine(o.recv_x, o.handle)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    out = f(*glob)
    local = np.asarray(out.addressable_shards[0].data, np.float32)
    refs = npr.dispatch_rank_major(xs, idxs, ws, e, R * t)
    assert calc_diff(local, expected_combine([r["x"] for r in refs], refs, t, h)) < 5e-6
    buf.destroy()


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
