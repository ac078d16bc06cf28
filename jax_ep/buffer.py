"""``Buffer``: the runtime object that owns communication resources.

With ``backend="xla"`` it owns nothing (XLA's collectives allocate their own
buffers) and only carries defaults. With ``normal.backend="cuda"`` it owns the
registered buffer its intranode kernels communicate through (CUDA IPC between
rank processes): create it once per rank, outside ``jit``, in the same order
on every rank, and release it with ``destroy()`` or a ``with`` block, on
every rank: with one process per rank the release is collective (every rank
stops, unmaps its peers, and only then frees its own memory, so no rank
frees memory a peer may still write). A compiled function that used it must
not run after it is destroyed.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jax_ep import layout as _layout
from jax_ep import low_latency as _ll
from jax_ep import normal as _normal
from jax_ep import rank_mask as _masks
from jax_ep import topology as _topology
from jax_ep import validation
from jax_ep.options import BACKENDS, InternodeOptions, LowLatencyOptions, NormalOptions


@dataclasses.dataclass
class Buffer:
    """Expert-parallel communication for one EP mesh axis.

    Args:
      num_experts: ``E``, divisible by the size of ``axis_name``.
      axis_name: the EP mesh axis that ``shard_map`` binds (``None`` with the
        CUDA backend: the ranks are the JAX processes, call outside shard_map).
      normal: default ``NormalOptions`` of ``dispatch``.
      low_latency: default ``LowLatencyOptions`` of ``low_latency_dispatch``.
      num_nvl_bytes: size of the registered buffer (CUDA backend); see
        ``jax_ep.intranode_buffer_bytes`` for what a configuration needs.
      timeout_s: how long a kernel waits for a peer before failing with a
        message naming it (CUDA backend).
      ll_transport: how the low-latency buffer reaches peers: ``"ipc"`` (CUDA
        IPC between the rank processes) or ``"nvshmem"`` (an NVSHMEM symmetric
        allocation, peers through ``nvshmem_ptr``; bootstrapped over the
        ``jax.distributed`` key-value store).
      ranks_per_node: group the ranks into virtual nodes of this many
        consecutive ranks (default: the environment variable
        ``JAX_EP_RANKS_PER_NODE``, else the hosts the ranks run on). Peers in
        another node are reached by NVSHMEM puts, never through a pointer,
        even on one host; see ``jax_ep.topology`` and docs/multinode.md. It
        must divide the EP ranks and each host's ranks. Across several
        (virtual) nodes the CUDA low-latency mode runs over NVSHMEM puts
        (``ll_transport="nvshmem"``; peers of a rank's own node still through
        pointers, in the same kernels): same outputs, handle and gradients,
        FP8 combine rows included. Across nodes the CUDA normal mode runs internode
        mode (docs/internode.md: each token crosses to a node once, then
        NVLink): ``num_nvl_bytes`` sizes its NVSHMEM symmetric buffer
        (``jax_ep.internode_buffer_bytes``).
      internode: ``InternodeOptions`` of internode mode (the forwarders'
        table capacity ``num_max_rdma_recv_tokens``, the channels and rings
        every call resolves its sizes from; give the same to
        ``jax_ep.internode_buffer_bytes(..., internode=...)``).

    The methods are the functional API with these defaults filled in; call
    them inside ``jax.shard_map`` over ``axis_name``.
    """

    num_experts: int
    axis_name: object = "ep"
    normal: NormalOptions = NormalOptions()
    low_latency: LowLatencyOptions = LowLatencyOptions()
    num_nvl_bytes: int = 1 << 30
    num_ll_bytes: int | None = None
    timeout_s: float = 100.0
    ll_transport: str = "ipc"
    ranks_per_node: int | None = None
    internode: InternodeOptions = InternodeOptions()
    _destroyed: bool = dataclasses.field(default=False, init=False, repr=False)
    _runtime: object = dataclasses.field(default=None, init=False, repr=False)
    _ll_runtime: object = dataclasses.field(default=None, init=False, repr=False)
    _masked: tuple = dataclasses.field(default=(), init=False, repr=False)
    _topo: object = dataclasses.field(default=None, init=False, repr=False)
    _nodes: int | None = dataclasses.field(default=None, init=False, repr=False)  # ranks_per_node or the env's

    def __post_init__(self):
        if not isinstance(self.normal, NormalOptions):
            raise TypeError(f"normal must be a NormalOptions, got {type(self.normal).__name__}")
        if not isinstance(self.low_latency, LowLatencyOptions):
            raise TypeError(f"low_latency must be a LowLatencyOptions, got {type(self.low_latency).__name__}")
        if not isinstance(self.internode, InternodeOptions):
            raise TypeError(f"internode must be an InternodeOptions, got {type(self.internode).__name__}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if self.ranks_per_node is not None:
            _topology.check_ranks_per_node(self.ranks_per_node)
        self._nodes = self.ranks_per_node or _topology.ranks_per_node_from_env()
        channel_cap = None
        if "cuda" in (self.normal.backend, self.low_latency.backend):
            self._topo = _topology.discover(self._nodes, timeout_s=120.0)
            _check_node_support(self._topo, self.normal.backend, self.low_latency, self.ll_transport)
            from jax_ep.runtime import agree_on_buffer

            if self.normal.backend == "cuda" and not self._topo.single_node:
                from jax_ep.internode_ops import local_channel_cap

                channel_cap = local_channel_cap()  # every rank must derive the same rings from it
            agree_on_buffer(dict(self._agreed_config(), channel_cap=channel_cap))
        if self.normal.backend == "cuda" and not self._topo.single_node:
            from jax_ep.internode_ops import InternodeRuntime

            self._runtime = InternodeRuntime.create(self.num_nvl_bytes, self._topo, timeout_s=self.timeout_s,
                                                    internode=self.internode, max_channels=channel_cap)
            self.normal = dataclasses.replace(self.normal, buffer_id=self._runtime.buffer_id)
        elif self.normal.backend == "cuda":
            from jax_ep.runtime import IntranodeRuntime

            self._runtime = IntranodeRuntime.create(self.num_nvl_bytes, timeout_s=self.timeout_s)
            self.normal = dataclasses.replace(self.normal, buffer_id=self._runtime.buffer_id)
        if self.low_latency.backend == "cuda":
            from jax_ep.runtime import IntranodeRuntime

            if self.num_ll_bytes is None:
                raise ValueError(
                    "a CUDA low-latency Buffer needs num_ll_bytes: size it with "
                    "jax_ep.low_latency_buffer_bytes(max_tokens, hidden, num_ranks, num_topk, num_experts, fp8)"
                )
            if self.ll_transport not in ("ipc", "nvshmem"):
                raise ValueError(f"ll_transport must be 'ipc' or 'nvshmem', got {self.ll_transport!r}")
            if not self._topo.single_node:  # the put path (checked by _check_node_support)
                from jax_ep.ll_put_runtime import PutRuntime

                self._ll_runtime = PutRuntime.create(self.num_ll_bytes, self._topo, timeout_s=self.timeout_s)
            else:
                create = IntranodeRuntime.create_nvshmem if self.ll_transport == "nvshmem" else IntranodeRuntime.create
                self._ll_runtime = create(self.num_ll_bytes, timeout_s=self.timeout_s)
            self._ll_runtime.share_xla_memory()
            self.low_latency = dataclasses.replace(self.low_latency, buffer_id=self._ll_runtime.buffer_id)

    def _agreed_config(self) -> dict:
        """What every rank's Buffer must agree on (checked at creation): the
        sizes and every option, as JSON-able values in a fixed order."""
        config = {"num_ranks": jax.process_count(), "num_experts": self.num_experts,
                  "axis_name": repr(self.axis_name), "num_nvl_bytes": self.num_nvl_bytes,
                  "num_ll_bytes": self.num_ll_bytes, "ll_transport": self.ll_transport,
                  "ranks_per_node": self._nodes}
        for prefix, options in (("normal", self.normal), ("low_latency", self.low_latency),
                                ("internode", self.internode)):
            for f in dataclasses.fields(options):
                if f.name != "buffer_id":
                    value = getattr(options, f.name)
                    config[f"{prefix}.{f.name}"] = repr(value) if dataclasses.is_dataclass(value) else value
        return config

    @property
    def topology(self) -> _topology.Topology | None:
        """The ranks' nodes (``jax_ep.topology.Topology``) of a CUDA Buffer,
        found when it was created. None for a Buffer of the xla backend only,
        whose rank count is the EP axis size, known inside ``shard_map``:
        ``topology_for(R)`` gives it."""
        return self._topo

    def topology_for(self, num_ranks: int) -> _topology.Topology:
        """The topology of ``num_ranks`` ranks under this Buffer's
        ``ranks_per_node`` (or ``JAX_EP_RANKS_PER_NODE``); a ValueError when it
        does not divide them."""
        if self._topo is not None and self._topo.num_ranks == num_ranks:
            return self._topo
        return _topology.make_topology(num_ranks, self._nodes, environ={})

    def _check_nodes(self, backend: str, buffer_id) -> None:
        """At trace time, for the xla backend: ranks_per_node divides R."""
        if self._nodes is None or backend == "cuda":
            return  # no virtual nodes, or checked when the CUDA buffer was created
        self.topology_for(validation.num_ranks_for(self.axis_name, backend, buffer_id))

    @property
    def low_latency_transports(self) -> tuple:
        """How the low-latency buffer reaches each rank ("local", "ipc", "p2p",
        or "put" for a rank in another node)."""
        return self._ll_runtime.transports if self._ll_runtime is not None else ()

    @property
    def low_latency_zero_copy(self) -> bool:
        """Whether the one-call ``low_latency_combine`` can read expert
        outputs straight from the ranks that computed them
        (``LowLatencyOptions.combine_zero_copy``): every rank's XLA memory is
        mapped by every rank. When False the combine pushes its rows. A rank
        also pushes a call whose ``y`` lies outside the allocation it mapped
        (XLA's pool is one allocation with its default preallocation; with
        ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` it grows in several)."""
        return self._ll_runtime is not None and self._ll_runtime.xla_memory_shared

    @property
    def low_latency_zero_copy_note(self) -> str:
        """Why ``low_latency_zero_copy`` is False ("" when it is True)."""
        if self._ll_runtime is None:
            return "no CUDA low-latency buffer"
        return self._ll_runtime.xla_memory_note

    @property
    def rank(self) -> int:
        """This process's EP rank (CUDA backend), else 0."""
        return self._runtime.rank if self._runtime is not None else 0

    def _alive(self):
        if self._destroyed:
            raise RuntimeError("this jax_ep.Buffer was destroyed; create a new one")
        self.check()

    def check(self) -> None:
        """Raise ``jax_ep.CommunicationError`` when a call on this buffer
        failed on this rank or was aborted by a peer (as seen by the calls
        that have run: block on their results first). Every method checks it;
        after a failure the buffer must be destroyed and created again."""
        for rt in (self._runtime, self._ll_runtime):
            error = rt.failure() if rt is not None else None
            if error is not None:
                raise error

    def status(self, *after, mode: str = "normal") -> jax.Array:
        """See ``jax_ep.status``."""
        if self._destroyed:
            raise RuntimeError("this jax_ep.Buffer was destroyed; create a new one")
        return status(self, *after, mode=mode)

    def get_dispatch_layout(self, topk_idx: jax.Array) -> _layout.DispatchLayout:
        """See ``jax_ep.get_dispatch_layout``."""
        self._alive()
        self._check_nodes(self.normal.backend, self.normal.buffer_id)
        num_ranks = self._runtime.num_ranks if self._runtime is not None and self.axis_name is None else None
        return _layout.get_dispatch_layout(
            topk_idx, self.num_experts, num_ranks=num_ranks, axis_name=self.axis_name, backend=self.normal.backend
        )

    def dispatch(self, x, topk_idx, topk_weights, options: NormalOptions | None = None):
        """See ``jax_ep.dispatch``."""
        self._alive()
        options = options or self.normal
        if options.backend == "cuda" and options.buffer_id is None:
            options = dataclasses.replace(options, buffer_id=self.normal.buffer_id)
        self._check_nodes(options.backend, options.buffer_id)
        return _normal.dispatch(
            x, topk_idx, topk_weights, num_experts=self.num_experts, axis_name=self.axis_name,
            options=options,
        )

    def cached_dispatch(self, x, handle):
        """See ``jax_ep.cached_dispatch``."""
        self._alive()
        return _normal.cached_dispatch(x, handle)

    def combine(self, y, handle):
        """See ``jax_ep.combine``."""
        self._alive()
        return _normal.combine(y, handle)

    def low_latency_dispatch(self, x, topk_idx, options: LowLatencyOptions | None = None, *, rank_mask=None):
        """See ``jax_ep.low_latency_dispatch``."""
        self._alive()
        options = options or self.low_latency
        if options.backend == "cuda" and options.buffer_id is None:
            options = dataclasses.replace(options, buffer_id=self.low_latency.buffer_id)
        self._check_nodes(options.backend, options.buffer_id)
        return _ll.low_latency_dispatch(
            x, topk_idx, num_experts=self.num_experts, axis_name=self.axis_name, options=options,
            rank_mask=rank_mask,
        )

    def set_masked_ranks(self, ranks) -> None:
        """Record which ranks have failed (an iterable of rank indices; empty
        clears). The low-latency calls leave them out when given
        ``rank_mask=buffer.rank_mask()``: pass it as an argument of the jitted
        step, so a change takes effect without recompiling or re-creating
        the buffer."""
        self._alive()
        ranks = tuple(ranks)
        num_ranks = self._num_ranks()
        for r in ranks:
            if (not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 0
                    or (num_ranks is not None and r >= num_ranks)):
                bound = f"[0, {num_ranks})" if num_ranks is not None else ">= 0"
                raise ValueError(f"masked ranks must be ints {bound}, got {r!r}")
        self._masked = tuple(sorted({int(r) for r in ranks}))

    def masked_ranks(self) -> tuple:
        """The ranks ``set_masked_ranks`` recorded (sorted)."""
        return self._masked

    def rank_mask(self, num_ranks: int | None = None) -> np.ndarray:
        """``bool [R]``, True at each masked rank: the ``rank_mask`` argument of
        the low-latency calls. ``num_ranks`` is needed only without a CUDA
        buffer (whose rank count is known)."""
        num_ranks = num_ranks or self._num_ranks()
        if num_ranks is None:
            raise ValueError("rank_mask(num_ranks) needs num_ranks: the EP axis size (jax.lax.axis_size inside shard_map)")
        return _masks.rank_mask_of(self._masked, num_ranks)

    def _num_ranks(self) -> int | None:
        rt = self._ll_runtime or self._runtime
        return getattr(rt, "num_ranks", None)

    def low_latency_combine(self, y, topk_weights, handle):
        """See ``jax_ep.low_latency_combine``."""
        self._alive()
        return _ll.low_latency_combine(y, topk_weights, handle)

    def low_latency_dispatch_send(self, x, topk_idx, options: LowLatencyOptions | None = None, *, after=None,
                                  rank_mask=None):
        """See ``jax_ep.low_latency_dispatch_send``."""
        self._alive()
        self._check_nodes((options or self.low_latency).backend, (options or self.low_latency).buffer_id)
        return _ll.low_latency_dispatch_send(
            x, topk_idx, num_experts=self.num_experts, axis_name=self.axis_name, options=options or self.low_latency,
            after=after, rank_mask=rank_mask,
        )

    def destroy(self) -> None:
        """Release the communication resources (idempotent)."""
        if not self._destroyed:
            for rt in (self._runtime, self._ll_runtime):
                if rt is not None:
                    rt.destroy()
        self._destroyed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


def status(buffer: Buffer, *after, mode: str = "normal") -> jax.Array:
    """The state of ``buffer``'s ``mode`` ("normal" or "low_latency") calls
    on this rank, as data: int32 ``[code, rank at fault, this rank, op]``.

    ``code`` is ``jax_ep.faults.STATUS_OK`` (0), ``STATUS_TIMEOUT`` (1),
    ``STATUS_OUT_OF_ORDER`` (2), ``STATUS_MISMATCH`` (3) or ``STATUS_ABORTED``
    (4, another rank failed first); the rank at fault is the peer waited for,
    the one whose call differed, or the one that raised the abort (-1 when
    ok). With the CUDA backend it runs on the GPU after the calls whose
    results are passed as ``after`` (XLA orders it by that data only), so a
    compiled loop (a CUDA graph included) can stop on it. After a nonzero code
    the outputs of that call and of every later call are not valid. The
    reference backend (``backend="xla"``) never fails: code 0. Call it where
    the ops are called (inside ``shard_map`` over ``axis_name``, or outside
    with ``axis_name=None``).
    """
    import jax.numpy as jnp

    if mode not in ("normal", "low_latency"):
        raise ValueError(f"mode must be 'normal' or 'low_latency', got {mode!r}")
    rt = buffer._runtime if mode == "normal" else buffer._ll_runtime
    if rt is None:
        rank = jax.lax.axis_index(buffer.axis_name) if buffer.axis_name is not None else 0
        return jnp.stack([jnp.int32(0), jnp.int32(-1), jnp.asarray(rank, jnp.int32), jnp.int32(-1)])
    if getattr(rt, "put_path", False):
        from jax_ep import cuda_put_ops

        return cuda_put_ops.status(rt.buffer_id, after, buffer.axis_name)
    from jax_ep import cuda_ops

    return cuda_ops.status(rt.buffer_id, after, buffer.axis_name)
def _check_node_support(topology, normal_backend: str, low_latency: LowLatencyOptions, ll_transport: str) -> None:
    """Across several (virtual) nodes the CUDA normal mode runs internode
    mode's kernels (jax_ep.internode_ops) and the low-latency mode the put
    path: refuse what neither takes, with what would work."""
    if topology.single_node:
        return
    where = topology.describe()
    if normal_backend == "cuda":
        from jax_ep import internode_ops

        internode_ops.check_supported(topology)
    if low_latency.backend != "cuda":
        return
    if ll_transport != "nvshmem":
        raise NotImplementedError(
            f"jax_ep: low_latency.backend='cuda' with {where} needs ll_transport='nvshmem' (peers in another node "
            f"are reached by NVSHMEM puts), got ll_transport={ll_transport!r}"
        )
