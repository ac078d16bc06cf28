"""jax_ep.grouped_matmul on one GPU: values and gradients against
jax.lax.ragged_dot where ragged_dot fits, and DeepEP's dropless shape (where
ragged_dot's dense rewrite does not fit) against per-group matmuls, within a
bounded compiled memory. Skipped without a GPU.

    JAX_EP_TEST_GPU=1 python -m pytest tests/gpu/test_grouped_matmul_gpu.py
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax_ep.grouped_matmul import grouped_matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_EP_TEST_GPU=1 on a GPU machine)")


def _aligned_sizes(rng, groups: int, rows: int, fill: float, align: int) -> np.ndarray:
    """Group sizes, each a multiple of `align`, summing to about `fill` * rows."""
    raw = rng.random(groups) ** 2
    sizes = np.floor(raw / raw.sum() * fill * rows / align).astype(np.int32) * align
    return sizes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_ragged_dot_on_the_gpu(dtype, aligned):
    rng = np.random.default_rng(5)
    m, k, n, g = 4096, 512, 1024, 32
    sizes = (_aligned_sizes(rng, g, m, 0.8, 128) if aligned
             else np.diff(np.sort(np.r_[0, rng.integers(0, 3500, g - 1), 3500])).astype(np.int32))
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    gs = jnp.asarray(sizes)
    probe = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(mm):
        return lambda x, w: jnp.sum(mm(x, w, gs).astype(jnp.float32) * probe)

    tol = dict(rtol=1e-4, atol=1e-3) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-1)
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(grouped_matmul)(x, w, gs)
        ref = jax.jit(jax.lax.ragged_dot)(x, w, gs)
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), **tol)
        assert not np.asarray(ours[int(sizes.sum()):]).any()  # rows past the last group are zero
        g_ours = jax.jit(jax.grad(loss(grouped_matmul), (0, 1)))(x, w)
        g_ref = jax.jit(jax.grad(loss(jax.lax.ragged_dot), (0, 1)))(x, w)
    scale = [float(jnp.max(jnp.abs(r.astype(jnp.float32)))) for r in g_ref]
    for a, b, s in zip(g_ours, g_ref, scale, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32) / s, np.asarray(b, np.float32) / s,
                                   rtol=0, atol=1e-3 if dtype == jnp.float32 else 2e-2)


def test_deepep_dropless_shape_fits_and_is_right():
    """49,024 rows (the worst-case-capacity buffer of R = 2), 128 local experts,
    hidden 7168, FFN 1024, bfloat16, groups aligned to 128 and filling 2/3 of
    the rows: forward and backward run in bounded memory; sampled groups equal
    their own matmul."""
    rng = np.random.default_rng(6)
    m, k, n, g = 49024, 7168, 1024, 128
    sizes = _aligned_sizes(rng, g, m, 0.66, 128)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(0), (g, k, n), jnp.bfloat16) * (1 / np.sqrt(k))
    gs = jnp.asarray(sizes)

    def loss(x, w):
        return jnp.sum(grouped_matmul(x, w, gs).astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    compiled = step.lower(x, w).compile()
    mem = compiled.memory_analysis()
    assert mem is None or mem.temp_size_in_bytes < 8 * 2**30, mem.temp_size_in_bytes
    value, (dx, dw) = compiled(x, w)
    assert np.isfinite(float(value))

    y = jax.jit(grouped_matmul)(x, w, gs)
    ends = np.cumsum(sizes)
    for e in (0, int(np.argmax(sizes)), g - 1):
        lo, hi = int(ends[e] - sizes[e]), int(ends[e])
        if hi == lo:
            continue
        want = jnp.dot(x[lo:hi], w[e], preferred_element_type=jnp.float32)
        got = y[lo:hi].astype(jnp.float32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-1)
        # dw of that group: 2 * x_g^T (x_g w_g), from the rounded forward rows.
        want_dw = jnp.dot(x[lo:hi].T, 2 * y[lo:hi], preferred_element_type=jnp.float32)
        s = float(jnp.max(jnp.abs(want_dw)))
        np.testing.assert_allclose(np.asarray(dw[e], np.float32) / s, np.asarray(want_dw) / s, rtol=0, atol=2e-2)
    assert not np.asarray(y[int(ends[-1]):]).any()
