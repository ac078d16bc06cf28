"""Flax NNX Mixture-of-Experts layer on jax_ep (needs Flax: ``pip install flax``).

``MoE`` holds a replicated router (``nnx.Param [H, E]``) and expert weights
(``ExpertParam [E, ...]``, an ``nnx.Param`` subclass that marks "sharded on the
leading axis over the EP axis"). Its ``__call__`` runs ``jax_ep.moe.moe_layer``
and must run inside ``jax.shard_map`` over ``config.axis_name``, where each
rank sees its ``[E/R, ...]`` slice of every ``ExpertParam``. The pattern::

    model = Model(..., rngs=nnx.Rngs(0))          # holds jax_ep.flax.MoE layers
    jax_ep.flax.shard_model(model, mesh)          # place ExpertParams on P("ep")

    def loss_fn(model, x, y):                     # x, y: [B, ...] sharded on "ep"
        def local(model, x, y):                   # one rank: model with E/R experts
            out, aux = model(x)
            return (jnp.mean((out - y) ** 2) + 0.01 * aux)[None]
        return jax_ep.flax.ep_shard_map(local, model, x, y, mesh=mesh,
                                        in_specs=(P("ep"), P("ep")), out_specs=P("ep")).mean()

``ep_shard_map`` is ``nnx.split`` -> ``jax.shard_map`` (state specs from
``partition_specs``) -> ``nnx.merge`` inside; it works under ``nnx.jit`` and
``nnx.grad``/``nnx.value_and_grad``. Variable updates made inside the mapped
function are discarded (the MoE layer makes none).
"""

from __future__ import annotations

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "jax_ep.flax needs Flax (NNX): install it with `pip install flax` "
        "(or, from a clone of jax_ep, `pip install -e '.[flax]'`)"
    ) from e

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import moe
from jax_ep.moe import MoEConfig, place

__all__ = ["ExpertParam", "MoE", "MoEConfig", "check_mesh", "ep_shard_map", "partition_specs", "shard_model"]


class ExpertParam(nnx.Param):
    """An expert weight ``[E, ...]``, sharded on its leading axis over the EP axis."""


class MoE(nnx.Module):
    """Expert-parallel MoE layer (router + ``E`` expert MLPs) on jax_ep.

    Attributes:
      config: the static ``MoEConfig``.
      router: ``nnx.Param [H, E]``, replicated.
      w_gate: ``ExpertParam [E, H, F]`` (SwiGLU only, else ``None``).
      w_up: ``ExpertParam [E, H, F]``.
      w_down: ``ExpertParam [E, F, H]``.

    Call inside ``jax.shard_map`` over ``config.axis_name`` (see the module
    docstring); there each ``ExpertParam`` is the rank's ``[E/R, ...]`` slice.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        params = moe.init_params(rngs.params(), config, param_dtype)
        self.router = nnx.Param(params["router"])
        self.w_gate = ExpertParam(params["w_gate"]) if "w_gate" in params else None
        self.w_up = ExpertParam(params["w_up"])
        self.w_down = ExpertParam(params["w_down"])

    def params(self) -> dict[str, jax.Array]:
        """The weights as ``jax_ep.moe``'s parameter dict."""
        names = ("router",) + self.config.expert_param_names
        return {n: getattr(self, n)[...] for n in names}

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Route ``x``, run the experts through jax_ep, return the weighted sum.

        Args:
          x: ``[..., H]`` (bfloat16/float16/float32): this rank's tokens.

        Returns:
          ``(y [..., H] in x's dtype, aux_loss float32 [])``: ``aux_loss`` is
          the global load-balancing loss (``jax_ep.moe.load_balancing_loss``),
          identical on every rank; scale it and add it to the training loss.
        """
        return moe.moe_layer(self.params(), x, self.config)

    def reference(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Same layer on one device with all ``E`` experts and no communication
        (``jax_ep.moe.moe_reference``); call outside ``shard_map``."""
        return moe.moe_reference(self.params(), x, self.config)


def check_mesh(model: nnx.Module, mesh: jax.sharding.Mesh, axis_name: str = "ep") -> None:
    """jax_ep's error, before JAX's own, when a ``MoE`` layer of ``model``
    cannot split its experts over ``mesh``'s axis ``axis_name``."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            node.config.check_mesh(mesh, axis_name)


def _is_variable(v) -> bool:
    return isinstance(v, nnx.Variable)


def partition_specs(model_or_state, axis_name: str = "ep"):
    """``PartitionSpec`` of each variable: ``P(axis_name)`` for an
    ``ExpertParam``, ``P()`` (replicated) for everything else.

    Args:
      model_or_state: an ``nnx.Module`` or an ``nnx.State`` (e.g. from ``nnx.split``).

    Returns:
      An ``nnx.State`` with a ``PartitionSpec`` in place of each variable: a
      valid ``in_specs`` entry for that state in ``jax.shard_map``.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(lambda v: P(axis_name) if isinstance(v, ExpertParam) else P(), state, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, axis_name: str = "ep") -> nnx.Module:
    """Place the model's variables on ``mesh`` by ``partition_specs`` (in place).

    Returns the model for chaining.
    """
    check_mesh(model, mesh, axis_name)
    state = nnx.state(model)
    specs = partition_specs(state, axis_name)
    placed = jax.tree.map(lambda v, s: jax.tree.map(lambda a: place(a, NamedSharding(mesh, s)), v),
                          state, specs, is_leaf=_is_variable)
    nnx.update(model, placed)
    return model


def ep_shard_map(fn, model: nnx.Module, *args, mesh: jax.sharding.Mesh, in_specs, out_specs, axis_name: str = "ep"):
    """Run ``fn(model, *args)`` inside ``jax.shard_map`` over ``mesh``.

    The model crosses the boundary as ``nnx.split`` state with
    ``partition_specs`` (expert weights split over ``axis_name``, the rest
    replicated) and is rebuilt with ``nnx.merge`` on each rank.

    Args:
      fn: ``(model, *args) -> outputs``, one rank's computation.
      model: an ``nnx.Module`` (may be a traced one, under ``nnx.jit``/``nnx.grad``).
      args: arrays, split by ``in_specs``.
      in_specs: one spec per element of ``args``.
      out_specs: specs of ``fn``'s outputs.

    Returns:
      ``fn``'s outputs assembled by ``out_specs``.
    """
    check_mesh(model, mesh, axis_name)
    graphdef, state = nnx.split(model)

    def body(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(partition_specs(state, axis_name), *tuple(in_specs)),
                           out_specs=out_specs)
    return mapped(state, *args)
