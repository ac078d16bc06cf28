"""Internode normal mode (CUDA) on virtual nodes, checked against numpy.

Every rank count R runs the node shapes (nodes x ranks per node) it allows --
R = 2: 2x1; R = 4: 2x2; R = 8: 2x4 and 4x2 -- with a Buffer whose
``ranks_per_node`` makes peers of other nodes reachable only by NVSHMEM puts:

    python -m jax_ep.launch -n 8 tests/gpu/multirank_internode.py

Each rank builds the same seeded global inputs, runs the kernels on its own
shard and compares with numpy (tests/np_internode.py, tests/np_reference.py):
bitwise for every moved row and every handle array (the internode plan's
``rdma_slot``, ``fwd_src_node``, ``fwd_src_token``, ``fwd_dst_row``, and
``recv_table_row``), DeepEP's calc_diff for sums. Cases: uneven sizes, DeepEP's
hidden 7168 with top-8, one hot rank, duplicate ids and masks, drops past the
output capacity and at a forwarder's table, the expert-major layout (aligned,
with drops), rings of a few tokens that every stream wraps many times (two
channels), FP8 dispatch, cached dispatch and back-to-back routings (both
buffer halves), gradients. Other R: skipped.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The symmetric heap holds one internode buffer at a time (the largest case
# needs ~170 MiB at R = 8); it is GPU memory outside XLA's pool.
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "1073741824")

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
import np_internode as npi  # noqa: E402
import np_reference as npr  # noqa: E402
from gpu.rank_checks import Checks, calc_diff  # noqa: E402
from jax_ep import launch, nvshmem  # noqa: E402

R, ME = info.num_ranks, info.rank
SHAPES = {2: (1,), 4: (2,), 8: (4, 2)}.get(R, ())  # ranks per node
if not SHAPES or not nvshmem.available():
    why = f"R = {R} has no virtual-node shape here" if not SHAPES else nvshmem.unavailable_reason()
    print(f"SKIP multirank_internode: {why}", flush=True)
    jax.distributed.shutdown()
    sys.exit(0)
checks = Checks()


def global_inputs(seed, t, k, e, h, dtype=ml_dtypes.bfloat16, mask_prob=0.05, skew=None, distinct=True):
    rng = np.random.default_rng(seed)
    idxs = []
    for _ in range(R):
        if skew == "one_rank":
            ids = np.stack([rng.choice(np.arange(e // R) + (e // R) * (R - 1), min(k, e // R), replace=False)
                            for _ in range(t)])
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        elif distinct:
            ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        else:
            ids = rng.integers(0, e, (t, k))
        idxs.append(np.where(rng.random(ids.shape) < mask_prob, -1, ids).astype(np.int32))
    xs = [rng.standard_normal((t, h)).astype(dtype) for _ in range(R)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(R)]
    return xs, idxs, ws


# Every rank's ring blocks (3 per channel in a combine, one block per SM at
# their register use) must be resident at once: R ranks share this GPU.
CHANNELS = max(1, min(4, 120 // (3 * R)))
# A wait that outlasts this fails the case (JAX_EP_TEST_TIMEOUT_S: shorter for a first run).
TIMEOUT_S = float(os.environ.get("JAX_EP_TEST_TIMEOUT_S", "60"))
# Rings far smaller than a call's streams: every slot is reused many times.
TINY_RINGS = dict(num_channels=2, rdma_chunk_tokens=2, rdma_ring_tokens=4, nvl_chunk_tokens=1, nvl_ring_tokens=3)


def make_buffer(el, t, h, k, e, capacity=None, node_capacity=None, itemsize=2, layout="rank_major", alignment=1,
                rings=None):
    # rings: InternodeOptions ring fields, None for CHANNELS channels, "default" for the library's rule.
    rings = {} if rings == "default" else (rings or dict(num_channels=CHANNELS))
    internode = jax_ep.InternodeOptions(num_max_rdma_recv_tokens=node_capacity, **rings)
    nbytes = jax_ep.internode_buffer_bytes(t, h, R, k, e, ranks_per_node=el, capacity=capacity,
                                           node_capacity=node_capacity, itemsize=itemsize, layout=layout,
                                           expert_alignment=alignment, internode=internode)
    return jax_ep.Buffer(num_experts=e, axis_name=None, num_nvl_bytes=nbytes, ranks_per_node=el,
                         normal=jax_ep.NormalOptions(backend="cuda", num_sms=max(2, 64 // R),
                                                     num_max_recv_tokens=capacity, layout=layout,
                                                     expert_alignment=alignment),
                         internode=internode, timeout_s=TIMEOUT_S)


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def expected_combine(rows_per_rank, refs, t, h):
    """float64 sum of every rank's rows back to this rank's tokens."""
    out = np.zeros((t, h), np.float64)
    for d in range(R):
        for row, (s, i) in zip(refs[d]["pos"], refs[d]["src"]):
            if s == ME:
                out[i] += np.asarray(rows_per_rank[d][row], np.float64)
    return out


def check_dispatch(out, refs, flat, handle_ref, name, expert_major=False):
    ref = refs[ME]
    np.testing.assert_array_equal(bits(out.recv_x), bits(ref["x"]), err_msg=f"{name}: recv_x")
    np.testing.assert_array_equal(np.asarray(out.recv_topk_idx), ref["idx"], err_msg=f"{name}: recv_topk_idx")
    np.testing.assert_array_equal(np.asarray(out.recv_topk_weights), ref["w"], err_msg=f"{name}: weights")
    # Counts are of every token routed to the expert (drops at a forwarder included), as within a node.
    np.testing.assert_array_equal(np.asarray(out.num_recv_tokens_per_expert), flat[ME]["counts"],
                                  err_msg=f"{name}: counts")
    assert int(out.num_dropped) == ref["dropped"], (name, int(out.num_dropped), ref["dropped"])
    assert int(out.num_recv_rows) == len(ref["src"]), (name, int(out.num_recv_rows), len(ref["src"]))
    src = [(int(a), int(b)) for a, b in zip(np.asarray(out.handle.recv_src_rank),
                                            np.asarray(out.handle.recv_src_token)) if a >= 0]
    assert src == ref["src"], f"{name}: receive order differs"
    if expert_major:
        np.testing.assert_array_equal(np.asarray(out.expert_group_sizes), ref["group_sizes"],
                                      err_msg=f"{name}: group sizes")
    for key, want in handle_ref[ME].items():
        got = np.asarray(out.handle.extra[key])
        if key == "fwd_dst_row" and not expert_major:
            got = got[..., 0]  # [Cn, L, 1]: one slot in the rank-major layout
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: handle {key}")


def run_case(el, name, seed, t, k, e, h, capacity=None, node_capacity=None, skew=None, distinct=True,
             layout="rank_major", alignment=1, rings=None):
    xs, idxs, ws = global_inputs(seed, t, k, e, h, skew=skew, distinct=distinct)
    em = layout == "expert_major"
    cap = capacity or (R * t * min(k, e // R) + (e // R) * (alignment - 1) if em else R * t)
    cn = node_capacity or (R // el) * t
    buf = make_buffer(el, t, h, k, e, capacity=capacity, node_capacity=node_capacity, layout=layout,
                      alignment=alignment, rings=rings)

    @jax.jit
    def step(x, i, w):
        o = buf.dispatch(x, i, w)
        return o, buf.combine(o.recv_x, o.handle)

    o, back = step(xs[ME], idxs[ME], ws[ME])
    refs = npi.dispatch(xs, idxs, ws, e, el, cap, cn, layout, alignment)
    flat = (npr.dispatch_expert_major(xs, idxs, ws, e, cap, alignment) if em
            else npr.dispatch_rank_major(xs, idxs, ws, e, cap))
    handles = npi.handle_arrays(idxs, e, el, cap, cn, refs, layout=layout, alignment=alignment)
    check_dispatch(o, refs, flat, handles, name, expert_major=em)
    diff = calc_diff(np.asarray(back, np.float32), expected_combine([r["x"] for r in refs], refs, t, h))
    assert diff < 5e-6, f"{name}: combine calc_diff {diff}"
    assert int(buf.status(back)[0]) == 0, f"{name}: status {np.asarray(buf.status(back))}"
    buf.destroy()


for EL in SHAPES:
    tag = f"{R // EL}x{EL}"

    @checks(f"{tag}_rank_major_small_uneven")
    def _():
        run_case(EL, "small_uneven", 1, 37, 3, 4 * R, 256)

    @checks(f"{tag}_deepep_hidden_7168_top8")
    def _():
        run_case(EL, "deepep_7168", 2, 256, 8, 32 * R, 7168)

    @checks(f"{tag}_all_tokens_to_last_rank")
    def _():
        run_case(EL, "one_rank", 6, 50, 2, 4 * R, 256, skew="one_rank")

    @checks(f"{tag}_duplicate_ids_and_masks")
    def _():
        run_case(EL, "duplicates", 7, 41, 5, 2 * R, 128, distinct=False)

    @checks(f"{tag}_output_capacity_drops")
    def _():
        run_case(EL, "output_drops", 4, 64, 4, 4 * R, 128, capacity=40)

    @checks(f"{tag}_forwarder_table_drops")
    def _():
        run_case(EL, "table_drops", 5, 64, 4, 4 * R, 128, node_capacity=70)

    @checks(f"{tag}_expert_major_aligned")
    def _():
        run_case(EL, "expert_major", 3, 100, 4, 4 * R, 512, layout="expert_major", alignment=8)

    @checks(f"{tag}_expert_major_drops")
    def _():
        run_case(EL, "expert_major_drops", 10, 64, 4, 4 * R, 128, capacity=50, node_capacity=70,
                 layout="expert_major", alignment=4)

    @checks(f"{tag}_tiny_rings_wrap_many_times")
    def _():
        run_case(EL, "tiny_rings", 11, 96, 4, 4 * R, 256, rings=TINY_RINGS)

    @checks(f"{tag}_tiny_rings_expert_major_with_drops")
    def _():
        run_case(EL, "tiny_rings_expert_major", 12, 80, 4, 4 * R, 128, capacity=60, node_capacity=90,
                 layout="expert_major", alignment=4, rings=TINY_RINGS)

    @checks(f"{tag}_default_rings_fit_the_shared_gpu")
    def _():
        # T = 2048 of top-4: the rule asks for 10-12 channels, whose blocks would not all
        # be resident with R ranks on one GPU at R >= 4; the launcher says how many share
        # it (JAX_EP_RANKS_PER_GPU), so the buffer keeps to channel_cap (5 at R = 8 on 132 SMs).
        assert os.environ.get("JAX_EP_RANKS_PER_GPU") == str(launch.ranks_per_gpu()), "not set by the launcher"
        run_case(EL, "default_rings", 13, 2048, 4, 4 * R, 256, rings="default")

    @checks(f"{tag}_fp8_dispatch")
    def _():
        t, k, e, h = 128, 8, 8 * R, 2048
        xs, idxs, ws = global_inputs(8, t, k, e, h, dtype=np.float32)
        buf = make_buffer(EL, t, h, k, e, itemsize=4)

        @jax.jit
        def step(x, i, w):
            return buf.dispatch(jax_ep.per_token_cast_to_fp8(x, backend="cuda"), i, w).recv_x

        q, s = step(xs[ME], idxs[ME], ws[ME])
        pairs = [npr.fp8_quantize(x) for x in xs]
        deq = [(p[0].astype(np.float32).reshape(t, h // 128, 128) * p[1][..., None]).reshape(t, h) for p in pairs]
        ref = npr.dispatch_rank_major(deq, idxs, ws, e, R * t)[ME]
        got = (np.asarray(q).astype(np.float32).reshape(-1, h // 128, 128) * np.asarray(s)[..., None]).reshape(-1, h)
        np.testing.assert_array_equal(got, ref["x"])
        buf.destroy()

    @checks(f"{tag}_cached_dispatch_and_back_to_back_routings")
    def _():
        t, k, e, h = 128, 4, 4 * R, 512
        buf = make_buffer(EL, t, h, k, e)

        @jax.jit
        def step(x, i, w, z):
            o = buf.dispatch(x, i, w)
            return o.recv_x, buf.cached_dispatch(z, o.handle), buf.combine(o.recv_x, o.handle)

        for it in range(4):  # a new routing every call; the calls alternate buffer halves
            xs, idxs, ws = global_inputs(100 + it, t, k, e, h)
            zs = global_inputs(200 + it, t, k, e, h)[0]
            rx, rz, back = step(xs[ME], idxs[ME], ws[ME], zs[ME])
            refs = npr.dispatch_rank_major(xs, idxs, ws, e, R * t)
            refz = npr.dispatch_rank_major(zs, idxs, ws, e, R * t)
            np.testing.assert_array_equal(bits(rx), bits(refs[ME]["x"]), err_msg=f"round {it}: recv_x")
            np.testing.assert_array_equal(bits(rz), bits(refz[ME]["x"]), err_msg=f"round {it}: cached")
            diff = calc_diff(np.asarray(back, np.float32), expected_combine([r["x"] for r in refs], refs, t, h))
            assert diff < 5e-6, f"round {it}: combine calc_diff {diff}"
        buf.destroy()

    @checks(f"{tag}_gradients_match_numpy_transposes")
    def _():
        t, k, e, h = 96, 4, 4 * R, 256
        xs, idxs, ws = global_inputs(9, t, k, e, h, dtype=np.float32)
        buf = make_buffer(EL, t, h, k, e, itemsize=4)
        g_rows = np.random.default_rng(10 + ME).standard_normal((R * t, h)).astype(np.float32)

        @jax.jit
        def grads(x, i, w, g):
            def f(x, w):
                o = buf.dispatch(x, i, w)
                return jnp.sum(o.recv_x * g) + jnp.sum(o.recv_topk_weights * g[:, :k])
            return jax.grad(f, argnums=(0, 1))(x, w)

        gx, gw = grads(xs[ME], idxs[ME], ws[ME], g_rows)
        all_g = [np.random.default_rng(10 + d).standard_normal((R * t, h)).astype(np.float32) for d in range(R)]
        refs = npr.dispatch_rank_major(xs, idxs, ws, e, R * t)
        want_w = np.zeros((t, k))
        for d in range(R):
            for row, (s, i) in enumerate(refs[d]["src"]):
                if s == ME:
                    want_w[i] += np.where(refs[d]["idx"][row] >= 0, all_g[d][row, :k], 0)
        np.testing.assert_allclose(np.asarray(gx), expected_combine(all_g, refs, t, h), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-5, atol=1e-5)

        @jax.jit
        def combine_grad(x, i, w, gt):
            o = buf.dispatch(x, i, w)
            _, vjp = jax.vjp(lambda y: buf.combine(y, o.handle), o.recv_x)
            return vjp(gt)[0]

        gt = np.random.default_rng(50 + ME).standard_normal((t, h)).astype(np.float32)
        all_gt = [np.random.default_rng(50 + d).standard_normal((t, h)).astype(np.float32) for d in range(R)]
        got = combine_grad(xs[ME], idxs[ME], ws[ME], gt)
        np.testing.assert_array_equal(np.asarray(got), npr.dispatch_rank_major(all_gt, idxs, ws, e, R * t)[ME]["x"])
        buf.destroy()


code = checks.summary(ME, R)
jax.distributed.shutdown()
sys.exit(code)
