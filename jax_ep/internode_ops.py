"""Internode normal mode on the CUDA backend: the buffer, its sizing, and the
``jax.ffi.ffi_call`` wrappers of the targets ``jax_ep._nvshmem`` registers
(xla_ffi/internode.cc, kernels in cuda/internode*.cu).

A ``Buffer(num_experts, normal=NormalOptions(backend="cuda"))`` whose ranks
span several (virtual) nodes creates an ``InternodeRuntime``: an NVSHMEM
symmetric buffer of ``num_nvl_bytes`` (peers of this rank's node through
``nvshmem_ptr``, the rest through NVSHMEM puts), and ``jax_ep.cuda_ops``
sends its ``dispatch``, ``cached_dispatch`` and ``combine`` here. Same
operands, outputs and ``DispatchHandle`` fields as within a node; the
handle's ``extra`` holds the internode plan's arrays (``rdma_slot``,
``fwd_src_node``, ``fwd_src_token``, ``fwd_dst_row``, ``recv_table_row``), so
the gradients go through the same ``custom_vjp``. Built: the rank-major
and expert-major layouts, BF16/FP16/FP32 rows and FP8 pairs (dispatch),
float32 sums per node rounded to y's dtype (combine). Rows travel through
rings whose sizes each call resolves from the buffer's ``InternodeOptions``
(``jax_ep.internode_config.resolve_call``) and passes as attributes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import ll_put_runtime
from jax_ep import topology as _topology
from jax_ep.internode_config import (MAX_CHANNELS, MAX_RANKS_PER_NODE, MAX_RING_CHUNKS, InternodeConfig, channel_cap,
                                     resolve_call, ring_row_bytes)
from jax_ep.options import InternodeOptions

__all__ = ["InternodeRuntime", "internode_buffer_bytes", "call_bytes", "kernel_call_bytes", "resolve_for",
           "check_supported", "node_capacity_for", "local_channel_cap",
           "MAX_RANKS", "MAX_LOCAL_EXPERTS", "TARGETS"]

MAX_RANKS = 64  # the source meta's rank mask is one uint64 (cuda/internode.cuh)
MAX_EXPERTS = 2048
MAX_LOCAL_EXPERTS = 1024
TARGETS = ("jax_ep_internode_dispatch", "jax_ep_internode_dispatch_fp8", "jax_ep_internode_cached_dispatch",
           "jax_ep_internode_combine")
_OPS = {"dispatch": 0, "cached_dispatch": 1, "combine": 2}
_HEADER_BYTES = 8192  # control words, rail signals, node flags, signatures (kRingWordsOffset)
_ALIGN = 256


@dataclasses.dataclass(frozen=True)
class InternodeRuntime(ll_put_runtime.PutRuntime):
    """One rank's internode buffer: a put-path buffer (``buffer_id`` in
    ``jax_ep._nvshmem``'s id space) and the ``InternodeOptions`` it was made
    with."""

    internode: InternodeOptions = InternodeOptions()
    max_channels: int = MAX_CHANNELS  # channel_cap of this GPU and the ranks sharing it (every rank agrees)
    xla_memory_note = "internode normal mode moves every row through the rings of its symmetric buffer"

    @staticmethod
    def create(num_bytes: int, topology: _topology.Topology, *, timeout_s: float = 100.0,
               internode: InternodeOptions = InternodeOptions(),
               max_channels: int = MAX_CHANNELS) -> "InternodeRuntime":
        """Allocate and register the buffer (collective: every rank, same order)."""
        from jax_ep import runtime

        put = ll_put_runtime.PutRuntime.create(num_bytes, topology, timeout_s=timeout_s)
        fields = {f.name: getattr(put, f.name) for f in dataclasses.fields(ll_put_runtime.PutRuntime)}
        rt = InternodeRuntime(**fields, internode=internode, max_channels=max_channels)
        with runtime._lock:
            runtime._live[rt.buffer_id] = rt
        return rt


def check_supported(topology: _topology.Topology) -> None:
    """Raise a clear error for what internode mode's kernels do not take."""
    where = topology.describe()
    if topology.ranks_per_node > MAX_RANKS_PER_NODE:
        raise NotImplementedError(
            f"jax_ep: normal.backend='cuda' with {where}: internode mode takes at most {MAX_RANKS_PER_NODE} ranks "
            f"per node (one forwarder warp per NVLink peer); set ranks_per_node <= {MAX_RANKS_PER_NODE}")
    if topology.num_ranks > MAX_RANKS:
        raise NotImplementedError(
            f"jax_ep: normal.backend='cuda' with {where}: internode mode takes at most {MAX_RANKS} ranks "
            f"(the source meta's rank mask is 64 bits)")


def local_channel_cap() -> int:
    """``channel_cap`` of this process's GPU (its SM count, ``core_count`` of
    the local JAX device) and the ranks sharing it (``jax_ep.launch.ranks_per_gpu``)."""
    from jax_ep.launch import ranks_per_gpu

    return channel_cap(_local_sm_count(), ranks_per_gpu())


def _local_sm_count() -> int | None:
    """SMs of this process's GPU (None where the device does not say, e.g. a CPU)."""
    return getattr(jax.local_devices()[0], "core_count", None)


def node_capacity_for(options: InternodeOptions, num_nodes: int, num_tokens: int) -> int:
    """``Cn``: ``options.num_max_rdma_recv_tokens``, else ``N * T`` (never drops)."""
    return options.num_max_rdma_recv_tokens or max(num_nodes * num_tokens, 1)


def _align(v: int, a: int) -> int:
    return -(-v // a) * a


def _ring_words_bytes() -> int:
    """``sizeof(RingWords)`` of cuda/internode.cuh: per half, the chunk flags
    [ch][R][16] and stream heads [ch][R][L] (u64), the NVLink tails and heads
    [ch][L] (u64), the credits and their bases [ch][R] (u64), the chunk
    counters filled / consumed [ch][R][16] (int), at their fixed maxima."""
    ch, r, el, nck = MAX_CHANNELS, MAX_RANKS, MAX_RANKS_PER_NODE, MAX_RING_CHUNKS
    return 8 * (ch * r * nck + ch * r * el + 2 * ch * el + 2 * ch * r) + 4 * 2 * ch * r * nck


def call_bytes(op: str, cfg: InternodeConfig, *, num_tokens: int, num_topk: int = 0, num_experts: int = 0,
               layout: str = "rank_major") -> int:
    """Bytes of the buffer one call of ``op`` ("dispatch", "cached_dispatch",
    "combine") with the resolved rings ``cfg`` needs: the header (control
    words, then the ring words of both halves) and two halves (cuda/internode.cuh's
    ``Layout``, restated; tests hold the two together). ``num_topk`` and
    ``layout`` give the handle's slots per table row (``K`` expert-major, else
    1); ``num_topk`` also sizes a dispatch's metas, ``num_experts`` its count
    messages."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {tuple(_OPS)}, got {op!r}")
    t, n, el, cn, ch = num_tokens, cfg.num_nodes, cfg.ranks_per_node, cfg.node_capacity, cfg.num_channels
    r = n * el
    le = num_experts // r if r else 0
    dispatch, combine = op == "dispatch", op == "combine"
    expert_major = layout == "expert_major"
    slots = num_topk if expert_major else 1
    msg_stride = _align(4 * (n + el + el * le + ch + 2), 16)  # counts, per-channel counts, the call's signature
    meta = _align(16 + 8 * num_topk, 16) if dispatch else 0  # Meta, top-k ids and weights
    ring_row = _align(cfg.row_bytes, 16)
    sizes = [n * msg_stride if dispatch else 0, n * msg_stride if dispatch else 0,  # count messages out, in
             4 * (n + el),  # table starts, forwarders' valid rows
             4 * ch * n * 2,  # stream ranges, as forwarder
             8 * t if dispatch else 0, 4 * t * n if dispatch else 0,  # rank masks, stream indices
             4 * el * cn * slots,  # out_pos
             4 * el * cn * num_topk if dispatch and expert_major else 0,  # local expert ids
             t * meta, cn * meta,  # metas: put source, forwarder's table
             ch * n * cfg.rdma_ring_tokens * ring_row, ch * n * cfg.rdma_ring_tokens * ring_row,  # RDMA send, receive
             ch * el * cfg.nvl_ring_tokens * ring_row if combine else 0]  # NVLink rings
    half = 0
    for s in sizes:
        half = _align(half + s, _ALIGN)
    return _HEADER_BYTES + 2 * _ring_words_bytes() + 2 * half


def kernel_call_bytes(op: str, cfg: InternodeConfig, *, num_tokens: int, num_topk: int = 0, num_experts: int = 0,
                      layout: str = "rank_major") -> int:
    """``call_bytes`` as the kernels' own sizing (``jax_ep._nvshmem``) gives it
    when that module is loaded and takes the rings, else ``call_bytes``."""
    from jax_ep import nvshmem

    if nvshmem.available():
        em = layout == "expert_major"
        try:  # C and a combine's element count size no region: any valid value
            return int(nvshmem._module().internode_buffer_bytes(
                _OPS[op], num_tokens, num_topk, num_experts, cfg.num_nodes, cfg.ranks_per_node, cfg.node_capacity,
                1, cfg.row_bytes, cfg.row_bytes // 4, int(em), cfg.num_channels, cfg.rdma_chunk_tokens,
                cfg.rdma_ring_tokens, cfg.nvl_chunk_tokens, cfg.nvl_ring_tokens))
        except TypeError:  # a module built before the rings: its sizes are the staged kernels'
            pass
    return call_bytes(op, cfg, num_tokens=num_tokens, num_topk=num_topk, num_experts=num_experts, layout=layout)


def internode_buffer_bytes(num_tokens: int, hidden: int, num_ranks: int, num_topk: int, num_experts: int, *,
                           ranks_per_node: int, capacity: int | None = None, node_capacity: int | None = None,
                           itemsize: int = 2, fp8: bool = False, layout: str = "rank_major",
                           expert_alignment: int = 1, internode: InternodeOptions | None = None) -> int:
    """``num_nvl_bytes`` an internode CUDA Buffer needs for dispatch (of
    ``itemsize``-byte rows, and of FP8 pairs with ``fp8``), cached dispatch
    and combine of these shapes in ``layout``, each with the rings it resolves
    from ``internode`` (the Buffer's ``InternodeOptions``, default the
    defaults; ``jax_ep.internode_config.resolve_call``). ``node_capacity``
    (default ``internode.num_max_rdma_recv_tokens``, else ``N*T``) sizes the
    forwarders' metas and placements; ``capacity`` and ``expert_alignment``
    are accepted for compatibility (no buffer region depends on them now).
    With ``num_channels`` left to the rule, the size covers every channel
    count a buffer may resolve (fewer where ranks share a GPU).
    The buffer is NVSHMEM symmetric memory: ``NVSHMEM_SYMMETRIC_SIZE`` must
    hold it (and any other symmetric buffer of the process)."""
    del capacity, expert_alignment
    if num_ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide num_ranks ({num_ranks})")
    options = InternodeOptions() if internode is None else internode
    if not isinstance(options, InternodeOptions):
        raise TypeError(f"internode must be a jax_ep.InternodeOptions, got {type(options).__name__}")
    if node_capacity is not None:
        options = dataclasses.replace(options, num_max_rdma_recv_tokens=node_capacity)
    n = num_ranks // ranks_per_node
    small = _align(4 * num_topk, 16)  # float32 [., K] rows: the top-k weights' gradients
    calls = [("dispatch", ring_row_bytes(hidden, itemsize)), ("cached_dispatch", ring_row_bytes(hidden, itemsize)),
             ("cached_dispatch", small), ("combine", ring_row_bytes(hidden, itemsize)), ("combine", small)]
    if fp8:
        calls.append(("dispatch", ring_row_bytes(hidden, fp8=True)))
    # A buffer resolves fewer channels where ranks share a GPU (channel_cap), which
    # this function cannot know: size for every cap the rule may apply.
    caps = range(1, MAX_CHANNELS + 1) if options.num_channels is None else (MAX_CHANNELS,)
    sizes = []
    for op, row in calls:
        for cap in caps:
            cfg = resolve_call(options, num_nodes=n, ranks_per_node=ranks_per_node, num_tokens=num_tokens,
                               row_bytes=row, num_topk=num_topk, max_channels=cap)
            sizes.append(kernel_call_bytes(op, cfg, num_tokens=num_tokens, num_topk=num_topk,
                                           num_experts=num_experts, layout=layout))
    return max(sizes)


def resolve_for(spec, row_bytes: int) -> InternodeConfig:
    """The rings of one call of ``spec`` (a ``NormalSpec``) whose ring rows
    are ``row_bytes``, from its buffer's ``InternodeOptions``."""
    rt = _runtime(spec)
    return resolve_call(rt.internode, num_nodes=rt.topology.num_nodes, ranks_per_node=rt.topology.ranks_per_node,
                        num_tokens=spec.num_tokens, row_bytes=row_bytes, num_topk=spec.num_topk,
                        max_channels=rt.max_channels)


# --- the calls ---------------------------------------------------------------------


def _runtime(spec) -> InternodeRuntime:
    from jax_ep import runtime

    return runtime.lookup(spec.options.buffer_id)


def _attrs(spec, node_capacity: int, row_bytes: int) -> dict:
    """Every internode target's attributes: the buffer, the topology, ``Cn``,
    the SM budget and the call's rings."""
    rt = _runtime(spec)
    rings = resolve_for(spec, row_bytes).ffi_attrs()
    return dict(buffer_id=np.int64(rt.buffer_id), ranks_per_node=np.int64(rt.topology.ranks_per_node),
                node_capacity=np.int64(node_capacity), num_sms=np.int64(spec.options.num_sms),
                **{k: np.int64(v) for k, v in rings.items()})


def _node_capacity(spec) -> int:
    rt = _runtime(spec)
    return node_capacity_for(rt.internode, rt.topology.num_nodes, spec.num_tokens)


def _ops():
    from jax_ep import cuda_ops

    return cuda_ops


def dispatch(x, topk_idx: jax.Array, topk_weights: jax.Array, spec):
    """Fused routing + payload dispatch across nodes; the outputs of
    ``cuda_ops.dispatch`` (rank-major), the handle's ``extra`` the internode
    arrays."""
    from jax_ep.handle import DispatchHandle

    rt = _runtime(spec)
    check_supported(rt.topology)
    if spec.num_local_experts > MAX_LOCAL_EXPERTS:
        raise ValueError(f"internode mode takes at most {MAX_LOCAL_EXPERTS} experts per rank, got "
                         f"{spec.num_local_experts}")
    if spec.num_experts > MAX_EXPERTS:
        raise ValueError(f"internode mode takes at most {MAX_EXPERTS} experts, got {spec.num_experts}")
    ops = _ops()
    r, t, k, c = spec.num_ranks, spec.num_tokens, spec.num_topk, spec.capacity
    n, el = rt.topology.num_nodes, rt.topology.ranks_per_node
    cn = _node_capacity(spec)
    le = spec.num_local_experts
    meta = (
        jax.ShapeDtypeStruct((c, k), jnp.int32),  # recv_topk_idx
        jax.ShapeDtypeStruct((c, k), jnp.float32),  # recv_topk_weights
        jax.ShapeDtypeStruct((le,), jnp.int32),  # num_recv_tokens_per_expert
        jax.ShapeDtypeStruct((le,), jnp.int32),  # expert_group_sizes
        jax.ShapeDtypeStruct((), jnp.int32),  # kept
        jax.ShapeDtypeStruct((), jnp.int32),  # needed
        jax.ShapeDtypeStruct((c,), jnp.int32),  # recv_src_rank
        jax.ShapeDtypeStruct((c,), jnp.int32),  # recv_src_token
        jax.ShapeDtypeStruct((t, r), jnp.bool_),  # is_token_in_rank
        jax.ShapeDtypeStruct((t, n), jnp.int32),  # rdma_slot
        jax.ShapeDtypeStruct((cn,), jnp.int32),  # fwd_src_node
        jax.ShapeDtypeStruct((cn,), jnp.int32),  # fwd_src_token
        jax.ShapeDtypeStruct((cn, el, k if spec.options.layout == "expert_major" else 1), jnp.int32),  # fwd_dst_row
        jax.ShapeDtypeStruct((c,), jnp.int32),  # recv_table_row
    )
    expert_major = spec.options.layout == "expert_major"
    attrs = dict(num_experts=np.int64(spec.num_experts), capacity=np.int64(c), layout=np.int64(int(expert_major)),
                 expert_alignment=np.int64(spec.options.expert_alignment))
    if isinstance(x, tuple):
        q, scales = x
        if q.shape[1] % 16 or (scales.shape[1] * scales.dtype.itemsize) % 16:
            raise ValueError(f"internode FP8 dispatch needs rows of 16-byte multiples: hidden % 512 == 0 with float32 "
                             f"scales, got x_fp8 {q.shape}, scales {scales.shape} {scales.dtype}")
        attrs.update(_attrs(spec, cn, q.shape[1] * q.dtype.itemsize + scales.shape[1] * scales.dtype.itemsize))
        outs = (jax.ShapeDtypeStruct((c,) + q.shape[1:], q.dtype),
                jax.ShapeDtypeStruct((c,) + scales.shape[1:], scales.dtype))
        call = jax.ffi.ffi_call("jax_ep_internode_dispatch_fp8", outs + meta, **ops._COMM)
        res = call(q, scales, topk_idx, topk_weights, **attrs)
        recv_x, rest = (res[0], res[1]), res[2:]
    else:
        rows, undo = ops._rows(x)
        attrs.update(_attrs(spec, cn, rows.shape[1] * rows.dtype.itemsize))
        call = jax.ffi.ffi_call("jax_ep_internode_dispatch",
                                (jax.ShapeDtypeStruct((c, rows.shape[1]), rows.dtype),) + meta, **ops._COMM)
        res = call(rows, topk_idx, topk_weights, **attrs)
        recv_x, rest = undo(res[0]), res[1:]
    (idx, w, counts, group_sizes, kept, needed, src_rank, src_token, in_rank, rdma_slot, fwd_src_node,
     fwd_src_token, fwd_dst_row, recv_table_row) = rest
    extra = {"rdma_slot": rdma_slot, "fwd_src_node": fwd_src_node, "fwd_src_token": fwd_src_token,
             "fwd_dst_row": fwd_dst_row, "recv_table_row": recv_table_row}
    handle = DispatchHandle(src_rank, src_token, in_rank, extra=extra, spec=spec)
    if not expert_major:
        group_sizes = None
    return ops._varying((recv_x, idx, w, counts, group_sizes, kept, needed, handle), spec.axis_name)


def cached_dispatch(payload: jax.Array, handle) -> jax.Array:
    """[T, ...] -> [C, ...] along the handle's routing, across nodes."""
    spec = handle.spec
    ops = _ops()
    rows, undo = ops._rows(payload)
    cn = handle.extra["fwd_src_node"].shape[0]
    call = jax.ffi.ffi_call("jax_ep_internode_cached_dispatch",
                            jax.ShapeDtypeStruct((spec.capacity, rows.shape[1]), rows.dtype), **ops._COMM)
    ex = handle.extra
    out = call(rows, ex["rdma_slot"], handle.recv_src_rank, ex["recv_table_row"], ex["fwd_src_node"],
               ex["fwd_src_token"], ex["fwd_dst_row"], **_attrs(spec, cn, rows.shape[1] * rows.dtype.itemsize))
    return ops._varying(undo(out), spec.axis_name)


def combine(y: jax.Array, handle) -> jax.Array:
    """[C, ...] -> [T, ...]: each node's rows of a token summed in float32 at
    its forwarder and rounded to y's dtype (the rings carry y's rows), then
    one partial per node summed at the source (float32, rounded once)."""
    spec = handle.spec
    ops = _ops()
    dtype = y.dtype
    if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        y = y.astype(jnp.float32)
    rows, undo = ops._rows(y)  # 16-byte rows: whole float4 groups of bf16/f16/f32
    cols = rows.shape[1]
    cn = handle.extra["fwd_src_node"].shape[0]
    call = jax.ffi.ffi_call("jax_ep_internode_combine",
                            jax.ShapeDtypeStruct((spec.num_tokens, cols), rows.dtype), **ops._COMM)
    ex = handle.extra
    out = call(rows, handle.recv_src_rank, ex["rdma_slot"], ex["fwd_src_node"], ex["fwd_src_token"], ex["fwd_dst_row"],
               ex["recv_table_row"], **_attrs(spec, cn, cols * rows.dtype.itemsize))
    return ops._varying(undo(out).astype(dtype), spec.axis_name)
