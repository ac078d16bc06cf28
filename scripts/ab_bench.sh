#!/usr/bin/env bash
# A/B benchmark of an older jax_ep tree ("base") against this tree ("head") in one
# GPU session, on one GPU, in one command (about 6 minutes with the defaults):
#
#   bash scripts/ab_bench.sh .gpu/ab/base-REV.tar.gz OUT_DIR
#
# base: a tarball from scripts/ab_prepare.sh REV (the tree at REV with its
# prebuilt jax_ep/_C*.so), unpacked into $AB_WORK. head: this repository with
# its extension built in place (jax_ep/_C*.so; jax_ep/_nvshmem*.so and
# .gpu/deps.tar.xz are used as scripts/gpu_suite.sh uses them, where present).
# Each tree runs its own benchmark scripts and launcher against its own
# extension (PYTHONPATH = that tree only, plus the NVSHMEM wheels for head):
#
#   ll_R1         benchmarks/bench_low_latency.py at R = 1, --sms $AB_SMS_ll_R1 (16)
#   ll_R8         benchmarks/bench_low_latency.py at R = 8, --sms $AB_SMS_ll_R8 (8,16)
#   intranode_R8  benchmarks/bench_intranode.py   at R = 8, --sms $AB_SMS_intranode_R8 (8,16)
#
# The low-latency runs get $AB_LL_ARGS (default "--no-profile --no-overlap":
# the latency loops only), the intranode runs $AB_INTRANODE_ARGS (default none).
# Runs alternate trees: round 1 runs every configuration base then head,
# round 2 head then base (ABBA, so drift over the session weighs on both
# alike), for $AB_ROUNDS rounds (2). No run starts after $AB_BUDGET_S seconds
# (450) and every run is stopped by $AB_END_S (480), so the command ends
# within about 8 minutes whatever happens; a run that fails within 60 s is
# retried once (a launcher's port race, say).
#
# OUT_DIR gets (at most 5 files, each rewritten after every run so a kill
# leaves what was done): ab_table.md (every row), ab_summary.json (rows and
# per-round values, benchmarks/ab_compare.py), ab_runs.tar.gz (each run's JSON
# and full log), env.txt (GPU, both trees' revisions and import checks). The
# headline table (median over rounds per tree, head/base) is printed last.
#
#   AB_CONFIGS="ll_R1 ll_R8 intranode_R8"   configurations (ll_R<N>, intranode_R<N>), in run order
#   AB_SMS_<config>=LIST                    SM budgets of that configuration
#   AB_NOSIG=1                              also run head with --no-signatures (tree "nosig",
#                                           JAX_EP_CALL_SIGNATURES=0): the cost of the call signatures
#   AB_BASE2=TARBALL                        a second older tree (tree "base2", run between base and
#                                           head), e.g. to tell which range of commits moved a time
#   AB_RUN_TIMEOUT=150                      seconds allowed to one run
#   AB_WORK=/tmp/jax_ep_ab                  scratch folder (emptied first)
#   AB_HEAD=DIR                             the head tree (default: this repository)
set -uo pipefail
if [ $# -ne 2 ]; then
  echo "usage: bash scripts/ab_bench.sh BASE_TARBALL OUT_DIR" >&2
  exit 2
fi
BASE_TGZ=$(realpath "$1")
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
SELF=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${AB_HEAD:-$SELF}
WORK=${AB_WORK:-/tmp/jax_ep_ab}
ROUNDS=${AB_ROUNDS:-2}
BUDGET_S=${AB_BUDGET_S:-450}
END_S=${AB_END_S:-480}
RUN_TIMEOUT=${AB_RUN_TIMEOUT:-150}
CONFIGS=(${AB_CONFIGS:-ll_R1 ll_R8 intranode_R8})
LL_ARGS=${AB_LL_ARGS---no-profile --no-overlap}
INTRANODE_ARGS=${AB_INTRANODE_ARGS:-}
T0=$SECONDS
FAILED=0
COMPARED=1

rm -rf "$WORK" && mkdir -p "$WORK/runs" "$WORK/logs" || exit 1
# unpack_base TARBALL DIR: a tree from scripts/ab_prepare.sh, with its extension, into DIR/jax_ep_base.
unpack_base() {
  mkdir -p "$2" && tar -xzf "$1" -C "$2" || { echo "cannot unpack $1" >&2; exit 1; }
  [ -d "$2/jax_ep_base/jax_ep" ] || { echo "$1 has no jax_ep_base/jax_ep (not from scripts/ab_prepare.sh?)" >&2; exit 1; }
  compgen -G "$2/jax_ep_base/jax_ep/_C*.so" >/dev/null || { echo "no jax_ep/_C*.so in $1" >&2; exit 1; }
}
unpack_base "$BASE_TGZ" "$WORK/base"
BASE="$WORK/base/jax_ep_base"
BASE2=
if [ -n "${AB_BASE2:-}" ]; then
  unpack_base "$(realpath "$AB_BASE2")" "$WORK/base2"
  BASE2="$WORK/base2/jax_ep_base"
fi
shopt -s nullglob
head_so=("$ROOT"/jax_ep/_C*.so)
shopt -u nullglob
[ ${#head_so[@]} -gt 0 ] || { echo "no $ROOT/jax_ep/_C*.so: build head in place (pip install --no-build-isolation -e .) and carry it" >&2; exit 1; }

# The NVSHMEM wheels for head, as scripts/gpu_suite.sh sets them up.
HEAD_PYTHONPATH="$ROOT"
HEAD_LD="${LD_LIBRARY_PATH:-}"
HEAD_NVSHMEM_LIB="${JAX_EP_NVSHMEM_HOST_LIB:-}"
if [ -f "$ROOT/.gpu/deps.tar.xz" ]; then
  SITE=/tmp/jax_ep_site
  [ -d "$SITE/site" ] || { mkdir -p "$SITE" && tar -xJf "$ROOT/.gpu/deps.tar.xz" -C "$SITE"; }
  HEAD_PYTHONPATH="$ROOT:$SITE/site"
  HEAD_NVSHMEM_LIB="$SITE/site/nvidia/nvshmem/lib/libnvshmem_host.so.3"
  HEAD_LD="$SITE/site/nvidia/nvshmem/lib${HEAD_LD:+:$HEAD_LD}"
fi

# in_tree TREE CMD...: run CMD in that tree's folder with that tree's environment.
in_tree() {
  local tree=$1
  shift
  case $tree in
    base) (cd "$BASE" && env PYTHONPATH="$BASE" "$@") ;;
    base2) (cd "$BASE2" && env PYTHONPATH="$BASE2" "$@") ;;
    head) (cd "$ROOT" && env PYTHONPATH="$HEAD_PYTHONPATH" LD_LIBRARY_PATH="$HEAD_LD" \
             JAX_EP_NVSHMEM_HOST_LIB="$HEAD_NVSHMEM_LIB" "$@") ;;
    nosig) (cd "$ROOT" && env PYTHONPATH="$HEAD_PYTHONPATH" LD_LIBRARY_PATH="$HEAD_LD" \
              JAX_EP_NVSHMEM_HOST_LIB="$HEAD_NVSHMEM_LIB" JAX_EP_CALL_SIGNATURES=0 "$@") ;;
  esac
}

tree_dir() { case $1 in base) echo "$BASE" ;; base2) echo "$BASE2" ;; *) echo "$ROOT" ;; esac; }

{
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  echo "base tarball: $BASE_TGZ"
  sed 's/^/base /' "$BASE/AB_REVISION" 2>/dev/null
  [ -z "$BASE2" ] || sed 's/^/base2 /' "$BASE2/AB_REVISION" 2>/dev/null
  if git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    echo "head commit: $(git -C "$ROOT" rev-parse HEAD), $(git -C "$ROOT" status --porcelain | wc -l) changed file(s)"
  fi
  echo "head extension: $(ls -l "${head_so[@]}" | awk '{print $5, $6, $7, $8, $9}')"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1
  python3 -c 'import jax; print("jax", jax.__version__)' 2>&1 | tail -1
} > "$WORK/env.txt"
TREES=(base)
[ -z "$BASE2" ] || TREES+=(base2)
TREES+=(head)
[ -z "${AB_NOSIG:-}" ] || TREES+=(nosig)
for tree in "${TREES[@]}"; do
  [ "$tree" != nosig ] || continue
  # Each tree must import its own jax_ep and load its own extension.
  in_tree "$tree" python3 -c '
import os, sys, jax_ep, jax_ep._extension as e
tree = os.path.realpath(sys.argv[1])
where = os.path.realpath(jax_ep.__file__)
print(sys.argv[2], "jax_ep from", where, "| extension:", "available" if e.available() else e.unavailable_reason())
sys.exit(0 if where.startswith(tree + os.sep) and e.available() else 1)' "$(tree_dir "$tree")" "$tree" \
    >> "$WORK/env.txt" 2>&1 || { cat "$WORK/env.txt"; echo "$tree: wrong jax_ep or no extension" >&2; exit 1; }
done
cat "$WORK/env.txt"

# publish: the comparison and the run archive into OUT (after every run).
publish() {
  cp "$WORK/env.txt" "$OUT/env.txt"
  python3 "$SELF/benchmarks/ab_compare.py" "$WORK/runs" --json "$OUT/ab_summary.json" --md "$OUT/ab_table.md" \
    --meta "base=$(sed -n 's/^commit: //p' "$BASE/AB_REVISION")" \
    --meta "head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    ${BASE2:+--meta "base2=$(sed -n 's/^commit: //p' "$BASE2/AB_REVISION")"} > "$WORK/table.txt" 2>&1
  COMPARED=$?
  tar -czf "$OUT/ab_runs.tar.gz" -C "$WORK" runs logs env.txt table.txt 2>/dev/null
}

# run_one CONFIG TREE ROUND: one benchmark process group; output to its log, a line to the console.
run_one() {
  local config=$1 tree=$2 round=$3
  local kind=${config%_R*} R=${config##*_R}
  local sms_var="AB_SMS_$config"
  local script args frac sms
  case $kind in
    ll) script=benchmarks/bench_low_latency.py; sms=${!sms_var:-$([ "$R" = 1 ] && echo 16 || echo 8,16)}
        args="--sms $sms $LL_ARGS"; frac=0.45 ;;
    intranode) script=benchmarks/bench_intranode.py; sms=${!sms_var:-8,16}
        args="--sms $sms $INTRANODE_ARGS"; frac=0.55 ;;
    *) echo "unknown configuration $config (ll_R<N> or intranode_R<N>)" >&2; return 1 ;;
  esac
  local dir="$WORK/runs/$config/${tree}_r$round" log="$WORK/logs/${config}_${tree}_r$round.log"
  local attempt code t0 left
  for attempt in 1 2; do
    left=$((END_S - (SECONDS - T0)))
    [ $((SECONDS - T0)) -lt "$BUDGET_S" ] && [ "$left" -gt 30 ] || {
      echo "skip $config $tree r$round: $((SECONDS - T0)) s spent"; return 0; }
    [ "$left" -lt "$RUN_TIMEOUT" ] || left=$RUN_TIMEOUT
    rm -rf "$dir" && mkdir -p "$dir"
    t0=$SECONDS
    echo "=== $config $tree r$round attempt $attempt ($(date -u +%H:%M:%S), limit $left s)" >> "$log"
    # shellcheck disable=SC2086
    in_tree "$tree" XLA_PYTHON_CLIENT_MEM_FRACTION="$(python3 -c "print(f'{$frac / $R:.3f}')")" \
      timeout --kill-after=10 "$left" python3 -m jax_ep.launch -n "$R" --timeout "$((left - 5))" \
        "$script" $args --out "$dir" >> "$log" 2>&1
    code=$?
    printf '%-14s %-5s r%s  exit %3s in %3s s  (%s s spent)\n' "$config" "$tree" "$round" "$code" \
      "$((SECONDS - t0))" "$((SECONDS - T0))"
    [ "$code" -eq 0 ] && return 0
    tail -n 25 "$log" | sed "s/^/  [$config $tree r$round] /"
    [ $((SECONDS - t0)) -lt 60 ] || break
  done
  FAILED=$((FAILED + 1))
}

echo "configurations: ${CONFIGS[*]}; trees: ${TREES[*]}; rounds: $ROUNDS; budget ${BUDGET_S} s, end by ${END_S} s"
for round in $(seq 1 "$ROUNDS"); do
  order=("${TREES[@]}")
  if [ $((round % 2)) -eq 0 ]; then  # reversed every other round
    order=()
    for ((i = ${#TREES[@]} - 1; i >= 0; i--)); do order+=("${TREES[$i]}"); done
  fi
  for config in "${CONFIGS[@]}"; do
    for tree in "${order[@]}"; do
      run_one "$config" "$tree" "$round"
      publish
    done
  done
done
publish
echo
echo "all rows: $OUT/ab_table.md; rows and per-round values: $OUT/ab_summary.json; runs and logs: $OUT/ab_runs.tar.gz"
echo "A/B in $((SECONDS - T0)) s: base $(sed -n 's/^commit: //p' "$BASE/AB_REVISION" | cut -c1-7) against head $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
cat "$WORK/table.txt"
[ "$FAILED" -eq 0 ] || echo "$FAILED run(s) failed: see their logs in ab_runs.tar.gz (logs/)"
[ "$FAILED" -eq 0 ] && [ "$COMPARED" -eq 0 ]
