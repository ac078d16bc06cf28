#!/usr/bin/env bash
# The whole GPU suite in one command, for a bare GPU machine:
#
#   bash scripts/gpu_suite.sh OUT_DIR
#
# Records the machine (OUT_DIR/env.txt), uses the prebuilt extension
# jax_ep/_C.cpython-312-x86_64-linux-gnu.so when present (else builds it), runs
# the single-process GPU tests with XLA command buffers on and off, every
# tests/gpu/multirank_*.py through `python -m jax_ep.launch -n R` for each R in
# ${JAX_EP_GPU_RANKS:-2 4 8} (the launcher starts CUDA MPS when ranks share a
# GPU), then benchmarks/run_all.sh OUT_DIR if it exists. Every step's output is
# tee'd into OUT_DIR as it runs, so the logs survive a timeout. It goes on after
# a failing step, prints a summary table and exits non-zero if any step failed.
#
#   JAX_EP_GPU_RANKS="2 4"      rank counts for the multi-rank scripts
#   JAX_EP_STEP_TIMEOUT=900     seconds allowed to each pytest / benchmark step
#   JAX_EP_SKIP_BENCH=1         skip benchmarks/run_all.sh
#   JAX_EP_AB_BASE=TARBALL      last, the "ab" step: scripts/ab_bench.sh TARBALL OUT_DIR/ab (an older build
#                               from scripts/ab_prepare.sh against this tree; AB_BASE2, AB_CONFIGS... apply;
#                               JAX_EP_AB_TIMEOUT=540 seconds)
#   JAX_EP_TRY_UCX=1            also run the put kernels over NVSHMEM's UCX proxy transport
#   JAX_EP_GPU_ONLY='regex'     run only the steps whose names match (bash =~)
#   JAX_EP_GPU_SKIP='regex'     skip the steps whose names match
#   JAX_EP_SOAK=1               also the soak_* steps (tests/gpu/soak.py): 1,000 dispatch+combine pairs
#                               per layout at R = 4, 10,000 low-latency pairs at R = 8, each step hashed;
#                               JAX_EP_SOAK_ARGS adds soak.py arguments (e.g. "--pairs 100")
#   JAX_EP_SANITIZE=1           also the sanitize_* steps: compute-sanitizer memcheck on every rank of the
#                               R = 2 intranode and low-latency scripts (JAX_EP_RANK_WRAPPER), racecheck and
#                               synccheck on the single-device tests; logs in OUT_DIR/sanitize/ (the
#                               ranks' reports in sanitize/logs_*/rank<i>.log)
#                               (JAX_EP_SANITIZER: the tool's path; JAX_EP_SANITIZE_MPS: the launcher's
#                               --mps for those runs, default auto; JAX_EP_SANITIZE_SKIP_CHECKS: checks
#                               of the rank scripts left out, default 'deepep|nvshmem', the slow shapes
#                               and NVSHMEM)
#
# A machine with no package index gets NVSHMEM, nvshmem4py and pytest from
# .gpu/deps.tar.xz (scripts/pack_gpu_deps.sh), unpacked here into /tmp/jax_ep_site.
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_suite.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_EP_TEST_GPU=1
STEP_TIMEOUT=${JAX_EP_STEP_TIMEOUT:-900}

STEP_NAMES=()
STEP_CODES=()
STEP_SECONDS=()

# step NAME LOG CMD...: run CMD, output to the terminal and appended to LOG.
# Each finished step appends its line to OUT/steps.txt, which survives a kill.
step() {
  local name=$1 log=$2
  shift 2
  if [ -n "${JAX_EP_GPU_ONLY:-}" ] && ! [[ $name =~ $JAX_EP_GPU_ONLY ]]; then return 0; fi
  if [ -n "${JAX_EP_GPU_SKIP:-}" ] && [[ $name =~ $JAX_EP_GPU_SKIP ]]; then return 0; fi
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local code=${PIPESTATUS[0]}
  STEP_NAMES+=("$name")
  STEP_CODES+=("$code")
  STEP_SECONDS+=("$((SECONDS - t0))")
  echo "=== $name: exit $code in $((SECONDS - t0)) s" | tee -a "$log"
  printf '%-40s %6s %8s\n' "$name" "$code" "$((SECONDS - t0))" >> "$OUT/steps.txt"
  return 0
}

# pytest exits 5 when nothing was collected: not a failure here.
pytest_step() {
  timeout --kill-after=30 "$STEP_TIMEOUT" python3 -m pytest "$@"
  local code=$?
  [ "$code" -eq 5 ] && { echo "(no tests collected)"; return 0; }
  return "$code"
}

if [ -f .gpu/deps.tar.xz ]; then
  SITE=/tmp/jax_ep_site
  if [ ! -d "$SITE/site" ]; then
    mkdir -p "$SITE" && tar -xJf .gpu/deps.tar.xz -C "$SITE"
  fi
  export PYTHONPATH="$PYTHONPATH:$SITE/site"
  export JAX_EP_NVSHMEM_HOST_LIB="$SITE/site/nvidia/nvshmem/lib/libnvshmem_host.so.3"
  export LD_LIBRARY_PATH="$SITE/site/nvidia/nvshmem/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "packages from .gpu/deps.tar.xz in $SITE/site"
fi

{
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  if git rev-parse --verify -q HEAD >/dev/null 2>&1; then
    echo "git: $(git rev-parse HEAD), $(git status --porcelain | wc -l) changed file(s)"
  else
    echo "git: (not a git checkout)"
  fi
  echo "--- nvidia-smi"
  nvidia-smi 2>&1
  echo "--- nvidia-smi -L"
  nvidia-smi -L 2>&1
  echo "--- python3"
  python3 --version 2>&1
  python3 -c 'import jax; print(jax.__version__); print(jax.devices())' 2>&1
  echo "--- nvcc"
  nvcc --version 2>&1 | tail -2
  echo "--- nvidia-cuda-mps-control: $(command -v nvidia-cuda-mps-control || echo missing)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

EXT=jax_ep/_C.cpython-312-x86_64-linux-gnu.so
if [ -f "$EXT" ]; then
  echo "using the prebuilt extension $EXT" | tee "$OUT/build.log"
else
  step build "$OUT/build.log" python3 -m pip install --no-build-isolation --no-deps -e .
fi
python3 -c 'import jax_ep._extension as e, jax_ep.nvshmem as n; print("jax_ep._C:", "available" if e.available() else e.unavailable_reason()); print("jax_ep._nvshmem:", n.version() if n.available() else n.unavailable_reason())' \
  2>&1 | tee -a "$OUT/build.log"

step gpu_single "$OUT/gpu_single.log" pytest_step -q tests/gpu -m "not multirank"
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" \
  step gpu_single_nocmdbuf "$OUT/gpu_single_nocmdbuf.log" pytest_step -q tests/gpu -m "not multirank"

shopt -s nullglob
MULTIRANK=(tests/gpu/multirank_*.py)
shopt -u nullglob
for R in ${JAX_EP_GPU_RANKS:-2 4 8}; do
  for f in "${MULTIRANK[@]}"; do
    name=$(basename "$f" .py)
    # Registered buffers live beside XLA's pool: keep the pool to half the GPU.
    XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.5 / $R:.3f}')") \
    step "${name}_R$R" "$OUT/multirank_R$R.log" \
      timeout --kill-after=30 400 python3 -m jax_ep.launch -n "$R" --timeout 300 \
        --log-dir "$OUT/logs_R$R/$name" "$f"
  done
done

# One process driving every local GPU (a buffer group); skips itself with one GPU.
step single_process_multi_gpu "$OUT/single_process_multi_gpu.log" \
  timeout --kill-after=30 300 python3 tests/gpu/single_process_multi_gpu.py

# Opt-in: the put kernels with NVSHMEM's proxy transport between the ranks
# (P2P off, UCX over the loopback; needs pip install libucx-cu13), so the puts
# are asynchronous as over a network. Not yet known to run.
if [ -n "${JAX_EP_TRY_UCX:-}" ]; then
  UCX_LIB=$(python3 -c 'import libucx, os; print(os.path.join(list(libucx.__path__)[0], "lib"))' 2>/dev/null)
  NVSHMEM_DISABLE_P2P=1 NVSHMEM_REMOTE_TRANSPORT=ucx LD_LIBRARY_PATH="${UCX_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 \
    step ll_put_direct_ucx_R2 "$OUT/ll_put_direct_ucx.log" \
      timeout --kill-after=30 300 python3 -m jax_ep.launch -n 2 --timeout 240 \
        --log-dir "$OUT/logs_ucx" tests/gpu/multirank_ll_put_direct.py
  # The same through Buffer and jit (R = 2: two virtual nodes of one rank).
  NVSHMEM_DISABLE_P2P=1 NVSHMEM_REMOTE_TRANSPORT=ucx LD_LIBRARY_PATH="${UCX_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 \
    step virtual_nodes_ucx_R2 "$OUT/virtual_nodes_ucx.log" \
      timeout --kill-after=30 300 python3 -m jax_ep.launch -n 2 --timeout 240 \
        --log-dir "$OUT/logs_ucx_vn" tests/gpu/multirank_virtual_nodes.py
fi

# Opt-in soak: many pairs in a row, every step's outputs hashed against its
# input set's first step (a mismatch or a kernel timeout names the step).
if [ -n "${JAX_EP_SOAK:-}" ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 \
    step soak_normal_R4 "$OUT/soak.log" \
      timeout --kill-after=30 500 python3 -m jax_ep.launch -n 4 --timeout 470 --log-dir "$OUT/logs_soak/normal_R4" \
        tests/gpu/soak.py --mode normal --pairs 1000 --budget-s 180 ${JAX_EP_SOAK_ARGS:-}
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 \
    step soak_low_latency_R8 "$OUT/soak.log" \
      timeout --kill-after=30 500 python3 -m jax_ep.launch -n 8 --timeout 470 --log-dir "$OUT/logs_soak/ll_R8" \
        tests/gpu/soak.py --mode low_latency --pairs 10000 --budget-s 360 ${JAX_EP_SOAK_ARGS:-}
fi

# Opt-in compute-sanitizer runs: memcheck wraps every rank process of the R = 2
# scripts (through the launcher's JAX_EP_RANK_WRAPPER); racecheck and synccheck
# run the single-device kernel tests. Exit 9 = the tool found errors.
if [ -n "${JAX_EP_SANITIZE:-}" ]; then
  SANITIZER=${JAX_EP_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)}
  mkdir -p "$OUT/sanitize"
  sanitize_missing() { echo "compute-sanitizer not found (set JAX_EP_SANITIZER)"; return 127; }
  for f in multirank_intranode multirank_low_latency; do
    if [ -z "$SANITIZER" ]; then step "sanitize_memcheck_${f#multirank_}_R2" "$OUT/sanitize/memcheck.log" sanitize_missing; continue; fi
    JAX_EP_RANK_WRAPPER="$SANITIZER --tool memcheck --error-exitcode 9 --print-limit 50" \
    JAX_EP_SKIP_CHECKS="${JAX_EP_SANITIZE_SKIP_CHECKS-deepep|nvshmem}" \
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 \
      step "sanitize_memcheck_${f#multirank_}_R2" "$OUT/sanitize/memcheck.log" \
        timeout --kill-after=30 "$STEP_TIMEOUT" python3 -m jax_ep.launch -n 2 --mps "${JAX_EP_SANITIZE_MPS:-auto}" \
          --timeout "$((STEP_TIMEOUT - 60))" --log-dir "$OUT/sanitize/logs_${f#multirank_}" "tests/gpu/$f.py"
  done
  for tool in racecheck synccheck; do
    if [ -z "$SANITIZER" ]; then step "sanitize_${tool}_single" "$OUT/sanitize/$tool.log" sanitize_missing; continue; fi
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" \
      step "sanitize_${tool}_single" "$OUT/sanitize/$tool.log" \
        timeout --kill-after=30 "$STEP_TIMEOUT" "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 50 \
          python3 -m pytest -q tests/gpu/test_single_device_kernels.py
  done
fi

step missing_peer "$OUT/missing_peer.log" timeout --kill-after=10 200 python3 tests/gpu/check_missing_peer.py 2
step misordered_calls "$OUT/misordered_calls.log" timeout --kill-after=10 200 python3 tests/gpu/check_misordered_calls.py 2
# Faults: a rank that stops (the others leave within 1 s of the first timeout)
# and ranks that make different calls (all stop at once, naming the field).
step stopped_rank "$OUT/stopped_rank.log" timeout --kill-after=10 200 python3 tests/gpu/check_stopped_rank.py 4
# The same on the low-latency put path: R = 2 in two virtual nodes (the abort
# reaches the peer by a put), R = 4 in nodes of two (by a store and by puts).
step put_stopped_rank_2x1 "$OUT/put_stopped_rank_2x1.log" \
  timeout --kill-after=10 200 python3 tests/gpu/check_put_stopped_rank.py 2 1
step put_stopped_rank_2x2 "$OUT/put_stopped_rank_2x2.log" \
  timeout --kill-after=10 200 python3 tests/gpu/check_put_stopped_rank.py 4 2
# The same in internode normal mode: R = 2 in two nodes of one, R = 4 in nodes of two.
step internode_stopped_rank_2x1 "$OUT/internode_stopped_rank_2x1.log" \
  timeout --kill-after=10 200 python3 tests/gpu/check_put_stopped_rank.py 2 1 internode
step internode_stopped_rank_2x2 "$OUT/internode_stopped_rank_2x2.log" \
  timeout --kill-after=10 200 python3 tests/gpu/check_put_stopped_rank.py 4 2 internode
step mismatch "$OUT/mismatch.log" timeout --kill-after=10 300 python3 tests/gpu/check_mismatch.py 2
# The same on the low-latency put path (signatures over puts): R = 2 in two
# virtual nodes, R = 4 in nodes of two (a store to one peer, puts to the others).
step put_mismatch_2x1 "$OUT/put_mismatch_2x1.log" \
  timeout --kill-after=10 300 python3 tests/gpu/check_mismatch.py 2 put 1
step put_mismatch_2x2 "$OUT/put_mismatch_2x2.log" \
  timeout --kill-after=10 300 python3 tests/gpu/check_mismatch.py 4 put 2

if [ -f benchmarks/run_all.sh ] && [ -z "${JAX_EP_SKIP_BENCH:-}" ]; then
  step benchmarks "$OUT/benchmarks.log" timeout --kill-after=30 "$STEP_TIMEOUT" bash benchmarks/run_all.sh "$OUT"
fi

# An A/B of an older build against this tree (scripts/ab_bench.sh; its AB_* variables apply).
if [ -n "${JAX_EP_AB_BASE:-}" ]; then
  step ab "$OUT/ab.log" timeout --kill-after=30 "${JAX_EP_AB_TIMEOUT:-540}" bash scripts/ab_bench.sh "$JAX_EP_AB_BASE" "$OUT/ab"
fi

{
  echo
  printf '%-40s %6s %8s\n' step exit seconds
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-40s %6s %8s\n' "${STEP_NAMES[$i]}" "${STEP_CODES[$i]}" "${STEP_SECONDS[$i]}"
  done
  echo "results in $OUT"
} | tee "$OUT/summary.txt"
for c in "${STEP_CODES[@]}"; do [ "$c" -ne 0 ] && exit 1; done
exit 0
