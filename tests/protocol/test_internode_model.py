"""The internode dispatch and combine rings' models: safe and deadlock-free for
every ring configuration InternodeOptions accepts; the ones it rejects deadlock."""

import itertools
import random

import pytest

from explore import explore_exhaustive, explore_random
from internode_model import RingConfig, combine_model, dispatch_model
from jax_ep.options import InternodeOptions


def _accepted(cfg: RingConfig) -> bool:
    try:
        InternodeOptions(rdma_chunk_tokens=cfg.rdma_chunk, rdma_ring_tokens=cfg.rdma_ring,
                         nvl_chunk_tokens=cfg.nvl_chunk, nvl_ring_tokens=cfg.nvl_ring)
    except ValueError:
        return False
    return True


def _random_tokens(rng, nn, el, t, max_dests):
    r = nn * el
    return [[set(rng.sample(range(r), rng.randint(1, max_dests))) for _ in range(rng.randint(0, t))]
            for _ in range(r)]


# Tiny instances every interleaving of which is explored.
TINY = [
    ([[{1}, {1}], []], 2, 1),       # two tokens over one rail, ring of one
    ([[{0, 1}], []], 1, 2),         # one node: a forwarder fans out to both ranks
    ([[{3}], [], [], []], 2, 2),    # across nodes, then over NVLink to another local index
]


@pytest.mark.parametrize("model", [dispatch_model, combine_model])
@pytest.mark.parametrize("case", range(len(TINY)))
def test_exhaustive_tiny(model, case):
    tokens, nn, el = TINY[case]
    r = explore_exhaustive(model(tokens, nn, el, RingConfig(1, 1, 1, 1)), max_states=20_000)
    assert r.ok, r


@pytest.mark.parametrize("model", [dispatch_model, combine_model])
def test_rejected_configurations_deadlock_exhaustively(model):
    # A chunk larger than its ring: the writer fills the ring, the chunk never completes.
    for cfg in [RingConfig(2, 1, 1, 1), RingConfig(1, 1, 2, 1)]:
        assert not _accepted(cfg)
        r = explore_exhaustive(model([[{1}, {1}], []], 2, 1, cfg), max_states=20_000)
        assert r.kind == "deadlock", (cfg, r)


def test_accepted_configurations_progress_and_rejected_ones_deadlock():
    """Every (chunk, ring) of both legs up to 4, over a routing that fills the
    rings: every accepted configuration finishes, and a deadlock is found for
    every rejected one: always in the combine; in the dispatch where the
    rejection is the RDMA leg's, or one put lands more tokens than an NVLink
    ring holds. (A forwarder idles, and publishes, whenever it runs out of
    RDMA data, so with smaller puts a too-large NVLink chunk may never bite in
    dispatch; the option still rejects it, as the combine needs it.)"""
    rng = random.Random(0)
    heavy = [[{2, 3}] * 6, [], [], []]  # rank 0 through one forwarder to both ranks of node 1
    for rc, rr, nc, nr in itertools.product(range(1, 5), repeat=4):
        cfg = RingConfig(rc, rr, nc, nr)
        if _accepted(cfg):
            res = explore_random(dispatch_model(heavy, 2, 2, cfg), runs=3, seed=rng.randrange(1 << 30))
            assert res.ok, (cfg, res)
            res = explore_random(combine_model(heavy, 2, 2, cfg), runs=3, seed=rng.randrange(1 << 30))
            assert res.ok, (cfg, res)
        elif rc > rr or nc > nr:  # (a ring not a multiple of its chunk is refused for the ring pipeline's puts)
            if rc > rr or rc > nr:
                res = explore_random(dispatch_model(heavy, 2, 2, cfg), runs=40, seed=rng.randrange(1 << 30))
                assert res.kind == "deadlock", (cfg, res)
            res = explore_random(combine_model(heavy, 2, 2, cfg), runs=40, seed=rng.randrange(1 << 30))
            assert res.kind == "deadlock", (cfg, res)


@pytest.mark.parametrize("nn,el", [(2, 2), (3, 2), (2, 4), (4, 1)])
def test_random_routings_accepted_configs(nn, el):
    """Random routings and random accepted ring sizes: safety (every slot read
    before it is overwritten, every rank gets exactly its tokens) and progress."""
    rng = random.Random(nn * 10 + el)
    for trial in range(4):
        rc, nc = rng.randint(1, 3), rng.randint(1, 3)
        cfg = RingConfig(rc, rng.randint(rc, 2 * rc + 1), nc, rng.randint(nc, 2 * nc + 1))
        if not _accepted(cfg):  # a ring not a multiple of its chunk
            continue
        tokens = _random_tokens(rng, nn, el, 5, 3)
        for model in (dispatch_model, combine_model):
            res = explore_random(model(tokens, nn, el, cfg), runs=20, seed=trial)
            assert res.ok, (model.__name__, cfg, tokens, res)
