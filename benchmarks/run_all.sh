#!/usr/bin/env bash
# Every GPU benchmark, results under OUT_DIR/bench/:
#   bash benchmarks/run_all.sh OUT_DIR
#   * intranode normal mode for each R in JAX_EP_BENCH_RANKS (default "2 4 8")
#   * low-latency mode at R = JAX_EP_LL_BENCH_RANKS (default 8), DeepEP's LL configuration
#   * the same over NVSHMEM puts, two virtual nodes of R/2 ranks, at R = JAX_EP_LL_PUT_BENCH_RANKS
#     (default "2 4 8"), beside a flat run at the same R (JSON low_latency_R{R}_rpn{R/2}.json)
#   * internode normal mode on two virtual nodes of R/2 ranks at R = JAX_EP_INTERNODE_BENCH_RANKS
#     (default "4 8"), DeepEP's internode configuration (JSON internode_R{R}_rpn{R/2}.json)
#   * the MoE layer against the all_to_all baseline on one GPU (compare_moe.py), and piece by
#     piece (profile_layer.py; JAX_EP_PROFILE_LAYER="" skips it)
#   * only with JAX_EP_DROPLESS_BENCH=1: dropless rounds with the kernels (dropless_gpu.py), peak
#     memory and step time per capacity in JAX_EP_DROPLESS_FACTORS (default "worst 2.0 1.25 1.0")
#     at R in JAX_EP_DROPLESS_RANKS (default 2); JAX_EP_DROPLESS_ARGS adds arguments (e.g. "--tokens 2048")
# Set a variable to "" to skip that part.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_all.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for R in ${JAX_EP_BENCH_RANKS-2 4 8}; do
  case $R in
    8) sms=${JAX_EP_BENCH_SMS_R8:-8,16} ;;
    4) sms=${JAX_EP_BENCH_SMS_R4:-24,32} ;;
    *) sms=${JAX_EP_BENCH_SMS_R2:-24,48} ;;
  esac
  # Leave room next to XLA's pools for the registered buffers and the copy roofline.
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.55 / $R:.3f}')") \
    python3 -m jax_ep.launch -n "$R" --timeout 500 benchmarks/bench_intranode.py --sms "$sms" --out "$OUT/bench" \
    || status=1
done
for R in ${JAX_EP_LL_BENCH_RANKS-8}; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.45 / $R:.3f}')") \
    python3 -m jax_ep.launch -n "$R" --timeout 400 benchmarks/bench_low_latency.py \
      --sms "${JAX_EP_LL_SMS:-4,8,16}" --out "$OUT/bench" || status=1
done
for R in ${JAX_EP_LL_PUT_BENCH_RANKS-2 4 8}; do
  # The flat NVLink run at this R (skipped where the loop above ran it), then the put path.
  case " ${JAX_EP_LL_BENCH_RANKS-8} " in
    *" $R "*) ;;
    *) XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.45 / $R:.3f}')") \
         python3 -m jax_ep.launch -n "$R" --timeout 400 benchmarks/bench_low_latency.py \
           --sms "${JAX_EP_LL_SMS:-4,8,16}" --out "$OUT/bench" || status=1 ;;
  esac
  # The put path's buffer at DeepEP's shape is about 2 GiB per rank: a symmetric heap above it.
  NVSHMEM_SYMMETRIC_SIZE=${JAX_EP_LL_PUT_HEAP:-2684354560} \
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.3 / $R:.3f}')") \
    python3 -m jax_ep.launch -n "$R" --timeout 400 benchmarks/bench_low_latency.py \
      --sms "${JAX_EP_LL_SMS:-4,8,16}" --ranks-per-node $((R / 2)) --out "$OUT/bench" || status=1
done
for R in ${JAX_EP_INTERNODE_BENCH_RANKS-4 8}; do
  # Its buffer (rings, metas and placements, both halves) is a few hundred MiB per rank at DeepEP's shape.
  NVSHMEM_SYMMETRIC_SIZE=${JAX_EP_INTERNODE_HEAP:-3221225472} \
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.3 / $R:.3f}')") \
    python3 -m jax_ep.launch -n "$R" --timeout 500 benchmarks/bench_internode.py \
      --ranks-per-node $((R / 2)) --out "$OUT/bench" || status=1
done
if [ -n "${JAX_EP_PROFILE_LAYER-1}" ]; then
  # The layer's pieces against the baseline's on one GPU (one process, R = 1).
  python3 benchmarks/profile_layer.py --platform gpu --json "$OUT/bench/profile_layer.json" \
    2>&1 | tee "$OUT/bench/profile_layer.txt" || status=1
fi
if [ -n "${JAX_EP_DROPLESS_BENCH:-}" ]; then
  # Dropless rounds with the kernels: one run per capacity (each process's peak is its own).
  for R in ${JAX_EP_DROPLESS_RANKS-2}; do
    for f in ${JAX_EP_DROPLESS_FACTORS-worst 2.0 1.25 1.0}; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m jax_ep.launch -n "$R" --timeout 500 \
        benchmarks/dropless_gpu.py --capacity-factor "$f" --out "$OUT/bench" ${JAX_EP_DROPLESS_ARGS:-} || status=1
    done
  done
fi
if [ -n "${JAX_EP_COMPARE-1}" ]; then
  python3 benchmarks/compare_moe.py --platform gpu --ranks 1 --tokens 2048 --hidden 1024 --ffn 2048 \
    --experts 32 --topk 4 --iters 10 2>&1 | tee "$OUT/bench/compare_moe_gpu.txt" || status=1
fi
exit $status
