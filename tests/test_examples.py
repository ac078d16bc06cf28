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


def test_decode_loop_runs_and_matches_dense():
    out, _ = _run("decode_loop.py", "--steps", "6", "--repeats", "1", "--check")
    assert re.search(r"= \d+ tokens/s on CPU", out), out
    assert "192/192 tokens agree" in out, out
