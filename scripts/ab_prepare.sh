#!/usr/bin/env bash
# Prebuild an older revision of jax_ep for an A/B benchmark against the current
# tree (scripts/ab_bench.sh), on a machine with nvcc and no GPU:
#
#   bash scripts/ab_prepare.sh REV            # e.g. 4652ab0
#
# Exports the tree at REV (git archive) into a temporary folder, builds its
# CUDA extension jax_ep._C for sm_90a with CMake (the revision's own
# CMakeLists.txt; no NVSHMEM module: the A/B runs the NVLink/IPC paths only),
# and packs what the benchmarks need (jax_ep/ with the built .so,
# benchmarks/, the CUDA and FFI sources for reference, the build files) into
# .gpu/ab/base-REV.tar.gz, with one top folder jax_ep_base/ and a file
# jax_ep_base/AB_REVISION naming the commit. .gpu/ is git-ignored; name the
# tarball in the device call's carry list.
#
#   PYTHON=...            the interpreter whose jax (FFI headers) and nanobind
#                         build it (default: .venv/bin/python, else python3);
#                         cp312 like the GPU machines
#   JAX_EP_AB_JOBS=2      parallel compile jobs
#   JAX_EP_AB_KEEP=1      keep the temporary folder (its path is printed)
set -euo pipefail
REV=${1:?usage: bash scripts/ab_prepare.sh REV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3 )}
# cmake and ninja from the interpreter's environment first (the venv has both).
export PATH="$(dirname "$PYTHON"):$PATH"
SHA=$(git rev-parse --verify "$REV^{commit}")
SHORT=$(git rev-parse --short=7 "$SHA")
OUT_TGZ="$ROOT/.gpu/ab/base-$SHORT.tar.gz"
WORK=$(mktemp -d /tmp/jax_ep_ab_prepare.XXXXXX)
[ -n "${JAX_EP_AB_KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
TREE="$WORK/jax_ep_base"
mkdir -p "$TREE" "$ROOT/.gpu/ab"

echo "exporting $SHORT into $TREE"
git archive --format=tar "$SHA" | tar -x -C "$TREE"
{
  echo "commit: $SHA"
  echo "subject: $(git log -1 --format=%s "$SHA" | cut -c1-200)"
  echo "date: $(git log -1 --format=%cI "$SHA")"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(nvcc --version | tail -1), $("$PYTHON" -c 'import sys, jax, nanobind; print(f"python {sys.version.split()[0]}, jax {jax.__version__}, nanobind {nanobind.__version__}")')"
} > "$TREE/AB_REVISION"
cat "$TREE/AB_REVISION"

# The revision's own CMake build, out of tree; the module lands in build/jax_ep/.
# JAX_EP_NVSHMEM=OFF (a cache variable and the environment, which wins where the
# revision reads it): no jax_ep._nvshmem, so the tarball stays small.
export JAX_EP_NVSHMEM=OFF JAX_EP_CUDA=ON
nice cmake -S "$TREE" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PYTHON" -DJAX_EP_CUDA=ON -DJAX_EP_NVSHMEM=OFF -DJAX_EP_CUDA_ARCHITECTURES=90a
nice cmake --build "$WORK/build" -j "${JAX_EP_AB_JOBS:-2}"
shopt -s nullglob
built=("$WORK"/build/jax_ep/_C*.so)
[ ${#built[@]} -eq 1 ] || { echo "expected one built jax_ep/_C*.so, got: ${built[*]:-none}" >&2; exit 1; }
cp "${built[0]}" "$TREE/jax_ep/"
if command -v cuobjdump >/dev/null; then cuobjdump --list-elf "$TREE/jax_ep/$(basename "${built[0]}")"; fi

# What a benchmark run needs, and the sources behind the .so; no docs, tests or examples.
keep=(jax_ep benchmarks cuda xla_ffi cmake CMakeLists.txt pyproject.toml AB_REVISION)
present=()
for k in "${keep[@]}"; do [ -e "$TREE/$k" ] && present+=("jax_ep_base/$k"); done
tar -czf "$OUT_TGZ" -C "$WORK" --exclude=__pycache__ "${present[@]}"
echo "wrote $OUT_TGZ ($(du -h "$OUT_TGZ" | cut -f1))"
