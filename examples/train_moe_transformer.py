"""Train a small MoE transformer with expert parallelism (Flax NNX + optax + jax_ep).

The model: token + position embeddings, ``--layers`` blocks of (RMSNorm,
causal self-attention, RMSNorm, ``jax_ep.flax.MoE``), RMSNorm, LM head. The
batch is split over the ``ep`` mesh axis (data parallel) and so are the
experts (expert parallel): every rank holds ``E/R`` experts of each MoE layer
and the replicated rest. The whole model call runs inside ``jax.shard_map``
through ``jax_ep.flax.ep_shard_map``; the loss is next-token cross-entropy
plus ``--aux-coef`` times the load-balancing loss.

The data is synthetic (no downloads): sequences of a random Markov chain over
``--vocab`` tokens where each token has two equally likely successors, so the
best achievable loss is ln 2 = 0.693 (from ln(vocab) for a uniform guess).

On a machine without GPUs (the default) it runs on 8 virtual CPU devices with
the pure-JAX ``xla`` backend:

    python examples/train_moe_transformer.py [--steps 60]

On NVIDIA Hopper GPUs, with jax_ep's CUDA kernels (one process per GPU, normal
mode): ``python -m jax_ep.launch -n 8 examples/train_moe_transformer.py
--backend cuda``. This needs one GPU per rank: the loss and the optimizer use
XLA's own collectives, which NCCL refuses between ranks that share a GPU
(examples/decode_loop.py has none and runs with ranks sharing one GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="EP ranks (devices on the ep axis); xla backend only")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-per-rank", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ffn", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--aux-coef", type=float, default=1e-2)
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="receive buffers for this multiple of the expected load, overflow in further rounds "
                        "(default: worst-case buffers)")
    p.add_argument("--backend", default="xla", choices=["xla", "cuda"],
                   help="xla: pure JAX, any platform; cuda: jax_ep's kernels (run under python -m jax_ep.launch)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup_platform(args):
    """CPU: expose --ranks virtual devices. CUDA: one rank process per GPU."""
    if args.backend == "cuda":
        from jax_ep.launch import initialize_distributed

        initialize_distributed()
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu" and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.ranks}"


def main(argv=None):
    args = parse_args(argv)
    setup_platform(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    import jax_ep.flax as epx

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    if args.backend == "cuda":
        devices = jax.devices()  # one per rank process
    else:
        if len(jax.devices()) < args.ranks:
            raise SystemExit(f"--ranks {args.ranks} needs {args.ranks} devices, found {len(jax.devices())}")
        devices = jax.devices()[: args.ranks]
    r = len(devices)
    mesh = jax.make_mesh((r,), ("ep",), devices=devices, axis_types=(jax.sharding.AxisType.Explicit,))
    tokens_per_rank = args.batch_per_rank * args.seq
    buffer = None
    moe_cfg = epx.MoEConfig(num_experts=args.experts, hidden=args.dim, ffn=args.ffn, topk=args.topk,
                            activation="swiglu", mode="normal", backend=args.backend, expert_alignment=8,
                            capacity_factor=args.capacity_factor)
    if args.backend == "cuda":
        buffer = jax_ep.Buffer(
            num_experts=args.experts, axis_name="ep", normal=jax_ep.NormalOptions(backend="cuda"),
            num_nvl_bytes=jax_ep.intranode_buffer_bytes(tokens_per_rank, args.dim, r, args.topk, args.experts),
        )
        moe_cfg = dataclasses.replace(moe_cfg, buffer_id=buffer.normal.buffer_id)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1 = nnx.RMSNorm(args.dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(args.heads, args.dim, decode=False, rngs=rngs)
            self.norm2 = nnx.RMSNorm(args.dim, rngs=rngs)
            self.moe = epx.MoE(moe_cfg, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x), is_causal=True)
            y, aux = self.moe(self.norm2(x))  # [B, S, H] on this rank; experts via jax_ep
            return x + y, aux

    class Transformer(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(args.vocab, args.dim, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (args.seq, args.dim)))
            self.blocks = nnx.List([Block(rngs) for _ in range(args.layers)])
            self.norm = nnx.RMSNorm(args.dim, rngs=rngs)
            self.head = nnx.Linear(args.dim, args.vocab, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
            aux = 0.0
            for block in self.blocks:
                x, a = block(x)
                aux = aux + a
            return self.head(self.norm(x)), aux

    model = Transformer(nnx.Rngs(args.seed))
    epx.shard_model(model, mesh)
    # Under the mesh, the optimizer's step counters start on it (replicated),
    # where the first update leaves them: the step compiles once.
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            def local(model, tokens):  # one rank: [B/R, S+1] tokens, E/R experts per layer
                logits, aux = model(tokens[:, :-1])
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
                return ce[None], aux

            ce, aux = epx.ep_shard_map(local, model, tokens, mesh=mesh, in_specs=(P("ep"),),
                                       out_specs=(P("ep"), P()))
            ce = jnp.mean(ce)
            return ce + args.aux_coef * aux, (ce, aux)

        (_, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce, aux

    # Synthetic Markov chain: each token has two successors, picked at random.
    rng = np.random.default_rng(args.seed)
    succ = rng.integers(0, args.vocab, (args.vocab, 2))
    batch = r * args.batch_per_rank
    sharding = NamedSharding(mesh, P("ep"))

    def sample_batch():
        seqs = np.empty((batch, args.seq + 1), np.int32)
        seqs[:, 0] = rng.integers(0, args.vocab, batch)
        coins = rng.integers(0, 2, (batch, args.seq))
        for i in range(args.seq):
            seqs[:, i + 1] = succ[seqs[:, i], coins[:, i]]
        return jax.make_array_from_callback(seqs.shape, sharding, lambda index: seqs[index])

    platform = devices[0].platform
    print(f"MoE transformer: {r} EP ranks on {platform}, {args.layers} layers, {args.experts} experts (top-{args.topk}) "
          f"per layer, {batch}x{args.seq} tokens/step, backend={args.backend}; "
          f"uniform loss ln({args.vocab})={math.log(args.vocab):.3f}, best ln2=0.693", flush=True)
    start = time.time()
    losses = []
    steps = range(args.steps)
    bar = tqdm(steps, desc="train", disable=jax.process_index() != 0) if tqdm is not None else None
    for step in (bar if bar is not None else steps):
        ce, aux = train_step(model, optimizer, sample_batch())
        losses.append(float(ce))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", aux=f"{float(aux):.3f}")
        elif step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  aux {float(aux):.3f}", flush=True)
    elapsed = time.time() - start
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps ({elapsed:.1f} s)", flush=True)
    if buffer is not None:
        buffer.destroy()
    return losses


if __name__ == "__main__":
    main()
