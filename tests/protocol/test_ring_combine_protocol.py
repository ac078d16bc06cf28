"""The rank-major ring combine (cuda/intranode_combine.cu) explored on CPU: progress
and no ring slot overwritten before it is read, for the launch shapes the
kernel really uses (jax_ep._C.combine_launch_shape) and every accepted
(chunk, ring) in a range."""

import itertools
import random

import pytest

from explore import count_failures, explore_exhaustive, explore_random
from ring_combine import launch_shape, make_model, routing_dense, routing_shifted
from jax_ep import _extension

needs_extension = pytest.mark.skipif(not _extension.available(), reason=_extension.unavailable_reason() or "-")


def unclamped_batch(blocks):
    """The reducer batch as chosen before it depended on the ring."""
    return max(1, min(4, 32 // (2 * blocks)))


def routing_sparse(num_ranks, num_tokens, seed):
    rng = random.Random(seed)
    return [sorted(t for t in range(num_tokens) if rng.random() < 0.6) for _ in range(num_ranks)]


@pytest.mark.parametrize("num_ranks,num_sms", [(2, 2), (2, 4), (8, 8)])
def test_a_ring_smaller_than_chunk_plus_batch_deadlocks(num_ranks, num_sms):
    # NormalOptions(num_sms=..., combine_chunk_rows=2, combine_ring_rows=2)
    # with the batch the kernel used to take regardless of the ring.
    blocks = max((num_ranks + 1) // 2, num_sms)
    batch = unclamped_batch(blocks)
    assert 2 < 2 + batch - 1
    model = make_model(routing_shifted(num_ranks, 16, 1), 16, blocks, batch, chunk_rows=2, ring_rows=2)
    r = explore_random(model, runs=20)
    assert r.kind == "deadlock", r
    assert any(w.startswith("ring space") for w in r.blocked.values()), r
    assert count_failures(model, runs=20) == 20


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("chunk_rows,ratio", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (1, 4)])
def test_small_rings_exhaustively(batch, chunk_rows, ratio):
    """One block per rank, 2 ranks, streams that start at token `shift`,
    every schedule: a deadlock for some shift exactly when
    ring < chunk + batch - 1; never a slot overwritten early."""
    ring = chunk_rows * ratio
    tokens = chunk_rows + 2 * batch + 1
    results = [
        explore_exhaustive(make_model(routing_shifted(2, tokens, shift), tokens, 1, batch, chunk_rows, ring))
        for shift in range(batch)
    ]
    assert all(r.kind in ("ok", "deadlock") for r in results), results
    deadlocks = [r for r in results if r.kind == "deadlock"]
    assert bool(deadlocks) == (ring < chunk_rows + batch - 1), results


@needs_extension
@pytest.mark.parametrize("chunk_rows", [1, 2, 3])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_kernel_launch_shape_is_deadlock_free_exhaustively(chunk_rows, ratio):
    ring = chunk_rows * ratio
    blocks, batch = launch_shape(2, 1, chunk_rows, ring)
    assert blocks == 1
    tokens = chunk_rows + 2 * batch + 1
    routings = [routing_shifted(2, tokens, shift) for shift in range(max(batch, 2))]
    for streams in routings + [routing_sparse(2, tokens, seed=ratio)]:
        r = explore_exhaustive(make_model(streams, tokens, blocks, batch, chunk_rows, ring))
        assert r.ok, (blocks, batch, r)


@needs_extension
def test_kernel_launch_shape_is_deadlock_free_randomly():
    """Random schedules of every accepted (chunk, ring) in a range, up to 8 ranks x 8 SMs."""
    configs = itertools.product([2, 4, 8], [1, 4, 8], [1, 2], [1, 2, 3])
    for k, (num_ranks, num_sms, chunk_rows, ratio) in enumerate(configs):
        ring = chunk_rows * ratio
        blocks, batch = launch_shape(num_ranks, num_sms, chunk_rows, ring)
        assert ring >= chunk_rows + batch - 1
        tokens = 24
        for streams in (routing_shifted(num_ranks, tokens, 1), routing_sparse(num_ranks, tokens, seed=k)):
            r = explore_random(make_model(streams, tokens, blocks, batch, chunk_rows, ring), runs=6, seed=k)
            assert r.ok, ((num_ranks, num_sms, chunk_rows, ring, blocks, batch), r)


@needs_extension
def test_launch_shape_keeps_the_batch_where_the_ring_allows():
    assert launch_shape(8, 24, 2, 64) == (24, 1)
    assert launch_shape(2, 4, 2, 64) == (4, 4)
    assert launch_shape(8, 8, 2, 64) == (8, 2)
    # The deadlocking configuration of NormalOptions(num_sms=4, combine_chunk_rows=2, combine_ring_rows=2):
    assert launch_shape(2, 4, 2, 2) == (4, 1)
    assert launch_shape(2, 4, 2, 4) == (4, 2)
