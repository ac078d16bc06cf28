"""Soak: many dispatch + combine pairs in a row on R rank processes, every
step's outputs hashed on the device.

    python -m jax_ep.launch -n 4 --timeout 900 tests/gpu/soak.py --mode normal --pairs 1000
    python -m jax_ep.launch -n 8 --timeout 900 tests/gpu/soak.py --mode low_latency --pairs 10000

``--mode normal`` runs ``--pairs`` pairs of ``dispatch`` + ``combine`` in
each layout (rank-major, then expert-major), ``--mode low_latency`` pairs of
``low_latency_dispatch`` + ``low_latency_combine``; DeepEP's shapes by default
(normal: 4096 tokens per rank, hidden 7168, top-8 of 256 experts; low
latency: 128 tokens, hidden 7168, top-8 of 288), BF16.

Two input sets alternate (set 0 on even steps, set 1 on odd ones), so every
call follows a call with other routing. Each step's outputs are reduced on
the device to checksums (``checksum``: two uint32 words per output), fetched
every step; every step's checksums must equal those of its set's first step
(``HashLog``). Data that the contract leaves unspecified (low-latency rows
past an expert's count) is zeroed before hashing.

Reports each mismatch with its step and the outputs that differ, an error
(a kernel timeout raises ``CommunicationError`` naming the peer) with its
step, and progress every ``--report-every`` steps (so a run killed by the
launcher's ``--timeout`` shows the last step reached). Past ``--budget-s``
seconds (rank 0's clock, checked every 100 steps, its word passed to the
others through jax.distributed's key-value store so that every rank stops at
the same step) it stops and says how many steps ran. Exit status: 0 every step
matched (also when the budget cut the run short: it says so), 1 a mismatch,
2 an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NORMAL_OUTPUTS = ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert",
                  "recv_src_rank", "recv_src_token", "combined")
LL_OUTPUTS = ("recv_x", "recv_count", "recv_src_rank", "recv_src_token", "recv_src_slot", "combined")


def _words(a):
    """Any array -> uint32 [N], one word per element (its bits, zero-extended)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(a)
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32).ravel()
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    return jax.lax.bitcast_convert_type(a, bits).astype(jnp.uint32).ravel()


def checksum(leaves):
    """uint32 [len(leaves), 2]: two position-weighted sums (mod 2**32) of each
    array's bits. Any single flipped bit changes the first word (it moves the
    sum by an odd multiple of a power of two below 2**32); a permutation of
    the elements changes it unless the weights happen to agree."""
    import jax.numpy as jnp

    out = []
    for leaf in leaves:
        w = _words(leaf)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        a = jnp.sum(w * ((i * jnp.uint32(2654435761)) | jnp.uint32(1)), dtype=jnp.uint32)
        rot = (w << jnp.uint32(13)) | (w >> jnp.uint32(19))
        b = jnp.sum(rot * ((i * jnp.uint32(2246822519)) | jnp.uint32(1)), dtype=jnp.uint32)
        out.append(jnp.stack([a, b]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


class HashLog:
    """Each input set's first checksums, and every later step's mismatches.

    ``record(step, key, sums)`` takes a step's ``uint32 [n, 2]`` checksums
    for input set ``key``: the first step of a set sets its reference, every
    later one must equal it. ``mismatches`` lists ``dict(step, key,
    reference_step, outputs)`` with the names of the outputs that differ.
    """

    def __init__(self, names):
        self.names = tuple(names)
        self.reference = {}
        self.mismatches = []
        self.steps = 0

    def record(self, step: int, key, sums) -> bool:
        sums = np.asarray(sums)
        self.steps += 1
        if key not in self.reference:
            self.reference[key] = (step, sums.copy())
            return True
        ref_step, ref = self.reference[key]
        if np.array_equal(ref, sums):
            return True
        bad = [self.names[i] for i in range(len(self.names)) if not np.array_equal(ref[i], sums[i])]
        self.mismatches.append(dict(step=step, key=key, reference_step=ref_step, outputs=bad))
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("normal", "low_latency"), default="normal")
    p.add_argument("--pairs", type=int, default=None,
                   help="dispatch + combine pairs (per layout in normal mode); default 1000 normal, 10000 low latency")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 4096 normal, 128 low latency)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=None, help="default 256 normal, 288 low latency")
    p.add_argument("--budget-s", type=float, default=600.0, help="stop after this many seconds of stepping")
    p.add_argument("--report-every", type=int, default=500)
    p.add_argument("--max-report", type=int, default=20, help="mismatches printed in full")
    args = p.parse_args(argv)
    ll = args.mode == "low_latency"
    args.pairs = args.pairs if args.pairs is not None else (10000 if ll else 1000)
    args.tokens = args.tokens if args.tokens is not None else (128 if ll else 4096)
    args.experts = args.experts if args.experts is not None else (288 if ll else 256)
    return args


def soak(step, inputs, names, pairs, budget_s, report_every, what, say, agree=None, check_every=100):
    """Run ``step(*inputs[s % 2])`` for ``s < pairs``; returns ``(HashLog,
    steps run, error or None)``. ``step`` returns the checksums.

    Every ``check_every`` steps ``agree(s, over_budget)`` says whether all
    ranks stop (they must stop at the same step: a rank that goes on would
    wait for the others until its kernels time out); default: this rank's
    own clock."""
    log = HashLog(names)
    t0 = time.monotonic()
    agree = agree or (lambda s, over: over)
    for s in range(pairs):
        if s and s % check_every == 0 and agree(s, time.monotonic() - t0 > budget_s):
            say(f"{what}: time budget of {budget_s:g} s reached after {s} of {pairs} steps")
            return log, s, None
        try:
            sums = np.asarray(step(*inputs[s % 2]))
        except Exception as err:  # e.g. CommunicationError: a peer did not answer in time
            return log, s, f"{what}: step {s} failed: {type(err).__name__}: {str(err).splitlines()[0][:400]}"
        if not log.record(s, s % 2, sums) and len(log.mismatches) == 1:
            m = log.mismatches[0]
            say(f"{what}: first mismatch at step {s} (set {m['key']}, reference step {m['reference_step']}): "
                f"{', '.join(m['outputs'])}")
        if report_every and (s + 1) % report_every == 0:
            say(f"{what}: {s + 1}/{pairs} steps, {time.monotonic() - t0:.1f} s, {len(log.mismatches)} mismatch(es)")
    return log, pairs, None


def rank0_decides(what: str, rank: int, timeout_s: float = 300.0):
    """``agree`` for ``soak`` over jax.distributed's key-value store: rank 0's
    clock decides, the others read its word for that step."""
    from jax_ep.runtime import _kv_client

    client = _kv_client()

    def agree(s, over_budget):
        key = f"jax_ep/soak/{what}/{s}"
        if rank == 0:
            client.key_value_set(key, "stop" if over_budget else "go")
            return over_budget
        return client.blocking_key_value_get(key, int(timeout_s * 1000)) == "stop"

    return agree


def main(argv=None) -> int:
    args = parse_args(argv)
    from jax_ep.launch import initialize_distributed

    info = initialize_distributed()
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    import jax_ep

    r, me = info.num_ranks, info.rank
    t, h, k, e = args.tokens, args.hidden, args.topk, args.experts

    def say(msg):
        print(f"[soak R={r} rank {me}] {msg}", flush=True)

    if e % r:
        say(f"SKIP: {e} experts do not split over {r} ranks")
        return 0

    def inputs(seed):
        rng = np.random.default_rng(seed * 1000 + me)
        idx = np.argsort(rng.random((t, e)), axis=-1)[:, :k].astype(np.int32)
        idx = np.where(rng.random(idx.shape) < 0.05, -1, idx).astype(np.int32)
        x = rng.standard_normal((t, h)).astype(ml_dtypes.bfloat16)
        w = rng.random((t, k)).astype(np.float32)
        return tuple(jax.device_put(a, jax.local_devices()[0]) for a in (x, idx, w))

    sets = [inputs(1), inputs(2)]
    runs = []
    if args.mode == "normal":
        for layout in ("rank_major", "expert_major"):
            align = 1 if layout == "rank_major" else 128
            cap = r * t if layout == "rank_major" else r * t * min(k, e // r) + (e // r) * (align - 1)
            buf = jax_ep.Buffer(num_experts=e, axis_name=None, timeout_s=60.0,
                                num_nvl_bytes=jax_ep.intranode_buffer_bytes(t, h, r, k, e, capacity=cap),
                                normal=jax_ep.NormalOptions(backend="cuda", num_sms=max(8, 96 // r)))
            opts = jax_ep.NormalOptions(layout=layout, expert_alignment=align, backend="cuda",
                                        num_sms=buf.normal.num_sms, buffer_id=buf.normal.buffer_id)

            @jax.jit
            def step(x, i, w, buf=buf, opts=opts):
                o = buf.dispatch(x, i, w, options=opts)
                back = buf.combine(o.recv_x, o.handle)
                return checksum([o.recv_x, o.recv_topk_idx, o.recv_topk_weights, o.num_recv_tokens_per_expert,
                                 o.handle.recv_src_rank, o.handle.recv_src_token, back])

            runs.append((f"normal {layout}", step, NORMAL_OUTPUTS, buf))
    else:
        buf = jax_ep.Buffer(
            num_experts=e, axis_name=None, num_nvl_bytes=1 << 22, timeout_s=60.0,
            num_ll_bytes=jax_ep.low_latency_buffer_bytes(t, h, r, k, e),
            low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=t, backend="cuda",
                                                 num_sms=max(4, 64 // r)))

        @jax.jit
        def step(x, i, w):
            o = buf.low_latency_dispatch(x, i)
            out = buf.low_latency_combine(o.recv_x, w, o.handle)
            # Rows past an expert's count are unspecified: zero them before hashing.
            live = jnp.arange(o.recv_x.shape[1])[None, :] < o.recv_count[:, None]
            recv = jnp.where(live[..., None], o.recv_x, jnp.zeros((), o.recv_x.dtype))
            hd = o.handle
            return checksum([recv, o.recv_count, hd.recv_src_rank, hd.recv_src_token,
                             jnp.where(live, hd.recv_src_slot, -1), out])

        runs.append(("low_latency", step, LL_OUTPUTS, buf))

    status = 0
    for what, step, names, buf in runs:
        t0 = time.monotonic()
        say(f"{what}: {args.pairs} pairs, T={t} H={h} K={k} E={e}")
        log, done, error = soak(step, sets, names, args.pairs, args.budget_s, args.report_every, what, say,
                                agree=rank0_decides(what, me) if r > 1 else None)
        for m in log.mismatches[:args.max_report]:
            say(f"{what}: MISMATCH step {m['step']} (set {m['key']}, reference step {m['reference_step']}): "
                f"{', '.join(m['outputs'])}")
        if error:
            say(f"FAIL {error}")
            status = 2
        elif log.mismatches:
            say(f"FAIL {what}: {len(log.mismatches)} of {done} steps differ from their set's first step")
            status = max(status, 1)
        else:
            say(f"PASS {what}: {done} steps{'' if done == args.pairs else f' (of {args.pairs}: budget)'}, "
                f"every step's outputs equal its set's first, {time.monotonic() - t0:.1f} s")
        if error:
            break  # the peers are gone or stuck: no further run can start
        buf.destroy()
    return status


if __name__ == "__main__":
    sys.exit(main())
