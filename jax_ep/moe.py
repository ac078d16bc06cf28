"""Framework-free Mixture-of-Experts layer built on jax_ep: router, auxiliary
loss, expert MLP and the two expert-parallel expert blocks.

Everything here is a pure function of a parameter dict and static config, so
the Flax NNX layer (``jax_ep.flax``), the Equinox layer (``jax_ep.equinox``)
and hand-written code share one implementation.

Parameters (global shapes; ``E`` experts, ``H`` hidden, ``F`` expert FFN width)::

    router  [H, E]     replicated on every rank
    w_gate  [E, H, F]  SwiGLU only (absent with activation="gelu")
    w_up    [E, H, F]
    w_down  [E, F, H]

Inside ``jax.shard_map`` over the EP axis (``R`` ranks) each rank holds its
``E/R`` experts: the ``w_*`` leaves are sharded on their leading axis and the
router is replicated (``param_specs`` gives the ``PartitionSpec`` of each
leaf). Rank ``r`` owns experts ``[r*E/R, (r+1)*E/R)``, jax_ep's convention.

A layer call on one rank (``moe_layer``) is::

    probs, weights, idx = route(x, router)                 # [T, E], [T, K], [T, K]
    aux = load_balancing_loss(probs, idx, E, axis_name)    # scalar, global over EP
    y = normal_experts(...) or low_latency_experts(...)     # [T, H]

``moe_reference`` computes the same layer on one device with every expert
local and no communication: the definition the tests compare against.
"""

from __future__ import annotations

import dataclasses
import math
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import validation
from jax_ep.fp8 import per_token_cast_back
from jax_ep.grouped_matmul import grouped_matmul
from jax_ep.low_latency import low_latency_combine, low_latency_dispatch
from jax_ep.moe_local import local_round
from jax_ep.normal import combine, dispatch
from jax_ep.options import BACKENDS, FP8Options, LowLatencyOptions, NormalOptions, check_bool
from jax_ep.rounds import DispatchRounds, capacity_for_factor, plan_rounds, sum_over_rounds

Mode = Literal["normal", "low_latency"]
Activation = Literal["swiglu", "gelu"]

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")
EXPERT_MATMULS = ("auto", "ragged_dot", "grouped")
# expert_matmul="auto" takes grouped_matmul where ragged_dot's dense operand
# ([rows, G*H] in the rows' dtype) would exceed this many bytes.
AUTO_GROUPED_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static configuration of a MoE layer (hashable: part of the jit cache key).

    Attributes:
      num_experts: ``E``, divisible by the EP axis size ``R``.
      hidden: ``H``, model width.
      ffn: ``F``, each expert's hidden width.
      topk: ``K``, experts per token.
      activation: ``"swiglu"`` (``(silu(x W_gate) * (x W_up)) W_down``) or
        ``"gelu"`` (``gelu(x W_up) W_down``).
      mode: ``"normal"`` (``jax_ep.dispatch`` in the expert-major layout +
        ``jax.lax.ragged_dot`` + ``jax_ep.combine``: training and prefill) or
        ``"low_latency"`` (``jax_ep.low_latency_dispatch`` + a batched matmul
        over the packed ``[E/R, R*M, H]`` buffer + ``low_latency_combine``:
        decoding).
      backend: ``"xla"`` (pure JAX, any platform) or ``"cuda"`` (the kernels).
      axis_name: the EP mesh axis the layer runs under (inside ``shard_map``).
      capacity: normal mode's receive rows per rank
        (``NormalOptions.num_max_recv_tokens``); ``None`` is the worst case,
        which never drops. Rows past it drop unless ``max_rounds`` > 1.
      expert_alignment: normal mode: each expert's row group starts at a
        multiple of this (``NormalOptions.expert_alignment``).
      max_tokens_per_rank: low-latency mode's ``M``; ``None`` takes the
        call's token count ``T`` (equal on every rank under ``shard_map``).
      fp8: low-latency mode only, inference only: cast tokens to FP8 for the
        dispatch (``FP8Options``) and back to the input dtype before the
        experts. Not differentiable.
      n_group, topk_group: DeepSeek-V3 group-limited gating (both or
        neither): the ``E`` experts form ``n_group`` groups of ``E/n_group``
        consecutive experts, each token keeps the ``topk_group`` groups with
        the largest sum of their top-2 router probabilities, and picks its
        top-``K`` experts inside them.
      normalize_weights: renormalise the top-k probabilities to sum to 1.
      buffer_id: the ``jax_ep.Buffer`` the CUDA backend communicates through
        (``buffer.normal.buffer_id``); ``ll_buffer_id`` the same for
        low-latency mode (``buffer.low_latency.buffer_id``).
      capacity_factor: normal mode: size the receive buffer for this multiple
        of the expected load (``jax_ep.rounds.capacity_for_factor``: ``T*K``
        rows per rank, aligned) instead of the worst case, and serve the rows
        that do not fit in further rounds through the same buffer and experts
        (``jax_ep.rounds``). Exclusive with ``capacity``.
      max_rounds: normal mode, with ``capacity`` or ``capacity_factor``: most
        rounds per call; rows that fit in none are dropped. ``None``: as many
        as any routing needs with ``capacity_factor`` (never drops), 1 with
        ``capacity`` (one dispatch that drops what does not fit).
      expert_matmul: normal mode's expert MLP over the grouped rows:
        ``"ragged_dot"`` (``jax.lax.ragged_dot``, which XLA computes as one
        dense dot of ``[rows, G*H]``: ``G`` = local experts times the work,
        and an operand of 90 GB at DeepEP's shape), ``"grouped"``
        (``jax_ep.grouped_matmul.grouped_matmul``: work and memory linear
        in the rows that hold data; reverse-mode differentiation only) or
        ``"auto"`` (``"grouped"`` where ragged_dot's dense operand would
        exceed ``AUTO_GROUPED_BYTES``, else ``"ragged_dot"``).
    """

    num_experts: int
    hidden: int
    ffn: int
    topk: int = 2
    activation: Activation = "swiglu"
    mode: Mode = "normal"
    backend: Literal["xla", "cuda"] = "xla"
    axis_name: str | tuple[str, ...] = "ep"
    capacity: int | None = None
    expert_alignment: int = 8
    max_tokens_per_rank: int | None = None
    fp8: FP8Options | None = None
    n_group: int | None = None
    topk_group: int | None = None
    normalize_weights: bool = True
    buffer_id: int | None = None
    ll_buffer_id: int | None = None
    capacity_factor: float | None = None
    max_rounds: int | None = None
    expert_matmul: Literal["auto", "ragged_dot", "grouped"] = "auto"

    def __post_init__(self):
        def fail(name, what, cls=ValueError):
            raise cls(f"MoEConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("num_experts", "hidden", "ffn", "topk", "expert_alignment"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive int")
        for name in ("capacity", "max_tokens_per_rank", "n_group", "topk_group"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                fail(name, "a positive int or None")
        for name in ("buffer_id", "ll_buffer_id"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                fail(name, "None or the id of a jax_ep.Buffer (buffer.normal.buffer_id / buffer.low_latency.buffer_id)")
        if self.topk > self.num_experts:
            raise ValueError(f"MoEConfig.topk={self.topk} exceeds num_experts={self.num_experts}")
        for name, choices in (("activation", ("swiglu", "gelu")), ("mode", ("normal", "low_latency")),
                              ("backend", BACKENDS), ("expert_matmul", EXPERT_MATMULS)):
            if getattr(self, name) not in choices:
                fail(name, f"one of {choices}")
        axes = self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)
        if not axes or not all(isinstance(a, str) and a for a in axes):
            fail("axis_name", "the name (str) of the expert-parallel mesh axis, e.g. 'ep', or a tuple of names",
                 TypeError)
        check_bool(self, "normalize_weights")
        if self.fp8 is not None and not isinstance(self.fp8, FP8Options):
            fail("fp8", "None or a jax_ep.FP8Options", TypeError)
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("set both n_group and topk_group for group-limited gating, or neither")
        if self.n_group is not None:
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.topk > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(
                    f"topk={self.topk} exceeds the experts in topk_group={self.topk_group} groups of "
                    f"{self.num_experts // self.n_group}"
                )
        if self.fp8 is not None and self.mode != "low_latency":
            raise ValueError("fp8 dispatch is available in mode='low_latency' only")
        self._check_rounds()

    def _check_rounds(self):
        f, m = self.capacity_factor, self.max_rounds
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0):
            raise ValueError(f"MoEConfig.capacity_factor must be a positive number (e.g. 1.25) or None, got {f!r}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"MoEConfig.max_rounds must be a positive int or None, got {m!r}")
        if f is not None and self.capacity is not None:
            raise ValueError("set capacity (rows) or capacity_factor (a multiple of the expected load), not both")
        if (f is not None or m is not None) and self.mode != "normal":
            raise ValueError("capacity_factor and max_rounds apply to mode='normal' (low-latency mode never drops)")
        if m is not None and m > 1 and f is None and self.capacity is None:
            raise ValueError(
                f"max_rounds={m} needs capacity or capacity_factor: the default worst-case capacity serves "
                "every row in one round"
            )

    @property
    def uses_rounds(self) -> bool:
        """Normal mode dispatches in overflow rounds (``capacity_factor``, or ``max_rounds`` > 1)."""
        return self.capacity_factor is not None or (self.max_rounds or 1) > 1

    def check_mesh(self, mesh: jax.sharding.Mesh, axis_name: str | None = None) -> None:
        """Raise jax_ep's error, before JAX's own, when the experts cannot be
        split over the EP axis of ``mesh`` (default ``self.axis_name``)."""
        axis = axis_name or self.axis_name
        missing = [a for a in (axis if isinstance(axis, tuple) else (axis,)) if a not in mesh.shape]
        if missing:
            raise ValueError(f"the mesh has no axis {missing[0]!r} (its axes: {tuple(mesh.shape)}); "
                             f"set MoEConfig.axis_name or axis_name= to the expert-parallel axis")
        r = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
        if self.num_experts % r:
            lo = self.num_experts - self.num_experts % r
            raise ValueError(
                f"MoEConfig.num_experts={self.num_experts} must be divisible by the size R={r} of the EP mesh "
                f"axis {axis!r} (each rank owns E/R experts): for example num_experts={lo or r} or {lo + r}"
            )

    @property
    def expert_param_names(self) -> tuple[str, ...]:
        """Names of the expert weights (sharded over the EP axis): ``w_gate``,
        ``w_up``, ``w_down`` with SwiGLU, ``w_up``, ``w_down`` with GELU."""
        return EXPERT_PARAMS if self.activation == "swiglu" else ("w_up", "w_down")

    def normal_options(self, num_tokens: int | None = None, num_ranks: int | None = None) -> NormalOptions:
        """The ``NormalOptions`` of normal mode (expert-major layout).

        With ``capacity_factor`` the capacity depends on the call: pass its
        ``num_tokens`` (``T`` per rank) and ``num_ranks`` (``R``).
        """
        capacity = self.capacity
        if self.capacity_factor is not None:
            if num_tokens is None or num_ranks is None:
                raise ValueError("with capacity_factor, normal_options needs num_tokens and num_ranks")
            capacity = capacity_for_factor(
                self.capacity_factor, num_tokens=num_tokens, num_topk=self.topk, num_experts=self.num_experts,
                num_ranks=num_ranks, layout="expert_major", expert_alignment=self.expert_alignment,
            )
        return NormalOptions(
            layout="expert_major", num_max_recv_tokens=capacity, expert_alignment=self.expert_alignment,
            backend=self.backend, buffer_id=self.buffer_id,
        )

    def low_latency_options(self, num_tokens: int) -> LowLatencyOptions:
        """The ``LowLatencyOptions`` of low-latency mode for a call with ``num_tokens`` tokens per rank."""
        return LowLatencyOptions(
            num_max_dispatch_tokens_per_rank=self.max_tokens_per_rank or max(num_tokens, 1),
            fp8=self.fp8, backend=self.backend, buffer_id=self.ll_buffer_id,
        )


# --- parameters -----------------------------------------------------------------


def place(value, sharding):
    """Put a host-identical array on ``sharding`` without a collective.

    Every process holds the same value (same seed); each takes its own
    shards. ``jax.device_put`` across processes checks consistency with an
    XLA collective, which NCCL refuses when ranks share a GPU.
    """
    import numpy as np

    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])



def param_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of each parameter."""
    e, h, f = config.num_experts, config.hidden, config.ffn
    shapes = {"router": (h, e), "w_gate": (e, h, f), "w_up": (e, h, f), "w_down": (e, f, h)}
    return {k: v for k, v in shapes.items() if k == "router" or k in config.expert_param_names}


def init_params(key: jax.Array, config: MoEConfig, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Random global parameters (normal with fan-in scaling), ``dtype`` everywhere.

    Returns:
      ``{"router": [H, E], ("w_gate": [E, H, F],) "w_up": [E, H, F], "w_down": [E, F, H]}``.
    """
    shapes = param_shapes(config)
    keys = jax.random.split(key, len(shapes))
    return {
        name: (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(shape[-2])).astype(dtype)
        for k, (name, shape) in zip(keys, shapes.items())
    }


def param_specs(params_or_config, axis_name: str = "ep") -> dict[str, P]:
    """``PartitionSpec`` of each parameter for ``shard_map``/``NamedSharding``.

    Expert weights are split on their leading (expert) axis over ``axis_name``;
    the router is replicated. Accepts a param dict or a ``MoEConfig``.
    """
    names = param_shapes(params_or_config) if isinstance(params_or_config, MoEConfig) else params_or_config
    return {name: (P() if name == "router" else P(axis_name)) for name in names}


def shard_params(params: dict, mesh: jax.sharding.Mesh, config: MoEConfig) -> dict[str, jax.Array]:
    """Place global ``params`` on ``mesh`` by ``param_specs``: expert weights
    split over ``config.axis_name`` (rank ``r`` holds experts
    ``[r*E/R, (r+1)*E/R)``), the router replicated. Checks first that the
    experts split over that axis (``MoEConfig.check_mesh``)."""
    config.check_mesh(mesh)
    specs = param_specs(params, config.axis_name)
    return {name: place(value, NamedSharding(mesh, specs[name])) for name, value in params.items()}


# --- router -----------------------------------------------------------------------


class Routing(NamedTuple):
    """A router's decision for ``T`` tokens.

    Attributes:
      probs: ``float32 [T, E]``, softmax of the router logits (all experts).
      weights: ``float32 [T, K]``, the chosen experts' probabilities
        (renormalised to sum to 1 unless ``normalize_weights=False``).
      idx: ``int32 [T, K]``, the chosen global expert ids, distinct per token.
    """

    probs: jax.Array
    weights: jax.Array
    idx: jax.Array


def group_limited_mask(probs: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """DeepSeek-V3 group selection: which experts each token may pick.

    Experts ``[g*E/n_group, (g+1)*E/n_group)`` form group ``g``. A group's score
    is the sum of its two largest probabilities (its largest when groups have
    one expert); each token keeps its ``topk_group`` best groups.

    Args:
      probs: ``float32 [T, E]``.

    Returns:
      ``bool [T, E]``, true for experts of a kept group.
    """
    t, e = probs.shape
    grouped = probs.reshape(t, n_group, e // n_group)
    group_score = jnp.sum(jax.lax.top_k(grouped, min(2, e // n_group))[0], axis=-1)  # [T, G]
    _, groups = jax.lax.top_k(group_score, topk_group)  # [T, topk_group]
    keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], groups].set(True)
    return jnp.repeat(keep, e // n_group, axis=1)


def route(x: jax.Array, router: jax.Array, config: MoEConfig) -> Routing:
    """Top-k softmax router, optionally group-limited (see ``MoEConfig``).

    Args:
      x: ``[T, H]`` any float dtype; the logits ``x @ router`` are float32.
      router: ``[H, E]``.

    Returns:
      ``Routing(probs, weights, idx)``.
    """
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs
    if config.n_group is not None:
        # Probabilities are >= 0, so -1 ranks every expert of a dropped group last.
        scores = jnp.where(group_limited_mask(probs, config.n_group, config.topk_group), probs, -1.0)
    _, idx = jax.lax.top_k(scores, config.topk)
    weights = jnp.take_along_axis(probs, idx, axis=-1)
    if config.normalize_weights:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs, weights, idx.astype(jnp.int32))


def load_balancing_loss(probs: jax.Array, idx: jax.Array, num_experts: int, axis_name: str | None = None) -> jax.Array:
    """Switch/DeepSeek auxiliary load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of routed (token, slot) pairs that go to expert
    ``e`` (no gradient) and ``P_e`` the mean router probability of ``e``, both
    over all tokens of all ranks: with ``axis_name`` set (inside ``shard_map``)
    the sums are ``lax.psum``-ed over that axis, so every rank returns the
    same global value. Equals 1 for perfectly uniform routing.

    Args:
      probs: ``float32 [T, E]``, router probabilities.
      idx: ``int32 [T, K]`` chosen experts (-1 masks a slot).
      num_experts: ``E``.
      axis_name: EP axis to reduce over, or ``None`` for the local tokens only.

    Returns:
      ``float32 []``.
    """
    t, k = idx.shape
    counts = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=(0, 1))  # -1 -> zero row
    prob_sum = jnp.sum(probs.astype(jnp.float32), axis=0)
    pairs = jnp.sum((idx >= 0).astype(jnp.float32))
    tokens = jnp.float32(t)
    if axis_name is not None:
        counts, prob_sum, pairs, tokens = jax.lax.psum((counts, prob_sum, pairs, tokens), axis_name)
    f = jax.lax.stop_gradient(counts / jnp.maximum(pairs, 1.0))
    p = prob_sum / jnp.maximum(tokens, 1.0)
    return num_experts * jnp.sum(f * p)


# --- experts ----------------------------------------------------------------------


def _act(config: MoEConfig, gate, up):
    if config.activation == "swiglu":
        return jax.nn.silu(gate) * up
    return jax.nn.gelu(up)


def grouped_matmul_for(config: MoEConfig, rows: int, groups: int, width: int, dtype) -> bool:
    """Whether the expert MLP of ``rows`` rows over ``groups`` local experts
    (input width ``width``, ``dtype``) runs on ``grouped_matmul`` rather than
    ``ragged_dot`` (``MoEConfig.expert_matmul``)."""
    if config.expert_matmul != "auto":
        return config.expert_matmul == "grouped"
    return rows * groups * width * jnp.dtype(dtype).itemsize > AUTO_GROUPED_BYTES


def expert_mlp_ragged(x: jax.Array, params: dict, group_sizes: jax.Array, config: MoEConfig) -> jax.Array:
    """Experts on the expert-major layout: one grouped matmul per projection
    (``jax.lax.ragged_dot`` or ``jax_ep.grouped_matmul.grouped_matmul``, as
    ``config.expert_matmul`` says).

    Args:
      x: ``[C, H]``, rows grouped by local expert.
      params: the rank's expert weights ``w_* [E/R, ...]``.
      group_sizes: ``int32 [E/R]`` rows of each expert's group (rows past
        their sum come out zero).

    Returns:
      ``[C, H]`` in x's dtype.
    """
    w = {n: params[n].astype(x.dtype) for n in config.expert_param_names}
    g = w["w_up"].shape[0]
    widest = max(config.hidden, config.ffn)
    mm = grouped_matmul if grouped_matmul_for(config, x.shape[0], g, widest, x.dtype) else jax.lax.ragged_dot
    up = mm(x, w["w_up"], group_sizes)
    gate = mm(x, w["w_gate"], group_sizes) if config.activation == "swiglu" else None
    return mm(_act(config, gate, up), w["w_down"], group_sizes)


def expert_mlp_batched(x: jax.Array, params: dict, config: MoEConfig) -> jax.Array:
    """Experts on the packed layout: a matmul batched over the local experts.

    Args:
      x: ``[E/R, N, H]``, local expert ``e``'s tokens in ``x[e]``.
      params: the rank's expert weights ``w_* [E/R, ...]``.

    Returns:
      ``[E/R, N, H]`` in x's dtype.
    """
    w = {n: params[n].astype(x.dtype) for n in config.expert_param_names}
    up = jnp.einsum("enh,ehf->enf", x, w["w_up"])
    gate = jnp.einsum("enh,ehf->enf", x, w["w_gate"]) if config.activation == "swiglu" else None
    return jnp.einsum("enf,efh->enh", _act(config, gate, up), w["w_down"])


def _expert_round_counted(config: MoEConfig, options: NormalOptions, params: dict, x: jax.Array,
                          topk_idx: jax.Array, topk_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One expert-major ``dispatch`` -> ``ragged_dot`` MLP -> ``combine`` of the
    given slots: ``([T, H], rows dropped int32 [])``."""
    out = dispatch(x, topk_idx, topk_weights, num_experts=config.num_experts,
                   axis_name=config.axis_name, options=options)
    y = expert_mlp_ragged(out.recv_x, params, out.expert_group_sizes, config)
    # Expert-major rows carry exactly one expert's slot: its weight is the row sum.
    y = y * jnp.sum(out.recv_topk_weights, axis=-1, keepdims=True).astype(y.dtype)
    return combine(y, out.handle), out.num_dropped


def _expert_round(config, options, params, x, topk_idx, topk_weights) -> jax.Array:
    return _expert_round_counted(config, options, params, x, topk_idx, topk_weights)[0]


def _local_round(config, options, params, x, topk_idx, topk_weights) -> jax.Array:
    return local_round(config, options, params, x, topk_idx, topk_weights)[0]


def normal_rounds(topk_idx: jax.Array, config: MoEConfig) -> tuple[NormalOptions, DispatchRounds]:
    """Normal mode's options for a call with ``topk_idx [T, K]`` and its
    round plan (``jax_ep.rounds.plan_rounds``); inside ``shard_map``."""
    r = validation.num_ranks_for(config.axis_name, config.backend, config.buffer_id)
    options = config.normal_options(num_tokens=topk_idx.shape[0], num_ranks=r)
    plan = plan_rounds(topk_idx, num_experts=config.num_experts, axis_name=config.axis_name, options=options,
                       max_rounds=config.max_rounds)
    return options, plan


def normal_experts(x: jax.Array, params: dict, routing: Routing, config: MoEConfig, *, with_rounds: bool = False):
    """Normal mode: expert-major ``dispatch`` -> ``ragged_dot`` MLP -> ``combine``.

    Call inside ``shard_map`` over ``config.axis_name``. With one rank on the
    axis the same result comes from a local permutation, with no dispatch
    (``jax_ep.moe_local.local_round``). With
    ``config.capacity_factor`` (or ``max_rounds`` > 1) the rows that do not
    fit the buffer run in further rounds (``jax_ep.rounds.sum_over_rounds``).

    Args:
      x: ``[T, H]`` (bfloat16/float16/float32), this rank's tokens.
      params: this rank's expert weights ``w_* [E/R, ...]``.
      routing: ``route``'s output for ``x``.
      with_rounds: also return the ``DispatchRounds`` plan (its
        ``num_rounds`` and ``num_dropped``); without rounds, one round's.

    Returns:
      ``[T, H]`` in x's dtype: ``sum_k weights[t, k] * expert_{idx[t, k]}(x[t])``
      (``(y, DispatchRounds)`` with ``with_rounds``).
    """
    experts = {n: params[n] for n in config.expert_param_names}
    # One rank: the dispatch is a local permutation (jax_ep.moe_local), no exchange.
    one_rank = validation.num_ranks_for(config.axis_name, config.backend, config.buffer_id) == 1
    round_counted = local_round if one_rank else _expert_round_counted
    if config.uses_rounds:
        options, plan = normal_rounds(routing.idx, config)
        round_fn = _local_round if one_rank else _expert_round
        y = sum_over_rounds(functools.partial(round_fn, config, options), experts, x, routing.idx,
                            routing.weights, plan)
        return (y, plan) if with_rounds else y
    y, dropped = round_counted(config, config.normal_options(), experts, x, routing.idx, routing.weights)
    if not with_rounds:
        return y
    slots = jnp.where(routing.idx >= 0, 0, -1).astype(jnp.int32)
    return y, DispatchRounds(slots, jnp.int32(1), dropped)


def low_latency_experts(x: jax.Array, params: dict, routing: Routing, config: MoEConfig) -> jax.Array:
    """Low-latency mode: ``low_latency_dispatch`` -> batched MLP -> ``low_latency_combine``.

    Call inside ``shard_map`` over ``config.axis_name``. ``T`` must not exceed
    ``config.max_tokens_per_rank`` when that is set.

    Args / Returns: as ``normal_experts``.
    """
    t = x.shape[0]
    options = config.low_latency_options(t)
    # The CUDA low-latency kernels move BF16 (as DeepEP's): cast in and out.
    wire = jnp.bfloat16 if config.backend == "cuda" else x.dtype
    out = low_latency_dispatch(x.astype(wire), routing.idx, num_experts=config.num_experts,
                               axis_name=config.axis_name, options=options)
    recv = out.recv_x
    if config.fp8 is not None:
        recv = per_token_cast_back(*recv, config.fp8, out_dtype=x.dtype, backend=config.backend)
    y = expert_mlp_batched(recv.astype(x.dtype), params, config)
    return low_latency_combine(y.astype(wire), routing.weights, out.handle).astype(x.dtype)


def moe_layer(params: dict, x: jax.Array, config: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """The whole layer on one rank: route, auxiliary loss, experts.

    Call inside ``jax.shard_map`` over ``config.axis_name`` with ``params``
    sharded by ``param_specs`` (so each rank sees ``w_* [E/R, ...]`` and the
    full router).

    Args:
      params: ``{"router": [H, E], "w_*": [E/R, ...]}``.
      x: ``[..., H]``, this rank's tokens (leading axes are flattened to ``T``).

    Returns:
      ``(y [..., H] in x's dtype, aux_loss float32 [])``; ``aux_loss`` is the
      global load-balancing loss, the same on every rank.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: T may be 0
    routing = route(x2, params["router"], config)
    aux = load_balancing_loss(routing.probs, routing.idx, config.num_experts, config.axis_name)
    experts = normal_experts if config.mode == "normal" else low_latency_experts
    y = experts(x2, params, routing, config)
    return y.reshape(*lead, y.shape[-1]), aux


def moe_reference(params: dict, x: jax.Array, config: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """The layer on one device, every expert local, no communication.

    Runs every expert on every token (``O(T*E)`` work): a definition for tests,
    not a fast path. ``params`` are the global ones (``w_* [E, ...]``).

    Returns:
      ``(y [..., H] in x's dtype, aux_loss float32 [])`` over all tokens of ``x``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: T may be 0
    routing = route(x2, params["router"], config)
    aux = load_balancing_loss(routing.probs, routing.idx, config.num_experts, None)
    t = x2.shape[0]
    every = expert_mlp_batched(jnp.broadcast_to(x2, (config.num_experts, t, x2.shape[-1])), params, config)
    chosen = every[routing.idx, jnp.arange(t)[:, None]]  # [T, K, H]
    y = jnp.einsum("tk,tkh->th", routing.weights, chosen.astype(jnp.float32)).astype(x.dtype)
    return y.reshape(*lead, y.shape[-1]), aux
