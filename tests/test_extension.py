"""The compiled extension jax_ep._C: its targets, their registration, and their
lowering for CUDA (checked on CPU: lowering needs no GPU)."""

import ctypes
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep import _extension

TARGETS = {
    "jax_ep_get_dispatch_layout", "jax_ep_per_token_cast_to_fp8", "jax_ep_per_token_cast_back",
    "jax_ep_intranode_dispatch", "jax_ep_intranode_dispatch_fp8", "jax_ep_intranode_cached_dispatch",
    "jax_ep_intranode_combine", "jax_ep_ll_dispatch_send", "jax_ep_ll_dispatch_recv",
    "jax_ep_ll_combine_send", "jax_ep_ll_combine_recv", "jax_ep_ll_combine_gather_recv",
    "jax_ep_ll_dispatch_send_async", "jax_ep_ll_dispatch_recv_async", "jax_ep_ll_combine_send_async",
    "jax_ep_ll_combine_recv_async", "jax_ep_status",
}

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")


def test_availability_is_reported():
    assert isinstance(_extension.available(), bool)
    assert (_extension.unavailable_reason() == "") == _extension.available()


@needs_extension
def test_registrations_hold_every_target_as_a_capsule():
    targets = _extension._C.registrations()
    assert set(targets) == TARGETS
    is_valid = ctypes.pythonapi.PyCapsule_IsValid
    is_valid.restype, is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    for name, capsule in targets.items():
        assert type(capsule).__name__ == "PyCapsule", name
        assert is_valid(capsule, None), name  # unnamed capsule, non-null handler


@needs_extension
def test_targets_registered_once_for_cuda():
    names = _extension.register_targets()
    assert set(names) == TARGETS
    # Registering again, directly or by importing / reloading the module, is a no-op.
    assert _extension.register_targets() == names
    importlib.import_module("jax_ep._extension")
    reloaded = importlib.reload(_extension)
    assert reloaded.register_targets() == names

    from jax._src.lib import xla_client

    if "CUDA" not in getattr(xla_client, "_custom_callback_handler", {}):
        # No CUDA backend in this process: jax keeps the registrations until one loads.
        pending = [entry[0] for entry in getattr(xla_client, "_custom_callback", {}).get("CUDA", [])]
        for name in TARGETS:
            assert pending.count(name) == 1, (name, pending)


def _lower_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@needs_extension
def test_layout_lowers_for_cuda():
    t, k, e, r = 64, 8, 256, 8

    def layout(topk_idx):
        out = (
            jax.ShapeDtypeStruct((r,), jnp.int32),
            jax.ShapeDtypeStruct((e,), jnp.int32),
            jax.ShapeDtypeStruct((t, r), jnp.bool_),
        )
        call = jax.ffi.ffi_call("jax_ep_get_dispatch_layout", out)
        return call(topk_idx, num_experts=np.int64(e), num_ranks=np.int64(r))

    text = _lower_for_cuda(layout, jax.ShapeDtypeStruct((t, k), jnp.int32))
    assert "stablehlo.custom_call @jax_ep_get_dispatch_layout" in text
    assert f"num_experts = {e} : i64" in text and f"num_ranks = {r} : i64" in text
    assert f"tensor<{t}x{r}xi1>" in text


@needs_extension
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_casts_lower_for_cuda(dtype, use_ue8m0):
    t, h = 16, 1024
    scales = (
        jax.ShapeDtypeStruct((t, h // 512), jnp.int32)
        if use_ue8m0
        else jax.ShapeDtypeStruct((t, h // 128), jnp.float32)
    )

    def cast(x):
        out = (jax.ShapeDtypeStruct((t, h), jnp.float8_e4m3fn), scales)
        return jax.ffi.ffi_call("jax_ep_per_token_cast_to_fp8", out)(x, round_scale=True, use_ue8m0=use_ue8m0)

    def cast_back(q, s):
        out = jax.ShapeDtypeStruct((t, h), dtype)
        return jax.ffi.ffi_call("jax_ep_per_token_cast_back", out)(q, s, use_ue8m0=use_ue8m0)

    flag = "true" if use_ue8m0 else "false"
    text = _lower_for_cuda(cast, jax.ShapeDtypeStruct((t, h), dtype))
    assert "stablehlo.custom_call @jax_ep_per_token_cast_to_fp8" in text
    assert "round_scale = true" in text and f"use_ue8m0 = {flag}" in text
    assert f"tensor<{t}x{h}xf8E4M3FN>" in text

    text = _lower_for_cuda(cast_back, jax.ShapeDtypeStruct((t, h), jnp.float8_e4m3fn), scales)
    assert "stablehlo.custom_call @jax_ep_per_token_cast_back" in text
    assert f"use_ue8m0 = {flag}" in text
    assert f"tensor<{t}x{h}x{'bf16' if dtype == jnp.bfloat16 else 'f32'}>" in text


@needs_extension
@pytest.mark.parametrize("async_send", [True, False])
def test_low_latency_split_lowers_for_cuda(monkeypatch, async_send):
    """The split API picks the send-stream targets with async_send, and their
    receives take the send's inputs again (so XLA keeps them alive)."""
    import jax_ep
    from jax_ep import runtime
    from jax_ep.handle import LowLatencySpec

    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: None)  # no GPU buffer needed to lower
    t, k, e, h, r, m = 8, 2, 8, 512, 2, 8
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", buffer_id=7,
                                    async_send=async_send)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: r)

    def split(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=e, axis_name=None, options=opts)
        busy = pending.then(x).astype(jnp.float32).sum()
        o = jax_ep.low_latency_dispatch_recv(pending, after=busy)
        p2 = jax_ep.low_latency_combine_send(o.recv_x, o.handle)
        return jax_ep.low_latency_combine_recv(p2, w, after=busy)

    text = _lower_for_cuda(split, jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32),
                           jax.ShapeDtypeStruct((t, k), jnp.float32))
    suffix = "_async" if async_send else ""
    for op in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"):
        assert f"stablehlo.custom_call @jax_ep_ll_{op}{suffix}(" in text, op
        other = "" if async_send else "_async"
        assert f"@jax_ep_ll_{op}{other}(" not in text, op
    def operands_of(op):
        line = next(line for line in text.splitlines() if f"@jax_ep_ll_{op}{suffix}(" in line)
        return [v.strip() for v in line.split("(", 1)[1].split(")", 1)[0].split(",")]

    operands = operands_of("dispatch_recv")
    # rank mask, token, then (asynchronous) x, topk_idx and the send's own mask: the
    # send's kernel reads that mask on the send stream, so the receive keeps it alive
    assert len(operands) == (5 if async_send else 2)
    if async_send:
        assert operands[-1] == operands_of("dispatch_send")[0]
    for op in ("dispatch_send", "dispatch_recv"):  # the split always pushes
        line = next(line for line in text.splitlines() if f"@jax_ep_ll_{op}{suffix}(" in line)
        assert "pull = 0 : i64" in line, line
    operands = operands_of("combine_recv")
    # rank mask, token, topk_idx, weights, then (asynchronous) y, the routing and the send's mask
    assert len(operands) == (4 + 5 if async_send else 4)
    if async_send:
        assert operands[-1] == operands_of("combine_send")[0]


@needs_extension
@pytest.mark.parametrize("pull", [True, False])
def test_low_latency_dispatch_pull_attribute(monkeypatch, pull):
    """The one-call dispatch's send and receive both carry dispatch_pull."""
    import jax_ep
    from jax_ep import runtime

    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: None)
    t, k, e, h, r, m = 8, 2, 8, 512, 2, 8
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", buffer_id=7,
                                    dispatch_pull=pull)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: r)

    def fused(x, idx):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=e, axis_name=None, options=opts).recv_x

    text = _lower_for_cuda(fused, jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32))
    for op in ("dispatch_send", "dispatch_recv"):
        line = next(line for line in text.splitlines() if f"@jax_ep_ll_{op}(" in line)
        assert f"pull = {int(pull)} : i64" in line, line


@needs_extension
@pytest.mark.parametrize("zero_copy,combine_fp8", [(True, False), (False, False), (True, True)])
def test_low_latency_combine_zero_copy_attribute(monkeypatch, zero_copy, combine_fp8):
    """The one-call combine's send and receive carry combine_zero_copy (never
    with FP8 rows, which are pushed), and a zero-copy receive takes y again
    so XLA keeps it alive while peers read it; the split calls push."""
    import jax_ep
    from jax_ep import runtime

    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: None)
    t, k, e, h, r, m = 8, 2, 8, 512, 2, 8
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", buffer_id=7,
                                    combine_zero_copy=zero_copy, combine_fp8=combine_fp8)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: r)

    def rounds(x, idx, w):
        o = jax_ep.low_latency_dispatch(x, idx, num_experts=e, axis_name=None, options=opts)
        fused = jax_ep.low_latency_combine(o.recv_x, w, o.handle)
        split = jax_ep.low_latency_combine_recv(jax_ep.low_latency_combine_send(o.recv_x, o.handle, after=fused), w)
        return fused, split

    text = _lower_for_cuda(rounds, jax.ShapeDtypeStruct((t, h), jnp.bfloat16),
                           jax.ShapeDtypeStruct((t, k), jnp.int32), jax.ShapeDtypeStruct((t, k), jnp.float32))
    on = int(zero_copy and not combine_fp8)
    lines = text.splitlines()
    for op in ("combine_send", "combine_recv"):
        line = next(line for line in lines if f"@jax_ep_ll_{op}(" in line)
        assert f"zero_copy = {on} : i64" in line, line
        split_line = next(line for line in lines if f"@jax_ep_ll_{op}_async(" in line)
        assert "zero_copy = 0 : i64" in split_line, split_line
    recv = next(line for line in lines if "@jax_ep_ll_combine_recv(" in line)
    operands = recv.split("(", 1)[1].split(")", 1)[0].split(",")
    assert len(operands) == (4 + 4 if on else 4)


@needs_extension
def test_low_latency_rank_mask_reaches_every_kernel(monkeypatch):
    """A rank mask is the first operand of every low-latency call, forward and
    backward (all false without one), and the routing is masked before the send."""
    import types

    import jax_ep
    from jax_ep import runtime

    monkeypatch.setattr(runtime, "lookup", lambda buffer_id: types.SimpleNamespace(rank=0))
    t, k, e, h, r, m = 8, 2, 8, 512, 2, 8
    opts = jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, backend="cuda", buffer_id=7)
    monkeypatch.setattr(jax_ep.validation, "num_ranks_for", lambda axis, backend, buffer_id: r)

    def step(x, idx, w, mask):
        def loss(x, w):
            o = jax_ep.low_latency_dispatch(x, idx, num_experts=e, axis_name=None, options=opts, rank_mask=mask)
            return jnp.sum(jax_ep.low_latency_combine(o.recv_x, w, o.handle).astype(jnp.float32))
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=e, axis_name=None, options=opts,
                                                   rank_mask=mask)
        return jax.grad(loss, argnums=(0, 1))(x, w), jax_ep.low_latency_dispatch_recv(pending).recv_count

    text = _lower_for_cuda(step, jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32),
                           jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((r,), jnp.bool_))
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @jax_ep_ll_" in line]
    ops = {line.split("@jax_ep_ll_", 1)[1].split("(", 1)[0] for line in calls}
    assert {"dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "combine_gather_recv",
            "dispatch_send_async", "dispatch_recv_async"} <= ops, ops
    for line in calls:
        assert f"tensor<{r}xi1>" in line.split("->", 1)[0].split(":")[-1].split(",")[0], line


def test_combine_zero_copy_option_is_checked():
    import jax_ep

    assert jax_ep.LowLatencyOptions().combine_zero_copy is True
    with pytest.raises(TypeError, match="combine_zero_copy must be True or False"):
        jax_ep.LowLatencyOptions(combine_zero_copy=1)


@needs_extension
def test_workspace_map_is_one_layout_for_both_modes_and_the_docs():
    """cuda/workspace.cuh as the extension exports it: regions of one mode
    disjoint and inside the workspace, the staging halves after it, the
    Python sizes built on it, and docs/architecture.md's table the same."""
    import os
    import re

    from jax_ep.runtime import intranode_buffer_bytes, low_latency_buffer_bytes

    ws = _extension._C.workspace_map
    assert ws["staging_offset"] == ws["signal_bytes"] + ws["workspace_bytes"]
    assert ws["staging_offset"] % ws["staging_align"] == 0
    assert ws["min_buffer_bytes"] == ws["staging_offset"] + 2 * ws["staging_align"]
    regions = ws["regions"]
    for name, (mode, offset, size) in regions.items():
        assert mode in ("normal", "low_latency") and offset % 8 == 0 and offset + size <= ws["workspace_bytes"], name
        for other, (mode2, offset2, size2) in regions.items():
            if other != name and mode2 == mode:
                assert offset + size <= offset2 or offset2 + size2 <= offset, (name, other)

    # Python's sizes: the map's staging offset, two halves, the alignment slack.
    C = _extension._C
    half = max(C.dispatch_staging_bytes(64, 4, 8, 64, 7168 * 2), C.row_staging_bytes(512, 7168 * 2),
               C.row_staging_bytes(64, 7168 * 2), C.row_staging_bytes(8 * 64, 7168 * 2))
    assert intranode_buffer_bytes(64, 7168, 8, 4, 64) == ws["staging_offset"] + 2 * half + 2 * ws["staging_align"]
    assert low_latency_buffer_bytes(128, 7168, 8, 8, 64) > ws["min_buffer_bytes"]

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "architecture.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `(\w+)` \| (normal|low latency) \| (\d+)( KiB)? \| (\d+)( KiB)? \|", f.read(), re.M)
    kib = lambda n, unit: int(n) * (1024 if unit else 1)  # noqa: E731
    documented = {name: (mode.replace(" ", "_"), kib(o, ou), kib(b, bu)) for name, mode, o, ou, b, bu in rows}
    assert documented == {name: tuple(v) for name, v in regions.items()}
