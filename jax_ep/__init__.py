"""jax_ep: expert-parallel dispatch and combine for Mixture-of-Experts in JAX.

Normal mode (training, prefill): ``get_dispatch_layout``, ``dispatch``,
``cached_dispatch``, ``combine``. Low-latency mode (decoding):
``low_latency_dispatch``, ``low_latency_combine``. FP8: ``per_token_cast_to_fp8``,
``per_token_cast_back``. Dropless dispatch at capacity-factor memory
(overflow rounds): ``capacity_for_factor``, ``plan_rounds``,
``sum_over_rounds``. Every op runs inside ``jax.shard_map`` over the EP
axis, under ``jit``/``scan``, with ``backend="xla"`` (pure JAX, the reference)
or ``backend="cuda"`` (the kernels), chosen by static options.
"""

from jax_ep.buffer import Buffer, status
from jax_ep.checked import checked_errors
from jax_ep.fp8 import per_token_cast_back, per_token_cast_to_fp8
from jax_ep.handle import DispatchHandle, LowLatencyHandle
from jax_ep.layout import DispatchLayout, get_dispatch_layout
from jax_ep.low_latency import (
    LowLatencyDispatchOutput,
    LowLatencyPending,
    low_latency_combine,
    low_latency_combine_recv,
    low_latency_combine_send,
    low_latency_dispatch,
    low_latency_dispatch_recv,
    low_latency_dispatch_send,
)
from jax_ep.normal import DispatchOutput, cached_dispatch, combine, dispatch
from jax_ep.internode_ops import internode_buffer_bytes
from jax_ep.options import FP8Options, InternodeOptions, LowLatencyOptions, NormalOptions
from jax_ep.rank_mask import rank_mask_of
from jax_ep.rounds import DispatchRounds, capacity_for_factor, plan_rounds, sum_over_rounds
from jax_ep.runtime import intranode_buffer_bytes, low_latency_buffer_bytes
from jax_ep.tuning import tuned_normal_options
from jax_ep.faults import BufferMismatchError, CommunicationError
from jax_ep.validation import CapacityOverflowError, RoutingError

__version__ = "0.1.0"

__all__ = [
    "Buffer", "BufferMismatchError", "CapacityOverflowError", "checked_errors", "CommunicationError", "DispatchHandle", "DispatchLayout", "DispatchOutput",
    "FP8Options", "InternodeOptions", "internode_buffer_bytes", "LowLatencyDispatchOutput", "LowLatencyHandle", "LowLatencyOptions", "LowLatencyPending",
    "NormalOptions", "RoutingError", "cached_dispatch", "combine", "dispatch",
    "get_dispatch_layout", "intranode_buffer_bytes", "low_latency_buffer_bytes", "low_latency_combine",
    "low_latency_combine_recv", "low_latency_combine_send", "low_latency_dispatch", "low_latency_dispatch_recv",
    "low_latency_dispatch_send",
    "per_token_cast_back", "per_token_cast_to_fp8", "rank_mask_of", "status", "tuned_normal_options",
    "DispatchRounds", "capacity_for_factor", "plan_rounds", "sum_over_rounds",
]
