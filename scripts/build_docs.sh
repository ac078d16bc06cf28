#!/usr/bin/env bash
# Build the documentation site -- the pages of docs/ and the API reference
# generated from the docstrings (mkdocs.yml) -- in strict mode: a warning, such
# as a broken link or cross-reference, fails the build. Output: site/index.html.
#
# mkdocstrings reads jax_ep/ statically, so the site needs only the `docs`
# extra's packages, installed into a venv of their own (.venv-docs). A public
# name without a docstring is caught by tests/test_api_docstrings.py, which
# this script also runs when the project venv (.venv, scripts/setup_env.sh)
# exists.
#   PYTHON=...  interpreter for .venv-docs (default: Python 3.12)
#   extra arguments go to `mkdocs build`
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-docs/bin/python ]; then
  py=${PYTHON:-}
  if [ -z "$py" ]; then
    for p in "$HOME/.pyenv/versions/3.12.1/bin/python" python3.12 python3; do
      if command -v "$p" >/dev/null 2>&1; then py=$p; break; fi
    done
  fi
  "$py" -m venv .venv-docs
fi
# The docs extra of pyproject.toml is the one list of the site's packages.
mapfile -t reqs < <(.venv-docs/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
.venv-docs/bin/python -m pip install -q "${reqs[@]}"

if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pytest -q tests/test_api_docstrings.py
else
  echo "build_docs: no .venv: the docstring check (tests/test_api_docstrings.py) did not run; bash scripts/setup_env.sh makes it"
fi
NO_MKDOCS_2_WARNING=1 .venv-docs/bin/mkdocs build --strict "$@"
echo "build_docs: site/index.html"
