"""Train a small expert-parallel MoE block on synthetic data with jax_ep.

Experts are sharded over an ``ep`` mesh axis; inside ``jax.shard_map`` each
rank routes its tokens (top-k softmax router), ``jax_ep.dispatch`` sends them
to the ranks that own their experts in the expert-major layout, the experts
run as one ``jax.lax.ragged_dot`` per projection, and ``jax_ep.combine``
returns the weighted outputs. ``jax.grad`` flows back through the same
handles. The task is to imitate a fixed random teacher MoE.

On a machine without GPUs this runs on 8 virtual CPU devices:

    python examples/train_moe.py
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="EP ranks (devices on the ep axis)")
    p.add_argument("--tokens-per-rank", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backend", default="xla", choices=["xla", "cuda"])
    p.add_argument("--platform", default=None, help="force a JAX platform, e.g. cpu")
    return p.parse_args()


def main():
    args = parse_args()
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.ranks}"

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep

    r, t, h, f, e, k = args.ranks, args.tokens_per_rank, args.hidden, args.ffn, args.experts, args.topk
    if len(jax.devices()) < r:
        raise SystemExit(f"--ranks {r} needs {r} devices, found {len(jax.devices())}")
    mesh = jax.make_mesh((r,), ("ep",), devices=jax.devices()[:r], axis_types=(jax.sharding.AxisType.Auto,))
    options = jax_ep.NormalOptions(layout="expert_major", expert_alignment=8, backend=args.backend)

    def init(key, scale=1.0):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "router": jax.random.normal(k1, (h, e)) * scale / h**0.5,
            "w_in": jax.random.normal(k2, (e, h, f)) * scale / h**0.5,
            "w_out": jax.random.normal(k3, (e, f, h)) * scale / f**0.5,
        }

    param_specs = {"router": P(), "w_in": P("ep"), "w_out": P("ep")}

    def moe_block(params, x):
        """One rank's view: x [T, H]; w_in/w_out hold this rank's E/R experts."""
        probs = jax.nn.softmax(x @ params["router"])
        weights, idx = jax.lax.top_k(probs, k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        out = jax_ep.dispatch(x, idx.astype(jnp.int32), weights, num_experts=e, options=options)
        hid = jax.nn.gelu(jax.lax.ragged_dot(out.recv_x, params["w_in"], out.expert_group_sizes))
        y = jax.lax.ragged_dot(hid, params["w_out"], out.expert_group_sizes)
        y = y * jnp.sum(out.recv_topk_weights, axis=1, keepdims=True)
        return jax_ep.combine(y, out.handle)

    def loss_fn(params, x, target):
        def local(params, x, target):
            y = moe_block(params, x)
            return jnp.mean((y - target) ** 2)[None]
        per_rank = jax.shard_map(local, mesh=mesh, in_specs=(param_specs, P("ep"), P("ep")), out_specs=P("ep"))
        return jnp.mean(per_rank(params, x, target))

    teacher_fn = jax.jit(jax.shard_map(moe_block, mesh=mesh,
                                       in_specs=(param_specs, P("ep")), out_specs=P("ep")))
    shard = lambda tree, specs: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)
    teacher = shard(init(jax.random.key(1), scale=2.0), param_specs)
    params = shard(init(jax.random.key(2)), param_specs)
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print(f"jax_ep MoE: {r} EP ranks on {jax.devices()[0].platform}, {e} experts (top-{k}), "
          f"{t} tokens/rank, hidden {h}, backend={args.backend}")
    data_key = jax.random.key(0)
    start, first = time.time(), None
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            data_key, sub = jax.random.split(data_key)
            x = jax.device_put(jax.random.normal(sub, (r * t, h)), NamedSharding(mesh, P("ep")))
            target = teacher_fn(teacher, x)
            params, opt_state, loss = train_step(params, opt_state, x, target)
            loss = float(loss)
            first = loss if first is None else first
            if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss:.4f}")
    print(f"loss {first:.4f} -> {loss:.4f} in {args.steps} steps ({time.time() - start:.1f} s)")
    return first, loss


if __name__ == "__main__":
    main()
