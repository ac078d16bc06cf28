"""The timing loop the benchmarks share."""

import jax
import jax.numpy as jnp


def unrolled_loop(fn, iters):
    """jit of `iters` calls of fn(*args) -> scalar, summed.

    The calls are unrolled (an XLA while loop costs a host round trip per
    iteration); each call's inputs pass through an optimization barrier tied
    to the previous result, so XLA neither merges nor reorders them.
    """

    def many(*args):
        acc = jnp.float32(0)
        for _ in range(iters):
            args, acc = jax.lax.optimization_barrier((args, acc))
            acc = acc + fn(*args)
        return acc

    return jax.jit(many)
