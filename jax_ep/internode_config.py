"""Concrete sizes of internode normal mode: capacities, SM budget, chunks and
rings, derived from the topology by an analytic rule (docs/internode.md,
"Defaults") where ``InternodeOptions`` leaves them ``None``."""

from __future__ import annotations

import dataclasses
import math

from jax_ep.options import InternodeOptions, check_ring

__all__ = ["InternodeConfig", "resolve_internode", "token_bytes", "MAX_RANKS_PER_NODE", "MAX_CHANNELS"]

MAX_RANKS_PER_NODE = 8  # NVL peers per forwarder block (one warp each); the source-meta bitmask is a byte
MAX_CHANNELS = 12  # 24 SMs: DeepEP's default budget, leaving an H100's other ~108 SMs to the model
RDMA_CHUNK_BYTES = 128 << 10  # one put of about this size runs at a NIC's line rate
NVL_CHUNK_BYTES = 64 << 10  # one tail store per this many bytes of NVLink copies
RDMA_RING_CHUNKS = 8  # chunks in flight per RDMA ring: covers a put's round trip at line rate
NVL_RING_CHUNKS = 4  # NVLink's round trip is shorter
DEFAULT_RDMA_BYTES = 1 << 30  # the symmetric RDMA buffer's budget (send and receive rings)


@dataclasses.dataclass(frozen=True)
class InternodeConfig:
    """Every size of one internode configuration, resolved (no ``None``)."""

    num_nodes: int
    ranks_per_node: int
    node_capacity: int  # Cn, forwarder table rows
    num_channels: int
    rdma_chunk_tokens: int
    rdma_ring_tokens: int
    nvl_chunk_tokens: int
    nvl_ring_tokens: int
    token_bytes: int

    @property
    def num_sms(self) -> int:
        """Two blocks per channel: (RDMA senders, their coordinator, NVLink
        receivers) and (forwarders, their coordinator)."""
        return 2 * self.num_channels

    @property
    def rdma_bytes(self) -> int:
        """Send and receive rings of every (channel, node), per rank."""
        return 2 * self.num_channels * self.num_nodes * self.rdma_ring_tokens * self.token_bytes

    @property
    def nvl_bytes(self) -> int:
        """NVLink rings from each of the node's forwarders, per rank."""
        return self.num_channels * self.ranks_per_node * self.nvl_ring_tokens * self.token_bytes


def token_bytes(hidden: int, num_topk: int, itemsize: int = 2, fp8: bool = False) -> int:
    """Bytes one token occupies in a ring: the row (FP8: 1 byte per channel and a
    float32 scale per 128), its top-k ids and weights, and the 8-byte source meta."""
    row = hidden + 4 * (hidden // 128) if fp8 else hidden * itemsize
    return row + 8 * num_topk + 8


def resolve_internode(options: InternodeOptions, *, num_nodes: int, ranks_per_node: int, num_tokens: int,
                      hidden: int, num_topk: int, itemsize: int = 2, fp8: bool = False,
                      rdma_bytes: int = DEFAULT_RDMA_BYTES) -> InternodeConfig:
    """Fill ``options``' ``None`` fields by the documented rule and check the result.

    Args:
      options: ``InternodeOptions``.
      num_nodes, ranks_per_node: the topology (``jax_ep.topology.Topology``).
      num_tokens: ``T`` per rank; hidden: ``H``; num_topk: ``K``.
      itemsize: bytes per element of a BF16/FP16/F32 row; fp8: rows travel as FP8.
      rdma_bytes: budget of the RDMA rings per rank; the derived ring shrinks
        (never below one chunk) to fit it.
    """
    if not isinstance(options, InternodeOptions):
        raise TypeError(f"options must be a jax_ep.options.InternodeOptions, got {type(options).__name__}")
    if not 1 <= ranks_per_node <= MAX_RANKS_PER_NODE:
        raise ValueError(f"ranks_per_node must be in [1, {MAX_RANKS_PER_NODE}] for internode mode "
                         f"(NVLink peers of a forwarder), got {ranks_per_node}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    tb = token_bytes(hidden, num_topk, itemsize, fp8)
    most = max(num_tokens, 1)  # no stream carries more than T tokens
    rdma_chunk = options.rdma_chunk_tokens or min(max(math.ceil(RDMA_CHUNK_BYTES / tb), 1), 64, most)
    nvl_chunk = options.nvl_chunk_tokens or min(max(math.ceil(NVL_CHUNK_BYTES / tb), 1), 32, most)
    if options.num_channels:
        channels = options.num_channels
    else:
        # Enough tokens per (channel, node) stream for two chunks: with uniform
        # top-K routing a token goes to a given node with p = 1 - (1 - 1/N)^K.
        p_node = 1.0 - (1.0 - 1.0 / num_nodes) ** num_topk
        channels = min(max(int(num_tokens * p_node // (2 * rdma_chunk)), 1), MAX_CHANNELS)
    rdma_ring = options.rdma_ring_tokens
    if rdma_ring is None:
        fit = rdma_bytes // (2 * channels * num_nodes * tb)
        rdma_ring = max(min(RDMA_RING_CHUNKS * rdma_chunk, fit // rdma_chunk * rdma_chunk, _round_up(most, rdma_chunk)),
                        rdma_chunk)
    nvl_ring = options.nvl_ring_tokens or min(NVL_RING_CHUNKS * nvl_chunk, _round_up(most, nvl_chunk))
    check_ring("rdma", rdma_chunk, rdma_ring)
    check_ring("nvl", nvl_chunk, nvl_ring)
    node_capacity = options.num_max_rdma_recv_tokens or max(num_nodes * num_tokens, 1)
    return InternodeConfig(num_nodes, ranks_per_node, node_capacity, channels, rdma_chunk, rdma_ring, nvl_chunk,
                           nvl_ring, tb)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b
