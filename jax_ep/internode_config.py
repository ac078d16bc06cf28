"""Concrete sizes of internode normal mode: capacities, channels, chunks and
rings, derived per call by an analytic rule (docs/internode.md, "Defaults")
where ``InternodeOptions`` leaves them ``None``.

The rule depends only on the options, the topology, ``T``, ``K`` and the
bytes of one ring row of the call, all of which every rank of a call agrees
on, so every rank derives the same rings (the kernels compare them at every
barrier through the call's signature).
"""

from __future__ import annotations

import dataclasses
import math

from jax_ep.options import MAX_CHANNELS, MAX_RING_CHUNKS, InternodeOptions, check_channels, check_ring

__all__ = ["InternodeConfig", "resolve_call", "resolve_internode", "ring_row_bytes", "channel_cap",
           "MAX_RANKS_PER_NODE", "MAX_CHANNELS", "MAX_RING_CHUNKS", "RESERVED_SMS"]

MAX_RANKS_PER_NODE = 8  # NVL peers per forwarder block (one warp each); the source-meta bitmask is a byte
RDMA_CHUNK_BYTES = 128 << 10  # one put of about this size runs at a NIC's line rate
NVL_CHUNK_BYTES = 64 << 10  # one tail store per this many bytes of NVLink copies
RDMA_CHUNK_MAX, NVL_CHUNK_MAX = 64, 32  # tokens: small rows still publish often
RDMA_RING_CHUNKS = 8  # chunks in flight per RDMA ring: covers a put's round trip at line rate
NVL_RING_CHUNKS = 4  # NVLink's round trip is shorter
DEFAULT_RDMA_BYTES = 1 << 30  # the budget of the RDMA rings (send and receive) of one call, per rank
RESERVED_SMS = 12  # SMs of a GPU left to the other work of the ranks sharing it (120 of an H100's 132)


@dataclasses.dataclass(frozen=True)
class InternodeConfig:
    """Every size of one internode call, resolved (no ``None``).

    Attributes:
      num_nodes, ranks_per_node: ``N`` and ``L``.
      node_capacity: ``Cn``, rows of a forwarder's table.
      num_channels: ring sets; channel ``c`` carries tokens
        ``[c * Tc, (c + 1) * Tc)``, ``Tc = ceil(T / num_channels)``.
      rdma_chunk_tokens, rdma_ring_tokens: tokens per RDMA put, per RDMA ring
        (a multiple of the chunk, at most 16 chunks).
      nvl_chunk_tokens, nvl_ring_tokens: rows per NVLink tail publication and
        per NVLink ring (combine).
      row_bytes: bytes of one ring row (the payload row rounded up to 16
        bytes; a token's meta travels apart).
    """

    num_nodes: int
    ranks_per_node: int
    node_capacity: int
    num_channels: int
    rdma_chunk_tokens: int
    rdma_ring_tokens: int
    nvl_chunk_tokens: int
    nvl_ring_tokens: int
    row_bytes: int

    @property
    def num_sms(self) -> int:
        """SMs of a dispatch's or cached dispatch's payload kernel: two blocks
        per channel (packer with its two coordinator warps; receiver)."""
        return 2 * self.num_channels

    @property
    def combine_sms(self) -> int:
        """SMs of a combine: three blocks per channel (NVLink sender, reducer
        with the RDMA coordinator, RDMA receiver)."""
        return 3 * self.num_channels

    @property
    def rdma_bytes(self) -> int:
        """Send and receive rings of every (channel, node), per rank."""
        return 2 * self.num_channels * self.num_nodes * self.rdma_ring_tokens * self.row_bytes

    @property
    def nvl_bytes(self) -> int:
        """A combine's NVLink rings from each of the node's ranks, per rank."""
        return self.num_channels * self.ranks_per_node * self.nvl_ring_tokens * self.row_bytes

    def ffi_attrs(self) -> dict[str, int]:
        """The five ring attributes of every internode FFI call."""
        return dict(num_channels=self.num_channels, rdma_chunk=self.rdma_chunk_tokens,
                    rdma_ring=self.rdma_ring_tokens, nvl_chunk=self.nvl_chunk_tokens, nvl_ring=self.nvl_ring_tokens)


def channel_cap(sm_count: int | None, ranks_per_gpu: int = 1) -> int:
    """The most channels whose ring blocks all fit on one GPU at once.

    A combine runs ``3 * num_channels`` blocks that spin on each other, and
    every rank sharing the GPU (CUDA MPS) runs its own at the same time, so
    ``3 * num_channels * ranks_per_gpu`` must fit the GPU's SMs less
    ``RESERVED_SMS``: ``(sm_count - RESERVED_SMS) // (3 * ranks_per_gpu)``,
    clamped to ``[1, MAX_CHANNELS]``. ``sm_count`` None (unknown, e.g. on
    CPU) gives ``MAX_CHANNELS``.
    """
    if not isinstance(ranks_per_gpu, int) or ranks_per_gpu < 1:
        raise ValueError(f"ranks_per_gpu must be a positive int, got {ranks_per_gpu!r}")
    if sm_count is None:
        return MAX_CHANNELS
    return min(max((int(sm_count) - RESERVED_SMS) // (3 * ranks_per_gpu), 1), MAX_CHANNELS)


def ring_row_bytes(hidden: int, itemsize: int = 2, fp8: bool = False) -> int:
    """Bytes of one token's row in a ring: ``hidden * itemsize``, or FP8 values
    (1 byte per channel) then float32 scales (one per 128 channels), each part
    rounded up to 16 bytes."""
    if fp8:
        return _round_up(hidden, 16) + _round_up(4 * (hidden // 128), 16)
    return _round_up(hidden * itemsize, 16)


def resolve_call(options: InternodeOptions, *, num_nodes: int, ranks_per_node: int, num_tokens: int,
                 row_bytes: int, num_topk: int, rdma_bytes: int = DEFAULT_RDMA_BYTES,
                 max_channels: int = MAX_CHANNELS) -> InternodeConfig:
    """The rings of one call: ``options``' ``None`` fields filled by the
    documented rule, the result checked.

    Args:
      options: ``InternodeOptions`` (the buffer's).
      num_nodes, ranks_per_node: the topology (``jax_ep.topology.Topology``).
      num_tokens: ``T`` per rank; num_topk: ``K``.
      row_bytes: bytes of the call's ring row (dispatch: the payload row, FP8
        values and scales together; combine: y's row), rounded up to 16.
      rdma_bytes: budget of the RDMA rings per rank; the derived ring shrinks
        (never below one chunk) to fit it.
      max_channels: ``channel_cap`` of the GPU and the ranks sharing it: the
        derived channel count stays within it, and a ``num_channels`` option
        above it is refused (the ring blocks could not all be resident).
    """
    if not isinstance(options, InternodeOptions):
        raise TypeError(f"options must be a jax_ep.options.InternodeOptions, got {type(options).__name__}")
    if not 1 <= ranks_per_node <= MAX_RANKS_PER_NODE:
        raise ValueError(f"ranks_per_node must be in [1, {MAX_RANKS_PER_NODE}] for internode mode "
                         f"(NVLink peers of a forwarder), got {ranks_per_node}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if row_bytes < 1:
        raise ValueError(f"row_bytes must be >= 1, got {row_bytes}")
    b = _round_up(row_bytes, 16)
    rdma_target = min(math.ceil(RDMA_CHUNK_BYTES / b), RDMA_CHUNK_MAX)
    channels = options.num_channels
    if channels is None:
        # Enough tokens per (channel, node) stream for two chunks: with uniform
        # top-K routing a token goes to a given node with p = 1 - (1 - 1/N)^K.
        p_node = 1.0 - (1.0 - 1.0 / num_nodes) ** num_topk
        channels = min(max(int(num_tokens * p_node // (2 * min(rdma_target, max(num_tokens, 1)))), 1), MAX_CHANNELS,
                       max_channels)
    elif channels > max_channels:
        raise ValueError(
            f"num_channels={channels}: a combine's 3 * num_channels spinning blocks per rank, times the ranks "
            f"sharing this GPU, must all be resident at once; at most {max_channels} channels fit here "
            f"(jax_ep.internode_config.channel_cap; docs/internode.md, \"Defaults\")")
    check_channels(channels)
    tc = max(-(-num_tokens // channels), 1)  # the longest RDMA stream: one channel of one source
    nvl_most = num_nodes * tc  # the longest NVLink stream: one channel of a forwarder's table
    rdma_chunk = options.rdma_chunk_tokens or _chunk_of(min(rdma_target, tc), options.rdma_ring_tokens)
    nvl_chunk = options.nvl_chunk_tokens or _chunk_of(min(math.ceil(NVL_CHUNK_BYTES / b), NVL_CHUNK_MAX, nvl_most),
                                                      options.nvl_ring_tokens)
    rdma_ring = options.rdma_ring_tokens
    if rdma_ring is None:
        fit = rdma_bytes // (2 * channels * num_nodes * b)
        rdma_ring = max(min(RDMA_RING_CHUNKS * rdma_chunk, fit // rdma_chunk * rdma_chunk, _round_up(tc, rdma_chunk)),
                        rdma_chunk)
    nvl_ring = options.nvl_ring_tokens or min(NVL_RING_CHUNKS * nvl_chunk, _round_up(nvl_most, nvl_chunk))
    check_ring("rdma", rdma_chunk, rdma_ring)
    check_ring("nvl", nvl_chunk, nvl_ring)
    node_capacity = options.num_max_rdma_recv_tokens or max(num_nodes * num_tokens, 1)
    return InternodeConfig(num_nodes, ranks_per_node, node_capacity, channels, rdma_chunk, rdma_ring, nvl_chunk,
                           nvl_ring, b)


def resolve_internode(options: InternodeOptions, *, num_nodes: int, ranks_per_node: int, num_tokens: int,
                      hidden: int, num_topk: int, itemsize: int = 2, fp8: bool = False,
                      rdma_bytes: int = DEFAULT_RDMA_BYTES, max_channels: int = MAX_CHANNELS) -> InternodeConfig:
    """``resolve_call`` for rows of ``hidden`` channels: ``itemsize``-byte
    elements (BF16/FP16/F32), or FP8 values and scales (``fp8``)."""
    return resolve_call(options, num_nodes=num_nodes, ranks_per_node=ranks_per_node, num_tokens=num_tokens,
                        row_bytes=ring_row_bytes(hidden, itemsize, fp8), num_topk=num_topk, rdma_bytes=rdma_bytes,
                        max_channels=max_channels)


def _chunk_of(target: int, ring: int | None) -> int:
    """The derived chunk: ``target``, or with a ring given, its largest
    divisor not above ``target`` (a ring holds whole chunks, whatever the
    call's row bytes make ``target``)."""
    if ring is None:
        return target
    return next(d for d in range(min(target, ring), 0, -1) if ring % d == 0)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b
