"""Greedy decoding with jax_ep's low-latency mode: one jit-compiled ``lax.scan``.

A small Equinox decoder LM (token + position embeddings, ``--layers`` blocks of
single-head causal attention with a KV cache and a ``jax_ep.equinox.MoE`` in
``mode="low_latency"``, LM head; random weights) generates ``--steps`` tokens
for ``R * --batch-per-rank`` sequences. The whole loop runs inside
``jax.shard_map`` over the ``ep`` axis: each rank decodes its own sequences
and holds ``E/R`` experts of every layer, and every step of every layer does a
``low_latency_dispatch`` of the rank's ``B/R`` current tokens into the packed
``[E/R, R*M, H]`` buffer (``M = B/R``), a batched expert matmul and a
``low_latency_combine``. It prints the tokens/second of the compiled loop.

``--check`` also decodes on one device with every expert local (the dense
reference, no communication) and reports whether the tokens agree.

    python examples/decode_loop.py [--steps 32] [--check]

On GPUs pass ``--backend cuda`` (one process per rank, under
``python -m jax_ep.launch -n R``; ranks may share a GPU); the default ``xla``
backend runs anywhere (8 virtual CPU devices here).
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="EP ranks (devices on the ep axis); xla backend only")
    p.add_argument("--batch-per-rank", type=int, default=4, help="sequences decoded by each rank (M)")
    p.add_argument("--steps", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--backend", default="xla", choices=["xla", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one")
    p.add_argument("--check", action="store_true", help="compare with a dense single-device decode")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "cuda":
        from jax_ep.launch import initialize_distributed

        initialize_distributed()
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if os.environ["JAX_PLATFORMS"] == "cpu" and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={args.ranks}")

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep.equinox as epx

    devices = jax.devices() if args.backend == "cuda" else jax.devices()[: args.ranks]
    r = len(devices)
    if args.backend == "xla" and r < args.ranks:
        raise SystemExit(f"--ranks {args.ranks} needs {args.ranks} devices, found {r}")
    mesh = jax.make_mesh((r,), ("ep",), devices=devices, axis_types=(jax.sharding.AxisType.Explicit,))
    b_local, d, max_len = args.batch_per_rank, args.dim, args.steps + 1
    ll_buffer_id = None
    if args.backend == "cuda":  # the registered buffer the low-latency kernels communicate through
        import jax_ep

        buffer = jax_ep.Buffer(
            num_experts=args.experts, axis_name="ep", num_nvl_bytes=1 << 22,
            low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=b_local, backend="cuda"),
            num_ll_bytes=jax_ep.low_latency_buffer_bytes(b_local, d, r, args.topk, args.experts),
        )
        ll_buffer_id = buffer.low_latency.buffer_id
    moe_cfg = epx.MoEConfig(num_experts=args.experts, hidden=d, ffn=args.ffn, topk=args.topk,
                            mode="low_latency", max_tokens_per_rank=b_local, backend=args.backend,
                            ll_buffer_id=ll_buffer_id)

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    class Block(eqx.Module):
        wqkv: jax.Array  # [D, 3D]
        wo: jax.Array  # [D, D]
        moe: epx.MoE

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.wqkv = jax.random.normal(k1, (d, 3 * d)) / d**0.5
            self.wo = jax.random.normal(k2, (d, d)) / d**0.5
            self.moe = epx.MoE(moe_cfg, key=k3)

        def __call__(self, x, cache, pos, dense):
            """x [B, D] (current tokens), cache [2, B, S, D], pos: this step's position."""
            q, k, v = jnp.split(rms(x) @ self.wqkv, 3, axis=-1)
            cache = cache.at[:, :, pos].set(jnp.stack([k, v]))
            scores = jnp.einsum("bd,bsd->bs", q, cache[0]) / d**0.5
            scores = jnp.where(jnp.arange(cache.shape[2]) <= pos, scores, -jnp.inf)
            x = x + jnp.einsum("bs,bsd->bd", jax.nn.softmax(scores, axis=-1), cache[1]) @ self.wo
            y, _ = (self.moe.reference if dense else self.moe)(rms(x))
            return x + y, cache

    class DecoderLM(eqx.Module):
        embed: jax.Array  # [V, D]
        pos: jax.Array  # [S, D]
        blocks: list
        head: jax.Array  # [D, V]

        def __init__(self, key):
            keys = jax.random.split(key, args.layers + 3)
            self.embed = jax.random.normal(keys[0], (args.vocab, d))
            self.pos = 0.1 * jax.random.normal(keys[1], (max_len, d))
            self.head = jax.random.normal(keys[2], (d, args.vocab)) / d**0.5
            self.blocks = [Block(k) for k in keys[3:]]

        def step(self, tokens, pos, caches, dense=False):
            x = self.embed[tokens] + self.pos[pos]
            new = []
            for block, cache in zip(self.blocks, caches):
                x, cache = block(x, cache, pos, dense)
                new.append(cache)
            return rms(x) @ self.head, new

    def decode(model, prompt, dense=False):
        """prompt: int32 [B] first tokens -> int32 [B, steps] greedy continuations."""
        # Built from the prompt so that inside shard_map the caches vary over ranks like it.
        zero = jnp.zeros_like(prompt, jnp.float32)[None, :, None, None]
        caches = [jnp.zeros((2, prompt.shape[0], max_len, d)) + zero for _ in model.blocks]

        def body(carry, _):
            tokens, pos, caches = carry
            logits, caches = model.step(tokens, pos, caches, dense)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return (nxt, pos + 1, caches), nxt

        _, out = jax.lax.scan(body, (prompt, jnp.int32(0), caches), None, length=args.steps)
        return out.T

    @eqx.filter_jit
    def decode_ep(model, prompt):
        return epx.ep_shard_map(decode, model, prompt, mesh=mesh, in_specs=(P("ep"),), out_specs=P("ep"))

    model = epx.shard_model(DecoderLM(jax.random.key(args.seed)), mesh)
    batch = r * b_local
    prompt_np = np.random.default_rng(args.seed).integers(0, args.vocab, batch).astype(np.int32)
    prompt = jax.make_array_from_callback((batch,), NamedSharding(mesh, P("ep")), lambda i: prompt_np[i])

    print(f"greedy decode: {r} EP ranks on {devices[0].platform}, {batch} sequences ({b_local}/rank), "
          f"{args.steps} steps, {args.layers} layers x {args.experts} experts (top-{args.topk}), "
          f"low-latency mode, backend={args.backend}", flush=True)
    t0 = time.time()
    tokens = jax.block_until_ready(decode_ep(model, prompt))
    compile_s = time.time() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.time()
        tokens = jax.block_until_ready(decode_ep(model, prompt))
        times.append(time.time() - t0)
    best = min(times) if times else compile_s
    label = "CPU (virtual devices)" if devices[0].platform == "cpu" else devices[0].platform
    print(f"first call (compile + run) {compile_s:.2f} s; decode {best * 1e3:.1f} ms for {batch * args.steps} tokens "
          f"= {batch * args.steps / best:.0f} tokens/s on {label}", flush=True)
    if jax.process_count() == 1:
        out = np.asarray(tokens)
        print(f"sequence 0: {prompt_np[0]} -> {out[0].tolist()}", flush=True)
        if args.check:
            local = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)) if eqx.is_array(a) else a, model)  # one device
            dense = np.asarray(eqx.filter_jit(lambda m, p: decode(m, p, dense=True))(local, jnp.asarray(prompt_np)))
            same = int(np.sum(dense == out))
            print(f"check against the dense single-device decode: {same}/{out.size} tokens agree", flush=True)
            if same != out.size:
                raise SystemExit(1)
    return tokens


if __name__ == "__main__":
    main()
