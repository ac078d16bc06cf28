"""InternodeOptions validation and the derived internode sizes."""

import dataclasses

import numpy as np
import pytest

import jax
from jax_ep import internode_plan as ip
from jax_ep.internode_config import MAX_CHANNELS, channel_cap, resolve_call, resolve_internode, ring_row_bytes
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
    (dict(num_channels=0), "num_channels must be a positive int"),
    (dict(num_max_rdma_recv_tokens=-1), "num_max_rdma_recv_tokens must be a positive int or None"),
    (dict(rdma_ring_tokens=2.0), "rdma_ring_tokens must be a positive int"),
    (dict(num_channels=13), r"num_channels must be in \[1, 12\]"),
    (dict(rdma_chunk_tokens=4, rdma_ring_tokens=10), r"rdma_ring_tokens \(10\) must be a multiple of rdma_chunk_tokens"),
    (dict(rdma_chunk_tokens=1, rdma_ring_tokens=17), r"rdma_ring_tokens \(17\) must be at most 16 times"),
])
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        InternodeOptions(**kw)


def test_accepted_ring_shapes():
    InternodeOptions(num_channels=12, rdma_chunk_tokens=4, rdma_ring_tokens=64, nvl_chunk_tokens=3, nvl_ring_tokens=7)
    InternodeOptions(rdma_chunk_tokens=5, rdma_ring_tokens=5)  # one chunk per ring


def test_resolved_ring_condition_checked_against_the_derived_values():
    kw = dict(num_nodes=2, ranks_per_node=8, num_tokens=4096, hidden=7168, num_topk=8, fp8=True)
    # A ring given alone takes the largest divisor of it not above the derived chunk (18 here).
    assert resolve_internode(InternodeOptions(rdma_ring_tokens=4), **kw).rdma_chunk_tokens == 4
    assert resolve_internode(InternodeOptions(rdma_ring_tokens=40), **kw).rdma_chunk_tokens == 10
    assert resolve_internode(InternodeOptions(nvl_ring_tokens=4), **kw).nvl_chunk_tokens == 4
    assert resolve_internode(InternodeOptions(nvl_ring_tokens=35), **kw).nvl_chunk_tokens == 7
    # ... and refuses one that needs more than 16 chunks of the largest such divisor.
    with pytest.raises(ValueError, match="rdma_ring_tokens .37. must be at most 16 times rdma_chunk_tokens .1."):
        resolve_internode(InternodeOptions(rdma_ring_tokens=37), **kw)
    # A chunk given alone: the derived ring holds whole chunks.
    cfg = resolve_internode(InternodeOptions(rdma_chunk_tokens=7, nvl_chunk_tokens=3), **kw)
    assert cfg.rdma_ring_tokens == 56 and cfg.nvl_ring_tokens == 12
    with pytest.raises(ValueError, match="row_bytes must be >= 1"):
        resolve_call(InternodeOptions(), num_nodes=2, ranks_per_node=2, num_tokens=64, row_bytes=0, num_topk=2)
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
    assert cfg.combine_sms == 3 * cfg.num_channels
    assert cfg.node_capacity == nn * t
    assert cfg.rdma_bytes <= 1 << 30 or cfg.rdma_ring_tokens == cfg.rdma_chunk_tokens
    assert cfg.rdma_ring_tokens % cfg.rdma_chunk_tokens == 0 and cfg.rdma_ring_tokens // cfg.rdma_chunk_tokens <= 16
    tc = -(-t // cfg.num_channels)  # the longest stream: one channel of one source
    assert cfg.rdma_chunk_tokens <= tc
    assert cfg.rdma_ring_tokens <= -(-tc // cfg.rdma_chunk_tokens) * cfg.rdma_chunk_tokens
    assert cfg.nvl_ring_tokens <= -(-(nn * tc) // cfg.nvl_chunk_tokens) * cfg.nvl_chunk_tokens
    assert cfg.row_bytes == ring_row_bytes(h, fp8=fp8) and cfg.row_bytes % 16 == 0
    InternodeOptions(**{f: getattr(cfg, f) for f in ("num_channels", "rdma_chunk_tokens", "rdma_ring_tokens",
                                                     "nvl_chunk_tokens", "nvl_ring_tokens")})  # accepted as given


def test_budget_shrinks_the_rdma_ring():
    kw = dict(num_nodes=16, ranks_per_node=8, num_tokens=4096, hidden=7168, num_topk=8)
    big = resolve_internode(InternodeOptions(), **kw)
    small = resolve_internode(InternodeOptions(), rdma_bytes=64 << 20, **kw)
    assert small.rdma_ring_tokens < big.rdma_ring_tokens and small.rdma_bytes <= 64 << 20
    assert small.rdma_ring_tokens % small.rdma_chunk_tokens == 0


def test_deepep_rings():
    """T = 4096, H = 7168, top-8: FP8 dispatch rows of 7392 bytes, BF16
    combine rows of 14336 (docs/internode.md, "Defaults")."""
    for nn, el in ((2, 4), (2, 8), (4, 8), (8, 8)):
        kw = dict(num_nodes=nn, ranks_per_node=el, num_tokens=4096, num_topk=8)
        fp8 = resolve_call(InternodeOptions(), row_bytes=ring_row_bytes(7168, fp8=True), **kw)
        bf16 = resolve_call(InternodeOptions(), row_bytes=ring_row_bytes(7168), **kw)
        assert fp8.row_bytes == 7392 and bf16.row_bytes == 14336
        assert fp8.ffi_attrs() == dict(num_channels=12, rdma_chunk=18, rdma_ring=144, nvl_chunk=9, nvl_ring=36)
        assert bf16.ffi_attrs() == dict(num_channels=12, rdma_chunk=10, rdma_ring=80, nvl_chunk=5, nvl_ring=20)
        assert (fp8.num_sms, bf16.combine_sms) == (24, 36)


def test_small_calls_cap_the_rings_at_their_streams():
    """Few tokens: one channel, chunks and rings no longer than a stream; a
    16-byte row (the top-k weights' gradient) still at most 64 per chunk."""
    cfg = resolve_call(InternodeOptions(), num_nodes=4, ranks_per_node=2, num_tokens=8, row_bytes=512, num_topk=2)
    assert cfg.ffi_attrs() == dict(num_channels=1, rdma_chunk=8, rdma_ring=8, nvl_chunk=32, nvl_ring=32)
    cfg = resolve_call(InternodeOptions(), num_nodes=2, ranks_per_node=8, num_tokens=4096, row_bytes=32, num_topk=8)
    # 12 channels of Tc = 342 tokens: a ring of 6 chunks covers a whole stream.
    assert (cfg.rdma_chunk_tokens, cfg.rdma_ring_tokens, cfg.nvl_chunk_tokens) == (64, 384, 32)
    assert resolve_call(InternodeOptions(), num_nodes=2, ranks_per_node=2, num_tokens=0, row_bytes=16,
                        num_topk=2).ffi_attrs() == dict(num_channels=1, rdma_chunk=1, rdma_ring=1, nvl_chunk=2,
                                                        nvl_ring=2)


def test_every_rank_derives_the_same_rings():
    """The rule reads nothing but its arguments (no rank, no device)."""
    kw = dict(num_nodes=4, ranks_per_node=8, num_tokens=1000, row_bytes=7392, num_topk=6)
    assert len({resolve_call(InternodeOptions(num_channels=5), **kw) for _ in range(3)}) == 1


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


def test_channel_cap_fits_the_ranks_sharing_a_gpu():
    # An H100's 132 SMs less 12: a combine's 3 blocks per channel, per rank on the GPU.
    assert [channel_cap(132, n) for n in (1, 2, 4, 8)] == [12, 12, 10, 5]
    assert channel_cap(None, 8) == MAX_CHANNELS  # unknown SMs (a CPU): no cap
    assert channel_cap(20, 8) == 1  # never below one channel
    for n in (1, 2, 3, 4, 5, 6, 7, 8):
        cap = channel_cap(132, n)
        assert cap == MAX_CHANNELS or 3 * cap * n <= 120 < 3 * (cap + 1) * n
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="ranks_per_gpu"):
            channel_cap(132, bad)


def test_derived_channels_stay_within_the_cap_and_explicit_ones_are_checked():
    kw = dict(num_nodes=4, ranks_per_node=2, num_tokens=2048, row_bytes=2048, num_topk=4)
    assert resolve_call(InternodeOptions(), **kw).num_channels == 10
    for cap in (1, 5, 10, 12):
        assert resolve_call(InternodeOptions(), max_channels=cap, **kw).num_channels == min(10, cap)
    assert resolve_internode(InternodeOptions(), num_nodes=4, ranks_per_node=2, num_tokens=2048, hidden=1024,
                             num_topk=4, max_channels=5).num_channels == 5
    assert resolve_call(InternodeOptions(num_channels=5), max_channels=5, **kw).num_channels == 5
    with pytest.raises(ValueError, match=r"num_channels=6: .* at most 5 channels fit"):
        resolve_call(InternodeOptions(num_channels=6), max_channels=5, **kw)
