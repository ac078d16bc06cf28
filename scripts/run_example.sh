#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and train the example MoE transformer with expert parallelism
# (8 virtual CPU devices unless a GPU backend is chosen). Extra arguments go to
# examples/train_moe_transformer.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python examples/train_moe_transformer.py "$@"
