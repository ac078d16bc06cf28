"""The low-latency put protocol (ll_put_model.py) under every schedule the
explorer can try: no deadlock, every receiver reads exactly the messages of
its call; and the variants that drop one of its rules fail."""

import functools

import pytest

from explore import explore_exhaustive, explore_random
from ll_put_model import DONE, decode, final, make_model


def test_signal_word_arithmetic():
    for count in (0, 1, 2, 7, 1000, (1 << 20) - 1):
        w = final(count)
        for arrived in range(min(count, 5)):  # final first, messages still missing
            assert not decode((w + arrived) % (1 << 64))[0]
        assert decode((w + count) % (1 << 64)) == (True, count)
        assert not decode(count)[0]  # messages without the final signal
    assert decode(DONE) == (True, 0)


def test_exhaustive_two_ranks_across_nodes():
    """R = 2 in two nodes, two calls (one per half), every delivery order
    (signatures off; with them: the tests at the end, and the random ones)."""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=2, calls=2, ranks_per_node=1, max_msgs=1))
    assert r.ok, r
    assert r.states > 1000


@pytest.mark.parametrize("num_ranks,ranks_per_node,max_msgs", [(2, 1, 2), (3, 1, 1), (4, 2, 2), (4, 1, 1)])
def test_random_halves_reused(num_ranks, ranks_per_node, max_msgs):
    """Four calls (each half twice), pointer and put peers mixed where a node has several ranks."""
    r = explore_random(functools.partial(make_model, num_ranks=num_ranks, calls=4, ranks_per_node=ranks_per_node,
                                         max_msgs=max_msgs), runs=150, seed=num_ranks)
    assert r.ok, r


def test_trusting_the_final_signal_reads_missing_data():
    """Without counting arrivals, the final signal may overtake the data."""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=2, calls=1, max_msgs=1, count_arrivals=False))
    assert r.kind == "violation" and "holds None" in r.message, r
    assert explore_random(functools.partial(make_model, num_ranks=3, calls=4, max_msgs=2, count_arrivals=False),
                          runs=100).kind == "violation"


def test_one_half_fails():
    """With one half, a fast peer's next call lands before the reader reset its words."""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=2, calls=2, max_msgs=1, halves=1))
    assert not r.ok, r


def test_words_must_be_reset():
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=2, calls=3, max_msgs=1, reset_words=False))
    assert r.kind == "deadlock", r  # the reused half's words never read "done" again


def test_dead_masked_rank_exhaustive():
    """R = 3, nodes {0, 1} and {2}, rank 0 masked and gone: ranks 1 and 2
    finish both halves over puts, reading exactly their messages. (A masked
    rank that still runs: the random schedules below.)"""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=3, calls=2, ranks_per_node=2, max_msgs=1,
                                             masked=(0,)))
    assert r.ok, r


@pytest.mark.parametrize("masked,masked_alive", [((1,), False), ((0, 3), True), ((3,), True)])
def test_masked_ranks_random(masked, masked_alive):
    """R = 4 in nodes of two (pointer and put peers mixed), halves reused."""
    r = explore_random(functools.partial(make_model, num_ranks=4, calls=4, ranks_per_node=2, max_msgs=2,
                                         masked=masked, masked_alive=masked_alive), runs=120, seed=len(masked))
    assert r.ok, r


def test_waiting_for_a_dead_masked_rank_deadlocks():
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=3, calls=1, max_msgs=1, masked=(2,),
                                             skip_masked=False))
    assert r.kind == "deadlock", r


# --- a stopped rank and the abort word (ll_put.cuh: wait_done, fail, raise_abort) ---------------------------


@pytest.mark.parametrize("stop,ranks_per_node", [((1, 0), 1), ((0, 0), 1), ((1, 0), 2)])
def test_a_stopped_rank_stops_everyone_after_one_timeout_exhaustive(stop, ranks_per_node):
    """R = 2, one call, the abort reaching the peer by a put (two nodes) or a
    store (one node): one timeout in the whole system, and every running rank
    leaves with a record."""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=2, calls=1, ranks_per_node=ranks_per_node,
                                             max_msgs=1, stop=stop, timeouts=1))
    assert r.ok, r
    assert r.states > (1000 if ranks_per_node == 1 else 20)


@pytest.mark.parametrize("num_ranks,calls,stop,masked", [
    (3, 2, (2, 1), ()), (3, 2, (0, 0), ()), (4, 3, (3, 1), ()), (4, 3, (0, 2), ()), (4, 3, (2, 1), (1,))])
def test_a_stopped_rank_random(num_ranks, calls, stop, masked):
    """Nodes of two (the abort reaches one peer by a store, the others by
    puts), halves reused; with a dead masked rank too."""
    r = explore_random(functools.partial(make_model, num_ranks=num_ranks, calls=calls, ranks_per_node=2, max_msgs=1,
                                         stop=stop, timeouts=1, masked=masked), runs=300, seed=stop[0])
    assert r.ok, r


def test_without_the_abort_word_the_others_block():
    """One timeout is not enough when nobody tells the peers (each would
    wait out its own timeout)."""
    r = explore_exhaustive(functools.partial(make_model, signatures=False, num_ranks=3, calls=1, ranks_per_node=2, max_msgs=1,
                                             stop=(2, 0), timeouts=1, use_abort=False))
    assert r.kind == "deadlock", r
    r = explore_random(functools.partial(make_model, num_ranks=4, calls=3, ranks_per_node=2, max_msgs=1,
                                         stop=(3, 1), timeouts=1, use_abort=False), runs=50)
    assert r.kind == "deadlock", r


# --- call signatures (ll_put.cuh: send_signature, signature_agrees) ------------------------------------------


@pytest.mark.parametrize("mismatch,ranks_per_node", [((1, 0), 1), ((1, 0), 2)])
def test_a_different_call_stops_everyone_exhaustive(mismatch, ranks_per_node):
    """R = 2, the signature reaching the peer by a put (two nodes) or a
    store (one node): both ranks record the mismatch (or the abort), nobody
    completes the call, no timeout is needed, no signature is read stale."""
    r = explore_exhaustive(functools.partial(make_model, num_ranks=2, calls=1, ranks_per_node=ranks_per_node,
                                             max_msgs=1, mismatch=mismatch))
    assert r.ok, r


@pytest.mark.parametrize("num_ranks,calls,mismatch,masked", [
    (3, 3, (2, 2), ()), (4, 3, (0, 1), ()), (4, 4, (3, 3), (1,))])
def test_a_different_call_random(num_ranks, calls, mismatch, masked):
    """Nodes of two, halves reused before the different call (a stale
    signature of the same half would be read there), a dead masked rank too."""
    r = explore_random(functools.partial(make_model, num_ranks=num_ranks, calls=calls, ranks_per_node=2,
                                         max_msgs=1, mismatch=mismatch, masked=masked), runs=60, seed=num_ranks)
    assert r.ok, r


def test_signatures_stay_checked_in_every_call():
    """Without a difference the signatures pass in every call of both halves."""
    r = explore_random(functools.partial(make_model, num_ranks=4, calls=4, ranks_per_node=2, max_msgs=2),
                       runs=40, seed=7)
    assert r.ok, r


def test_a_signature_without_its_signal_is_read_stale():
    """Read once the data words are done, a signature put may not have landed."""
    r = explore_exhaustive(functools.partial(make_model, num_ranks=2, calls=3, max_msgs=1, signal_signature=False))
    assert r.kind == "violation" and "stale signature" in r.message, r
