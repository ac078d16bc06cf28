"""Smoke test of an installed jax_ep (scripts/build_wheel.sh runs it in a fresh venv).

Checks, on 8 virtual CPU devices:
  1. jax_ep imports from site-packages (not from a source tree);
  2. the reference backend runs a dispatch and a combine: with one expert per
     token and the default (never-dropping) capacity, combine(dispatch(x)) == x;
  3. the CUDA extension jax_ep._C loads and registers its XLA FFI targets
     (no GPU needed: registration only hands XLA the handler capsules);
  4. with --nvshmem: jax_ep._nvshmem loads against the installed NVSHMEM wheel,
     built with the NVSHMEM version the nvshmem extra pins.

    python scripts/wheel_smoke_test.py [--nvshmem VERSION]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def check_installed():
    import jax_ep

    where = os.path.dirname(jax_ep.__file__)
    assert "site-packages" in where, f"jax_ep imported from {where}, not from the installed wheel"
    assert os.path.exists(os.path.join(where, "py.typed")), "py.typed is missing from the wheel"
    print(f"jax_ep {jax_ep.__version__} from {where}")


def check_reference_backend():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep

    ranks, tokens, hidden, experts = 8, 16, 32, 16
    mesh = jax.make_mesh((ranks,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ranks * tokens, hidden)).astype(np.float32)
    idx = rng.integers(0, experts, (ranks * tokens, 1)).astype(np.int32)
    w = np.ones((ranks * tokens, 1), np.float32)

    def body(x, idx, w):
        out = jax_ep.dispatch(x, idx, w, num_experts=experts, options=jax_ep.NormalOptions(backend="xla"))
        return jax_ep.combine(out.recv_x, out.handle), out.num_recv_rows[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"), P("ep"))))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))  # noqa: E731
    with jax.set_mesh(mesh):
        y, received = f(put(x), put(idx), put(w))
    np.testing.assert_allclose(np.asarray(y), x, rtol=1e-6)
    assert int(np.asarray(received).sum()) == ranks * tokens, received
    print(f"reference backend: dispatch + combine of {ranks}x{tokens} tokens on {jnp.zeros(()).device.platform} ok")


def check_extension():
    from jax_ep import _extension

    assert _extension.available(), _extension.unavailable_reason()
    targets = _extension.register_targets()
    assert targets, "jax_ep._C registered no targets"
    print(f"jax_ep._C: {len(targets)} XLA FFI targets registered: {', '.join(targets)}")


def check_nvshmem(expected: str):
    from jax_ep import nvshmem

    assert nvshmem.available(), nvshmem.unavailable_reason()
    assert nvshmem.build_version() == expected, (nvshmem.build_version(), expected)
    assert nvshmem.version() == expected, (nvshmem.version(), expected)
    print(f"jax_ep._nvshmem: built with NVSHMEM {nvshmem.build_version()}, host library {nvshmem.version()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvshmem", metavar="VERSION", help="also require jax_ep._nvshmem, built with this NVSHMEM")
    args = p.parse_args()
    check_installed()
    check_reference_backend()
    check_extension()
    if args.nvshmem:
        check_nvshmem(args.nvshmem)
    print("smoke test passed")


if __name__ == "__main__":
    sys.exit(main())
