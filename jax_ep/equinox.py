"""Equinox Mixture-of-Experts layer on jax_ep (needs Equinox: ``pip install equinox``).

``MoE`` holds a replicated router ``[H, E]`` and an ``Experts`` submodule with
the expert weights ``[E, ...]``, which are sharded on their leading axis over
the EP axis. ``MoE.__call__`` runs ``jax_ep.moe.moe_layer`` and must run inside
``jax.shard_map`` over ``config.axis_name``, where each rank sees its
``[E/R, ...]`` slice of every ``Experts`` array. The pattern::

    model = Model(..., key=jax.random.key(0))     # holds jax_ep.equinox.MoE layers
    model = jax_ep.equinox.shard_model(model, mesh)

    def loss_fn(model, x, y):                     # x, y: [B, ...] sharded on "ep"
        def local(model, x, y):                   # one rank: model with E/R experts
            out, aux = model(x)
            return (jnp.mean((out - y) ** 2) + 0.01 * aux)[None]
        return jax_ep.equinox.ep_shard_map(local, model, x, y, mesh=mesh,
                                           in_specs=(P("ep"), P("ep")), out_specs=P("ep")).mean()

    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(model, x, y)

``ep_shard_map`` is ``eqx.partition(model, eqx.is_array)`` ->
``jax.shard_map`` (specs from ``partition_specs``) -> ``eqx.combine`` inside;
it works under ``eqx.filter_jit`` and ``eqx.filter_grad``/``filter_value_and_grad``.
"""

from __future__ import annotations

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - exercised only without equinox
    raise ImportError(
        "jax_ep.equinox needs Equinox: install it with `pip install equinox` "
        "(or, from a clone of jax_ep, `pip install -e '.[equinox]'`)"
    ) from e

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep import moe
from jax_ep.moe import MoEConfig, place

__all__ = ["Experts", "MoE", "MoEConfig", "check_mesh", "ep_shard_map", "partition_specs", "shard_model"]


class Experts(eqx.Module):
    """The expert weights; every array here is sharded on its leading (expert) axis.

    Attributes:
      w_gate: ``[E, H, F]`` (SwiGLU only, else ``None``).
      w_up: ``[E, H, F]``.
      w_down: ``[E, F, H]``.
    """

    w_gate: jax.Array | None
    w_up: jax.Array
    w_down: jax.Array


class MoE(eqx.Module):
    """Expert-parallel MoE layer (router + ``E`` expert MLPs) on jax_ep.

    Attributes:
      router: ``[H, E]``, replicated.
      experts: ``Experts``, sharded over the EP axis.
      config: the static ``MoEConfig``.

    Call inside ``jax.shard_map`` over ``config.axis_name`` (see the module
    docstring).
    """

    router: jax.Array
    experts: Experts
    config: MoEConfig = eqx.field(static=True)

    def __init__(self, config: MoEConfig, *, key: jax.Array, dtype=jnp.float32):
        p = moe.init_params(key, config, dtype)
        self.router = p["router"]
        self.experts = Experts(p.get("w_gate"), p["w_up"], p["w_down"])
        self.config = config

    def params(self) -> dict[str, jax.Array]:
        """The weights as ``jax_ep.moe``'s parameter dict."""
        out = {"router": self.router}
        for n in self.config.expert_param_names:
            out[n] = getattr(self.experts, n)
        return out

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Route ``x``, run the experts through jax_ep, return the weighted sum.

        Args:
          x: ``[..., H]`` (bfloat16/float16/float32): this rank's tokens.

        Returns:
          ``(y [..., H] in x's dtype, aux_loss float32 [])``: ``aux_loss`` is
          the global load-balancing loss, identical on every rank.
        """
        return moe.moe_layer(self.params(), x, self.config)

    def reference(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Same layer on one device with all ``E`` experts and no communication
        (``jax_ep.moe.moe_reference``); call outside ``shard_map``."""
        return moe.moe_reference(self.params(), x, self.config)


def check_mesh(model, mesh: jax.sharding.Mesh, axis_name: str = "ep") -> None:
    """jax_ep's error, before JAX's own, when a ``MoE`` layer of ``model``
    cannot split its experts over ``mesh``'s axis ``axis_name``."""
    for node in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, MoE)):
        if isinstance(node, MoE):
            node.config.check_mesh(mesh, axis_name)


def partition_specs(model, axis_name: str = "ep"):
    """``PartitionSpec`` tree matching ``eqx.filter(model, eqx.is_array)``.

    Arrays inside an ``Experts`` module get ``P(axis_name)``, every other array
    ``P()`` (replicated), non-arrays ``None``.
    """

    def spec(node):
        if isinstance(node, Experts):
            return jax.tree.map(lambda a: P(axis_name) if eqx.is_array(a) else None, node)
        return P() if eqx.is_array(node) else None

    return jax.tree.map(spec, model, is_leaf=lambda n: isinstance(n, Experts))


def shard_model(model, mesh: jax.sharding.Mesh, axis_name: str = "ep"):
    """Return ``model`` with its arrays placed on ``mesh`` by ``partition_specs``."""
    check_mesh(model, mesh, axis_name)
    params, static = eqx.partition(model, eqx.is_array)
    specs = partition_specs(model, axis_name)
    params = jax.tree.map(lambda a, s: place(a, NamedSharding(mesh, s)), params, specs)
    return eqx.combine(params, static)


def ep_shard_map(fn, model, *args, mesh: jax.sharding.Mesh, in_specs, out_specs, axis_name: str = "ep"):
    """Run ``fn(model, *args)`` inside ``jax.shard_map`` over ``mesh``.

    The model's arrays cross the boundary split by ``partition_specs``
    (``Experts`` arrays over ``axis_name``, the rest replicated); its static
    part is closed over and recombined with ``eqx.combine`` on each rank.

    Args:
      fn: ``(model, *args) -> outputs``, one rank's computation.
      model: any Equinox module (pytree) holding ``MoE`` layers.
      args: arrays, split by ``in_specs``.
      in_specs: one spec per element of ``args``.
      out_specs: specs of ``fn``'s outputs.
    """
    check_mesh(model, mesh, axis_name)
    params, static = eqx.partition(model, eqx.is_array)

    def body(params, *args):
        return fn(eqx.combine(params, static), *args)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(partition_specs(model, axis_name), *tuple(in_specs)),
                           out_specs=out_specs)
    return mapped(params, *args)
