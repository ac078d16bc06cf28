"""CPU test setup: 8 virtual devices, and helpers to run a function on R ranks."""

import os

# CPU tests (the default, and CI) run on 8 virtual CPU devices. GPU tests set
# JAX_EP_TEST_GPU=1 (scripts/gpu_suite.sh does) and see the real devices.
if not os.environ.get("JAX_EP_TEST_GPU"):
    os.environ.setdefault("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

AXIS = "ep"


def make_mesh(num_ranks: int):
    return jax.make_mesh(
        (num_ranks,), (AXIS,), devices=jax.devices()[:num_ranks], axis_types=(jax.sharding.AxisType.Auto,)
    )


def run_ranks(fn, num_ranks: int, *per_rank_args, jit: bool = True):
    """Run fn on each rank inside shard_map.

    per_rank_args: lists (one array per rank) stacked along a new leading rank
    axis. fn sees each rank's arrays and returns a pytree of arrays; the
    result has a leading rank axis on every leaf.
    """
    mesh = make_mesh(num_ranks)
    stacked = [np.stack(a) for a in per_rank_args]
    sharded = [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in stacked]

    def body(*args):
        out = fn(*[a[0] for a in args])
        return jax.tree.map(lambda o: o[None], out)

    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(P(AXIS) for _ in sharded), out_specs=P(AXIS))
    if jit:
        f = jax.jit(f)
    with jax.set_mesh(mesh):
        return jax.tree.map(np.asarray, f(*sharded))


def random_routing(rng, num_ranks, num_tokens, num_topk, num_experts, mask_prob=0.1, distinct=True):
    """Per-rank top-k ids (distinct experts per token unless asked), some slots masked."""
    idxs = []
    for _ in range(num_ranks):
        if distinct:
            ids = np.stack([rng.choice(num_experts, num_topk, replace=False) for _ in range(num_tokens)]) if num_tokens else np.zeros((0, num_topk), int)
        else:
            ids = rng.integers(0, num_experts, (num_tokens, num_topk))
        ids = np.where(rng.random(ids.shape) < mask_prob, -1, ids)
        idxs.append(ids.astype(np.int32))
    return idxs


# The random_routing arguments of the routing families that several test files draw from.
ROUTING_FAMILIES = {
    "uniform": dict(mask_prob=0.0),
    "masked": dict(mask_prob=0.4),
    "duplicates": dict(mask_prob=0.1, distinct=False),
}


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % (2**32))
