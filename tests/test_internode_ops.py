"""Internode normal mode from JAX, on CPU: the buffer's sizing (Python and
the kernels' layout agree), selection by topology, what is refused, the
handle arrays' numpy restatement against the plan, and the lowering of a
dispatch / combine / gradient to the internode FFI targets. The kernels run
only on GPUs (tests/gpu/multirank_internode.py)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
import np_internode as npi
from jax_ep import _extension, internode_ops, nvshmem, runtime
from jax_ep import internode_config as icfg
from jax_ep import internode_plan as ip
from jax_ep import topology as topo
from jax_ep.options import InternodeOptions

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")
needs_nvshmem = pytest.mark.skipif(not nvshmem.available(), reason=nvshmem.unavailable_reason() or "-")

T, K, E, H, R, L = 8, 2, 8, 256, 4, 2


def _kernel_sizing():
    """``jax_ep._nvshmem.internode_buffer_bytes`` taking the rings, or a skip:
    a module built before the ring kernels takes no ring arguments."""
    fn = nvshmem._module().internode_buffer_bytes
    try:
        fn(0, 1, 1, 1, 1, 1, 1, 1, 16, 4, 0, 1, 1, 1, 1, 1)
    except TypeError:
        pytest.skip("the loaded jax_ep._nvshmem predates the ring kernels (internode_buffer_bytes takes no rings)")
    return fn


@needs_nvshmem
@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
@pytest.mark.parametrize("op", ["dispatch", "cached_dispatch", "combine"])
@pytest.mark.parametrize("t,n,el,cn,rings", [(4096, 2, 4, 8192, (12, 18, 144, 9, 36)), (37, 2, 2, 74, (3, 2, 6, 3, 5)),
                                             (5, 4, 1, 3, (1, 1, 16, 2, 2)), (0, 2, 1, 1, (1, 1, 1, 1, 1))])
def test_python_sizes_equal_the_kernels_layout(op, t, n, el, cn, rings, layout):
    """internode_ops.call_bytes restates cuda/internode.cuh's Layout and
    RingWords: equal bytes."""
    fn = _kernel_sizing()
    k, e, em = 8, 256, layout == "expert_major"
    kk = k if op == "dispatch" or em else 0  # the combine's and cached dispatch's K: the handle's slots
    ee = e if op == "dispatch" else 0
    for row in (7168 * 2, 7392, 32):
        cfg = icfg.InternodeConfig(n, el, cn, *rings, row)
        py = internode_ops.call_bytes(op, cfg, num_tokens=t, num_topk=kk, num_experts=ee, layout=layout)
        cc = fn(internode_ops._OPS[op], t, kk, ee, n, el, cn, 1, row, row // 2, int(em), *rings)
        assert py == cc, (row, py, cc)
        assert internode_ops.kernel_call_bytes(op, cfg, num_tokens=t, num_topk=kk, num_experts=ee, layout=layout) == cc


def test_ring_words_mirror_the_header():
    """The header: 8192 bytes of control words, then two halves' RingWords
    (chunk flags, heads, NVLink tails and heads, credits and bases, chunk
    counters at 12 channels, 64 ranks, 8 per node, 16 chunks)."""
    assert internode_ops._ring_words_bytes() == 259584
    cfg = icfg.InternodeConfig(1, 1, 1, 1, 1, 1, 1, 1, 16)
    # Each half: table starts, stream ranges, out_pos, send and receive ring, 256 bytes each.
    assert internode_ops.call_bytes("cached_dispatch", cfg, num_tokens=0) == 8192 + 2 * 259584 + 2 * (5 * 256)


def test_buffer_bytes_cover_every_call_and_grow_with_node_capacity():
    small = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, node_capacity=80)
    big = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4)
    assert small < big
    assert jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, capacity=100) == big  # C: no region
    assert jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4,
                                         internode=InternodeOptions(num_max_rdma_recv_tokens=80)) == small
    opts = InternodeOptions()
    for op, row in (("combine", 1024), ("dispatch", 1024), ("cached_dispatch", 1024), ("combine", 16)):
        cfg = icfg.resolve_call(opts, num_nodes=2, ranks_per_node=4, num_tokens=64, row_bytes=row, num_topk=4)
        assert big >= internode_ops.call_bytes(op, cfg, num_tokens=64, num_topk=4, num_experts=32)
    fp8 = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, fp8=True)
    assert fp8 == big  # the combine's BF16 rows need more than FP8 dispatch rows
    em = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, layout="expert_major")
    assert em > big  # K placements per table row
    # Rings given in the options size the buffer: more channels of rings larger than a channel's
    # 16 tokens (the derived rings: one channel, rings of T = 64 tokens) need more.
    wide = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, internode=InternodeOptions(
        num_channels=4, rdma_chunk_tokens=16, rdma_ring_tokens=64))
    assert wide > big
    with pytest.raises(ValueError, match="must divide num_ranks"):
        jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=3)
    with pytest.raises(TypeError, match="internode must be a jax_ep.InternodeOptions"):
        jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, internode={"num_channels": 2})
    # A ring given alone serves every call's rows (its chunks: divisors of it), or is refused.
    assert jax_ep.internode_buffer_bytes(4096, 7168, 8, 8, 256, ranks_per_node=4, fp8=True,
                                         internode=InternodeOptions(rdma_ring_tokens=40, nvl_ring_tokens=20))
    with pytest.raises(ValueError, match="rdma_ring_tokens .37. must be at most 16 times rdma_chunk_tokens .1."):
        jax_ep.internode_buffer_bytes(4096, 7168, 8, 8, 256, ranks_per_node=4, fp8=True,
                                      internode=InternodeOptions(rdma_ring_tokens=37))


# Per-rank bytes at DeepEP's shape (T = 4096, H = 7168, top-8 of 256 experts,
# FP8 dispatch, BF16 combine, default options), as docs/internode.md gives
# them: (nodes, ranks per node) -> (rank-major, expert-major).
DEEPEP_BYTES = {(2, 4): (138416128, 140251136), (2, 8): (166203392, 169873408), (4, 8): (276828672, 284168704),
                (8, 8): (498078720, 512758784)}
STAGED_2X4 = int(1.75 * (1 << 30))  # the staged kernels' whole tables, rank-major at 2x4


@pytest.mark.parametrize("nodes,el", sorted(DEEPEP_BYTES))
def test_deepep_shape_sizes(nodes, el):
    got = tuple(jax_ep.internode_buffer_bytes(4096, 7168, nodes * el, 8, 256, ranks_per_node=el, fp8=True,
                                              layout=layout) for layout in ("rank_major", "expert_major"))
    assert got == DEEPEP_BYTES[nodes, el], f"{got}: update DEEPEP_BYTES and docs/internode.md's figures"
    if (nodes, el) == (2, 4):
        assert got[0] < 256 << 20 and got[0] < STAGED_2X4 // 8
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "internode.md").read_text()
    assert all(f"{b:,} bytes" in doc for b in got), "docs/internode.md's \"Buffer size\" table is stale"


def test_check_supported_names_the_limit():
    internode_ops.check_supported(topo.Topology(8, 4, virtual=True))
    with pytest.raises(NotImplementedError, match="at most 8 ranks per node"):
        internode_ops.check_supported(topo.Topology(32, 16, virtual=True))
    with pytest.raises(NotImplementedError, match="at most 64 ranks"):
        internode_ops.check_supported(topo.Topology(128, 8, virtual=True))


@pytest.mark.parametrize("t,h,el,k", [(4096, 7168, 4, 8), (2048, 1024, 2, 4), (300, 512, 1, 2), (64, 512, 4, 4)])
def test_buffer_bytes_cover_the_rings_of_every_channel_cap(t, h, el, k):
    """Where ranks share a GPU a buffer resolves fewer channels (channel_cap);
    the size internode_buffer_bytes gives, which cannot know that, holds the
    calls of every cap."""
    r = 8
    size = jax_ep.internode_buffer_bytes(t, h, r, k, 64, ranks_per_node=el)
    most = 0
    for cap in range(1, icfg.MAX_CHANNELS + 1):
        for op, row in (("dispatch", 2 * h), ("cached_dispatch", 2 * h), ("combine", 2 * h), ("combine", 16)):
            cfg = icfg.resolve_call(InternodeOptions(), num_nodes=r // el, ranks_per_node=el, num_tokens=t,
                                    row_bytes=row, num_topk=k, max_channels=cap)
            most = max(most, internode_ops.call_bytes(op, cfg, num_tokens=t, num_topk=k, num_experts=64))
    assert size >= most


def test_node_capacity_default_never_drops():
    assert internode_ops.node_capacity_for(InternodeOptions(), 4, 100) == 400
    assert internode_ops.node_capacity_for(InternodeOptions(num_max_rdma_recv_tokens=7), 4, 100) == 7
    assert internode_ops.node_capacity_for(InternodeOptions(), 2, 0) == 1


def test_buffer_rejects_bad_internode_options():
    with pytest.raises(TypeError, match="internode must be an InternodeOptions"):
        jax_ep.Buffer(num_experts=8, internode={"num_max_rdma_recv_tokens": 4})


@pytest.mark.parametrize("node_capacity,capacity", [(None, None), (5, None), (None, 9), (3, 6)])
@pytest.mark.parametrize("el", [1, 2, 4])
@pytest.mark.parametrize("layout,alignment", [("rank_major", 1), ("expert_major", 1), ("expert_major", 4)])
def test_handle_arrays_equal_the_plan(rng, node_capacity, capacity, el, layout, alignment):
    """The GPU test's numpy handle arrays (np_internode.handle_arrays) equal
    internode_plan.plan_dispatch's, drops at a forwarder and past C included."""
    r, t, k, e = 8, 6, 3, 16
    idxs = [np.where(rng.random((t, k)) < 0.1, -1, rng.integers(0, e, (t, k))).astype(np.int32) for _ in range(r)]
    nn = r // el
    cn = node_capacity or nn * t
    c = capacity or ip.default_output_capacity(layout, r, t, k, e // r, alignment)
    plan = ip.plan_dispatch(jnp.asarray(np.stack(idxs)), num_experts=e, ranks_per_node=el, capacity=c,
                            node_capacity=cn, layout=layout, expert_alignment=alignment)
    got = npi.handle_arrays(idxs, e, el, c, cn, layout=layout, alignment=alignment)
    for rank in range(r):
        np.testing.assert_array_equal(got[rank]["rdma_slot"], np.asarray(plan.rdma_slot[rank]))
        np.testing.assert_array_equal(got[rank]["fwd_src_node"], np.asarray(plan.fwd_src_node[rank]))
        np.testing.assert_array_equal(got[rank]["fwd_src_token"], np.asarray(plan.fwd_src_token[rank]))
        want_rows = np.asarray(plan.fwd_dst_row[rank])
        np.testing.assert_array_equal(got[rank]["fwd_dst_row"], want_rows[..., 0] if layout == "rank_major" else want_rows)
        src = np.asarray(plan.recv_src_rank[rank])
        table = np.where(src >= 0, np.asarray(plan.rdma_slot)[np.maximum(src, 0),
                                                               np.maximum(np.asarray(plan.recv_src_token[rank]), 0),
                                                               rank // el], -1)
        np.testing.assert_array_equal(got[rank]["recv_table_row"], table)


# --- lowering: an internode buffer's calls go to the internode targets ---------------


@pytest.fixture
def internode_buffer(monkeypatch):
    """Stand-in for a live internode buffer with id 7 (lowering needs no GPU)."""
    fake = types.SimpleNamespace(put_path=True, rank=0, num_ranks=R, buffer_id=7, internode=InternodeOptions(),
                                 topology=topo.Topology(R, L, virtual=True), max_channels=icfg.MAX_CHANNELS)
    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: fake)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: R)
    return fake


def _lower(fn, *args) -> list:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return [line for line in text.splitlines() if "stablehlo.custom_call @jax_ep_" in line]


X = jax.ShapeDtypeStruct((T, H), jnp.bfloat16)
IDX = jax.ShapeDtypeStruct((T, K), jnp.int32)
W = jax.ShapeDtypeStruct((T, K), jnp.float32)


@needs_extension
def test_dispatch_combine_and_gradient_lower_to_internode_targets(internode_buffer):
    opts = jax_ep.NormalOptions(backend="cuda", buffer_id=7)

    def step(x, idx, w):
        def loss(x, w):
            o = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=None, options=opts)
            z = jax_ep.cached_dispatch(x, o.handle)
            back = jax_ep.combine(o.recv_x * 2, o.handle)
            return jnp.sum(back.astype(jnp.float32)) + jnp.sum(z.astype(jnp.float32)) + jnp.sum(o.recv_topk_weights)
        return jax.grad(loss, argnums=(0, 1))(x, w)

    lines = _lower(step, X, IDX, W)
    names = {line.split("@", 1)[1].split("(", 1)[0] for line in lines}
    assert names == {"jax_ep_internode_dispatch", "jax_ep_internode_cached_dispatch", "jax_ep_internode_combine"}, names
    dispatch = [line for line in lines if "@jax_ep_internode_dispatch(" in line][0]
    assert "ranks_per_node = 2" in dispatch and f"node_capacity = {2 * T}" in dispatch, dispatch
    assert "layout = 0" in dispatch and f"capacity = {R * T}" in dispatch, dispatch
    # Every call carries the rings it resolves from the buffer's options (here
    # T = 8 tokens of 512-byte rows: one channel, the rings capped by T).
    rings = icfg.resolve_call(InternodeOptions(), num_nodes=2, ranks_per_node=L, num_tokens=T, row_bytes=2 * H,
                              num_topk=K).ffi_attrs()
    assert rings == dict(num_channels=1, rdma_chunk=8, rdma_ring=8, nvl_chunk=16, nvl_ring=16)
    for line in lines:
        if "x256xbf16>" in line.split("->")[-1] or "@jax_ep_internode_combine(" in line and "x256xbf16>" in line:
            for name, value in rings.items():
                assert f"{name} = {value} : i64" in line, (name, line)
    # The handle's forwarder arrays (rdma_slot, recv_src_rank, recv_table_row, fwd_src_node,
    # fwd_src_token, fwd_dst_row: cached dispatch; recv_src_rank, rdma_slot, fwd_*, recv_table_row: combine).
    cached = [line for line in lines if "@jax_ep_internode_cached_dispatch(" in line][0]
    assert (f"(tensor<{T}x{H}xbf16>, tensor<{T}x2xi32>, tensor<{R * T}xi32>, tensor<{R * T}xi32>, tensor<{2 * T}xi32>, "
            f"tensor<{2 * T}xi32>, tensor<{2 * T}x{L}x1xi32>) -> tensor<{R * T}x{H}xbf16>") in cached, cached
    combine = [line for line in lines if "@jax_ep_internode_combine(" in line][0]
    assert (f"(tensor<{R * T}x{H}xbf16>, tensor<{R * T}xi32>, tensor<{T}x2xi32>, tensor<{2 * T}xi32>, "
            f"tensor<{2 * T}xi32>, tensor<{2 * T}x{L}x1xi32>, tensor<{R * T}xi32>) -> tensor<{T}x{H}xbf16>") in combine
    small = [line for line in lines if "@jax_ep_internode_combine(" in line and f"-> tensor<{T}x4xf32>" in line]
    assert small, "the top-k weights' gradient: a combine of 16-byte rows"
    assert "rdma_chunk = 8 : i64" in small[0] and "num_channels = 1 : i64" in small[0], small[0]


@needs_extension
def test_rings_follow_the_buffer_options(internode_buffer):
    """Rings given in the buffer's InternodeOptions reach every call; the
    FP8 dispatch resolves its rings from its 16-byte-rounded values and
    scales together."""
    internode_buffer.internode = InternodeOptions(num_channels=3, rdma_chunk_tokens=2, rdma_ring_tokens=6,
                                                  nvl_chunk_tokens=3, nvl_ring_tokens=5)
    opts = jax_ep.NormalOptions(backend="cuda", buffer_id=7)

    def step(x, idx, w):
        o = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name=None, options=opts)
        return jax_ep.combine(o.recv_x, o.handle)

    lines = _lower(step, X, IDX, W)
    assert len(lines) == 2
    for line in lines:
        assert ("num_channels = 3 : i64" in line and "rdma_chunk = 2 : i64" in line and "rdma_ring = 6 : i64" in line
                and "nvl_chunk = 3 : i64" in line and "nvl_ring = 5 : i64" in line), line
    internode_buffer.internode = InternodeOptions()
    q = jax.ShapeDtypeStruct((T, 7168), jnp.float8_e4m3fn)
    sc = jax.ShapeDtypeStruct((T, 56), jnp.float32)
    fp8 = _lower(lambda q, s, i, w: jax_ep.dispatch((q, s), i, w, num_experts=E, axis_name=None,
                                                    options=opts).recv_x, q, sc, IDX, W)
    want = icfg.resolve_internode(InternodeOptions(), num_nodes=2, ranks_per_node=L, num_tokens=T, hidden=7168,
                                  num_topk=K, fp8=True)
    assert want.row_bytes == 7168 + 224
    # ceil(64 KiB / 7392) = 9 (a BF16 row of 14336 bytes would give 5).
    assert f"nvl_chunk = {want.nvl_chunk_tokens} : i64" in fp8[0] and want.nvl_chunk_tokens == 9, fp8[0]


@needs_extension
def test_buffer_rings_fit_the_ranks_sharing_a_gpu(monkeypatch):
    """A CUDA normal-mode Buffer over virtual nodes (an internode buffer: a
    stand-in here, no GPU) with 8 ranks on one 132-SM GPU derives at most
    channel_cap(132, 8) = 5 channels, which its calls lower with; a
    num_channels option above that is refused when a call resolves it."""
    from jax_ep import ll_put_runtime

    def create(num_bytes, topology, *, timeout_s=100.0):
        return ll_put_runtime.PutRuntime(1 << 23, 0, topology.num_ranks, int(num_bytes), topology,
                                         ("local",) * topology.num_ranks, timeout_s=timeout_s)

    monkeypatch.setattr(ll_put_runtime.PutRuntime, "create", staticmethod(create))
    monkeypatch.setattr(internode_ops.InternodeRuntime, "destroy",
                        lambda self, timeout_s=60.0: runtime._live.pop(self.buffer_id, None))
    monkeypatch.setattr(internode_ops, "_local_sm_count", lambda: 132)
    monkeypatch.setenv("JAX_EP_RANKS_PER_GPU", "8")
    n, t, h, k = len(jax.devices()), 2048, 1024, 4
    x = jax.ShapeDtypeStruct((t, h), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((t, k), jnp.int32)
    w = jax.ShapeDtypeStruct((t, k), jnp.float32)
    assert icfg.resolve_call(InternodeOptions(), num_nodes=n // 2, ranks_per_node=2, num_tokens=t, row_bytes=2 * h,
                             num_topk=k).num_channels == 10  # without the cap
    for internode, want in ((InternodeOptions(), 5), (InternodeOptions(num_channels=6), None)):
        with jax_ep.Buffer(num_experts=2 * n, axis_name=None, ranks_per_node=2, num_nvl_bytes=1 << 20,
                           normal=jax_ep.NormalOptions(backend="cuda"), internode=internode) as buf:
            assert buf._runtime.max_channels == 5
            monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: n)

            def step(x, idx, w):
                return buf.dispatch(x, idx, w).recv_x

            if want is None:
                with pytest.raises(ValueError, match="num_channels=6: .* at most 5 channels fit"):
                    _lower(step, x, idx, w)
                continue
            line = [line for line in _lower(step, x, idx, w) if "@jax_ep_internode_dispatch(" in line][0]
            assert f"num_channels = {want} : i64" in line, line


@needs_extension
def test_fp8_dispatch_lowers_to_the_fp8_target(internode_buffer):
    opts = jax_ep.NormalOptions(backend="cuda", buffer_id=7)
    q = jax.ShapeDtypeStruct((T, 512), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((T, 4), jnp.float32)

    def step(q, s, idx, w):
        return jax_ep.dispatch((q, s), idx, w, num_experts=E, axis_name=None, options=opts).recv_x

    lines = _lower(step, q, s, IDX, W)
    assert len(lines) == 1 and "@jax_ep_internode_dispatch_fp8(" in lines[0], lines
    bad = jax.ShapeDtypeStruct((T, 2), jnp.float32)  # 8-byte scale rows: H % 512 != 0
    with pytest.raises(ValueError, match="hidden % 512 == 0"):
        _lower(step, jax.ShapeDtypeStruct((T, 256), jnp.float8_e4m3fn), bad, IDX, W)


@needs_extension
def test_expert_major_lowers_with_its_slots(internode_buffer):
    """Expert-major: layout and alignment attributes, fwd_dst_row [Cn, L, K]
    in the handle and as the combine's operand."""
    opts = jax_ep.NormalOptions(backend="cuda", buffer_id=7, layout="expert_major", expert_alignment=4)

    def step(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=E, axis_name=None, options=opts)
        assert o.expert_group_sizes.shape == (E // R,)
        assert o.handle.extra["fwd_dst_row"].shape == (2 * T, L, K)
        return jax_ep.combine(o.recv_x, o.handle)

    lines = _lower(step, X, IDX, W)
    dispatch = [line for line in lines if "@jax_ep_internode_dispatch(" in line][0]
    assert "layout = 1" in dispatch and "expert_alignment = 4" in dispatch, dispatch
    combine = [line for line in lines if "@jax_ep_internode_combine(" in line][0]
    assert f"tensor<{2 * T}x{L}x{K}xi32>" in combine, combine


# --- the kernels' placement, restated step by step --------------------------------


def _kernel_placement(idxs, e, el, c, cn, layout, alignment):
    """What dispatch_scan computes on every rank (cuda/internode_dispatch.cu),
    restated with its loops: per destination, {output row: (source rank,
    token, slot)}, the group sizes and the rows kept."""
    r = len(idxs)
    nn, le = r // el, e // r
    tables, _, _ = npi.forwarder_tables(idxs, e, el, cn)  # rows in (source node, token) order
    out = []
    for d in range(r):
        m = d // el
        segments = [[(n, f, i, tok) for i, (sn, tok, _) in enumerate(tables[m * el + f]) if sn == n]
                    for n in range(nn) for f in range(el)]  # (source node, rail) order
        placed, sizes, kept = {}, None, 0
        if layout == "rank_major":
            running = 0
            for seg in segments:
                for n, f, i, tok in seg:
                    ids = idxs[n * el + f][tok]
                    if any(0 <= x < e and x // le == d for x in ids):
                        if running < c:
                            placed[running] = (n * el + f, tok, 0)
                        running += 1
            kept = min(running, c)
        else:
            def first_local(ids):
                return {int(x) - d * le: k for k, x in enumerate(ids)
                        if 0 <= x < e and x // le == d and x not in ids[:k]}
            count = [0] * le
            for seg in segments:
                for n, f, i, tok in seg:
                    for x in first_local(idxs[n * el + f][tok]):
                        count[x] += 1
            start, at, sizes = [], 0, []
            for x in range(le):
                aligned = -(-count[x] // alignment) * alignment
                start.append(at)
                sizes.append(min(at + aligned, c) - min(at, c))
                at += aligned
            for x in range(le):
                running = start[x]
                for seg in segments:
                    for n, f, i, tok in seg:
                        k = first_local(idxs[n * el + f][tok]).get(x)
                        if k is not None:
                            if running < c:
                                placed[running] = (n * el + f, tok, k)
                            running += 1
                kept += max(0, min(c - start[x], count[x]))
        out.append((placed, sizes, kept))
    return out


@pytest.mark.parametrize("layout,alignment", [("rank_major", 1), ("expert_major", 1), ("expert_major", 4)])
@pytest.mark.parametrize("el,node_capacity,capacity", [(2, None, None), (4, 7, None), (1, None, 20), (2, 5, 17)])
def test_kernel_placement_equals_the_reference(rng, layout, alignment, el, node_capacity, capacity):
    """The placement the scan kernel computes (segments in (source node,
    rail) order, expert-major groups from the delivered counts) equals the
    numpy reference's rows, group sizes and kept rows."""
    r, t, k, e = 8, 7, 3, 16
    idxs = [np.where(rng.random((t, k)) < 0.1, -1, rng.integers(0, e, (t, k))).astype(np.int32) for _ in range(r)]
    cn = node_capacity or (r // el) * t
    c = capacity or ip.default_output_capacity(layout, r, t, k, e // r, alignment)
    xs = [np.arange(t, dtype=np.float32)[:, None] + 100 * s for s in range(r)]
    ws = [np.ones((t, k), np.float32) for _ in range(r)]
    refs = npi.dispatch(xs, idxs, ws, e, el, c, cn, layout, alignment)
    for d, (placed, sizes, kept) in enumerate(_kernel_placement(idxs, e, el, c, cn, layout, alignment)):
        assert sorted(placed) == sorted(refs[d]["pos"]), d
        assert [placed[o][:2] for o in refs[d]["pos"]] == refs[d]["src"], d
        assert kept == len(refs[d]["src"])
        if layout == "expert_major":
            np.testing.assert_array_equal(sizes, refs[d]["group_sizes"])


def test_gpu_scripts_compile_and_are_wired(tmp_path):
    """The GPU test, the fault check and the benchmark byte-compile, and the
    GPU suite and benchmark runner reach them (multirank_*.py are picked up
    by name)."""
    import pathlib
    import py_compile

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in ("tests/gpu/multirank_internode.py", "tests/gpu/put_stopped_rank.py",
                 "tests/gpu/check_put_stopped_rank.py", "benchmarks/bench_internode.py"):
        py_compile.compile(str(root / path), doraise=True, cfile=str(tmp_path / "check.pyc"))
    suite = (root / "scripts/gpu_suite.sh").read_text()
    assert "tests/gpu/multirank_*.py" in suite and "check_put_stopped_rank.py 4 2 internode" in suite
    assert "bench_internode.py" in (root / "benchmarks/run_all.sh").read_text()


@pytest.mark.parametrize("el,layout,alignment,capacity,node_capacity",
                         [(2, "rank_major", 1, 40, 35), (4, "expert_major", 4, 50, 40)])
def test_gpu_test_checks_accept_the_plan(el, layout, alignment, capacity, node_capacity):
    """The GPU test's reference and checks (its helpers, run here without a
    GPU) accept outputs made from internode_plan for every rank: rows, top-k,
    counts, drops, group sizes, every handle array, and the combine."""
    import os
    import pathlib
    import types as _types

    import ml_dtypes

    import np_reference as npr
    from gpu.rank_checks import calc_diff

    src = (pathlib.Path(__file__).parent / "gpu" / "multirank_internode.py").read_text()
    helpers = src[src.index("def global_inputs"):src.index("for EL in SHAPES:")]
    r, t, k, e, h = 8, 32, 4, 32, 128
    em = layout == "expert_major"
    c = capacity or ip.default_output_capacity(layout, r, t, k, e // r, alignment)
    cn = node_capacity or (r // el) * t
    def helpers_of(me):
        ns = dict(R=r, ME=me, os=os, np=np, ml_dtypes=ml_dtypes, npi=npi, npr=npr, calc_diff=calc_diff, jax=jax, jnp=jnp)
        exec(helpers, ns)  # noqa: S102 - the GPU script's own helpers
        return ns

    xs, idxs, ws = helpers_of(0)["global_inputs"](5, t, k, e, h)
    plan = ip.plan_dispatch(jnp.asarray(np.stack(idxs)), num_experts=e, ranks_per_node=el, layout=layout,
                            capacity=c, node_capacity=cn, expert_alignment=alignment)
    refs = npi.dispatch(xs, idxs, ws, e, el, c, cn, layout, alignment)
    flat = (npr.dispatch_expert_major(xs, idxs, ws, e, c, alignment) if em
            else npr.dispatch_rank_major(xs, idxs, ws, e, c))
    handles = npi.handle_arrays(idxs, e, el, c, cn, refs, layout=layout, alignment=alignment)
    rxs = np.asarray(ip.dispatch_two_legs(jnp.asarray(np.stack([x.astype(np.float32) for x in xs])), plan))
    backs = np.asarray(ip.combine_two_legs(jnp.asarray(np.stack([ref["x"].astype(np.float32) for ref in refs])), plan))
    rdma_slot = np.asarray(plan.rdma_slot)
    for me in range(r):
        ns = helpers_of(me)
        src_rank, src_tok = np.asarray(plan.recv_src_rank[me]), np.asarray(plan.recv_src_token[me])
        table_row = np.where(src_rank >= 0, rdma_slot[np.maximum(src_rank, 0), np.maximum(src_tok, 0), me // el], -1)
        extra = dict(rdma_slot=plan.rdma_slot[me], fwd_src_node=plan.fwd_src_node[me],
                     fwd_src_token=plan.fwd_src_token[me], fwd_dst_row=plan.fwd_dst_row[me], recv_table_row=table_row)
        out = _types.SimpleNamespace(
            recv_x=rxs[me].astype(ml_dtypes.bfloat16), recv_topk_idx=refs[me]["idx"],
            recv_topk_weights=refs[me]["w"], num_recv_tokens_per_expert=flat[me]["counts"],
            num_dropped=int(plan.num_dropped[me]), num_recv_rows=int(plan.num_recv_rows[me]),
            expert_group_sizes=plan.expert_group_sizes[me] if em else None,
            handle=_types.SimpleNamespace(recv_src_rank=src_rank, recv_src_token=src_tok, extra=extra))
        ns["check_dispatch"](out, refs, flat, handles, "plan", expert_major=em)
        assert calc_diff(backs[me], ns["expected_combine"]([ref["x"] for ref in refs], refs, t, h)) < 5e-6
