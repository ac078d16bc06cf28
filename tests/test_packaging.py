"""The versions the package declares are the versions CI tests.

pyproject.toml states them three times (the runtime jax range, the build's jax
range, the NVSHMEM pin of the `nvshmem` extra and of the JAX_EP_NVSHMEM=ON
build) and scripts/setup_env.sh installs the CI venv: they must agree.
"""

from __future__ import annotations

import pathlib
import re
import tomllib

import jax
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(reqs: list[str], name: str) -> Requirement:
    found = [Requirement(r) for r in reqs if Requirement(r).name == name]
    assert len(found) == 1, (name, reqs)
    return found[0]


def setup_env_pin(name: str) -> str:
    m = re.search(rf'"{re.escape(name)}==([0-9.]+)"', (ROOT / "scripts" / "setup_env.sh").read_text())
    assert m, f"scripts/setup_env.sh pins no {name}"
    return m.group(1)


def test_ci_runs_a_jax_the_package_accepts():
    runtime = requirement(PYPROJECT["project"]["dependencies"], "jax").specifier
    build = requirement(PYPROJECT["build-system"]["requires"], "jax").specifier
    assert runtime == build, "build against the headers of a jax the package runs with"
    tested = setup_env_pin("jax")
    assert tested in runtime
    # Only the tested minor release: CI tests one jax.
    major, minor = (int(x) for x in tested.split(".")[:2])
    assert f"{major}.{minor + 1}.0" not in runtime and f"{major}.{minor - 1}.99" not in runtime, runtime
    assert jax.__version__ in runtime, f"this venv runs jax {jax.__version__}, outside {runtime}"


def test_one_nvshmem_version():
    extra = requirement(PYPROJECT["project"]["optional-dependencies"]["nvshmem"], "nvidia-nvshmem-cu13")
    (override,) = [o for o in PYPROJECT["tool"]["scikit-build"]["overrides"] if "JAX_EP_NVSHMEM" in o["if"]["env"]]
    build = requirement(override["build"]["requires"], "nvidia-nvshmem-cu13")
    pin = setup_env_pin("nvidia-nvshmem-cu13")
    assert str(extra.specifier) == str(build.specifier) == f"=={pin}"


def test_nvshmem_build_switch_matches_cmake():
    """The override's regex accepts what cmake/nvshmem.cmake treats as ON."""
    (override,) = [o for o in PYPROJECT["tool"]["scikit-build"]["overrides"] if "JAX_EP_NVSHMEM" in o["if"]["env"]]
    pattern = re.compile(override["if"]["env"]["JAX_EP_NVSHMEM"])
    for on in ("ON", "on", "1", "TRUE", "true"):
        assert pattern.search(on), on
    for off in ("OFF", "0", "AUTO", "", "no"):
        assert not pattern.search(off), off
