"""The pure-JAX reference backend (``backend="xla"``): the definition of every op.

Runs on CPU, GPU and TPU inside ``jax.shard_map`` over the EP axis. The CUDA
kernels are tested against it: bitwise where data is only moved, within a
documented tolerance for FP8 casts and sums.
"""

from jax_ep.reference.fp8 import per_token_cast_back, per_token_cast_to_fp8
from jax_ep.reference.layout import get_dispatch_layout
from jax_ep.reference.normal import cached_dispatch, combine, dispatch_route
from jax_ep.reference import low_latency

ll_dispatch_route = low_latency.dispatch_route
ll_dispatch = low_latency.dispatch
ll_combine = low_latency.combine
ll_gather_back = low_latency.gather_back
ll_scatter_out = low_latency.scatter_out

IMPLEMENTED = (
    "get_dispatch_layout", "per_token_cast_to_fp8", "per_token_cast_back",
    "dispatch_route", "cached_dispatch", "combine",
    "ll_dispatch_route", "ll_dispatch", "ll_combine", "ll_gather_back", "ll_scatter_out",
)
