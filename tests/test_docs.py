"""Every Python code block of README.md and docs/**/*.md runs as written.

Conventions (docs/architecture.md, "Code blocks in the docs", says the same):

- A block fenced ```` ```python ```` runs on CPU with 8 virtual devices
  (``JAX_PLATFORMS=cpu``, ``--xla_force_host_platform_device_count=8``). The
  blocks of one file run in order in one namespace, so a later block may use
  what an earlier one defined; each file runs in a process of its own, as
  rank 0 of a one-rank ``python -m jax_ep.launch -n 1 --gpus 0`` (so
  ``jax_ep.launch.initialize_distributed()`` works).
- A block fenced ```` ```python gpu ```` needs a GPU (the CUDA backend). It
  runs on the same CPU process with three stand-ins: ``jax.jit`` functions
  called on arrays are traced and lowered for CUDA (every custom call must
  lower with its attributes) and return ``jax.ShapeDtypeStruct`` results
  instead of running; the CUDA runtime behind ``jax_ep.Buffer`` allocates
  nothing; ``jax_ep.nvshmem``'s GPU calls only check their arguments against
  the real signatures. So a GPU block keeps its GPU work inside ``jax.jit``.
  These blocks need the extension ``jax_ep._C`` (skipped without it).
- Anything else (```` ```bash ````, ```` ```text ````, unlabelled) is not run.

``python tests/test_docs.py FILE.md`` runs one file's blocks the same way
(errors point at the file's own line numbers).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FENCE = re.compile(r"^```python(?P<tags>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TAGS = {"", "gpu"}


def doc_files() -> list[str]:
    """README.md and every .md under docs/ that holds a Python block (paths relative to ROOT)."""
    files = ["README.md"]
    for folder, _, names in sorted(os.walk(os.path.join(ROOT, "docs"))):
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in sorted(names) if n.endswith(".md")]
    return [f for f in files if python_blocks(f)]


def python_blocks(path: str) -> list[tuple[int, str, str]]:
    """``(first line of the code, tag, code)`` of each Python block of ``path``."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    blocks = []
    for m in FENCE.finditer(text):
        tag = m.group("tags").strip()
        if tag not in TAGS:
            raise ValueError(f"{path}: unknown code block tag 'python {tag}' (known: python, python gpu)")
        blocks.append((text.count("\n", 0, m.start("body")) + 1, tag, m.group("body")))
    return blocks


# --- the runner (a subprocess per file) -------------------------------------------


class _GpuStandIns:
    """What a ```python gpu block runs with on a CPU (see the module docstring)."""

    def __init__(self):
        import jax

        from jax_ep import nvshmem, runtime

        self.patches = []
        real_jit = jax.jit

        class LowerForCuda:
            def __init__(self, fun, **kwargs):
                self._jitted = real_jit(fun, **kwargs)

            def __call__(self, *args, **kwargs):
                leaves = jax.tree.leaves((args, kwargs))
                if any(isinstance(a, jax.core.Tracer) for a in leaves):  # called inside another trace
                    return self._jitted(*args, **kwargs)
                self._jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
                return jax.eval_shape(self._jitted, *args, **kwargs)

        def jit(fun=None, **kwargs):
            return (lambda f: LowerForCuda(f, **kwargs)) if fun is None else LowerForCuda(fun, **kwargs)

        ids = iter(range(1 << 20, 1 << 21))

        class StandInRuntime(runtime.IntranodeRuntime):
            @staticmethod
            def create(num_bytes: int, *, timeout_s: float = 100.0, bootstrap_timeout_s: float = 120.0):
                rt = StandInRuntime(next(ids), jax.process_index(), jax.process_count(), int(num_bytes), 0,
                                    transports=("local",) * jax.process_count())
                runtime._live[rt.buffer_id] = rt
                return rt

            @staticmethod
            def create_nvshmem(num_bytes: int, *, timeout_s: float = 100.0):
                return StandInRuntime.create(num_bytes, timeout_s=timeout_s)

            def share_xla_memory(self, *, timeout_s: float = 120.0) -> bool:
                return False

            xla_memory_shared = False
            xla_memory_note = "a stand-in runtime (no GPU)"

            def failure(self):
                return None  # no kernel ran: nothing failed

            def destroy(self) -> None:
                runtime._live.pop(self.buffer_id, None)

        self._set(jax, "jit", jit)
        self._set(runtime.IntranodeRuntime, "create", staticmethod(StandInRuntime.create))
        self._set(runtime.IntranodeRuntime, "create_nvshmem", staticmethod(StandInRuntime.create_nvshmem))
        for name in ("initialize", "symmetric_buffer", "finalize", "barrier_all"):
            self._set(nvshmem, name, self._checked(getattr(nvshmem, name), nvshmem))
        # A multi-host job's start: the harness process is already rank 0 of a one-rank job.
        self._set(jax.distributed, "initialize", self._checked(jax.distributed.initialize, nvshmem))

    def _set(self, owner, name, value):
        self.patches.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    @staticmethod
    def _checked(fn, nvshmem):
        """A stand-in for ``fn`` that binds its arguments to ``fn``'s signature."""
        import dataclasses
        import inspect
        from unittest import mock

        def standin(*args, **kwargs):
            inspect.signature(fn).bind(*args, **kwargs)  # TypeError on arguments fn does not take
            if fn.__name__ == "symmetric_buffer":
                cls = nvshmem.SymmetricBuffer
                names = [f.name for f in dataclasses.fields(cls)] + [n for n in vars(cls) if not n.startswith("_")]
                return mock.NonCallableMock(spec_set=names)
            return None

        return standin

    def undo(self):
        for owner, name, value in reversed(self.patches):
            setattr(owner, name, value)


def run_file(path: str) -> None:
    """Run the Python blocks of one doc file in order, in one namespace."""
    namespace = {"__name__": "__main__"}
    for line, tag, code in python_blocks(path):
        where = f"{path}:{line}"
        print(f"--- {where} ({'python ' + tag if tag else 'python'})", flush=True)
        standins = None
        if tag == "gpu":
            from jax_ep import _extension

            if not _extension.available():
                print(f"skipped (needs jax_ep._C: {_extension.unavailable_reason()})", flush=True)
                continue
            standins = _GpuStandIns()
        try:
            # Leading newlines keep tracebacks on the doc file's own line numbers.
            exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, path), "exec"), namespace)
        finally:
            if standins is not None:
                standins.undo()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    """8 virtual CPU devices, and the environment of rank 0 of a one-rank jax_ep.launch on CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_EP_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(
        JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]),
        JAX_EP_RANK="0", JAX_EP_NUM_RANKS="1", JAX_EP_COORDINATOR=f"127.0.0.1:{_free_port()}", JAX_EP_LOCAL_GPU="",
        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]),
    )
    return env


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/test_docs.py FILE.md   (a path relative to the repository root)")
    if os.environ.get("JAX_EP_RANK") is None:  # started by hand: re-run in the documented environment
        sys.exit(subprocess.call([sys.executable, __file__, sys.argv[1]], env=run_env(), cwd=ROOT))
    run_file(os.path.relpath(os.path.abspath(sys.argv[1]), ROOT))
    sys.exit(0)


# --- the tests ----------------------------------------------------------------------

import pytest  # noqa: E402


@pytest.mark.parametrize("path", doc_files())
def test_doc_python_blocks_run(path):
    code = "\n".join(block for _, _, block in python_blocks(path))
    for framework in sorted(set(re.findall(r"^\s*(?:import|from) (flax|equinox|optax)\b", code, re.M))):
        pytest.importorskip(framework)  # the optional frameworks of the layer docs
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path], env=run_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def test_fences_are_found():
    """The block finder sees what a Markdown renderer sees."""
    blocks = python_blocks("README.md")
    assert blocks and all(tag in TAGS for _, tag, _ in blocks)
    assert "README.md" in doc_files() and "docs/layers.md" in doc_files()


def test_gpu_blocks_are_lowered_not_run(tmp_path):
    """A ```python gpu block gets the CUDA backend's stand-ins: its jitted call
    is lowered for CUDA and returns shapes; GPU-only calls check their arguments."""
    from jax_ep import _extension

    if not _extension.available():
        pytest.skip("the stand-ins lower the CUDA targets of jax_ep._C")
    doc = tmp_path / "gpu.md"
    doc.write_text('''
```python gpu
import jax, jax.numpy as jnp
import jax_ep
buf = jax_ep.Buffer(num_experts=4, axis_name=None, normal=jax_ep.NormalOptions(backend="cuda"))
f = jax.jit(lambda x, i, w: buf.combine(buf.dispatch(x, i, w).recv_x, buf.dispatch(x, i, w).handle))
y = f(jnp.ones((8, 128), jnp.bfloat16), jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2), jnp.float32))
print("lowered:", type(y).__name__, y.shape)
```

```python
print("cpu block:", type(jax.jit(lambda a: a + 1)(jnp.ones(2))).__name__)
```

```python gpu
from jax_ep import nvshmem
try:
    nvshmem.symmetric_buffer(1 << 20, zeroed=True)
except TypeError as e:
    print("checked:", e)
```
''')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(doc)], env=run_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lowered: ShapeDtypeStruct (8, 128)" in proc.stdout, proc.stdout
    assert "cpu block: ArrayImpl" in proc.stdout, proc.stdout  # the stand-ins end with their block
    assert "checked: got an unexpected keyword argument 'zeroed'" in proc.stdout, proc.stdout


def _doc_code_outside_python_blocks(path: str) -> list[str]:
    """Inline code spans and non-Python blocks of a doc: code the runner does not execute."""
    text = FENCE.sub("", open(os.path.join(ROOT, path), encoding="utf-8").read())
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", text) + blocks


def _all_doc_files() -> list[str]:
    files = ["README.md"]
    for folder, _, names in sorted(os.walk(os.path.join(ROOT, "docs"))):
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in sorted(names) if n.endswith(".md")]
    return files


@pytest.mark.parametrize("path", _all_doc_files())
def test_doc_names_exist(path):
    """Code the docs mention but do not run still matches the code: every
    ``jax_ep.a.b`` name resolves, ``Options.field`` names a field, and calls
    of jax_ep's classes and functions use keywords they take."""
    import ast
    import dataclasses
    import importlib
    import inspect

    import jax_ep
    from jax_ep import moe

    classes = {"NormalOptions": jax_ep.NormalOptions, "LowLatencyOptions": jax_ep.LowLatencyOptions,
               "FP8Options": jax_ep.FP8Options, "MoEConfig": moe.MoEConfig, "Buffer": jax_ep.Buffer}
    optional = {"flax", "equinox", "jax_ep._nvshmem"}  # may be absent here; the runner checks them where present

    def resolve(name):
        parts = name.split(".")
        obj = jax_ep
        for i in range(1, len(parts)):
            if hasattr(obj, parts[i]):
                obj = getattr(obj, parts[i])
                continue
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
            except ImportError as e:
                if e.name in optional or ".".join(parts[: i + 1]) in optional:
                    return True
                return False
        return True

    problems = []
    for code in _doc_code_outside_python_blocks(path):
        for name in re.findall(r"\bjax_ep(?:\.[A-Za-z_]\w*)+", code):
            if not resolve(name):
                problems.append(f"{name} does not exist")
        for cls, attr in re.findall(r"\b(NormalOptions|LowLatencyOptions|FP8Options|MoEConfig|Buffer)\.(\w+)", code):
            fields = {f.name for f in dataclasses.fields(classes[cls])}
            if attr not in fields and not hasattr(classes[cls], attr):
                problems.append(f"{cls}.{attr} does not exist")
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func).split(".")[-1]
                fn = classes.get(name) or getattr(jax_ep, name, None)
                if callable(fn):
                    try:
                        inspect.signature(fn).bind_partial(**{k.arg: None for k in node.keywords if k.arg})
                    except TypeError as e:
                        problems.append(f"`{code}`: {e}")
    assert not problems, f"{path}: " + "; ".join(problems)
