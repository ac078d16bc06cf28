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
from jax_ep import internode_plan as ip
from jax_ep import topology as topo
from jax_ep.options import InternodeOptions

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")
needs_nvshmem = pytest.mark.skipif(not nvshmem.available(), reason=nvshmem.unavailable_reason() or "-")

T, K, E, H, R, L = 8, 2, 8, 256, 4, 2


@needs_nvshmem
@pytest.mark.parametrize("op", ["dispatch", "cached_dispatch", "combine"])
@pytest.mark.parametrize("t,n,el,cn,c", [(4096, 2, 4, 8192, 32768), (37, 2, 2, 74, 148), (5, 4, 1, 3, 20),
                                         (0, 2, 1, 1, 1)])
def test_python_sizes_equal_the_kernels_layout(op, t, n, el, cn, c):
    """internode_ops.call_bytes restates cuda/internode.cuh's Layout: equal bytes."""
    kw = dict(row_bytes=7168 * 2, num_topk=8 if op == "dispatch" else 0, num_experts=256 if op == "dispatch" else 0,
              cols=7168 if op == "combine" else 0)
    py = internode_ops.call_bytes(op, num_tokens=t, num_nodes=n, ranks_per_node=el, node_capacity=cn, capacity=c,
                                  **kw)
    cc = nvshmem._module().internode_buffer_bytes(internode_ops._OPS[op], t, kw["num_topk"], kw["num_experts"], n,
                                                  el, cn, c, kw["row_bytes"], kw["cols"])
    assert py == cc


def test_buffer_bytes_cover_every_call_and_grow_with_capacity():
    small = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, capacity=100, node_capacity=80)
    big = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4)
    assert small < big
    common = dict(num_tokens=64, num_nodes=2, ranks_per_node=4, node_capacity=128, capacity=512)
    assert big >= internode_ops.call_bytes("combine", row_bytes=1024, cols=512, **common)
    assert big >= internode_ops.call_bytes("dispatch", row_bytes=1024, num_topk=4, num_experts=32, **common)
    fp8 = jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=4, fp8=True)
    assert fp8 == big  # the combine's BF16 rows need more than FP8 dispatch rows
    with pytest.raises(ValueError, match="must divide num_ranks"):
        jax_ep.internode_buffer_bytes(64, 512, 8, 4, 32, ranks_per_node=3)


def test_check_supported_names_the_limit():
    internode_ops.check_supported(topo.Topology(8, 4, virtual=True))
    with pytest.raises(NotImplementedError, match="at most 8 ranks per node"):
        internode_ops.check_supported(topo.Topology(32, 16, virtual=True))
    with pytest.raises(NotImplementedError, match="at most 64 ranks"):
        internode_ops.check_supported(topo.Topology(128, 8, virtual=True))
    with pytest.raises(NotImplementedError, match="rank-major layout only"):
        internode_ops.check_supported(topo.Topology(8, 4, virtual=True), "expert_major")


def test_node_capacity_default_never_drops():
    assert internode_ops.node_capacity_for(InternodeOptions(), 4, 100) == 400
    assert internode_ops.node_capacity_for(InternodeOptions(num_max_rdma_recv_tokens=7), 4, 100) == 7
    assert internode_ops.node_capacity_for(InternodeOptions(), 2, 0) == 1


def test_buffer_rejects_bad_internode_options():
    with pytest.raises(TypeError, match="internode must be an InternodeOptions"):
        jax_ep.Buffer(num_experts=8, internode={"num_max_rdma_recv_tokens": 4})


@pytest.mark.parametrize("node_capacity,capacity", [(None, None), (5, None), (None, 9), (3, 6)])
@pytest.mark.parametrize("el", [1, 2, 4])
def test_handle_arrays_equal_the_plan(rng, node_capacity, capacity, el):
    """The GPU test's numpy handle arrays (np_internode.handle_arrays) equal
    internode_plan.plan_dispatch's, drops at a forwarder and past C included."""
    r, t, k, e = 8, 6, 3, 16
    idxs = [np.where(rng.random((t, k)) < 0.1, -1, rng.integers(0, e, (t, k))).astype(np.int32) for _ in range(r)]
    nn = r // el
    cn = node_capacity or nn * t
    c = capacity or r * t
    plan = ip.plan_dispatch(jnp.asarray(np.stack(idxs)), num_experts=e, ranks_per_node=el, capacity=c,
                            node_capacity=cn)
    got = npi.handle_arrays(idxs, e, el, c, cn)
    for rank in range(r):
        np.testing.assert_array_equal(got[rank]["rdma_slot"], np.asarray(plan.rdma_slot[rank]))
        np.testing.assert_array_equal(got[rank]["fwd_src_node"], np.asarray(plan.fwd_src_node[rank]))
        np.testing.assert_array_equal(got[rank]["fwd_src_token"], np.asarray(plan.fwd_src_token[rank]))
        np.testing.assert_array_equal(got[rank]["fwd_dst_row"], np.asarray(plan.fwd_dst_row[rank, :, :, 0]))
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
                                 topology=topo.Topology(R, L, virtual=True))
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
def test_expert_major_is_refused_at_trace_time(internode_buffer):
    opts = jax_ep.NormalOptions(backend="cuda", buffer_id=7, layout="expert_major")
    with pytest.raises(NotImplementedError, match="rank-major layout only"):
        _lower(lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name=None, options=opts).recv_x,
               X, IDX, W)
