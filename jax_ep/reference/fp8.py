"""Per-token FP8 cast in pure JAX: the definition the CUDA kernels match bit for bit.

For each token and each group of 128 channels (all arithmetic in float32)::

    amax  = max(max_i |x_i|, 1e-4)
    scale = amax * float32(1/448)           # 448 = largest float8_e4m3fn
    scale = 2 ** ceil(log2(scale))          # only with round_scale
    q     = saturate_e4m3(x * (1 / scale))  # round to nearest even, clamp to ±448

Every step is one correctly rounded float32 operation (no division by a
broadcast, which XLA would turn into an inexact reciprocal), so the pure-JAX
path and the CUDA kernel agree bit for bit on every platform.

Packed UE8M0 stores the biased exponent (``exponent + 127``) of each
power-of-two scale in one byte, four to an ``int32`` word, little-endian:
byte ``j`` of word ``w`` belongs to channel group ``4*w + j``.
"""

from __future__ import annotations

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

FP8_MAX = 448.0
INV_FP8_MAX = np.float32(1.0 / 448.0)  # 0x3b124925
AMAX_FLOOR = 1e-4
GROUP = 128
PACK = 4


def _pow2_ceil(scale: jax.Array) -> jax.Array:
    """Smallest power of two >= scale, from the float bits (exact; scale is normal)."""
    bits = lax.bitcast_convert_type(scale, jnp.uint32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    return lax.bitcast_convert_type(exponent << 23, jnp.float32)


def _pack_ue8m0(scale: jax.Array) -> jax.Array:
    """float32 [..., G] powers of two -> int32 [..., G/4] packed exponents."""
    exponent = (lax.bitcast_convert_type(scale, jnp.uint32) >> 23) & 0xFF
    exponent = exponent.reshape(*exponent.shape[:-1], exponent.shape[-1] // PACK, PACK)
    shifts = jnp.arange(PACK, dtype=jnp.uint32) * 8
    word = jnp.sum(exponent << shifts, axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(word, jnp.int32)


def unpack_ue8m0(packed: jax.Array) -> jax.Array:
    """int32 [..., G/4] packed exponents -> float32 [..., G] scales."""
    word = lax.bitcast_convert_type(packed, jnp.uint32)
    shifts = jnp.arange(PACK, dtype=jnp.uint32) * 8
    exponent = (word[..., None] >> shifts) & 0xFF
    exponent = exponent.reshape(*packed.shape[:-1], packed.shape[-1] * PACK)
    return lax.bitcast_convert_type(exponent << 23, jnp.float32)


def per_token_cast_to_fp8(x: jax.Array, round_scale: bool, use_ue8m0: bool):
    """x [..., H] -> (float8_e4m3fn [..., H], float32 [..., H/128] | int32 [..., H/512])."""
    *lead, hidden = x.shape
    groups = x.astype(jnp.float32).reshape(*lead, hidden // GROUP, GROUP)
    amax = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1), AMAX_FLOOR)
    scale = amax * INV_FP8_MAX
    if round_scale or use_ue8m0:
        scale = _pow2_ceil(scale)
    # The barrier keeps XLA:GPU from folding x * (1/s) back into x / s.
    inv_scale = lax.optimization_barrier(jnp.ones_like(scale) / scale)
    q = jnp.clip(groups * inv_scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    q = q.reshape(*lead, hidden)
    return q, (_pack_ue8m0(scale) if use_ue8m0 else scale)


def per_token_cast_back(x_fp8: jax.Array, scales: jax.Array, use_ue8m0: bool, out_dtype) -> jax.Array:
    """(float8_e4m3fn [..., H], scales) -> out_dtype [..., H]: x_fp8 * scale."""
    *lead, hidden = x_fp8.shape
    scale = unpack_ue8m0(scales) if use_ue8m0 else scales
    groups = x_fp8.astype(jnp.float32).reshape(*lead, hidden // GROUP, GROUP)
    return (groups * scale[..., None]).reshape(*lead, hidden).astype(out_dtype)
