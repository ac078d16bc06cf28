"""get_dispatch_layout: exact integers against the numpy restatement."""

import numpy as np
import pytest

import jax_ep
import np_reference as npr
from conftest import random_routing, run_ranks


@pytest.mark.parametrize("num_ranks,num_experts,num_topk", [(1, 4, 2), (2, 8, 3), (4, 16, 4), (8, 32, 8)])
def test_layout_matches_numpy(rng, num_ranks, num_experts, num_topk):
    t = 13
    idxs = random_routing(rng, num_ranks, t, num_topk, num_experts)
    out = run_ranks(lambda i: tuple(jax_ep.get_dispatch_layout(i, num_experts)), num_ranks, idxs)
    for r in range(num_ranks):
        want = npr.layout(idxs[r], num_experts, num_ranks)
        for got, exp in zip(out, want):
            np.testing.assert_array_equal(got[r], exp)


def test_layout_outside_shard_map_with_num_ranks(rng):
    idx = random_routing(rng, 1, 9, 3, 12, distinct=False)[0]  # duplicates count once
    got = jax_ep.get_dispatch_layout(idx, 12, num_ranks=4)
    for g, w in zip(got, npr.layout(idx, 12, 4)):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_layout_all_masked_and_empty():
    idx = np.full((5, 2), -1, np.int32)
    per_rank, per_expert, in_rank = jax_ep.get_dispatch_layout(idx, 8, num_ranks=2)
    assert not np.asarray(in_rank).any() and not np.asarray(per_expert).any() and not np.asarray(per_rank).any()
    per_rank, per_expert, in_rank = jax_ep.get_dispatch_layout(np.zeros((0, 2), np.int32), 8, num_ranks=2)
    assert np.asarray(in_rank).shape == (0, 2) and not np.asarray(per_rank).any()
