"""The single-device CUDA kernels (layout, FP8 cast) against the reference
backend and the numpy restatement. Runs on one GPU; skipped elsewhere.

    JAX_EP_TEST_GPU=1 python -m pytest tests/gpu/test_single_device_kernels.py
"""

import contextlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax_ep
from jax_ep import _extension
import fp8_entry_points
import np_reference as npr
from conftest import random_routing

pytestmark = pytest.mark.skipif(
    not _extension.available() or jax.default_backend() != "gpu",
    reason="needs a GPU and the built CUDA extension (JAX_EP_TEST_GPU=1 on a GPU machine)",
)


@pytest.mark.parametrize(
    "t,k,e,r,distinct",
    [(4096, 8, 256, 8, True), (4096, 8, 256, 4, True), (1000, 6, 64, 2, False), (1, 1, 8, 8, True),
     (0, 8, 256, 8, True), (777, 16, 1024, 64, False), (333, 3, 12, 3, False)],
)
def test_layout_kernel_exact(rng, t, k, e, r, distinct):
    idx = random_routing(rng, 1, t, k, e, mask_prob=0.15, distinct=distinct)[0]
    got = jax.jit(lambda i: tuple(jax_ep.get_dispatch_layout(i, e, num_ranks=r, backend="cuda")))(idx)
    ref = jax.jit(lambda i: tuple(jax_ep.get_dispatch_layout(i, e, num_ranks=r, backend="xla")))(idx)
    want = npr.layout(idx, e, r) if t <= 1000 else [np.asarray(a) for a in ref]
    for g, rr, w in zip(got, ref, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(rr))
        np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("opts", [jax_ep.FP8Options(), jax_ep.FP8Options(round_scale=True), jax_ep.FP8Options(use_ue8m0=True)])
@pytest.mark.parametrize("shape", [(4096, 7168), (3, 512), (0, 2048)])
def test_fp8_cast_kernel_bitwise(rng, dtype, opts, shape):
    x = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e3, (shape[0], 1))).astype(np.float32)
    if shape[0] > 2:
        x[1, :128] = 0.0  # floor of amax
        x[2, 5] = 1e30 if dtype == jnp.float32 else 3e38  # saturation
    x = jnp.asarray(x, dtype)
    q, s = jax.jit(lambda v: jax_ep.per_token_cast_to_fp8(v, opts, backend="cuda"))(x)
    # The reference runs on the CPU: XLA:GPU's own float32 -> float8 conversion
    # rounds a few values differently (about 1 in 10^7), so it is not the truth.
    with jax.default_device(jax.devices("cpu")[0]):
        x_cpu = jax.device_put(x, jax.devices("cpu")[0])
        q_ref, s_ref = jax.jit(lambda v: jax_ep.per_token_cast_to_fp8(v, opts, backend="xla"))(x_cpu)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q_ref).view(np.uint8))
    if shape[0] and not opts.use_ue8m0:
        q_np, s_np = npr.fp8_quantize(np.asarray(x, np.float32), round_scale=opts.round_scale)
        np.testing.assert_array_equal(np.asarray(s), s_np)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_np.view(np.uint8))
    for out_dtype in (jnp.bfloat16, jnp.float32):
        back = jax.jit(lambda a, b: jax_ep.per_token_cast_back(a, b, opts, out_dtype=out_dtype, backend="cuda"))(q, s)
        back_ref = jax_ep.per_token_cast_back(q, s, opts, out_dtype=out_dtype, backend="xla")
        np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(back_ref, np.float32))


_FP8_OPTS = [jax_ep.FP8Options(), jax_ep.FP8Options(round_scale=True), jax_ep.FP8Options(use_ue8m0=True)]


# Every CUDA FP8 cast (cuda/fp8.cuh's one group cast) on the edge cases of
# np_reference.fp8_edge_rows (NaN and inf included), byte for byte against
# np_reference.fp8_cast (itself checked against jax_ep.reference.fp8 on the
# CPU, as is tests/fp8_entry_points.py's logic: tests/test_fp8.py).


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("opts", _FP8_OPTS)
def test_fp8_cast_op_edge_cases_bitwise(rng, dtype, opts):
    """The standalone op (cuda/fp8.cu): 8 lanes per group."""
    q, s, want_q, want_s = fp8_entry_points.cast_op(rng, dtype, opts, "cuda")
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(q, want_q)


@contextlib.contextmanager
def _one_rank_low_latency(shape, **options):
    """LowLatencyOptions over a one-rank group on the first GPU sized for
    `shape` (T, M, K, E, H), destroyed on exit."""
    from jax_ep.runtime import IntranodeRuntime, low_latency_buffer_bytes

    _, m, k, e, h = shape
    dev = jax.devices()[0].local_hardware_id or 0
    nbytes = low_latency_buffer_bytes(m, h, 1, k, e, options.get("fp8"))
    group = IntranodeRuntime.create_group([dev], nbytes, timeout_s=20.0)
    try:
        yield jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", num_sms=4,
                                       buffer_id=group.buffer_id, **options)
    finally:
        group.destroy()


@pytest.mark.parametrize("pull", [True, False], ids=["pull", "push"])
@pytest.mark.parametrize("opts", _FP8_OPTS)
def test_low_latency_dispatch_fp8_edge_cases_bitwise(rng, pull, opts):
    """The low-latency dispatch's casts: the pulled stage (a half-warp per
    group, cuda/low_latency_pull.cu) and the push send (a warp per group,
    cuda/low_latency_dispatch.cu). Each received row is its token's cast."""
    with _one_rank_low_latency(fp8_entry_points.DISPATCH_SHAPE, fp8=opts, dispatch_pull=pull) as options:
        q, s, want_q, want_s = fp8_entry_points.ll_dispatch(rng, options)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(q, want_q)


def test_low_latency_combine_fp8_rows_edge_cases_bitwise(rng):
    """combine_fp8's rows (cuda/low_latency_combine.cu's send: a half-warp
    per group), seen through the combine of one slot of weight 1."""
    with _one_rank_low_latency(fp8_entry_points.COMBINE_SHAPE, combine_fp8=True) as options:
        got, want = fp8_entry_points.ll_combine_fp8(rng, options)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.where(nan, 0, got).view(np.uint32), np.where(nan, 0, want).view(np.uint32))


def test_kernels_in_fori_loop(rng):
    """Handlers inside a compiled loop (captured into CUDA graphs unless disabled)."""
    idx = random_routing(rng, 1, 512, 8, 64)[0]
    x = jnp.asarray(rng.standard_normal((512, 1024)), jnp.bfloat16)

    @jax.jit
    def loop(idx, x):
        def body(i, acc):
            per_rank, per_expert, _ = jax_ep.get_dispatch_layout(jnp.roll(idx, i, axis=0), 64, num_ranks=8, backend="cuda")
            q, s = jax_ep.per_token_cast_to_fp8(x * (i + 1).astype(x.dtype), backend="cuda")
            return acc + per_rank.sum() + per_expert.sum() + jnp.sum(s)
        return jax.lax.fori_loop(0, 50, body, jnp.float32(0))

    @jax.jit
    def loop_ref(idx, x):
        def body(i, acc):
            per_rank, per_expert, _ = jax_ep.get_dispatch_layout(jnp.roll(idx, i, axis=0), 64, num_ranks=8)
            q, s = jax_ep.per_token_cast_to_fp8(x * (i + 1).astype(x.dtype))
            return acc + per_rank.sum() + per_expert.sum() + jnp.sum(s)
        return jax.lax.fori_loop(0, 50, body, jnp.float32(0))

    np.testing.assert_allclose(float(loop(idx, x)), float(loop_ref(idx, x)), rtol=1e-6)


def test_group_runtime_two_ranks_on_one_gpu():
    """One process driving several ranks (a buffer group, peers through peer
    access): both members map each other and a barrier across them completes,
    twice, and they share XLA's memory for the zero-copy combine. Here both
    ranks sit on the one GPU; on a multi-GPU host the same path enables peer
    access between devices and grants each device the others' XLA pools."""
    from jax_ep.runtime import IntranodeRuntime

    dev = jax.devices()[0].local_hardware_id or 0
    group = IntranodeRuntime.create_group([dev, dev], 1 << 22, timeout_s=10.0)
    try:
        assert group.num_ranks == 2 and group.transports == ("peer", "peer")
        members = _extension._C.intranode_group_members(group.buffer_id)
        assert len(members) == 2 and all(_extension._C.intranode_buffer_ready(m) for m in members)
        _extension._C.group_barrier_selftest(group.buffer_id)
        _extension._C.group_barrier_selftest(group.buffer_id)
        # The zero-copy combine's memory sharing (no access to grant on one GPU).
        assert group.share_xla_memory(), group.xla_memory_note
        assert group.xla_memory_shared and group.xla_memory_note == ""
        assert all(_extension._C.xla_memory_enabled(m) for m in members)
    finally:
        group.destroy()
    assert _extension._C.intranode_group_members(group.buffer_id) == []


def test_group_runtime_ffi_finds_the_member_of_its_device(rng):
    """FFI calls name a group by one id and pick the member of the device they
    run on: dispatch + combine through a one-device group match the reference."""
    from jax_ep.runtime import IntranodeRuntime, intranode_buffer_bytes

    t, k, e, h = 64, 4, 16, 256
    dev = jax.devices()[0].local_hardware_id or 0
    group = IntranodeRuntime.create_group([dev], intranode_buffer_bytes(t, h, 1, k, e))
    try:
        idx = random_routing(rng, 1, t, k, e)[0]
        x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
        w = jnp.asarray(rng.random((t, k)), jnp.float32)

        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
        x, idx, w = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, jnp.asarray(idx), w))

        def run(options):
            def body(x, i, w):
                out = jax_ep.dispatch(x, i, w, num_experts=e, axis_name="ep", options=options)
                return out.recv_x, jax_ep.combine(out.recv_x, out.handle)

            return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(x, idx, w)

        got = run(jax_ep.NormalOptions(backend="cuda", num_sms=4, buffer_id=group.buffer_id))
        want = run(jax_ep.NormalOptions())
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint16), np.asarray(want[0]).view(np.uint16))
        np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=1e-2)
    finally:
        group.destroy()


@pytest.mark.parametrize("async_send", [True, False])
def test_low_latency_split_in_decode_loop(rng, async_send):
    """The split low-latency calls in a compiled decode loop (``fori_loop``),
    a matmul between each send and receive, rounds chained with ``after=``:
    with the send on the buffer's send stream and on XLA's stream, the
    combined rows match numpy (with XLA command buffers on and off: the GPU
    suite runs this file both ways)."""
    from jax_ep.runtime import IntranodeRuntime, low_latency_buffer_bytes

    t, m, k, e, h, steps = 32, 32, 4, 8, 512, 12
    dev = jax.devices()[0].local_hardware_id or 0
    group = IntranodeRuntime.create_group([dev], low_latency_buffer_bytes(m, h, 1, k, e), timeout_s=20.0)
    try:
        idx = random_routing(rng, 1, t, k, e)[0]
        x = rng.standard_normal((t, h)).astype(np.float32)
        w = rng.random((t, k)).astype(np.float32)
        a = jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32)
        opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", num_sms=4,
                                        buffer_id=group.buffer_id, async_send=async_send)

        @jax.jit
        def decode(x, idx, w, a):
            def body(i, carry):
                acc, prev = carry
                xi = (x * (i + 1).astype(jnp.float32)).astype(jnp.bfloat16)
                pending = jax_ep.low_latency_dispatch_send(xi, idx, num_experts=e, axis_name=None, options=opts,
                                                           after=prev)
                busy = jnp.tanh(pending.then(a) @ a).sum()
                o = jax_ep.low_latency_dispatch_recv(pending, after=busy)
                p2 = jax_ep.low_latency_combine_send(o.recv_x, o.handle)
                out = jax_ep.low_latency_combine_recv(p2, w, after=busy)
                return acc + out.astype(jnp.float32), out

            init = (jnp.zeros((t, h), jnp.float32), jnp.zeros((t, h), jnp.bfloat16))
            return jax.lax.fori_loop(0, steps, body, init)[0]

        got = np.asarray(decode(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), a))
        wsum = np.where(idx >= 0, w, 0).sum(1)[:, None]
        want = sum((x * (i + 1)).astype(jnp.bfloat16).astype(np.float32) * wsum for i in range(steps))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    finally:
        group.destroy()


@contextlib.contextmanager
def _one_rank_normal_group(rng, e, t=64, k=4, h=256):
    """A one-rank intranode group on the first GPU, destroyed on exit, and the
    inputs of a normal-mode call over it on the one-device "ep" mesh: yields
    (group, mesh, (x bf16 [t, h], topk_idx int32 [t, k] over e experts,
    topk_weights float32 [t, k]), NormalOptions on the group's buffer)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep.runtime import IntranodeRuntime, intranode_buffer_bytes

    dev = jax.devices()[0].local_hardware_id or 0
    group = IntranodeRuntime.create_group([dev], intranode_buffer_bytes(t, h, 1, k, e), timeout_s=20.0)
    try:
        mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
        idx = random_routing(rng, 1, t, k, e)[0]
        x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
        w = jnp.asarray(rng.random((t, k)), jnp.float32)
        x, idx, w = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, jnp.asarray(idx), w))
        yield group, mesh, (x, idx, w), jax_ep.NormalOptions(backend="cuda", num_sms=4, buffer_id=group.buffer_id)
    finally:
        group.destroy()


def test_abort_stops_calls_and_reaches_status_and_python(rng):
    """The abort word (raised here through a test hook, as a failing peer
    would): the next call's kernels return at once, the status op reports
    "aborted" naming the raiser, the runtime's failure is a
    CommunicationError, and later calls are refused with that message."""
    from jax.sharding import PartitionSpec as P

    from jax_ep import cuda_ops, faults

    e = 16
    with _one_rank_normal_group(rng, e) as (group, mesh, (x, idx, w), options):

        def body(x, i, w):
            out = jax_ep.dispatch(x, i, w, num_experts=e, axis_name="ep", options=options)
            return out.recv_x, cuda_ops.status(group.buffer_id, (out.recv_x,), "ep")

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        _, status = f(x, idx, w)
        assert np.asarray(status).tolist() == [0, -1, 0, -1]
        assert group.failure() is None

        member = _extension._C.intranode_group_members(group.buffer_id)[0]
        _extension._C.inject_abort_for_test(member, 5, faults.STATUS_TIMEOUT)
        _, status = f(x, idx, w)  # captured/compiled already: the kernels see the abort and return
        assert np.asarray(status).tolist()[:3] == [faults.STATUS_ABORTED, 5, 0]
        err = group.failure()
        assert isinstance(err, jax_ep.CommunicationError) and err.kind == "aborted" and err.peer == 5
        assert "rank 5 failed first" in str(err) and "re-created" in str(err)
        with pytest.raises(Exception, match="failed earlier"):  # a new program: its handler refuses the buffer
            jax.jit(jax.shard_map(lambda x, i, w: body(x, i, w)[0], mesh=mesh, in_specs=P("ep"),
                                  out_specs=P("ep")))(x, idx, w).block_until_ready()


def test_foreign_handle_is_recorded_not_followed(rng):
    """A handle whose source rank is out of range (a stale or foreign handle):
    the cached dispatch reads no peer memory for that row (it stays zero),
    records a bad handle (status and CommunicationError) and does not trap."""
    import dataclasses

    from jax.sharding import PartitionSpec as P

    from jax_ep import cuda_ops, faults

    e = 16
    with _one_rank_normal_group(rng, e) as (group, mesh, (x, idx, w), options):

        def body(x, i, w):
            out = jax_ep.dispatch(x, i, w, num_experts=e, axis_name="ep", options=options)
            foreign = dataclasses.replace(out.handle, recv_src_rank=out.handle.recv_src_rank.at[0].set(7))
            again = jax_ep.cached_dispatch(x, foreign)
            return again, cuda_ops.status(group.buffer_id, (again,), "ep")

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        again, status = f(x, idx, w)
        assert np.asarray(status).tolist()[0] == faults.STATUS_BAD_HANDLE
        assert not np.asarray(again[0], np.float32).any()  # row 0 skipped, not read from "rank 7"
        err = group.failure()
        assert isinstance(err, jax_ep.CommunicationError) and err.kind == "bad handle"
        assert "out of range" in str(err)


def test_low_latency_combine_refuses_a_negative_rank_in_a_valid_row(rng):
    """A foreign low-latency handle whose first row names rank -2 (valid
    rows are those before an expert's first -1, so this row counts as
    valid): the combine records a bad handle instead of addressing
    ``base[-2]``, and does not trap."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep import cuda_ops, faults
    from jax_ep.runtime import IntranodeRuntime, low_latency_buffer_bytes

    t, m, k, e, h = 16, 16, 2, 8, 512
    dev = jax.devices()[0].local_hardware_id or 0
    group = IntranodeRuntime.create_group([dev], low_latency_buffer_bytes(m, h, 1, k, e), timeout_s=20.0)
    try:
        mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
        idx = np.zeros((t, k), np.int32)
        idx[:, 1] = 1  # every token names experts 0 and 1: row 0 of expert 0 is valid
        x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
        w = jnp.asarray(rng.random((t, k)), jnp.float32)
        x, idx, w = (jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in (x, jnp.asarray(idx), w))
        opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", num_sms=4,
                                        buffer_id=group.buffer_id)

        def body(x, i, w):
            o = jax_ep.low_latency_dispatch(x, i, num_experts=e, axis_name="ep", options=opts)
            foreign = dataclasses.replace(o.handle, recv_src_rank=o.handle.recv_src_rank.at[0, 0].set(-2))
            out = jax_ep.low_latency_combine(o.recv_x, w, foreign)
            return out, cuda_ops.status(group.buffer_id, (out,), "ep")

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        # The failure is data: the status says "bad handle", or (when the host already saw the record
        # before launching the program's next call) the program fails with the whole message.
        try:
            _, status = f(x, idx, w)
            code = np.asarray(status).tolist()[0]
        except jax.errors.JaxRuntimeError as e:
            assert "names -2, out of range" in str(e), str(e)
            code = faults.STATUS_BAD_HANDLE
        assert code == faults.STATUS_BAD_HANDLE
        err = group.failure()
        assert isinstance(err, jax_ep.CommunicationError) and err.kind == "bad handle"
        assert "names -2" in str(err)
    finally:
        group.destroy()


def test_handlers_refuse_what_the_kernels_cannot_do(rng):
    """Handler checks that a bypassed Python check would otherwise leave to
    the kernels: low-latency K = 17 (the kernels send and sum 16 slots),
    expert_alignment 0, num_experts below the rank count, a cached
    dispatch whose routing and output disagree in rows or row bytes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep import cuda_ops
    from jax_ep.handle import LowLatencySpec
    from jax_ep.runtime import IntranodeRuntime, intranode_buffer_bytes, low_latency_buffer_bytes

    t, e, h = 8, 8, 256
    dev = jax.devices()[0].local_hardware_id or 0
    nbytes = max(intranode_buffer_bytes(t, h, 1, 16, e), low_latency_buffer_bytes(t, h, 1, 17, e))
    group = IntranodeRuntime.create_group([dev], nbytes, timeout_s=20.0)
    try:
        mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
        put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep")))  # noqa: E731
        x = put(rng.standard_normal((t, h)).astype(np.float32)).astype(jnp.bfloat16)

        ll = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=t, backend="cuda", num_sms=4,
                                      buffer_id=group.buffer_id)
        spec = LowLatencySpec(num_ranks=1, num_experts=e, num_tokens=t, num_topk=17, hidden=h, axis_name="ep",
                              options=ll)
        ids17 = put(np.tile(np.arange(e, dtype=np.int32), (t, 3))[:, :17])
        send = jax.jit(jax.shard_map(lambda x, i: cuda_ops.ll_dispatch_send(x, i, spec)[None], mesh=mesh,
                                     in_specs=P("ep"), out_specs=P("ep")))
        with pytest.raises(Exception, match=r"num_topk \(K\) must be in \[1, 16\]"):
            send(x, ids17).block_until_ready()

        ids = put(np.tile(np.arange(4, dtype=np.int32), (t, 1)))
        w = put(np.ones((t, 4), np.float32))
        for field, value, message in (("expert_alignment", 0, "expert_alignment must be a positive int"),):
            opts = jax_ep.NormalOptions(layout="expert_major", backend="cuda", num_sms=4, buffer_id=group.buffer_id)
            object.__setattr__(opts, field, value)  # past NormalOptions' own check
            f = jax.jit(jax.shard_map(
                lambda x, i, w, opts=opts: jax_ep.dispatch(x, i, w, num_experts=e, axis_name="ep", options=opts).recv_x,
                mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
            with pytest.raises(Exception, match=message):
                f(x, ids, w).block_until_ready()

        # A cached dispatch called past the Python API with a routing whose
        # arrays disagree with each other or with the output's rows.
        c = 16
        src_rank, src_token = put(np.zeros((c,), np.int32)), put(np.zeros((c,), np.int32))
        attrs = dict(buffer_id=np.int64(group.buffer_id), num_sms=np.int64(4))
        for out_rows, tokens, x_cols, message in (
            (c - 1, c, h, "recv_src_token and out must have C = 16 rows"),
            (c, c - 1, h, "recv_src_token and out must have C = 16 rows"),
            (c, c, h // 2, "x and out rows must have the same bytes"),
        ):
            call = jax.ffi.ffi_call("jax_ep_intranode_cached_dispatch",
                                    jax.ShapeDtypeStruct((out_rows, h), jnp.bfloat16))
            f = jax.jit(jax.shard_map(lambda x, r, tok, call=call: call(x, r, tok, **attrs), mesh=mesh,
                                      in_specs=P("ep"), out_specs=P("ep"), check_vma=False))
            with pytest.raises(Exception, match=message):
                f(x[:, :x_cols], src_rank, src_token[:tokens]).block_until_ready()
    finally:
        group.destroy()
