"""The A/B benchmark of two trees (scripts/ab_bench.sh, benchmarks/ab_compare.py), on CPU:
the comparison on synthetic JSON, and the script's runs with stand-in trees whose launcher
writes that JSON instead of running a GPU benchmark."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ab_compare as C  # noqa: E402


def ll_json(ranks, rows):
    """A low_latency_R{R}.json as bench_low_latency.py writes it; rows: (sms, payload, {key: us})."""
    return dict(device="NVIDIA H100 80GB HBM3", ranks=ranks, results=[
        dict(ranks=ranks, sms=sms, payload=payload, pairs=1024, **vals) for sms, payload, vals in rows])


def intranode_json(ranks, rows):
    """An intranode_R{R}.json as bench_intranode.py writes it; rows: (op, sms, time_us)."""
    results = []
    for op, sms, us in rows:
        row = dict(op=op, ranks=ranks, sms_per_rank=sms, tokens=4096, time_us=us, time_us_per_rank=[us] * ranks)
        if op.startswith("combine"):
            row.update(combine_chunk_rows=2, combine_ring_rows=24)
        results.append(row)
    return dict(device="NVIDIA H100 80GB HBM3", roofline_gbps=1500.0, results=results)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_ll_measurements_name_op_and_timing():
    row = dict(ranks=8, sms=8, payload="FP8", dispatch_us=76.0, dispatch_steady_us=66.0, dispatch_fori_us=133.0,
               combine_us=97.0, combine_zero_copy=True, profile_rank0=dict(fused=dict(dispatch_span_us=62.0)))
    got = C.ll_measurements(row)
    assert got[("dispatch FP8", "64 unrolled")] == 76.0
    assert got[("dispatch FP8", "steady")] == 66.0
    assert got[("dispatch FP8", "fori_loop")] == 133.0
    assert got[("combine BF16", "64 unrolled")] == 97.0
    assert got[("dispatch FP8", "kernel span")] == 62.0
    assert not any(op == "combine_zero_copy" for op, _ in got)  # not a time
    # A profile that failed is a string in the JSON.
    assert ("dispatch BF16", "kernel span") not in C.ll_measurements(
        dict(payload="BF16", dispatch_us=1.0, profile_rank0="no GPU kernels in the trace"))


def test_compare_medians_ratios_and_missing(tmp_path):
    runs = tmp_path / "runs"
    for tree, rnd, disp, comb in [("base", 1, 76.0, 2800.0), ("head", 1, 98.0, 2900.0),
                                  ("head", 2, 100.0, 2950.0), ("base", 2, 78.0, 2700.0)]:
        write(str(runs / "ll_R8" / f"{tree}_r{rnd}" / "low_latency_R8.json"),
              ll_json(8, [(8, "FP8", dict(dispatch_us=disp, combine_us=disp + 20))]))
        write(str(runs / "intranode_R8" / f"{tree}_r{rnd}" / "intranode_R8.json"),
              intranode_json(8, [("dispatch_fp8", 8, disp * 20), ("combine_bf16", 8, comb)]))
    # A row only head has (a key base's script does not write): no ratio.
    write(str(runs / "ll_R1" / "head_r1" / "low_latency_R1.json"),
          ll_json(1, [(16, "BF16", dict(dispatch_us=40.0, dispatch_steady_us=27.0))]))
    write(str(runs / "ll_R1" / "base_r1" / "low_latency_R1.json"), ll_json(1, [(16, "BF16", dict(dispatch_us=29.0))]))
    # Folders that are not runs, and a broken file, are skipped.
    (runs / "ll_R1" / "notes").mkdir()
    (runs / "ll_R1" / "base_r2").mkdir()
    (runs / "ll_R1" / "base_r2" / "low_latency_R1.json").write_text("{not json")

    loaded = C.load_runs(str(runs))
    assert C.tree_order(loaded) == ["base", "head"]
    assert loaded[("ll_R1", "base", 2)] == {}
    rows = {(r["bench"], r["ranks"], r["sms"], r["op"], r["timing"]): r for r in C.compare(loaded)}

    d = rows[("low_latency", 8, 8, "dispatch FP8", "64 unrolled")]
    assert d["runs"] == {"base": [76.0, 78.0], "head": [98.0, 100.0]}  # in round order
    assert d["us"] == {"base": 77.0, "head": 99.0}
    assert d["ratio"]["head"] == pytest.approx(99.0 / 77.0)
    assert rows[("low_latency", 8, 8, "combine BF16", "64 unrolled")]["us"]["head"] == 119.0
    c = rows[("intranode", 8, 8, "combine_bf16@2x24", "per call")]
    assert c["ratio"]["head"] == pytest.approx(2925.0 / 2750.0)
    assert rows[("low_latency", 1, 16, "dispatch BF16", "64 unrolled")]["ratio"]["head"] == pytest.approx(40 / 29)
    only_head = rows[("low_latency", 1, 16, "dispatch BF16", "steady")]
    assert only_head["us"]["base"] is None and only_head["ratio"]["head"] is None

    # Order: low latency before intranode, by R, SMs, op, then steady / unrolled / fori.
    keys = list(rows)
    assert keys.index(("low_latency", 1, 16, "dispatch BF16", "steady")) < \
        keys.index(("low_latency", 1, 16, "dispatch BF16", "64 unrolled")) < \
        keys.index(("low_latency", 8, 8, "dispatch FP8", "64 unrolled")) < \
        keys.index(("intranode", 8, 8, "dispatch_fp8", "per call"))

    table = C.format_table(C.compare(loaded))
    lines = table.splitlines()
    assert lines[0].startswith("| bench | R | SMs | op | timing | base us | head us | head/base | base runs |")
    assert "| low_latency | 8 | 8 | dispatch FP8 | 64 unrolled | 77.0 | 99.0 | 1.286 | 76.0 78.0 | 98.0 100.0 |" \
        in lines
    assert "| low_latency | 1 | 16 | dispatch BF16 | steady | - | 27.0 | - | - | 27.0 |" in lines
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_extra_tree_and_headline_rows(tmp_path):
    runs = tmp_path / "runs"
    for tree, us in [("base", 50.0), ("head", 60.0), ("nosig", 55.0)]:
        write(str(runs / "ll_R1" / f"{tree}_r1" / "low_latency_R1.json"),
              ll_json(1, [(16, "FP8", dict(dispatch_us=us, dispatch_push_us=2 * us, trivial_op_loop_us=3.0))]))
    rows = C.compare(C.load_runs(str(runs)))
    assert list(rows[0]["us"]) == ["base", "head", "nosig"]
    disp = next(r for r in rows if r["op"] == "dispatch FP8")
    assert disp["ratio"] == {"head": pytest.approx(1.2), "nosig": pytest.approx(1.1)}
    full, headline = C.format_table(rows), C.format_table(rows, headline_only=True)
    assert "nosig/base" in full.splitlines()[0]
    assert "push dispatch FP8" in full and "push dispatch FP8" not in headline
    assert "loop floor" in full and "loop floor" not in headline


def test_main_writes_json_and_markdown(tmp_path, capsys):
    runs = tmp_path / "runs"
    for tree, us in [("base", 10.0), ("head", 12.0)]:
        write(str(runs / "ll_R1" / f"{tree}_r1" / "low_latency_R1.json"), ll_json(1, [(16, "FP8", dict(dispatch_us=us))]))
    assert C.main([str(runs), "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "t.md"),
                   "--meta", "base=abc", "--meta", "head=def"]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["base"], s["head"]) == ("abc", "def")
    assert s["runs"] == [dict(config="ll_R1", tree="base", round=1, measurements=1),
                         dict(config="ll_R1", tree="head", round=1, measurements=1)]
    assert s["rows"][0]["ratio"]["head"] == pytest.approx(1.2)
    assert "| 1.200 |" in (tmp_path / "t.md").read_text()
    assert "ll_R1 head r1: 1 measurement(s)" in capsys.readouterr().out
    # No run with both trees: nothing compared, exit 1.
    assert C.main([str(tmp_path / "nothing")]) == 1


def test_ab_bench_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "ab_bench.sh")], check=True)
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "ab_prepare.sh")], check=True)


# A stand-in tree: jax_ep with an "available" extension and a launcher that writes the JSON the
# named benchmark would, its times scaled by the tree's SCALE file (and 0.9 without call
# signatures); fails its first run when a
# FAIL_ONCE file is present (the script retries a run that fails fast).
FAKE_LAUNCH = textwrap.dedent('''
    import json, os, sys
    argv = sys.argv[1:]
    n = int(argv[argv.index("-n") + 1])
    script = next(a for a in argv if a.endswith(".py"))
    out = argv[argv.index("--out") + 1]
    sms = [int(s) for s in argv[argv.index("--sms") + 1].split(",")]
    here = os.getcwd()
    if os.path.exists("FAIL_ONCE"):
        os.remove("FAIL_ONCE")
        print("coordinator port taken"); sys.exit(1)
    scale = float(open("SCALE").read()) * (0.9 if os.environ.get("JAX_EP_CALL_SIGNATURES") == "0" else 1.0)
    assert os.environ["PYTHONPATH"].split(":")[0] == here, "each tree runs with its own PYTHONPATH"
    assert 0 < float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 1
    with open(os.path.join(here, "calls.log"), "a") as f:
        f.write(f"{os.path.basename(script)} {n} {os.environ.get('JAX_EP_CALL_SIGNATURES', '')}\\n")
    if "low_latency" in script:
        assert "--no-profile" in argv and "--no-overlap" in argv
        rows = [dict(ranks=n, sms=s, payload=p, dispatch_us=scale * (50 + s), combine_us=scale * 80)
                for s in sms for p in ("FP8", "BF16")]
        name = f"low_latency_R{n}.json"
    else:
        rows = [dict(op=op, ranks=n, sms_per_rank=s, time_us=scale * 1000) for s in sms
                for op in ("dispatch_bf16", "combine_bf16")]
        name = f"intranode_R{n}.json"
    json.dump(dict(results=rows), open(os.path.join(out, name), "w"))
''')


def fake_tree(path, scale):
    os.makedirs(os.path.join(path, "jax_ep"))
    os.makedirs(os.path.join(path, "benchmarks"))
    with open(os.path.join(path, "jax_ep", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(path, "jax_ep", "_extension.py"), "w") as f:
        f.write("def available():\n    return True\n\n\ndef unavailable_reason():\n    return ''\n")
    with open(os.path.join(path, "jax_ep", "launch.py"), "w") as f:
        f.write(FAKE_LAUNCH)
    open(os.path.join(path, "jax_ep", "_C.cpython-312-x86_64-linux-gnu.so"), "w").close()
    for script in ("bench_low_latency.py", "bench_intranode.py"):
        open(os.path.join(path, "benchmarks", script), "w").close()
    with open(os.path.join(path, "SCALE"), "w") as f:
        f.write(str(scale))


def plain_python(tmp_path):
    """A PATH whose python3 is this interpreter without site-packages: an editable install of
    jax_ep there would shadow the stand-in trees (the script refuses a tree that imports
    another tree's jax_ep)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return str(bin_dir) + os.pathsep + os.environ["PATH"]


def base_tarball(tmp_path, sub: str, speed: float, rev: str, fail_once: bool = False):
    """A stand-in base tree (``fake_tree`` at ``speed``, revision ``rev`` * 40)
    packed as scripts/ab_prepare.sh packs one; its path."""
    base = tmp_path / sub / "jax_ep_base"
    fake_tree(str(base), speed)
    (base / "AB_REVISION").write_text("commit: " + rev * 40 + "\n")
    if fail_once:
        (base / "FAIL_ONCE").write_text("")
    tgz = tmp_path / f"base-{rev * 7}.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(str(base), arcname="jax_ep_base")
    return tgz


def test_ab_bench_runs_both_trees_interleaved(tmp_path):
    tgz = base_tarball(tmp_path, "src", 1.0, "a", fail_once=True)
    tgz2 = base_tarball(tmp_path, "src2", 1.1, "c")
    head = tmp_path / "head"
    fake_tree(str(head), 1.25)
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, AB_HEAD=str(head), AB_WORK=str(work), AB_NOSIG="1", AB_BASE2=str(tgz2),
               PATH=plain_python(tmp_path))
    env.pop("PYTHONPATH", None)
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "ab_bench.sh"), str(tgz), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(os.listdir(out)) == ["ab_runs.tar.gz", "ab_summary.json", "ab_table.md", "env.txt"]

    # ABBA order per round, each configuration in turn; base's first run failed fast and was retried.
    runs = [line.split()[:3] for line in res.stdout.splitlines() if " exit " in line]
    trees = ("base", "base2", "head", "nosig")
    expect = [[c, t, f"r{r}"] for r, order in ((1, trees), (2, trees[::-1]))
              for c in ("ll_R1", "ll_R8", "intranode_R8") for t in order]
    assert runs == expect[:1] + expect, res.stdout
    assert "coordinator port taken" in res.stdout
    calls = (head / "calls.log").read_text().splitlines()
    assert calls[:3] == ["bench_low_latency.py 1 ", "bench_low_latency.py 1 0", "bench_low_latency.py 8 "]

    s = json.loads((out / "ab_summary.json").read_text())
    assert (s["base"], s["base2"]) == ("a" * 40, "c" * 40)
    rows = {(r["bench"], r["ranks"], r["sms"], r["op"], r["timing"]): r for r in s["rows"]}
    r = rows[("low_latency", 8, 16, "dispatch FP8", "64 unrolled")]
    assert r["runs"]["base"] == [66.0, 66.0] and r["ratio"]["head"] == pytest.approx(1.25)
    assert ("low_latency", 1, 16, "dispatch BF16", "64 unrolled") in rows
    assert ("low_latency", 1, 8, "dispatch BF16", "64 unrolled") not in rows  # R = 1: 16 SMs only
    assert rows[("intranode", 8, 8, "dispatch_bf16", "per call")]["us"]["head"] == 1250.0
    assert "| intranode | 8 | 16 | dispatch_bf16 | per call | 1000.0 | 1100.0 | 1250.0 | 1125.0 | 1.100 | 1.250 | 1.125 |" \
        in res.stdout
    with tarfile.open(out / "ab_runs.tar.gz") as t:
        names = t.getnames()
    assert "logs/ll_R1_base_r1.log" in names and "runs/ll_R8/head_r2/low_latency_R8.json" in names


def test_ab_bench_stops_starting_runs_at_the_budget(tmp_path):
    tgz = base_tarball(tmp_path, "src", 1.0, "b")
    head = tmp_path / "head"
    fake_tree(str(head), 1.0)
    env = dict(os.environ, AB_HEAD=str(head), AB_WORK=str(tmp_path / "work"), AB_BUDGET_S="0",
               PATH=plain_python(tmp_path))
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "ab_bench.sh"), str(tgz), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0  # nothing compared
    assert "skip ll_R1 base r1" in res.stdout and " exit " not in res.stdout
