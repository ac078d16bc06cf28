"""Compare the benchmark JSON of two trees run in the same GPU session (scripts/ab_bench.sh):

    python benchmarks/ab_compare.py RUNS_DIR [--json SUMMARY.json] [--md TABLE.md]

RUNS_DIR holds one folder per configuration and run, ``RUNS_DIR/<config>/<tree>_r<round>/``
(``tree``: ``base``, ``head``, or another tree such as ``base2`` or ``nosig``), each with the JSON that benchmarks/bench_low_latency.py
(``low_latency_R{R}.json``) or benchmarks/bench_intranode.py (``intranode_R{R}.json``) wrote
with ``--out``. Every time both trees report for the same (benchmark, R, SM budget, op, timing)
becomes one row: the median over the rounds of each tree, and each tree over base (above 1:
slower than base). Standard library only, so it runs wherever the benchmarks run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys

TREES = ("base", "head")

# Low-latency row keys (per-call microseconds) -> (op, timing). "{p}" is the row's dispatch
# payload (FP8 or BF16); the combine runs once per budget, in the FP8 row, on BF16 rows.
LL_METRICS = {
    "dispatch_us": ("dispatch {p}", "64 unrolled"),
    "dispatch_steady_us": ("dispatch {p}", "steady"),
    "dispatch_fori_us": ("dispatch {p}", "fori_loop"),
    "combine_us": ("combine BF16", "64 unrolled"),
    "combine_steady_us": ("combine BF16", "steady"),
    "combine_fori_us": ("combine BF16", "fori_loop"),
    "dispatch_push_us": ("push dispatch {p}", "64 unrolled"),
    "combine_push_us": ("push combine BF16", "64 unrolled"),
    "combine_fp8_us": ("FP8 combine", "64 unrolled"),
    "trivial_op_loop_us": ("loop floor ({p} row)", "64 unrolled"),
}
# From rank 0's profile (only when the run was not given --no-profile): kernel time, no launch gaps.
LL_PROFILE_METRICS = {
    "dispatch_span_us": ("dispatch {p}", "kernel span"),
    "combine_span_us": ("combine BF16", "kernel span"),
}
TIMING_ORDER = ("steady", "64 unrolled", "fori_loop", "kernel span", "per call")
BENCH_ORDER = ("low_latency", "intranode")


def ll_measurements(row: dict) -> dict:
    """{(op, timing): us} of one low-latency result row."""
    p = row.get("payload", "?")
    out = {}
    for key, (op, timing) in LL_METRICS.items():
        if isinstance(row.get(key), (int, float)):
            out[(op.format(p=p), timing)] = float(row[key])
    prof = row.get("profile_rank0")
    fused = prof.get("fused") if isinstance(prof, dict) else None
    for key, (op, timing) in LL_PROFILE_METRICS.items():
        if isinstance(fused, dict) and isinstance(fused.get(key), (int, float)):
            out[(op.format(p=p), timing)] = float(fused[key])
    return out


def intranode_op(row: dict) -> str:
    """The op's name, with the combine's chunk x ring rows where the row has them."""
    op = row["op"]
    if "combine_chunk_rows" in row and "combine_ring_rows" in row:
        op += f"@{row['combine_chunk_rows']}x{row['combine_ring_rows']}"
    return op


def measurements(path: str) -> dict:
    """{(bench, R, sms, op, timing): us} of one result file (low_latency_R*.json or intranode_R*.json).

    Files of other benchmarks (and the put path's ``_rpn`` files) give {}."""
    name = os.path.basename(path)
    with open(path) as f:
        data = json.load(f)
    rows = data.get("results", []) if isinstance(data, dict) else data
    out = {}
    if re.fullmatch(r"low_latency_R\d+\.json", name):
        for row in rows:
            for (op, timing), us in ll_measurements(row).items():
                out[("low_latency", int(row["ranks"]), int(row["sms"]), op, timing)] = us
    elif re.fullmatch(r"intranode_R\d+(_.*)?\.json", name):
        for row in rows:
            if isinstance(row.get("time_us"), (int, float)):
                key = ("intranode", int(row["ranks"]), int(row["sms_per_rank"]), intranode_op(row), "per call")
                out[key] = float(row["time_us"])
    return out


def load_runs(runs_dir: str) -> dict:
    """{(config, tree, round): {(bench, R, sms, op, timing): us}} of every run folder under runs_dir."""
    runs = {}
    for run_dir in sorted(glob.glob(os.path.join(runs_dir, "*", "*_r*"))):
        m = re.fullmatch(r"([a-z][a-z0-9]*)_r(\d+)", os.path.basename(run_dir))
        if not m or not os.path.isdir(run_dir):
            continue
        config = os.path.basename(os.path.dirname(run_dir))
        got = {}
        for path in sorted(glob.glob(os.path.join(run_dir, "*.json"))):
            try:
                got.update(measurements(path))
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"ab_compare: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
        runs[(config, m.group(1), int(m.group(2)))] = got
    return runs


def tree_order(runs: dict) -> list[str]:
    """base, base2 (a second older tree) where present, head, nosig (head without call
    signatures) where present, then any other tree by name."""
    found = {tree for _, tree, _ in runs}
    known = [t for t in ("base", "base2", "head", "nosig") if t in TREES or t in found]
    return known + sorted(found - set(known))


def _sort_key(key):
    bench, r, sms, op, timing = key
    return (BENCH_ORDER.index(bench) if bench in BENCH_ORDER else len(BENCH_ORDER), r, sms, op,
            TIMING_ORDER.index(timing) if timing in TIMING_ORDER else len(TIMING_ORDER))


def compare(runs: dict) -> list[dict]:
    """One dict per (bench, R, sms, op, timing) that some tree measured: each tree's values in
    round order (``runs``), their medians (``us``; None where a tree has none) and each median
    over base's (``ratio``, for every tree but base; None where either is missing)."""
    trees = tree_order(runs)
    values: dict = {}
    for (_config, tree, _rnd), got in sorted(runs.items(), key=lambda kv: kv[0][2]):
        for key, us in got.items():
            values.setdefault(key, {t: [] for t in trees})[tree].append(us)
    rows = []
    for key in sorted(values, key=_sort_key):
        bench, r, sms, op, timing = key
        v = values[key]
        med = {t: (statistics.median(v[t]) if v[t] else None) for t in trees}
        ratio = {t: (med[t] / med["base"] if med["base"] and med[t] is not None else None)
                 for t in trees if t != "base"}
        rows.append(dict(bench=bench, ranks=r, sms=sms, op=op, timing=timing, runs=v, us=med, ratio=ratio))
    return rows


def _num(x, fmt=".1f"):
    return "-" if x is None else format(x, fmt)


def format_table(rows: list[dict], headline_only: bool = False) -> str:
    """Markdown table of compare()'s rows: per tree its median us, each tree's median over base's,
    then each tree's per-round values. headline_only keeps the dispatch/combine/intranode rows
    and leaves out the push, FP8-combine and loop-floor rows."""
    trees = list(rows[0]["us"]) if rows else list(TREES)
    others = [t for t in trees if t != "base"]
    head = (["bench", "R", "SMs", "op", "timing"] + [f"{t} us" for t in trees] + [f"{t}/base" for t in others]
            + [f"{t} runs" for t in trees])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        if headline_only and row["op"].startswith(("push ", "FP8 combine", "loop floor")):
            continue
        cells = [row["bench"], str(row["ranks"]), str(row["sms"]), row["op"], row["timing"]]
        cells += [_num(row["us"][t]) for t in trees]
        cells += [_num(row["ratio"][t], ".3f") for t in others]
        cells += [" ".join(f"{x:.1f}" for x in row["runs"][t]) or "-" for t in trees]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_status(runs: dict) -> str:
    """One line per run folder: config, tree, round, how many measurements it gave."""
    return "\n".join(f"{config} {tree} r{rnd}: {len(got)} measurement(s)"
                     for (config, tree, rnd), got in sorted(runs.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="folder of <config>/<tree>_r<round>/ run folders")
    p.add_argument("--json", default=None, help="write the rows (and --meta) here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fields of the JSON (e.g. base=<commit>)")
    p.add_argument("--all", action="store_true", help="print every row (default: the headline rows)")
    args = p.parse_args(argv)
    runs = load_runs(args.runs_dir)
    rows = compare(runs)
    table = format_table(rows, headline_only=not args.all)
    if args.json:
        meta = dict(kv.split("=", 1) for kv in args.meta if "=" in kv)
        with open(args.json, "w") as f:
            json.dump(dict(meta, runs=[dict(config=c, tree=t, round=r, measurements=len(g))
                                       for (c, t, r), g in sorted(runs.items())], rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(format_table(rows) + "\n")
    print(run_status(runs))
    print(table)
    return 0 if any(row["ratio"].get("head") is not None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
