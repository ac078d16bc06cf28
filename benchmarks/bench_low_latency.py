"""Low-latency dispatch/combine benchmark at DeepEP's LL configuration, on R rank processes:

    python -m jax_ep.launch -n 8 benchmarks/bench_low_latency.py --sms 4,8,16 --out OUT_DIR

128 tokens per rank, hidden 7168, top-8 of the expert count nearest 288 that R
divides, FP8 (and BF16) dispatch, BF16 combine. For each SM budget:

* **latency**: per-call wall time (median of ``--reps``) of 64 calls in a
  ``lax.fori_loop`` (a decode loop: XLA's while loop waits on the host
  between iterations) and of 64 calls unrolled in one jit (no host between
  calls), each beside the same loop around a trivial op (what the loop itself
  costs on this machine); and the **steady** time per call: (192 unrolled
  calls - 64 unrolled calls) / 128, which leaves out what a run costs once
  (the program's launch, the ranks' start skew). GB/s by DeepEP's LL counting
  (dispatch: valid (token, expert) pairs x (H + H/128*4 scales + 16) bytes in
  FP8, x 2H in BF16; combine: pairs x 2H) of the steady time.
* **kernel span**: from rank 0's profile, the median over calls of the time
  from a call's first kernel's start to its last kernel's end, waits included
  (how DeepEP times its kernels); the launch gaps between calls are not in it.
* **push dispatch** (``dispatch_pull=False``): the one-call dispatch pushing
  instead of pulling, timed the same ways.
* **push combine** (``combine_zero_copy=False``): the one-call combine
  pushing its rows instead of letting the owners read them in place.
* **FP8 combine** (``combine_fp8``): the same combine with FP8 rows (pushed).
* **send / receive split**: the kernel time of each half, from a profiler
  trace of rank 0 (``jax.profiler``): the send kernels, the receive's wait,
  and the receive's copy.
* **overlap**: a BF16 matmul (``--matmul N``: N x N @ N x N, then tanh and a
  sum) placed between send and receive, against the dispatch (or combine)
  followed by the matmul, each in a fori_loop of 64. With ``async_send`` the
  send runs on its own stream; the profile gives the fraction of send-kernel
  time that ran while a matmul kernel of the same rank was running.

**Virtual nodes** (``--ranks-per-node N``): the ranks in nodes of N, peers in
other nodes reached by NVSHMEM puts (the put path, ``ll_transport="nvshmem"``),
beside the flat NVLink run at the same R (run both: the JSON names carry
``_rpnN``). The put path has no pull / zero-copy / FP8-combine variants, so
those rows are left out. Its **no SM held** check, from rank 0's profile of
the split with the matmul between send and receive: per call, the gap from
the send kernel's end to the receive's first kernel's start
(``*_send_to_recv_gap_us``) against the receive's kernel time (wait + copy,
``*_recv_kernel_us``). The send only issues puts, so while the data moves no
jax_ep kernel runs; once the gap covers the transfer the receive's wait is
short (compare it with the fused call's wait). To read the same from Nsight
Systems instead: ``nsys profile -t cuda --capture-range=cudaProfilerApi``
around one rank and look at the ``ll_put`` kernels on its streams.

Rank 0 first measures the device copy roofline (a 1 GiB device-to-device
copy, alone on the GPU) and reports each steady time's aggregate GB/s (all
R ranks) as a fraction of it. Rank 0 prints the table and writes
OUT_DIR/low_latency_R{R}.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_ep.launch import initialize_distributed  # noqa: E402

info = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_ep  # noqa: E402
from ll_bench_args import parse_args as _parse_args, result_name  # noqa: E402  (benchmarks/ll_bench_args.py)
from roofline import copy_roofline_gbps  # noqa: E402  (benchmarks/roofline.py)
from unrolled import unrolled_loop  # noqa: E402  (benchmarks/unrolled.py)

R, ME = info.num_ranks, info.rank
T = M = 128
H, K = 7168, 8
E = (288 // R) * R
ITERS = 64  # unrolled calls per timed program: the ranks' start skew is spread over them


def parse_args():
    args = _parse_args(num_ranks=R, description=__doc__.split("\n\n")[0])
    if args.no_signatures:
        os.environ["JAX_EP_CALL_SIGNATURES"] = "0"  # read by the extension at its first call
    return args


def inputs(seed):
    rng = np.random.default_rng(seed + 1000 * ME)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.random((T, K)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), jnp.asarray(w)


def loop(fn, iters=ITERS):
    return unrolled_loop(fn, iters)


def _median_us_per_call(f, args, reps, calls):
    """Median over `reps` runs of compiled `f`'s wall time, per call, in us (after a warm-up run)."""
    f(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)) * 1e6


def time_per_call(fn, *args, reps):
    """Per-call wall time of ITERS calls unrolled in one jit."""
    return _median_us_per_call(loop(fn), args, reps, ITERS)


def time_per_call_steady(fn, *args, reps):
    """Device time per call in steady state: (time of 3 x ITERS unrolled calls
    - time of ITERS) / (2 x ITERS), each the median of `reps` runs. The
    difference cancels what a run costs once: the host's launch of the
    program and the ranks' start skew, which the first call's wait absorbs."""
    f1, f2 = loop(fn, ITERS), loop(fn, 3 * ITERS)
    f1(*args).block_until_ready()
    f2(*args).block_until_ready()
    t1, t2 = [], []
    for _ in range(reps):  # alternated, so both see the same machine
        for f, times in ((f1, t1), (f2, t2)):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
    return max(0.0, float(np.median(t2) - np.median(t1))) / (2 * ITERS) * 1e6


def time_per_call_fori(fn, *args, reps, n=64):
    """Per-call wall time of `n` calls in one ``lax.fori_loop`` (a decode loop)."""
    f = jax.jit(lambda *a: jax.lax.fori_loop(0, n, lambda _, acc: acc + fn(*a), jnp.float32(0)))
    return _median_us_per_call(f, args, reps, n)


def first(r):
    return (r[0] if isinstance(r, tuple) else r)[0, 0, 0].astype(jnp.float32)


# --- profile ---------------------------------------------------------------------

KERNELS = {  # phase -> substrings of the kernel names (jax_ep::low_latency::*, jax_ep::ll_put::*)
    "dispatch_send": ("low_latency::(anonymous namespace)::send_kernel", "stage_kernel", "dispatch_send_kernel"),
    "dispatch_wait": ("wait_counts_kernel", "wait_staged_kernel", "dispatch_wait_kernel"),
    "dispatch_copy": ("dispatch_recv_kernel", "dispatch_pull_kernel", "dispatch_pack_kernel"),
    "combine_send": ("combine_send_kernel",),
    "combine_wait": ("wait_flags_kernel", "combine_wait_kernel"),
    "combine_copy": ("combine_recv_kernel", "combine_sum_kernel"),
}


def phase_of(name: str):
    for phase, keys in KERNELS.items():
        if any(k in name for k in keys):
            return phase
    if "jax_ep" in name:
        return "other_jax_ep"
    return "compute"


def gpu_kernels(trace_dir):
    """[(name, start_ns, end_ns)] of every GPU kernel in the trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(files[0])
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                out.append((ev.name, int(ev.start_ns), int(ev.start_ns + ev.duration_ns)))
    return out


def union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def overlap_ns(intervals, cover):
    total = 0
    for s, e in intervals:
        for cs, ce in cover:
            total += max(0, min(e, ce) - max(s, cs))
    return total


def median_call_span(by_phase, kind):
    """Median over the calls of `kind` of the time from a call's first kernel's
    start to its last kernel's end (DeepEP reports its kernels' time alike):
    a call starts at each kernel of its first phase present (the send, or the
    wait where the send launches none)."""
    phases = [f"{kind}_{p}" for p in ("send", "wait", "copy")]
    present = [p for p in phases if by_phase.get(p)]
    if not present:
        return None
    spans, cur = [], None
    for s, e, p in sorted((s, e, p) for p in present for s, e in by_phase[p]):
        if p == present[0]:
            if cur is not None:
                spans.append(cur[1] - cur[0])
            cur = [s, e]
        elif cur is not None:
            cur[1] = max(cur[1], e)
    if cur is not None:
        spans.append(cur[1] - cur[0])
    return float(np.median(spans)) / 1e3


def median_send_to_recv_gap(by_phase, kind):
    """Median over the calls of `kind` of the time from a send kernel's end to
    the next receive kernel's start (wait, else copy): while it lasts no
    jax_ep kernel of the call holds an SM."""
    sends = sorted(by_phase.get(f"{kind}_send", []))
    recvs = sorted(by_phase.get(f"{kind}_wait", []) or by_phase.get(f"{kind}_copy", []))
    gaps, j = [], 0
    for _, send_end in sends:
        while j < len(recvs) and recvs[j][0] < send_end:
            j += 1
        if j == len(recvs):
            break
        gaps.append(recvs[j][0] - send_end)
        j += 1
    return float(np.median(gaps)) / 1e3 if gaps else None


def profile(fn, *args, calls):
    """Kernel time per call of each phase over one traced run of loop(fn), and
    the fraction of send-kernel time that ran beside compute kernels."""
    f = loop(fn)
    f(*args).block_until_ready()
    d = tempfile.mkdtemp(prefix="jax_ep_ll_trace_")
    with jax.profiler.trace(d):
        f(*args).block_until_ready()
    kernels = gpu_kernels(d)
    if not kernels:
        return None
    by_phase: dict[str, list] = {}
    for name, s, e in kernels:
        by_phase.setdefault(phase_of(name), []).append((s, e))
    result = {f"{p}_us": sum(e - s for s, e in iv) / 1e3 / calls for p, iv in by_phase.items() if p != "compute"}
    cover = union(by_phase.get("compute", []))
    for kind in ("dispatch", "combine"):
        sends = by_phase.get(f"{kind}_send", [])
        busy = sum(e - s for s, e in sends)
        if busy and cover:
            result[f"{kind}_send_beside_compute"] = overlap_ns(sends, cover) / busy
    result["compute_us"] = sum(e - s for s, e in by_phase.get("compute", [])) / 1e3 / calls
    for kind in ("dispatch", "combine"):
        span = median_call_span(by_phase, kind)
        if span is not None:
            result[f"{kind}_span_us"] = span
        gap = median_send_to_recv_gap(by_phase, kind)
        if gap is not None:
            result[f"{kind}_send_to_recv_gap_us"] = gap
            result[f"{kind}_recv_kernel_us"] = result.get(f"{kind}_wait_us", 0.0) + result.get(f"{kind}_copy_us", 0.0)
    # The GPU timeline of one call: from its first kernel's start to its last
    # kernel's end, and the time some kernel ran (the rest: gaps, e.g. launches).
    everything = [(s, e) for _, s, e in kernels]
    result["gpu_span_us"] = (max(e for _, e in everything) - min(s for s, _ in everything)) / 1e3 / calls
    result["gpu_busy_us"] = sum(e - s for s, e in union(everything)) / 1e3 / calls
    return result


# --- benchmark -------------------------------------------------------------------


def bench_budget(sms, args):
    rows = []
    x, idx, w = inputs(11)
    n = args.matmul
    rng = np.random.default_rng(ME)
    a = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), jnp.bfloat16)
    pairs = int((np.asarray(idx) >= 0).sum())

    def compute(a):
        return jnp.tanh(a @ a).astype(jnp.float32).sum() * 1e-9

    rpn = args.ranks_per_node
    put = rpn is not None  # the put path: no pull, zero-copy or FP8-combine variants
    for fp8 in (jax_ep.FP8Options(), None):
        buf = jax_ep.Buffer(
            num_experts=E, axis_name=None, num_nvl_bytes=1 << 22, ranks_per_node=rpn,
            num_ll_bytes=jax_ep.low_latency_buffer_bytes(M, H, R, K, E, fp8, ranks_per_node=rpn),
            low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=M, fp8=fp8, backend="cuda",
                                                 num_sms=sms),
            timeout_s=60.0, ll_transport=args.transport)
        sync = dataclasses.replace(buf.low_latency, async_send=False)
        out = jax.jit(lambda x, i: buf.low_latency_dispatch(x, i))(x, idx)
        yb = out.recv_x if fp8 is None else jax_ep.per_token_cast_back(*out.recv_x, fp8, out_dtype=jnp.bfloat16)
        handle = out.handle

        def disp(x, i):
            return first(buf.low_latency_dispatch(x, i).recv_x)

        push = dataclasses.replace(buf.low_latency, dispatch_pull=False)

        def disp_push(x, i):
            return first(buf.low_latency_dispatch(x, i, options=push).recv_x)

        def comb(y, w, h):
            return buf.low_latency_combine(y, w, h)[0, 0].astype(jnp.float32)

        def disp_split(opts):
            def f(x, i, a):
                pending = buf.low_latency_dispatch_send(x, i, options=opts)
                busy = compute(pending.then(a))
                return first(jax_ep.low_latency_dispatch_recv(pending, after=busy).recv_x) + busy
            return f

        def comb_split(async_send):
            h2 = dataclasses.replace(handle, spec=dataclasses.replace(
                handle.spec, options=dataclasses.replace(handle.spec.options, async_send=async_send)))

            def f(y, w, a):
                pending = jax_ep.low_latency_combine_send(y, h2)
                busy = compute(pending.then(a))
                return jax_ep.low_latency_combine_recv(pending, w, after=busy)[0, 0].astype(jnp.float32) + busy
            return f

        reps = args.reps
        row = dict(ranks=R, sms=sms, payload="FP8" if fp8 else "BF16", matmul_n=n, pairs=pairs,
                   transport=args.transport, ranks_per_node=rpn or R,
                   peers=list(buf.low_latency_transports))
        row["trivial_op_loop_us"] = time_per_call(lambda x: x[0, 0].astype(jnp.float32), x, reps=reps)
        row["dispatch_us"] = time_per_call(disp, x, idx, reps=reps)
        row["dispatch_steady_us"] = time_per_call_steady(disp, x, idx, reps=reps)
        row["dispatch_fori_us"] = time_per_call_fori(disp, x, idx, reps=reps)
        row["trivial_op_fori_us"] = time_per_call_fori(lambda x: x[0, 0].astype(jnp.float32), x, reps=reps)
        disp_bytes = pairs * ((H + H / 128 * 4 + 16) if fp8 else 2 * H)
        row["dispatch_gbps"] = disp_bytes / row["dispatch_steady_us"] / 1e3
        if not put:
            row["dispatch_push_us"] = time_per_call(disp_push, x, idx, reps=reps)
            row["dispatch_push_fori_us"] = time_per_call_fori(disp_push, x, idx, reps=reps)
        if fp8 is not None:  # BF16 combine once per budget
            row["combine_us"] = time_per_call(comb, yb, w, handle, reps=reps)
            row["combine_steady_us"] = time_per_call_steady(comb, yb, w, handle, reps=reps)
            row["combine_gbps"] = pairs * 2 * H / row["combine_steady_us"] / 1e3
            row["combine_fori_us"] = time_per_call_fori(comb, yb, w, handle, reps=reps)
            row["combine_zero_copy"] = buf.low_latency_zero_copy
        if fp8 is not None and not put:
            hp = dataclasses.replace(handle, spec=dataclasses.replace(
                handle.spec, options=dataclasses.replace(handle.spec.options, combine_zero_copy=False)))
            row["combine_push_us"] = time_per_call(comb, yb, w, hp, reps=reps)
            row["combine_push_fori_us"] = time_per_call_fori(comb, yb, w, hp, reps=reps)
            h8 = dataclasses.replace(handle, spec=dataclasses.replace(
                handle.spec, options=dataclasses.replace(handle.spec.options, combine_fp8=True)))
            row["combine_fp8_us"] = time_per_call(comb, yb, w, h8, reps=reps)
            row["combine_fp8_fori_us"] = time_per_call_fori(comb, yb, w, h8, reps=reps)
        if not args.no_overlap:  # in fori_loops: steadier than the unrolled loops
            t = functools.partial(time_per_call_fori, reps=reps)
            row["matmul_us"] = t(compute, a)
            row["dispatch_then_matmul_us"] = t(lambda x, i, a: disp(x, i) + compute(a), x, idx, a)
            row["matmul_between_sync_us"] = t(disp_split(sync), x, idx, a)
            row["matmul_between_async_us"] = t(disp_split(buf.low_latency), x, idx, a)
            if fp8 is not None:
                row["combine_then_matmul_us"] = t(lambda y, w, h, a: comb(y, w, h) + compute(a), yb, w, handle, a)
                row["combine_matmul_between_sync_us"] = t(comb_split(False), yb, w, a)
                row["combine_matmul_between_async_us"] = t(comb_split(True), yb, w, a)
        if not args.no_profile:
            # Every rank runs the traced loops (the peers must take part); rank 0's trace is kept.
            def both(dispatch_run, combine_run):
                got = dict(profile(*dispatch_run, calls=ITERS) or {})
                if fp8 is not None:
                    for k, v in (profile(*combine_run, calls=ITERS) or {}).items():
                        if k.startswith("combine"):
                            got[k] = v
                        elif k.startswith("gpu_"):
                            got["combine_" + k] = v
                return got

            prof = dict(fused=both((disp, x, idx), (comb, yb, w, handle)))
            if not args.no_overlap:
                prof["async_send"] = both((disp_split(buf.low_latency), x, idx, a), (comb_split(True), yb, w, a))
            row["profile_rank0"] = prof if prof["fused"] else "no GPU kernels in the trace"
        rows.append(row)
        buf.destroy()
        if ME == 0:
            print(json.dumps(row), flush=True)
    return rows


def summarize(rows):
    rpn = rows[0]["ranks_per_node"]
    nodes = f", {R // rpn} virtual nodes of {rpn} (put path)" if rpn != R else ""
    print(f"\nlow latency, R = {R}{nodes}, T = {T}, H = {H}, top-{K} of {E} experts, "
          f"device {jax.devices()[0].device_kind}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| SMs | payload | dispatch us: steady / 64 unrolled / fori_loop / kernel span (GB/s per rank; "
          "R ranks over the copy roofline) | combine us (same) | loop floor us: unrolled / fori_loop | "
          "push dispatch, push combine, FP8 combine us: unrolled / fori_loop | send / wait / copy us (profile) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    nan = float("nan")
    for r in rows:
        prof = r.get("profile_rank0", {})
        f = prof.get("fused", {}) if isinstance(prof, dict) else {}
        split = " / ".join(f"{f.get(k, nan):.0f}" for k in ("dispatch_send_us", "dispatch_wait_us", "dispatch_copy_us"))
        if "combine_wait_us" in f:
            split += "; combine " + " / ".join(f"{f.get(k, nan):.0f}" for k in ("combine_send_us", "combine_wait_us", "combine_copy_us"))

        def cell(op):
            if f"{op}_us" not in r:
                return "-"
            return (f"{r[f'{op}_steady_us']:.0f} / {r[f'{op}_us']:.0f} / {r[f'{op}_fori_us']:.0f} / "
                    f"{f.get(f'{op}_span_us', nan):.0f} ({r[f'{op}_gbps']:.0f}; {r.get(f'{op}_roofline_fraction', nan):.2f})")

        others = (f"{r['dispatch_push_us']:.0f} / {r['dispatch_push_fori_us']:.0f}" if "dispatch_push_us" in r
                  else "- (put path)")
        if "combine_push_us" in r:
            others += (f", {r['combine_push_us']:.0f} / {r['combine_push_fori_us']:.0f}"
                       f" (zero copy {'on' if r['combine_zero_copy'] else 'OFF'})")
        if "combine_fp8_us" in r:
            others += f", {r['combine_fp8_us']:.0f} / {r['combine_fp8_fori_us']:.0f}"
        print(f"| {r['sms']} | {r['payload']} | {cell('dispatch')} | {cell('combine')} | "
              f"{r['trivial_op_loop_us']:.0f} / {r['trivial_op_fori_us']:.0f} | {others} | {split} |")
    if "matmul_us" not in rows[0]:
        return
    print("\n| SMs | payload | op | send-to-receive gap us | receive kernel us (wait + copy) | fused call's wait us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        prof = r.get("profile_rank0", {})
        a = prof.get("async_send", {}) if isinstance(prof, dict) else {}
        f = prof.get("fused", {}) if isinstance(prof, dict) else {}
        for kind in ("dispatch", "combine"):
            if f"{kind}_send_to_recv_gap_us" in a:
                print(f"| {r['sms']} | {r['payload']} | {kind} | {a[f'{kind}_send_to_recv_gap_us']:.0f} | "
                      f"{a[f'{kind}_recv_kernel_us']:.0f} | {f.get(f'{kind}_wait_us', nan):.0f} |")
    print("\n| SMs | payload | matmul us | dispatch then matmul | between, XLA stream | between, send stream | send beside matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        prof = r.get("profile_rank0", {})
        a = prof.get("async_send", {}) if isinstance(prof, dict) else {}
        frac = a.get("dispatch_send_beside_compute")
        print(f"| {r['sms']} | {r['payload']} | {r['matmul_us']:.0f} | {r['dispatch_then_matmul_us']:.0f} | "
              f"{r['matmul_between_sync_us']:.0f} | {r['matmul_between_async_us']:.0f} | "
              f"{'-' if frac is None else f'{frac:.2f}'} |")
        if "combine_us" in r:
            frac = a.get("combine_send_beside_compute")
            print(f"| {r['sms']} | combine | {r['matmul_us']:.0f} | {r['combine_then_matmul_us']:.0f} | "
                  f"{r['combine_matmul_between_sync_us']:.0f} | {r['combine_matmul_between_async_us']:.0f} | "
                  f"{'-' if frac is None else f'{frac:.2f}'} |")


def barrier(name):
    if R > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(f"bench_ll/{name}", 600_000)


def add_roofline_fractions(rows, roof_gbps):
    """Aggregate GB/s of all R ranks (DeepEP's counting, steady time) over
    the device copy roofline. A copy reads and writes each byte; the
    zero-copy combine only reads its rows (and writes the sums)."""
    for row in rows:
        for op in ("dispatch", "combine"):
            if f"{op}_gbps" in row:
                row[f"{op}_aggregate_gbps"] = R * row[f"{op}_gbps"]
                row[f"{op}_roofline_fraction"] = R * row[f"{op}_gbps"] / roof_gbps


def main():
    args = parse_args()
    roof_gbps = None
    if ME == 0:  # alone on the GPU: before any rank's buffers or loops
        roof_gbps, roof_t = copy_roofline_gbps()
        print(f"device copy roofline: {roof_gbps:.0f} GB/s payload (1 GiB in {roof_t * 1e6:.0f} us)", flush=True)
    barrier("roofline")
    rows = []
    for sms in args.sms_list:
        rows += bench_budget(sms, args)
    if ME == 0:
        add_roofline_fractions(rows, roof_gbps)
        summarize(rows)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, result_name(R, args.ranks_per_node))
            with open(path, "w") as f:
                json.dump(dict(device=str(jax.devices()[0].device_kind), ranks=R, tokens=T, hidden=H, topk=K,
                               ranks_per_node=args.ranks_per_node or R, transport=args.transport,
                               roofline_gbps=roof_gbps,
                               experts=E, note=f"per-call wall time over {ITERS} back-to-back calls in one jit "
                                               f"(*_us), in a fori_loop (*_fori_us), steady ((3 x {ITERS} calls - "
                                               f"{ITERS} calls) / {2 * ITERS}, *_steady_us), median of the repetitions; "
                                               "profile: rank 0's kernel time per call and median call span",
                               results=rows), f, indent=1)
            print(f"wrote {path}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
