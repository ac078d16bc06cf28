"""The low-latency halves (cuda/low_latency_*.cu) explored on CPU: every rank
finishes every call, and no half is reused before every peer read it, with
the call serials matched as the kernels match them, across their wrap."""

import pytest

from explore import explore_exhaustive, explore_random
from ll_halves import VARIANTS, make_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_progress_and_no_early_reuse(variant):
    r = explore_exhaustive(make_model(variant, 2, 5))
    assert r.ok, r
    assert explore_random(make_model(variant, 3, 4), runs=40).ok
    assert explore_random(make_model(variant, 8, 3), runs=10).ok


@pytest.mark.parametrize("variant", VARIANTS)
def test_through_the_serial_wrap(variant):
    """Words are compared by serial equality: a small serial modulus (4) and
    calls that cross it behave as 2^32 does: at most two calls are in flight,
    so a word a waiter reads is of its call or two calls older."""
    r = explore_exhaustive(make_model(variant, 2, 6, serial_modulus=4, start=2))
    assert r.ok, r
    assert explore_random(make_model(variant, 4, 6, serial_modulus=4, start=2), runs=30).ok


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_packed_comparison_stopped_at_the_wrap(variant):
    """The comparison before the serials, (v >> 32) >= call with the unwrapped
    call: every rank waits forever at the first call past the wrap."""
    r = explore_exhaustive(make_model(variant, 2, 4, serial_modulus=4, match="packed_ge", start=1))
    assert r.kind == "deadlock", r
    assert all("call 4" in w for w in r.blocked.values()), r


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_serials_are_too_few(variant):
    """The checker sees an early reuse: with serials mod 2 a word two calls old
    passes for this call's, and a reader takes a half before it is written."""
    r = explore_exhaustive(make_model(variant, 2, 4, serial_modulus=2))
    assert r.kind == "violation", r
