"""The GPU soak's hashing and bookkeeping (tests/gpu/soak.py) on CPU: the
device checksum sees any flipped bit and a swap of elements or outputs, the
log compares each step with its input set's first, the loop reports
mismatches and errors with their step and stops where ``agree`` says."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import ml_dtypes

from gpu import soak


def _outputs(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16), rng.integers(-1, 9, (6, 3)).astype(np.int32),
            rng.random((6, 3)).astype(np.float32), rng.random(4) < 0.5]


def test_checksum_is_deterministic_and_jittable():
    outs = _outputs(0)
    a = np.asarray(jax.jit(soak.checksum)(outs))
    assert a.shape == (4, 2) and a.dtype == np.uint32
    np.testing.assert_array_equal(a, np.asarray(soak.checksum(outs)))
    np.testing.assert_array_equal(a, np.asarray(jax.jit(soak.checksum)(_outputs(0))))


@pytest.mark.parametrize("leaf", [0, 1, 2, 3])
def test_checksum_sees_every_single_bit_flip(leaf):
    outs = _outputs(1)
    ref = np.asarray(soak.checksum(outs))
    arr = np.array(outs[leaf])
    raw = arr.view(np.uint8) if arr.dtype != np.bool_ else arr
    nbits = 1 if arr.dtype == np.bool_ else 8
    rng = np.random.default_rng(leaf)
    for _ in range(40):
        pos = rng.integers(raw.size)
        flipped = raw.copy().ravel()
        if arr.dtype == np.bool_:
            flipped[pos] = ~flipped[pos]
        else:
            flipped[pos] ^= np.uint8(1 << rng.integers(nbits))
        new = list(outs)
        new[leaf] = flipped.reshape(raw.shape).view(arr.dtype).reshape(arr.shape) if arr.dtype != np.bool_ \
            else flipped.reshape(arr.shape)
        got = np.asarray(soak.checksum(new))
        assert got[leaf, 0] != ref[leaf, 0]
        np.testing.assert_array_equal(np.delete(got, leaf, 0), np.delete(ref, leaf, 0))


def test_checksum_sees_swapped_rows():
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    y = x[[1, 0, 2, 3]]
    assert not np.array_equal(np.asarray(soak.checksum([x])), np.asarray(soak.checksum([y])))
    assert np.asarray(soak.checksum([jnp.zeros((0, 3))])).shape == (1, 2)


def test_hash_log_compares_with_each_sets_first_step():
    log = soak.HashLog(["a", "b"])
    s0, s1 = np.array([[1, 2], [3, 4]], np.uint32), np.array([[5, 6], [7, 8]], np.uint32)
    assert log.record(0, 0, s0) and log.record(1, 1, s1) and log.record(2, 0, s0) and log.record(3, 1, s1)
    bad = s1.copy()
    bad[1, 0] += 1
    assert not log.record(5, 1, bad)
    assert log.mismatches == [dict(step=5, key=1, reference_step=1, outputs=["b"])]
    assert log.steps == 5


def test_soak_loop_reports_mismatch_error_and_budget():
    said = []
    calls = []

    def step(x):
        calls.append(x)
        n = len(calls) - 1
        if n == 7:
            return np.array([[x, 99]], np.uint32)  # a corrupted step
        if n == 11:
            raise RuntimeError("jax_ep: rank 1 timed out waiting for rank 3\nmore")
        return np.array([[x, 0]], np.uint32)

    log, done, error = soak.soak(step, [(10,), (20,)], ["y"], 50, 1e9, 0, "t", said.append)
    assert done == 11 and error == "t: step 11 failed: RuntimeError: jax_ep: rank 1 timed out waiting for rank 3"
    assert log.mismatches == [dict(step=7, key=1, reference_step=1, outputs=["y"])]
    assert any("first mismatch at step 7" in m for m in said)

    calls.clear()
    stops = []
    log, done, error = soak.soak(lambda x: np.array([[x, 0]], np.uint32), [(1,), (2,)], ["y"], 50, 1e9, 0, "t",
                                 said.append, agree=lambda s, over: stops.append(s) or s >= 20, check_every=10)
    assert (done, error, stops) == (20, None, [10, 20]) and not log.mismatches


def test_parse_args_defaults():
    ll = soak.parse_args(["--mode", "low_latency"])
    assert (ll.pairs, ll.tokens, ll.experts) == (10000, 128, 288)
    n = soak.parse_args(["--pairs", "5"])
    assert (n.pairs, n.tokens, n.experts, n.mode) == (5, 4096, 256, "normal")


def test_check_filters_of_the_multirank_scripts(capsys):
    """JAX_EP_CHECKS / JAX_EP_SKIP_CHECKS pick the checks a multi-rank script
    runs (the sanitizer steps leave out the slow DeepEP shapes and NVSHMEM)."""
    from gpu.rank_checks import Checks

    ran = []
    checks = Checks({"JAX_EP_SKIP_CHECKS": "nvshmem|deepep"})
    for name in ("ll_bf16_small", "ll_fp8_deepep_shape", "ll_over_nvshmem_symmetric_memory"):
        checks(name)(lambda name=name: ran.append(name))
    assert ran == ["ll_bf16_small"] and checks.all_passed and len(checks.results) == 1
    assert "SKIP ll_fp8_deepep_shape" in capsys.readouterr().out
    only = Checks({"JAX_EP_CHECKS": "^rank_major"})
    assert only.selected("rank_major_small_uneven") and not only.selected("expert_major_aligned")
    assert Checks({}).selected("anything")
