"""Checked mode: run-time checks that every rank passes or fails together.

A check computes its condition on each rank, gathers it across the EP axis
(one small ``all_gather``), and hands the gathered counts to one host
callback per rank. The callback raises on every rank or on none, and
everything the op does next depends on the callback's output, so no rank
enters a later exchange that a failed peer will never join.

A callback that raises fails the computation: the caller sees a
``jax.errors.JaxRuntimeError`` whose message holds ``jax_ep.RoutingError:
...`` or ``jax_ep.CapacityOverflowError: ...``. ``checked_errors()`` turns it
back into the jax_ep class.
"""

from __future__ import annotations

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jax_ep.validation import CapacityOverflowError, RoutingError

_ERRORS = {cls.__name__: cls for cls in (RoutingError, CapacityOverflowError)}
_IN_MESSAGE = re.compile(r"\b(?:jax_ep\.)?(%s): (.*)" % "|".join(_ERRORS), re.DOTALL)


def _gather(value, axis_name):
    """int32 [R]: ``value`` of every rank (``[1]`` without an EP axis)."""
    value = jnp.asarray(value, jnp.int32)
    if axis_name is None:
        return value[None]
    return jax.lax.all_gather(value, axis_name)


def _pass_through(make_error, per_rank, tree):
    """``tree`` (integer arrays) returned by a host callback that first raises
    ``make_error(*per_rank)`` when any rank's first count is nonzero."""
    leaves, treedef = jax.tree.flatten(tree)
    # A CPU callback crashes on a zero-size operand: empty leaves (no tokens
    # on this rank) are tied to the callback's extra scalar instead.
    full = [i for i, a in enumerate(leaves) if a.size]
    n = len(per_rank)

    def callback(*args):
        counts = [np.asarray(a) for a in args[:n]]
        if counts[0].any():
            raise make_error(*counts)
        return (np.zeros((), np.int32),) + tuple(np.asarray(a) for a in args[n:])

    shapes = (jax.ShapeDtypeStruct((), jnp.int32),) + tuple(
        jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in full)

    # Integer data carries no gradient; the rule keeps differentiation of the
    # surrounding op from reaching the callback (which has no JVP).
    @jax.custom_jvp
    def through(*args):
        # An io_callback is never eliminated: the check runs even where
        # nothing uses what passes through it.
        return tuple(io_callback(callback, shapes, *args))

    @through.defjvp
    def _(primals, tangents):
        out = through(*primals)
        return out, tuple(np.zeros(a.shape, jax.dtypes.float0) for a in out)

    done, *passed = through(*per_rank, *(leaves[i] for i in full))
    out, _ = _tie(leaves, done)
    for i, a in zip(full, passed):
        out[i] = a
    return jax.tree.unflatten(treedef, out)


def _tie(tree, key):
    """``tree`` and ``key``, neither usable before both are computed."""
    return jax.lax.optimization_barrier((tree, key))


def _ranks(counts) -> str:
    bad = np.nonzero(counts)[0].tolist()
    return f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"


def check_ids(x, topk_idx, topk_weights, num_experts: int, axis_name):
    """Fail every rank when any rank has an id outside [-1, E).

    Returns ``(x, topk_idx, topk_weights)``, usable only after the check
    (``topk_weights`` may be None).
    """
    bad = jnp.sum((topk_idx < -1) | (topk_idx >= num_experts))
    counts = _gather(bad, axis_name)

    def make_error(counts):
        return RoutingError(
            f"{int(counts.sum())} top-k ids are out of range on {_ranks(counts)}: topk_idx entries must be in "
            f"[0, num_experts={num_experts}) or -1 for a masked slot"
        )

    topk_idx = _pass_through(make_error, (counts,), topk_idx)
    (x, topk_weights), topk_idx = _tie((x, topk_weights), topk_idx)
    return x, topk_idx, topk_weights


def check_overflow(outputs, handle, num_dropped, needed, capacity: int, axis_name):
    """Fail every rank when any rank dropped receive rows.

    ``handle`` (small integer arrays) passes through the callback; ``outputs``
    (any pytree) is tied to it. Returns ``(outputs, handle)``.
    """
    dropped = _gather(num_dropped, axis_name)
    wanted = _gather(needed, axis_name)

    def make_error(dropped, wanted):
        worst = int(wanted.max())
        return CapacityOverflowError(
            f"the receive buffer overflowed on {_ranks(dropped)}: {int(dropped.sum())} rows did not fit in "
            f"num_max_recv_tokens={capacity}; the fullest rank needed {worst} rows. Raise num_max_recv_tokens "
            f"to at least {worst} (None takes the worst case, which never drops)"
        )

    handle = _pass_through(make_error, (dropped, wanted), handle)
    return _tie(outputs, handle)


def error_from(error: BaseException) -> Exception | None:
    """The jax_ep checked-mode error a failed computation carries, or None.

    ``error`` is what the computation raised (a ``jax.errors.JaxRuntimeError``
    wrapping the callback's exception); the result is a new
    ``RoutingError``/``CapacityOverflowError`` with the original message.
    """
    found = _IN_MESSAGE.search(str(error))
    if found is None:
        return None
    message = found.group(2).strip().splitlines()[0]
    return _ERRORS[found.group(1)](message)


def _forget_failed_runs() -> None:
    """JAX keeps the last run of each device and waits for it again at exit,
    printing its error a second time; drop the runs that failed."""
    try:
        from jax._src import dispatch
        tokens = dispatch.runtime_tokens.output_runtime_tokens
    except (ImportError, AttributeError):  # another JAX: the exit message stays
        return
    for device, token in list(tokens.items()):
        try:
            token.block_until_ready()
        except Exception:  # noqa: BLE001 - the failure the caller is being told about
            tokens.pop(device, None)


@contextlib.contextmanager
def checked_errors():
    """Raise checked-mode failures as ``jax_ep.RoutingError`` or
    ``jax_ep.CapacityOverflowError`` (the original as ``__cause__``).

    Wrap the code that runs the computation and reads its results (errors
    surface where results are awaited, not where the jitted function is
    called)::

        with jax_ep.checked_errors():
            out = np.asarray(step(x, ids))

    Also usable as a decorator. Other errors pass unchanged.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        error = error_from(e)
        if error is None:
            raise
        _forget_failed_runs()
        raise error from e


class _QuietCheckFailures(logging.Filter):
    """JAX logs every failed callback, once per device; a checked-mode
    failure reaches the caller anyway, so it is not logged again."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, tuple(_ERRORS.values()))


logging.getLogger("jax._src.callback").addFilter(_QuietCheckFailures())
