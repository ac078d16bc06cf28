"""The staged internode kernels' reuse of buffer halves (cuda/internode.cuh):
safe and deadlock-free over mixed sequences of calls; without barrier B a
rank reads memory a later call already rewrote."""

import itertools

import pytest

from explore import explore_exhaustive, explore_random
from internode_staged import make_model


@pytest.mark.parametrize("shape", [(2, 1), (1, 2)])
@pytest.mark.parametrize("ops", [("dispatch",) * 3, ("dispatch", "combine", "cached")])
def test_exhaustive_tiny(shape, ops):
    res = explore_exhaustive(make_model(*shape, ops), max_states=400_000)
    assert res.ok, str(res)


@pytest.mark.parametrize("shape", [(2, 2), (3, 2), (2, 3), (4, 1)])
def test_random_schedules_of_mixed_calls(shape):
    ops = tuple(itertools.islice(itertools.cycle(("dispatch", "cached", "combine", "dispatch", "combine")), 7))
    res = explore_random(make_model(*shape, ops), runs=60, seed=sum(shape))
    assert res.ok, str(res)


def test_without_barrier_b_a_node_peer_reads_a_later_call():
    res = explore_random(make_model(2, 2, ("dispatch",) * 4, skip="barrier_b"), runs=400, seed=1)
    assert res.kind == "violation" and "of call" in res.message, str(res)
