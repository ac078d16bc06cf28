"""The internode ring pipeline (docs/internode.md, "Rings and flow control"):
safe and deadlock-free over consecutive calls reusing both halves, with puts
and credit ADDs delivered late and out of order, for every ring configuration
InternodeOptions accepts; a chunk larger than its RDMA ring deadlocks; and
each broken rule is caught."""

import itertools
import random

import pytest

from explore import explore_exhaustive, explore_random
from internode_ring import RingConfig, make_model
from jax_ep.options import InternodeOptions

ONE = [[{1}], [set()]]                   # 2x1: one token across nodes
TWO = [[{1}, {1}], [set(), set()]]       # 2x1: two tokens through a ring of one
BACK = [[set(), set()], [{0}, {0}]]     # 2x1: TWO's reverse direction
FAN = [[{0, 1}], [set()]]                # 1x2: a forwarder read by both ranks of its node
FAN2 = [[{0, 1}, {0, 1}], [set(), set()]]
HEAVY = [[{1, 2, 3}] * 5, [{3}] * 5, [{0}] * 5, [{0, 1, 2}] * 5]  # 2x2, streams longer than the rings
TINY_CFG = RingConfig(1, 1, 1, 1, packers=2, receivers=1, reducers=1, reorder=False)
ONE_WARP = RingConfig(1, 1, 1, 1, packers=1, receivers=1, reducers=1, reorder=False)


def _accepted(rc, rr, nc, nr) -> bool:
    try:
        InternodeOptions(rdma_chunk_tokens=rc, rdma_ring_tokens=rr, nvl_chunk_tokens=nc, nvl_ring_tokens=nr)
    except ValueError:
        return False
    return True


def _routing(rng, r, t, most):
    return [[set(rng.sample(range(r), rng.randint(0, most))) for _ in range(t)] for _ in range(r)]


def _calls(r0, r1):
    # dispatch, dispatch, combine, combine: halves 1, 0, 1, 0, so each half
    # serves a dispatch and then a combine (shared credit words and flags).
    return [("dispatch", r0), ("dispatch", r1), ("combine", r1), ("combine", r0)]


@pytest.mark.parametrize("calls,shape,cfg", [
    ([("dispatch", TWO)] * 3, (2, 1), TINY_CFG),
    ([("dispatch", ONE)], (2, 1), RingConfig(1, 1, 1, 1, packers=2, receivers=1, reducers=1)),  # reordered messages
    ([("dispatch", FAN)] * 3, (1, 2), ONE_WARP),
    ([("dispatch", FAN2)], (1, 2), ONE_WARP),
    ([("combine", ONE)] * 3, (2, 1), ONE_WARP),
], ids=["dispatch-2x1-3calls", "dispatch-2x1-reorder", "dispatch-1x2-3calls", "dispatch-1x2", "combine-2x1-3calls"])
def test_exhaustive_tiny(calls, shape, cfg):
    res = explore_exhaustive(make_model(calls, *shape, cfg), max_states=40_000)
    assert res.ok, str(res)


@pytest.mark.parametrize("shape", [(2, 2), (3, 2), (2, 4), (4, 1)])
@pytest.mark.parametrize("channels", [1, 2])
def test_random_routings(shape, channels):
    """Random routings over four calls (both halves used twice), random accepted
    sizes, a forwarder capacity that drops rows in one of the trials."""
    nn, el = shape
    rng = random.Random(nn * 100 + el * 10 + channels)
    for trial in range(2):
        rc, nc = rng.randint(1, 2), rng.randint(1, 2)
        cfg = RingConfig(rc, rc * rng.randint(1, 2), nc, nc * rng.randint(1, 2), channels=channels,
                         node_capacity=None if trial == 0 else 2)
        assert _accepted(cfg.rdma_chunk, cfg.rdma_ring, cfg.nvl_chunk, cfg.nvl_ring)
        calls = _calls(_routing(rng, nn * el, 4, 3), _routing(rng, nn * el, 4, 3))
        res = explore_random(make_model(calls, nn, el, cfg), runs=4, seed=trial)
        assert res.ok, (cfg, calls, str(res))


def test_accepted_configurations_finish():
    """Every (chunk, ring) of both legs up to 4 with the ring a multiple of the
    chunk (what the derived defaults give) finishes, over a routing longer
    than the rings; the options refuse an RDMA ring that is not."""
    pairs = [(c, r) for c, r in itertools.product(range(1, 5), repeat=2) if c <= r and r % c == 0]
    rng = random.Random(0)
    for (rc, rr), (nc, nr) in itertools.product(pairs, pairs):
        assert _accepted(rc, rr, nc, nr)
        cfg = RingConfig(rc, rr, nc, nr)
        res = explore_random(make_model([("dispatch", HEAVY), ("combine", HEAVY)], 2, 2, cfg), runs=2,
                             seed=rng.randrange(1 << 30))
        assert res.ok, (cfg, str(res))
    for c, r in itertools.product(range(1, 5), repeat=2):
        if c > r or r % c:  # an RDMA ring is a whole number of chunks (one put and one flag per chunk)
            assert not _accepted(c, r, 1, 1)
        if c > r:  # an NVLink ring holds at least one chunk
            assert not _accepted(1, 1, c, r)


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_rdma_chunk_larger_than_its_ring_deadlocks(op):
    # The writer fills the ring; the chunk never completes, no credit returns.
    assert not _accepted(2, 1, 1, 1)
    res = explore_exhaustive(make_model([(op, TWO)], 2, 1, RingConfig(2, 1, 1, 1, packers=1, receivers=1,
                                                                       reducers=1, reorder=False)))
    assert res.kind == "deadlock", str(res)


@pytest.mark.parametrize("bug,calls,shape,expect", [
    # A row of the next chunk lands in a slot whose put has not left (and is counted into the wrong chunk).
    ("packer_ahead", [("dispatch", TWO)], (2, 1), ("overwritten", "counted")),
    ("packer_ahead", [("combine", TWO)], (2, 1), ("overwritten", "counted")),
    ("credit_max", [("dispatch", FAN2)], (1, 2), ("before every reader passed",)),
    # The previous call's heads in the same half return credits at once.
    ("head_untagged", [("dispatch", TWO)] * 3, (2, 1), ("overwritten", "counted")),
    # The previous call's flags in the same half: a receiver reads call 1's rows in call 3.
    ("flag_untagged", [("dispatch", TWO)] * 3, (2, 1), ("expected ('d', 3",)),
    ("flag_untagged", [("combine", TWO)] * 3, (2, 1), ("expected ('c', 3",)),
    # The credit word read as this call's credits: call 1's count as call 3's.
    ("no_base", [("dispatch", TWO)] * 3, (2, 1), ("overwritten", "counted")),
    # ... also across ops: rank 1's word (half 1, node 0) counts its dispatch credits, then its combine's.
    ("no_base", [("dispatch", BACK), ("dispatch", ONE), ("combine", TWO)], (2, 1), ("overwritten", "counted")),
])
def test_broken_rules_are_caught(bug, calls, shape, expect):
    res = explore_exhaustive(make_model(calls, *shape, TINY_CFG, bugs=(bug,)), max_states=40_000)
    assert res.kind == "violation" and any(e in res.message for e in expect), str(res)


def test_nvl_chunk_larger_than_its_ring_still_progresses():
    """The NVLink senders publish their tail before they wait, so the NVLink
    leg's progress rests on the reducer's batch (next test), not on
    nvl_chunk <= nvl_ring; the options refuse such a chunk all the same."""
    assert not _accepted(1, 1, 2, 1)
    res = explore_random(make_model([("combine", HEAVY)], 2, 2, RingConfig(1, 1, 4, 1)), runs=10)
    assert res.ok, str(res)


def test_reducer_batch_larger_than_the_nvl_ring_deadlocks():
    # Two rows of one sender in a batch of two over a ring of one: the second
    # row waits for a slot whose head is published only after the batch.
    cfg = RingConfig(1, 1, 1, 1, packers=1, receivers=1, reducers=2, batch=2, reorder=False)
    res = explore_exhaustive(make_model([("combine", TWO)], 2, 1, cfg), max_states=40_000)
    assert res.kind == "deadlock" and "nvl" in str(res), str(res)
