"""Per-token FP8 cast against the numpy quantizer."""

import ml_dtypes
import numpy as np
import pytest

import jax.numpy as jnp
import jax_ep
import np_reference as npr


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_cast_matches_numpy_quantizer(rng, round_scale, dtype):
    x = (rng.standard_normal((9, 384)) * rng.uniform(0.01, 100, (9, 1))).astype(dtype)
    x[3, :128] = 0  # all-zero group: amax floors at 1e-4
    q, s = jax_ep.per_token_cast_to_fp8(x, jax_ep.FP8Options(round_scale=round_scale))
    want_q, want_s = npr.fp8_quantize(np.asarray(x, np.float32), round_scale=round_scale)
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32 and s.shape == (9, 3)
    np.testing.assert_array_equal(np.asarray(s), want_s)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))


_OPTS = [jax_ep.FP8Options(), jax_ep.FP8Options(round_scale=True), jax_ep.FP8Options(use_ue8m0=True)]


@pytest.mark.parametrize("opts", _OPTS)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_numpy_cast_is_the_reference_on_edge_cases(rng, opts, dtype):
    """np_reference.fp8_cast (the bytes the GPU tests hold every CUDA cast to)
    is jax_ep.reference.fp8's cast on the edge cases, bit for bit: zero and
    negative-zero groups, denormals, the FP8 maximum, e4m3 ties, and an inf
    (its group's bytes are 0 or NaN in both; NaN bytes compared as NaN)."""
    x = npr.fp8_edge_rows(rng, 12, 1024)
    x = x[~np.isnan(x.reshape(12, 8, 128)).any(-1).any(-1)]  # NaN groups: the kernels' policy only
    q, s = jax_ep.per_token_cast_to_fp8(x.astype(dtype), opts)
    want_q, want_s = npr.fp8_cast(x, opts.round_scale, opts.use_ue8m0)
    np.testing.assert_array_equal(np.asarray(s).view(np.uint32), want_s.view(np.uint32))
    got_q = np.asarray(q).view(np.uint8)
    nan = (got_q & 0x7F) == 0x7F
    np.testing.assert_array_equal(nan, want_q == 0x7F)
    np.testing.assert_array_equal(np.where(nan, 0x7F, got_q), want_q)
    assert nan.any() and (want_q == 0x80).any() and (want_q == 0x7E).any() and (want_q == 0x01).any()


def test_numpy_cast_nan_policy():
    """NaN: ignored by the amax (fmaxf), cast to 0x7f; an all-NaN group takes
    the 1e-4 floor."""
    x = np.ones((1, 128), np.float32)
    x[0, 3] = np.nan
    q, s = npr.fp8_cast(x)
    assert q[0, 3] == 0x7F and s[0, 0] == np.float32(1.0) * np.float32(1.0 / 448.0)
    assert (np.delete(q[0], 3) == q[0, 0]).all()
    q, s = npr.fp8_cast(np.full((1, 128), np.nan, np.float32), use_ue8m0=False)
    assert (q == 0x7F).all() and s[0, 0] == np.float32(1e-4) * np.float32(1.0 / 448.0)


def test_cast_error_bound_and_calc_diff(rng):
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    q, s = jax_ep.per_token_cast_to_fp8(x)
    back = np.asarray(jax_ep.per_token_cast_back(q, s, out_dtype=jnp.float32), np.float64)
    a, b = x.astype(np.float64) + 1, back + 1  # DeepEP's calc_diff
    diff = 1 - 2 * (a * b).sum() / (a * a + b * b).sum()
    assert diff < 9e-4
    amax = np.abs(x.reshape(64, 8, 128)).max(-1, keepdims=True)
    assert (np.abs(back - x).reshape(64, 8, 128) <= amax / 16 + 1e-7).all()


def test_ue8m0_packing(rng):
    x = (rng.standard_normal((3, 1024)) * 5).astype(np.float32)
    opts = jax_ep.FP8Options(use_ue8m0=True)
    assert opts.round_scale  # implied
    q, packed = jax_ep.per_token_cast_to_fp8(x, opts)
    assert packed.dtype == jnp.int32 and packed.shape == (3, 2)
    _, want_s = npr.fp8_quantize(x, round_scale=True)
    exps = np.asarray(packed).view(np.uint32)
    for j in range(8):  # byte j % 4 of word j // 4
        byte = (exps[:, j // 4] >> (8 * (j % 4))) & 0xFF
        np.testing.assert_array_equal(byte, (want_s[:, j].view(np.uint32) >> 23) & 0xFF)
    q2, s2 = jax_ep.per_token_cast_to_fp8(x, jax_ep.FP8Options(round_scale=True))
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(q2).view(np.uint8))
    np.testing.assert_array_equal(
        np.asarray(jax_ep.per_token_cast_back(q, packed, opts, out_dtype=jnp.float32)),
        np.asarray(jax_ep.per_token_cast_back(q2, s2, out_dtype=jnp.float32)),
    )


def test_saturation_and_leading_dims(rng):
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    q, s = jax_ep.per_token_cast_to_fp8(x)
    assert q.shape == (2, 3, 128) and s.shape == (2, 3, 1)
    assert np.abs(np.asarray(q).astype(np.float32)).max() <= 448
    # the group max maps exactly onto ±448 (up to rounding of the scale)
    assert np.isclose(np.abs(np.asarray(q, np.float32)).max(axis=-1), 448, rtol=1e-2).all()


@pytest.mark.parametrize("opts", [jax_ep.FP8Options(), jax_ep.FP8Options(use_ue8m0=True)])
def test_empty_input(opts):
    q, s = jax_ep.per_token_cast_to_fp8(jnp.zeros((0, 1024)), opts)
    assert q.shape == (0, 1024) and s.shape == (0, 2 if opts.use_ue8m0 else 8)
    assert jax_ep.per_token_cast_back(q, s, opts).shape == (0, 1024)


@pytest.mark.parametrize("opts", [jax_ep.FP8Options(), jax_ep.FP8Options(use_ue8m0=True)])
def test_cast_back_takes_the_cast_as_it_comes(rng, opts):
    """per_token_cast_back(per_token_cast_to_fp8(x)) composes; the two-part form stays."""
    x = rng.standard_normal((3, 5, 512)).astype(np.float32)
    pair = jax_ep.per_token_cast_to_fp8(x, opts)
    want = np.asarray(jax_ep.per_token_cast_back(*pair, opts, out_dtype=jnp.float32))
    np.testing.assert_array_equal(np.asarray(jax_ep.per_token_cast_back(pair, opts, out_dtype=jnp.float32)), want)
    np.testing.assert_array_equal(np.asarray(jax_ep.per_token_cast_back(pair, options=opts, out_dtype=jnp.float32)), want)
    np.testing.assert_array_equal(np.asarray(jax_ep.per_token_cast_back(list(pair), opts, out_dtype=jnp.float32)), want)
    if not opts.use_ue8m0:
        back = jax_ep.per_token_cast_back(jax_ep.per_token_cast_to_fp8(x))  # the default options both ways
        assert back.dtype == jnp.bfloat16 and back.shape == x.shape
        np.testing.assert_allclose(np.asarray(back, np.float32), x, rtol=0.07, atol=0.07)


def test_cast_back_pair_errors():
    q = jnp.zeros((2, 256), jnp.float8_e4m3fn)
    s = jnp.ones((2, 2), jnp.float32)
    with pytest.raises(TypeError, match=r"x_fp8 is already the pair"):
        jax_ep.per_token_cast_back((q, s), s)
    with pytest.raises(ValueError, match=r"must be the pair \(x_fp8, scales\).*got 3 items"):
        jax_ep.per_token_cast_back((q, s, s))
    with pytest.raises(TypeError, match=r"per_token_cast_back needs the scales"):
        jax_ep.per_token_cast_back(q)
    with pytest.raises(TypeError, match=r"options must be a jax_ep.FP8Options"):
        jax_ep.per_token_cast_back(q, s, "ue8m0")


@pytest.mark.parametrize("opts", _OPTS)
def test_entry_point_checks_hold_for_the_reference(rng, opts):
    """tests/fp8_entry_points.py, which the GPU tests run on every CUDA cast,
    run with the xla backend on finite edge rows: its row bookkeeping and its
    numpy expectations hold for the reference."""
    import fp8_entry_points as fep

    q, s, want_q, want_s = fep.cast_op(rng, jnp.bfloat16, opts, "xla", finite=True)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(q, want_q)
    m = fep.DISPATCH_SHAPE[1]
    q, s, want_q, want_s = fep.ll_dispatch(rng, jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m, fp8=opts),
                                           finite=True)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(q, want_q)
    if opts == jax_ep.FP8Options():
        m = fep.COMBINE_SHAPE[1]
        got, want = fep.ll_combine_fp8(rng, jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=m,
                                                                      combine_fp8=True), finite=True)
        np.testing.assert_array_equal(got, want)  # (the reference may keep a -0 the kernel sums to +0)
