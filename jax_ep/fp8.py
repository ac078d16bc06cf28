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
    x_fp8,
    scales=None,
    options: FP8Options = FP8Options(),
    *,
    out_dtype=jnp.bfloat16,
    backend: str = "xla",
) -> jax.Array:
    """Inverse of ``per_token_cast_to_fp8``: ``x_fp8 * scale`` in ``out_dtype``.

    Takes the cast's output as it comes, ``per_token_cast_back(pair)`` or
    ``per_token_cast_back(pair, options)``, or its two parts,
    ``per_token_cast_back(x_fp8, scales, options)``.

    Args:
      x_fp8: ``float8_e4m3fn [..., H]``, or the pair ``(x_fp8, scales)``.
      scales: ``float32 [..., H/128]``, or ``int32 [..., H/512]`` with
        ``options.use_ue8m0``; omitted when ``x_fp8`` is the pair.
      options: the ``FP8Options`` the cast used (static).
      out_dtype: bfloat16, float16 or float32.
      backend: ``"xla"`` or ``"cuda"`` (static).

    Returns:
      ``out_dtype [..., H]``.
    """
    if isinstance(x_fp8, (tuple, list)):
        if len(x_fp8) != 2:
            raise ValueError(
                f"x_fp8 as a sequence must be the pair (x_fp8, scales) that per_token_cast_to_fp8 returns, "
                f"got {len(x_fp8)} items"
            )
        if isinstance(scales, FP8Options):  # per_token_cast_back(pair, options)
            options, scales = scales, None
        if scales is not None:
            raise TypeError(
                "x_fp8 is already the pair (x_fp8, scales): call per_token_cast_back(pair, options) "
                "or per_token_cast_back(x_fp8, scales, options), not both"
            )
        x_fp8, scales = x_fp8
    elif scales is None:
        raise TypeError(
            "per_token_cast_back needs the scales: pass per_token_cast_to_fp8's pair as it comes, "
            "per_token_cast_back((x_fp8, scales), options), or per_token_cast_back(x_fp8, scales, options)"
        )
    if not isinstance(options, FP8Options):
        raise TypeError(f"options must be a jax_ep.FP8Options, got {type(options).__name__}")
    if getattr(x_fp8, "dtype", None) != validation.FP8_DTYPE:
        raise TypeError(f"x_fp8 must be float8_e4m3fn, got {getattr(x_fp8, 'dtype', type(x_fp8))}")
    hidden = x_fp8.shape[-1]
    validation.check_fp8_hidden(hidden, use_ue8m0=options.use_ue8m0, name="x_fp8")
    if options.use_ue8m0:
        want_shape, want_dtype = x_fp8.shape[:-1] + (hidden // 512,), jnp.int32
    else:
        want_shape, want_dtype = x_fp8.shape[:-1] + (hidden // 128,), jnp.float32
    if getattr(scales, "shape", None) != want_shape or getattr(scales, "dtype", None) != want_dtype:
        raise ValueError(
            f"scales must be {jnp.dtype(want_dtype).name} {want_shape} for x_fp8 {x_fp8.shape} "
            f"(use_ue8m0={options.use_ue8m0}), got {getattr(scales, 'dtype', type(scales))} "
            f"{getattr(scales, 'shape', '')}"
        )
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in validation.PAYLOAD_DTYPES]:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    impl = require(get_backend(backend), "per_token_cast_back", backend)
    return impl(x_fp8, scales, options.use_ue8m0, out_dtype)
