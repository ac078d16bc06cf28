#!/usr/bin/env bash
# Run the intranode benchmark for each rank count on this machine's GPUs:
#   bash benchmarks/run_all.sh OUT_DIR
# JSON lands in OUT_DIR/bench/; a table is printed per rank count.
#   JAX_EP_BENCH_RANKS="2 4 8"   rank counts
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_all.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/bench"
status=0
for R in ${JAX_EP_BENCH_RANKS:-2 4 8}; do
  case $R in
    8) sms=${JAX_EP_BENCH_SMS_R8:-8,16} ;;
    4) sms=${JAX_EP_BENCH_SMS_R4:-16,24,32} ;;
    *) sms=${JAX_EP_BENCH_SMS_R2:-24,48} ;;
  esac
  # Leave room next to XLA's pools for the registered buffers and the copy roofline.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(f'{0.55 / $R:.3f}')")
  python3 -m jax_ep.launch -n "$R" --timeout 500 benchmarks/bench_intranode.py --sms "$sms" --out "$OUT/bench" \
    || status=1
done
exit $status
