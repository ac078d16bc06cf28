"""The low-latency put path from JAX, on CPU: its FFI targets (jax_ep._nvshmem)
lower for CUDA with their operands and attributes, a put-path buffer's calls
go there (and nowhere else), and bad arguments get clear errors. The kernels
themselves run only on GPUs (tests/gpu/multirank_virtual_nodes.py)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import _extension, nvshmem, runtime
from jax_ep.ll_put_runtime import plan_peers

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")
needs_nvshmem = pytest.mark.skipif(not nvshmem.available(), reason=nvshmem.unavailable_reason() or "-")

T, K, E, H, R, M = 8, 2, 8, 512, 4, 8
PUT_TARGETS = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


@pytest.fixture
def put_buffer(monkeypatch):
    """Stand-in for a live put-path buffer with id 7 (lowering needs no GPU)."""
    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: types.SimpleNamespace(put_path=True, rank=0))
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: R)


def _options(**kw):
    return jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=M, backend="cuda", buffer_id=7, **kw)


def _lower(fn, *args) -> list:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return [line for line in text.splitlines() if "stablehlo.custom_call @jax_ep_" in line]


def _line(lines, target):
    found = [line for line in lines if f"@{target}(" in line]
    assert len(found) == 1, (target, lines)
    return found[0]


def _operands(line) -> list:
    return line.split("(", 1)[1].split(")", 1)[0].split(",")


X = jax.ShapeDtypeStruct((T, H), jnp.bfloat16)
IDX = jax.ShapeDtypeStruct((T, K), jnp.int32)
W = jax.ShapeDtypeStruct((T, K), jnp.float32)


@needs_extension
@pytest.mark.parametrize("async_send", [True, False])
def test_put_buffer_calls_lower_to_the_put_targets(put_buffer, async_send):
    """One-call and split dispatch/combine of a put-path buffer lower to the
    put targets only, each with the rank mask first, the buffer's attributes,
    and no trailing operands (a send only issues puts: nothing of its inputs
    need outlive it)."""
    opts = _options(async_send=async_send)

    def step(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=opts)
        fused = jax_ep.low_latency_combine(o.recv_x, w, o.handle)
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, axis_name=None, options=opts, after=fused)
        busy = pending.then(x).astype(jnp.float32).sum()
        o2 = jax_ep.low_latency_dispatch_recv(pending, after=busy)
        p2 = jax_ep.low_latency_combine_send(o2.recv_x, o2.handle)
        return fused, jax_ep.low_latency_combine_recv(p2, w, after=busy)

    lines = _lower(step, X, IDX, W)
    assert not [line for line in lines if "@jax_ep_ll_" in line and "@jax_ep_ll_put_" not in line], lines
    for op in PUT_TARGETS:
        found = [line for line in lines if f"@jax_ep_ll_put_{op}(" in line]
        assert len(found) == 2, (op, lines)  # the one-call op and the split
        for line in found:
            assert f"tensor<{R}xi1>" in line.split("->", 1)[0].split(":")[-1].split(",")[0], line
            for attr in ("buffer_id = 7 : i64", f"num_experts = {E} : i64", f"max_tokens = {M} : i64",
                         f"hidden = {H} : i64", f"num_topk = {K} : i64", "payload = 0 : i64"):
                assert attr in line, (attr, line)
            if op != "dispatch_send":
                assert f"num_tokens = {T} : i64" in line, line
            assert "zero_copy" not in line and "pull" not in line, line
            want = {"dispatch_send": 3, "dispatch_recv": 2, "combine_send": 5, "combine_recv": 4}[op]
            assert len(_operands(line)) == want, line


@needs_extension
@pytest.mark.parametrize("use_ue8m0,round_scale,payload,scales", [
    (False, False, 1, f"{H // 128}xf32"), (False, True, 2, f"{H // 128}xf32"), (True, True, 3, f"{H // 512}xi32")])
def test_put_dispatch_fp8_outputs(put_buffer, use_ue8m0, round_scale, payload, scales):
    """FP8 dispatch over puts: the payload code and the pointer path's output types."""
    opts = _options(fp8=jax_ep.FP8Options(round_scale=round_scale, use_ue8m0=use_ue8m0))

    def fn(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=opts).recv_x

    line = _line(_lower(fn, X, IDX), "jax_ep_ll_put_dispatch_recv")
    assert f"payload = {payload} : i64" in line
    rows = R * M
    assert f"tensor<{E // R}x{rows}x{H}xf8E4M3FN>" in line and f"tensor<{E // R}x{rows}x{scales}>" in line, line


@needs_extension
def test_put_path_refusals(put_buffer):
    """What the put path does not take: H % 128 != 0; per-slot rows with an
    FP8 payload; the gradient of an FP8 dispatch (as on the pointer path)."""
    from jax_ep import cuda_put_ops

    def combine(x, idx, w, opts):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=opts)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    x8 = jax.ShapeDtypeStruct((T, 136), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"put path needs hidden % 128 == 0, got H=136"):
        jax.jit(combine, static_argnums=3).trace(x8, IDX, W, _options())
    spec = jax_ep.handle.LowLatencySpec(num_ranks=R, num_experts=E, num_tokens=T, num_topk=K, hidden=H,
                                        axis_name=None, options=_options(fp8=jax_ep.FP8Options()))
    with pytest.raises(ValueError, match=r"per-slot rows must be bfloat16 \[T, K, H\].*BF16 dispatch"):
        cuda_put_ops.ll_dispatch_send(jnp.zeros((T, K, H), jnp.bfloat16), jnp.zeros((T, K), jnp.int32), spec)

    def fp8_loss(x, idx):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=_options(fp8=jax_ep.FP8Options()))
        return jnp.sum(o.recv_x[0].astype(jnp.float32))

    with pytest.raises(NotImplementedError, match=r"low_latency_dispatch with FP8 has no gradient"):
        jax.jit(jax.grad(fp8_loss)).trace(X, IDX)


@needs_extension
def test_put_combine_fp8_lowers(put_buffer):
    """combine_fp8=True over puts: the combine's targets take combine_payload = 1
    (every target carries it, as on the pointer path), same operands and output."""
    opts = _options(combine_fp8=True)

    def fn(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=opts)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    lines = _lower(fn, X, IDX, W)
    for op in PUT_TARGETS:
        assert "combine_payload = 1 : i64" in _line(lines, f"jax_ep_ll_put_{op}"), op
    assert f"tensor<{T}x{H}xbf16>" in _line(lines, "jax_ep_ll_put_combine_recv").split("->")[-1]
    assert not [line for line in lines if "@jax_ep_ll_" in line and "@jax_ep_ll_put_" not in line], lines
    plain = _lower(lambda x, i, w: jax_ep.low_latency_combine(
        *(lambda o: (o.recv_x, w, o.handle))(jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name=None,
                                                                        options=_options()))), X, IDX, W)
    assert "combine_payload = 0 : i64" in _line(plain, "jax_ep_ll_put_combine_send")


@needs_extension
@pytest.mark.parametrize("combine_fp8", [False, True])
def test_put_gradients_lower(put_buffer, combine_fp8):
    """Gradients over puts, as on the pointer path: the backward of combine
    gathers y's rows back unsummed (a combine send with BF16 rows, then
    jax_ep_ll_put_combine_gather_recv [T, K, H]) and dispatches per-slot rows
    (a dispatch send of bf16 [T, K, H]); the backward of dispatch gathers the
    cotangent's rows back. Only put targets, each with its attributes."""
    opts = _options(combine_fp8=combine_fp8)

    def loss(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=opts)
        y = o.recv_x.astype(jnp.float32) * 2.0
        out = jax_ep.low_latency_combine(y.astype(jnp.bfloat16), w, o.handle)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    if combine_fp8:  # as on the pointer path: the cast has no gradient
        with pytest.raises(NotImplementedError, match=r"combine_fp8=True has no gradient"):
            _lower(jax.grad(loss, argnums=(0, 2)), X, IDX, W)
        return
    lines = _lower(jax.grad(loss, argnums=(0, 2)), X, IDX, W)
    assert not [line for line in lines if "@jax_ep_ll_" in line and "@jax_ep_ll_put_" not in line], lines
    count = lambda op: len([line for line in lines if f"@jax_ep_ll_put_{op}(" in line])  # noqa: E731
    # forward: dispatch + combine; backward of combine: gather back + per-slot dispatch;
    # backward of dispatch: gather back.
    assert (count("dispatch_send"), count("dispatch_recv")) == (2, 2), lines
    assert (count("combine_send"), count("combine_recv"), count("combine_gather_recv")) == (3, 1, 2), lines
    per_slot = [line for line in lines if "@jax_ep_ll_put_dispatch_send(" in line and f"tensor<{T}x{K}x{H}xbf16>" in line]
    assert len(per_slot) == 1 and "payload = 0 : i64" in per_slot[0], lines
    for line in lines:
        if "@jax_ep_ll_put_combine_gather_recv(" in line:
            assert "combine_payload = 0 : i64" in line and f"tensor<{T}x{K}x{H}xbf16>" in line.split("->")[-1], line
            assert len(_operands(line)) == 3, line  # rank mask, token, topk_idx
    sends = [line for line in lines if "@jax_ep_ll_put_combine_send(" in line]
    assert all("combine_payload = 0 : i64" in line for line in sends), sends


@needs_extension
def test_put_gradients_of_the_split_and_fused_ops_trace(put_buffer):
    """jax.vjp through the one-call ops with a rank mask traces on the put path."""
    def fn(x, w, idx, mask):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=_options(), rank_mask=mask)
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    def grads(x, w, idx, mask):
        out, vjp = jax.vjp(lambda x, w: fn(x, w, idx, mask), x, w)
        return vjp(jnp.ones_like(out))

    lines = _lower(grads, X, W, IDX, jax.ShapeDtypeStruct((R,), jnp.bool_))
    assert any("@jax_ep_ll_put_combine_gather_recv(" in line for line in lines), lines


@needs_extension
def test_pointer_buffer_keeps_the_pointer_targets(monkeypatch):
    """A buffer without put_path (the pointer path's runtime) never reaches the put targets."""
    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: types.SimpleNamespace(rank=0))
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: R)

    def fn(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=_options())
        return jax_ep.low_latency_combine(o.recv_x, w, o.handle)

    lines = _lower(fn, X, IDX, W)
    assert lines and not [line for line in lines if "@jax_ep_ll_put_" in line], lines


@needs_nvshmem
def test_put_targets_registered_for_cuda():
    """jax_ep._nvshmem registers the put path's and internode mode's targets, once."""
    from jax_ep.internode_ops import TARGETS as INTERNODE_TARGETS

    put = [f"jax_ep_ll_put_{op}" for op in PUT_TARGETS + ("combine_gather_recv", "status")]
    assert nvshmem.register_targets() == tuple(sorted(put + list(INTERNODE_TARGETS)))
    assert nvshmem.register_targets() is nvshmem.register_targets()  # once


@needs_nvshmem
def test_put_buffer_bytes():
    """DeepEP's LL shape fits; the FP8 layout is no larger than BF16's; shapes
    the put kernels refuse get a ValueError naming the limits."""
    bf16 = jax_ep.low_latency_buffer_bytes(128, 7168, 16, 8, 256, ranks_per_node=8)
    fp8 = jax_ep.low_latency_buffer_bytes(128, 7168, 16, 8, 256, fp8=jax_ep.FP8Options(), ranks_per_node=8)
    assert bf16 == fp8 > 0
    # The regions are sized by the BF16 message, whatever the payload: an FP8
    # dispatch and the BF16 dispatch of a backward pass share the halves.
    assert nvshmem._module().put_buffer_bytes(128, 128, 8, 256, 7168, 1, 16) == bf16
    with pytest.raises(ValueError, match=r"E a multiple of R"):
        jax_ep.low_latency_buffer_bytes(8, 512, 3, 2, 8, ranks_per_node=1)


@needs_nvshmem
def test_create_put_buffer_argument_errors():
    """The registry checks its arguments before touching a GPU."""
    N = nvshmem._module()
    good = dict(device=0, rank=0, num_ranks=2, local=1 << 20, num_bytes=1 << 20, mapped=[1 << 20, 0], paths=[0, 1],
                timeout_s=1.0)
    for change, message in [
        (dict(num_ranks=0), r"num_ranks must be in \[1, "),
        (dict(rank=2), r"rank outside \[0, num_ranks\)"),
        (dict(paths=[0]), r"one mapped pointer and one path per rank"),
        (dict(paths=[0, 2]), r"a path is 0 \(pointer\) or 1 \(put\)"),
        (dict(mapped=[1 << 20, 0], paths=[0, 0]), r"rank 1 has the pointer path but no mapped copy"),
        (dict(local=0), r"no local copy"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            N.create_put_buffer(**{**good, **change})
    assert dict(N.put_buffer_failure(12345)) == dict(code=0, rank=0, peer=0, op=0, call=0, peer_call=0, seconds=0.0,
                                                     mine=[0] * 12, theirs=[0] * 12)


@needs_extension
def test_put_mismatch_record_names_the_field_and_rank():
    """A put buffer's mismatch record (both signatures) reads as the pointer
    path's: a CommunicationError of kind "mismatch" naming the first field
    that differs and both ranks."""
    from jax_ep.ll_put_runtime import error_from_put_record

    # intranode::SigField order: op, T, M, row bytes, K, E, num_sms, chunk, ring, layout, payload, mode
    mine = [3, 0, 32, 1024, 2, 4, 4, 0, 0, 0, 0, 0]
    theirs = list(mine)
    theirs[6] = 8
    err = error_from_put_record(dict(code=3, rank=0, peer=1, op=3, call=1, peer_call=5, seconds=60.0, mine=mine,
                                     theirs=theirs))
    assert isinstance(err, jax_ep.CommunicationError) and err.kind == "mismatch" and err.peer == 1, err
    assert "rank 0 and rank 1 made different calls in the low-latency dispatch (call 1): num_sms is 4 on rank 0 " \
           "and 8 on rank 1" in str(err), err
    theirs = list(mine)
    theirs[11] = 1
    err = error_from_put_record(dict(code=3, rank=1, peer=0, op=4, call=2, mine=mine[:10] + [0, 0], theirs=theirs))
    assert "low-latency combine (call 2): mode" in str(err), err


def test_plan_peers():
    """Pointer peers need nvshmem_ptr; put peers map to 0."""
    mapped, names = plan_peers(1, np.array([0, 0, 1, 1]), (100, 200, None, 400), ("p2p", "p2p", "rdma", "p2p"))
    assert mapped == [100, 200, 0, 0] and names == ("p2p", "local", "put", "put")
    with pytest.raises(RuntimeError, match=r"rank 0 is in rank 1's node but NVSHMEM reaches it only through 'rdma'"):
        plan_peers(1, np.array([0, 0, 1, 1]), (None, 200, None, 400), ("rdma", "p2p", "rdma", "p2p"))


@needs_extension
def test_buffer_across_virtual_nodes_lowers_to_the_put_path(monkeypatch):
    """A CUDA low-latency Buffer over virtual nodes with ll_transport='nvshmem'
    creates a put-path buffer (a stand-in here: no GPU) and its methods lower
    to the put targets with that buffer's id, and so does status()."""
    from jax_ep import ll_put_runtime

    made = []

    class StandIn(ll_put_runtime.PutRuntime):
        def failure(self):
            return None

        def destroy(self, timeout_s: float = 60.0):
            runtime._live.pop(self.buffer_id, None)

    def create(num_bytes, topology, *, timeout_s=100.0):
        rt = StandIn(1 << 22, 0, topology.num_ranks, int(num_bytes), topology,
                     tuple("local" if r == 0 else ("p2p" if topology.same_node(0, r) else "put")
                           for r in range(topology.num_ranks)), timeout_s=timeout_s)
        runtime._live[rt.buffer_id] = rt
        made.append(rt)
        return rt

    monkeypatch.setattr(ll_put_runtime.PutRuntime, "create", staticmethod(create))
    n = len(jax.devices())
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=M, backend="cuda")
    with jax_ep.Buffer(num_experts=2 * n, axis_name=None, ranks_per_node=2, ll_transport="nvshmem",
                       low_latency=opts, num_ll_bytes=1 << 20) as buf:
        assert made and buf.low_latency.buffer_id == 1 << 22
        assert buf.low_latency_transports[:3] == ("local", "p2p", "put")
        assert not buf.low_latency_zero_copy

        def step(x, idx, w):
            o = buf.low_latency_dispatch(x, idx)
            return buf.low_latency_combine(o.recv_x, w, o.handle)

        lines = _lower(step, X, IDX, W)
        assert [line.split("@", 1)[1].split("(", 1)[0] for line in lines] == [
            f"jax_ep_ll_put_{op}" for op in PUT_TARGETS]
        assert all(f"buffer_id = {1 << 22} : i64" in line for line in lines)
        def status(x, idx, w):
            return buf.status(step(x, idx, w), mode="low_latency")

        line = _line(_lower(status, X, IDX, W), "jax_ep_ll_put_status")
        assert f"buffer_id = {1 << 22} : i64" in line and "-> tensor<4xi32>" in line, line
        assert len(_operands(line)) == 1, line  # ordered after the combine by its output
    assert (1 << 22) not in runtime._live


@needs_extension
def test_put_status_lowers_after_its_operands(put_buffer):
    """jax_ep.status on a put-path buffer: the put path's status target, with
    the calls it reads after as operands and the buffer id, s32[4] out."""
    from jax_ep import cuda_put_ops

    def fn(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name=None, options=_options())
        out = jax_ep.low_latency_combine(o.recv_x, w, o.handle)
        return cuda_put_ops.status(7, (out, o.recv_count))

    line = _line(_lower(fn, X, IDX, W), "jax_ep_ll_put_status")
    assert "buffer_id = 7 : i64" in line and "-> tensor<4xi32>" in line, line
    assert len(_operands(line)) == 2, line


def _record(**kw):
    return {"code": 0, "rank": 1, "peer": -1, "op": 3, "call": 4, "peer_call": 4, "seconds": 5.0, **kw}


@needs_extension
def test_put_runtime_failure_messages(monkeypatch):
    """The put buffer's failure record (the pointer path's) becomes the
    pointer path's CommunicationError and message: a timeout names the peer
    waited for, the call and the timeout; an abort names the rank that raised
    it; a record still being written is a failure too; 0 is none."""
    from jax_ep import faults, topology
    from jax_ep.ll_put_runtime import PutRuntime

    record = {"value": _record()}
    monkeypatch.setattr(nvshmem, "_module", lambda: types.SimpleNamespace(put_buffer_failure=lambda i: record["value"]))
    rt = PutRuntime(1 << 22, 1, 4, 1 << 20, topology.make_topology(4, 2, environ={}), timeout_s=5.0)
    assert rt.failure() is None
    record["value"] = _record(code=faults.STATUS_TIMEOUT, peer=3, seconds=2.5)
    err = rt.failure()
    assert isinstance(err, faults.CommunicationError)
    assert (err.kind, err.rank, err.peer, err.call) == ("timeout", 1, 3, 4)
    assert "rank 1 timed out after 2.5 s in the low-latency dispatch" in str(err), err
    assert "waiting for rank 3" in str(err) and "call 4" in str(err) and "re-created" in str(err), err
    record["value"] = _record(code=faults.STATUS_ABORTED, peer=2, op=4, peer_call=faults.STATUS_TIMEOUT)
    err = rt.failure()
    assert (err.kind, err.peer) == ("aborted", 2)
    assert "rank 1 stopped its low-latency combine: rank 2 failed first" in str(err), err
    record["value"] = _record(code=-1)
    assert "recording a failure" in str(rt.failure())




@pytest.mark.parametrize("r", [2, 4])
def test_numpy_gradient_reference_matches_the_reference_backend(rng, r):
    """np_reference.ll_combine_grads / ll_dispatch_grad, which the GPU test of
    the put path's gradients (tests/gpu/multirank_put_path.py) checks against,
    agree with the reference backend's VJPs (duplicated ids, masked slots)."""
    import ml_dtypes
    import np_reference as npr
    from conftest import random_routing, run_ranks

    t, k, e, h, m = 6, 3, 2 * r, 16, 8
    le = e // r
    idxs = random_routing(rng, r, t, k, e, mask_prob=0.2, distinct=False)
    bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    xs = [bf(rng.standard_normal((t, h))) for _ in range(r)]
    ws = [rng.random((t, k)).astype(np.float32) for _ in range(r)]
    gs = [bf(rng.standard_normal((t, h))) for _ in range(r)]
    gds = [bf(rng.standard_normal((le, r * m, h))) for _ in range(r)]
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m)

    def f(x, i, w, g, gd):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts)
        _, vjp = jax.vjp(lambda y, w: jax_ep.low_latency_combine(y, w, o.handle), o.recv_x, w)
        gy, gw = vjp(g)
        _, vjp_x = jax.vjp(lambda x: jax_ep.low_latency_dispatch(x, i, num_experts=e, options=opts).recv_x, x)
        return gy, gw, vjp_x(gd)[0], o.handle.recv_src_rank

    gy, gw, gx, src_rank = run_ranks(f, r, xs, idxs, ws, gs, gds)
    want_c = npr.ll_combine_grads(xs, idxs, ws, gs, e, m)
    want_x = npr.ll_dispatch_grad(idxs, gds, e, m)
    for d in range(r):
        valid = np.asarray(src_rank[d]) >= 0  # rows past the count: zero here, unspecified on GPUs
        np.testing.assert_allclose(np.where(valid[..., None], gy[d], 0), want_c[d][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gw[d], want_c[d][1], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(gx[d], want_x[d], rtol=1e-5, atol=1e-5)
