"""The internode calls' reuse of buffer halves (cuda/internode.cuh): safe and
deadlock-free over mixed sequences of calls; without barrier B, or without a
call's rail exchange, a rank reads memory a later call already rewrote."""

import itertools

import pytest

import explore
from explore import explore_exhaustive, explore_random
from internode_calls import make_model


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


def run_greedy(make, first: str):
    """One schedule that always runs process ``first`` when it can (it races
    ahead of the others); returns the violation message, or None."""
    system = explore._System(make, None)
    for _ in range(100_000):
        runnable = system.runnable()
        if not runnable:
            return None
        pick = next((i for i in runnable if system.names[i] == first), runnable[0])
        try:
            system.step(pick)
        except explore._Violation as e:
            return str(e)
    return None


@pytest.mark.parametrize("ops", [("cached",) * 8, ("combine",) * 8])
def test_without_the_rail_exchange_a_later_call_overwrites(ops):
    # Rank 0 runs ahead: a call whose stream from rank 1 carries no rows
    # does not wait for rank 1, so its next call writes into rank 1's half
    # while rank 1 still reads it.
    assert explore_random(make_model(2, 1, ops), runs=100, seed=3).ok
    msg = run_greedy(make_model(2, 1, ops, skip="hello"), "rank0")
    assert msg is not None and "call 6" in msg, msg
    assert run_greedy(make_model(2, 1, ops), "rank0") is None
