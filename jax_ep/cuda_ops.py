"""The CUDA backend: ``jax.ffi.ffi_call`` wrappers of the kernels in ``jax_ep._C``.

Each function has the signature of its twin in ``jax_ep.reference``. Ops that
have no kernel yet are absent, and ``jax_ep.backends.require`` says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import _extension  # noqa: F401  (registers the FFI targets)

IMPLEMENTED = ("get_dispatch_layout", "per_token_cast_to_fp8", "per_token_cast_back")


def get_dispatch_layout(topk_idx: jax.Array, num_experts: int, num_ranks: int):
    t = topk_idx.shape[0]
    out = (
        jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((t, num_ranks), jnp.bool_),
    )
    call = jax.ffi.ffi_call("jax_ep_get_dispatch_layout", out, vmap_method="sequential")
    return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


def _as_2d(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def per_token_cast_to_fp8(x: jax.Array, round_scale: bool, use_ue8m0: bool):
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = _as_2d(x if x.dtype != jnp.float16 else x.astype(jnp.float32))
    t = x2.shape[0]
    scales = (
        jax.ShapeDtypeStruct((t, hidden // 512), jnp.int32)
        if use_ue8m0
        else jax.ShapeDtypeStruct((t, hidden // 128), jnp.float32)
    )
    out = (jax.ShapeDtypeStruct((t, hidden), jnp.float8_e4m3fn), scales)
    call = jax.ffi.ffi_call("jax_ep_per_token_cast_to_fp8", out, vmap_method="sequential")
    q, s = call(x2, round_scale=bool(round_scale or use_ue8m0), use_ue8m0=bool(use_ue8m0))
    return q.reshape(*lead, hidden), s.reshape(*lead, s.shape[-1])


def per_token_cast_back(x_fp8: jax.Array, scales: jax.Array, use_ue8m0: bool, out_dtype):
    lead, hidden = x_fp8.shape[:-1], x_fp8.shape[-1]
    kernel_dtype = jnp.float32 if jnp.dtype(out_dtype) == jnp.float16 else out_dtype
    out = jax.ShapeDtypeStruct((int(np.prod(lead, dtype=np.int64)), hidden), kernel_dtype)
    call = jax.ffi.ffi_call("jax_ep_per_token_cast_back", out, vmap_method="sequential")
    y = call(_as_2d(x_fp8), _as_2d(scales), use_ue8m0=bool(use_ue8m0))
    return y.reshape(*lead, hidden).astype(out_dtype)
