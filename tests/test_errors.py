"""Every bad input raises an error that names the argument and what would work."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import jax_ep
from conftest import random_routing, run_ranks

R, T, K, E, H = 2, 4, 2, 4, 128


@pytest.fixture
def inputs(rng):
    idxs = random_routing(rng, R, T, K, E)
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(R)]
    return xs, idxs, ws


def _dispatch(num_experts=E, options=jax_ep.NormalOptions(), x_fn=lambda x: x, i_fn=lambda i: i, w_fn=lambda w: w, axis_name="ep"):
    def f(x, i, w):
        o = jax_ep.dispatch(x_fn(x), i_fn(i), w_fn(w), num_experts=num_experts, options=options, axis_name=axis_name)
        return o.num_dropped
    return f


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_experts=5), ValueError, r"num_experts=5 must be divisible by the number of EP ranks R=2"),
        (dict(num_experts=0), ValueError, r"num_experts must be a positive int"),
        (dict(x_fn=lambda x: x[None]), ValueError, r"x must be a 2-D array \[T, H\]"),
        (dict(x_fn=lambda x: x.astype(jnp.int32)), TypeError, r"x must be bfloat16, float16 or float32"),
        (dict(i_fn=lambda i: i[:-1]), ValueError, r"topk_idx must have one row per token"),
        (dict(i_fn=lambda i: i.astype(jnp.float32)), TypeError, r"topk_idx must have an integer dtype"),
        (dict(w_fn=lambda w: w[:, :1]), ValueError, r"topk_weights must have the shape of topk_idx"),
        (dict(w_fn=lambda w: w.astype(jnp.bfloat16)), TypeError, r"topk_weights must be float32"),
        (dict(axis_name="tp"), ValueError, r"axis_name='tp' is not a mesh axis bound here"),
        (dict(x_fn=lambda x: (x.astype(jnp.float8_e4m3fn), x[:, :2])), ValueError, r"x\[1\] \(the FP8 scales\) must be float32 \(4, 1\)"),
        (dict(x_fn=lambda x: (x[:, :100].astype(jnp.float8_e4m3fn), x[:, :1])), ValueError, r"FP8 needs a multiple of 128"),
        (dict(options="rank_major"), TypeError, r"options must be a jax_ep.NormalOptions"),
    ],
)
def test_dispatch_bad_inputs(inputs, kwargs, error, match):
    with pytest.raises(error, match=match):
        run_ranks(_dispatch(**kwargs), R, *inputs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layout="token_major"), r"layout must be one of \('rank_major', 'expert_major'\)"),
        (dict(num_max_recv_tokens=0), r"num_max_recv_tokens must be a positive int or None"),
        (dict(expert_alignment=0), r"expert_alignment must be a positive int"),
        (dict(backend="tpu"), r"backend must be one of \('xla', 'cuda'\)"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax_ep.NormalOptions(**kwargs)


def test_bad_low_latency_options():
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank must be a positive int"):
        jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=0)
    with pytest.raises(ValueError, match="fp8 must be None or an FP8Options"):
        jax_ep.LowLatencyOptions(fp8=True)


def test_concrete_ids_out_of_range_raise_now():
    with pytest.raises(jax_ep.RoutingError, match=r"topk_idx\[1, 0\] = 9 is out of range"):
        jax_ep.get_dispatch_layout(np.array([[0, 1], [9, 2]], np.int32), 8, num_ranks=2)
    with pytest.raises(jax_ep.RoutingError, match="or -1 for a masked slot"):
        jax_ep.get_dispatch_layout(np.array([[-2, 1]], np.int32), 8, num_ranks=2)


def test_traced_ids_out_of_range_checked_mode(inputs):
    xs, idxs, ws = inputs
    idxs = [i.copy() for i in idxs]
    idxs[1][0, 0] = E + 3
    opts = jax_ep.NormalOptions(checked=True)
    with pytest.raises(jax_ep.RoutingError, match=r"1 top-k ids are out of range on rank 1") as caught:
        with jax_ep.checked_errors():
            run_ranks(_dispatch(options=opts), R, xs, idxs, ws)
    assert isinstance(caught.value.__cause__, jax.errors.JaxRuntimeError)
    # unchecked: the bad slot is ignored like -1
    run_ranks(_dispatch(), R, xs, idxs, ws)


def test_checked_errors_without_the_helper_name_the_class(inputs):
    xs, idxs, ws = inputs
    idxs = [i.copy() for i in idxs]
    idxs[0][1, 1] = -5
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"RoutingError: 1 top-k ids are out of range on rank 0"):
        run_ranks(_dispatch(options=jax_ep.NormalOptions(checked=True)), R, xs, idxs, ws)
    assert jax_ep.checked.error_from(ValueError("x")) is None
    with pytest.raises(ZeroDivisionError), jax_ep.checked_errors():
        1 / 0


def test_low_latency_checked_ids(inputs):
    xs, idxs, ws = inputs
    idxs = [i.copy() for i in idxs]
    idxs[1][2, 0] = E
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=T, checked=True)

    def f(x, i, w):
        return jax_ep.low_latency_dispatch(x, i, num_experts=E, options=opts).recv_count

    with pytest.raises(jax_ep.RoutingError, match=r"out of range on rank 1"), jax_ep.checked_errors():
        run_ranks(f, R, xs, idxs, ws)


@pytest.mark.parametrize("layout", ["rank_major", "expert_major"])
def test_overflow_checked_mode_raises(inputs, layout):
    opts = jax_ep.NormalOptions(layout=layout, num_max_recv_tokens=1, checked=True)
    with pytest.raises(jax_ep.CapacityOverflowError,
                       match=r"did not fit in num_max_recv_tokens=1.*Raise num_max_recv_tokens"):
        with jax_ep.checked_errors():
            run_ranks(_dispatch(options=opts), R, *inputs)


def test_checked_mode_silent_when_it_fits(inputs):
    out = run_ranks(_dispatch(options=jax_ep.NormalOptions(checked=True)), R, *inputs)
    assert (out == 0).all()


def test_fp8_cast_bad_hidden():
    with pytest.raises(ValueError, match="FP8 needs a multiple of 128"):
        jax_ep.per_token_cast_to_fp8(jnp.zeros((2, 100)))
    with pytest.raises(ValueError, match="packed UE8M0 scales need a multiple of 512"):
        jax_ep.per_token_cast_to_fp8(jnp.zeros((2, 256)), jax_ep.FP8Options(use_ue8m0=True))
    with pytest.raises(ValueError, match=r"scales must be float32 \(2, 2\)"):
        jax_ep.per_token_cast_back(jnp.zeros((2, 256), jnp.float8_e4m3fn), jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="x_fp8 must be float8_e4m3fn"):
        jax_ep.per_token_cast_back(jnp.zeros((2, 256)), jnp.zeros((2, 2)))


def test_low_latency_bad_inputs(inputs):
    xs, idxs, ws = inputs

    def ll(options, x_fn=lambda x: x):
        def f(x, i, w):
            return jax_ep.low_latency_dispatch(x_fn(x), i, num_experts=E, options=options).recv_count
        return f

    with pytest.raises(ValueError, match=r"T=4 tokens but options.num_max_dispatch_tokens_per_rank=2"):
        run_ranks(ll(jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=2)), R, xs, idxs, ws)
    with pytest.raises(ValueError, match="packed UE8M0 scales need a multiple of 512"):
        opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=4, fp8=jax_ep.FP8Options(use_ue8m0=True))
        run_ranks(ll(opts), R, xs, idxs, ws)

    # K = 17: more top-k slots than the kernels send and sum.
    wide = [np.tile(i, (1, 9))[:, :17] for i in idxs]
    with pytest.raises(ValueError, match=r"low_latency_dispatch supports at most 16 top-k slots per token, got topk_idx with K=17"):
        run_ranks(ll(jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=4)), R, xs, wide, ws)

    def bad_combine(x, i, w):
        o = jax_ep.low_latency_dispatch(x, i, num_experts=E, options=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=4))
        return jax_ep.low_latency_combine(o.recv_x[:, :3], w, o.handle)

    with pytest.raises(ValueError, match=r"y must be .* \[E/R, R\*M, H\] = \(2, 8, 128\)"):
        run_ranks(bad_combine, R, xs, idxs, ws)


def test_combine_bad_inputs(inputs):
    def f(x, i, w):
        o = jax_ep.dispatch(x, i, w, num_experts=E)
        return jax_ep.combine(o.recv_x[:3], o.handle)

    with pytest.raises(ValueError, match=r"y must have 8 rows \(one per handle row\)"):
        run_ranks(f, R, *inputs)

    def g(x, i, w):
        return jax_ep.combine(x, handle=(1, 2))

    with pytest.raises(TypeError, match="handle must be the DispatchHandle returned by jax_ep.dispatch"):
        run_ranks(g, R, *inputs)


def test_cuda_backend_without_extension_is_clear(inputs, monkeypatch):
    from jax_ep import _extension

    monkeypatch.setattr(_extension, "available", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs the compiled jax_ep._C extension"):
        jax_ep.get_dispatch_layout(inputs[1][0], E, num_ranks=R, backend="cuda")


def test_cuda_backend_needs_a_buffer(inputs):
    from jax_ep import _extension

    if not _extension.available():
        pytest.skip("extension not built")
    opts = jax_ep.NormalOptions(backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda' communicates through a jax_ep.Buffer") as info:
        run_ranks(_dispatch(options=opts), R, *inputs)
    _check_suggested_calls(str(info.value))


def _check_suggested_calls(message):
    """Every `code` span of an error message is Python whose jax_ep calls bind
    to the real signatures (a hint must not name arguments that do not exist)."""
    import ast
    import inspect
    import re

    spans = re.findall(r"`([^`]+)`", message)
    assert spans, message
    calls = 0
    for span in spans:
        for node in ast.walk(ast.parse(span)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("jax_ep."):
                fn = getattr(jax_ep, ast.unparse(node.func).removeprefix("jax_ep."))
                args = [None] * len(node.args)
                kwargs = {kw.arg: None for kw in node.keywords}
                inspect.signature(fn).bind(*args, **kwargs)  # TypeError on an unknown argument
                calls += 1
    assert calls >= 4, message


def test_cuda_backend_missing_op_is_clear():
    from jax_ep import _extension, cuda_ops
    from jax_ep.backends import require

    if not _extension.available():
        pytest.skip("extension not built")
    with pytest.raises(NotImplementedError, match=r"backend='cuda' has no 'no_such_op' kernel in this build"):
        require(cuda_ops, "no_such_op", "cuda")
    assert {"ll_gather_back", "ll_scatter_out", "combine"} <= set(cuda_ops.IMPLEMENTED)


def test_cuda_low_latency_checks(inputs):
    from jax_ep import _extension

    if not _extension.available():
        pytest.skip("extension not built")
    xs, idxs, ws = inputs
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=T, backend="cuda")

    def f(x, i, w):
        return jax_ep.low_latency_dispatch(x, i, num_experts=E, options=opts).recv_count

    with pytest.raises(TypeError, match=r"the CUDA low-latency kernels take bfloat16 x"):
        run_ranks(f, R, xs, idxs, ws)
    with pytest.raises(ValueError, match=r"communicates through a jax_ep.Buffer"):
        run_ranks(f, R, [x.astype(jnp.bfloat16) for x in xs], idxs, ws)


def test_cuda_buffer_on_cpu_names_the_xla_backend():
    from jax_ep import _extension

    if not _extension.available():
        pytest.skip("extension not built")
    assert all(d.platform == "cpu" for d in jax.local_devices())  # the CPU suite
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs an NVIDIA GPU.*use backend='xla'"):
        jax_ep.Buffer(num_experts=E, normal=jax_ep.NormalOptions(backend="cuda"))


def test_destroyed_buffer():
    buf = jax_ep.Buffer(num_experts=4)
    with buf:
        pass
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.get_dispatch_layout(np.zeros((1, 1), np.int32))


def test_tuned_normal_options():
    opts = jax_ep.tuned_normal_options(8, layout="expert_major")
    assert opts.backend == "cuda" and opts.num_sms == 16 and opts.layout == "expert_major"
    assert (opts.combine_chunk_rows, opts.combine_ring_rows) == (2, 24)
    assert jax_ep.tuned_normal_options(3).num_sms == jax_ep.NormalOptions().num_sms
    assert jax_ep.tuned_normal_options(4, num_sms=12).num_sms == 12
    assert jax_ep.tuned_normal_options(2, combine_ring_rows=32).combine_ring_rows == 32


def test_combine_ring_options_are_checked():
    with pytest.raises(ValueError, match="combine_ring_rows must be a multiple of combine_chunk_rows"):
        jax_ep.NormalOptions(combine_chunk_rows=4, combine_ring_rows=30)
    with pytest.raises(ValueError, match="from 1 to 32 times"):
        jax_ep.NormalOptions(combine_chunk_rows=2, combine_ring_rows=128)
    with pytest.raises(ValueError, match="combine_chunk_rows must be a positive int"):
        jax_ep.NormalOptions(combine_chunk_rows=0)


def test_checked_mode_differentiates_and_vmaps(inputs):
    def f(checked):
        opts = jax_ep.NormalOptions(checked=checked)

        def g(x, i, w):
            def loss(x, w):
                o = jax_ep.dispatch(x, i, w, num_experts=E, options=opts)
                return jnp.sum(jax_ep.combine(o.recv_x * 2, o.handle) ** 2) + jnp.sum(o.recv_topk_weights)
            dropped = jax.vmap(lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, options=opts).num_dropped)(
                x[None], i[None], w[None])
            return jax.grad(loss, argnums=(0, 1))(x, w), dropped
        return g

    want = run_ranks(f(False), R, *inputs)
    got = run_ranks(f(True), R, *inputs)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda v: jax_ep.NormalOptions(checked=v), "NormalOptions.checked"),
        (lambda v: jax_ep.LowLatencyOptions(checked=v), "LowLatencyOptions.checked"),
        (lambda v: jax_ep.LowLatencyOptions(combine_fp8=v), "LowLatencyOptions.combine_fp8"),
        (lambda v: jax_ep.LowLatencyOptions(async_send=v), "LowLatencyOptions.async_send"),
        (lambda v: jax_ep.LowLatencyOptions(dispatch_pull=v), "LowLatencyOptions.dispatch_pull"),
        (lambda v: jax_ep.LowLatencyOptions(combine_zero_copy=v), "LowLatencyOptions.combine_zero_copy"),
        (lambda v: jax_ep.FP8Options(round_scale=v), "FP8Options.round_scale"),
        (lambda v: jax_ep.FP8Options(use_ue8m0=v), "FP8Options.use_ue8m0"),
        (lambda v: __import__("jax_ep.moe").moe.MoEConfig(num_experts=4, hidden=8, ffn=8, normalize_weights=v),
         "MoEConfig.normalize_weights"),
    ],
)
def test_bool_options_are_checked(make, field):
    for bad in ("no", 1, 0, None):
        with pytest.raises(TypeError, match=rf"{field} must be True or False, got {bad!r}"):
            make(bad)
    assert make(np.bool_(True)) == make(True)  # numpy bools are bools


@pytest.mark.parametrize("fp8", [True, "fp8"])
def test_low_latency_buffer_bytes_names_fp8(fp8):
    with pytest.raises(TypeError, match=r"fp8 must be None \(BF16\) or the FP8Options"):
        jax_ep.low_latency_buffer_bytes(8, 128, 2, 2, 4, fp8)
