"""``Buffer``: the runtime object that owns communication resources.

With ``backend="xla"`` it owns nothing (XLA's collectives allocate their own
buffers) and only carries defaults. With ``backend="cuda"`` it will own the
registered NVLink/NVSHMEM buffers its kernels communicate through; create it
once, outside ``jit``, and release it with ``destroy()`` or a ``with`` block.
"""

from __future__ import annotations

import dataclasses

import jax

from jax_ep import layout as _layout
from jax_ep import low_latency as _ll
from jax_ep import normal as _normal
from jax_ep.options import BACKENDS, LowLatencyOptions, NormalOptions


@dataclasses.dataclass
class Buffer:
    """Expert-parallel communication for one EP mesh axis.

    Args:
      num_experts: ``E``, divisible by the size of ``axis_name``.
      axis_name: the EP mesh axis that ``shard_map`` binds.
      normal: default ``NormalOptions`` of ``dispatch``.
      low_latency: default ``LowLatencyOptions`` of ``low_latency_dispatch``.

    The methods are the functional API with these defaults filled in; call
    them inside ``jax.shard_map`` over ``axis_name``.
    """

    num_experts: int
    axis_name: object = "ep"
    normal: NormalOptions = NormalOptions()
    low_latency: LowLatencyOptions = LowLatencyOptions()
    _destroyed: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.normal, NormalOptions):
            raise TypeError(f"normal must be a NormalOptions, got {type(self.normal).__name__}")
        if not isinstance(self.low_latency, LowLatencyOptions):
            raise TypeError(f"low_latency must be a LowLatencyOptions, got {type(self.low_latency).__name__}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")

    def _alive(self):
        if self._destroyed:
            raise RuntimeError("this jax_ep.Buffer was destroyed; create a new one")

    def get_dispatch_layout(self, topk_idx: jax.Array) -> _layout.DispatchLayout:
        """See ``jax_ep.get_dispatch_layout``."""
        self._alive()
        return _layout.get_dispatch_layout(
            topk_idx, self.num_experts, axis_name=self.axis_name, backend=self.normal.backend
        )

    def dispatch(self, x, topk_idx, topk_weights, options: NormalOptions | None = None):
        """See ``jax_ep.dispatch``."""
        self._alive()
        return _normal.dispatch(
            x, topk_idx, topk_weights, num_experts=self.num_experts, axis_name=self.axis_name,
            options=options or self.normal,
        )

    def cached_dispatch(self, x, handle):
        """See ``jax_ep.cached_dispatch``."""
        self._alive()
        return _normal.cached_dispatch(x, handle)

    def combine(self, y, handle):
        """See ``jax_ep.combine``."""
        self._alive()
        return _normal.combine(y, handle)

    def low_latency_dispatch(self, x, topk_idx, options: LowLatencyOptions | None = None):
        """See ``jax_ep.low_latency_dispatch``."""
        self._alive()
        return _ll.low_latency_dispatch(
            x, topk_idx, num_experts=self.num_experts, axis_name=self.axis_name,
            options=options or self.low_latency,
        )

    def low_latency_combine(self, y, topk_weights, handle):
        """See ``jax_ep.low_latency_combine``."""
        self._alive()
        return _ll.low_latency_combine(y, topk_weights, handle)

    def destroy(self) -> None:
        """Release the communication resources (idempotent)."""
        self._destroyed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
