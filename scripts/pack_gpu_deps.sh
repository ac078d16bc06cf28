#!/usr/bin/env bash
# Pack what a bare GPU machine lacks into .gpu/deps.tar.xz (ignored by git),
# for a machine with no package index: the NVSHMEM host library and its
# bootstrap/transport plugins (the device library is linked into _nvshmem at
# build time), nvshmem4py with cuda-python, and pytest. Taken from this
# checkout's .venv (scripts/setup_env.sh). scripts/gpu_suite.sh unpacks it.
#
#   bash scripts/pack_gpu_deps.sh        # then carry .gpu with the run
#   JAX_EP_PACK_UCX=1 ...                # also libucx-cu13 (from .whl/), for JAX_EP_TRY_UCX
set -euo pipefail
cd "$(dirname "$0")/.."
SP=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
site=$stage/site
mkdir -p "$site/nvidia/nvshmem/lib"
for f in libnvshmem_host.so.3 nvshmem_bootstrap_uid.so.3 nvshmem_transport_ucx.so.3 \
         nvshmem_transport_ibgda.so.3 nvshmem_transport_ibrc.so.3; do
  cp "$SP/nvidia/nvshmem/lib/$f" "$site/nvidia/nvshmem/lib/"
done
for d in nvshmem cuda _pytest pytest pluggy iniconfig py.py "$SP"/nvidia_nvshmem_cu13-*.dist-info \
         "$SP"/nvshmem4py_cu13-*.dist-info "$SP"/cuda_*-*.dist-info "$SP"/pytest-*.dist-info \
         "$SP"/pluggy-*.dist-info "$SP"/iniconfig-*.dist-info; do
  cp -r "$SP/$(basename "$d")" "$site/"
done
# Sources and the numba device bindings are not needed to run.
find "$site" \( -name '*.cpp' -o -name '*.pyx' -o -name '*.pxd' \) -delete
find "$site" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$site"/nvshmem/bindings/device/numba*
if [ -n "${JAX_EP_PACK_UCX:-}" ]; then
  (cd "$site" && unzip -q -o "$OLDPWD"/.whl/libucx_cu13-*.whl)
fi
mkdir -p .gpu
tar -cJf .gpu/deps.tar.xz -C "$stage" site
ls -la .gpu/deps.tar.xz
