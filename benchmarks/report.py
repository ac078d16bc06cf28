"""Turn the benchmark JSON (docs/benchmarks/intranode_R*.json,
low_latency_R*.json and internode_R*_rpn*.json) into the markdown tables of
docs/benchmarks/README.md and plots (intranode.png, low_latency.png,
internode.png).

    python benchmarks/report.py docs/benchmarks
"""

import glob
import json
import os
import sys

# DeepEP V1 on the same harness (one H100, R processes under MPS, 4096 tokens,
# hidden 7168, top-8 of 256 experts; handle-reusing dispatch): fraction of the
# device copy bandwidth, and the SMs per rank it used.
DEEPEP = {
    8: dict(sms=16, dispatch_bf16=0.50, dispatch_fp8=0.48, combine_bf16=0.56, layout_us=63),
    4: dict(sms=24, dispatch_bf16=0.43, dispatch_fp8=0.52, combine_bf16=0.52, layout_us=44),
    2: dict(sms=24, dispatch_bf16=0.39, dispatch_fp8=0.29, combine_bf16=0.30, layout_us=42),
}
OPS = ["layout", "dispatch_bf16", "dispatch_fp8", "cached_dispatch_bf16", "cached_dispatch_fp8", "combine_bf16"]


def load(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "intranode_R*.json"))):
        d = json.load(open(path))
        runs[d["results"][0]["ranks"]] = d
    return runs


def table(runs):
    lines = ["| R | SMs/rank | op | time per call (us) | aggregate GB/s | fraction of copy roofline | DeepEP fraction |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, reverse=True):
        for row in runs[r]["results"]:
            base = DEEPEP.get(r, {})
            ref = {"cached_dispatch_bf16": "dispatch_bf16", "cached_dispatch_fp8": "dispatch_fp8",
                   "combine_bf16": "combine_bf16"}.get(row["op"])
            deep = f"{base[ref]:.2f} ({base['sms']} SMs)" if ref and ref in base else (
                f"{base['layout_us']} us" if row["op"] == "layout" and base else "")
            gbps = f"{row['aggregate_gbps']:.0f}" if "aggregate_gbps" in row else ""
            frac = f"{row['roofline_fraction']:.2f}" if "roofline_fraction" in row else ""
            lines.append(f"| {r} | {row['sms_per_rank']} | {row['op']} | {row['time_us']:.1f} | {gbps} | {frac} | {deep} |")
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ["dispatch_bf16", "dispatch_fp8", "cached_dispatch_bf16", "cached_dispatch_fp8", "combine_bf16"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), sharey=True)
    for ax, r in zip(axes, sorted(runs)):
        best = {}
        for row in runs[r]["results"]:
            if row["op"] in ops:
                best[row["op"]] = max(best.get(row["op"], 0), row["roofline_fraction"])
        ax.bar(range(len(ops)), [best.get(o, 0) for o in ops], color="tab:blue", label="jax_ep (best SM budget)")
        deep = DEEPEP.get(r, {})
        # DeepEP's dispatch figures are handle-reusing: compare them with cached dispatch.
        ref = [deep.get(o.replace("cached_", "")) if o.startswith(("cached", "combine")) else None for o in ops]
        ax.scatter(range(len(ops)), [v if v else float("nan") for v in ref], color="tab:red", zorder=3, label="DeepEP V1")
        ax.set_xticks(range(len(ops)), [o.replace("_", "\n", 1) for o in ops], fontsize=8)
        ax.set_title(f"R = {r} ranks on one H100")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("fraction of device copy bandwidth")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# DeepEP's published low-latency figures (EP8 over NVLink, H800; 128 tokens,
# hidden 7168, top-8): the bar of the low-latency mode.
DEEPEP_LL_US = dict(dispatch=77, combine=114)


def load_ll(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "low_latency_R*.json"))):
        d = json.load(open(path))
        if "ranks" in d:  # benchmarks/bench_low_latency.py's format
            runs[d["ranks"]] = d
    return runs


def ll_table(runs):
    lines = ["| R | SMs/rank | payload | dispatch us: steady / unrolled / fori_loop / kernel span (of copy roofline) | "
             "combine us: steady / unrolled / fori_loop / kernel span (of copy roofline) | "
             "push combine us: unrolled / fori_loop | loop floor us: unrolled / fori_loop |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for r in sorted(runs, reverse=True):
        for row in runs[r]["results"]:
            prof = row.get("profile_rank0", {})
            span = prof.get("fused", {}) if isinstance(prof, dict) else {}

            def cell(op):
                if f"{op}_us" not in row:
                    return ""
                frac = f" ({row[op + '_roofline_fraction']:.2f})" if op + "_roofline_fraction" in row else ""
                return (f"{row.get(op + '_steady_us', nan):.0f} / {row[op + '_us']:.0f} / {row[op + '_fori_us']:.0f} / "
                        f"{span.get(op + '_span_us', nan):.0f}{frac}")

            push = (f"{row['combine_push_us']:.0f} / {row['combine_push_fori_us']:.0f}"
                    if "combine_push_us" in row else "")
            lines.append(f"| {r} | {row['sms']} | {row['payload']} | {cell('dispatch')} | {cell('combine')} | {push} | "
                         f"{row['trivial_op_loop_us']:.0f} / {row['trivial_op_fori_us']:.0f} |")
    return "\n".join(lines)


def ll_plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, op in zip(axes, ("dispatch", "combine")):
        for r in sorted(runs):
            rows = [x for x in runs[r]["results"] if x["payload"] == "FP8" and f"{op}_fori_us" in x]
            rows.sort(key=lambda x: x["sms"])
            line, = ax.plot([x["sms"] for x in rows], [x[f"{op}_fori_us"] for x in rows], marker="o",
                            label=f"R = {r}")
            steady = [x for x in rows if f"{op}_steady_us" in x]
            ax.plot([x["sms"] for x in steady], [x[f"{op}_steady_us"] for x in steady], marker="x", linestyle=":",
                    color=line.get_color())
        ax.axhline(DEEPEP_LL_US[op], color="black", linestyle="--", label="DeepEP EP8 (8 GPUs)")
        ax.set_title(f"{'FP8 dispatch' if op == 'dispatch' else 'BF16 combine'}, R ranks on one H100")
        ax.set_xlabel("SMs per rank")
        ax.set_xscale("log", base=2)
    axes[0].set_ylabel("us per call: fori_loop of 64 (o), steady unrolled (x)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def load_internode(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "internode_R*_rpn*.json"))):
        d = json.load(open(path))
        r = d["results"][0]
        runs[(r["ranks"], r["ranks_per_node"])] = d
    return runs


def internode_table(runs):
    lines = ["| R (nodes x ranks) | channels | op | time per call (us) | RDMA-leg GB/s | NVLink-leg GB/s | "
             "crossings saved vs flat |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (r, el), d in sorted(runs.items()):
        for row in d["results"]:
            lines.append(f"| {r} ({r // el}x{el}) | {d.get('num_channels', '')} | {row['op']} | {row['time_us']:.1f} | "
                         f"{row['rdma_gbps']:.1f} | {row['nvl_gbps']:.1f} | {d['crossings_saved']:.0%} |")
    return "\n".join(lines)


def internode_plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(runs)
    ops = ["dispatch_fp8", "dispatch_bf16", "combine_bf16"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(keys)
    for j, (r, el) in enumerate(keys):
        rows = {row["op"]: row for row in runs[(r, el)]["results"]}
        ax.bar([i + j * width for i in range(len(ops))], [rows[o]["time_us"] if o in rows else 0 for o in ops],
               width, label=f"R = {r} ({r // el}x{el} virtual nodes)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))], ops)
    ax.set_ylabel("time per call (us)")
    ax.set_title(f"internode normal mode, one {runs[keys[0]]['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(folder):
    runs = load(folder)
    if runs:
        print(table(runs))
    ll = load_ll(folder)
    if ll:
        print()
        print(ll_table(ll))
    inter = load_internode(folder)
    if inter:
        print()
        print(internode_table(inter))
    try:
        if inter:
            internode_plot(inter, os.path.join(folder, "internode.png"))
            print(f"plot: {os.path.join(folder, 'internode.png')}")
        if runs:
            plot(runs, os.path.join(folder, "intranode.png"))
            print(f"\nplot: {os.path.join(folder, 'intranode.png')}")
        if ll:
            ll_plot(ll, os.path.join(folder, "low_latency.png"))
            print(f"plot: {os.path.join(folder, 'low_latency.png')}")
    except ImportError:
        print("\n(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
