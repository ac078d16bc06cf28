"""Trace-time argument checks (the run-time checks of checked mode: jax_ep.checked).

Every message names the argument and says what would work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PAYLOAD_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
FP8_DTYPE = jnp.float8_e4m3fn
FP8_GROUP = 128  # channels per FP8 scale
UE8M0_PACK = 4  # scales per int32 word


class CapacityOverflowError(RuntimeError):
    """A static receive capacity was too small (checked mode).

    Raised inside the computation: see ``jax_ep.checked_errors`` for how it
    reaches the caller."""


class RoutingError(ValueError):
    """A top-k id is outside [-1, num_experts): at the call for a concrete
    ``get_dispatch_layout`` input, else in checked mode (see
    ``jax_ep.checked_errors``)."""


# Printed as jax_ep.RoutingError in the messages that carry them out of a computation.
CapacityOverflowError.__module__ = RoutingError.__module__ = "jax_ep"


def num_ranks_of(axis_name, num_ranks: int | None = None) -> int:
    """Size of the EP mesh axis, or ``num_ranks`` when given explicitly."""
    if num_ranks is not None:
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        return num_ranks
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"axis_name={axis_name!r} is not a mesh axis bound here: call jax_ep inside "
            f"jax.shard_map over the expert-parallel axis (for example "
            f"jax.shard_map(f, mesh=mesh, in_specs=P({axis_name!r}), out_specs=P({axis_name!r}))), "
            f"or pass the axis name that your shard_map uses"
        ) from e


def num_ranks_for(axis_name, backend: str, buffer_id) -> int:
    """R for a call: the EP axis size, checked against the CUDA buffer's ranks
    (one rank per process); with the CUDA backend and ``axis_name=None``, the
    buffer's rank count."""
    if backend != "cuda":
        return num_ranks_of(axis_name)
    from jax_ep import runtime

    buffer = runtime.lookup(buffer_id)
    if axis_name is None:
        return buffer.num_ranks
    r = num_ranks_of(axis_name)
    if r != buffer.num_ranks:
        raise ValueError(
            f"the EP axis {axis_name!r} has {r} ranks but the jax_ep.Buffer spans {buffer.num_ranks} processes; "
            f"the CUDA backend needs one EP rank per process"
        )
    return r


def check_num_experts(num_experts, num_ranks: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        lo = num_experts - num_experts % num_ranks
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the number of EP ranks R={num_ranks} "
            f"(each rank owns E/R experts); for example num_experts={lo or num_ranks} or {lo + num_ranks}"
        )


def check_topk_idx(topk_idx, num_tokens: int | None = None) -> None:
    shape = getattr(topk_idx, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"topk_idx must be a 2-D integer array [T, K], got shape {shape}")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(f"topk_idx must have an integer dtype (int32), got {topk_idx.dtype}")
    if num_tokens is not None and shape[0] != num_tokens:
        raise ValueError(
            f"topk_idx must have one row per token: x has T={num_tokens} rows but topk_idx has shape {shape}"
        )
    if shape[1] < 1:
        raise ValueError(f"topk_idx needs at least one top-k slot, got shape {shape}")


# Top-k slots per token the CUDA kernels send and sum (a warp per slot).
MAX_TOPK = 16


def check_max_topk(topk_idx, op: str) -> None:
    """K <= MAX_TOPK, on every backend (so that a program that runs on the
    reference backend also runs on CUDA)."""
    k = topk_idx.shape[1]
    if k > MAX_TOPK:
        raise ValueError(
            f"{op} supports at most {MAX_TOPK} top-k slots per token, got topk_idx with K={k} "
            f"(shape {topk_idx.shape}); route each token to at most {MAX_TOPK} experts"
        )


def check_topk_weights(topk_weights, topk_idx) -> None:
    shape = getattr(topk_weights, "shape", None)
    if shape != topk_idx.shape:
        raise ValueError(f"topk_weights must have the shape of topk_idx {topk_idx.shape}, got {shape}")
    if topk_weights.dtype != jnp.float32:
        raise TypeError(
            f"topk_weights must be float32, got {topk_weights.dtype}; cast with topk_weights.astype(jnp.float32)"
        )


def check_hidden_states(x, name: str = "x") -> None:
    """A [T, H] payload in bfloat16, float16 or float32."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array [T, H], got shape {shape}")
    if x.dtype not in PAYLOAD_DTYPES:
        raise TypeError(
            f"{name} must be bfloat16, float16 or float32, got {x.dtype}; "
            f"FP8 payloads are passed as a tuple (x_fp8, scales)"
        )


def check_fp8_pair(x, name: str = "x") -> None:
    """An FP8 payload: (float8_e4m3fn [T, H], float32 [T, H/128])."""
    if len(x) != 2:
        raise ValueError(f"an FP8 {name} must be a pair (x_fp8 [T, H], scales [T, H/128]), got {len(x)} items")
    q, s = x
    if getattr(q, "ndim", None) != 2 or q.dtype != FP8_DTYPE:
        raise TypeError(f"{name}[0] must be float8_e4m3fn [T, H], got {getattr(q, 'dtype', None)} {getattr(q, 'shape', None)}")
    t, h = q.shape
    check_fp8_hidden(h, name=f"{name}[0]")
    want = (t, h // FP8_GROUP)
    if getattr(s, "shape", None) != want or s.dtype != jnp.float32:
        raise ValueError(
            f"{name}[1] (the FP8 scales) must be float32 {want} (one scale per token per 128 channels), "
            f"got {getattr(s, 'dtype', None)} {getattr(s, 'shape', None)}"
        )


def check_fp8_hidden(hidden: int, *, use_ue8m0: bool = False, name: str = "x", combine: bool = False) -> None:
    """The hidden size an FP8 cast takes: scales per 128 channels, packed four
    per int32 with UE8M0; the FP8 low-latency combine (``combine``) casts four
    groups per step."""
    group = FP8_GROUP * (UE8M0_PACK if use_ue8m0 or combine else 1)
    if hidden % group:
        what = ("combine_fp8=True needs" if combine else
                "packed UE8M0 scales need" if use_ue8m0 else "FP8 needs")
        why = (", four groups per step" if combine else ", four scales per int32" if use_ue8m0 else "")
        raise ValueError(
            f"{name} has hidden size {hidden}; {what} a multiple of {group} "
            f"(one scale per 128 channels{why}), for example {hidden + (-hidden) % group}"
            + ("; or set combine_fp8=False" if combine else "")
        )


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_ids_in_range_now(topk_idx, num_experts: int) -> None:
    """Eager check of concrete ids (traced ids are checked in checked mode)."""
    if not is_concrete(topk_idx):
        return
    ids = np.asarray(topk_idx)
    bad = (ids < -1) | (ids >= num_experts)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise RoutingError(
            f"topk_idx{list(first)} = {int(ids[first])} is out of range: ids must be in [0, num_experts={num_experts}) "
            f"or -1 for a masked slot"
        )
