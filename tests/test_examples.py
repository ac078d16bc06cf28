"""The layer examples run end to end (tiny step counts, subprocesses on CPU)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")
pytest.importorskip("optax")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(script, *args, timeout=120, env=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **dict(env))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


def test_train_moe_transformer_loss_falls_and_compiles_once():
    out, err = _run("train_moe_transformer.py", "--steps", "12", "--layers", "1", "--seq", "8",
                    env={"JAX_LOG_COMPILES": "1"})
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) in 12 steps", out).groups())
    assert last < 0.8 * first, out
    # Every step has the same shapes and shardings: one compilation of the step.
    assert len(re.findall(r"Compiling jit\(train_step\)", err)) == 1, err[-4000:]


# "loss A -> B in 60 steps": the main example's default run as README.md and docs/ quote it.
QUOTED_RUN = re.compile(r"loss (\d+\.\d+) -> (\d+\.\d+) in 60 steps")


def _quoted_runs():
    """``{path: [(first, last), ...]}`` of every quote of the default run in README.md and docs/."""
    paths = ["README.md"] + [os.path.join(d, n) for d, _, names in os.walk(os.path.join(ROOT, "docs"))
                             for n in names if n.endswith(".md")]
    found = {}
    for path in paths:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        quotes = [tuple(map(float, m.groups())) for m in QUOTED_RUN.finditer(text)]
        if quotes:
            found[os.path.relpath(os.path.join(ROOT, path), ROOT)] = quotes
    return found


def test_docs_quote_one_default_run():
    found = _quoted_runs()
    assert "README.md" in found, "README.md no longer quotes the main example's run"
    assert len({q for quotes in found.values() for q in quotes}) == 1, found


def test_train_moe_transformer_default_run_matches_readme():
    """The README's first command runs this example with its defaults; the
    figures it quotes are what that run prints (to 0.005: another CPU may
    round differently over 60 steps)."""
    out, _ = _run("train_moe_transformer.py", timeout=300)
    first, last = map(float, QUOTED_RUN.search(out).groups())
    quoted_first, quoted_last = _quoted_runs()["README.md"][0]
    assert abs(first - quoted_first) <= 0.005 and abs(last - quoted_last) <= 0.005, out


def test_decode_loop_runs_and_matches_dense():
    out, _ = _run("decode_loop.py", "--steps", "6", "--repeats", "1", "--check")
    assert re.search(r"= \d+ tokens/s on CPU", out), out
    assert "192/192 tokens agree" in out, out
