"""Every public name of jax_ep has a docstring of its own.

The API reference (mkdocs.yml, scripts/build_docs.sh) is generated from the
docstrings, and mkdocstrings renders an undocumented name without complaint:
this test is the check that fails instead. Public = the names in ``__all__`` of
the package and of its public modules (for ``jax_ep.moe``, which has no
``__all__``: the functions and classes it defines without a leading
underscore), and the public methods and properties those classes define.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

# The modules the API reference documents (docs/api/*.md), in its order.
PUBLIC_MODULES = ["jax_ep", "jax_ep.moe", "jax_ep.flax", "jax_ep.equinox", "jax_ep.launch", "jax_ep.nvshmem"]


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n for n, v in vars(module).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
        and getattr(v, "__module__", None) == module.__name__
    ]


def own_docstring(obj) -> str:
    """The docstring written for obj itself: not inherited, not generated.

    ``dataclasses`` and ``NamedTuple`` make up a ``Name(field, ...)`` docstring
    for a class that has none; that does not count.
    """
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    doc = (doc or "").strip()
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


def documented_members(cls):
    """(name, member) of the public methods and properties cls defines itself
    (``__call__`` included: a layer's call is its API)."""
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(member, (staticmethod, classmethod, property)) or inspect.isfunction(member):
            yield name, member


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = [] if own_docstring(module) else [module_name]
    for name in public_names(module):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or callable(obj)):
            continue  # constants are described by their module's docstring
        if not own_docstring(obj):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            missing += [f"{module_name}.{name}.{m}" for m, v in documented_members(obj) if not own_docstring(v)]
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_names_have_docstrings(module_name):
    missing = undocumented(module_name)
    assert not missing, f"public names without a docstring (the API reference shows them empty): {missing}"


def test_check_sees_a_missing_docstring():
    """The check itself: an undocumented function, class (a generated dataclass
    docstring), method and ``__call__`` are all caught; documented ones pass."""
    import dataclasses
    import types

    def documented():
        """Has one."""

    def bare():
        pass

    @dataclasses.dataclass
    class Config:
        x: int = 0

        def method(self):
            pass

        def __call__(self):
            pass

    mod = types.ModuleType("fake_api", "A module.")
    mod.__all__ = ["documented", "bare", "Config"]
    mod.documented, mod.bare, mod.Config = documented, bare, Config
    import sys

    sys.modules["fake_api"] = mod
    try:
        assert undocumented("fake_api") == [
            "fake_api.bare", "fake_api.Config", "fake_api.Config.method", "fake_api.Config.__call__"]
    finally:
        del sys.modules["fake_api"]


def test_reference_pages_cover_the_public_modules():
    """docs/api/ has a page per public module, so the site shows each."""
    import pathlib

    pages = (pathlib.Path(__file__).parent.parent / "docs" / "api").glob("*.md")
    shown = {line.split(":::", 1)[1].split()[0] for p in pages for line in p.read_text().splitlines() if line.startswith(":::")}
    assert set(PUBLIC_MODULES) <= shown, sorted(set(PUBLIC_MODULES) - shown)
