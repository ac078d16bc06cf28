"""Static options of each mode: frozen, hashable dataclasses.

They are static arguments: two calls with equal options share one compiled
program, and changing an option retraces. Validation that needs no array lives
in ``__post_init__`` so that a bad option fails where it is written.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Backend = Literal["xla", "cuda"]
Layout = Literal["rank_major", "expert_major"]

BACKENDS = ("xla", "cuda")
LAYOUTS = ("rank_major", "expert_major")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_bool(owner, name: str) -> None:
    """``owner.name`` must be True or False (numpy bools are taken as bools):
    a string such as ``"no"`` or an int would otherwise read as True."""
    value = getattr(owner, name)
    if isinstance(value, np.bool_):
        object.__setattr__(owner, name, bool(value))
    elif not isinstance(value, bool):
        raise TypeError(f"{type(owner).__name__}.{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FP8Options:
    """How tokens are cast to FP8 (``float8_e4m3fn``, one scale per 128 channels).

    Attributes:
      round_scale: round each scale up to a power of two (exact in UE8M0).
      use_ue8m0: store the power-of-two scales as packed UE8M0 exponents, four
        per ``int32`` (``[..., H/512]``) instead of ``float32 [..., H/128]``.
        Implies ``round_scale``; needs ``H % 512 == 0``.
    """

    round_scale: bool = False
    use_ue8m0: bool = False

    def __post_init__(self):
        check_bool(self, "round_scale")
        check_bool(self, "use_ue8m0")
        if self.use_ue8m0 and not self.round_scale:
            # UE8M0 can only hold powers of two.
            object.__setattr__(self, "round_scale", True)


@dataclasses.dataclass(frozen=True)
class NormalOptions:
    """Static options of normal (high-throughput) dispatch and combine.

    Attributes:
      layout: ``"rank_major"`` (DeepEP's normal layout: one row per received
        token, grouped by source rank, then source token order) or
        ``"expert_major"`` (one row per received (token, local expert) pair,
        grouped by local expert, each group starting at a multiple of
        ``expert_alignment``; ready for ``jax.lax.ragged_dot``).
      num_max_recv_tokens: rows of the static receive buffer (the capacity
        ``C``). ``None`` takes the worst case, which never drops:
        ``R*T`` rows for rank-major, ``R*T*min(K, E/R) + (E/R)*(alignment-1)``
        for expert-major. Rows past the capacity are dropped (see ``dispatch``).
      expert_alignment: expert-major groups start at multiples of this; the
        rank-major layout ignores it.
      checked: raise a runtime error (instead of dropping and counting) when
        the capacity overflows or a top-k id is out of range, on every rank
        together (see ``jax_ep.checked_errors``). Uses host callbacks: for
        debugging, not for CUDA-graph-captured production runs.
      backend: ``"xla"`` (pure-JAX reference, runs anywhere) or ``"cuda"``
        (the compiled kernels).
      num_sms: SM budget of the CUDA kernels (each copy kernel runs at most
        ``4 * num_sms`` blocks of 256 threads). With R ranks sharing one GPU keep
        ``R * num_sms`` within its SM count. Across nodes (internode mode) it
        bounds the kernels around the rings; the ring kernels run one block
        per SM, 2 per channel in a dispatch or cached dispatch and 3 per
        channel in a combine (``InternodeOptions.num_channels``, at most 12).
      combine_chunk_rows: rows per readiness flag of the CUDA combine, which
        moves rows and sums them in one kernel: smaller chunks let the sums
        start sooner, larger ones publish fewer flags. (Expert-major: raised as
        needed so that ``C / chunk <= 2048``.)
      combine_ring_rows: rank-major CUDA combine: rows of the ring each source
        rank streams through to each owner (``R * ring`` rows of staging per
        rank). Small rings stay in L2; a multiple of ``combine_chunk_rows``, at
        most 32 times it. A ring smaller than ``chunk + 3`` rows makes the
        combine's reducers take fewer tokens at a time (it needs
        ``ring >= chunk + batch - 1`` to make progress).
      buffer_id: the ``jax_ep.Buffer`` the CUDA kernels communicate through;
        ``Buffer`` methods fill it in.
    """

    layout: Layout = "rank_major"
    num_max_recv_tokens: int | None = None
    expert_alignment: int = 1
    checked: bool = False
    backend: Backend = "xla"
    num_sms: int = 24
    combine_chunk_rows: int = 2
    combine_ring_rows: int = 64
    buffer_id: int | None = None

    def __post_init__(self):
        check_bool(self, "checked")
        _check_choice("layout", self.layout, LAYOUTS)
        _check_positive_int("combine_chunk_rows", self.combine_chunk_rows)
        _check_positive_int("combine_ring_rows", self.combine_ring_rows)
        ratio, rest = divmod(self.combine_ring_rows, self.combine_chunk_rows)
        if rest or not 1 <= ratio <= 32:
            raise ValueError(
                "combine_ring_rows must be a multiple of combine_chunk_rows, from 1 to 32 times it; got "
                f"combine_ring_rows={self.combine_ring_rows}, combine_chunk_rows={self.combine_chunk_rows}"
            )
        _check_positive_int("num_max_recv_tokens", self.num_max_recv_tokens, allow_none=True)
        _check_positive_int("expert_alignment", self.expert_alignment)
        _check_choice("backend", self.backend, BACKENDS)
        _check_positive_int("num_sms", self.num_sms)


@dataclasses.dataclass(frozen=True)
class LowLatencyOptions:
    """Static options of low-latency dispatch and combine.

    Attributes:
      num_max_dispatch_tokens_per_rank: ``M``, the most tokens any rank sends
        in one call; the receive buffer is ``[E/R, R*M, H]``. Every rank must
        pass the same ``M`` and ``T <= M``.
      fp8: ``None`` sends BF16; an ``FP8Options`` casts each token to FP8 while
        dispatching.
      checked: raise a runtime error when a top-k id is out of range, on
        every rank together (see ``jax_ep.checked_errors``).
      backend: ``"xla"`` or ``"cuda"``.
      num_sms: SM budget of the CUDA kernels (one 512-thread block per SM).
      combine_fp8: the combine's rows travel as FP8 (e4m3, one float32
        scale per 128 channels, the cast of ``per_token_cast_to_fp8``)
        instead of BF16: half the bytes, each element rounded to e4m3's three
        mantissa bits (a relative error of up to 1/16); needs
        ``H % 512 == 0``; not differentiable. The weighted sum is still taken
        in float32 and returned in BF16.
      async_send: with the CUDA backend, the split API's send
        (``low_latency_dispatch_send``, ``low_latency_combine_send``) runs on
        a high-priority CUDA stream of its own, so compute placed between send
        and receive runs beside the transfer; the receive joins that stream.
        Those calls then stay outside XLA command buffers (CUDA graphs), and
        a send and its receive belong in one compiled program (the receive
        keeps the send's inputs alive there).
        ``False`` runs the send on XLA's stream: capturable, no overlap.
        The one-call ``low_latency_dispatch``/``combine`` always use XLA's stream.
      dispatch_pull: with the CUDA backend, the one-call
        ``low_latency_dispatch`` pulls: each rank stages its tokens (cast to
        FP8 when asked) in its own buffer, and each receiver copies the rows
        its experts need from there straight into its output, one pass over
        the payload where a push and the receive's copy take two. The split
        calls always push (the transfer is the part that overlaps compute).
        Shapes with ``M*K > 16384`` push too. Results are identical.
      combine_zero_copy: with the CUDA backend, the one-call
        ``low_latency_combine`` moves no rows: each rank only records where
        its expert outputs lie in its own XLA memory, and each token's owner
        reads its rows from there (every rank's XLA memory is mapped into
        every rank process when the ``Buffer`` is created, see
        ``Buffer.low_latency_zero_copy``). One read of the payload instead of
        a copy and a read. The call then also waits until every rank has read
        this rank's rows. A rank pushes instead where that mapping is off, its
        ``y`` lies outside XLA's pool, or ``combine_fp8`` is set; the split
        calls always push. Results are identical.
      buffer_id: the ``jax_ep.Buffer`` the CUDA kernels communicate through;
        ``Buffer`` methods fill it in.
    """

    num_max_dispatch_tokens_per_rank: int = 128
    fp8: FP8Options | None = None
    checked: bool = False
    backend: Backend = "xla"
    num_sms: int = 16
    combine_fp8: bool = False
    async_send: bool = True
    dispatch_pull: bool = True
    combine_zero_copy: bool = True
    buffer_id: int | None = None

    def __post_init__(self):
        _check_positive_int("num_max_dispatch_tokens_per_rank", self.num_max_dispatch_tokens_per_rank)
        if self.fp8 is not None and not isinstance(self.fp8, FP8Options):
            raise ValueError(f"fp8 must be None or an FP8Options, got {self.fp8!r}")
        _check_choice("backend", self.backend, BACKENDS)
        _check_positive_int("num_sms", self.num_sms)
        for name in ("checked", "combine_fp8", "async_send", "dispatch_pull", "combine_zero_copy"):
            check_bool(self, name)

    @property
    def payload_code(self) -> int:
        """0 BF16, 1 FP8, 2 FP8 with power-of-two scales, 3 FP8 with packed UE8M0 (kernel attribute)."""
        if self.fp8 is None:
            return 0
        return 3 if self.fp8.use_ue8m0 else (2 if self.fp8.round_scale else 1)


@dataclasses.dataclass(frozen=True)
class InternodeOptions:
    """Static options of internode normal mode (ranks on several nodes); see
    docs/internode.md. The per-rank output capacity is
    ``NormalOptions.num_max_recv_tokens``, with the same meaning and default as
    within a node. ``None`` fields are derived from the topology, the token
    count and the row size by ``jax_ep.internode_config.resolve_internode``.

    Attributes:
      num_max_rdma_recv_tokens: ``Cn``, rows of each forwarder's table of the
        tokens it receives over RDMA (from the ``N`` ranks of its rail), in
        (source node, source token) order; rows past it are dropped and
        reach no rank of that node. ``None``: ``N * T``, which never drops.
      num_channels: independent ring sets (at most ``MAX_CHANNELS``, 12);
        tokens are split into contiguous ranges, one per channel. Each channel
        runs on 2 blocks of a dispatch or cached dispatch and 3 of a combine
        (one SM each: ``2 * num_channels`` and ``3 * num_channels`` SMs).
        All of them, of every rank sharing a GPU, must be resident at once:
        ``None`` derives a count that fits (``jax_ep.internode_config.channel_cap``),
        and a count above that cap is refused.
      rdma_chunk_tokens, rdma_ring_tokens: tokens per RDMA put and per
        RDMA ring (one ring per (channel, node), on each side); a ring is a
        whole number of chunks, from 1 to ``MAX_RING_CHUNKS`` (16).
      nvl_chunk_tokens, nvl_ring_tokens: the same for the combine's NVLink
        rings (one per (channel, forwarder, NVL peer)); ``nvl_chunk_tokens <=
        nvl_ring_tokens``.
    """

    num_max_rdma_recv_tokens: int | None = None
    num_channels: int | None = None
    rdma_chunk_tokens: int | None = None
    rdma_ring_tokens: int | None = None
    nvl_chunk_tokens: int | None = None
    nvl_ring_tokens: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_positive_int(f.name, getattr(self, f.name), allow_none=True)
        check_channels(self.num_channels)
        for leg in ("rdma", "nvl"):
            check_ring(leg, getattr(self, f"{leg}_chunk_tokens"), getattr(self, f"{leg}_ring_tokens"))


MAX_CHANNELS = 12  # the kernels' per-channel ring words are fixed arrays (cuda/internode.cuh kMaxChannels)
MAX_RING_CHUNKS = 16  # chunks per RDMA ring: its flags and counters are fixed arrays (kMaxRingChunks)


def check_channels(channels: int | None) -> None:
    """``num_channels`` within the kernels' fixed per-channel arrays."""
    if channels is not None and not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"num_channels must be in [1, {MAX_CHANNELS}] (the kernels' ring words hold "
                         f"{MAX_CHANNELS} channels), got {channels}")


def check_ring(leg: str, chunk: int | None, ring: int | None) -> None:
    """The flow-control condition of one leg's rings (docs/internode.md, "Rings
    and flow control"; proved by the protocol model
    tests/protocol/internode_ring.py): a ring holds at least one chunk. A
    chunk larger than its RDMA ring never completes, so writer and reader
    wait on each other. The RDMA leg also puts whole chunks into the same
    slots on the other side (one put and one flag per chunk slot: the ring is
    a whole number of chunks) and keeps a flag and a counter per chunk slot
    (at most ``MAX_RING_CHUNKS``)."""
    if chunk is not None and ring is not None and chunk > ring:
        raise ValueError(
            f"{leg}_chunk_tokens ({chunk}) must be at most {leg}_ring_tokens ({ring}): a ring must hold a "
            f"whole chunk, or the {leg} leg deadlocks; raise {leg}_ring_tokens or lower {leg}_chunk_tokens"
        )
    if leg == "rdma" and chunk is not None and ring is not None:
        if ring % chunk:
            raise ValueError(
                f"{leg}_ring_tokens ({ring}) must be a multiple of {leg}_chunk_tokens ({chunk}): each chunk is "
                f"put whole into the same slots of the receiving ring")
        if ring // chunk > MAX_RING_CHUNKS:
            raise ValueError(
                f"{leg}_ring_tokens ({ring}) must be at most {MAX_RING_CHUNKS} times {leg}_chunk_tokens ({chunk}): "
                f"the kernels keep a flag and a counter per chunk of a ring")
