"""The compiled extension ``jax_ep._C`` and the registration of its XLA FFI targets.

``jax_ep._C`` (built from ``cuda/`` and ``xla_ffi/`` when a CUDA compiler is
available) hands out one XLA FFI handler capsule per custom-call target.
Importing this module registers all of them for the CUDA platform, once, so the
targets exist before the backend first runs. Without the extension,
:func:`available` is False and :func:`unavailable_reason` says why; the ``xla``
backend does not need it.
"""

from __future__ import annotations

import threading

import jax

try:
    from jax_ep import _C
except ImportError as _error:  # not built, or built for another Python / platform
    _C = None
    _IMPORT_ERROR = f"{type(_error).__name__}: {_error}"
else:
    _IMPORT_ERROR = ""

PLATFORM = "CUDA"

_lock = threading.Lock()
# Kept on the extension module (never reloaded), so that reloading this module
# does not register the targets a second time.
_REGISTERED_ATTR = "_jax_ep_registered_targets"


def available() -> bool:
    """True when the compiled extension ``jax_ep._C`` imported."""
    return _C is not None


def unavailable_reason() -> str:
    """Why ``jax_ep._C`` is missing ("" when it is available)."""
    if _C is not None:
        return ""
    return (
        "the CUDA extension jax_ep._C is not built (build it from a clone of jax_ep, with nvcc on PATH: "
        "`pip install -e .`, or `bash scripts/setup_env.sh` for a .venv with the tested versions): " + _IMPORT_ERROR
    )


def registrations() -> dict:
    """Target name -> handler capsule, as the extension hands them out ({} without it)."""
    return dict(_C.registrations()) if _C is not None else {}


def register_targets() -> tuple[str, ...]:
    """Register every target of ``jax_ep._C`` with XLA for CUDA; idempotent.

    Returns the registered target names (empty without the extension).
    """
    if _C is None:
        return ()
    with _lock:
        done = getattr(_C, _REGISTERED_ATTR, None)
        if done is None:
            targets = _C.registrations()
            for name in sorted(targets):
                jax.ffi.register_ffi_target(name, targets[name], platform=PLATFORM)
            done = tuple(sorted(targets))
            setattr(_C, _REGISTERED_ATTR, done)
    return done


register_targets()
