#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned toolchain and install jax_ep into it
# in editable mode; the CUDA extension builds when nvcc is found.
#   PYTHON=...  interpreter to build the venv from (default: Python 3.12)
#   JAX_EP_CUDA=OFF  skip the CUDA extension
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in "$HOME/.pyenv/versions/3.12.1/bin/python" python3.12; do
    if command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi
  done
  echo "python3"
}

if [ ! -x .venv/bin/python ]; then
  py=$(pick_python)
  echo "jax_ep setup: creating .venv with $($py --version 2>&1) ($py)"
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# jax 0.11.2 is what the GPU machines run; keep CPU CI on the same version.
# nvidia-nvshmem-cu13 3.4.5 is the NVSHMEM the GPU machines run (the device
# library must not be newer than the host library it meets).
python -m pip install -q "jax==0.11.2" "nvidia-nvshmem-cu13==3.4.5" "nvshmem4py-cu13==0.4.1" numpy "nanobind>=2" "scikit-build-core>=0.10" cmake ninja \
  pytest hypothesis optax flax equinox tqdm
if [ "${JAX_EP_CUDA:-}" = OFF ]; then
  echo "jax_ep setup: JAX_EP_CUDA=OFF; installing without the CUDA extension"
elif command -v nvcc >/dev/null 2>&1 || [ -n "${CUDACXX:-}" ]; then
  echo "jax_ep setup: nvcc found, building the CUDA extension jax_ep._C (a few minutes)"
else
  echo "jax_ep setup: no nvcc on PATH; installing without the CUDA extension"
fi
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import jax, jax_ep, jax_ep._extension as e; print('jax', jax.__version__, '| jax_ep', jax_ep.__version__, '| CUDA extension:', 'built' if e.available() else 'absent')"
