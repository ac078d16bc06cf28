"""Per-token FP8 cast (``float8_e4m3fn``, one scale per 128 channels) and its inverse."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import validation
from jax_ep.backends import get_backend, require
from jax_ep.options import FP8Options


def per_token_cast_to_fp8(x: jax.Array, options: FP8Options = FP8Options(), *, backend: str = "xla"):
    """Cast each token to FP8 with one scale per 128 channels.

    ``scale = max(amax, 1e-4) / 448`` per token per 128 channels (rounded up to
    a power of two with ``options.round_scale``), ``x_fp8 = x / scale``
    saturated to ±448. See ``jax_ep.reference.fp8`` for the exact arithmetic.

    Args:
      x: ``[..., H]`` bfloat16, float16 or float32; ``H % 128 == 0``
        (``H % 512 == 0`` with ``options.use_ue8m0``).
      options: ``FP8Options`` (static).
      backend: ``"xla"`` or ``"cuda"`` (static).

    Returns:
      ``(x_fp8 float8_e4m3fn [..., H], scales)``: scales are ``float32
      [..., H/128]``, or packed UE8M0 ``int32 [..., H/512]``.
    """
    if getattr(x, "ndim", 0) < 1 or x.dtype not in validation.PAYLOAD_DTYPES:
        raise TypeError(f"x must be a bfloat16, float16 or float32 array [..., H], got {getattr(x, 'dtype', type(x))}")
    validation.check_fp8_hidden(x.shape[-1], use_ue8m0=options.use_ue8m0)
    impl = require(get_backend(backend), "per_token_cast_to_fp8", backend)
    return impl(x, options.round_scale, options.use_ue8m0)


def per_token_cast_back(
    x_fp8: jax.Array,
    scales: jax.Array,
    options: FP8Options = FP8Options(),
    *,
    out_dtype=jnp.bfloat16,
    backend: str = "xla",
) -> jax.Array:
    """Inverse of ``per_token_cast_to_fp8``: ``x_fp8 * scale`` in ``out_dtype``.

    Args:
      x_fp8: ``float8_e4m3fn [..., H]``.
      scales: ``float32 [..., H/128]``, or ``int32 [..., H/512]`` with
        ``options.use_ue8m0``.
      options: the ``FP8Options`` the cast used (static).
      out_dtype: bfloat16, float16 or float32.
      backend: ``"xla"`` or ``"cuda"`` (static).
    """
    if getattr(x_fp8, "dtype", None) != validation.FP8_DTYPE:
        raise TypeError(f"x_fp8 must be float8_e4m3fn, got {getattr(x_fp8, 'dtype', type(x_fp8))}")
    hidden = x_fp8.shape[-1]
    validation.check_fp8_hidden(hidden, use_ue8m0=options.use_ue8m0, name="x_fp8")
    if options.use_ue8m0:
        want_shape, want_dtype = x_fp8.shape[:-1] + (hidden // 512,), jnp.int32
    else:
        want_shape, want_dtype = x_fp8.shape[:-1] + (hidden // 128,), jnp.float32
    if scales.shape != want_shape or scales.dtype != want_dtype:
        raise ValueError(
            f"scales must be {jnp.dtype(want_dtype).name} {want_shape} for x_fp8 {x_fp8.shape} "
            f"(use_ue8m0={options.use_ue8m0}), got {scales.dtype} {scales.shape}"
        )
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in validation.PAYLOAD_DTYPES]:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    impl = require(get_backend(backend), "per_token_cast_back", backend)
    return impl(x_fp8, scales, options.use_ue8m0, out_dtype)
