"""InternodeOptions validation and the derived internode sizes."""

import dataclasses

import numpy as np
import pytest

import jax
from jax_ep import internode_plan as ip
from jax_ep.internode_config import resolve_internode
from jax_ep.options import InternodeOptions


def test_options_are_static():
    a, b = InternodeOptions(rdma_chunk_tokens=4, rdma_ring_tokens=8), InternodeOptions(rdma_chunk_tokens=4, rdma_ring_tokens=8)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rdma_chunk_tokens = 2


@pytest.mark.parametrize("kw,match", [
    (dict(rdma_chunk_tokens=9, rdma_ring_tokens=8), "rdma_chunk_tokens .9. must be at most rdma_ring_tokens .8."),
    (dict(nvl_chunk_tokens=3, nvl_ring_tokens=2), "nvl_chunk_tokens .3. must be at most nvl_ring_tokens"),
    (dict(rdma_chunk_tokens=3, rdma_ring_tokens=8), "rdma_ring_tokens .8. must be a multiple of rdma_chunk_tokens .3."),
    (dict(nvl_chunk_tokens=2, nvl_ring_tokens=5), "nvl_ring_tokens .5. must be a multiple of nvl_chunk_tokens .2."),
    (dict(num_channels=0), "num_channels must be a positive int"),
    (dict(num_max_rdma_recv_tokens=-1), "num_max_rdma_recv_tokens must be a positive int or None"),
    (dict(rdma_ring_tokens=2.0), "rdma_ring_tokens must be a positive int"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        InternodeOptions(**kw)


def test_resolved_ring_condition_checked_against_the_derived_values():
    # A ring given alone must still hold the derived chunk.
    with pytest.raises(ValueError, match="rdma_chunk_tokens .18. must be at most rdma_ring_tokens .4."):
        resolve_internode(InternodeOptions(rdma_ring_tokens=4), num_nodes=2, ranks_per_node=8, num_tokens=4096,
                          hidden=7168, num_topk=8, fp8=True)
    # ... and be a multiple of it.
    with pytest.raises(ValueError, match="rdma_ring_tokens .100. must be a multiple of rdma_chunk_tokens .18."):
        resolve_internode(InternodeOptions(rdma_ring_tokens=100), num_nodes=2, ranks_per_node=8, num_tokens=4096,
                          hidden=7168, num_topk=8, fp8=True)
    with pytest.raises(ValueError, match="ranks_per_node must be in .1, 8."):
        resolve_internode(InternodeOptions(), num_nodes=2, ranks_per_node=16, num_tokens=64, hidden=128, num_topk=2)
    with pytest.raises(TypeError, match="InternodeOptions"):
        resolve_internode(None, num_nodes=2, ranks_per_node=2, num_tokens=64, hidden=128, num_topk=2)


@pytest.mark.parametrize("nn,el", [(2, 8), (4, 8), (16, 8), (2, 2), (8, 1)])
@pytest.mark.parametrize("t,h,fp8", [(4096, 7168, True), (4096, 7168, False), (128, 2048, False), (1, 128, False)])
def test_derived_defaults(nn, el, t, h, fp8):
    cfg = resolve_internode(InternodeOptions(), num_nodes=nn, ranks_per_node=el, num_tokens=t, hidden=h, num_topk=8,
                            fp8=fp8)
    assert 1 <= cfg.rdma_chunk_tokens <= cfg.rdma_ring_tokens and 1 <= cfg.nvl_chunk_tokens <= cfg.nvl_ring_tokens
    assert cfg.rdma_ring_tokens % cfg.rdma_chunk_tokens == 0 and cfg.nvl_ring_tokens % cfg.nvl_chunk_tokens == 0
    assert 1 <= cfg.num_channels <= 12 and cfg.num_sms == 2 * cfg.num_channels
    assert cfg.node_capacity == nn * t
    assert cfg.rdma_bytes <= 1 << 30 or cfg.rdma_ring_tokens == cfg.rdma_chunk_tokens
    assert cfg.rdma_ring_tokens <= max(-(-t // cfg.rdma_chunk_tokens) * cfg.rdma_chunk_tokens, cfg.rdma_chunk_tokens)
    InternodeOptions(**{f: getattr(cfg, f) for f in ("num_channels", "rdma_chunk_tokens", "rdma_ring_tokens",
                                                     "nvl_chunk_tokens", "nvl_ring_tokens")})  # accepted as given


def test_budget_shrinks_the_rdma_ring():
    kw = dict(num_nodes=16, ranks_per_node=8, num_tokens=4096, hidden=7168, num_topk=8)
    big = resolve_internode(InternodeOptions(), **kw)
    small = resolve_internode(InternodeOptions(), rdma_bytes=64 << 20, **kw)
    assert small.rdma_ring_tokens < big.rdma_ring_tokens and small.rdma_bytes <= 64 << 20
    assert small.rdma_ring_tokens % small.rdma_chunk_tokens == 0


def test_default_capacities_never_drop(rng):
    """Worst case routings (every token to every rank) fit the default capacities."""
    r, el, t, k, e = 8, 2, 5, 8, 8
    idx = np.broadcast_to(np.arange(k, dtype=np.int32), (r, t, k))
    for layout in ("rank_major", "expert_major"):
        plan = jax.jit(ip.plan_dispatch, static_argnames=("num_experts", "ranks_per_node", "layout"))(
            idx, num_experts=e, ranks_per_node=el, layout=layout)
        assert int(np.max(plan.num_dropped)) == 0
        assert plan.fwd_src_node.shape[1] == ip.default_node_capacity(t, r // el) == int(np.max(plan.num_rdma_needed))
        assert plan.recv_src_rank.shape[1] == int(np.max(plan.num_recv_rows))
