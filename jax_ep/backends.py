"""Backend lookup: ``"xla"`` is the pure-JAX reference, ``"cuda"`` the kernels.

Every backend module offers the same functions (see ``jax_ep.reference``);
the public API and its ``custom_vjp`` rules call them by name.
"""

from __future__ import annotations

import types

from jax_ep.options import BACKENDS


def get_backend(name: str) -> types.ModuleType:
    if name == "xla":
        from jax_ep import reference

        return reference
    if name == "cuda":
        from jax_ep import _extension, cuda_ops

        if not _extension.available():
            raise RuntimeError(
                "backend='cuda' needs the compiled jax_ep._C extension, which is not available: "
                f"{_extension.unavailable_reason()}. Or use backend='xla'"
            )
        return cuda_ops
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def require(backend: types.ModuleType, op: str, name: str):
    """The backend's implementation of `op`, or a clear error naming what exists."""
    fn = getattr(backend, op, None)
    if fn is None:
        raise NotImplementedError(
            f"backend={name!r} has no {op!r} kernel in this build; "
            f"it implements {sorted(getattr(backend, 'IMPLEMENTED', ()))}. Use backend='xla' for this op"
        )
    return fn
